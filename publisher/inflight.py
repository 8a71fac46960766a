"""What the tick flow has sent to Redis and not yet had answered, socket by socket.

One server is one socket (a *lane*); a Redis Cluster has a lane per master. A batch goes
out as one part per lane and is done with once every lane has answered its part, in the
order the batches were sent. Replies are counted by lines: every reply to a PUBLISH,
SPUBLISH, HSET or HDEL is one line, an error starts with '-'. From the first error on a
lane its replies are read one by one and matched to the commands, so that exactly the
ticks that failed are known (and no tick that went out is sent again).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kitewire import codec
from rediswire import resp

Source = bytes | tuple[int, ...]  # a frame, or the tokens of a republish
REDIRECTS = (b"MOVED", b"ASK", b"CLUSTERDOWN", b"TRYAGAIN")  # a cluster's slots moved or are not served
# The server is not (or not yet) a primary that takes our writes: a demoted primary, one
# loading its data, a replica that lost its primary. The socket must be opened afresh
# (through Sentinel, if used, to whichever server is primary now).
NOT_PRIMARY = (b"READONLY", b"LOADING", b"MASTERDOWN")


@dataclass(frozen=True, slots=True)
class Released:
    """Tokens an HDEL removes from ``{ns}:last`` and ``{ns}:token_status``."""

    tokens: tuple[int, ...]


Command = tuple[int, Source | Released | None]  # (its replies, what they answer: None for no tick)


@dataclass
class Batch:
    """One write in flight: per lane, the replies it awaits, its ticks and its commands."""

    size: int
    replies: list[int]
    ticks: list[int]
    commands: list[list[Command]]
    open: int = 0  # lanes that still owe replies
    expected: list[int] = field(default_factory=list)
    positions: list[list[int]] = field(default_factory=list)  # per lane, per command: the sink's mark
    # (lane, reply index) of each refused command; index -1: the lane's socket failed
    failed: set[tuple[int, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.open = sum(1 for count in self.replies if count)
        self.expected = list(self.replies)

    @property
    def total(self) -> int:
        return sum(self.ticks)

    def command_at(self, lane: int, index: int) -> tuple[Source | Released | None, int]:
        """What the ``index``-th reply on ``lane`` answers, and which of its ticks."""
        for count, what in self.commands[lane]:
            if index < count:
                return what, index
            index -= count
        return None, 0


@dataclass
class Answers:
    """What replies (or a failure) settled: for the sink's figures and what goes again."""

    done: int = 0  # ticks that went out, in batches done with
    failed: int = 0  # ticks that did not go out, or whose fate is unknown (never in ``done``)
    errors: int = 0  # error replies
    last_error: str = ""
    redirected: bool = False  # a slot moved or is not served: the map of slots is stale
    not_primary: bool = False  # the server said it is not a primary that takes writes
    lost: set[int] = field(default_factory=set)  # tokens whose newest tick must go again
    released: set[int] = field(default_factory=set)  # tokens to delete again from {ns}:last


class InFlight:
    """Batches sent and not yet answered, and each lane's share of them."""

    def __init__(self, lanes: int = 1) -> None:
        self.track = False  # keep the batches done with in ``completed`` (for the live follow-ups)
        self.completed: list[Batch] = []
        self.reset(lanes)

    def reset(self, lanes: int) -> None:
        """Start over with ``lanes`` sockets and nothing in flight."""
        self.batches: deque[Batch] = deque()
        self._owing: list[deque[Batch]] = [deque() for _ in range(lanes)]
        self._line_start = [True] * lanes  # the lane's replies are at the start of a line
        self._careful: list[bytes | None] = [None] * lanes  # read one by one: the partial reply
        self.bytes = 0

    @property
    def lanes(self) -> int:
        return len(self._owing)

    @property
    def ticks(self) -> int:
        return sum(batch.total for batch in self.batches)

    def owes(self, lane: int) -> bool:
        return bool(self._owing[lane])

    def add(self, batch: Batch, parts: list[bytes]) -> None:
        self.batches.append(batch)
        self.bytes += batch.size
        for lane, part in enumerate(parts):
            if part:
                self._owing[lane].append(batch)

    def read(self, lane: int, data: bytes, *, careful: bool) -> Answers:
        """Replies that arrived on ``lane``. ``careful``: from the first error on, read them
        one by one (until a chunk without an error), so that exactly the ticks that failed
        are known."""
        if self._careful[lane] is not None:
            return self._read_each(lane, data)
        errors = resp.errors_in(data, self._line_start[lane])
        if errors and careful:
            self._careful[lane] = b"" if self._line_start[lane] else b"+"  # "+": a reply under way
            return self._read_each(lane, data)
        self._line_start[lane] = data.endswith(b"\n")
        answers = Answers(errors=errors, last_error=f"redis answered {errors} error(s)" if errors else "")
        owing, replies = self._owing[lane], resp.replies_in(data)
        while replies and owing:
            head = owing[0]
            taken = min(replies, head.replies[lane])
            head.replies[lane] -= taken
            replies -= taken
            if head.replies[lane] == 0:
                owing.popleft()
                head.open -= 1
        answers.done = self._complete()
        return answers

    def _read_each(self, lane: int, data: bytes) -> Answers:
        answers = Answers()
        lines = ((self._careful[lane] or b"") + data).split(b"\n")
        self._careful[lane] = lines.pop()  # a reply not yet complete
        owing = self._owing[lane]
        for line in lines:
            if not owing:
                break
            head = owing[0]
            what, index = head.command_at(lane, head.expected[lane] - head.replies[lane])
            error = resp.is_error_line(line)
            if error:
                head.failed.add((lane, head.expected[lane] - head.replies[lane]))
                answers.errors += 1
                answers.last_error = f"redis answered {line[:80].decode('utf-8', 'replace').strip()}"
                answers.redirected |= line[1:].startswith(REDIRECTS)
                answers.not_primary |= line[1:].startswith(NOT_PRIMARY)
            if isinstance(what, Released):
                if error:  # deleted again later
                    answers.released.update(what.tokens)
            elif what is not None:
                token = tokens_of(what)[index]
                if error:  # a tick that did not go out
                    answers.failed += 1
                    head.ticks[lane] -= 1
                    answers.lost.add(token)
                else:  # went out: newer than any tick of its token that failed before it
                    answers.lost.discard(token)
            head.replies[lane] -= 1
            if head.replies[lane] == 0:
                owing.popleft()
                head.open -= 1
        if not answers.errors and self._careful[lane] == b"":  # a clean chunk, ending a reply
            self._careful[lane] = None
            self._line_start[lane] = True
        answers.done = self._complete()
        return answers

    def fail_lane(self, lane: int) -> Answers:
        """The lane's socket failed: what it holds may or may not have gone out."""
        answers = Answers()
        for batch in self._owing[lane]:
            batch.failed.add((lane, -1))
            answers.failed += batch.ticks[lane]
            batch.ticks[lane] = 0
            _settle(batch.commands[lane], answers)
            batch.replies[lane] = 0
            batch.open -= 1
        self._owing[lane].clear()
        answers.done = self._complete()
        return answers

    def fail_all(self) -> Answers:
        """Every socket failed: nothing in flight is known to have gone out."""
        answers = Answers()
        for batch in self.batches:
            answers.failed += batch.total
            for commands in batch.commands:
                _settle(commands, answers)
        self.reset(self.lanes)
        return answers

    def _complete(self) -> int:
        """Batches done with, in order, whichever lane answered last: their ticks."""
        done, batches = 0, self.batches
        while batches and not batches[0].open:
            head = batches.popleft()
            self.bytes -= head.size
            done += head.total
            if self.track:
                self.completed.append(head)
        return done


def _settle(commands: list[Command], answers: Answers) -> None:
    """Commands whose fate is unknown: their ticks' tokens and their HDELs go again."""
    for _, what in commands:
        if isinstance(what, Released):
            answers.released.update(what.tokens)
        elif what is not None:
            answers.lost.update(tokens_of(what))


def tokens_of(source: Source) -> tuple[int, ...] | list[int]:
    """The tokens of a source's ticks, in the order their commands were written."""
    return codec.frame_tokens(source) if isinstance(source, bytes) else source
