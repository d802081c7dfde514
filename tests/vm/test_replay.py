"""Deterministic record/replay: a --replayable plugin recording, replayed exactly with the gdb recorder.

The replay runs the very instructions of the recording (QEMU icount rr=replay), so the gdb backend's stops
cannot perturb it: the two traces must agree event by event, and the console byte for byte.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.vm

SAME = ["event", "site", "pc", "ptep", "pteval", "preempt_count", "need_resched", "irqs_on", "pid", "cpu"]


def lazytrace(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_gdb_replay_of_a_plugin_recording_is_identical(tmp_path: Path):
    rec, rep = tmp_path / "rec", tmp_path / "rep"
    r = lazytrace("record", "--replayable", "--backend", "plugin", "--iterations", "1", "--out", str(rec),
                  timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (rec / "replay.bin").stat().st_size > 0
    r = lazytrace("replay", str(rec), "--backend", "gdb", "--out", str(rep), timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (rec / "console.log").read_bytes() == (rep / "console.log").read_bytes()
    a = pd.read_parquet(rec / "trace.parquet")
    b = pd.read_parquet(rep / "trace.parquet")
    assert len(a) == len(b) > 1000
    pd.testing.assert_frame_equal(a[SAME].reset_index(drop=True), b[SAME].reset_index(drop=True))


def test_replay_refuses_a_run_that_is_not_replayable(tmp_path: Path):
    d = Path(__file__).resolve().parent.parent / "fixtures" / "fork-exec-6.1-plugin"
    r = lazytrace("replay", str(d), "--out", str(tmp_path / "x"), timeout=120)
    assert r.returncode == 2
    assert "not a replayable run (record it with --replayable)" in r.stderr
