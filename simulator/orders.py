"""Orders of a simulated account, each change an order update as Kite sends it: the
fields of Kite's postback (``order_id``, ``status``, ``filled_quantity``, ...).

Statuses as Kite's: ``OPEN`` when placed, ``UPDATE`` for a partial fill or a
modification, ``COMPLETE`` once filled, ``CANCELLED``, ``REJECTED`` (with
``status_message``). No I/O: the server sends what these return.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from typing import Any

from simulator.market import BY_TOKEN, INSTRUMENTS, Instrument

FINAL = ("COMPLETE", "CANCELLED", "REJECTED")
_BY_SYMBOL = {(i.exchange, i.symbol): i for i in INSTRUMENTS}


class OrderError(ValueError):
    """A request the desk cannot take (unknown order, one already done, a bad quantity)."""


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))


class OrderDesk:
    """The orders of one account. ``price_of(token)`` is the market's last price (rupees)."""

    def __init__(
        self,
        user_id: str = "KB0001",
        *,
        price_of: Callable[[int], float] | None = None,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
    ) -> None:
        self.user_id = user_id
        self._price_of = price_of or (lambda token: BY_TOKEN[token].price if token in BY_TOKEN else 100.0)
        self._clock = clock
        self._rng = random.Random(seed)
        self._ids = itertools.count(int(clock() * 1000) % 10**8)  # apart from a previous run's
        self.orders: dict[str, dict[str, Any]] = {}  # order_id -> its latest state (an update's fields)

    def _order(self, order_id: str) -> dict[str, Any]:
        state = self.orders.get(order_id)
        if state is None:
            raise OrderError(f"no order {order_id!r}")
        if state["status"] in FINAL:
            raise OrderError(f"order {order_id} is {state['status']}")
        return state

    def _changed(self, state: dict[str, Any], status: str, message: str | None = None) -> dict[str, Any]:
        now = _stamp(self._clock())
        state.update(status=status, status_message=message, status_message_raw=message)
        state["exchange_update_timestamp"] = now
        if status != "REJECTED" and state["exchange_order_id"] is None:
            state["exchange_order_id"] = "1300" + state["order_id"][-12:]
            state["exchange_timestamp"] = now
        return dict(state, meta=dict(state["meta"]))

    def place(
        self,
        tradingsymbol: str,
        quantity: int,
        *,
        exchange: str = "NSE",
        transaction_type: str = "BUY",
        order_type: str = "LIMIT",
        price: float | None = None,
        product: str = "MIS",
        tag: str | None = None,
        reject: str | None = None,
    ) -> dict[str, Any]:
        """A new order: its ``OPEN`` update (``REJECTED`` with ``reject`` as the reason)."""
        instrument = _BY_SYMBOL.get((exchange.upper(), tradingsymbol.upper()))
        if instrument is None:
            raise OrderError(f"unknown instrument {exchange}:{tradingsymbol}")
        if quantity < 1:
            raise OrderError("quantity must be at least 1")
        if transaction_type not in ("BUY", "SELL") or order_type not in ("LIMIT", "MARKET"):
            raise OrderError("transaction_type BUY or SELL, order_type LIMIT or MARKET")
        day = time.strftime("%y%m%d", time.localtime(self._clock()))
        order_id = f"{day}{next(self._ids):09d}"  # as Kite's: the day, then a number
        now = _stamp(self._clock())
        limit = float(price) if price is not None and order_type == "LIMIT" else 0.0
        state = {
            "user_id": self.user_id, "unfilled_quantity": 0, "app_id": 1, "checksum": "",
            "placed_by": self.user_id, "order_id": order_id, "exchange_order_id": None,
            "parent_order_id": None, "status": "OPEN",
            "status_message": None, "status_message_raw": None, "order_timestamp": now,
            "exchange_update_timestamp": now, "exchange_timestamp": None, "variety": "regular",
            "exchange": instrument.exchange, "tradingsymbol": instrument.symbol,
            "instrument_token": instrument.token, "order_type": order_type,
            "transaction_type": transaction_type,
            "validity": "DAY", "product": product, "quantity": quantity, "disclosed_quantity": 0,
            "price": limit, "trigger_price": 0, "average_price": 0, "filled_quantity": 0,
            "pending_quantity": quantity, "cancelled_quantity": 0, "market_protection": 0, "meta": {},
            "tag": tag, "guid": f"{self._rng.randrange(16**6):06x}",
        }  # fmt: skip
        self.orders[order_id] = state
        if reject:
            state["pending_quantity"] = 0
            return self._changed(state, "REJECTED", reject)
        return self._changed(state, "OPEN")

    def fill(self, order_id: str, quantity: int | None = None, price: float | None = None) -> dict[str, Any]:
        """Fill ``quantity`` more (all that is pending by default) at ``price`` (the order's
        limit, else the market's): ``UPDATE`` while some is pending, then ``COMPLETE``."""
        state = self._order(order_id)
        pending = state["pending_quantity"]
        quantity = pending if quantity is None else quantity
        if not 1 <= quantity <= pending:
            raise OrderError(f"fill quantity must be 1..{pending}")
        at = price if price is not None else state["price"] or self._market_price(state["instrument_token"])
        filled = state["filled_quantity"]
        paid = state["average_price"] * filled + at * quantity
        state["average_price"] = round(paid / (filled + quantity), 4)
        state["filled_quantity"] = filled + quantity
        state["pending_quantity"] = pending - quantity
        return self._changed(state, "UPDATE" if state["pending_quantity"] else "COMPLETE")

    def modify(
        self, order_id: str, quantity: int | None = None, price: float | None = None
    ) -> dict[str, Any]:
        """A new quantity (not below what is filled) or limit price: ``UPDATE``."""
        state = self._order(order_id)
        if quantity is not None:
            if quantity <= state["filled_quantity"]:
                raise OrderError(f"quantity must be more than the {state['filled_quantity']} filled")
            state["quantity"] = quantity
            state["pending_quantity"] = quantity - state["filled_quantity"]
        if price is not None:
            state["price"] = float(price)
        return self._changed(state, "UPDATE")

    def cancel(self, order_id: str) -> dict[str, Any]:
        state = self._order(order_id)
        state["cancelled_quantity"] = state["pending_quantity"]
        state["pending_quantity"] = 0
        return self._changed(state, "CANCELLED")

    def reject(self, order_id: str, reason: str = "RMS: margin exceeds") -> dict[str, Any]:
        state = self._order(order_id)
        state["cancelled_quantity"] = state["pending_quantity"]
        state["pending_quantity"] = 0
        return self._changed(state, "REJECTED", reason)

    def random_step(self) -> dict[str, Any]:
        """One random change, as a busy account makes them: mostly new orders and fills (in
        parts), now and then a modification, a cancellation or a rejection."""
        rng = self._rng
        open_ids = [i for i, s in self.orders.items() if s["status"] not in FINAL]
        if not open_ids or rng.random() < 0.3:
            instrument: Instrument = rng.choice([i for i in INSTRUMENTS if i.exchange == "NSE"][:12])
            quantity = rng.choice([1, 5, 10, 25, 50, 100])
            market = rng.random() < 0.3
            near = self._market_price(instrument.token) * rng.uniform(0.99, 1.01)
            price = None if market else round(near, 1)
            reject = "RMS: margin exceeds" if rng.random() < 0.05 else None
            return self.place(
                instrument.symbol, quantity, transaction_type=rng.choice(["BUY", "SELL"]),
                order_type="MARKET" if market else "LIMIT", price=price, reject=reject,
            )  # fmt: skip
        order_id = rng.choice(open_ids)
        state = self.orders[order_id]
        pending = state["pending_quantity"]
        roll = rng.random()
        if roll < 0.75:  # a fill, in parts more often than not
            part = rng.randint(1, pending) if pending > 1 and rng.random() < 0.6 else None
            return self.fill(order_id, part)
        if roll < 0.85:
            return self.modify(order_id, price=round(self._market_price(state["instrument_token"]), 1))
        if roll < 0.95:
            return self.cancel(order_id)
        return self.reject(order_id)

    def _market_price(self, token: int) -> float:
        return round(self._price_of(token), 2)
