"""Fake-backend tier for the gdb recorder: the real gdb, the real in-gdb collector, a user-space fake kernel.

``tests/fixtures/gdb/fakekernel.c`` lays out per-CPU data behind ``gs_base`` (``arch_prctl(ARCH_SET_GS)``),
task structs, a pt_regs-like marker argument, ``init_mm`` and ``linux_banner`` the way the collector reads a
kernel, and its probe sites carry the kernel's instructions (a PTE store, 6-byte and 5-byte NOPs, a push).
Nothing is mocked: gdb runs the program natively, with the same GdbSession/GdbRecorder/collector code as a
QEMU guest; only the addresses come from ``nm`` instead of DWARF resolution.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tracer import rawformat as rf
from tracer import rawtrace
from tracer.errors import KernelError
from tracer.gdb_recorder import GdbRecorder
from tracer.gdb_session import GdbSession
from tracer.symbols import Symbols

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "gdb" / "fakekernel.c"
BANNER = "Linux version 0.0.0-fake (lazytrace test) #1 SMP PREEMPT_DYNAMIC\n"

pytestmark = pytest.mark.skipif(not (shutil.which("gdb") and shutil.which("gcc") and shutil.which("nm")),
                                reason="needs gdb, gcc and nm (apt-get install gdb gcc binutils)")


@pytest.fixture(scope="module")
def fake_kernel(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("fakekernel") / "fakekernel"
    subprocess.run(["gcc", "-O1", "-g", "-no-pie", "-o", str(out), str(FIXTURE)], check=True)
    syms = {}
    for line in subprocess.run(["nm", str(out)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    return out, syms


def fake_symbols(addr: dict[str, int], banner: str = BANNER) -> Symbols:
    def loc(i, probe, event, sym, site, reads, length):
        return {"loc": i, "probe": probe, "event": event, "pc": addr[sym], "site": site, "reads": reads,
                "insn": {"asm": "", "len": length}}

    locations = [
        loc(0, "native_set_pte", "set_pte", "native_set_pte", "native_set_pte",
            {"ptep": "rdi", "pteval": "rsi"}, 3),
        loc(1, "arch_enter_lazy_mmu_mode", "lazy_enter", "lazy_enter", "apply_to_page_range",
            {"mm_slot": "apply_mm"}, 6),
        loc(2, "arch_leave_lazy_mmu_mode", "lazy_leave", "lazy_leave", "apply_to_page_range", {}, 6),
        loc(3, "__switch_to", "switch", "switch_to", "__switch_to", {"next_task": "rsi"}, 2),
        loc(4, "sethostname_marker", "marker", "sethostname_entry", "workload-start", {"marker": "rdi", "len": 15}, 5),
        loc(5, "sethostname_marker", "marker", "sethostname_entry", "workload-end", {"marker": "rdi", "len": 13}, 5),
    ]
    hooks = [{"hook": 0, "probe": "apply_to_page_range_mm", "slot": "apply_mm", "pc": addr["apply_to_page_range"],
              "site": "apply_to_page_range", "reads": {"value": "rdi"}, "insn": {"asm": "", "len": 5}}]
    probes = [{"name": n, "event": e, "required": True, "count": 1} for n, e in (
        ("native_set_pte", "set_pte"), ("arch_enter_lazy_mmu_mode", "lazy_enter"),
        ("arch_leave_lazy_mmu_mode", "lazy_leave"), ("__switch_to", "switch"), ("sethostname_marker", "marker"))]
    offsets = {"pcpu_cpu_number": 0, "pcpu_preempt_count": 8, "pcpu_current_task": 16, "task_pid": 16,
               "task_comm": 32, "task_comm_len": 16, "task_mm": 0, "pt_regs_si": 8, "pt_regs_di": 0,
               "init_mm": addr["init_mm"], "linux_banner": addr["linux_banner"], "per_cpu_offset": 0}
    return Symbols(build_id="fake", banner=banner, locations=locations, probes=probes, offsets=offsets,
                   hooks=hooks, vmlinux="fakekernel")


def run_traced(tmp_path: Path, fake_kernel, *, arm: str = "marker", emulate: bool = False,
               banner: str = BANNER, xen_domain_type: int = 0) -> tuple[dict, object, str]:
    """Run the fake kernel under the recorder; :returns: (stats, frame, the program's output)."""
    exe, addr = fake_kernel
    trace = tmp_path / "trace"
    out = tmp_path / "ptes.txt"
    syms = fake_symbols(addr, banner)
    with GdbSession(exe, None, tmp_path / "gdb.log") as gdb:
        gdb.mi(f"-exec-arguments {out} {xen_domain_type}")
        gdb.mi("-break-insert -t main")
        gdb.mi("-break-insert done")
        gdb.run()
        gdb.wait_stopped(30)
        rec = GdbRecorder(gdb, syms, trace, arm=arm, emulate=emulate, text_base=0)
        rec.start()
        stop = gdb.wait_stopped(30)
        assert stop["payload"]["frame"]["func"] == "done"
        stats = rec.stop()
    raw = rawtrace.read_raw(trace / "events.raw")
    assert raw.torn_bytes == 0
    df = rawtrace.raw_to_frame(raw.records, rawtrace.load_locations(trace / "locations.json"))
    return stats, df, out.read_text()


def test_records_between_markers(tmp_path, fake_kernel):
    stats, df, _ = run_traced(tmp_path, fake_kernel)
    _, addr = fake_kernel
    assert list(df["event"]) == ["marker", "lazy_enter", *["set_pte"] * 5, "lazy_leave", "switch",
                                 "lazy_enter", "lazy_leave", "lazy_enter", "lazy_leave", "set_pte", "marker"]
    assert list(df["site"].iloc[[0, -1]]) == ["workload-start", "workload-end"]
    assert list(df["seq"]) == list(range(len(df)))
    assert stats["events_recorded"] == len(df) == stats["events_on_disk"]
    assert stats["events_lost"] == 0 and stats["collector_errors"] == []
    assert (df["cpu"] == 1).all()
    # the per-CPU read: 0x80000001 = count 1, need-resched clear; then 0 = count 0 with need-resched set
    before = df[df["seq"] < 8]
    assert (before["preempt_count"] == 1).all() and not before["need_resched"].any()
    after = df[df["seq"] >= 8]
    assert (after["preempt_count"] == 0).all() and after["need_resched"].all()
    assert df["irqs_on"].all()  # user space: IF is always set
    sets = df[df["event"] == "set_pte"]
    assert list(sets["ptep"]) == [addr["ptes"] + 8 * i for i in range(1, 7)]
    assert list(sets["pteval"]) == [0x8000000000000067 + (i << 12) for i in range(1, 6)] + [0x6666]
    # the task renamed by __set_task_comm (exec) shows its new comm at once, not a cached one
    assert list(sets["comm"]) == ["worker"] * 5 + ["execd"]
    assert stats["task_cache"] and stats["comm_hook_hits"] == 1
    sw = df[df["event"] == "switch"].iloc[0]
    assert (sw["pid"], sw["comm"], sw["next_pid"]) == (42, "worker", 43)
    enters = df[df["event"] == "lazy_enter"]
    # unknown before any apply_to_page_range; init_mm for task 43; user mm for task 42
    assert enters["mm_is_init"].tolist()[0] is pd.NA
    assert enters["mm_is_init"].tolist()[1:] == [True, False]
    assert enters["pid"].tolist() == [42, 43, 42]
    assert stats["probe_hits"]["native_set_pte"] == 6
    assert stats["hook_hits"] == 2
    assert stats["probe_locations"]["native_set_pte"] == 1


def test_arm_boot_records_from_the_start(tmp_path, fake_kernel):
    _, df, _ = run_traced(tmp_path, fake_kernel, arm="boot")
    # the set_pte before the start marker and after the end marker are recorded too
    sets = df[df["event"] == "set_pte"]
    assert len(sets) == 8
    assert sets["pteval"].iloc[0] == 0x1111 and sets["pteval"].iloc[-1] == 0x7777
    assert df["event"].iloc[1] == "marker"


def test_emulation_changes_nothing_the_program_sees(tmp_path, fake_kernel):
    s1, stepped, out1 = run_traced(tmp_path / "stepped", fake_kernel)
    s2, emulated, out2 = run_traced(tmp_path / "emulated", fake_kernel, emulate=True)
    assert out1 == out2
    assert "pte[5]=0x8000000000005067" in out2
    cols = ["event", "site", "pc", "preempt_count", "pid", "comm", "ptep", "pteval", "mm_is_init", "next_pid"]
    assert stepped[cols].equals(emulated[cols])
    assert s1["emulated"] == 0
    # 6 stores + 6 lazy NOPs + 3 sethostname NOPs (the ignored length too); push %r15, call and the
    # __set_task_comm hook are stepped
    assert s2["emulated"] == 15


def test_no_store_emulation_under_xen_pv(tmp_path, fake_kernel):
    # a PTE store under Xen PV traps to Xen: writing it from the debugger would bypass Xen
    st, df, out = run_traced(tmp_path, fake_kernel, emulate=True, xen_domain_type=1)
    assert st["emulated"] == 9  # the NOPs only
    assert "pte[5]=0x8000000000005067" in out
    assert (df["event"] == "set_pte").sum() == 6


def test_wrong_banner_is_refused(tmp_path, fake_kernel):
    with pytest.raises(KernelError, match="does not match the booted kernel"):
        run_traced(tmp_path, fake_kernel, banner=BANNER.replace("0.0.0", "9.9.9"))


def test_records_are_fixed_size(tmp_path, fake_kernel):
    run_traced(tmp_path, fake_kernel)
    size = (tmp_path / "trace" / "events.raw").stat().st_size
    assert (size - len(rf.MAGIC)) % rf.RECORD.size == 0
