"""GdbRecorder's host-side pieces that need no gdb: the summary frame, manifest stats, argument checks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tracer import schema
from tracer.gdb_recorder import GdbRecorder, _marker_window, df_probe_cpu_summary
from tracer.gdb_session import GdbSession
from tracer.symbols import OFFSET_KEYS, Symbols

LOCS = [
    {"loc": 0, "probe": "native_set_pte", "event": "set_pte", "pc": 100, "site": "native_set_pte", "reads": {}},
    {"loc": 1, "probe": "native_set_pte", "event": "set_pte", "pc": 200, "site": "unmap_page_range", "reads": {}},
    {"loc": 2, "probe": "arch_enter_lazy_mmu_mode", "event": "lazy_enter", "pc": 300, "site": "unmap_page_range",
     "reads": {}},
    {"loc": 3, "probe": "__switch_to", "event": "switch", "pc": 400, "site": "__switch_to", "reads": {}},
]


def frame(rows: list[tuple[int, int, str]]) -> pd.DataFrame:
    """rows: (cpu, pc, site) -> a schema frame."""
    event_of = {loc["pc"]: loc["event"] for loc in LOCS}
    n = len(rows)
    df = pd.DataFrame({
        "seq": range(n), "t_ns": range(n), "cpu": [r[0] for r in rows], "vcpu": [r[0] for r in rows],
        "event": [event_of.get(r[1], "marker") for r in rows], "site": [r[2] for r in rows],
        "pc": [r[1] for r in rows], "preempt_count": [1] * n, "need_resched": [False] * n, "irqs_on": [True] * n,
        "pid": [1] * n, "comm": ["x"] * n, "ptep": [None] * n, "pteval": [None] * n, "mm_is_init": [None] * n,
        "next_pid": [None] * n,
    })
    return schema.coerce(df)


def test_summary_per_probe_per_cpu():
    df = frame([(0, 100, "native_set_pte"), (1, 200, "unmap_page_range"), (1, 200, "unmap_page_range"),
                (0, 300, "unmap_page_range"), (1, 400, "__switch_to"), (0, 999, "nowhere")])
    s = df_probe_cpu_summary(df, LOCS)
    assert list(s.columns) == ["cpu0", "cpu1", "total"]
    assert s.loc["native_set_pte"].tolist() == [1, 2, 3]
    assert s.loc["arch_enter_lazy_mmu_mode"].tolist() == [1, 0, 1]
    assert s.loc["?"].tolist() == [1, 0, 1]  # a pc no location knows is shown, not dropped
    assert s.index[0] == "native_set_pte"  # sorted by total
    assert s["total"].sum() == len(df)


def test_summary_by_event_without_locations():
    df = frame([(0, 100, "native_set_pte"), (1, 400, "__switch_to")])
    s = df_probe_cpu_summary(df)
    assert set(s.index) == {"set_pte", "switch"}


def test_summary_of_empty_trace():
    s = df_probe_cpu_summary(schema.empty_frame(), LOCS)
    assert s.empty and "total" in s.columns


def test_marker_window():
    assert _marker_window([[0, "workload-start", 1_000_000_000], [9, "workload-end", 3_500_000_000]]) == 2.5
    assert _marker_window([[0, "workload-start", 5]]) is None
    assert _marker_window([]) is None


def symbols() -> Symbols:
    probes = [{"name": "native_set_pte", "event": "set_pte", "required": True, "count": 2},
              {"name": "arch_enter_lazy_mmu_mode", "event": "lazy_enter", "required": True, "count": 1},
              {"name": "__switch_to", "event": "switch", "required": True, "count": 1},
              {"name": "apply_to_page_range_mm", "event": None, "required": False, "count": 1}]
    return Symbols(build_id="x", banner="b", locations=LOCS, probes=probes, offsets=dict.fromkeys(OFFSET_KEYS, 0))


def test_manifest_stats_from_collector_counters(tmp_path):
    rec = GdbRecorder(GdbSession(Path("vmlinux"), None, tmp_path / "gdb.log"), symbols(), tmp_path)
    st = rec.manifest_stats({"events_recorded": 0, "events_lost": 2, "loc_hits": [3, 4, 5, 6], "flushes": 1})
    assert st["probe_hits"] == {"native_set_pte": 7, "arch_enter_lazy_mmu_mode": 5, "__switch_to": 6}
    assert st["probe_locations"]["native_set_pte"] == 2
    assert st["events_lost"] == 2 and st["collector_ok"]


def test_manifest_stats_when_gdb_died(tmp_path):
    raw = tmp_path / "events.raw"
    raw.write_bytes(b"LZTRAW01" + bytes(80 * 3) + bytes(10))  # 3 records and a torn one
    rec = GdbRecorder(GdbSession(Path("vmlinux"), None, tmp_path / "gdb.log"), symbols(), tmp_path)
    st = rec.manifest_stats({})
    assert st["events_recorded"] == st["events_on_disk"] == 3
    assert not st["collector_ok"]


def test_bad_arguments(tmp_path):
    gdb = GdbSession(Path("vmlinux"), None, tmp_path / "gdb.log")
    with pytest.raises(ValueError, match="bad arm"):
        GdbRecorder(gdb, symbols(), tmp_path, arm="reset")
    with pytest.raises(ValueError, match="bad mode"):
        GdbRecorder(gdb, symbols(), tmp_path, mode="fast")
