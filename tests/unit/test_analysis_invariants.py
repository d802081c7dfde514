"""Each invariant on small hand-built traces: at least one passing and one failing case per rule."""

from __future__ import annotations

import pytest

from analysis.check import FAIL, NOT_EXERCISED, PASS, check_trace
from analysis.invariants import all_invariants
from analysis.load import Trace
from analysis.synth import events_frame

E, L, F, SP, SW = "lazy_enter", "lazy_leave", "lazy_flush", "set_pte", "switch"


def check(events, *, windowed=False, partial=False, only=None):
    trace = Trace.from_frame(events_frame(events), windowed=windowed,
                             partial_reasons=("test: cut short",) if partial else ())
    return check_trace(trace, invariants=[only] if only else None)


def result(events, inv, **kw):
    return check(events, only=inv, **kw).result(inv)


def seqs(res):
    return sorted(int(s) for s in res.violations["seq"])


def user_region(pid=100, cpu=0, n=3, pc=1, site="zap_pte_range"):
    return ([{"event": E, "site": site, "pid": pid, "cpu": cpu, "preempt_count": pc}]
            + [{"event": SP, "site": site, "pid": pid, "cpu": cpu, "preempt_count": pc} for _ in range(n)]
            + [{"event": L, "site": site, "pid": pid, "cpu": cpu, "preempt_count": pc}])


def test_catalogue_is_complete_and_described():
    ids = [inv.id for inv in all_invariants()]
    assert ids == ["LAZY-PREEMPT", "LAZY-PAIRING", "LAZY-NO-SWITCH", "LAZY-SETPTE-ATOMIC", "KMAP-ATOMIC-PREEMPT",
                   "SYNC-IRQS-OFF", "KERNEL-UPDATE-FLUSHED", "IRQ-IN-LAZY", "XEN-LAZY-STATE", "XEN-BATCH-ISSUED",
                   "XEN-SWITCH-SAVE"]
    for inv in all_invariants():
        assert inv.title and inv.rule and inv.source and inv.tested and inv.idle_reason


def test_clean_trace_passes_everything_exercised():
    ev = user_region() + [{"event": SW}, {"event": "kmap_atomic", "site": "copy_user_highpage", "preempt_count": 0},
                          {"event": "sync_kernel_mappings", "site": "sync_global_pgds", "irqs_on": False}]
    ev += [{"event": E, "site": "__apply_to_page_range", "pid": 101, "mm_is_init": True},
           {"event": SP, "pid": 101}, {"event": F, "pid": 101}, {"event": L, "pid": 101}]
    ev += [{"event": E, "pid": 101}, {"event": SP, "pid": 101, "preempt_count": 0x10001,
                                      "site": "__kmap_local_pfn_prot"}, {"event": L, "pid": 101}]
    rep = check(ev)
    # the XEN-* rules need the per-CPU lazy state, which only Xen PV traces carry (tests/unit/test_xen_*.py)
    want = {r.id: PASS for r in rep.results} | dict.fromkeys(
        ("XEN-LAZY-STATE", "XEN-BATCH-ISSUED", "XEN-SWITCH-SAVE"), NOT_EXERCISED)
    assert {r.id: r.status for r in rep.results} == want
    assert rep.exit_status == 0


# -- LAZY-PREEMPT ------------------------------------------------------------------------------------

def test_lazy_preempt_pass_with_count_or_irqs_off():
    ev = user_region(pc=1) + [{"event": E, "preempt_count": 0, "irqs_on": False}, {"event": L}]
    res = result(ev, "LAZY-PREEMPT")
    assert res.status == PASS and res.checked == 2


def test_lazy_preempt_fail_names_site_and_task():
    ev = [{"event": E, "site": "__apply_to_page_range", "preempt_count": 0, "pid": 112, "comm": "insmod",
           "cpu": 1}, {"event": L, "cpu": 1, "pid": 112}]
    res = result(ev, "LAZY-PREEMPT")
    assert res.status == FAIL and seqs(res) == [0]
    row = res.violations.iloc[0]
    assert row["title"] == "lazytrace LAZY-PREEMPT: lazy_enter with preemption enabled in __apply_to_page_range"
    assert (row["cpu"], row["comm"], row["pid"], row["preempt_count"]) == (1, "insmod", 112, 0)


def test_lazy_preempt_not_exercised_names_what_trace_has():
    res = result([{"event": SP}, {"event": SW}], "LAZY-PREEMPT")
    assert res.status == NOT_EXERCISED
    assert "no lazy_enter event" in res.reason and "set_pte=1" in res.reason and "switch=1" in res.reason


# -- LAZY-PAIRING ------------------------------------------------------------------------------------

def test_pairing_pass_alternating_on_two_cpus():
    ev = [{"event": E, "cpu": 0}, {"event": E, "cpu": 1}, {"event": L, "cpu": 0}, {"event": L, "cpu": 1}]
    res = result(ev, "LAZY-PAIRING")
    assert res.status == PASS and res.checked == 4


@pytest.mark.parametrize("events,bad,title", [
    ([{"event": E}, {"event": E, "site": "copy_pte_range"}, {"event": L}], [1], "nested lazy_enter in copy_pte_range"),
    ([{"event": L, "site": "move_ptes"}], [0], "lazy_leave without lazy_enter in move_ptes"),
    ([{"event": E}, {"event": L}, {"event": L}], [2], "lazy_leave without lazy_enter in native_set_pte"),
    ([{"event": E, "site": "zap_pte_range"}, {"event": SP}], [0], "lazy region entered in zap_pte_range never left"),
])
def test_pairing_fail(events, bad, title):
    res = result(events, "LAZY-PAIRING")
    assert res.status == FAIL and seqs(res) == bad
    assert res.violations["title"].str.endswith(title).all()


def test_pairing_window_edges_are_not_evidence():
    ev = [{"event": SP}, {"event": L}, {"event": E}, {"event": SP}]
    windowed = result(ev, "LAZY-PAIRING", windowed=True)
    assert windowed.status == PASS
    assert "open at the end" in windowed.note and "already open when the window opened" in windowed.note
    assert seqs(result(ev, "LAZY-PAIRING")) == [1, 2]  # the same events from boot: both ends are bugs
    cut = result(ev[2:], "LAZY-PAIRING", partial=True)  # a partial trace: its end is missing, not a bug
    assert cut.n_violations == 0 and "partial" in cut.note


# -- LAZY-NO-SWITCH -----------------------------------------------------------------------------------

def test_no_switch_pass_switch_between_regions():
    ev = user_region(pid=100) + [{"event": SW, "pid": 100, "next_pid": 200}] + user_region(pid=200)
    res = result(ev, "LAZY-NO-SWITCH")
    assert res.status == PASS and res.checked == 3  # 1 switch + 2 closed regions


def test_no_switch_fail_switch_inside_and_other_task_leaves():
    ev = [{"event": E, "site": "zap_pte_range", "pid": 100}, {"event": SW, "pid": 100, "next_pid": 200},
          {"event": L, "pid": 200}]
    res = result(ev, "LAZY-NO-SWITCH")
    assert res.status == FAIL and seqs(res) == [1, 2]
    titles = set(res.violations["title"])
    assert titles == {"lazytrace LAZY-NO-SWITCH: context switch inside lazy region entered in zap_pte_range",
                      "lazytrace LAZY-NO-SWITCH: lazy region entered in zap_pte_range left by another task"}
    assert set(res.violations["related_seq"].dropna().astype(int)) == {0}


# -- LAZY-SETPTE-ATOMIC -------------------------------------------------------------------------------

def test_setpte_atomic_pass_and_outside_regions_free():
    ev = user_region(pc=2) + [{"event": SP, "preempt_count": 0, "pid": 999}]  # outside a region: fine
    res = result(ev, "LAZY-SETPTE-ATOMIC")
    assert res.status == PASS and res.checked == 3


def test_setpte_atomic_fail_preemptible_and_foreign():
    ev = [{"event": E, "site": "__apply_to_page_range", "preempt_count": 0, "pid": 7},
          {"event": SP, "preempt_count": 0, "pid": 7, "site": "native_set_pte"},
          {"event": SP, "preempt_count": 1, "pid": 8}, {"event": L, "pid": 7}]
    res = result(ev, "LAZY-SETPTE-ATOMIC")
    assert res.status == FAIL and seqs(res) == [1, 2]
    v = res.violations.set_index("seq")
    assert v.loc[1, "site"] == "__apply_to_page_range" and v.loc[1, "event_site"] == "native_set_pte"
    assert "another task" in v.loc[2, "title"]


# -- KMAP-ATOMIC-PREEMPT ------------------------------------------------------------------------------

def test_kmap_atomic_pass_from_preemptible_caller():
    # The probe fires before kmap_atomic()'s own preempt_disable(): a recorded 0 is a healthy caller.
    res = result([{"event": "kmap_atomic", "preempt_count": 0, "site": "copy_user_highpage"}], "KMAP-ATOMIC-PREEMPT")
    assert res.status == PASS and res.checked == 1


def test_kmap_atomic_fail_when_count_wraps():
    res = result([{"event": "kmap_atomic", "preempt_count": 0x7FFFFFFF, "site": "copy_user_highpage"}],
                 "KMAP-ATOMIC-PREEMPT")
    assert res.status == FAIL and res.violations.iloc[0]["site"] == "copy_user_highpage"


# -- SYNC-IRQS-OFF ------------------------------------------------------------------------------------

def test_sync_pass_and_fail():
    ok = result([{"event": "sync_kernel_mappings", "irqs_on": False, "site": "sync_global_pgds"}], "SYNC-IRQS-OFF")
    assert ok.status == PASS
    bad = result([{"event": "sync_kernel_mappings", "irqs_on": True, "site": "sync_global_pgds"}], "SYNC-IRQS-OFF")
    assert bad.status == FAIL
    assert bad.violations.iloc[0]["title"].endswith("kernel-mapping sync with interrupts on in sync_global_pgds")


def test_sync_not_exercised_explains_x86_64():
    res = result(user_region(), "SYNC-IRQS-OFF")
    assert res.status == NOT_EXERCISED and "pre-allocates the vmalloc" in res.reason


# -- KERNEL-UPDATE-FLUSHED ----------------------------------------------------------------------------

def kernel_region(*middle, mm_is_init=True):
    return ([{"event": E, "site": "__apply_to_page_range", "mm_is_init": mm_is_init}, {"event": SP}]
            + list(middle) + [{"event": L}])


def test_kernel_update_pass_flushed_or_left():
    res = result(kernel_region({"event": F}) + [{"event": SW}], "KERNEL-UPDATE-FLUSHED")
    assert res.status == PASS and res.checked == 1


def test_kernel_update_fail_switch_before_flush():
    ev = kernel_region({"event": SW}, {"event": F})
    res = result(ev, "KERNEL-UPDATE-FLUSHED")
    assert res.status == FAIL and seqs(res) == [1]
    assert res.violations.iloc[0]["related_seq"] == 2


def test_kernel_update_heuristic_site_and_user_regions():
    # mm unknown at an __apply_to_page_range enter: counted as kernel (analysis/sites.py).
    assert result(kernel_region({"event": SW}, mm_is_init=None), "KERNEL-UPDATE-FLUSHED").status == FAIL
    # a known user mm overrides the site
    assert result(kernel_region({"event": SW}, mm_is_init=False), "KERNEL-UPDATE-FLUSHED").status == NOT_EXERCISED
    # a user region is not tested at all
    ev = user_region()[:2] + [{"event": SW}, {"event": L}]
    assert result(ev, "KERNEL-UPDATE-FLUSHED").checked == 0


# -- IRQ-IN-LAZY -------------------------------------------------------------------------------------

def test_irq_in_lazy_pass_at_kmap_site():
    ev = [{"event": E}, {"event": SP, "preempt_count": 0x10001, "site": "__kmap_local_pfn_prot"}, {"event": L}]
    res = result(ev, "IRQ-IN-LAZY")
    assert res.status == PASS and res.checked == 1


def test_irq_in_lazy_fail_elsewhere_any_irq_kind():
    ev = [{"event": E}, {"event": SP, "preempt_count": 0x10001, "site": "e1000_clean_rx"},
          {"event": SP, "preempt_count": 0x201, "site": "net_rx_action"},
          {"event": SP, "preempt_count": 0x100001, "site": "nmi_handle"}, {"event": L},
          {"event": SP, "preempt_count": 0x10001, "site": "outside_is_fine"}]
    res = result(ev, "IRQ-IN-LAZY")
    assert res.status == FAIL and seqs(res) == [1, 2, 3]


def test_irq_in_lazy_not_exercised_in_task_context():
    res = result(user_region(), "IRQ-IN-LAZY")
    assert res.status == NOT_EXERCISED and "task context" in res.reason


# -- shared behaviour ---------------------------------------------------------------------------------

def test_unsorted_rows_and_unknown_cpu_use_seq_and_vcpu():
    ev = [{"event": E, "seq": 10, "cpu": -1, "vcpu": 1, "preempt_count": 0, "site": "__apply_to_page_range"},
          {"event": E, "seq": 5, "cpu": 1}, {"event": L, "seq": 7, "cpu": 1}, {"event": L, "seq": 12, "cpu": 1}]
    rep = check(list(reversed(ev)))
    assert rep.result("LAZY-PAIRING").status == PASS
    assert seqs(rep.result("LAZY-PREEMPT")) == [10]
    assert rep.result("LAZY-PREEMPT").violations.iloc[0]["cpu"] == 1
