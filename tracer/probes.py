"""The probes, declared as data: where lazytrace stops (or calls back) in the guest kernel and what it reads.

One table, :data:`PROBES`, is shared by both recorders (gdb and the TCG plugin). It says *where* (a gdb
location spec: an out-of-line function, or an inline function whose every inlined copy is a site) and
*what* (the event category of :mod:`tracer.schema` and the reads beyond the common fields). It is resolved
into concrete pcs once per vmlinux build-id by :mod:`tracer.symbols`; this module is pure data and needs
neither gdb nor a kernel.

Why these probes (the paravirt lazy MMU design, ``arch/x86/include/asm/paravirt.h``):

* ``native_set_pte`` is the leaf every PTE write of a native (non-Xen) guest funnels into: the out-of-line
  function reached through ``pv_ops.mmu.set_pte`` and the copies inlined into the PTE-clearing paths
  (``native_pte_clear`` in ``zap_pte_range``, the madvise walkers).
* ``arch_enter_lazy_mmu_mode`` / ``arch_leave_lazy_mmu_mode`` are inline ``PVOP_VCALL0`` sites, patched to
  NOPs at boot on bare metal; QEMU's breakpoints still fire at them (TCG breakpoints write no int3).
* the flush: ``paravirt_flush_lazy_mmu`` (6.1; gone in 6.12, where lazy flush is Xen-only) and the inline
  ``arch_flush_lazy_mmu_mode`` where the kernel has DWARF for it (neither Debian kernel does).
* ``kmap_atomic`` / ``kmap_local_page`` sites, ``arch_sync_kernel_mappings`` and the x86-64 vmalloc sync
  ``sync_global_pgds`` (``arch/x86/mm/init_64.c``).
* ``__switch_to`` (prev = current, next from ``rsi``) so preemption/migration inside lazy regions is visible.
* ``__x64_sys_sethostname``: the workload markers (the guest's /init runs ``hostname lazytrace-start`` and
  ``hostname lazytrace-end``; the hostname length tells them apart).
* a *hook* (records nothing) at ``__apply_to_page_range`` entry that remembers the ``mm`` argument per task,
  so a lazy enter inlined into ``apply_to_pte_range`` knows whether it runs on ``init_mm``: upstream dropped
  the preemption rule for exactly that case in v6.15, 691ee97e1a9d ("mm: fix lazy mmu docs and usage").

Xen PV (optional probes: absent or never hit on a plain kernel, so native traces are unchanged):

* ``xen_set_pte`` is ``pv_ops.mmu.set_pte`` under Xen (``arch/x86/xen/mmu_pv.c``): batched into a multicall
  inside a lazy region, an immediate ``mmu_update`` hypercall outside. It never calls ``native_set_pte``, and
  the inlined ``native_set_pte`` copies (``zap_pte_range``) still fire as direct writes that trap to Xen,
  so no PTE write is counted twice. ``xen_ptep_modify_prot_commit`` is ``pv_ops.mmu.ptep_modify_prot_commit``
  (``change_pte_range``, mprotect): on native that path ends in ``native_set_pte``, under Xen in a multicall
  entry instead, so it is a ``set_pte`` here. The pv-op takes four arguments (``__ptep_modify_prot_commit``
  drops ``old_pte``): ptep = rdx, pte = rcx (measured: reading r8, the 5th argument of the C wrapper,
  gave garbage).
* The lazy pv-op targets (``paravirt_enter_lazy_mmu``, ``xen_leave_lazy_mmu``) are deliberately NOT probed:
  each is reached only through an inline ``arch_enter/leave_lazy_mmu_mode`` site that already records the
  lazy_enter/lazy_leave, so probing them would count every transition twice. Their effect is recorded
  instead: under Xen both recorders read the per-CPU ``paravirt_lazy_mode`` into the ``lazy_mode`` column of
  every event (checked against the regions by ``XEN-LAZY-STATE``).
* ``xen_mc_flush`` (the multicall flush) is not probed: it fires tens of thousands of times per run, mostly
  from context switches and TLB flushes (DESIGN.md, Xen PV facts). What it does for lazy MMU mode is recorded
  instead: both recorders read the CPU's multicall buffer fill (``mc_buffer.mcidx``) into ``mc_pending`` at
  every event, so a batch queued and later issued shows as the fill rising and going back to 0
  (``XEN-BATCH-ISSUED``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from . import schema

#: Marker sites: (site name written into the trace, hostname length passed to sethostname(2)).
MARKERS: tuple[tuple[str, int], ...] = (
    ("workload-start", len("lazytrace-start")),
    ("workload-end", len("lazytrace-end")),
)

#: The per-task slot written by the ``apply_to_page_range_mm`` hook and read by lazy enters under it.
APPLY_MM_SLOT = "apply_mm"


def _ro(d: Mapping[str, str | int] | None = None) -> Mapping[str, str | int]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Probe:
    """One probe: a gdb location spec, what it records and what it reads.

    :param name: stable name (manifest keys, ``locations.json`` ``probe`` field).
    :param spec: gdb location spec (a function name; inline functions resolve to every inlined copy).
    :param event: category from :data:`tracer.schema.EVENTS`, or ``None`` for a hook that records nothing.
    :param required: a required probe with no location makes the kernel unusable
        (:class:`tracer.errors.KernelError`); an optional one is recorded as absent (count 0).
    :param entry_reads: reads at the out-of-line function's entry, register names by the x86-64 SysV ABI
        (``{"ptep": "rdi", "pteval": "rsi"}``). Out-of-line locations are moved to the function's first byte
        so the argument registers are still intact.
    :param inline_store: at inlined copies, move the location to the single store instruction inside the
        inlined body and read its operands (``mov %rsi,(%rdi)`` -> ptep=rdi, pteval=rsi;
        ``movq $0x0,(%rbx)`` -> ptep=rbx, pteval=0). If no store can be decoded the location stays at
        the inline entry and reads nothing (ptep/pteval null).
    :param markers: for the marker probe: one location entry per (site, hostname length), same pc.
    :param hook_slot: for hooks (``event is None``): the per-task slot that ``entry_reads["value"]`` sets.
    :param mm_slot_under: lazy-enter locations inlined under one of these functions read ``mm_is_init`` from
        the :data:`APPLY_MM_SLOT` of the current task.
    :param doc: one line for humans (listed by ``lazytrace``'s summaries).
    """

    name: str
    spec: str
    event: str | None
    required: bool
    entry_reads: Mapping[str, str | int] = field(default_factory=_ro)
    inline_store: bool = False
    markers: tuple[tuple[str, int], ...] = ()
    hook_slot: str | None = None
    mm_slot_under: tuple[str, ...] = ()
    doc: str = ""

    def __post_init__(self) -> None:
        if self.event is not None and self.event not in schema.EVENT_CODE:
            raise ValueError(f"probe {self.name}: bad event {self.event!r}, want one of {schema.EVENTS}")
        if self.event is None and not self.hook_slot:
            raise ValueError(f"probe {self.name}: a hook (event None) needs hook_slot")
        object.__setattr__(self, "entry_reads", _ro(self.entry_reads))

    @property
    def is_hook(self) -> bool:
        return self.event is None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "spec": self.spec,
            "event": self.event,
            "required": self.required,
            "entry_reads": dict(self.entry_reads),
            "inline_store": self.inline_store,
            "markers": [list(m) for m in self.markers],
            "hook_slot": self.hook_slot,
            "mm_slot_under": list(self.mm_slot_under),
        }


PROBES: tuple[Probe, ...] = (
    Probe("native_set_pte", "native_set_pte", "set_pte", True,
          entry_reads={"ptep": "rdi", "pteval": "rsi"}, inline_store=True,
          doc="every native PTE write: the pv_ops.mmu.set_pte target and its inlined copies"),
    Probe("xen_set_pte", "xen_set_pte", "set_pte", False,
          entry_reads={"ptep": "rdi", "pteval": "rsi"},
          doc="Xen PV pv_ops.mmu.set_pte: multicall-batched in a lazy region, a hypercall outside"),
    Probe("xen_ptep_modify_prot_commit", "xen_ptep_modify_prot_commit", "set_pte", False,
          entry_reads={"ptep": "rdx", "pteval": "rcx"},
          doc="Xen PV pv_ops.mmu.ptep_modify_prot_commit (mprotect's PTE write): a multicall entry"),
    Probe("arch_enter_lazy_mmu_mode", "arch_enter_lazy_mmu_mode", "lazy_enter", True,
          mm_slot_under=("__apply_to_page_range",),
          doc="lazy MMU enter (inline PVOP site, NOP-patched on bare metal)"),
    Probe("arch_leave_lazy_mmu_mode", "arch_leave_lazy_mmu_mode", "lazy_leave", True,
          doc="lazy MMU leave (inline PVOP site)"),
    Probe("paravirt_flush_lazy_mmu", "paravirt_flush_lazy_mmu", "lazy_flush", False,
          doc="lazy MMU flush (out of line; removed from x86 paravirt after 6.1)"),
    Probe("arch_flush_lazy_mmu_mode", "arch_flush_lazy_mmu_mode", "lazy_flush", False,
          doc="inline lazy MMU flush sites, where the kernel has DWARF for them"),
    Probe("kmap_atomic", "kmap_atomic", "kmap_atomic", False,
          doc="kmap_atomic sites (inline; the first instruction is the preempt_count increment)"),
    Probe("kmap_local_page", "kmap_local_page", "kmap_local", False,
          doc="kmap_local_page sites (inline)"),
    Probe("arch_sync_kernel_mappings", "arch_sync_kernel_mappings", "sync_kernel_mappings", False,
          doc="kernel page-table sync after a vmalloc/ioremap change (mm/vmalloc.c, mm/memory.c)"),
    Probe("sync_global_pgds", "sync_global_pgds", "sync_kernel_mappings", False,
          doc="x86-64 vmalloc sync: copy kernel PGD/P4D entries into every pgd on pgd_list"),
    Probe("__switch_to", "__switch_to", "switch", True,
          entry_reads={"next_task": "rsi"},
          doc="context switch: pid is prev (current), next_pid from next_p (rsi)"),
    Probe("sethostname_marker", "__x64_sys_sethostname", "marker", True,
          entry_reads={"marker": "rdi"}, markers=MARKERS,
          doc="workload start/end markers: hostname length = u64 at (struct pt_regs *)rdi + pt_regs_si"),
    Probe("apply_to_page_range_mm", "__apply_to_page_range", None, False,
          entry_reads={"value": "rdi"}, hook_slot=APPLY_MM_SLOT,
          doc="hook: remember __apply_to_page_range's mm per task (lazy enter under it: mm_is_init)"),
)

PROBES_BY_NAME: Mapping[str, Probe] = MappingProxyType({p.name: p for p in PROBES})
assert len(PROBES_BY_NAME) == len(PROBES)


def probe_table_json(probes: tuple[Probe, ...] = PROBES) -> list[dict]:
    """The probe table as JSON-able dicts (the input of the in-gdb resolver, and part of the cache key)."""
    return [p.to_json() for p in probes]
