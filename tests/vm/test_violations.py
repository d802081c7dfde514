"""lazytrace catches real violations on real guests, names the site, CPU and task, and is quiet otherwise.

Each ``violate-*`` workload loads ``guest-kernels/modules/lazyviolate`` (built by the run against Debian's
headers for the run's kernel) with one scenario, which breaks the lazy MMU rules through exported kernel
paths (``apply_to_page_range``/``apply_to_existing_page_range`` on ``init_mm``: the lazy enter and leave are
the vmlinux sites in ``__apply_to_page_range`` that lazytrace probes). Every test drives the real
``lazytrace run`` CLI and checks its exit status and ``report.json``:

* the set of invariants that FAIL is exactly the scenario's, every other one is PASS or NOT-EXERCISED;
* each violation blames the expected site, on the CPU the workload pinned the module's task to
  (``--cpus 1``, not the default CPU 0, so a CPU read wrongly cannot pass), by the task that loaded the
  module: its pid is cross-checked with the module's own account on the console
  (``lazyviolate: scenario=... done: ... pid=N``).

The clean workloads (``fork-exec``, ``mm-syscalls``) must give no FAIL beyond the upstream-known ones
(``analysis/expect/upstream-known.toml``). The PREEMPT_RT kernel run is opt-in (LAZYTRACE_RT_TESTS=1):
its -dbg package is ~860 MB.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from analysis.expectations import UPSTREAM_KNOWN
from analysis.sites import USER_LAZY_SITES
from tracer import kernels, schema
from tracer.errors import KernelError

pytestmark = pytest.mark.vm

#: One traced run: boot (~3-15 s on a loaded 2-core host), insmod, rmmod, poweroff. The plugin records a
#: violate-* window (~10k events) in seconds; gdb stops at each event (70-250 events/s), so its window of
#: ~10-25k events takes 1-6 minutes. A ceiling, not an expectation.
RUN_TIMEOUT_S = 1800.0
#: Where apply_to_pte_range() (inlined) enters and leaves lazy mode on 6.1 and 6.12.
APPLY_SITE = "__apply_to_page_range"
#: The out-of-line pv-ops target a module's set_pte_at() calls: the nearest vmlinux function to a
#: module's PTE write (the module's own function is not a vmlinux site).
SET_PTE_TARGET = "native_set_pte"
OK_STATUSES = {"PASS", "NOT-EXERCISED"}
KERNEL_612 = "debian-6.12-cloud"
BACKENDS = ("plugin", "gdb")


def lazytrace(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def need_kernel(name: str) -> None:
    """The kernel must be fetched; skip (or fail under LAZYTRACE_VM_TESTS=1) saying how to fetch it."""
    try:
        kernels.get_kernel(name, fetch_missing=False)
    except KernelError as exc:
        msg = f"kernel {name} not available (run `lazytrace kernels fetch {name}`): {exc.message}"
        if os.environ.get("LAZYTRACE_VM_TESTS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@dataclass
class Run:
    """One ``lazytrace run`` and what it left behind."""

    proc: subprocess.CompletedProcess
    out: Path
    report: dict
    console: str
    results: dict = field(init=False)

    def __post_init__(self) -> None:
        self.results = {r["id"]: r for r in self.report["invariants"]}

    def failed(self) -> set[str]:
        return {i for i, r in self.results.items() if r["status"] == "FAIL"}

    def violations(self, invariant_id: str) -> list[dict]:
        r = self.results[invariant_id]
        assert not r["violations_truncated"], f"{invariant_id}: more violations than report.json lists"
        return r["violations"]

    def module_account(self, scenario: str) -> dict[str, str]:
        """The module's ``scenario=... done: k=v ...`` line from the console, as a dict."""
        m = re.search(rf"lazyviolate: scenario={re.escape(scenario)} done: (.*)", self.console)
        assert m, f"no 'lazyviolate: scenario={scenario} done' line on the console:\n{self.console[-3000:]}"
        return dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)

    def context(self) -> str:
        return f"\nstderr:\n{self.proc.stderr[-4000:]}\nrun dir: {self.out}"


def run(out: Path, workload: str, *, backend: str, kernel: str, cpus: str | None = None,
        expect: Path | None = None, iterations: int | None = None) -> Run:
    args = ["run", "--backend", backend, "--kernel", kernel, "--workload", workload, "--out", str(out)]
    if cpus:
        args += ["--cpus", cpus]
    if iterations:
        args += ["--iterations", str(iterations)]
    if expect:
        args += ["--expect", str(expect)]
    proc = lazytrace(*args)
    report_path = out / "report.json"
    assert report_path.exists(), f"no report.json (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    console = (out / "console.log").read_text(errors="replace")
    return Run(proc, out, json.loads(report_path.read_text()), console)


def assert_exactly(r: Run, fails: set[str]) -> None:
    """The invariants in ``fails`` FAIL, every other one is PASS or NOT-EXERCISED, and the run says FAIL."""
    statuses = {i: res["status"] for i, res in r.results.items()}
    assert r.failed() == fails, f"FAIL set {sorted(r.failed())}, want {sorted(fails)}: {statuses}{r.context()}"
    assert set(statuses.values()) <= OK_STATUSES | {"FAIL"}, statuses
    assert r.proc.returncode == 1, f"exit {r.proc.returncode}, want 1 (an invariant FAILed){r.context()}"
    assert "@@LAZYTRACE:END@@ status=0" in r.console, "the guest did not survive the scenario"
    assert r.report["status"] == "complete" and not r.report["partial"], r.report["partial_reasons"]


def assert_blames(v: dict, *, site: str, cpu: int, pid: int, comm: str = "insmod") -> None:
    got = (v["site"], v["cpu"], v["pid"], v["comm"])
    assert got == (site, cpu, pid, comm), f"violation blames {got}, want {(site, cpu, pid, comm)}: {v}"


def combos():
    """(kernel, backend) pairs: both recorders on the default kernel, the plugin on 6.12 too. The gdb runs
    stop the guest at every event (a window of ~10-25k events: 1-6 min on a 2-core host), hence ``slow``."""
    return [
        pytest.param(kernels.DEFAULT_KERNEL, "plugin", id="default-plugin"),
        pytest.param(kernels.DEFAULT_KERNEL, "gdb", id="default-gdb", marks=pytest.mark.slow),
        pytest.param(KERNEL_612, "plugin", id="6.12-plugin"),
    ]


# --- the scenarios -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, backend", combos())
def test_apply_kernel(tmp_path: Path, kernel: str, backend: str):
    """apply_to_page_range(&init_mm) from process context: LAZY-PREEMPT and LAZY-SETPTE-ATOMIC, both
    upstream-known (691ee97e1a9d): with --expect they are reported but accepted (exit 0)."""
    need_kernel(kernel)
    r = run(tmp_path / "run", "violate-apply-kernel", backend=backend, kernel=kernel, cpus="1")
    assert_exactly(r, {"LAZY-PREEMPT", "LAZY-SETPTE-ATOMIC"})
    acct = r.module_account("apply-kernel")
    pid, ptes = int(acct["pid"]), int(acct["ptes"])
    assert acct["cpu"] == "1" and acct["preempt_count"] == "0x0"
    enters = r.violations("LAZY-PREEMPT")
    assert 1 <= len(enters) <= 2  # one per PTE table the 4-page area spans
    for v in enters:
        assert_blames(v, site=APPLY_SITE, cpu=1, pid=pid)
        assert v["preempt_count"] == 0 and v["irqs_on"]
    # Every PTE the callback rewrote is one violation, blamed on the function that entered the region.
    sets = r.violations("LAZY-SETPTE-ATOMIC")
    assert len(sets) == ptes == 4
    for v in sets:
        assert_blames(v, site=APPLY_SITE, cpu=1, pid=pid)
        assert v["event"] == "set_pte" and v["event_site"] == SET_PTE_TARGET
    # The kernel-mapping updates were flushed by the leave before any switch.
    assert r.results["KERNEL-UPDATE-FLUSHED"]["status"] == "PASS"
    assert r.results["KERNEL-UPDATE-FLUSHED"]["checked"] >= ptes

    # The same trace checked against the upstream-known list: reported, accepted, exit 0.
    chk = lazytrace("check", "--expect", str(UPSTREAM_KNOWN), str(r.out), timeout=120)
    assert chk.returncode == 0, chk.stderr
    rep = json.loads((r.out / "report.json").read_text())
    for res in rep["invariants"]:
        if res["id"] in ("LAZY-PREEMPT", "LAZY-SETPTE-ATOMIC"):
            assert res["expected"] and res["unexpected"] == 0
            assert all(v["expected"] and "691ee97e1a9d" in v["expect_reason"] for v in res["violations"])


@pytest.mark.parametrize("kernel, backend", combos())
def test_lazy_preempt(tmp_path: Path, kernel: str, backend: str):
    """The callback sleeps inside the lazy region: preemptible enter and a context switch while lazy."""
    need_kernel(kernel)
    r = run(tmp_path / "run", "violate-lazy-preempt", backend=backend, kernel=kernel, cpus="1")
    assert_exactly(r, {"LAZY-PREEMPT", "LAZY-NO-SWITCH"})
    acct = r.module_account("lazy-preempt")
    pid = int(acct["pid"])
    assert acct["cpu"] == "1->1"
    (enter,) = r.violations("LAZY-PREEMPT")
    assert_blames(enter, site=APPLY_SITE, cpu=1, pid=pid)
    switches = r.violations("LAZY-NO-SWITCH")
    # Out of the region (insmod -> idle or another task) and back in; the first is the sleeper's own.
    assert len(switches) >= 2
    assert_blames(switches[0], site=APPLY_SITE, cpu=1, pid=pid)
    for v in switches:
        assert v["site"] == APPLY_SITE and v["cpu"] == 1 and v["event"] == "switch"
        assert v["related_seq"] == enter["seq"]  # the region's enter


@pytest.mark.parametrize("kernel, backend", combos())
def test_lazy_migrate(tmp_path: Path, kernel: str, backend: str):
    """The task moves to another CPU inside its lazy region: entered on CPU 1, left on CPU 0."""
    need_kernel(kernel)
    r = run(tmp_path / "run", "violate-lazy-migrate", backend=backend, kernel=kernel, cpus="1,0")
    assert_exactly(r, {"LAZY-PREEMPT", "LAZY-NO-SWITCH", "LAZY-PAIRING"})
    acct = r.module_account("lazy-migrate")
    pid = int(acct["pid"])
    assert acct["cpu"] == "1->0" and acct["target"] == "0"
    (enter,) = r.violations("LAZY-PREEMPT")
    assert_blames(enter, site=APPLY_SITE, cpu=1, pid=pid)
    switches = r.violations("LAZY-NO-SWITCH")
    assert_blames(switches[0], site=APPLY_SITE, cpu=1, pid=pid)  # the switch to the migration thread
    assert all(v["cpu"] == 1 and v["event"] == "switch" for v in switches)
    (leave,) = r.violations("LAZY-PAIRING")
    assert_blames(leave, site=APPLY_SITE, cpu=0, pid=pid)
    assert leave["event"] == "lazy_leave" and "without lazy_enter" in leave["title"]
    assert leave["seq"] > enter["seq"]


@pytest.mark.parametrize("kernel, backend", combos())
def test_unpaired(tmp_path: Path, kernel: str, backend: str):
    """apply_to_existing_page_range() nested in its own callback: a nested enter, then a leave without an
    enter; preemption is disabled throughout, so nothing else FAILs, and the guest survives."""
    need_kernel(kernel)
    r = run(tmp_path / "run", "violate-unpaired", backend=backend, kernel=kernel, cpus="1")
    assert_exactly(r, {"LAZY-PAIRING"})
    acct = r.module_account("unpaired")
    pid = int(acct["pid"])
    assert acct["outer_ptes"] == acct["inner_ptes"] == "1" and acct["preempt_count"] == "0x1"
    nested, orphan = r.violations("LAZY-PAIRING")
    for v in (nested, orphan):
        assert_blames(v, site=APPLY_SITE, cpu=1, pid=pid)
        assert v["preempt_count"] == 1
    assert nested["event"] == "lazy_enter" and "nested" in nested["title"]
    assert orphan["event"] == "lazy_leave" and "without lazy_enter" in orphan["title"]
    assert nested["related_seq"] < nested["seq"] < orphan["seq"]  # the outer enter came first


@pytest.mark.parametrize("kernel, backend", combos())
def test_irq_lazy(tmp_path: Path, kernel: str, backend: str):
    """A hard-irq hrtimer rewrites a kernel PTE while the interrupted task's CPU is lazy."""
    need_kernel(kernel)
    r = run(tmp_path / "run", "violate-irq-lazy", backend=backend, kernel=kernel, cpus="1")
    assert_exactly(r, {"IRQ-IN-LAZY"})
    acct = r.module_account("irq-lazy")
    pid = int(acct["pid"])
    assert acct["fired"] == "1" and acct["lazy_cpu"] == acct["timer_cpu"] == "1"
    (v,) = r.violations("IRQ-IN-LAZY")
    # The handler's PTE write reaches vmlinux through pv_ops.mmu.set_pte: native_set_pte is the site;
    # the region it landed in is the one the interrupted insmod entered in __apply_to_page_range.
    assert_blames(v, site=SET_PTE_TARGET, cpu=1, pid=pid)
    assert v["preempt_count"] & schema.HARDIRQ_MASK and v["preempt_count"] == int(acct["timer_preempt_count"], 16)
    assert APPLY_SITE in v["detail"]
    # The same PTE write inside the region is atomic (hardirq) and by the region's task: no other FAIL.
    assert r.results["LAZY-SETPTE-ATOMIC"]["status"] == "PASS"


# --- the clean workloads -----------------------------------------------------------------------------------

def clean_combos():
    """The plugin runs the workloads' default sizes (50-135k events); gdb runs a short fork-exec."""
    out = []
    for w in ("fork-exec", "mm-syscalls"):
        out.append(pytest.param(w, kernels.DEFAULT_KERNEL, "plugin", None, id=f"{w}-default-plugin"))
        out.append(pytest.param(w, KERNEL_612, "plugin", None, id=f"{w}-6.12-plugin"))
    out.append(pytest.param("fork-exec", kernels.DEFAULT_KERNEL, "gdb", 2, id="fork-exec-default-gdb",
                            marks=pytest.mark.slow))
    return out


@pytest.mark.parametrize("workload, kernel, backend, iterations", clean_combos())
def test_clean_workloads_fail_only_upstream_known(tmp_path: Path, workload: str, kernel: str, backend: str,
                                                  iterations: int | None):
    """User page-table paths hold the PTE lock: lazy regions are entered with preempt_count >= 1, pair up,
    and see no switch. Any FAIL must be covered by the upstream-known list."""
    need_kernel(kernel)
    r = run(tmp_path / "run", workload, backend=backend, kernel=kernel, expect=UPSTREAM_KNOWN,
            iterations=iterations)
    assert r.proc.returncode == 0, f"{workload} FAILed beyond the upstream-known list{r.context()}"
    assert "@@LAZYTRACE:END@@ status=0" in r.console
    for res in r.results.values():
        assert res["status"] in OK_STATUSES or (res["status"] == "FAIL" and res["unexpected"] == 0), res
    # The rules that user paths exercise were exercised.
    for inv in ("LAZY-PREEMPT", "LAZY-PAIRING", "LAZY-NO-SWITCH", "LAZY-SETPTE-ATOMIC"):
        assert r.results[inv]["checked"] > 0, f"{inv} was not exercised by {workload}"


# --- PREEMPT_RT --------------------------------------------------------------------------------------------

RT_KERNEL = "debian-6.1-rt"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LAZYTRACE_RT_TESTS") != "1",
                    reason="PREEMPT_RT run is opt-in (its -dbg package is ~860 MB): set LAZYTRACE_RT_TESTS=1 "
                           "after `lazytrace kernels fetch debian-6.1-rt`")
@pytest.mark.parametrize("backend", BACKENDS)
def test_rt_fork_exec_sees_sleeping_pte_locks(tmp_path: Path, backend: str):
    """On PREEMPT_RT the PTE lock is an rt_mutex-based sleeping lock (migrate_disable(), no preempt_count):
    the user page-table paths enter lazy mode preemptible, and lazytrace reports it at those sites."""
    need_kernel(RT_KERNEL)
    r = run(tmp_path / "run", "fork-exec", backend=backend, kernel=RT_KERNEL,
            iterations=2 if backend == "gdb" else None)
    assert "@@LAZYTRACE:END@@ status=0" in r.console
    assert "PREEMPT_RT" in (r.report["kernel"] or {}).get("banner", "")
    assert {"LAZY-PREEMPT", "LAZY-SETPTE-ATOMIC"} <= r.failed() and r.proc.returncode == 1
    # fork-exec has only user page-table paths, and on RT none of them raises preempt_count: every lazy
    # enter FAILs (report.json lists the first 1000 violations: those are checked one by one).
    pre = r.results["LAZY-PREEMPT"]
    assert pre["violation_count"] == pre["checked"] > 0
    assert all(v["site"] in USER_LAZY_SITES and v["preempt_count"] == 0 and v["irqs_on"]
               for v in pre["violations"])
    # rt_spin_lock() disables migration, not preemption: a preempted task resumes its region on the same
    # CPU, but another task may enter and leave lazy mode there in between (one per-CPU lazy state, no
    # Xen context-switch hook on a native guest). So a LAZY-PAIRING FAIL is possible on RT, and then only
    # in that shape: a nested enter by another task than the open region's, and the preempted task's
    # leave left without a region.
    if "LAZY-PAIRING" in r.failed():
        df = pd.read_parquet(r.out / schema.TRACE_FILE, columns=["seq", "pid", "cpu", "event"]).set_index("seq")
        for v in r.violations("LAZY-PAIRING"):
            if v["event"] == "lazy_enter":
                if v["related_seq"] is not None:  # None: the region was already open when the window began
                    assert df.loc[v["related_seq"], "pid"] != v["pid"], f"same-task nested enter on RT: {v}"
            else:  # the task's own last enter/leave on this CPU was an enter: its region was closed for it
                own = df[(df.index < v["seq"]) & (df["cpu"] == v["cpu"]) & (df["pid"] == v["pid"])
                         & df["event"].isin(["lazy_enter", "lazy_leave"])]
                assert len(own) and own["event"].iloc[-1] == "lazy_enter", f"leave without own enter: {v}"
