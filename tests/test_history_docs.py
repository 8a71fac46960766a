"""docs/history.md documents the recorder's schema as the code has it; the README stays short."""

from __future__ import annotations

from pathlib import Path

from consumers.recorder import EVENT_SCHEMA, TICK_SCHEMA

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "history.md").read_text()


def test_every_recorded_column_is_documented() -> None:
    for name in [*TICK_SCHEMA.names, *EVENT_SCHEMA.names]:
        assert f"`{name}`" in DOC, f"docs/history.md does not document the column {name}"


def test_every_event_kind_is_documented() -> None:
    for kind in ("gap", "epoch", "stale", "live", "cut", "start", "stop"):
        assert f"`{kind}`" in DOC


def test_the_readme_points_at_the_history_doc_and_stays_short() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/history.md" in readme and "kitebus record DIR" in readme
    assert len(readme.splitlines()) <= 250
