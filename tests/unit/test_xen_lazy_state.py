"""XEN-LAZY-STATE on hand-built traces, the nullable ``lazy_mmu`` column from raw flags, and old traces
without the column (the committed fixture predates it)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from analysis.check import FAIL, NOT_EXERCISED, PASS, check_trace
from analysis.load import Trace, load_trace, read_parquet
from analysis.synth import events_frame
from tracer import rawformat as rf
from tracer import rawtrace, schema
from tracer.plugin_recorder import IRQ_MODES
from tracer.profiles import KINDS
from tracer.record import IRQ_SOURCES, plugin_irq_mode

ID = "XEN-LAZY-STATE"
E, L, SP, SW = "lazy_enter", "lazy_leave", "set_pte", "switch"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fork-exec-6.1-plugin"


def result(events, *, windowed=False):
    trace = Trace.from_frame(events_frame(events), windowed=windowed)
    return check_trace(trace, invariants=[ID]).result(ID)


def xen_region(cpu=0, site="unmap_page_range", n=2):
    """A region as the Xen plugin sees it: not lazy at the enter (pre-call), lazy up to and at the leave."""
    return ([{"event": E, "site": site, "cpu": cpu, "lazy_mmu": False}]
            + [{"event": SP, "site": "xen_set_pte", "cpu": cpu, "lazy_mmu": True} for _ in range(n)]
            + [{"event": L, "site": site, "cpu": cpu, "lazy_mmu": True}])


def test_consistent_state_passes_and_counts_known_events():
    ev = ([{"event": SP, "site": "xen_set_pte", "lazy_mmu": False}] + xen_region(cpu=0) + xen_region(cpu=1)
          + [{"event": SW, "site": "__switch_to", "lazy_mmu": False, "irqs_on": False},
             {"event": SP, "site": "xen_set_pte", "lazy_mmu": None}])
    res = result(ev)
    assert res.status == PASS
    assert res.checked == len(ev) - 1  # the event without a known state is not checked
    assert "1 events without a known lazy state" in res.note


def test_not_lazy_inside_region_fails_blaming_the_entering_function():
    ev = xen_region(site="copy_page_range")
    ev[2]["lazy_mmu"] = False
    res = result(ev)
    assert res.status == FAIL
    assert list(res.violations["seq"]) == [2]
    assert list(res.violations["site"]) == ["copy_page_range"]
    assert "not MMU-lazy inside" in res.violations["title"].iloc[0]


def test_lazy_outside_any_region_fails():
    ev = xen_region() + [{"event": SP, "site": "xen_set_pte", "lazy_mmu": True}]
    res = result(ev)
    assert res.status == FAIL
    assert list(res.violations["seq"]) == [4]
    assert "outside any lazy region" in res.violations["title"].iloc[0]


def test_lazy_already_at_the_opening_enter_fails():
    ev = xen_region()
    ev[0]["lazy_mmu"] = True
    res = result(ev)
    assert res.status == FAIL and list(res.violations["seq"]) == [0]
    assert "already MMU-lazy at the lazy enter" in res.violations["title"].iloc[0]


def test_state_is_per_cpu():
    # CPU 1 is lazy while CPU 0 is outside any region: fine; CPU 0 lazy there is not
    ev = [{"event": E, "cpu": 1, "lazy_mmu": False}, {"event": SP, "cpu": 0, "lazy_mmu": False},
          {"event": SP, "cpu": 1, "lazy_mmu": True}, {"event": L, "cpu": 1, "lazy_mmu": True}]
    assert result(ev).status == PASS
    ev[1]["lazy_mmu"] = True
    res = result(ev)
    assert res.status == FAIL and list(res.violations["seq"]) == [1]


def test_window_opened_inside_a_region_expects_lazy_before_the_head_leave():
    ev = [{"event": SP, "lazy_mmu": True}, {"event": L, "site": "unmap_page_range", "lazy_mmu": True},
          {"event": SP, "lazy_mmu": False}]
    assert result(ev, windowed=True).status == PASS
    ev[0]["lazy_mmu"] = False
    res = result(ev, windowed=True)
    assert res.status == FAIL and list(res.violations["seq"]) == [0]


def test_no_lazy_state_is_not_exercised():
    ev = [{"event": E}, {"event": SP}, {"event": L}]
    res = result(ev)
    assert res.status == NOT_EXERCISED and res.checked == 0


def test_raw_flags_become_a_nullable_lazy_mmu_column():
    recs = np.zeros(3, rawtrace.RAW_DTYPE)
    recs["seq"] = [0, 1, 2]
    recs["event"] = schema.EVENT_CODE["set_pte"]
    recs["flags"] = [0, rf.F_LAZY_KNOWN, rf.F_LAZY_KNOWN | rf.F_LAZY_MMU]
    df = rawtrace.raw_to_frame(recs, [{"loc": 0, "probe": "xen_set_pte", "event": "set_pte", "pc": 0,
                                       "site": "xen_set_pte"}])
    assert df["lazy_mmu"].dtype == pd.BooleanDtype()
    assert df["lazy_mmu"].isna().tolist() == [True, False, False]
    assert df["lazy_mmu"].iloc[1:].tolist() == [False, True]


def test_raw_lazy_mode_and_multicall_fill_columns():
    recs = np.zeros(4, rawtrace.RAW_DTYPE)
    recs["seq"] = [0, 1, 2, 3]
    recs["event"] = schema.EVENT_CODE["set_pte"]
    # unknown; CPU-lazy with 3 queued; MMU written before the lazy_mode byte existed (byte 0); known empty
    recs["flags"] = [0, rf.F_LAZY_KNOWN | rf.F_MC_KNOWN, rf.F_LAZY_KNOWN | rf.F_LAZY_MMU, rf.F_LAZY_KNOWN | rf.F_MC_KNOWN]
    recs["lazy_mode"] = [0, schema.LAZY_CPU, 0, schema.LAZY_NONE]
    recs["mc_pending"] = [7, 3, 9, 0]
    df = rawtrace.raw_to_frame(recs, [{"loc": 0, "probe": "xen_set_pte", "event": "set_pte", "pc": 0,
                                       "site": "xen_set_pte"}])
    assert df["lazy_mode"].dtype == pd.UInt8Dtype() and df["mc_pending"].dtype == pd.UInt8Dtype()
    assert df["lazy_mode"].tolist() == [pd.NA, schema.LAZY_CPU, schema.LAZY_MMU, schema.LAZY_NONE]
    assert df["lazy_mmu"].tolist() == [pd.NA, False, True, False]
    assert df["mc_pending"].tolist() == [pd.NA, 3, pd.NA, 0]


def test_plugin_record_layout_and_flags_match_the_raw_format():
    src = (Path(rawtrace.__file__).parent / "plugin" / "lazytrace.c").read_text()
    for name in ("F_IRQS_ON", "F_PTEP", "F_PTEVAL", "F_MM_KNOWN", "F_MM_INIT", "F_LAZY_KNOWN", "F_LAZY_MMU",
                 "F_MC_KNOWN"):
        m = re.search(rf"#define {name} (0x[0-9a-fA-F]+)", src)
        assert m and int(m.group(1), 16) == getattr(rf, name), name
    body = re.search(r"struct lt_record \{(.*?)\};", src, re.S).group(1)
    fields = re.findall(r"\b(\w+)(?:\[\d+\])?;", body)
    assert fields == [n for n in rawtrace.RAW_DTYPE.names if n != "_pad"] + ["pad"]


def test_trace_written_without_the_column_loads_with_it_all_null(tmp_path):
    old = load_trace(FIXTURE)
    assert "lazy_mmu" not in pq.read_schema(f"{FIXTURE}/{schema.TRACE_FILE}").names  # recorded before the column
    assert old.df["lazy_mmu"].isna().all() and len(old.df)
    # and a trace written now round-trips the column
    df = events_frame([{"event": SP, "lazy_mmu": True}, {"event": SP, "lazy_mmu": None}])
    rawtrace.write_parquet(df, tmp_path / schema.TRACE_FILE)
    back = read_parquet(tmp_path / schema.TRACE_FILE)
    assert back["lazy_mmu"].isna().tolist() == [False, True] and bool(back["lazy_mmu"].iloc[0])


def test_xen_profiles_record_the_event_channel_mask():
    assert plugin_irq_mode("xen-pv") == "xen" and plugin_irq_mode("plain") == "eflags"
    assert {plugin_irq_mode(k) for k in KINDS} <= set(IRQ_MODES) == set(IRQ_SOURCES)
