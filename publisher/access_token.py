"""The day's access token: from ``KITE_ACCESS_TOKEN``, or from a file that is watched.

Kite's access tokens expire every morning. With ``KITE_ACCESS_TOKEN_FILE`` the token is
read from that file (it wins over ``KITE_ACCESS_TOKEN``) and the file is watched: a change,
written in place or replaced by rename as a login script does, is read within a second
or two and handed to ``on_change``. A file that is missing, unreadable, empty or holds
more than one line is reported (log, ``error``) and the last good token stays in use.
The token itself is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import watchfiles

from publisher.health import Health
from publisher.supervisor import supervised
from rediswire.tasks import cancel_and_wait

log = logging.getLogger("kitebus.access_token")

MAX_LENGTH = 512


class AccessTokenError(ValueError):
    """The text is not one access token; the message never contains the text."""


def parse_access_token(text: str) -> str:
    """One line, not empty, no spaces inside; a trailing newline is fine."""
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise AccessTokenError("it is empty")
    if len([line for line in lines if line.strip()]) > 1:
        raise AccessTokenError("it holds more than one line")
    access_token = lines[0].strip()
    if len(access_token) > MAX_LENGTH or any(c.isspace() or not c.isprintable() for c in access_token):
        raise AccessTokenError("it is not an access token (spaces, control characters or too long)")
    return access_token


def read_access_token_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AccessTokenError("the file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AccessTokenError(f"the file cannot be read ({exc.__class__.__name__})") from None
    return parse_access_token(text)


def write_access_token_file(path: Path, access_token: str) -> None:
    """Replace the file atomically (a temporary file in the same folder, then a rename),
    readable by its owner only."""
    access_token = parse_access_token(access_token)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(access_token + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class AccessTokenSource:
    """The access token in use. With a file, ``start`` watches it until ``close``."""

    def __init__(
        self, access_token: str | None, path: Path | None, on_change: Callable[[str], None] | None = None
    ) -> None:
        self.access_token = access_token
        self.path = path
        self.on_change = on_change
        self.error = ""  # what is wrong with the file now ("" when it is fine)
        self.changed_at = 0.0
        self.health = Health()  # the publisher's, once it is given one
        self.watching = asyncio.Event()  # the watch is in place: no change from now on is missed
        self._task: asyncio.Task[None] | None = None
        if path is not None:
            self.reload(notify=False)  # the first token is the one to start with, not a change

    def reload(self, notify: bool = True) -> bool:
        """Read the file again; True when it held a new valid token."""
        assert self.path is not None
        try:
            access_token = read_access_token_file(self.path)
        except AccessTokenError as exc:
            self.error = f"{self.path}: {exc}"
            log.error("access token file %s: %s; keeping the last good token", self.path, exc)
            return False
        self.error = ""
        if access_token == self.access_token:
            return False
        self.access_token = access_token
        self.changed_at = time.time()
        log.warning("access token changed path=%s", self.path)
        if notify and self.on_change is not None:
            self.on_change(access_token)
        return True

    def start(self) -> None:
        if self.path is not None:
            self._task = asyncio.create_task(
                supervised("access-token-watch", self._watch, self.health), name="access-token-watch"
            )

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _watch(self) -> None:
        assert self.path is not None
        name = self.path.name
        # The folder, not the file: a login script replaces the file by rename.
        changes = watchfiles.awatch(
            self.path.parent, watch_filter=lambda _, changed: Path(changed).name == name,
            debounce=200, step=50, recursive=False,
        )  # fmt: skip
        pending = asyncio.ensure_future(anext(changes))
        try:
            await asyncio.sleep(0)  # the generator's first step makes the watcher, then waits
            if pending.done():
                await pending  # the watch could not be made: raise
            # A change made before the watch was in place (since the first read, or while a
            # crashed watch was restarted) counts too.
            self.reload()
            self.watching.set()
            while True:
                await pending
                self.reload()
                pending = asyncio.ensure_future(anext(changes))
        finally:
            self.watching.clear()
            await cancel_and_wait(pending)
            await changes.aclose()
