"""XEN-BATCH-ISSUED and XEN-SWITCH-SAVE on hand-built Xen PV traces (``lazy_mode``/``mc_pending`` known),
the restore-owner rule they share with LAZY-NO-SWITCH, and traces without the columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.check import FAIL, NOT_EXERCISED, PASS, check_trace
from analysis.lazystate import LazyState
from analysis.load import Trace, load_trace
from analysis.synth import events_frame
from tracer import schema

BATCH, SAVE = "XEN-BATCH-ISSUED", "XEN-SWITCH-SAVE"
E, L, SP, SW, KL = "lazy_enter", "lazy_leave", "set_pte", "switch", "kmap_local"
NONE, MMU, CPU = schema.LAZY_NONE, schema.LAZY_MMU, schema.LAZY_CPU
IRQ = 0x10001  # hardirq + preempt_count 1
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fork-exec-6.1-plugin"


def x(event, site, mode, mc, **kw):
    """An event as the Xen plugin records it: lazy_mode and mc_pending read before the instruction."""
    return {"event": event, "site": site, "lazy_mode": mode, "mc_pending": mc, "lazy_mmu": mode == MMU, **kw}


def results(events, ids=(BATCH, SAVE), *, windowed=False):
    trace = Trace.from_frame(events_frame(events), windowed=windowed)
    rep = check_trace(trace, invariants=list(ids))
    return {i: rep.result(i) for i in ids}


def result(events, inv, **kw):
    return results(events, (inv,), **kw)[inv]


def seqs(res):
    return sorted(int(s) for s in res.violations["seq"])


def region(cpu=0, pid=100, site="zap_pte_range", n=3):
    """enter (not lazy yet), n batched xen_set_pte with the batch growing, leave (before its flush)."""
    kw = {"cpu": cpu, "pid": pid}
    return ([x(E, site, NONE, 0, **kw)]
            + [x(SP, "xen_set_pte", MMU, i, **kw) for i in range(n)]
            + [x(L, site, MMU, n, **kw)])


def outside(cpu=0, pid=100, mc=0):
    return x(SP, "xen_set_pte", NONE, mc, cpu=cpu, pid=pid, preempt_count=0)


# -- XEN-BATCH-ISSUED -------------------------------------------------------------------------------------

def test_batched_and_issued_region_passes():
    ev = region() + [outside()]
    res = result(ev, BATCH)
    assert res.status == PASS
    assert res.checked == 3 + 2  # three batched set_ptes with a next event + the two events in mode NONE


def test_update_issued_at_once_in_lazy_mode_fails_blaming_the_region():
    ev = region(site="copy_pte_range") + [outside()]
    ev[3]["mc_pending"] = 0  # after the 2nd set_pte nothing is pending: it went straight to the hypervisor
    res = result(ev, BATCH)
    assert res.status == FAIL and seqs(res) == [2]
    row = res.violations.iloc[0]
    assert row["title"] == ("lazytrace XEN-BATCH-ISSUED: PTE update in lazy MMU mode issued at once, not batched, "
                            "in copy_pte_range")
    assert (row["site"], row["event_site"], int(row["related_seq"])) == ("copy_pte_range", "xen_set_pte", 0)
    assert "seq 3" in row["detail"]


def test_ptep_modify_prot_commit_is_a_batching_site_and_native_set_pte_is_not():
    for site, bad in (("xen_ptep_modify_prot_commit", [1]), ("native_set_pte", [])):
        ev = [x(E, "change_pte_range", NONE, 0), x(SP, site, MMU, 0), x(L, "change_pte_range", MMU, 0)]
        res = result(ev, BATCH)
        assert seqs(res) == bad, site
        assert res.checked == 1 + len(bad)


def test_unbatched_update_outside_any_region_blames_its_own_site():
    ev = [x(SP, "xen_set_pte", MMU, 0), x(SP, "xen_set_pte", MMU, 0)]
    res = result(ev, BATCH)
    assert seqs(res) == [0] and list(res.violations["site"]) == ["xen_set_pte"]
    assert res.violations["related_seq"].isna().all()
    assert res.checked == 1  # the last set_pte has no next event: not tested


def test_batch_left_pending_outside_lazy_mode_fails():
    ev = region() + [outside(mc=2), x(E, "unmap_page_range", NONE, 1)]
    res = result(ev, BATCH)
    assert res.status == FAIL and seqs(res) == [5, 6]
    assert set(res.violations["title"]) == {
        "lazytrace XEN-BATCH-ISSUED: multicall batch not issued outside lazy mode at xen_set_pte",
        "lazytrace XEN-BATCH-ISSUED: multicall batch not issued outside lazy mode at unmap_page_range"}


def test_interrupt_context_is_exempt():
    # an interrupt inside the region: its own set_pte is issued at once (paravirt_get_lazy_mode() is NONE
    # there) and its events do not count as "the next event" of a batched update
    ev = [x(E, "zap_pte_range", NONE, 0), x(SP, "xen_set_pte", MMU, 0),
          x(KL, "copy_page_from_iter", MMU, 0, preempt_count=IRQ),
          x(SP, "xen_set_pte", MMU, 1, preempt_count=IRQ),
          x(SP, "xen_set_pte", MMU, 1), x(L, "zap_pte_range", MMU, 2)]
    res = result(ev, BATCH)
    assert res.status == PASS and res.checked == 1 + 2  # two batched set_ptes + the enter
    ev[2]["preempt_count"] = 1  # the same event in task context: the first update was not batched
    assert seqs(result(ev, BATCH)) == [1]


def test_pending_entries_are_legitimate_inside_a_context_switch():
    # the CPU is PARAVIRT_LAZY_CPU between paravirt_start_context_switch and xen_end_context_switch's flush
    ev = region() + [x(SW, "__switch_to", CPU, 2, irqs_on=False, next_pid=200), outside(pid=200)]
    assert result(ev, BATCH).status == PASS


def test_state_is_per_cpu():
    ev = [x(E, "zap_pte_range", NONE, 0, cpu=0), x(SP, "xen_set_pte", MMU, 0, cpu=0),
          outside(cpu=1), x(L, "zap_pte_range", MMU, 1, cpu=0)]
    assert result(ev, BATCH).status == PASS  # CPU 1's empty batch says nothing about CPU 0's update


# -- XEN-SWITCH-SAVE ----------------------------------------------------------------------------------------

def migration(restore_site="paravirt_end_context_switch", save_site="paravirt_start_context_switch"):
    """Task 100 is switched out of a lazy region on CPU 0 (saved) and resumes it on CPU 1 (restored)."""
    ev = [
        x(E, "zap_pte_range", NONE, 0, cpu=0, pid=100, seq=0),
        x(SP, "xen_set_pte", MMU, 0, cpu=0, pid=100, seq=1),
        x(L, save_site, MMU, 1, cpu=0, pid=100, seq=2),                                  # save: flush, TIF set
        x(SW, "__switch_to", CPU, 0, cpu=0, pid=100, next_pid=200, irqs_on=False, seq=3),
        outside(cpu=0, pid=200) | {"seq": 4},
        x(SW, "__switch_to", NONE, 0, cpu=1, pid=300, next_pid=100, irqs_on=False, seq=5),
        x(E, restore_site, NONE, 0, cpu=1, pid=300, irqs_on=False, seq=6),               # pid: the previous task
        x(SP, "xen_set_pte", MMU, 0, cpu=1, pid=100, seq=7),
        x(L, "zap_pte_range", MMU, 1, cpu=1, pid=100, seq=8),
        outside(cpu=1, pid=100) | {"seq": 9},
    ]
    return ev


@pytest.mark.parametrize("names", [("paravirt_end_context_switch", "paravirt_start_context_switch"),
                                   ("xen_end_context_switch", "xen_start_context_switch")])
def test_save_and_restore_across_cpus_passes(names):
    ev = migration(*names)
    res = results(ev, (SAVE, BATCH, "XEN-LAZY-STATE", "LAZY-NO-SWITCH", "LAZY-PAIRING", "LAZY-PREEMPT"))
    # Xen saved and restored the region correctly: every Xen rule passes ...
    assert {k: r.status for k, r in res.items() if k != "LAZY-NO-SWITCH"} == dict.fromkeys(set(res) - {"LAZY-NO-SWITCH"},
                                                                                          PASS)
    assert res[SAVE].checked == 2 + 1 + 1  # two switches, one save, one restore
    # ... but the task was switched out inside its lazy region, as a native guest would show it: the switch after
    # the save is LAZY-NO-SWITCH's, blamed on the region's own enter; the restored region is the task's, not
    # "left by another task" (the restore enter carries the previous task's pid)
    nosw = res["LAZY-NO-SWITCH"]
    assert nosw.status == FAIL and seqs(nosw) == [3]
    assert nosw.violations["site"].tolist() == ["zap_pte_range"] and nosw.violations["related_seq"].tolist() == [0]


def test_switch_while_mmu_lazy_fails():
    # no save: the region is still open and the CPU MMU-lazy at __switch_to
    ev = region(n=1)[:2] + [x(SW, "__switch_to", MMU, 1, next_pid=200, irqs_on=False)]
    res = result(ev, SAVE)
    assert res.status == FAIL and seqs(res) == [2]
    assert res.violations["title"].iloc[0] == "lazytrace XEN-SWITCH-SAVE: context switch while the CPU is MMU-lazy"


def test_saved_region_never_restored_fails():
    ev = [e for e in migration() if e["seq"] != 6]  # no restore after 100 is switched back in
    res = result(ev, SAVE)
    assert res.status == FAIL and seqs(res) == [2]
    row = res.violations.iloc[0]
    assert row["title"] == "lazytrace XEN-SWITCH-SAVE: lazy region saved at a context switch was never restored"
    assert int(row["related_seq"]) == 5 and "pid 100" in row["detail"]


def test_restore_must_come_before_the_next_switch_on_that_cpu():
    ev = migration()
    ev[6] = x(SW, "__switch_to", CPU, 0, cpu=1, pid=100, next_pid=300, irqs_on=False, seq=6)
    ev = ev[:7] + [outside(cpu=1, pid=300) | {"seq": 7}]
    res = result(ev, SAVE)
    assert seqs(res) == [2]


def test_save_not_tested_when_the_task_never_runs_again_or_the_trace_ends():
    never = migration()[:5]
    res = result(never, SAVE)
    assert res.status == PASS and res.checked == 1  # the switch only
    assert "1 saved task(s) never switched in again" in res.note
    cut = migration()[:6]  # the trace of CPU 1 ends at the switch back to 100
    res = result(cut, SAVE)
    assert res.status == PASS and res.checked == 2 and "trace of the CPU ends" in res.note


def test_restore_for_a_task_that_did_not_save_fails():
    ev = migration()
    ev[:3] = [outside(cpu=0, pid=100) | {"seq": i} for i in range(3)]  # 100 was not lazy: no save...
    res = result(ev, SAVE)  # ...but is restored on CPU 1
    assert res.status == FAIL and seqs(res) == [6]
    row = res.violations.iloc[0]
    assert row["title"] == "lazytrace XEN-SWITCH-SAVE: lazy state restored for a task that never saved it"
    assert int(row["related_seq"]) == 3 and "pid 100" in row["detail"]


def test_restore_not_tested_when_the_task_was_switched_out_before_the_trace():
    ev = migration()[5:]  # 100's save and switch-out are not in this (windowed) trace
    res = result(ev, SAVE, windowed=True)
    assert res.status == PASS and res.checked == 1  # the switch only
    assert "1 restore(s) not tested" in res.note


def test_saves_are_per_task():
    # 200, not 100, saved on CPU 0 before 100's switch-out: 100's restore is unexplained, and 200, switched
    # in right after, is not restored
    ev = migration()
    ev[2]["pid"] = 200
    res = result(ev, SAVE)
    assert seqs(res) == [2, 6]
    assert res.violations["title"].str.contains("never restored").tolist() == [True, False]


# -- the restore's task and LAZY-NO-SWITCH ---------------------------------------------------------------------

def test_restore_enter_belongs_to_the_switched_in_task():
    ev = migration()
    st = LazyState(events_frame(ev))
    pos = np.array([6, 9])  # sorted space: CPU 0 holds positions 0-4 (seq 0-4), CPU 1 positions 5-9
    pid, known = st.switched_in(pos)
    assert pid.tolist() == [100, 100] and known.all()
    r_pid, r_known = st.r_task
    assert r_pid.tolist() == [100, 100] and r_known.all()  # the restored region is 100's, not 300's
    first = LazyState(events_frame(ev[:1]))
    assert not first.switched_in(np.array([0]))[1].any()  # no switch before it on its CPU


def test_no_switch_accepts_a_xen_restored_region_as_the_tasks_own():
    ev = migration()
    res = result(ev, "LAZY-NO-SWITCH")
    # only the switch after the save (seq 3), not "left by another task" at the restored region's leave (seq 8)
    assert seqs(res) == [3] and res.checked == 2 + 2  # two switches, two closed regions
    # the same enter anywhere else is the previous task's: a region left by another task
    ev[6]["site"] = "zap_pte_range"
    res = result(ev, "LAZY-NO-SWITCH")
    assert seqs(res) == [3, 8] and res.violations["detail"].iloc[1] == "entered by pid 300"


# -- traces without the columns ---------------------------------------------------------------------------------

def test_null_columns_are_not_exercised():
    ev = migration()
    for e in ev:
        e.update(lazy_mode=None, mc_pending=None, lazy_mmu=None)
    res = results(ev)
    assert all(r.status == NOT_EXERCISED and r.checked == 0 for r in res.values())
    assert "Xen PV" in res[BATCH].reason and "Xen PV" in res[SAVE].reason
    # the lazy mode alone does not say what is pending in the batch
    for e in ev:
        e["lazy_mode"] = NONE
    assert results(ev)[BATCH].status == NOT_EXERCISED


def test_trace_without_the_columns_is_not_exercised():
    rep = check_trace(load_trace(FIXTURE), invariants=[BATCH, SAVE])
    assert [(r.status, r.checked) for r in rep.results] == [(NOT_EXERCISED, 0)] * 2


# -- Perfetto export ---------------------------------------------------------------------------------------------

def test_perfetto_has_xen_counters_only_when_the_trace_knows_the_state():
    from analysis.invariants import empty_violations
    from analysis.perfetto import perfetto_events
    from analysis.regions import df_lazy_regions

    df = events_frame(region(n=3) + [outside()])
    doc = perfetto_events(df, df_lazy_regions(df), empty_violations())
    series = {}
    for e in doc["traceEvents"]:
        if e["ph"] == "C":
            series.setdefault(e["name"], []).append(e["args"]["value"])
    # one sample per change on the CPU: the batch filling inside the region and empty again after the leave
    assert series["xen mc_pending cpu 0"] == [0, 1, 2, 3, 0]
    assert series["xen lazy_mode cpu 0"] == [NONE, MMU, NONE]
    native = load_trace(FIXTURE).df
    names = {e["name"] for e in perfetto_events(native, df_lazy_regions(native, windowed=True),
                                                empty_violations())["traceEvents"] if e["ph"] == "C"}
    assert names and not any(n.startswith("xen ") for n in names)


# -- a real Xen trace -------------------------------------------------------------------------------------------

XEN_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "xen-lazy-migrate-6.1-plugin"


def test_real_xen_migration_trace():
    """violate-lazy-migrate recorded by the plugin on Xen (6.1 dom0, --cpus 1,0): insmod (pid 106) is moved
    from CPU 1 to CPU 0 inside apply_to_page_range(&init_mm)'s lazy region; Xen saves and restores it."""
    trace = load_trace(XEN_FIXTURE)
    rep = check_trace(trace)
    status = {r.id: r.status for r in rep.results}
    assert status["XEN-LAZY-STATE"] == status[BATCH] == status[SAVE] == PASS
    assert all(rep.result(i).checked > 0 for i in ("XEN-LAZY-STATE", BATCH, SAVE))
    assert status["LAZY-PAIRING"] == PASS  # Xen's own leave/enter keep the regions paired across CPUs
    nosw = rep.result("LAZY-NO-SWITCH").violations
    assert nosw[["seq", "cpu", "pid", "site"]].values.tolist() == [[8060, 1, 106, "__apply_to_page_range"]]
    st = LazyState(trace.df, windowed=True)
    df = trace.df.set_index("seq")
    restore = int(df.index[(df["site"] == "paravirt_end_context_switch")].item())
    assert (df.loc[restore, "pid"], df.loc[restore, "cpu"]) == (0, 0)  # recorded as the previous task, swapper/0
    pids, known = st.r_task
    real = np.flatnonzero(st.r_enter >= 0)
    enter_seq = st.column("seq")[st.rows(st.r_enter[real])]
    reg = real[enter_seq == restore]
    assert len(reg) == 1 and known[reg[0]] and pids[reg[0]] == 106  # the restored region is insmod's


def test_irq_in_lazy_says_what_the_interrupt_overtakes_under_xen():
    # two updates queued in the region, then a hard-irq xen_set_pte: a hypercall issued ahead of them
    ev = (region(n=2)[:-1]
          + [x(SP, "xen_set_pte", MMU, 1, preempt_count=IRQ, irqs_on=False), x(L, "zap_pte_range", MMU, 1)])
    res = result(ev, "IRQ-IN-LAZY")
    assert res.status == FAIL and seqs(res) == [3]
    assert res.violations["detail"].iloc[0] == ("interrupted lazy region entered in zap_pte_range; Xen: issued "
                                                "at once, ahead of 1 multicall entries the region still has queued")
