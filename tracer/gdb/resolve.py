"""In-gdb probe resolver: run by :func:`tracer.symbols.resolve` as ``gdb -batch -nx -x resolve.py vmlinux``.

Runs inside gdb's embedded Python (stdlib + ``gdb`` only; it does not import :mod:`tracer`). Input and
output are JSON files named by the environment: ``LAZYTRACE_RESOLVE_IN`` holds
``{"probes": tracer.probes.probe_table_json()}``, ``LAZYTRACE_RESOLVE_OUT`` receives the resolved
symbols (see :class:`tracer.symbols.Symbols`) or ``{"error": traceback}``.

No target is attached: every answer comes from the vmlinux's DWARF and sections.
"""

import json
import os
import re
import traceback

try:
    import gdb
except ImportError:  # imported by the unit tests for its pure helpers
    gdb = None

MASK64 = (1 << 64) - 1

#: A plain 64-bit store to memory, AT&T syntax as gdb prints it: ``mov %rsi,(%rdi)``,
#: ``movq $0x0,0x0(%rbp)``. No index register (a PTE pointer is a plain base).
STORE_RE = re.compile(
    r"^movq?\s+(?P<src>%r\w+|\$-?(?:0x[0-9a-f]+|\d+)),(?P<disp>-?(?:0x[0-9a-f]+|\d+))?\(%(?P<base>r\w+)\)\s*$"
)
#: 64-bit general registers (a store from %eax is not a PTE store).
REGS64 = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"}
#: How far into an inlined body to look for its store.
STORE_SCAN_INSNS = 12


def _int(expr):
    return int(gdb.parse_and_eval(expr)) & MASK64


def _first(*exprs):
    """The first expression gdb can evaluate (kernel versions moved per-CPU variables around)."""
    errors = []
    for e in exprs:
        try:
            return _int(e), e
        except gdb.error as exc:
            errors.append(f"{e}: {exc}")
    raise gdb.error("none of: " + "; ".join(errors))


def resolve_offsets():
    """Per-CPU offsets, struct offsets and addresses the recorders need (see tracer.symbols)."""
    off = {}
    # 6.1: plain per-CPU variables; v6.2+ moved them into struct pcpu_hot,
    # 7d7be9d0be1a ("x86/percpu: Move current_task to percpu hot section") and friends.
    off["pcpu_preempt_count"], pc_expr = _first("(unsigned long)&__preempt_count",
                                                "(unsigned long)&pcpu_hot.preempt_count")
    off["pcpu_cpu_number"], _ = _first("(unsigned long)&cpu_number", "(unsigned long)&pcpu_hot.cpu_number")
    off["pcpu_current_task"], _ = _first("(unsigned long)&current_task",
                                         "(unsigned long)&pcpu_hot.current_task")
    layout = "pcpu_hot" if "pcpu_hot" in pc_expr else "percpu_vars"
    # Looking up struct task_struct is gdb's slow part (~15 s): it happens once per build-id.
    for key, expr in (("task_pid", "pid"), ("task_comm", "comm"), ("task_mm", "mm")):
        off[key] = _int(f"(unsigned long)&((struct task_struct *)0)->{expr}")
    off["task_comm_len"] = _int("sizeof(((struct task_struct *)0)->comm)")
    off["pt_regs_si"] = _int("(unsigned long)&((struct pt_regs *)0)->si")
    off["pt_regs_di"] = _int("(unsigned long)&((struct pt_regs *)0)->di")
    off["init_mm"] = _int("(unsigned long)&init_mm")
    off["linux_banner"] = _int("(unsigned long)&linux_banner")
    off["per_cpu_offset"] = _int("(unsigned long)&__per_cpu_offset")
    return off, layout


def read_banner(addr):
    raw = bytes(gdb.selected_inferior().read_memory(addr, 512))
    return raw.split(b"\0", 1)[0].decode("latin-1")


def chain_at(pc):
    """Function blocks containing pc, innermost (inlined) first, outermost (the real function) last."""
    out = []
    b = gdb.block_for_pc(pc)
    while b is not None:
        if b.function is not None:
            out.append(b)
        b = b.superblock
    return out


def insn_at(arch, pc):
    d = arch.disassemble(pc, count=1)[0]
    return {"asm": d["asm"], "len": d["length"]}


def find_store(arch, pc, end):
    """The first plain store in [pc, end): (pc, reads) or None."""
    addr = pc
    for d in arch.disassemble(pc, count=STORE_SCAN_INSNS):
        addr = d["addr"]
        if addr >= end:
            break
        m = STORE_RE.match(d["asm"].strip())
        if not m or m.group("base") == "rsp":
            continue
        src = m.group("src")
        reads = {}
        if src.startswith("$"):
            reads_val = int(src[1:], 0) & MASK64
        else:
            reads_val = src[1:]
            if reads_val not in REGS64:
                continue
        disp = int(m.group("disp"), 0) if m.group("disp") else 0
        if disp == 0:
            reads["ptep"] = m.group("base")
        reads["pteval"] = reads_val
        return addr, reads
    return None


def resolve_probe(arch, probe):
    """All locations of one probe: list of dicts without ``loc`` (assigned by the caller)."""
    try:
        bp = gdb.Breakpoint(probe["spec"], internal=True)
    except gdb.error:
        return []
    try:
        if bp.pending:
            return []
        pcs = sorted({int(loc.address) & MASK64 for loc in bp.locations})
    finally:
        bp.delete()
    func = probe["spec"]
    out = []
    seen = set()
    for pc in pcs:
        chain = chain_at(pc)
        names = [b.function.name for b in chain]
        site = names[-1] if names else func
        entry = {"probe": probe["name"], "event": probe["event"], "site": site, "inlined": len(chain) > 1,
                 "chain": names, "reads": {}}
        if len(chain) == 1 and names[0] == func:
            # Out of line: stop at the first byte, where the argument registers are intact.
            pc = int(chain[0].function.value().address) & MASK64
            entry["reads"] = dict(probe["entry_reads"])
        elif probe["inline_store"]:
            body = next((b for b in chain if b.function.name == func), None)
            found = find_store(arch, pc, body.end if body is not None else pc + 64)
            if found is not None:
                pc, entry["reads"] = found
        if probe["mm_slot_under"] and any(n in probe["mm_slot_under"] for n in names):
            entry["reads"]["mm_slot"] = "apply_mm"
        if pc in seen:
            continue
        seen.add(pc)
        entry["pc"] = pc
        sal = gdb.find_pc_line(pc)
        entry["file"] = sal.symtab.filename if sal.symtab else None
        entry["line"] = sal.line
        entry["insn"] = insn_at(arch, pc)
        out.append(entry)
    return out


def main():
    with open(os.environ["LAZYTRACE_RESOLVE_IN"]) as f:
        req = json.load(f)
    gdb.execute("set breakpoint pending off", to_string=True)
    gdb.execute("set pagination off", to_string=True)
    arch = gdb.selected_inferior().architecture()
    offsets, layout = resolve_offsets()
    result = {"gdb_version": gdb.VERSION, "banner": read_banner(offsets["linux_banner"]),
              "pcpu_layout": layout, "offsets": offsets, "probes": [], "locations": [], "hooks": []}
    for probe in req["probes"]:
        locs = resolve_probe(arch, probe)
        result["probes"].append({"name": probe["name"], "event": probe["event"], "required": probe["required"],
                                 "count": len(locs)})
        for entry in locs:
            if probe["event"] is None:
                entry["hook"] = len(result["hooks"])
                entry["slot"] = probe["hook_slot"]
                del entry["event"]
                result["hooks"].append(entry)
            elif probe["markers"]:
                for site, length in probe["markers"]:
                    e = dict(entry, site=site, reads=dict(entry["reads"], len=length))
                    e["loc"] = len(result["locations"])
                    result["locations"].append(e)
            else:
                entry["loc"] = len(result["locations"])
                result["locations"].append(entry)
    return result


if __name__ == "__main__" and gdb is not None:
    try:
        _result = main()
    except Exception:  # everything goes back to the host as evidence
        _result = {"error": traceback.format_exc()}
    with open(os.environ["LAZYTRACE_RESOLVE_OUT"], "w") as _f:
        json.dump(_result, _f)
