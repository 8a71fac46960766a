"""RESP built and read in one place (``rediswire/resp.py``): what it builds parses back, and
the one-line reply counters agree with a real parser however the bytes are split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rediswire import resp
from tests.resp import parse_commands

args = st.lists(st.binary(max_size=40), min_size=1, max_size=6)


@given(args)
def test_a_command_parses_back_to_its_arguments(arguments: list[bytes]) -> None:
    assert parse_commands(resp.command(*arguments)) == [arguments]


@given(args, st.data())
def test_a_command_head_and_bulks_make_the_same_command(arguments: list[bytes], data) -> None:
    first = data.draw(st.integers(0, len(arguments)))
    built = resp.command_head(len(arguments), *arguments[:first])
    built += b"".join(resp.bulk(arg) for arg in arguments[first:])
    assert built == resp.command(*arguments)


@given(st.dictionaries(st.integers(0, 2**32 - 1), st.binary(max_size=30), min_size=1, max_size=8))
def test_bulk_pairs_are_hset_fields(items: dict[int, bytes]) -> None:
    (hset,) = parse_commands(resp.command_head(2 + 2 * len(items), b"HSET", b"k") + resp.bulk_pairs(items))
    assert hset[2::2] == [b"%d" % t for t in items] and hset[3::2] == list(items.values())


one_line = st.one_of(
    st.integers(-(2**40), 2**40).map(lambda n: b":%d\r\n" % n),
    st.sampled_from([b"+OK\r\n", b"-ERR no\r\n", b"-MOVED 1 x:1\r\n", b"-READONLY r\r\n"]),
)


@given(st.lists(one_line, max_size=30), st.data())
def test_counting_one_line_replies_in_chunks_agrees_with_the_parser(replies: list[bytes], data) -> None:
    stream = b"".join(replies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    counted = errors = 0
    at_line_start = True
    for chunk in chunks:
        counted += resp.replies_in(chunk)
        errors += resp.errors_in(chunk, at_line_start)
        if chunk:
            at_line_start = chunk.endswith(b"\n")
    parsed = resp.Replies()
    parsed.feed(stream)
    replies_read = list(parsed)
    assert counted == len(replies_read) == len(replies)
    assert errors == sum(map(resp.is_error, replies_read))
    assert [resp.is_error_line(r) for r in replies] == [resp.is_error(r) for r in replies_read]


def test_replies_waits_for_a_whole_reply() -> None:
    parsed = resp.Replies()
    parsed.feed(b"$5\r\nhel")
    assert parsed.next() is resp.INCOMPLETE
    parsed.feed(b"lo\r\n")
    assert parsed.next() == b"hello"
