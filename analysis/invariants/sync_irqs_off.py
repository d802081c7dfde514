"""SYNC-IRQS-OFF: kernel-mapping synchronisation runs with interrupts off.

``arch_sync_kernel_mappings()`` copies new top-level kernel entries into every ``pgd`` on the
``pgd_list`` (``sync_global_pgds()`` on x86_64). An interrupt that walks the half-updated tables, or a
lazy batch of the interrupted task, must not observe the copy midway (seed rule 4 of the catalogue).

On x86_64 this rule is rarely exercised: ``preallocate_vmalloc_pages()`` (arch/x86/mm/init_64.c,
"x86/mm: Pre-allocate P4D/PUD pages for vmalloc area", v5.9) populates the level that would need
syncing (``ARCH_PAGE_TABLE_SYNC_MASK`` is ``PGTBL_P4D_MODIFIED`` with 4-level paging) at boot, so
vmalloc and ioremap never call ``arch_sync_kernel_mappings()`` afterwards. 32-bit kernels sync at the
PMD level and do exercise it.
"""

from __future__ import annotations

from ..lazystate import SYNC
from .base import CheckContext, CheckResult, invariant

ID = "SYNC-IRQS-OFF"


@invariant(
    id=ID,
    title="kernel-mapping sync with interrupts off",
    rule="kernel-mapping sync (arch_sync_kernel_mappings, vmalloc sync sites) runs with irqs off",
    source="vmalloc kernel-mapping sync (arch_sync_kernel_mappings(), mm/vmalloc.c and "
    "__apply_to_page_range(), v5.8) as the lazy design requires for kernel tables",
    requires=("sync_kernel_mappings",),
    tested="sync_kernel_mappings events",
    idle_reason="no kernel-mapping sync event: x86_64 pre-allocates the vmalloc page-table levels at boot "
    "(preallocate_vmalloc_pages(), v5.9), so arch_sync_kernel_mappings() never runs after boot",
    order=60,
)
def check(ctx: CheckContext) -> CheckResult:
    st = ctx.state
    pos = st.positions(SYNC)
    bad = st.column("irqs_on")[st.rows(pos)]
    v = ctx.violations(ID, pos[bad], "kernel-mapping sync with interrupts on in {site}",
                       detail="irqs_on during kernel page-table synchronisation")
    return CheckResult(v, checked=len(pos))
