"""``lazytrace record`` / ``run`` through the real CLI: interruption keeps what was recorded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import TEST_WORKLOADS

pytestmark = pytest.mark.vm

START_TIMEOUT_S = 180.0


def test_sigint_keeps_a_readable_partial_trace(run_dir: Path):
    """Ctrl-C in the middle of a traced workload: exit 130, trace.parquet readable, manifest says why."""
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "record", "--backend", "plugin",
                             "--workload", str(TEST_WORKLOADS / "busy"), "--out", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    console = run_dir / "console.log"
    while time.monotonic() < deadline:
        if console.exists() and "busy: round 3" in console.read_text(errors="replace"):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the workload never got going")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    m = json.loads((run_dir / "run.json").read_text())
    assert m["status"] == "partial" and m["partial_reason"] == "interrupted"
    df = pd.read_parquet(run_dir / "trace.parquet")
    assert len(df) == m["events_recorded"] > 0
    assert (df.event == "marker").sum() == 1  # the start marker, and no end marker
    out = subprocess.run(["pgrep", "-af", f"lazytrace-{run_dir.name},"], capture_output=True, text=True)
    assert out.stdout == ""


def test_check_reads_the_interrupted_trace(run_dir: Path):
    """A partial trace is checked and the report says partial."""
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "record", "--backend", "plugin",
                             "--workload", str(TEST_WORKLOADS / "busy"), "--out", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        log = run_dir / "console.log"
        if log.exists() and "busy: round 2" in log.read_text(errors="replace"):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "check", "--no-plots", str(run_dir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert "partial" in json.dumps(report).lower()
