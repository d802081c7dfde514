"""Raw event records: the fixed-size binary format both recorders stream to ``events.raw``.

Standard library only: this module is imported inside gdb's embedded Python, and its layout is
mirrored by the TCG plugin (``tracer/plugin/lazytrace.c``, ``struct lt_record``). Change both or neither.

File layout: :data:`MAGIC` (8 bytes), then records of :data:`RECORD.size` bytes, little-endian.
A recorder killed mid-write leaves at most one truncated record at the end; readers drop it and
count it.

Record fields (in order):

=============  ======  ==================================================================
seq            u64     recording order (per file, from 0)
t_ns           i64     host CLOCK_MONOTONIC in ns at the event
pc             u64     guest pc of the probe hit
ptep           u64     valid if ``F_PTEP``
pteval         u64     valid if ``F_PTEVAL``
preempt_raw    u32     raw per-CPU ``__preempt_count`` (need-resched bit still inside)
pid            i32     current task's pid
next_pid       i32     switch only: the next task's pid, else -1
cpu            i16     guest's own CPU number (per-CPU ``cpu_number``), -1 unknown
vcpu           i16     QEMU vCPU index
event          u8      index into :data:`tracer.schema.EVENTS`
flags          u8      ``F_*`` bits
loc            u16     index into ``locations.json`` (gives probe and site function)
comm           16s     current task's comm, NUL padded (TASK_COMM_LEN)
lazy_mode      u8      valid if ``F_LAZY_KNOWN``: per-CPU ``paravirt_lazy_mode`` (0 none, 1 MMU, 2 CPU)
mc_pending     u8      valid if ``F_MC_KNOWN``: Xen multicall entries queued, not yet issued
(padding)      2 bytes zero
=============  ======  ==================================================================

``lazy_mode`` and ``mc_pending`` sit in what was padding: a record written before they existed holds zeros
there, and ``F_MC_KNOWN`` clear; its lazy mode is then known only as ``F_LAZY_MMU`` (MMU or not).
"""

import struct

MAGIC = b"LZTRAW01"
RECORD = struct.Struct("<QqQQQIiihhBBH16sBB2x")
assert RECORD.size == 80

F_IRQS_ON = 0x01
F_PTEP = 0x02
F_PTEVAL = 0x04
F_MM_KNOWN = 0x08
F_MM_INIT = 0x10
#: The per-CPU ``paravirt_lazy_mode`` was read (Xen PV only: on a native guest the lazy ops are NOP-patched
#: and the variable stays 0, so it is not read there). Trace column ``lazy_mmu`` is null without it.
F_LAZY_KNOWN = 0x20
#: ... and it was ``PARAVIRT_LAZY_MMU`` (1); ``PARAVIRT_LAZY_CPU`` (2, inside a context switch) and
#: ``PARAVIRT_LAZY_NONE`` (0) both leave this clear. The full value is in the ``lazy_mode`` byte.
F_LAZY_MMU = 0x40
#: The per-CPU Xen multicall buffer's fill (``mc_buffer.mcidx``) was read into ``mc_pending`` (Xen PV only).
F_MC_KNOWN = 0x80
