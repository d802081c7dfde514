"""Cross-check the two recorders: the same workload recorded by the gdb stub and by the TCG plugin.

Both runs go through the real ``lazytrace record`` CLI (``--backend gdb`` / ``--backend plugin``) on the
default kernel with the same workload, iterations and CPUs. What must agree whatever the observer does to the
guest: the number of PTE writes per ``native_set_pte`` site (the workload maps and unmaps the same pages),
the shape of the set_pte arguments, balanced lazy regions per CPU, and the preempt_count values seen at each
lazy-enter site. What is allowed to differ, and is measured and printed: the number of lazy regions, which
the gdb path inflates because its ~500x slowdown lets timer ticks set need_resched and split zap loops
(DESIGN.md, "Plugin vs gdb on the same workload").

The gdb run is the slow part (a few hundred events/s): the workload is kept small.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tracer import schema

pytestmark = pytest.mark.vm

WORKLOAD = ("--workload", "fork-exec", "--iterations", "1", "--cpus", "all")
GDB_TIMEOUT_S = 1200.0
PLUGIN_TIMEOUT_S = 300.0
#: Per-site set_pte counts must agree within this fraction (sites with at least MIN_SITE_EVENTS events).
COUNT_TOLERANCE = 0.02
MIN_SITE_EVENTS = 100
KERNEL_HALF = 0xFFFF_8000_0000_0000
#: pteval bits that say what kind of mapping a PTE is (present, rw, user, accessed, dirty, global, NX...)
PTE_FLAG_BITS = 0x8000_0000_0000_0FFF


def record(out: Path, backend: str, timeout: float) -> tuple[dict, pd.DataFrame]:
    proc = subprocess.run([sys.executable, "-m", "tracer.cli", "record", "--backend", backend, *WORKLOAD,
                           "--out", str(out)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{backend}: {proc.stderr[-3000:]}"
    manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
    assert manifest["backend"] == backend and manifest["status"] == "complete", manifest.get("partial_reason")
    return manifest, pd.read_parquet(out / schema.TRACE_FILE)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    base = tmp_path_factory.mktemp("crosscheck")
    plugin = record(base / "plugin", "plugin", PLUGIN_TIMEOUT_S)
    gdb = record(base / "gdb", "gdb", GDB_TIMEOUT_S)
    return {"plugin": plugin, "gdb": gdb}


def set_pte_per_site(df: pd.DataFrame) -> pd.Series:
    return df[df.event == "set_pte"].groupby("site", observed=True).size()


def test_set_pte_counts_per_site_agree(traces):
    p = set_pte_per_site(traces["plugin"][1])
    g = set_pte_per_site(traces["gdb"][1])
    table = pd.DataFrame({"plugin": p, "gdb": g}).fillna(0).astype(int)
    table["rel_diff"] = (table.plugin - table.gdb).abs() / table[["plugin", "gdb"]].max(axis=1)
    print("\nset_pte per site:\n" + table.to_string())
    big = table[table[["plugin", "gdb"]].max(axis=1) >= MIN_SITE_EVENTS]
    assert len(big) >= 2, table  # the out-of-line native_set_pte and the inlined zap
    assert (big.rel_diff <= COUNT_TOLERANCE).all(), table
    assert "native_set_pte" in big.index  # the out-of-line function: zero lost against gdb's count


def test_set_pte_arguments_agree(traces):
    for backend, (_, df) in traces.items():
        sp = df[df.event == "set_pte"]
        assert sp.ptep.notna().all() and sp.pteval.notna().all(), backend
        ptep = sp.ptep.astype("uint64")
        assert (ptep >= KERNEL_HALF).all() and (ptep % 8 == 0).all(), backend
        assert (sp[sp.site == "unmap_page_range"].pteval == 0).all(), backend
    # the kinds of PTEs written at the out-of-line function: same flag patterns, in similar shares
    shares = {}
    for backend, (_, df) in traces.items():
        ool = df[(df.event == "set_pte") & (df.site == "native_set_pte")]
        flags = (ool.pteval.astype("uint64") & PTE_FLAG_BITS).value_counts(normalize=True)
        shares[backend] = flags
    table = pd.DataFrame(shares).fillna(0.0)
    print("\npteval flag patterns at native_set_pte (share):\n" + table.map(lambda x: f"{x:.3f}").to_string())
    common = table[(table.plugin >= 0.01) | (table.gdb >= 0.01)]
    assert ((common.plugin > 0) & (common.gdb > 0)).all(), table
    assert ((common.plugin - common.gdb).abs() <= 0.05).all(), table


def test_enter_equals_leave_per_cpu_in_both(traces):
    for backend, (_, df) in traces.items():
        lazy = df[df.event.isin(["lazy_enter", "lazy_leave"])]
        counts = lazy.groupby(["cpu", "event"], observed=True).size().unstack(fill_value=0)
        assert (counts["lazy_enter"] == counts["lazy_leave"]).all(), f"{backend}:\n{counts}"


def test_preempt_count_sets_at_lazy_enter_sites(traces):
    sets = {}
    for backend, (_, df) in traces.items():
        le = df[df.event == "lazy_enter"]
        sets[backend] = le.groupby("site", observed=True).preempt_count.agg(lambda s: frozenset(s.tolist()))
    both = sets["plugin"].index.intersection(sets["gdb"].index)
    assert len(both) >= 2
    for site in both:
        assert sets["plugin"][site] == sets["gdb"][site], (site, sets["plugin"][site], sets["gdb"][site])


def test_gdb_observer_effect_is_measured(traces):
    """Not an agreement: the numbers the report quotes for the gdb path's lazy-region inflation."""
    rows = {}
    for backend, (m, df) in traces.items():
        le = df[df.event == "lazy_enter"]
        rows[backend] = {
            "lazy_regions": len(le),
            "regions_unmap_page_range": int((le.site == "unmap_page_range").sum()),
            "need_resched_events": int(df.need_resched.sum()),
            "set_pte": int((df.event == "set_pte").sum()),
            "window_s": m.get("window_s"),
        }
    table = pd.DataFrame(rows)
    inflation = rows["gdb"]["lazy_regions"] / rows["plugin"]["lazy_regions"]
    slow = rows["gdb"]["window_s"] / rows["plugin"]["window_s"]
    print(f"\ngdb observer effect: lazy regions x{inflation:.2f}, window x{slow:.0f}\n{table.to_string()}")
    assert rows["plugin"]["lazy_regions"] > 0 and rows["gdb"]["lazy_regions"] > 0
    # Stopping the machine never merges regions; it splits more of them the slower the run goes (measured
    # here: x1.03 with a 41 s gdb window, x6.5 with a 534 s one on a loaded host). Allow the few regions by
    # which two runs of the same workload differ anyway.
    assert inflation >= 0.95
    assert slow > 10  # the stop-based path is orders of magnitude slower


# -- both recorders on one run: the plugin and the gdb stub watching the same guest ------------------------

#: Fields both recorders read from the same guest state at the same instruction (comm: see below).
SAME_STATE_FIELDS = ["seq", "event", "site", "pc", "ptep", "pteval", "preempt_count", "need_resched", "irqs_on",
                     "pid", "next_pid", "mm_is_init", "cpu"]
#: The gdb collector caches comm per task pointer (invalidated at switches and at a __set_task_comm hook); the
#: plugin reads it at every event. Measured on this test: 4 of 37,243 rows differ, all at a __switch_to right
#: after a vfork child's exec renamed it (gdb: "sh", plugin: "taskset") or a kworker renamed itself
#: "kworker/dying": gdb's value is the stale one (the task's next events show the new name in both traces).
MAX_STALE_COMM_SHARE = 0.001


def test_same_run_event_by_event(tmp_path):
    """One guest, both recorders attached: every event recorded once by each, with identical values.

    The gdb collector single-steps over each probe (``emulate=False``): with emulation the instruction at the
    probe would never execute in TCG and the plugin's callback, which fires when it does, would never run.
    Single-threaded TCG as the gdb backend always uses (DESIGN.md, "gdb path caveat").
    """
    from dataclasses import replace

    from tracer import rawtrace, runspec, symbols
    from tracer.gdb_recorder import GdbRecorder
    from tracer.gdb_session import GdbSession
    from tracer.plugin_recorder import PluginRecorder
    from tracer.qemu import Guest

    res = runspec.resolve(runspec.RunSpec(workload="fork-exec", iterations=1), gdb=True, paused=True,
                          single_thread_tcg=True)
    syms = symbols.resolve(res.guest.kernel.vmlinux)
    gdir, pdir = tmp_path / "gdb", tmp_path / "plugin"
    prec = PluginRecorder(syms, pdir, arm="marker")
    cfg = replace(res.guest, extra_args=tuple(res.guest.extra_args) + tuple(prec.qemu_args()))
    with Guest(gdir, cfg) as guest:
        with GdbSession(cfg.kernel.vmlinux, guest.gdb_socket, gdir / schema.GDB_LOG) as gdb:
            grec = GdbRecorder(gdb, syms, gdir, arm="marker", emulate=False)
            grec.start()
            try:
                status = guest.run_workload(workload_timeout=GDB_TIMEOUT_S, poll=grec.poll)
            finally:
                gstats = grec.stop()
        guest.wait_poweroff()
    pstats = prec.finish()
    assert status == 0
    rawtrace.convert_dir(gdir)
    rawtrace.convert_dir(pdir)
    g = pd.read_parquet(gdir / schema.TRACE_FILE)
    p = pd.read_parquet(pdir / schema.TRACE_FILE)
    print(f"\nsame run: gdb {len(g)} events, plugin {len(p)} events; gdb stats {gstats}; "
          f"plugin lost {pstats['events_lost']}")
    assert pstats["complete"] and pstats["events_lost"] == 0
    assert len(p) == len(g) > 100
    pd.testing.assert_frame_equal(g[SAME_STATE_FIELDS], p[SAME_STATE_FIELDS], check_dtype=True)
    differ = g.comm != p.comm
    print(f"comm differs on {int(differ.sum())} rows:\n"
          + pd.DataFrame({"seq": g.seq, "event": g.event, "pid": g.pid, "gdb": g.comm, "plugin": p.comm})[differ]
          .to_string())
    assert differ.mean() <= MAX_STALE_COMM_SHARE
    # Which side is stale around a rename is not settled: one run had gdb behind (gdb "sh", plugin "taskset"
    # after a vfork child's exec), another had gdb showing "sh" while the plugin still read "taskset" for the
    # same pid. The pid agrees on every row (checked above with the other state fields).
