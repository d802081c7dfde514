"""Real guests: boot the default kernel under TCG, run workloads, detect panics and hangs.

Each test drives the real ``lazytrace`` CLI against a real QEMU and kernel, and checks the exit status,
the one-line error, the logs left in the run directory, and that no QEMU process is left running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import TEST_WORKLOADS

pytestmark = pytest.mark.vm


def lazytrace(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def qemu_running_for(run_dir: Path) -> bool:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return str(run_dir) in out or f"lazytrace-{run_dir.name}," in out


def test_boot_default_fork_exec(run_dir: Path):
    r = lazytrace("boot", "--out", str(run_dir))
    assert r.returncode == 0, r.stderr
    console = (run_dir / "console.log").read_text(errors="replace")
    assert "@@LAZYTRACE:START@@ workload=fork-exec" in console
    assert "@@LAZYTRACE:END@@ status=0" in console
    assert "reboot: Power down" in console
    m = json.loads((run_dir / "run.json").read_text())
    assert m["status"] == "complete" and m["exit_status"] == 0 and m["qemu_exit_code"] == 0
    assert m["qemu"]["version"].startswith("QEMU emulator version")
    assert m["kernel"]["build_id"] and m["kernel"]["packages"]["image"]["version"]
    assert "boot:" in r.stderr and "clean poweroff" in r.stderr
    assert not qemu_running_for(run_dir)


def test_panic_is_a_guest_fault(run_dir: Path):
    r = lazytrace("boot", "--workload", str(TEST_WORKLOADS / "panic"), "--out", str(run_dir))
    assert r.returncode == 3, r.stderr
    assert "lazytrace: error: guest panic: Kernel panic - not syncing" in r.stderr
    assert "sysrq" in r.stderr.lower()  # the console tail is shown
    m = json.loads((run_dir / "run.json").read_text())
    assert m["status"] == "failed" and m["exit_status"] == 3 and m["partial_reason"] == "GuestPanicError"
    assert "Kernel panic" in (run_dir / "console.log").read_text(errors="replace")
    assert not qemu_running_for(run_dir)


def test_hang_is_detected_by_timeout(run_dir: Path):
    r = lazytrace("boot", "--workload", str(TEST_WORKLOADS / "hang"), "--timeout", "5", "--out", str(run_dir))
    assert r.returncode == 3, r.stderr
    assert "lazytrace: error: guest hung: no workload end within 5 s" in r.stderr
    assert "hanging" in (run_dir / "console.log").read_text(errors="replace")
    m = json.loads((run_dir / "run.json").read_text())
    assert m["partial_reason"] == "GuestHangError"
    assert not qemu_running_for(run_dir)


def test_failing_workload_status_is_reported(run_dir: Path):
    r = lazytrace("boot", "--workload", str(TEST_WORKLOADS / "fail"), "--out", str(run_dir))
    assert r.returncode == 3
    assert "exited with status 7" in r.stderr
    assert json.loads((run_dir / "run.json").read_text())["workload_status"] == 7


def test_two_guests_at_once_do_not_clash(tmp_path: Path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    results: list = [None, None]

    def go(i: int) -> None:
        results[i] = lazytrace("boot", "--workload", "idle", "--out", str(dirs[i]))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, d in zip(results, dirs, strict=True):
        assert r.returncode == 0, r.stderr
        assert "@@LAZYTRACE:END@@ status=0" in (d / "console.log").read_text(errors="replace")


@pytest.mark.parametrize("args, message", [
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--kernel", "linux-99"], "unknown kernel 'linux-99'"),
    (["--workload", "nope"], "unknown workload 'nope'"),
    (["--cpus", "0,5"], "bad cpus: got '0,5', profile tcg-smp2 has CPUs 0-1"),
])
def test_bad_input_is_one_specific_error(args, message):
    r = lazytrace("boot", *args)
    assert r.returncode == 2
    assert f"lazytrace: error: {message}" in r.stderr
