"""In-gdb collector: the gdb recorder's hot path, run inside gdb's embedded Python.

Loaded by :class:`tracer.gdb_recorder.GdbRecorder` (``importlib`` from this file, module name
``lazytrace_collector``) and configured from a JSON file (:func:`start`). Standard library + ``gdb`` only,
plus :mod:`tracer.rawformat` loaded by path (it is stdlib only too).

One internal :class:`gdb.Breakpoint` per probe pc; its :meth:`stop` reads the event and returns ``False``,
so gdb resumes the guest without ever reporting a stop to MI. Per event it costs: the frame's registers
(``gs_base``, ``eflags``, the probe's operands), one ``Inferior.read_memory`` of the per-CPU words
(preempt_count and current task sit in one small span); the guest's CPU number is cached per ``gs_base``
(a CPU's per-CPU base never changes) and the current task's pid and comm per task pointer (refreshed at
every switch, and dropped by a hook at ``__set_task_comm`` when exec or ``PR_SET_NAME`` renames a task).
Each memory read is a round trip to QEMU's stub, which on a loaded host costs more than the Python: one
per event is the floor. No symbol lookups on the hot path.

Registers are read as ``gdb.parse_and_eval("$gs_base")`` (:func:`_reg`), not through
``gdb.selected_frame().read_register``: a ``gdb.Frame`` needs its frame id, and computing it unwinds frame 0,
which reads the kernel stack through the stub (one or two extra 64-byte ``m`` packets per event, seen with
``set debug remote 1``). Parsing ``$reg`` costs less than that round trip: measured with
bench/trace_throughput (icount), collector time per stop 0.28 ms -> 0.16 ms.

Records (:data:`tracer.rawformat.RECORD`) are buffered and appended to ``events.raw`` with one
``os.write`` per chunk: every :data:`FLUSH_RECORDS` records, and at least every :data:`FLUSH_INTERVAL_S`
by a flusher thread, so a SIGKILLed gdb loses at most one chunk's tail and leaves at most one torn record.

Arming (``arm``): ``"boot"`` enables every probe from the start; ``"marker"`` keeps only the marker
breakpoint enabled until the workload-start marker, and disables the others again at the end marker.

Emulation (``emulate``): at a pc whose instruction is a NOP (the boot-patched lazy MMU sites, ftrace's
patched ``__fentry__`` calls, ``endbr64``) or the decoded PTE store, the collector performs the instruction
itself (advance ``$pc``; or write the value, then advance ``$pc``) so gdb resumes without single-stepping
over the breakpoint: one debug stop per event instead of two.
"""

import importlib.util
import json
import os
import struct
import threading
import time
import traceback
from pathlib import Path

import gdb

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("lazytrace_rawformat", _HERE.parent / "rawformat.py")
rf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rf)

MASK64 = (1 << 64) - 1
FLUSH_RECORDS = 256
FLUSH_INTERVAL_S = 0.5
#: Error messages kept as evidence (the count is in ``lost``).
MAX_ERRORS = 20
EFLAGS_IF = 1 << 9
#: include/xen/xen.h enum xen_domain_type
XEN_PV_DOMAIN = 1
#: Event codes (mirrors tracer.schema.EVENTS; checked by the host against the schema at load).
EVENTS = ("set_pte", "lazy_enter", "lazy_leave", "lazy_flush", "kmap_atomic", "kmap_local",
          "sync_kernel_mappings", "switch", "marker")
EV = {name: i for i, name in enumerate(EVENTS)}

#: Instructions that are architectural no-ops at a kernel probe site (emulation: advance pc).
NOP_PREFIXES = (b"\x0f\x1f", b"\x66\x0f\x1f", b"\x66\x66\x0f\x1f", b"\x66\x2e\x0f\x1f", b"\x90",
                b"\xf3\x0f\x1e\xfa")  # nopl/nopw variants, nop, endbr64

COLLECTOR = None


def _s32(b, off):
    return struct.unpack_from("<i", b, off)[0]


def _u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


def _u64(b, off):
    return struct.unpack_from("<Q", b, off)[0]


class _Loc:
    """One location, pre-digested for the hot path."""

    __slots__ = ("loc", "event", "ptep", "pteval", "next_task", "mm", "mm_slot", "marker", "marker_len",
                 "is_marker", "insn_len", "site")

    def __init__(self, d):
        r = d.get("reads", {})
        self.loc = d["loc"]
        self.event = EV[d["event"]]
        self.ptep = r.get("ptep")
        self.pteval = r.get("pteval")
        self.next_task = r.get("next_task")
        self.mm = r.get("mm")
        self.mm_slot = r.get("mm_slot")
        self.marker = r.get("marker")
        self.marker_len = r.get("len")
        self.is_marker = d["event"] == "marker"
        self.insn_len = (d.get("insn") or {}).get("len", 0)
        self.site = d.get("site", "")


class ProbeBreakpoint(gdb.Breakpoint):
    """One pc: every location and hook there. ``stop()`` records and never stops."""

    def __init__(self, collector, pc, locs, hooks, comm_hook=False):
        super().__init__(f"*{pc:#x}", internal=True)
        self.silent = True
        self.collector = collector
        self.pc = pc
        self.locs = locs
        self.hooks = hooks
        self.comm_hook = comm_hook
        self.is_marker = any(loc.is_marker for loc in locs)

    def stop(self):
        c = self.collector
        t0 = time.perf_counter_ns()
        try:
            if c.count_only and not self.is_marker:
                if self.locs:
                    c.hits[self.pc] = c.hits.get(self.pc, 0) + 1
            else:
                c.hit(self)
        except Exception:
            c.lost += 1
            if len(c.errors) < MAX_ERRORS:
                c.errors.append(f"{self.pc:#x}: {traceback.format_exc(limit=3)}")
        c.stop_ns += time.perf_counter_ns() - t0
        c.stops += 1
        return False


class Collector:
    def __init__(self, cfg):
        self.cfg = cfg
        self.off = cfg["offsets"]
        self.count_only = cfg.get("mode") == "count"
        self.emulate = bool(cfg.get("emulate"))
        self.arm = cfg.get("arm", "marker")
        self.armed = self.arm == "boot"
        self.inf = gdb.selected_inferior()
        self.raw_path = cfg["raw_path"]
        self.flush_records = int(cfg.get("flush_records", FLUSH_RECORDS))
        self.flush_interval = float(cfg.get("flush_interval_s", FLUSH_INTERVAL_S))
        # per-CPU span: preempt_count and current task in one read
        pc_off, cur_off = self.off["pcpu_preempt_count"], self.off["pcpu_current_task"]
        self.span_lo = min(pc_off, cur_off)
        self.span_len = max(pc_off + 4, cur_off + 8) - self.span_lo
        self.span_pc = pc_off - self.span_lo
        self.span_cur = cur_off - self.span_lo
        # task span: pid .. comm
        t_pid, t_comm = self.off["task_pid"], self.off["task_comm"]
        self.task_lo = min(t_pid, t_comm)
        self.task_len = max(t_pid + 4, t_comm + 16) - self.task_lo
        self.task_pid = t_pid - self.task_lo
        self.task_comm = t_comm - self.task_lo
        self.init_mm = self.off["init_mm"]
        # Xen PV (cfg "xen": per-CPU offsets of xen_vcpu, the lazy mode, mc_buffer): the interrupt state is
        # the vcpu_info's evtchn_upcall_mask, not eflags.IF, and the lazy mode and multicall fill are recorded
        xen = cfg.get("xen") or {}
        self.xen_vcpu = xen.get("pcpu_xen_vcpu")
        self.xen_lazy = xen.get("pcpu_lazy_mode")
        self.xen_mc = xen.get("pcpu_mc_buffer")
        self.cpu_of_gs = {}
        self.vcpu_of_thread = {}
        self.slots = {}          # (slot, task) -> value
        # (pid, comm) per task pointer. Valid from a task's switch-in until its comm changes
        # (__set_task_comm: exec, PR_SET_NAME, kthread naming), which the comm hooks report; without
        # those hooks nothing is cached.
        self.comm_hooks = [int(a) for a in cfg.get("comm_hooks", [])]
        self.cache_tasks = bool(self.comm_hooks)
        self.tasks = {}
        self.dirty = set()
        self.comm_hook_hits = 0
        self.emul = {}           # pc -> ("nop", len) | ("store", len) | None
        self.stores_ok = None    # PTE stores emulable? (decided at the first classification)
        # output
        self.fd = os.open(self.raw_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self.fd).st_size
        if size == 0:
            os.write(self.fd, rf.MAGIC)
            size = len(rf.MAGIC)
        self.seq = max(0, (size - len(rf.MAGIC)) // rf.RECORD.size)
        self.buf = []
        self.lock = threading.Lock()
        self.last_flush = time.monotonic()
        self.records = 0
        self.lost = 0
        self.flushes = 0
        self.errors = []
        self.hits = {}           # pc -> count (count-only mode)
        self.loc_hits = [0] * (1 + max([d["loc"] for d in cfg["locations"]] or [0]))
        self.hook_hits = 0
        self.emulated = 0
        self.marks = []          # [seq, site, t_ns] of each marker seen
        self.stops = 0           # stop() calls (every breakpoint hit)
        self.stop_ns = 0         # time spent inside stop(): the collector's own cost
        self.bps = []
        self.marker_bps = []
        by_pc = {}
        for d in cfg["locations"]:
            by_pc.setdefault(d["pc"], ([], []))[0].append(_Loc(d))
        for h in cfg.get("hooks", []):
            by_pc.setdefault(h["pc"], ([], []))[1].append(h)
        for pc in self.comm_hooks:
            by_pc.setdefault(pc, ([], []))
        for pc, (locs, hooks) in sorted(by_pc.items()):
            bp = ProbeBreakpoint(self, pc, locs, hooks, comm_hook=pc in self.comm_hooks)
            if bp.pending or not bp.locations:
                raise gdb.GdbError(f"probe breakpoint at {pc:#x} did not resolve")
            (self.marker_bps if bp.is_marker else self.bps).append(bp)
        self._set_armed(self.armed)
        self._stop_flusher = threading.Event()
        self.flusher = threading.Thread(target=self._flush_loop, name="lazytrace-flush", daemon=True)
        self.flusher.start()

    # -- arming ----------------------------------------------------------------------------------------

    def _set_armed(self, armed):
        if armed and not self.armed:
            self.tasks.clear()  # renames while disarmed went unseen
        self.armed = armed
        for bp in self.bps:
            bp.enabled = armed

    # -- the hot path ----------------------------------------------------------------------------------

    def hit(self, bp):
        t_ns = time.monotonic_ns()
        rr = _reg
        gs = int(rr("gs_base")) & MASK64
        eflags = int(rr("eflags"))
        read = self.inf.read_memory
        thread = gdb.selected_thread()
        vcpu = self.vcpu_of_thread.get(thread.num)
        if vcpu is None:
            lwp = thread.ptid[1]
            vcpu = (lwp - 1) if lwp > 0 else (thread.num - 1)
            self.vcpu_of_thread[thread.num] = vcpu
        cpu = self.cpu_of_gs.get(gs)
        if cpu is None:
            try:
                cpu = _s32(bytes(read(gs + self.off["pcpu_cpu_number"], 4)), 0)
            except gdb.MemoryError:
                cpu = -1
            if gs:
                self.cpu_of_gs[gs] = cpu
        try:
            span = bytes(read(gs + self.span_lo, self.span_len))
            preempt_raw = _u32(span, self.span_pc)
            task = _u64(span, self.span_cur)
        except gdb.MemoryError:
            preempt_raw, task = 0, 0
        pid, comm = self.task_info(task) if task else (-1, b"")
        if bp.comm_hook:
            # __set_task_comm(tsk, ...): tsk's comm is changing; read it afresh until its next switch
            t = int(rr("rdi")) & MASK64
            self.dirty.add(t)
            self.tasks.pop(t, None)
            self.comm_hook_hits += 1
        lazy_mode = mc_pending = 0
        if self.xen_vcpu is None:
            base_flags = rf.F_IRQS_ON if eflags & EFLAGS_IF else 0
        else:
            base_flags, lazy_mode, mc_pending = self.xen_state(gs)

        for h in bp.hooks:
            self.slots[(h["slot"], task)] = int(rr(h["reads"]["value"])) & MASK64
            self.hook_hits += 1

        out = []
        for loc in bp.locs:
            flags = base_flags
            ptep = pteval = 0
            next_pid = -1
            if loc.is_marker:
                regs = int(rr(loc.marker)) & MASK64
                length = _u64(bytes(read(regs + self.off["pt_regs_si"], 8)), 0)
                if length != loc.marker_len:
                    continue
            elif not self.armed:
                continue
            if loc.ptep is not None:
                ptep = loc.ptep if isinstance(loc.ptep, int) else int(rr(loc.ptep)) & MASK64
                flags |= rf.F_PTEP
            if loc.pteval is not None:
                pteval = loc.pteval if isinstance(loc.pteval, int) else int(rr(loc.pteval)) & MASK64
                flags |= rf.F_PTEVAL
            if loc.next_task is not None:
                nt = int(rr(loc.next_task)) & MASK64
                # a switch refreshes both tasks: a freed and reused task_struct is always switched in first
                self.dirty.discard(nt)
                self.dirty.discard(task)
                self.tasks.pop(nt, None)
                next_pid = self.task_info(nt)[0]
            if loc.mm is not None:
                flags |= rf.F_MM_KNOWN
                if (int(rr(loc.mm)) & MASK64) == self.init_mm:
                    flags |= rf.F_MM_INIT
            elif loc.mm_slot is not None:
                mm = self.slots.get((loc.mm_slot, task))
                if mm is not None:
                    flags |= rf.F_MM_KNOWN
                    if mm == self.init_mm:
                        flags |= rf.F_MM_INIT
            out.append(rf.RECORD.pack(self.seq, t_ns, bp.pc, ptep, pteval, preempt_raw, pid, next_pid, cpu,
                                      vcpu, loc.event, flags, loc.loc, comm, lazy_mode, mc_pending))
            self.seq += 1
            self.loc_hits[loc.loc] += 1
            if loc.is_marker:
                self.marks.append((self.seq - 1, loc.site, t_ns))
                if self.arm == "marker":
                    self._set_armed(loc.site == "workload-start")
        if out:
            with self.lock:
                self.buf.extend(out)
                self.records += len(out)
                if len(self.buf) >= self.flush_records:
                    self._flush_locked()
        if self.emulate:
            self._emulate(bp, rr)

    def xen_state(self, gs):
        """(flags, lazy_mode, mc_pending) of a Xen PV CPU: its virtual interrupt flag (``evtchn_upcall_mask``,
        u8 at ``vcpu_info + 1``; eflags.IF is always set in a PV guest), ``paravirt_lazy_mode`` and the
        multicall buffer's ``mcidx``. Three or four stub round trips; a failed read leaves its field unknown."""
        read = self.inf.read_memory
        flags = lazy_mode = mc_pending = 0
        try:
            vcpu_info = _u64(bytes(read(gs + self.xen_vcpu, 8)), 0)
            if vcpu_info and bytes(read(vcpu_info + 1, 1))[0] == 0:
                flags |= rf.F_IRQS_ON
        except gdb.MemoryError:
            pass
        if self.xen_lazy is not None:
            try:
                lazy_mode = min(_u32(bytes(read(gs + self.xen_lazy, 4)), 0), 255)
                flags |= rf.F_LAZY_KNOWN | (rf.F_LAZY_MMU if lazy_mode == 1 else 0)
            except gdb.MemoryError:
                lazy_mode = 0
        if self.xen_mc is not None:
            try:
                mc_pending = min(_u32(bytes(read(gs + self.xen_mc, 4)), 0), 255)
                flags |= rf.F_MC_KNOWN
            except gdb.MemoryError:
                mc_pending = 0
        return flags, lazy_mode, mc_pending

    def task_info(self, task):
        """(pid, comm) of a task: cached per task pointer between switches, unless its comm is changing."""
        info = self.tasks.get(task)
        if info is None:
            try:
                tb = bytes(self.inf.read_memory(task + self.task_lo, self.task_len))
                info = (_s32(tb, self.task_pid), tb[self.task_comm:self.task_comm + 16].split(b"\0", 1)[0])
            except gdb.MemoryError:
                return -1, b""
            if self.cache_tasks and task not in self.dirty:
                self.tasks[task] = info
        return info

    # -- emulation ---------------------------------------------------------------------------------------

    def _emulate(self, bp, rr):
        kind = self.emul.get(bp.pc, False)
        if kind is False:
            kind = self.emul[bp.pc] = self._classify(bp)
        if kind is None:
            return
        what, length, loc = kind
        if what == "store":
            ptep = int(rr(loc.ptep)) & MASK64
            val = loc.pteval if isinstance(loc.pteval, int) else int(rr(loc.pteval)) & MASK64
            self.inf.write_memory(ptep, struct.pack("<Q", val))
        gdb.parse_and_eval(f"$pc = {bp.pc + length}")
        self.emulated += 1

    def _classify(self, bp):
        """How to perform the instruction at bp.pc ourselves, from the guest's live bytes; None: step it."""
        lens = {loc.insn_len for loc in bp.locs if loc.insn_len}
        if len(lens) != 1:
            return None
        length = lens.pop()
        code = bytes(self.inf.read_memory(bp.pc, length))
        if code.startswith(NOP_PREFIXES) and _nop_len(code) == length:
            return ("nop", length, None)
        if not self._stores_emulable():
            return None
        stores = [loc for loc in bp.locs
                  if loc.ptep is not None and loc.pteval is not None and not isinstance(loc.ptep, int)]
        if stores and len(bp.locs) == 1 and not bp.hooks and _is_store(code):
            return ("store", length, stores[0])
        return None

    def _stores_emulable(self):
        """PTE stores may be performed by a debug write only where the guest owns its page tables: not
        under Xen PV (``xen_domain_type == XEN_PV_DOMAIN``), where a native_set_pte store traps to Xen."""
        if self.stores_ok is None:
            addr = self.cfg.get("xen_domain_type")
            if addr is None:
                self.stores_ok = True  # no CONFIG_XEN: native
            else:
                try:
                    self.stores_ok = _u32(bytes(self.inf.read_memory(addr, 4)), 0) != XEN_PV_DOMAIN
                except gdb.MemoryError:
                    self.stores_ok = False
        return self.stores_ok

    # -- output ----------------------------------------------------------------------------------------

    def _flush_locked(self):
        if self.buf:
            os.write(self.fd, b"".join(self.buf))
            self.buf = []
            self.flushes += 1
        self.last_flush = time.monotonic()

    def flush(self):
        with self.lock:
            self._flush_locked()

    def _flush_loop(self):
        while not self._stop_flusher.wait(self.flush_interval):
            try:
                self.flush()
            except OSError as exc:  # disk full / file gone: keep evidence, the hot path will raise too
                if len(self.errors) < MAX_ERRORS:
                    self.errors.append(f"flush: {exc}")

    def stats(self):
        return {
            "events_recorded": self.records,
            "events_lost": self.lost,
            "flushes": self.flushes,
            "loc_hits": self.loc_hits,
            "hook_hits": self.hook_hits,
            "comm_hook_hits": self.comm_hook_hits,
            "task_cache": self.cache_tasks,
            "count_hits": sum(self.hits.values()),
            "stops": self.stops,
            "stop_s": self.stop_ns / 1e9,
            "emulated": self.emulated,
            "stores_emulable": self.stores_ok,
            "markers": self.marks,
            "armed": self.armed,
            "errors": self.errors,
            "cpu_of_gs": {f"{k:#x}": v for k, v in self.cpu_of_gs.items()},
        }

    def close(self):
        """Flush, remove the breakpoints, close the file. Idempotent."""
        self._stop_flusher.set()
        self.flush()
        for bp in self.bps + self.marker_bps:
            if bp.is_valid():
                bp.delete()
        self.bps, self.marker_bps = [], []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_REG_EXPR = {}


def _reg(name):
    """A register of the stopped thread (see the module docstring for why not via a gdb.Frame)."""
    expr = _REG_EXPR.get(name)
    if expr is None:
        expr = _REG_EXPR[name] = "$" + name
    return gdb.parse_and_eval(expr)


def _nop_len(code):
    """Length of the NOP at the start of code (as far as these sites go: the patched site is one NOP)."""
    if code.startswith(b"\xf3\x0f\x1e\xfa"):
        return 4
    if code[:1] == b"\x90":
        return 1 if len(code) == 1 or code[1:2] != b"\x90" else len(code) - len(code.lstrip(b"\x90"))
    return len(code)  # 0f 1f /0 with prefixes: the decoded length came from the disassembler


def _is_store(code):
    """A REX.W mov to memory: ``48/49/4c/4d 89 modrm`` (reg) or ``48/49 c7 modrm`` (imm32)."""
    return len(code) >= 3 and code[0] & 0xF8 == 0x48 and code[1] in (0x89, 0xC7)


def start(config_path):
    """Create the collector from a JSON config (see tracer.gdb_recorder). Prints a one-line JSON summary."""
    global COLLECTOR
    if COLLECTOR is not None:
        COLLECTOR.close()
    with open(config_path) as f:
        cfg = json.load(f)
    if tuple(cfg.get("events", EVENTS)) != EVENTS:
        raise gdb.GdbError("collector event table differs from tracer.schema.EVENTS")
    COLLECTOR = Collector(cfg)
    print(json.dumps({"breakpoints": len(COLLECTOR.bps) + len(COLLECTOR.marker_bps),
                      "armed": COLLECTOR.armed, "seq": COLLECTOR.seq}))


def stats():
    print(json.dumps(COLLECTOR.stats() if COLLECTOR is not None else {}))


def stop():
    """Flush and tear down; prints the final stats."""
    global COLLECTOR
    if COLLECTOR is None:
        print("{}")
        return
    COLLECTOR.close()
    print(json.dumps(COLLECTOR.stats()))
    COLLECTOR = None
