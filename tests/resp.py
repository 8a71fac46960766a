"""Reading RESP in tests: the commands a buffer of pre-encoded RESP holds."""

from __future__ import annotations

from typing import cast

from rediswire import resp


def parse_commands(data: bytes) -> list[list[bytes]]:
    """Every command in ``data``, each as its list of arguments (read as replies are)."""
    reader = resp.Replies()
    reader.feed(data)
    commands = list(reader)
    assert all(isinstance(command, list) for command in commands), commands
    return cast(list[list[bytes]], commands)
