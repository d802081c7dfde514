"""Synthetic traces shaped like real ones, generated with numpy (for the benchmark, development and tests).

Each CPU runs a random sequence of *segments*, like a guest running a fork/exec/munmap workload:

* user lazy regions (``zap_pte_range``, ``copy_pte_range``, ... under the PTE lock: preempt_count 1)
  holding ~48 set_pte on average, sometimes a lazy_flush, rarely a set_pte from an interrupt at a
  kmap site;
* kernel lazy regions from ``__apply_to_page_range`` on ``init_mm`` holding ~8 set_pte, entered with
  preempt_count 0 as 6.1 with ``preempt=full`` does (``kernel_preempt_zero``): the known upstream
  LAZY-PREEMPT / LAZY-SETPTE-ATOMIC violations of 691ee97e1a9d;
* set_pte runs outside lazy mode (page faults), context switches, kmap_atomic and kmap_local events.

About 95% of the events are set_pte. CPUs are interleaved by host time, and ``seq`` is the global order.
Apart from ``kernel_preempt_zero`` the traces obey every invariant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from tracer import schema

_C = schema.EVENT_CODE

#: Segment kinds, their probabilities and what they emit.
_USER, _KERNEL, _OUTSIDE, _SWITCH, _KMAP_ATOMIC, _KMAP_LOCAL = range(6)
_SEGMENT_P = np.array([0.35, 0.01, 0.34, 0.20, 0.05, 0.05])

SITES: tuple[str, ...] = (
    "zap_pte_range", "unmap_page_range", "copy_pte_range", "move_ptes", "change_pte_range",  # user lazy
    "__apply_to_page_range",                                                                   # kernel lazy
    "native_set_pte", "do_anonymous_page", "wp_page_copy", "do_set_pte",                       # outside
    "__switch_to",
    "copy_user_highpage", "clear_user_highpage",                                              # kmap_atomic
    "copy_page_from_iter", "memcpy_from_page",                                                # kmap_local
    "__kmap_local_pfn_prot",                                                                  # irq set_pte
)
_SITE = {s: i for i, s in enumerate(SITES)}
_USER_SITES = np.array([_SITE[s] for s in SITES[:5]])
_OUTSIDE_SITES = np.array([_SITE[s] for s in SITES[6:10]])
_KMAP_ATOMIC_SITES = np.array([_SITE["copy_user_highpage"], _SITE["clear_user_highpage"]])
_KMAP_LOCAL_SITES = np.array([_SITE["copy_page_from_iter"], _SITE["memcpy_from_page"]])
COMMS: tuple[str, ...] = ("init", "sh", "busybox", "workload", "kworker/u4:1", "insmod", "ksoftirqd/0", "cat")


@dataclass(frozen=True)
class SynthConfig:
    """Shape of a synthetic trace.

    :param n_events: about how many events (each CPU gets ``n_events / cpus``, cut at a segment end).
    :param cpus: CPU streams.
    :param seed: RNG seed (the same config always gives the same trace).
    :param kernel_preempt_zero: enter ``__apply_to_page_range`` regions with preempt_count 0 (6.1 reality).
    :param irq_set_pte_rate: chance that a set_pte inside a user region comes from an interrupt at a kmap
        site (allowed by IRQ-IN-LAZY).
    :param xen: shape it like a Xen PV trace (:func:`xen_state`): the per-CPU ``lazy_mode`` and multicall
        fill ``mc_pending`` known at every event, the task-context PTE writes of each region at
        ``xen_set_pte`` and queued, so the Xen rules are exercised (and hold).
    """

    n_events: int = 100_000
    cpus: int = 4
    seed: int = 0
    kernel_preempt_zero: bool = True
    irq_set_pte_rate: float = 0.0005
    xen: bool = False


def synth_events(cfg: SynthConfig = SynthConfig()) -> pd.DataFrame:
    """Generate an events frame with the schema's dtypes (strings as ``string[pyarrow]``, like loaded traces)."""
    rng = np.random.default_rng(cfg.seed)
    per_cpu = [_cpu_stream(rng, cfg, c, cfg.n_events // cfg.cpus) for c in range(cfg.cpus)]
    cols = {k: np.concatenate([p[k] for p in per_cpu]) for k in per_cpu[0]}
    order = np.argsort(cols["t_ns"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    n = len(order)
    ev = cols["event"]
    is_switch = ev == _C["switch"]
    mm_known = cols["mm_known"]
    df = pd.DataFrame(
        {
            "seq": np.arange(n, dtype=np.uint64),
            "t_ns": cols["t_ns"],
            "cpu": cols["cpu"],
            "vcpu": cols["cpu"],
            "event": pd.Categorical.from_codes(ev, dtype=schema.EVENT_DTYPE),
            "site": _strings(cols["site"], SITES),
            "pc": cols["pc"],
            "preempt_count": cols["preempt_count"],
            "need_resched": np.zeros(n, bool),
            "irqs_on": cols["irqs_on"],
            "pid": cols["pid"],
            "comm": _strings(cols["comm"], COMMS),
            "ptep": pd.arrays.IntegerArray(cols["ptep"], ev != _C["set_pte"]),
            "pteval": pd.arrays.IntegerArray(cols["pteval"], ev != _C["set_pte"]),
            "mm_is_init": pd.arrays.BooleanArray(cols["mm_init"], ~mm_known),
            "next_pid": pd.arrays.IntegerArray(cols["next_pid"], ~is_switch),
            "lazy_mmu": pd.arrays.BooleanArray(np.zeros(n, bool), np.ones(n, bool)),  # native: unknown
            "lazy_mode": pd.arrays.IntegerArray(np.zeros(n, np.uint8), np.ones(n, bool)),
            "mc_pending": pd.arrays.IntegerArray(np.zeros(n, np.uint8), np.ones(n, bool)),
        }
    )
    return xen_state(df) if cfg.xen else df


def xen_state(df: pd.DataFrame) -> pd.DataFrame:
    """The same events as a Xen PV dom0 would record them (a new frame).

    Per CPU: ``lazy_mode`` MMU from after a region's enter through its leave, CPU (2) at switches, NONE
    elsewhere; every task-context set_pte inside a region moves to ``xen_set_pte`` (Xen's pv-op, which
    queues in lazy mode) and from the first of them to the leave one multicall entry is pending
    (``mc_pending`` 1, consecutive updates extend one ``mmu_update``), none outside.
    """
    from .lazystate import LazyState  # the generator's own regions, per CPU

    st = LazyState(df)
    n = st.n
    reg = st.region_of_pos
    inside = reg >= 0
    opening = np.zeros(n, bool)
    opening[inside] = st.r_enter[reg[inside]] == np.flatnonzero(inside)
    ev = st.ev_s
    task_ctx = (st.column("preempt_count")[st.order] & schema.IRQ_CONTEXT_MASK) == 0
    xsp = inside & (ev == _C["set_pte"]) & task_ctx
    mode = np.where(inside & ~opening, schema.LAZY_MMU, schema.LAZY_NONE).astype(np.uint8)
    mode[ev == _C["switch"]] = schema.LAZY_CPU
    # pending from a region's first xen_set_pte on: a running count of them within the region
    pend = np.zeros(n, np.uint8)
    if inside.any():
        r = reg[inside]
        first = np.full(st.n_regions, n, np.int64)
        np.minimum.at(first, reg[xsp], np.flatnonzero(xsp))
        pos = np.flatnonzero(inside)
        pend[pos] = (pos > first[r]).astype(np.uint8)
    out = df.copy()
    rows = st.order  # sorted position -> frame row
    site = out["site"].to_numpy(dtype=object)
    site[rows[xsp]] = "xen_set_pte"
    out["site"] = pd.array(site, dtype="string[pyarrow]")
    lm = np.empty(n, np.uint8)
    lm[rows] = mode
    mc = np.empty(n, np.uint8)
    mc[rows] = pend
    out["lazy_mode"] = pd.arrays.IntegerArray(lm, np.zeros(n, bool))
    out["lazy_mmu"] = pd.arrays.BooleanArray(lm == schema.LAZY_MMU, np.zeros(n, bool))
    out["mc_pending"] = pd.arrays.IntegerArray(mc, np.zeros(n, bool))
    return out


def _strings(codes: np.ndarray, names: tuple[str, ...]) -> pd.arrays.ArrowStringArray:
    arr = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(names)))
    return pd.arrays.ArrowStringArray(arr.cast(pa.string()))


def _cpu_stream(rng: np.random.Generator, cfg: SynthConfig, cpu: int, n: int) -> dict[str, np.ndarray]:
    mean = 19.9  # events per segment for _SEGMENT_P and the lengths below
    S = int(n / mean * 1.2) + 16
    kind = rng.choice(6, size=S, p=_SEGMENT_P)
    length = np.ones(S, np.int64)
    u, k, o = kind == _USER, kind == _KERNEL, kind == _OUTSIDE
    length[u] = 2 + rng.geometric(1 / 48, u.sum())
    length[k] = 2 + rng.geometric(1 / 8, k.sum())
    length[o] = rng.geometric(1 / 6, o.sum())
    ends = np.cumsum(length)
    S = max(int(np.searchsorted(ends, n, side="right")), 1)
    kind, length, ends = kind[:S], length[:S], ends[:S]
    total = int(ends[-1])
    seg = np.repeat(np.arange(S), length)
    off = np.arange(total) - (ends - length)[seg]
    L = length[seg]
    kd = kind[seg]
    region = (kd == _USER) | (kd == _KERNEL)

    ev = np.full(total, _C["set_pte"], np.int8)
    ev[region & (off == 0)] = _C["lazy_enter"]
    ev[region & (off == L - 1)] = _C["lazy_leave"]
    flush_seg = rng.random(S) < 0.05
    ev[region & (off == L - 2) & (off > 1) & flush_seg[seg]] = _C["lazy_flush"]
    ev[kd == _SWITCH] = _C["switch"]
    ev[kd == _KMAP_ATOMIC] = _C["kmap_atomic"]
    ev[kd == _KMAP_LOCAL] = _C["kmap_local"]

    # One task per stretch between switches; consecutive tasks differ.
    n_tasks = int((kind == _SWITCH).sum()) + 1
    pids = (100 + 10 * cpu + np.cumsum(rng.integers(1, 37, n_tasks)) % 37).astype(np.int32)
    task = np.cumsum(kind == _SWITCH)
    is_sw = ev == _C["switch"]
    pid = pids[task[seg] - is_sw]
    next_pid = np.where(is_sw, pids[np.minimum(task[seg], n_tasks - 1)], -1).astype(np.int32)

    seg_site = np.zeros(S, np.int16)
    seg_site[kind == _USER] = rng.choice(_USER_SITES, (kind == _USER).sum())
    seg_site[kind == _KERNEL] = _SITE["__apply_to_page_range"]
    seg_site[kind == _OUTSIDE] = rng.choice(_OUTSIDE_SITES, (kind == _OUTSIDE).sum())
    seg_site[kind == _SWITCH] = _SITE["__switch_to"]
    seg_site[kind == _KMAP_ATOMIC] = rng.choice(_KMAP_ATOMIC_SITES, (kind == _KMAP_ATOMIC).sum())
    seg_site[kind == _KMAP_LOCAL] = rng.choice(_KMAP_LOCAL_SITES, (kind == _KMAP_LOCAL).sum())
    site = seg_site[seg].copy()
    is_sp = ev == _C["set_pte"]
    site[is_sp & region & (rng.random(total) < 0.3)] = _SITE["native_set_pte"]

    preempt = np.ones(total, np.uint32)
    preempt[kd == _KMAP_LOCAL] = 0
    if cfg.kernel_preempt_zero:
        preempt[kd == _KERNEL] = 0
    outside_preemptible = (kd == _OUTSIDE) & (rng.random(total) < 0.2)
    preempt[outside_preemptible] = 0
    irq = is_sp & (kd == _USER) & (rng.random(total) < cfg.irq_set_pte_rate)
    preempt[irq] |= 0x10000
    site[irq] = _SITE["__kmap_local_pfn_prot"]
    irqs_on = kd != _SWITCH

    mm_known = np.zeros(total, bool)
    mm_init = np.zeros(total, bool)
    enter = ev == _C["lazy_enter"]
    known_seg = rng.random(S) < 0.5
    mm_known[enter & known_seg[seg]] = True
    mm_init[enter & (kd == _KERNEL)] = True

    pc = (0xFFFFFFFF81000000 + site.astype(np.uint64) * 0x10000 + (off % 7).astype(np.uint64) * 4)
    ptep = (0xFFFF888000000000 + rng.integers(0, 1 << 30, total, dtype=np.uint64) * 8).astype(np.uint64)
    pteval = rng.integers(0, 1 << 52, total, dtype=np.uint64) | np.where(rng.random(total) < 0.5,
                                                                         np.uint64(1 << 63), np.uint64(0))
    t_ns = np.cumsum(rng.exponential(200.0, total).astype(np.int64) + 1) + rng.integers(0, 1000)
    return {
        "t_ns": t_ns.astype(np.int64),
        "cpu": np.full(total, cpu, np.int16),
        "event": ev,
        "site": site,
        "pc": pc.astype(np.uint64),
        "preempt_count": preempt,
        "irqs_on": irqs_on,
        "pid": pid.astype(np.int32),
        "comm": (pid % len(COMMS)).astype(np.int16),
        "ptep": ptep,
        "pteval": pteval.astype(np.uint64),
        "mm_known": mm_known,
        "mm_init": mm_init,
        "next_pid": next_pid,
    }


#: Field defaults of :func:`events_frame` (a task-context event on CPU 0 with preemption disabled).
EVENT_DEFAULTS: dict[str, object] = {
    "t_ns": None, "cpu": 0, "vcpu": None, "site": "native_set_pte", "pc": 0xFFFFFFFF81000000,
    "preempt_count": 1, "need_resched": False, "irqs_on": True, "pid": 100, "comm": "sh", "ptep": None,
    "pteval": None, "mm_is_init": None, "next_pid": None, "lazy_mmu": None, "lazy_mode": None,
    "mc_pending": None,
}


def events_frame(events: list[dict]) -> pd.DataFrame:
    """A schema frame from a few hand-written events (tests, notebooks, docs).

    Each event is a dict with at least ``event``; missing fields take :data:`EVENT_DEFAULTS`, ``seq``
    defaults to the list position, ``t_ns`` to ``1000 * seq``, ``vcpu`` to ``cpu``, and a ``switch``
    without ``next_pid`` switches to ``pid + 1``.
    """
    rows = []
    for i, e in enumerate(events):
        if e.get("event") not in schema.EVENT_CODE:
            raise ValueError(f"event #{i}: bad event {e.get('event')!r}, want one of {', '.join(schema.EVENTS)}")
        r = {**EVENT_DEFAULTS, **e}
        r.setdefault("seq", i)
        if r["t_ns"] is None:
            r["t_ns"] = 1000 * int(r["seq"])
        if r["vcpu"] is None:
            r["vcpu"] = r["cpu"]
        if r["event"] == "switch" and r["next_pid"] is None:
            r["next_pid"] = int(r["pid"]) + 1
        rows.append(r)
    cols = {c: [r[c] for r in rows] for c in schema.COLUMNS}
    df = pd.DataFrame({c: pd.Series(cols[c], dtype=object) for c in schema.COLUMNS})
    return schema.coerce(df)
