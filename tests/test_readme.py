"""The README's benchmark tables say the commit they were measured on, and that commit has
what the figures claim to include."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
# where each table's text begins, in the README
TABLES = {
    "codec": "`.venv/bin/python bench/codec.py` — the codec's paths",
    "line rate": "`.venv/bin/python bench/publisher.py` — end to end at line rate",
    "line rate on a cluster": "`.venv/bin/python bench/publisher.py --cluster` runs the same",
}
# commits the measured code must contain
INCLUDED = {
    "b37bf7e": "sequence numbers (seq, epoch) in every payload",
    "f145d8f": "the lease checked before every frame is published",
}


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def _measured_on(opening: str) -> str:
    """The commit named in a table's text: from its opening to the next benchmark's or heading."""
    start = README.index(opening)
    ends = [README.find(mark, start + 1) for mark in ("`.venv/bin/python bench/", "\n#")]
    text = README[start : min([end for end in ends if end != -1], default=len(README))]
    found = re.search(r"measured on commit ([0-9a-f]{7,40})", text)
    assert found, f"the README's {opening!r} does not say the commit it was measured on"
    return found.group(1)


@pytest.mark.parametrize("table", TABLES)
def test_each_benchmark_table_says_the_commit_it_was_measured_on(table: str) -> None:
    commit = _measured_on(TABLES[table])
    if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        pytest.skip(f"commit {commit} is not in this checkout's history (a shallow clone?)")
    assert _git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0, f"{commit} is not behind HEAD"
    for needed, what in INCLUDED.items():
        if _git("cat-file", "-e", f"{needed}^{{commit}}").returncode != 0:
            pytest.skip(f"commit {needed} is not in this checkout's history")
        included = _git("merge-base", "--is-ancestor", needed, commit).returncode == 0
        assert included, f"the {table} table was measured before {what} ({needed})"
