"""IRQ-IN-LAZY: a set_pte from interrupt context while the CPU is lazy happens only where it is allowed.

An interrupt that arrives while its CPU is in lazy MMU mode runs inside the interrupted task's batch:
a ``set_pte`` it makes is queued with the task's updates and is not visible when the handler returns.
The kernel allows this only where the update is flushed on the spot or is a sync of kernel top-level
entries: the kmap_atomic/kmap_local slot writers (``arch_kmap_local_post_map()`` is
``arch_flush_lazy_mmu_mode()`` on x86) and the vmalloc sync paths (catalogue seeds C, D). The list is
:data:`analysis.sites.IRQ_ALLOWED_SET_PTE_SITES`.

Interrupt context is any of the ``preempt_count`` SOFTIRQ, HARDIRQ or NMI fields
(include/linux/preempt.h). Tested: the set_pte events made from interrupt context inside a lazy
region. The violation blames the set_pte's own function (the handler path doing the write).
"""

from __future__ import annotations

from tracer import schema

from ..sites import IRQ_ALLOWED_SET_PTE_SITES
from .base import CheckContext, CheckResult, invariant, region_sites

ID = "IRQ-IN-LAZY"


@invariant(
    id=ID,
    title="set_pte from interrupt context in lazy mode",
    rule="a set_pte from interrupt context (HARDIRQ/SOFTIRQ/NMI bits) while the CPU is lazy occurs only at "
    "kmap_atomic / vmalloc-sync sites",
    source="2007 lazy MMU design: interrupt handlers must not rely on batched updates; kmap_atomic flushes "
    "its own PTE (arch_kmap_local_post_map(), arch/x86/include/asm/highmem.h)",
    requires=("lazy_enter", "set_pte"),
    tested="set_pte events from interrupt context inside lazy regions",
    idle_reason="no set_pte from interrupt context while a CPU was lazy",
    order=80,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    lsp = st.lazy_set_ptes
    in_irq = (lsp.col("preempt_count") & schema.IRQ_CONTEXT_MASK) != 0
    sp, reg, rows = lsp.pos[in_irq], lsp.reg[in_irq], lsp.rows[in_irq]
    bad = ~st.site_in(rows, IRQ_ALLOWED_SET_PTE_SITES)
    detail = [f"interrupted lazy region entered in {s}" for s in region_sites(st, reg[bad])]
    if "mc_pending" in st.df.columns:
        # Xen PV: paravirt_get_lazy_mode() answers NONE in interrupt context, so this update is a hypercall
        # issued at once, ahead of whatever the interrupted region still has queued in the multicall batch
        mc, known = st.masked("mc_pending")
        bad_rows = rows[bad]
        for i, (k, n) in enumerate(zip(known[bad_rows], mc[bad_rows], strict=True)):
            if k:
                detail[i] += (f"; Xen: issued at once, ahead of {int(n)} multicall entries the region still "
                              "has queued" if n else "; Xen: issued at once (the region's batch was empty)")
    v = ctx.violations(ID, sp[bad], "set_pte from interrupt context in {site} while the CPU is lazy",
                       related_pos=st.r_enter[reg[bad]], detail=detail)
    idle = ""
    if not len(sp):
        idle = (f"no set_pte from interrupt context while a CPU was lazy ({len(lsp)} set_pte inside "
                "lazy regions, all in task context)")
    return CheckResult(v, checked=len(sp), idle=idle)
