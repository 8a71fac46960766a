"""The simulator's orders (simulator/orders.py): each change an update shaped as Kite's."""

from __future__ import annotations

import time

import pytest

from simulator.orders import FINAL, OrderDesk, OrderError

KITE_FIELDS = {  # the fields of Kite's order postback
    "user_id", "unfilled_quantity", "app_id", "checksum", "placed_by", "order_id", "exchange_order_id",
    "parent_order_id", "status", "status_message", "status_message_raw", "order_timestamp",
    "exchange_update_timestamp", "exchange_timestamp", "variety", "exchange", "tradingsymbol",
    "instrument_token", "order_type", "transaction_type", "validity", "product", "quantity",
    "disclosed_quantity", "price", "trigger_price", "average_price", "filled_quantity", "pending_quantity",
    "cancelled_quantity", "market_protection", "meta", "tag", "guid",
}  # fmt: skip


def test_an_order_is_placed_filled_in_parts_and_completes() -> None:
    desk = OrderDesk(clock=lambda: 1_764_330_000.0)
    placed = desk.place("sbin", 10, price=960.5)
    assert set(placed) == KITE_FIELDS
    assert (placed["status"], placed["tradingsymbol"], placed["instrument_token"]) == ("OPEN", "SBIN", 779521)
    day = time.strftime("%y%m%d", time.localtime(1_764_330_000.0))
    assert placed["order_id"].startswith(day) and len(placed["order_id"]) == 15  # as Kite's
    first = desk.fill(placed["order_id"], 4)
    second = desk.fill(placed["order_id"], 4, price=961.0)
    assert (first["status"], first["filled_quantity"], first["pending_quantity"]) == ("UPDATE", 4, 6)
    assert (second["status"], second["filled_quantity"]) == ("UPDATE", 8)  # same status, other figures
    assert second["average_price"] == pytest.approx((960.5 * 4 + 961.0 * 4) / 8)
    done = desk.fill(placed["order_id"])
    assert (done["status"], done["filled_quantity"], done["pending_quantity"]) == ("COMPLETE", 10, 0)
    assert first["filled_quantity"] == 4  # each update is a copy, not the live state
    with pytest.raises(OrderError, match="COMPLETE"):
        desk.cancel(placed["order_id"])


def test_cancel_reject_and_modify_as_kite_reports_them() -> None:
    desk = OrderDesk()
    order_id = desk.place("INFY", 5, order_type="MARKET")["order_id"]
    modified = desk.modify(order_id, quantity=8, price=1500)
    assert (modified["status"], modified["quantity"], modified["pending_quantity"]) == ("UPDATE", 8, 8)
    cancelled = desk.cancel(order_id)
    assert (cancelled["status"], cancelled["cancelled_quantity"], cancelled["pending_quantity"]) == (
        "CANCELLED", 8, 0,
    )  # fmt: skip
    rejected = desk.place("INFY", 5, reject="RMS: margin exceeds")
    assert rejected["status"] == "REJECTED" and rejected["status_message"] == "RMS: margin exceeds"
    assert rejected["exchange_order_id"] is None  # it never reached the exchange
    later = desk.reject(desk.place("TCS", 1)["order_id"], "exchange says no")
    assert later["status"] == "REJECTED" and later["status_message"] == "exchange says no"


@pytest.mark.parametrize(
    "call",
    [
        lambda d: d.place("NOPE", 1),
        lambda d: d.place("INFY", 0),
        lambda d: d.place("INFY", 1, transaction_type="HOLD"),
        lambda d: d.fill("missing"),
        lambda d: d.fill(d.place("INFY", 2)["order_id"], 3),
        lambda d: d.modify(d.place("INFY", 2)["order_id"], quantity=0),
    ],
)
def test_what_the_desk_refuses(call) -> None:
    with pytest.raises(OrderError):
        call(OrderDesk())


def test_random_orders_walk_through_every_status_and_stay_consistent() -> None:
    desk = OrderDesk(seed=5)
    updates = [desk.random_step() for _ in range(400)]
    assert {u["status"] for u in updates} == {"OPEN", "UPDATE", "COMPLETE", "CANCELLED", "REJECTED"}
    for update in updates:
        assert update["filled_quantity"] + update["pending_quantity"] + update["cancelled_quantity"] in (
            update["quantity"], update["filled_quantity"] + update["cancelled_quantity"],
        )  # fmt: skip
    partial = [u for u in updates if u["status"] == "UPDATE" and 0 < u["filled_quantity"] < u["quantity"]]
    assert partial  # fills in parts
    assert any(s["status"] not in FINAL for s in desk.orders.values())  # and some still open
