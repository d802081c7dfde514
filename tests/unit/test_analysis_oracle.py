"""Hypothesis properties: the vectorised catalogue agrees with the per-event oracle (tests/oracle.py).

* arbitrary event sequences (any order, any field values, windowed or not, partial or not): the same
  violations (invariant, seq, site, title) and the same ``checked`` counts;
* valid sequences (generated as a well-behaved guest would run): no violation at all;
* a valid sequence with one mutated or inserted event: exactly the violations that mutation implies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.check import check_trace
from analysis.load import Trace
from analysis.synth import SynthConfig, events_frame, synth_events

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oracle import check_oracle

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Per mutation (12 of them): fewer examples each, the same total effort.
MUTATION_SETTINGS = settings(SETTINGS, max_examples=30)

EVENTS = ["set_pte", "lazy_enter", "lazy_leave", "lazy_flush", "kmap_atomic", "kmap_local",
          "sync_kernel_mappings", "switch", "marker"]
SITES = ["zap_pte_range", "__apply_to_page_range", "native_set_pte", "__kmap_local_pfn_prot", "vmap_pte_range",
         "sync_global_pgds", "e1000_clean_rx", "copy_user_highpage"]
COUNTS = [0, 1, 2, 0x100, 0x201, 0x10000, 0x10001, 0x100000, 0x7FFFFFFF]


def vectorised(df, *, windowed=False, partial=False):
    trace = Trace.from_frame(df, windowed=windowed, partial_reasons=("cut",) if partial else ())
    rep = check_trace(trace)
    found = {(str(r.invariant), int(r.seq), str(r.site), str(r.title)) for r in rep.df_violations().itertuples()}
    return {r.id: r.checked for r in rep.results}, found


def assert_agree(df, **kw):
    checked, found = vectorised(df, **kw)
    ref = check_oracle(df, **kw)
    assert found == ref.violations
    assert checked == ref.checked
    return ref


# -- arbitrary sequences -------------------------------------------------------------------------------

event_st = st.fixed_dictionaries({
    "event": st.sampled_from(EVENTS),
    "cpu": st.sampled_from([0, 0, 1, 2, -1]),
    "vcpu": st.sampled_from([0, 1, 2]),
    "site": st.sampled_from(SITES),
    "preempt_count": st.sampled_from(COUNTS),
    "irqs_on": st.booleans(),
    "pid": st.sampled_from([100, 101, 102]),
    "mm_is_init": st.sampled_from([None, True, False]),
    "lazy_mmu": st.sampled_from([None, True, False]),
})


@SETTINGS
@given(events=st.lists(event_st, max_size=60), shuffle=st.randoms(use_true_random=False),
       windowed=st.booleans(), partial=st.booleans())
def test_arbitrary_sequences_agree(events, shuffle, windowed, partial):
    for i, e in enumerate(events):
        e["seq"] = 3 * i + 1
    shuffle.shuffle(events)  # rows in any order: seq decides
    assert_agree(events_frame(events), windowed=windowed, partial=partial)


# -- valid sequences and single mutations -------------------------------------------------------------

SEQ_STEP = 10  # room between seqs for inserted events


@st.composite
def cpu_stream(draw, cpu):
    """One CPU's events as a well-behaved kernel would produce them, with its regions noted."""
    pid = 100 + 10 * cpu
    out, regions = [], []

    def add(**e):
        out.append({"cpu": cpu, "pid": pid, **e})
        return len(out) - 1

    for kind in draw(st.lists(st.sampled_from(["user", "kernel", "outside", "switch", "kmap", "sync"]),
                              max_size=8)):
        if kind in ("user", "kernel"):
            kernel = kind == "kernel"
            site = "__apply_to_page_range" if kernel else draw(st.sampled_from(["zap_pte_range", "copy_pte_range"]))
            pc = draw(st.sampled_from([1, 2]))
            r = {"enter": add(event="lazy_enter", site=site, preempt_count=pc,
                              mm_is_init=draw(st.sampled_from([True, None])) if kernel else None),
                 "set_ptes": [], "irq": [], "kernel": kernel}
            for _ in range(draw(st.integers(0, 4))):
                irq = draw(st.integers(0, 9)) == 0
                i = add(event="set_pte", preempt_count=(0x10001 if irq else pc),
                        site="__kmap_local_pfn_prot" if irq else draw(st.sampled_from([site, "native_set_pte"])))
                (r["irq"] if irq else r["set_ptes"]).append(i)
            if r["set_ptes"] and draw(st.booleans()):
                add(event="lazy_flush", site=site, preempt_count=pc)
            r["leave"] = add(event="lazy_leave", site=site, preempt_count=pc)
            regions.append(r)
        elif kind == "outside":
            add(event="set_pte", preempt_count=draw(st.sampled_from([0, 1])), site="do_anonymous_page")
        elif kind == "switch":
            nxt = pid + 1
            add(event="switch", site="__switch_to", next_pid=nxt, irqs_on=False)
            pid = nxt
        elif kind == "kmap":
            add(event="kmap_atomic", site="copy_user_highpage", preempt_count=draw(st.sampled_from([0, 1])))
        else:
            add(event="sync_kernel_mappings", site="sync_global_pgds", irqs_on=False)
    return out, regions


@st.composite
def valid_trace(draw):
    """Up to three CPU streams interleaved in a random order; seqs are multiples of SEQ_STEP."""
    streams = [draw(cpu_stream(c)) for c in range(draw(st.integers(1, 3)))]
    order = draw(st.permutations([c for c, (evs, _) in enumerate(streams) for _ in evs]))
    pos = [0] * len(streams)
    for k, c in enumerate(order):
        streams[c][0][pos[c]]["seq"] = SEQ_STEP * (k + 1)
        pos[c] += 1
    return streams


def flatten(streams):
    return [e for evs, _ in streams for e in evs]


@SETTINGS
@given(streams=valid_trace())
def test_valid_sequences_have_no_violation(streams):
    ref = assert_agree(events_frame(flatten(streams)))
    assert ref.violations == set()


MUTATIONS = ["enter_preemptible", "set_pte_preemptible", "set_pte_foreign", "nested_enter", "orphan_leave",
             "switch_inside", "leave_other_task", "irq_set_pte_elsewhere", "kernel_switch_before_flush",
             "never_left", "sync_irqs_on", "kmap_wraps"]


def mutate(streams, mutation, data):
    """Apply one mutation to a valid trace; return the events and the expected {(invariant, seq)}."""
    regions = [(evs, r) for evs, rs in streams for r in rs]
    events = flatten(streams)
    pick = lambda xs: data.draw(st.sampled_from(xs))  # noqa: E731

    def near(evs, i, delta=1):
        return {**evs[i], "seq": evs[i]["seq"] + delta}

    if mutation == "enter_preemptible":
        evs, r = pick(regions)
        evs[r["enter"]].update(preempt_count=0, irqs_on=True)
        return events, {("LAZY-PREEMPT", evs[r["enter"]]["seq"])}
    if mutation in ("set_pte_preemptible", "set_pte_foreign"):
        evs, r = pick([(e, r) for e, r in regions if r["set_ptes"]])
        i = pick(r["set_ptes"])
        evs[i].update(preempt_count=0, irqs_on=True) if mutation == "set_pte_preemptible" else evs[i].update(pid=1)
        return events, {("LAZY-SETPTE-ATOMIC", evs[i]["seq"])}
    if mutation == "nested_enter":
        evs, r = pick(regions)
        extra = near(evs, r["enter"])
        return events + [extra], {("LAZY-PAIRING", extra["seq"])}
    if mutation == "orphan_leave":
        evs, r = pick(regions)
        extra = near(evs, r["leave"])
        return events + [extra], {("LAZY-PAIRING", extra["seq"])}
    if mutation == "switch_inside":
        evs, r = pick(regions)
        extra = {**near(evs, r["enter"]), "event": "switch", "site": "__switch_to", "next_pid": 1}
        return events + [extra], {("LAZY-NO-SWITCH", extra["seq"])}
    if mutation == "leave_other_task":
        evs, r = pick(regions)
        evs[r["leave"]]["pid"] = 1
        return events, {("LAZY-NO-SWITCH", evs[r["leave"]]["seq"])}
    if mutation == "irq_set_pte_elsewhere":
        evs, r = pick(regions)
        extra = {**near(evs, r["enter"]), "event": "set_pte", "preempt_count": 0x10001, "site": "e1000_clean_rx",
                 "mm_is_init": None}
        return events + [extra], {("IRQ-IN-LAZY", extra["seq"])}
    if mutation == "kernel_switch_before_flush":
        evs, r = pick([(e, r) for e, r in regions if r["kernel"] and r["set_ptes"]])
        first = r["set_ptes"][0]
        extra = {**near(evs, first), "event": "switch", "site": "__switch_to", "next_pid": 1}
        # every set_pte of a kernel region is a kernel update, the interrupt ones included
        unflushed = [i for i in r["set_ptes"] + r["irq"] if i <= first]
        return events + [extra], ({("LAZY-NO-SWITCH", extra["seq"])}
                                  | {("KERNEL-UPDATE-FLUSHED", evs[i]["seq"]) for i in unflushed})
    if mutation == "never_left":
        # the last region of a CPU whose stream ends with its leave
        last = [(evs, rs[-1]) for evs, rs in streams if rs and rs[-1]["leave"] == len(evs) - 1]
        evs, r = pick(last)
        leave = evs[r["leave"]]
        return [e for e in events if e is not leave], {("LAZY-PAIRING", evs[r["enter"]]["seq"])}
    if mutation == "sync_irqs_on":
        e = pick([e for e in events if e["event"] == "sync_kernel_mappings"])
        e["irqs_on"] = True
        return events, {("SYNC-IRQS-OFF", e["seq"])}
    if mutation == "kmap_wraps":
        e = pick([e for e in events if e["event"] == "kmap_atomic"])
        e.update(preempt_count=0x7FFFFFFF, irqs_on=True)
        return events, {("KMAP-ATOMIC-PREEMPT", e["seq"])}
    raise AssertionError(mutation)


def applicable(streams, mutation):
    regions = [r for _, rs in streams for r in rs]
    events = flatten(streams)
    if mutation in ("set_pte_preemptible", "set_pte_foreign"):
        return any(r["set_ptes"] for r in regions)
    if mutation == "kernel_switch_before_flush":
        return any(r["kernel"] and r["set_ptes"] for r in regions)
    if mutation == "never_left":
        return any(rs and rs[-1]["leave"] == len(evs) - 1 for evs, rs in streams)
    if mutation == "sync_irqs_on":
        return any(e["event"] == "sync_kernel_mappings" for e in events)
    if mutation == "kmap_wraps":
        return any(e["event"] == "kmap_atomic" for e in events)
    return bool(regions)


@MUTATION_SETTINGS
@pytest.mark.parametrize("mutation", MUTATIONS)
@given(streams=valid_trace(), data=st.data())
def test_one_mutation_gives_exactly_its_violation(mutation, streams, data):
    if not applicable(streams, mutation):
        return
    events, expected = mutate(streams, mutation, data)
    ref = assert_agree(events_frame(events))
    assert {(inv, seq) for inv, seq, _, _ in ref.violations} == expected


def test_oracle_agrees_on_a_synthetic_trace():
    df = synth_events(SynthConfig(n_events=20_000, seed=3))
    for windowed in (False, True):
        ref = assert_agree(df, windowed=windowed)
        assert ref.ids() == {"LAZY-PREEMPT", "LAZY-SETPTE-ATOMIC"}  # the 691ee97e1a9d case, by design
