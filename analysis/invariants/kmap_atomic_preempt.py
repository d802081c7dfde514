"""KMAP-ATOMIC-PREEMPT: kmap_atomic() runs with preemption disabled once it has mapped.

``kmap_atomic()`` (include/linux/highmem-internal.h) does ``preempt_disable()`` (``migrate_disable()``
on PREEMPT_RT) and ``pagefault_disable()`` before it maps; on HIGHMEM kernels the mapping is a per-CPU
fixmap slot whose PTE write is flushed at once (``arch_kmap_local_post_map()``), so the code using it
must stay on that CPU.

The probe fires at the first instruction of each inlined ``kmap_atomic()`` copy -- the ``incl
%gs:__preempt_count`` of its ``preempt_disable()`` -- *before* it executes (gdb breakpoints and TCG
exec callbacks both fire before the instruction; tracer/probes.py). So the count the mapping runs
under is the recorded one plus :data:`PROBE_PREEMPT_OFFSET`. The rule fails when that count is 0
with interrupts on: the increment wrapped (a corrupted, underflowed ``preempt_count``, e.g. an
unbalanced ``preempt_enable()`` earlier on the CPU: the masked count reads 0x7fffffff). On a healthy
kernel it passes by construction of ``kmap_atomic()``; the value of the check is the inventory of
kmap_atomic callers and their contexts it gives, and catching a recorder that probes elsewhere.

``kmap_local_page()`` only disables migration, so ``kmap_local`` events are not tested.
"""

from __future__ import annotations

import numpy as np

from tracer import schema

from ..lazystate import KMAP_ATOMIC
from .base import CheckContext, CheckResult, invariant

ID = "KMAP-ATOMIC-PREEMPT"

#: What kmap_atomic()'s own ``preempt_disable()`` adds after the probe point (``PREEMPT_OFFSET``).
PROBE_PREEMPT_OFFSET = 1


@invariant(
    id=ID,
    title="kmap_atomic is atomic",
    rule="kmap_atomic runs with preemption disabled once it has mapped",
    source="kmap_atomic() contract: preempt_disable() + pagefault_disable() before mapping "
    "(include/linux/highmem-internal.h; kmap_local rework 2020, v5.11)",
    requires=("kmap_atomic",),
    tested="kmap_atomic events",
    idle_reason="no kmap_atomic event: the workload did not copy through a temporary mapping, or the "
    "kmap_atomic probe was not armed",
    order=50,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    pos = st.positions(KMAP_ATOMIC)
    rows = st.rows(pos)
    mapped = (st.column("preempt_count")[rows].astype(np.uint64) + PROBE_PREEMPT_OFFSET) & schema.PREEMPT_MASK_BITS
    bad = (mapped == 0) & st.column("irqs_on")[rows]
    v = ctx.violations(ID, pos[bad], "kmap_atomic with preemption enabled in {site}",
                       detail="preempt_count + kmap_atomic()'s own increment is 0 (wrapped) with interrupts on")
    return CheckResult(v, checked=len(pos))
