"""docs/benchmarks.md: the codec and line-rate sections say the commit they were measured
on, and that commit has what the figures claim to include."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "benchmarks.md").read_text()
SECTIONS = ["The publisher at line rate", "The codec and the encoder"]
# commits the measured code must contain
INCLUDED = {
    "b37bf7e": "sequence numbers (seq, epoch) in every payload",
    "f145d8f": "the lease checked before every frame is published",
}


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def _known(commit: str) -> bool:
    return _git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0


def _measured_on(section: str) -> str:
    """The commit on a section's ``- Commit:`` line."""
    text = DOC[DOC.index(f"\n## {section}\n") :]
    text = text[: text.find("\n## ", 1)]
    found = re.search(r"^- Commit: ([0-9a-f]{7,40})\b", text, flags=re.M)
    assert found, f"{section!r} in docs/benchmarks.md does not say the commit it was measured on"
    return found.group(1)


@pytest.mark.parametrize("section", SECTIONS)
def test_the_codec_and_line_rate_figures_say_the_commit_they_were_measured_on(section: str) -> None:
    commit = _measured_on(section)
    if not _known(commit) or not all(map(_known, INCLUDED)):
        pytest.skip("the commits are not in this checkout's history (a shallow clone?)")
    assert _git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0, f"{commit} is not behind HEAD"
    for needed, what in INCLUDED.items():
        included = _git("merge-base", "--is-ancestor", needed, commit).returncode == 0
        assert included, f"{section!r} was measured before {what} ({needed})"
