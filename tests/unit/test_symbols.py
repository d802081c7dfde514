"""tracer.symbols: build-id, the Symbols file formats, the cache, the in-gdb resolver's store decoding.

The last tier resolves the real default kernel (skipped when it is not fetched); it needs gdb, not a VM.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tracer import elfinfo, probes, rawformat, rawtrace, schema, symbols
from tracer.errors import KernelError, ToolMissingError
from tracer.symbols import Symbols

HAVE_GCC = shutil.which("gcc") is not None and shutil.which("readelf") is not None
KERNEL_61 = Path.home() / ".cache/lazytrace/kernels/6.1.0-56-cloud-amd64"
RESOLVER = Path(symbols.__file__).resolve().parent / "gdb" / "resolve.py"


def _compile(tmp_path: Path, *flags: str) -> Path:
    src = tmp_path / "x.c"
    src.write_text("int main(void) { return 0; }\n")
    out = tmp_path / "x"
    subprocess.run(["gcc", *flags, "-o", str(out), str(src)], check=True)
    return out


@pytest.mark.skipif(not HAVE_GCC, reason="needs gcc and readelf (apt-get install gcc binutils)")
def test_build_id_matches_readelf(tmp_path):
    exe = _compile(tmp_path, "-Wl,--build-id=sha1")
    notes = subprocess.run(["readelf", "-n", str(exe)], capture_output=True, text=True, check=True).stdout
    want = re.search(r"Build ID: ([0-9a-f]+)", notes).group(1)
    assert elfinfo.build_id(exe) == want


@pytest.mark.skipif(not HAVE_GCC, reason="needs gcc (apt-get install gcc)")
def test_no_build_id_is_a_kernel_error(tmp_path):
    exe = _compile(tmp_path, "-Wl,--build-id=none")
    with pytest.raises(KernelError, match="no GNU build-id"):
        elfinfo.build_id(exe)


def test_not_elf(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(b"not an elf file at all" * 4)
    with pytest.raises(KernelError, match="not a readable ELF"):
        elfinfo.build_id(p)


def sample_symbols(**kw) -> Symbols:
    locs = [
        {"loc": 0, "probe": "native_set_pte", "event": "set_pte", "pc": 0xFFFFFFFF810735D0, "site": "native_set_pte",
         "reads": {"ptep": "rdi", "pteval": "rsi"}},
        {"loc": 1, "probe": "sethostname_marker", "event": "marker", "pc": 0xFFFFFFFF810B18F0,
         "site": "workload-start", "reads": {"marker": "rdi", "len": 15}},
        {"loc": 2, "probe": "sethostname_marker", "event": "marker", "pc": 0xFFFFFFFF810B18F0,
         "site": "workload-end", "reads": {"marker": "rdi", "len": 13}},
    ]
    prs = [{"name": "native_set_pte", "event": "set_pte", "required": True, "count": 1},
           {"name": "sethostname_marker", "event": "marker", "required": True, "count": 1},
           {"name": "kmap_atomic", "event": "kmap_atomic", "required": False, "count": 0}]
    offsets = dict.fromkeys(symbols.OFFSET_KEYS, 0)
    args = dict(build_id="ab" * 20, banner="Linux version test", locations=locs, probes=prs, offsets=offsets)
    args.update(kw)
    return Symbols(**args)


def test_views():
    s = sample_symbols()
    assert s.probe_counts() == {"native_set_pte": 1, "sethostname_marker": 1, "kmap_atomic": 0}
    assert s.absent_optional() == ["kmap_atomic"]
    assert s.missing_required() == []
    by_pc = s.by_pc()
    assert [loc["site"] for loc in by_pc[0xFFFFFFFF810B18F0]] == ["workload-start", "workload-end"]
    s.check_required()


def test_missing_required_probe_is_an_error():
    s = sample_symbols(probes=[{"name": "arch_enter_lazy_mmu_mode", "event": "lazy_enter", "required": True,
                                "count": 0}])
    with pytest.raises(KernelError, match="required probe.*arch_enter_lazy_mmu_mode"):
        s.check_required()


def test_json_round_trip():
    s = sample_symbols()
    assert Symbols.from_json(json.loads(json.dumps(s.to_json()))) == s
    doc = s.to_json()
    del doc["offsets"]["init_mm"]
    with pytest.raises(KeyError, match="init_mm"):
        Symbols.from_json(doc)


def test_write_locations_is_what_rawtrace_reads(tmp_path):
    s = sample_symbols()
    path = s.write_locations(tmp_path)
    assert path.name == schema.LOCATIONS_FILE
    locs = rawtrace.load_locations(path)
    assert locs == s.locations
    rec = rawformat.RECORD.pack(0, 1, 0xFFFFFFFF810B18F0, 0, 0, 0x80000000, 7, -1, 0, 0,
                                schema.EVENT_CODE["marker"], rawformat.F_IRQS_ON, 2, b"hostname", 0, 0)
    recs = np.frombuffer(rec, dtype=rawtrace.RAW_DTYPE)
    df = rawtrace.raw_to_frame(recs, locs)
    assert df["site"].iloc[0] == "workload-end"


def test_cache_hit_needs_no_gdb(tmp_path, monkeypatch):
    if not HAVE_GCC:
        pytest.skip("needs gcc (apt-get install gcc)")
    monkeypatch.setenv("LAZYTRACE_CACHE", str(tmp_path / "cache"))
    exe = _compile(tmp_path, "-Wl,--build-id=sha1")
    bid = elfinfo.build_id(exe)
    s = sample_symbols(build_id=bid, probe_hash=symbols.probe_table_hash())
    path = symbols.cache_path(bid)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(s.to_json()))
    # a cache hit never starts gdb: a gdb that does not exist proves it
    got = symbols.resolve(exe, gdb="no-such-gdb-lazytrace")
    assert got == s
    # a stale probe table forces a new resolve (which needs gdb)
    doc = s.to_json()
    doc["probe_hash"] = "0" * 16
    path.write_text(json.dumps(doc))
    with pytest.raises(ToolMissingError):
        symbols.resolve(exe, gdb="no-such-gdb-lazytrace")


# -- the in-gdb resolver's pure part: store decoding, on instructions gdb printed for the Debian kernels ------

@pytest.fixture(scope="module")
def resolver():
    spec = importlib.util.spec_from_file_location("lazytrace_resolve_under_test", RESOLVER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # without gdb: only the helpers are defined
    return mod


class RecordedArch:
    """gdb.Architecture.disassemble over a transcript recorded from gdb 13 on the 6.1/6.12 vmlinux."""

    def __init__(self, insns: list[tuple[int, str, int]]) -> None:
        self.insns = insns

    def disassemble(self, pc: int, count: int = 1) -> list[dict]:
        i = next(i for i, (a, _, _) in enumerate(self.insns) if a == pc)
        return [{"addr": a, "asm": s, "length": n} for a, s, n in self.insns[i:i + count]]


@pytest.mark.parametrize(("insns", "want"), [
    # 6.1 native_set_pte (out of line)
    ([(0x810735D0, "mov    %rsi,(%rdi)", 3), (0x810735D3, "jmp    0xffffffff81e01ef0 <__x86_return_thunk>", 5)],
     (0x810735D0, {"ptep": "rdi", "pteval": "rsi"})),
    # 6.1 zap_pte_range: native_pte_clear inlined
    ([(0x812BB289, "movq   $0x0,(%rbx)", 7), (0x812BB290, "mov    %rax,0x18(%rsp)", 5)],
     (0x812BB289, {"ptep": "rbx", "pteval": 0})),
    # 6.1 madvise_free_pte_range: zero displacement spelled out
    ([(0x812ED44E, "movq   $0x0,0x0(%rbp)", 8)], (0x812ED44E, {"ptep": "rbp", "pteval": 0})),
    # 6.12 unmap_page_range: the pointer is loaded first; the location moves to the store
    ([(0x813804FE, "mov    0x8(%rsp),%rax", 5), (0x81380503, "movq   $0x0,(%rax)", 7)],
     (0x81380503, {"ptep": "rax", "pteval": 0})),
    # a store with a displacement: pteval only
    ([(0x1000, "mov    %rdx,0x10(%rbx)", 4)], (0x1000, {"pteval": "rdx"})),
    # stack spills and 32-bit stores are not PTE stores
    ([(0x2000, "mov    %rax,0x18(%rsp)", 5), (0x2005, "mov    %eax,(%rbx)", 2)], None),
])
def test_find_store(resolver, insns, want):
    arch = RecordedArch(insns)
    end = insns[-1][0] + insns[-1][2]
    assert resolver.find_store(arch, insns[0][0], end) == want


def test_find_store_stops_at_the_inlined_body_end(resolver):
    arch = RecordedArch([(0x10, "nop", 1), (0x11, "mov    %rsi,(%rdi)", 3)])
    assert resolver.find_store(arch, 0x10, 0x11) is None


# -- the real default kernel (no VM; needs gdb and the fetched kernel) ---------------------------------------

@pytest.mark.skipif(not (KERNEL_61 / "vmlinux").is_file() or shutil.which("gdb") is None,
                    reason=f"needs gdb and the default kernel in {KERNEL_61} (lazytrace kernels fetch)")
def test_resolve_debian_6_1():
    s = symbols.resolve(KERNEL_61 / "vmlinux")
    assert s.banner.startswith("Linux version 6.1.0-56-cloud-amd64 ")
    assert s.pcpu_layout == "percpu_vars"
    counts = s.probe_counts()
    # DESIGN.md's measured location counts for this kernel
    assert counts["arch_enter_lazy_mmu_mode"] == 14 and counts["arch_leave_lazy_mmu_mode"] == 14
    assert counts["native_set_pte"] == 6 and counts["kmap_atomic"] == 56 and counts["kmap_local_page"] == 104
    assert counts["arch_sync_kernel_mappings"] == 1 and counts["arch_flush_lazy_mmu_mode"] == 0
    assert counts["paravirt_flush_lazy_mmu"] == 1 and counts["sethostname_marker"] == 1
    assert set(counts) == {p.name for p in probes.PROBES}
    # every set_pte location reads its operands; the out-of-line one from rdi/rsi
    sets = [loc for loc in s.locations if loc["event"] == "set_pte"]
    assert all("pteval" in loc["reads"] for loc in sets)
    assert {"ptep": "rdi", "pteval": "rsi"} in [loc["reads"] for loc in sets if not loc["inlined"]]
    apply_enters = [loc for loc in s.locations if loc["event"] == "lazy_enter" and loc["site"] == "__apply_to_page_range"]
    assert len(apply_enters) == 1 and apply_enters[0]["reads"] == {"mm_slot": "apply_mm"}
    assert [h["site"] for h in s.hooks] == ["__apply_to_page_range"]
    assert [loc["loc"] for loc in s.locations] == list(range(len(s.locations)))
    # offsets gdb printed for this build (ptype struct task_struct)
    assert s.offsets["task_pid"] == 2416 and s.offsets["task_comm"] == 2976 and s.offsets["pt_regs_si"] == 104
    assert s.offsets["pcpu_preempt_count"] == 0x1FB40
