"""The access token's file: what counts as a token, atomic writes, reloads that keep the last good one."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from publisher.access_token import (
    AccessTokenError,
    AccessTokenSource,
    parse_access_token,
    write_access_token_file,
)


@pytest.mark.parametrize("text", ["abc123\n", "abc123", "  abc123  \r\n", "abc123\n\n"])
def test_one_line_is_a_token(text: str) -> None:
    assert parse_access_token(text) == "abc123"


@pytest.mark.parametrize(
    ("text", "why"),
    [("", "empty"), ("\n \n", "empty"), ("abc\ndef\n", "more than one line"), ("ab c", "not an access token"),
     ("ab\x00c", "not an access token"), ("x" * 600, "not an access token")],
)  # fmt: skip
def test_anything_else_is_refused_without_quoting_it(text: str, why: str) -> None:
    with pytest.raises(AccessTokenError, match=why) as caught:
        parse_access_token(text)
    assert text.strip() == "" or text.strip()[:3] not in str(caught.value)


def test_writes_are_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_access_token_file(path, "first\n")
    write_access_token_file(path, "second")
    assert path.read_text() == "second\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]  # no temporary file left behind
    with pytest.raises(AccessTokenError):
        write_access_token_file(path, "two\nlines\n")
    assert path.read_text() == "second\n"  # a refused write changes nothing


def test_a_bad_file_is_reported_and_the_last_good_token_stays(tmp_path: Path) -> None:
    path = tmp_path / "token"
    seen: list[str] = []
    source = AccessTokenSource("from-env", path, seen.append)
    assert source.access_token == "from-env" and "missing" in source.error  # no file yet: the env token
    for bad in ("", "a\nb\n"):
        path.write_text(bad)
        assert source.reload() is False
        assert source.access_token == "from-env" and source.error
    path.write_text("day-2\n")
    assert source.reload() is True and source.access_token == "day-2" and source.error == ""
    assert seen == ["day-2"]
    assert source.reload() is False and seen == ["day-2"]  # the same token again is no change
    path.unlink()
    path.mkdir()  # unreadable for root too (a file of mode 0 is not)
    assert source.reload() is False and "cannot be read (IsADirectoryError)" in source.error
    assert source.access_token == "day-2"


async def test_a_file_replaced_by_rename_is_picked_up_within_seconds(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("day-1\n")
    changed = asyncio.Event()
    source = AccessTokenSource(None, path, lambda token: changed.set())
    source.start()
    try:
        await asyncio.wait_for(source.watching.wait(), 5)
        write_access_token_file(path, "day-2")  # tempfile + rename, as a login script does
        await asyncio.wait_for(changed.wait(), 5)
        assert source.access_token == "day-2"
        changed.clear()
        path.write_text("day-3\n")  # written in place
        await asyncio.wait_for(changed.wait(), 5)
        assert source.access_token == "day-3"
    finally:
        await source.close()


async def test_a_change_made_before_the_watch_was_in_place_counts_too(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("day-1\n")
    seen: list[str] = []
    source = AccessTokenSource(None, path, seen.append)  # the publisher reads it here...
    write_access_token_file(path, "day-2")  # ...the login script writes...
    source.start()  # ...and the watch starts
    try:
        await asyncio.wait_for(source.watching.wait(), 5)
        assert seen == ["day-2"] and source.access_token == "day-2"
    finally:
        await source.close()
