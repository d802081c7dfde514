"""The trace schema: the one contract between the recorders (gdb, TCG plugin) and the analysis.

A trace directory holds ``trace.parquet`` whose columns and dtypes are listed in :data:`COLUMNS`.
Both recorders first write fixed-size binary records (:mod:`tracer.rawtrace`) that are converted into
this schema, so a trace means the same whichever backend recorded it.

PTE values use bit 63 (NX), so ``ptep``/``pteval`` are ``uint64`` and never ``int64``.
``preempt_count`` is masked (``PREEMPT_NEED_RESCHED``, bit 31 of the x86 per-CPU ``__preempt_count``,
is *inverted* need-resched and is split off into ``need_resched``).
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

SCHEMA_VERSION = 1

#: Event categories, in code order (the raw record stores the index).
EVENTS: tuple[str, ...] = (
    "set_pte",
    "lazy_enter",
    "lazy_leave",
    "lazy_flush",
    "kmap_atomic",
    "kmap_local",
    "sync_kernel_mappings",
    "switch",
    "marker",
)
EVENT_CODE: dict[str, int] = {name: i for i, name in enumerate(EVENTS)}

EVENT_DTYPE = pd.CategoricalDtype(categories=list(EVENTS), ordered=False)

#: x86 ``__preempt_count`` layout (arch/x86/include/asm/preempt.h).
PREEMPT_NEED_RESCHED = 0x8000_0000
PREEMPT_MASK_BITS = 0x7FFF_FFFF
#: include/linux/preempt.h field masks inside the count.
PREEMPT_MASK = 0x0000_00FF
SOFTIRQ_MASK = 0x0000_FF00
HARDIRQ_MASK = 0x000F_0000
NMI_MASK = 0x00F0_0000
IRQ_CONTEXT_MASK = SOFTIRQ_MASK | HARDIRQ_MASK | NMI_MASK

#: Column -> pandas dtype. Nullable columns use pandas' masked dtypes.
COLUMNS: dict[str, object] = {
    "seq": "uint64",
    "t_ns": "int64",
    "cpu": "int16",
    "vcpu": "int16",
    "event": EVENT_DTYPE,
    "site": "string",
    "pc": "uint64",
    "preempt_count": "uint32",
    "need_resched": "bool",
    "irqs_on": "bool",
    "pid": "int32",
    "comm": "string",
    "ptep": "UInt64",
    "pteval": "UInt64",
    "mm_is_init": "boolean",
    "next_pid": "Int32",
    "lazy_mmu": "boolean",
    "lazy_mode": "UInt8",
    "mc_pending": "UInt8",
}

#: Columns added after :data:`SCHEMA_VERSION` 1 was first written: a trace without one still loads, with the
#: column all-null (:func:`coerce`, ``analysis.load``). All three are known only under Xen PV, where the lazy
#: MMU hooks are real, and are read *before* the probed instruction runs:
#:
#: ``lazy_mode``: the guest's own per-CPU ``paravirt_lazy_mode`` (:data:`LAZY_NONE`, :data:`LAZY_MMU`,
#: :data:`LAZY_CPU`). ``lazy_mmu``: ``lazy_mode == LAZY_MMU`` (kept: the first Xen traces had only it).
#: ``mc_pending``: entries queued in the CPU's Xen multicall batch and not yet issued to the hypervisor
#: (``mc_buffer.mcidx``, ``arch/x86/xen/multicalls.c``).
OPTIONAL_COLUMNS: tuple[str, ...] = ("lazy_mmu", "lazy_mode", "mc_pending")

#: ``enum paravirt_lazy_mode`` (arch/x86/include/asm/paravirt_types.h, 6.1; ``enum xen_lazy_mode`` in 6.2+).
LAZY_NONE, LAZY_MMU, LAZY_CPU = 0, 1, 2

#: The same schema for pyarrow (what trace.parquet holds on disk).
ARROW_SCHEMA = pa.schema(
    [
        ("seq", pa.uint64()),
        ("t_ns", pa.int64()),
        ("cpu", pa.int16()),
        ("vcpu", pa.int16()),
        ("event", pa.dictionary(pa.int8(), pa.string())),
        ("site", pa.string()),
        ("pc", pa.uint64()),
        ("preempt_count", pa.uint32()),
        ("need_resched", pa.bool_()),
        ("irqs_on", pa.bool_()),
        ("pid", pa.int32()),
        ("comm", pa.string()),
        ("ptep", pa.uint64()),
        ("pteval", pa.uint64()),
        ("mm_is_init", pa.bool_()),
        ("next_pid", pa.int32()),
        ("lazy_mmu", pa.bool_()),
        ("lazy_mode", pa.uint8()),
        ("mc_pending", pa.uint8()),
    ]
)

#: Names of the files in a trace directory.
TRACE_FILE = "trace.parquet"
RAW_FILE = "events.raw"
LOCATIONS_FILE = "locations.json"
MANIFEST_FILE = "run.json"
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
GDB_LOG = "gdb.log"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def empty_frame() -> pd.DataFrame:
    """An empty events frame with the schema's dtypes."""
    return pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in COLUMNS.items()})


def coerce(df: pd.DataFrame) -> pd.DataFrame:
    """Cast a frame with all schema columns to the schema's dtypes (columns in schema order).

    A missing :data:`OPTIONAL_COLUMNS` column is added all-null.

    :raises KeyError: a required schema column is missing.
    """
    absent = [c for c in OPTIONAL_COLUMNS if c not in df.columns]
    if absent:
        df = df.assign(**{c: pd.array([pd.NA] * len(df), dtype=COLUMNS[c]) for c in absent})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise KeyError(f"missing trace columns: {', '.join(missing)}")
    return df.astype({c: COLUMNS[c] for c in COLUMNS})[list(COLUMNS)]
