"""Kernel functions the checks treat specially, with the kernel code that justifies each set.

``site`` in a trace is the *containing* function of the probe location: for an inlined hook it is the
outermost function the compiler inlined it into (``zap_pte_range`` is usually inlined into
``unmap_page_range``), so each set lists both the defining function and the usual inlining parents.
Names were checked against Debian's linux-source-6.1 (6.1.192); 6.12 uses the same callers.
"""

from __future__ import annotations

#: Lazy MMU callers that only ever operate on ``init_mm`` when the recorder could not read the mm.
#:
#: ``apply_to_pte_range()`` (mm/memory.c; inlined into ``__apply_to_page_range``) is the one 6.1 caller of
#: ``arch_enter_lazy_mmu_mode()`` that runs on kernel page tables. Its x86 callers on ``init_mm`` are
#: ``vmap_pfn()``, kasan's shadow population and Xen's grant tables/xenbus; the user-mm callers are
#: Xen privcmd/gntdev/xlate and SGX, none of which a plain QEMU guest runs. So a region entered there
#: whose ``mm_is_init`` is unknown counts as a kernel-mapping region. A known ``mm_is_init`` wins.
#: ``vmap_pte_range``/``vunmap_pte_range`` are listed for kernels that batch vmalloc PTE updates in lazy
#: mode (arm64 did so after 6.12); on 6.1 they never enter lazy mode.
KERNEL_LAZY_SITES: frozenset[str] = frozenset(
    {
        "__apply_to_page_range",
        "apply_to_pte_range",
        "apply_to_page_range",
        "apply_to_existing_page_range",
        "vmap_pte_range",
        "vunmap_pte_range",
        "vmap_pages_pte_range",
    }
)

#: Lazy MMU callers that work on a user ``mm`` under its PTE lock (``pte_offset_map_lock``), so
#: preempt_count >= 1 on a non-RT kernel: the eleven 6.1 callers besides ``apply_to_pte_range`` and the
#: functions they are inlined into.
USER_LAZY_SITES: frozenset[str] = frozenset(
    {
        # mm/memory.c
        "zap_pte_range", "zap_pmd_range", "zap_pud_range", "zap_p4d_range", "unmap_page_range",
        "copy_pte_range", "copy_pmd_range", "copy_pud_range", "copy_p4d_range", "copy_page_range",
        "remap_pte_range", "remap_pfn_range_notrack", "remap_pfn_range",
        # mm/mremap.c
        "move_ptes", "move_page_tables",
        # mm/mprotect.c
        "change_pte_range", "change_pmd_range", "change_protection_range", "change_protection",
        # mm/madvise.c
        "madvise_cold_or_pageout_pte_range", "madvise_free_pte_range",
        # mm/vmscan.c (multi-gen LRU)
        "walk_pte_range", "walk_pmd_range_locked", "walk_pmd_range", "lru_gen_look_around",
        # mm/migrate_device.c
        "migrate_vma_collect_pmd",
    }
)

#: Functions whose ``set_pte`` writes a kernel mapping whatever region they happen in: the vmalloc PTE
#: writers and the kmap_local/kmap_atomic slot writers (mm/highmem.c, HIGHMEM kernels only).
KERNEL_SET_PTE_SITES: frozenset[str] = frozenset(
    {
        "vmap_pte_range",
        "vunmap_pte_range",
        "vmap_pages_pte_range",
        "__kmap_local_pfn_prot",
        "__kmap_local_page_prot",
        "kunmap_local_indexed",
        "__kmap_local_sched_in",
        "__kmap_local_sched_out",
        "__set_fixmap",
        "native_set_fixmap",
        "set_pte_vaddr",
        "set_pte_vaddr_p4d",
        "set_pte_vaddr_pud",
    }
)

#: Where a ``set_pte`` from interrupt context may legitimately land while its CPU is in lazy MMU mode
#: (rule IRQ-IN-LAZY). On HIGHMEM kernels ``kmap_atomic()`` from an interrupt writes a fixmap PTE and
#: flushes it itself (``arch_kmap_local_post_map()`` is ``arch_flush_lazy_mmu_mode()``,
#: arch/x86/include/asm/highmem.h); the vmalloc sync paths copy top-level entries into every pgd
#: (``sync_global_pgds()`` on x86_64, ``vmalloc_sync_one()``/``__arch_sync_kernel_mappings()`` on
#: 32-bit). Any other set_pte from an interrupt would be batched into the interrupted task's lazy batch.
IRQ_ALLOWED_SET_PTE_SITES: frozenset[str] = frozenset(
    {
        "kmap_atomic",
        "kmap_atomic_prot",
        "kmap_atomic_pfn",
        "__kmap_local_pfn_prot",
        "__kmap_local_page_prot",
        "kunmap_local_indexed",
        "__kunmap_atomic",
        "__kmap_local_sched_in",
        "__kmap_local_sched_out",
        "arch_sync_kernel_mappings",
        "__arch_sync_kernel_mappings",
        "sync_global_pgds",
        "sync_global_pgds_l4",
        "sync_global_pgds_l5",
        "vmalloc_sync_one",
        "vmalloc_fault",
    }
)
