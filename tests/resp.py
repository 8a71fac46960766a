"""Reading RESP in tests: the commands a buffer of pre-encoded RESP holds."""

from __future__ import annotations

import hiredis


def parse_commands(data: bytes) -> list[list[bytes]]:
    """Every command in ``data``, each as its list of arguments."""
    reader = hiredis.Reader()
    reader.feed(data)
    out = []
    while (command := reader.gets()) is not False:
        out.append(command)
    return out
