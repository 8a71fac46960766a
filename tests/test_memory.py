"""The publisher's malloc thresholds: fixed where glibc is the C library, left alone elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys

from publisher import memory


def test_the_thresholds_are_fixed_on_glibc_and_nothing_fails_elsewhere() -> None:
    # in a process of its own: the setting is for the whole process
    out = subprocess.run(
        [sys.executable, "-c", "from publisher.memory import keep_freed_memory; print(keep_freed_memory())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == str(platform.libc_ver()[0] == "glibc")


def test_no_c_library_found_changes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: "libkitebus-no-such-library.so")
    assert memory.keep_freed_memory() is False


def test_a_c_library_without_mallopt_changes_nothing(monkeypatch) -> None:
    """musl and macOS: the library loads, it has no ``mallopt``."""
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: object())
    assert memory.keep_freed_memory() is False


def test_the_objects_of_start_are_frozen_out_of_the_collectors_way() -> None:
    code = "import gc; from publisher.memory import tune_memory; tune_memory(); print(gc.get_freeze_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 1000  # the imported modules' objects, at least
