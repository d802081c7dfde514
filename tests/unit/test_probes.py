"""The probe table is data: check it is consistent with the schema and the guest's marker protocol."""

from __future__ import annotations

import pytest

from tracer import probes, schema
from tracer.probes import PROBES, PROBES_BY_NAME, Probe


def test_names_unique_and_events_in_schema():
    assert len({p.name for p in PROBES}) == len(PROBES)
    for p in PROBES:
        assert p.event is None or p.event in schema.EVENT_CODE, p


def test_every_recorded_category_has_a_probe():
    # every category a recorder can produce, except none, is covered by at least one probe
    covered = {p.event for p in PROBES if p.event}
    assert covered == set(schema.EVENTS)


def test_required_core_probes():
    required = {p.name for p in PROBES if p.required}
    assert {"native_set_pte", "arch_enter_lazy_mmu_mode", "arch_leave_lazy_mmu_mode", "__switch_to",
            "sethostname_marker"} <= required
    # flush/kmap/sync differ between kernels (paravirt_flush_lazy_mmu is gone in 6.12): optional
    for name in ("paravirt_flush_lazy_mmu", "arch_flush_lazy_mmu_mode", "kmap_atomic", "kmap_local_page",
                 "arch_sync_kernel_mappings", "sync_global_pgds"):
        assert not PROBES_BY_NAME[name].required


def test_marker_lengths_match_the_guest_hostnames():
    # /init runs `hostname lazytrace-start` and `hostname lazytrace-end`
    assert dict(probes.MARKERS) == {"workload-start": 15, "workload-end": 13}
    marker = PROBES_BY_NAME["sethostname_marker"]
    assert marker.event == "marker" and marker.markers == probes.MARKERS
    assert marker.entry_reads == {"marker": "rdi"}


def test_set_pte_and_switch_reads():
    assert dict(PROBES_BY_NAME["native_set_pte"].entry_reads) == {"ptep": "rdi", "pteval": "rsi"}
    assert PROBES_BY_NAME["native_set_pte"].inline_store
    assert dict(PROBES_BY_NAME["__switch_to"].entry_reads) == {"next_task": "rsi"}


def test_apply_mm_hook_feeds_lazy_enter():
    hook = PROBES_BY_NAME["apply_to_page_range_mm"]
    assert hook.is_hook and hook.hook_slot == probes.APPLY_MM_SLOT
    assert hook.spec in PROBES_BY_NAME["arch_enter_lazy_mmu_mode"].mm_slot_under


def test_probe_validation():
    with pytest.raises(ValueError, match="bad event"):
        Probe("x", "x", "set_ptes", True)
    with pytest.raises(ValueError, match="hook_slot"):
        Probe("x", "x", None, False)
    p = Probe("x", "x", "switch", True, entry_reads={"next_task": "rsi"})
    with pytest.raises(TypeError):
        p.entry_reads["next_task"] = "rdi"  # read-only mapping: the table cannot be changed by a consumer


def test_table_json_is_stable():
    table = probes.probe_table_json()
    assert [t["name"] for t in table] == [p.name for p in PROBES]
    assert table == probes.probe_table_json()
    assert table[0]["entry_reads"] == {"ptep": "rdi", "pteval": "rsi"}
