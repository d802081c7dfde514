"""Per-CPU lazy MMU state of a trace, computed once with numpy and shared by every check.

The paravirt lazy MMU mode is per CPU (``paravirt_lazy_mode`` is a per-CPU variable,
arch/x86/kernel/paravirt.c), so everything here works on *CPU streams*: the events of one guest CPU
in ``seq`` order. :class:`LazyState` sorts the trace once by (cpu, seq) -- "sorted space", where
``order[pos]`` is the frame row of position ``pos`` -- and derives the lazy regions from the
``lazy_enter``/``lazy_leave`` events without a Python loop:

* a **region** starts at a ``lazy_enter`` whose previous enter/leave on its CPU is a ``lazy_leave`` (or
  none) and ends at the next ``lazy_leave`` on that CPU; it covers every event of the CPU in between
  (the enter and the leave included);
* an enter while a region is open is a **nested enter** (it stays inside the open region);
* a leave with no open region is an **orphan leave**;
* a region with no leave before the end of its CPU stream is **open at the end**;
* in a *windowed* trace (armed at a marker, not at boot) a CPU whose first enter/leave is a leave was
  already lazy when the window opened: that leave closes a **virtual region** opened at the CPU's
  first event (``open_at_start``), whose enter (and so its task and preempt_count) is unknown.

The guest CPU number (``cpu``) names the stream; an event whose CPU could not be read (``cpu = -1``)
is put on its QEMU vCPU, which matched the guest CPU on every event measured (DESIGN.md).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tracer import schema

from .sites import KERNEL_LAZY_SITES, USER_LAZY_SITES

_C = schema.EVENT_CODE
SET_PTE = _C["set_pte"]
ENTER = _C["lazy_enter"]
LEAVE = _C["lazy_leave"]
FLUSH = _C["lazy_flush"]
KMAP_ATOMIC = _C["kmap_atomic"]
KMAP_LOCAL = _C["kmap_local"]
SYNC = _C["sync_kernel_mappings"]
SWITCH = _C["switch"]
MARKER = _C["marker"]

#: Where Xen PV saves a task's lazy MMU state at a context switch: the inlined
#: ``arch_leave_lazy_mmu_mode()`` in ``paravirt_start_context_switch()`` (arch/x86/kernel/paravirt.c; 6.12:
#: ``xen_start_context_switch()``, arch/x86/xen/enlighten_pv.c), recorded as a ``lazy_leave`` by the task
#: switched out, which gets ``TIF_LAZY_MMU_UPDATES``.
XEN_SAVE_SITES: frozenset[str] = frozenset({"paravirt_start_context_switch", "xen_start_context_switch"})
#: Where Xen PV restores it: the inlined ``arch_enter_lazy_mmu_mode()`` in ``paravirt_end_context_switch()``
#: (6.12: ``xen_end_context_switch()``), called from ``__switch_to`` for a next task with
#: ``TIF_LAZY_MMU_UPDATES``. It runs before ``current_task`` is updated, so the ``lazy_enter`` carries the
#: *previous* task's pid/comm: the task it belongs to is the ``next_pid`` of the switch just before it
#: (:meth:`LazyState.switched_in`).
XEN_RESTORE_SITES: frozenset[str] = frozenset({"paravirt_end_context_switch", "xen_end_context_switch"})

#: Values of the region ``mm`` column.
MM_KINDS = ("kernel", "user", "unknown")
MM_DTYPE = pd.CategoricalDtype(list(MM_KINDS))


def event_codes(df: pd.DataFrame) -> np.ndarray:
    """``int8`` schema event codes (:data:`tracer.schema.EVENT_CODE`) of every row; -1 for a missing one."""
    cat = df["event"].array
    codes = np.asarray(cat.codes)
    if list(cat.categories) == list(schema.EVENTS[: len(cat.categories)]):
        return codes.astype(np.int8, copy=False)
    lut = np.array([_C.get(c, -1) for c in cat.categories] + [-1], dtype=np.int8)
    return lut[codes]


def cpu_key(df: pd.DataFrame) -> np.ndarray:
    """The CPU stream of every row: ``cpu``, or ``vcpu`` where the guest CPU number is unknown."""
    cpu = df["cpu"].to_numpy()
    if len(cpu) and cpu.min() < 0:
        cpu = np.where(cpu >= 0, cpu, df["vcpu"].to_numpy())
    return cpu


def site_codes(site: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Factorise a site column: ``(codes int32 per row, -1 for NA; unique names as an object array)``."""
    arr = site.array
    if isinstance(arr, pd.arrays.ArrowStringArray):
        enc = pc.dictionary_encode(pa.chunked_array(arr._pa_array).combine_chunks())
        idx = enc.indices if enc.indices.null_count == 0 else enc.indices.fill_null(-1)
        codes = idx.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        names = np.array(enc.dictionary.to_pylist(), dtype=object)
        return codes, names
    codes, names = pd.factorize(site, use_na_sentinel=True)
    return codes.astype(np.int32, copy=False), np.asarray(names, dtype=object)


class LazyState:
    """The lazy regions of one trace and the index arrays the checks need.

    :param df: events with the schema's dtypes (any row order; ``seq`` decides).
    :param windowed: the trace starts at a marker, not at boot (see module docstring).

    Attributes in sorted space (positions, ``int64``): ``order``, ``grp_start``/``grp_end`` (per CPU,
    ``grp_end`` exclusive), ``nested_pos``, ``orphan_pos``, ``head_leave_pos``, and the region arrays
    ``r_start``/``r_end`` (inclusive), ``r_enter``/``r_leave`` (-1 when absent), ``r_closed``,
    ``r_virtual``, ``r_grp``, all in region order (CPU, then start).
    """

    def __init__(self, df: pd.DataFrame, *, windowed: bool = False) -> None:
        self.df = df
        self.windowed = windowed
        self.n = n = len(df)
        self.ev = event_codes(df)
        key = cpu_key(df)
        seq = df["seq"].to_numpy()
        base = None
        if n > 1 and not (seq[1:] > seq[:-1]).all():
            base = np.argsort(seq, kind="stable")
            key = key[base]
        if n:
            lo = int(key.min())
            counts_all = np.bincount(key.astype(np.int64) - lo)
            present = np.flatnonzero(counts_all)
            cpus, counts = present + lo, counts_all[present]
        else:
            cpus, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(cpus) <= 1:
            order = np.arange(n) if base is None else base
        else:
            order = np.concatenate([np.flatnonzero(key == c) for c in cpus])
            if base is not None:
                order = base[order]
        self.order = order
        self.cpus = cpus
        self.grp_end = np.cumsum(counts)
        self.grp_start = self.grp_end - counts
        self.ev_s = self.ev[order]
        self._build_regions()

    # -- construction -------------------------------------------------------------------------------

    def _grp_of(self, pos: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.grp_start, pos, side="right") - 1

    def cpu_end(self, pos: np.ndarray) -> np.ndarray:
        """For each sorted position, the end (exclusive) of its CPU's run of positions: a later position
        ``q`` is on the same CPU iff ``q < cpu_end(pos)``."""
        return self.grp_end[self._grp_of(np.asarray(pos, dtype=np.int64))]

    def _build_regions(self) -> None:
        ev_s = self.ev_s
        el_pos = np.flatnonzero((ev_s == ENTER) | (ev_s == LEAVE))
        m = len(el_pos)
        el_enter = ev_s[el_pos] == ENTER
        el_grp = self._grp_of(el_pos)
        first = np.ones(m, bool)
        first[1:] = el_grp[1:] != el_grp[:-1]
        prev_enter = np.zeros(m, bool)
        prev_enter[1:] = el_enter[:-1]
        prev_enter &= ~first
        starts = np.flatnonzero(el_enter & ~prev_enter)
        orphan = ~el_enter & ~prev_enter
        head = orphan & first if self.windowed else np.zeros(m, bool)
        self.nested_pos = el_pos[el_enter & prev_enter]
        self.orphan_pos = el_pos[orphan & ~head]
        self.head_leave_pos = el_pos[head]

        # The leave that closes a region is the first leave after its start (everything in between is a
        # nested enter), provided it is still on the same CPU.
        next_leave = np.where(~el_enter, np.arange(m), m)
        next_leave = np.minimum.accumulate(next_leave[::-1])[::-1] if m else next_leave
        j = next_leave[starts]
        jj = np.minimum(j, max(m - 1, 0))
        closed = (j < m) & (el_grp[jj] == el_grp[starts]) if m else np.zeros(0, bool)
        g = el_grp[starts]
        real_start = el_pos[starts]
        real_leave = np.where(closed, el_pos[jj] if m else 0, -1)
        real_end = np.where(closed, real_leave, self.grp_end[g] - 1)

        h = np.flatnonzero(head)
        hg = el_grp[h]
        start = np.concatenate([real_start, self.grp_start[hg]])
        k = np.argsort(start, kind="stable")
        self.r_start = start[k]
        self.r_end = np.concatenate([real_end, el_pos[h]])[k]
        self.r_enter = np.concatenate([real_start, np.full(len(h), -1, np.int64)])[k]
        self.r_leave = np.concatenate([real_leave, el_pos[h]])[k]
        self.r_closed = np.concatenate([closed, np.ones(len(h), bool)])[k]
        self.r_virtual = np.concatenate([np.zeros(len(starts), bool), np.ones(len(h), bool)])[k]
        self.r_grp = np.concatenate([g, hg])[k]

    # -- per-event lookups ---------------------------------------------------------------------------

    @property
    def n_regions(self) -> int:
        return len(self.r_start)

    @cached_property
    def region_of_pos(self) -> np.ndarray:
        """``int32`` region index of every sorted position, -1 outside any region."""
        n, r_count = self.n, self.n_regions
        if r_count == 0:
            return np.full(n, -1, np.int32)
        # Regions are disjoint intervals [r_start, r_end]: write +(r+1) at each start and -(r+1) just past
        # each end, and the running sum is r+1 inside region r and 0 outside.
        ids = np.arange(1, r_count + 1, dtype=np.int32)
        delta = np.zeros(n + 1, np.int32)
        delta[self.r_start] = ids
        np.add.at(delta, self.r_end + 1, -ids)  # an end+1 may coincide with the next start
        reg = np.cumsum(delta[:n], dtype=np.int32)
        reg -= 1
        return reg

    def positions(self, code: int) -> np.ndarray:
        """Sorted positions of every event with schema code ``code``."""
        cache = self.__dict__.setdefault("_positions", {})
        if code not in cache:
            cache[code] = np.flatnonzero(self.ev_s == code)
        return cache[code]

    def rows(self, pos: np.ndarray) -> np.ndarray:
        """Frame rows of sorted positions."""
        return self.order[pos]

    def column(self, name: str) -> np.ndarray:
        """A non-nullable numeric/bool column as a numpy array (no copy)."""
        cache = self.__dict__.setdefault("_columns", {})
        if name not in cache:
            cache[name] = self.df[name].to_numpy()
        return cache[name]

    def masked(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A nullable column as ``(values, valid)`` numpy arrays (computed once per column)."""
        cache = self.__dict__.setdefault("_masked", {})
        if name not in cache:
            arr = self.df[name].array
            cache[name] = (np.asarray(arr._data), ~np.asarray(arr._mask))
        return cache[name]

    @cached_property
    def lazy_set_ptes(self) -> LazySetPtes:
        """The set_pte events inside lazy regions (shared by the checks that look at them)."""
        sp = self.positions(SET_PTE)
        reg = self.region_of_pos[sp]
        inside = reg >= 0
        sp, reg = sp[inside], reg[inside]
        return LazySetPtes(self, sp, reg, self.rows(sp))

    @cached_property
    def sites(self) -> tuple[np.ndarray, np.ndarray]:
        """``(codes per row, names)`` of the ``site`` column (see :func:`site_codes`)."""
        return site_codes(self.df["site"])

    @cached_property
    def _site_arrow(self) -> pa.ChunkedArray | None:
        """The ``site`` column as Arrow strings when it is Arrow-backed (loaded traces), else None."""
        arr = self.df["site"].array
        if isinstance(arr, pd.arrays.ArrowStringArray):
            return pa.chunked_array(arr._pa_array)
        return None

    def site_in(self, rows: np.ndarray, names: frozenset[str]) -> np.ndarray:
        """Whether the site of each row is one of ``names``.

        Arrow-backed sites are tested with ``pyarrow.compute.is_in`` on just the rows when they are few,
        else on the whole column once per name set (no dictionary of the 10M strings is built).
        """
        rows = np.asarray(rows, dtype=np.int64)
        col = self._site_arrow
        if col is None:
            codes, uniq = self.sites
            lut = np.array([u in names for u in uniq] + [False], dtype=bool)
            c = codes[rows]
            return lut[np.where(c >= 0, c, len(uniq))]
        value_set = pa.array(sorted(names), pa.string())
        if len(rows) * 4 < self.n:
            hit = pc.is_in(col.take(pa.array(rows)), value_set=value_set)
            return hit.to_numpy(zero_copy_only=False).astype(bool, copy=False)
        cache = self.__dict__.setdefault("_site_in", {})
        if names not in cache:
            hit = pc.is_in(col, value_set=value_set)  # nulls are not in the set
            cache[names] = np.asarray(hit.to_numpy(zero_copy_only=False), dtype=bool)
        return cache[names][rows]

    def site_names(self, rows: np.ndarray) -> np.ndarray:
        """Site names of rows as an object array (``"?"`` where unknown)."""
        rows = np.asarray(rows, dtype=np.int64)
        col = self._site_arrow
        if col is None:
            codes, uniq = self.sites
            names = np.append(uniq, "?").astype(object)
            c = codes[rows]
            return names[np.where(c >= 0, c, len(uniq))]
        out = np.asarray(col.take(pa.array(rows)).to_numpy(zero_copy_only=False), dtype=object)
        out[pd.isna(out)] = "?"
        return out

    def cpu_of_pos(self, pos: np.ndarray) -> np.ndarray:
        return self.cpus[self._grp_of(pos)]

    def next_of(self, pos: np.ndarray, codes: tuple[int, ...]) -> np.ndarray:
        """For each sorted position, the next position on the same CPU whose event is in ``codes``; -1 if none."""
        key = ("next", codes)
        cache = self.__dict__.setdefault("_positions", {})
        if key not in cache:
            cache[key] = np.flatnonzero(np.isin(self.ev_s, codes))
        return self.next_in(pos, cache[key])

    def next_in(self, pos: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """For each sorted position, the first of ``targets`` (ascending sorted positions) after it on the
        same CPU; -1 if none."""
        pos = np.asarray(pos, dtype=np.int64)
        if len(targets) == 0 or len(pos) == 0:
            return np.full(len(pos), -1, np.int64)
        j = np.searchsorted(targets, pos, side="right")
        nxt = targets[np.minimum(j, len(targets) - 1)]
        same = (j < len(targets)) & (nxt < self.cpu_end(pos))
        return np.where(same, nxt, -1)

    def prev_in(self, pos: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """For each sorted position, the last of ``targets`` (ascending sorted positions) before it on the
        same CPU; -1 if none."""
        pos = np.asarray(pos, dtype=np.int64)
        if len(targets) == 0 or len(pos) == 0:
            return np.full(len(pos), -1, np.int64)
        j = np.searchsorted(targets, pos, side="left") - 1
        prv = targets[np.maximum(j, 0)]
        same = (j >= 0) & (prv >= self.grp_start[self._grp_of(pos)])
        return np.where(same, prv, -1)

    def switched_in(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The task switched in on each position's CPU most recently before it: ``(pid, known)``, the
        ``next_pid`` of the last ``switch`` event before it on the same CPU (unknown: no switch before it on
        its CPU, or the switch's ``next_pid`` is null).

        This is the task a Xen restore enter (:data:`XEN_RESTORE_SITES`) belongs to: that ``lazy_enter`` runs
        inside ``__switch_to`` before ``current_task`` changes, so its own ``pid`` is the previous task's.
        """
        pos = np.asarray(pos, dtype=np.int64)
        sw = self.prev_in(pos, self.positions(SWITCH))
        has = sw >= 0
        if not has.any():
            return np.zeros(len(pos), np.int32), has
        nxt, ok = self.masked("next_pid")
        rows = self.rows(np.where(has, sw, 0))
        return np.where(has, nxt[rows], 0).astype(np.int32), has & ok[rows]

    # -- regions -------------------------------------------------------------------------------------

    @cached_property
    def r_task(self) -> tuple[np.ndarray, np.ndarray]:
        """The task each region belongs to: ``(pid int32, known)`` per region.

        The enter's ``pid``, except for a region opened by a Xen restore enter (:data:`XEN_RESTORE_SITES`),
        which belongs to the task switched in just before it (:meth:`switched_in`; the enter's own pid
        when that is unknown). Unknown for a virtual region (open at the window start).
        """
        r_count = self.n_regions
        known = ~self.r_virtual
        pid = np.zeros(r_count, np.int32)
        if r_count == 0 or not known.any():
            return pid, known
        enter = self.r_enter[known]
        rows = self.rows(enter)
        pid_k = self.column("pid")[rows].astype(np.int32, copy=True)
        restore = self.site_in(rows, XEN_RESTORE_SITES)
        if restore.any():
            owner, ok = self.switched_in(enter[restore])
            sub = pid_k[restore]
            sub[ok] = owner[ok]
            pid_k[restore] = sub
        pid[known] = pid_k
        return pid, known

    @cached_property
    def r_mm(self) -> np.ndarray:
        """Region mm kind codes into :data:`MM_KINDS` (0 kernel, 1 user, 2 unknown).

        ``mm_is_init`` read at the enter decides when the recorder had it; otherwise the enter's site
        does (:data:`analysis.sites.KERNEL_LAZY_SITES`, :data:`analysis.sites.USER_LAZY_SITES`);
        virtual regions (no enter) are unknown.
        """
        out = np.full(self.n_regions, 2, np.int8)
        real = ~self.r_virtual
        rows = self.order[self.r_enter[real]]
        vals, valid = self.masked("mm_is_init")
        known, init = valid[rows], vals[rows]
        kind = np.where(self.site_in(rows, KERNEL_LAZY_SITES), 0,
                        np.where(self.site_in(rows, USER_LAZY_SITES), 1, 2))
        kind = np.where(known, np.where(init, 0, 1), kind)
        out[real] = kind
        return out

    def region_counts(self, code: int) -> np.ndarray:
        """Number of events of ``code`` inside each region."""
        reg = self.region_of_pos[self.positions(code)]
        return np.bincount(reg[reg >= 0], minlength=self.n_regions)

    def event_counts(self) -> dict[str, int]:
        """Events per category, every schema category present (zero when absent)."""
        counts = np.bincount(self.ev.view(np.uint8), minlength=256)  # -1 (unknown) lands in 255
        return {name: int(counts[i]) for i, name in enumerate(schema.EVENTS)}


class LazySetPtes:
    """The set_pte events inside lazy regions: sorted positions ``pos``, region indices ``reg``, frame
    ``rows``, and columns gathered at those rows on first use (:meth:`col`)."""

    def __init__(self, st: LazyState, pos: np.ndarray, reg: np.ndarray, rows: np.ndarray) -> None:
        self.st, self.pos, self.reg, self.rows = st, pos, reg, rows
        self._cols: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.pos)

    def col(self, name: str) -> np.ndarray:
        if name not in self._cols:
            self._cols[name] = self.st.column(name)[self.rows]
        return self._cols[name]

    @cached_property
    def enter(self) -> np.ndarray:
        """Sorted position of each one's region enter (-1 for a region open at the window start)."""
        return self.st.r_enter[self.reg]
