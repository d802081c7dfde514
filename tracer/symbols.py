"""Resolve :data:`tracer.probes.PROBES` against a vmlinux, once per GNU build-id, and cache the answer.

:func:`resolve` reads the vmlinux's build-id from its ELF note (no gdb), and on a cache miss runs
``gdb -batch`` with the in-gdb resolver :file:`tracer/gdb/resolve.py` (breakpoint locations, DWARF inline
chains, store decoding, struct offsets). The result is cached as JSON in
``cache_dir()/symbols/<build_id>.json`` and returned as a frozen :class:`Symbols`.

The ``reads`` vocabulary (both recorders follow it mechanically)
----------------------------------------------------------------
Every record carries the common fields (cpu = u32 at ``gs_base + offsets["pcpu_cpu_number"]``, vcpu,
preempt_count raw = u32 at ``gs_base + offsets["pcpu_preempt_count"]``, irqs_on = bit 9 of ``eflags``, pc,
current = u64 at ``gs_base + offsets["pcpu_current_task"]``, its pid (s32 at ``+task_pid``) and comm (16 bytes
at ``+task_comm``)). ``gs_base`` is the kernel's per-CPU base (gdb returns it signed: mask to 64 bits).
Beyond those, a location's ``reads`` dict may hold:

``"ptep": REG | INT``, ``"pteval": REG | INT``
    the value of that register (gdb register name, e.g. ``"rdi"``) or that immediate. ``native_set_pte``'s
    out-of-line entry reads ``rdi``/``rsi``; inlined copies are moved to their store instruction and read
    its operands (``movq $0x0,(%rbx)`` -> ``{"ptep": "rbx", "pteval": 0}``). Absent: null in the trace.
``"next_task": REG``
    ``__switch_to``: the next ``struct task_struct *``; ``next_pid`` = s32 at ``REG + offsets["task_pid"]``.
``"mm": REG``
    an ``mm_struct *`` in a register: ``mm_is_init = (REG == offsets["init_mm"])`` (no current site uses it).
``"mm_slot": "apply_mm"``
    ``mm_is_init`` comes from the per-task slot ``apply_mm`` (see hooks below): known only if the current
    task's slot is set, then ``slot == offsets["init_mm"]``. Lazy enters inlined into
    ``__apply_to_page_range`` use this: the mm lives in no fixed register at the NOP-patched site, but it is
    ``__apply_to_page_range``'s first argument. Keyed by the current task pointer (not the vCPU) because on
    ``preempt=full`` the task can be preempted, and migrate, between the entry and the lazy enter.
``"marker": REG, "len": N``
    ``REG`` is a ``struct pt_regs *``; hostname length = u64 at ``REG + offsets["pt_regs_si"]``. The
    location fires only when the length equals ``N`` (two entries share the pc: sites ``workload-start``
    and ``workload-end``); any other length records nothing.

Hooks (:attr:`Symbols.hooks`) record nothing: at ``pc`` they set per-task slot ``slot`` (key: current task
pointer) to the value of ``reads["value"]``. They are written to ``locations.json`` under ``"hooks"``.

Each location also carries ``insn`` (``{"asm", "len"}``: the instruction at ``pc`` in the vmlinux file;
lazy sites show the unpatched ``call *pv_ops+...`` that boot patches to a 6-byte NOP), ``chain`` (the
inline chain, innermost first), ``inlined``, ``file`` and ``line``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import elfinfo, paths, probes, schema
from .errors import GdbError, KernelError, ToolMissingError

log = logging.getLogger(__name__)

#: Bump when the cached JSON's shape or the resolver's logic changes.
FORMAT_VERSION = 1
#: A cold ``gdb -batch`` resolve: ~2 s to load the 6.1 vmlinux index, ~16 s for ``struct task_struct``.
RESOLVE_TIMEOUT_S = 300.0
RESOLVER_SCRIPT = Path(__file__).resolve().parent / "gdb" / "resolve.py"

#: Offsets every Symbols has (see the module docstring).
OFFSET_KEYS = (
    "pcpu_preempt_count", "pcpu_cpu_number", "pcpu_current_task", "task_pid", "task_comm", "task_comm_len",
    "task_mm", "pt_regs_si", "pt_regs_di", "init_mm", "linux_banner", "per_cpu_offset",
)

def probe_table_hash(table: list[dict] | None = None) -> str:
    """Short hash of the probe table (part of the cache validity check)."""
    doc = json.dumps(table if table is not None else probes.probe_table_json(), sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Symbols:
    """Resolved probes and offsets for one vmlinux build.

    :ivar locations: one dict per recorded probe location (``loc`` = its index; see the module docstring).
    :ivar probes: ``[{"name", "event", "required", "count"}]`` in :data:`tracer.probes.PROBES` order;
        ``count`` is the number of distinct pcs (0: an optional probe that is absent).
    :ivar hooks: locations that record nothing but set a per-task slot.
    :ivar offsets: per-CPU offsets, struct offsets and addresses (:data:`OFFSET_KEYS`).
    """

    build_id: str
    banner: str
    locations: list[dict]
    probes: list[dict]
    offsets: dict[str, int]
    hooks: list[dict] = field(default_factory=list)
    pcpu_layout: str = ""
    gdb_version: str = ""
    vmlinux: str = ""
    probe_hash: str = ""

    # -- views ---------------------------------------------------------------------------------------------

    def probe_counts(self) -> dict[str, int]:
        """``{probe name: location count}`` for the manifest."""
        return {p["name"]: p["count"] for p in self.probes}

    def missing_required(self) -> list[str]:
        return [p["name"] for p in self.probes if p["required"] and p["count"] == 0]

    def absent_optional(self) -> list[str]:
        return [p["name"] for p in self.probes if not p["required"] and p["count"] == 0]

    def by_pc(self) -> dict[int, list[dict]]:
        """``{pc: [locations]}``: a pc can carry several locations (the two marker sites)."""
        out: dict[int, list[dict]] = defaultdict(list)
        for loc in self.locations:
            out[loc["pc"]].append(loc)
        return dict(out)

    def check_required(self) -> None:
        """:raises KernelError: a required probe has no location in this kernel."""
        missing = self.missing_required()
        if missing:
            raise KernelError(
                f"vmlinux {self.vmlinux} (build-id {self.build_id}) has no location for required probe(s) "
                f"{', '.join(missing)}; found: "
                + ", ".join(f"{p['name']}={p['count']}" for p in self.probes))

    # -- files ---------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format": FORMAT_VERSION, "build_id": self.build_id, "banner": self.banner,
            "vmlinux": self.vmlinux, "gdb_version": self.gdb_version, "probe_hash": self.probe_hash,
            "pcpu_layout": self.pcpu_layout, "offsets": self.offsets, "probes": self.probes,
            "locations": self.locations, "hooks": self.hooks,
        }

    @classmethod
    def from_json(cls, doc: dict) -> Symbols:
        missing = [k for k in OFFSET_KEYS if k not in doc.get("offsets", {})]
        if missing:
            raise KeyError(f"symbols JSON lacks offsets: {', '.join(missing)}")
        return cls(build_id=doc["build_id"], banner=doc["banner"], locations=doc["locations"],
                   probes=doc["probes"], offsets=doc["offsets"], hooks=doc.get("hooks", []),
                   pcpu_layout=doc.get("pcpu_layout", ""), gdb_version=doc.get("gdb_version", ""),
                   vmlinux=doc.get("vmlinux", ""), probe_hash=doc.get("probe_hash", ""))

    def write_locations(self, trace_dir: Path) -> Path:
        """Write ``locations.json`` (read by :func:`tracer.rawtrace.load_locations`) into a trace directory."""
        path = Path(trace_dir) / schema.LOCATIONS_FILE
        doc = {"build_id": self.build_id, "banner": self.banner, "offsets": self.offsets,
               "probes": self.probes, "locations": self.locations, "hooks": self.hooks}
        _write_json_atomic(path, doc)
        return path


def _write_json_atomic(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_path(build_id: str) -> Path:
    return paths.cache_dir() / "symbols" / f"{build_id}.json"


def _load_cached(path: Path, probe_hash: str) -> Symbols | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable symbol cache %s: %s", path, exc)
        return None
    if doc.get("format") != FORMAT_VERSION or doc.get("probe_hash") != probe_hash:
        log.info("symbol cache %s is stale (format/probe table changed): resolving again", path)
        return None
    try:
        return Symbols.from_json(doc)
    except KeyError as exc:
        log.warning("ignoring symbol cache %s: %s", path, exc)
        return None


def run_resolver(vmlinux: Path, *, gdb: str = "gdb", timeout: float = RESOLVE_TIMEOUT_S,
                 table: list[dict] | None = None) -> dict:
    """Run the in-gdb resolver on ``vmlinux`` (no cache) and return its raw JSON answer.

    :raises ToolMissingError: gdb is not installed.
    :raises GdbError: gdb failed, timed out, or the resolver raised (the traceback is in the message).
    """
    gdb_path = shutil.which(gdb)
    if gdb_path is None:
        raise ToolMissingError(f"gdb not found ({gdb!r}): apt-get install gdb")
    table = table if table is not None else probes.probe_table_json()
    with tempfile.TemporaryDirectory(prefix="lazytrace-resolve-") as tmp:
        req, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        req.write_text(json.dumps({"probes": table}))
        argv = [gdb_path, "-batch", "-nx", "-x", str(RESOLVER_SCRIPT), str(vmlinux)]
        env = dict(os.environ, LAZYTRACE_RESOLVE_IN=str(req), LAZYTRACE_RESOLVE_OUT=str(out))
        log.info("resolving probes in %s with gdb (once per build-id)", vmlinux)
        try:
            proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise GdbError(f"gdb resolver timed out after {timeout:.0f} s on {vmlinux}", argv=argv,
                           log_tail=_tail(exc.stderr)) from exc
        try:
            doc = json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            raise GdbError(f"gdb resolver produced no answer for {vmlinux}", argv=argv,
                           returncode=proc.returncode, log_tail=_tail(proc.stdout + proc.stderr)) from exc
    if "error" in doc:
        raise GdbError(f"gdb resolver failed on {vmlinux}:\n{doc['error']}", argv=argv,
                       returncode=proc.returncode, log_tail=_tail(proc.stderr))
    return doc


def _tail(text: str | bytes | None, lines: int = 20) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def resolve(vmlinux: Path, *, gdb: str = "gdb", refresh: bool = False, check: bool = True) -> Symbols:
    """Resolve the probe table against ``vmlinux``, using the per-build-id cache.

    :param refresh: ignore a cached answer.
    :param check: raise if a required probe has no location.
    :raises KernelError: no vmlinux, no build-id, or (``check``) a required probe is missing.
    :raises GdbError: the gdb resolver failed.
    """
    vmlinux = Path(vmlinux)
    if not vmlinux.is_file():
        raise KernelError(f"vmlinux not found: {vmlinux}")
    build_id = elfinfo.build_id(vmlinux)
    table = probes.probe_table_json()
    phash = probe_table_hash(table)
    path = cache_path(build_id)
    syms = None if refresh else _load_cached(path, phash)
    if syms is None:
        doc = run_resolver(vmlinux, gdb=gdb, table=table)
        doc.update(format=FORMAT_VERSION, build_id=build_id, vmlinux=str(vmlinux), probe_hash=phash)
        syms = Symbols.from_json(doc)
        _write_json_atomic(path, syms.to_json())
        log.info("cached symbols for build-id %s in %s", build_id, path)
    if check:
        syms.check_required()
    return syms
