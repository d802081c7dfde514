"""Recipe + profile + workload -> a resolved guest configuration (the front of the one data path)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from . import initramfs, kernels, profiles, workloads, xen
from .errors import ConfigError
from .qemu import GuestConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """What the user asked for, by name."""

    kernel: str = kernels.DEFAULT_KERNEL
    profile: str = profiles.DEFAULT_PROFILE
    workload: str = workloads.DEFAULT_WORKLOAD
    iterations: int | None = None   # None: the workload's default
    cpus: str = "all"               # "all" or a comma list of guest CPU numbers
    timeout_s: float | None = None  # workload timeout; None: the workload's default

    def __post_init__(self) -> None:
        if self.iterations is not None and not 1 <= self.iterations <= 1_000_000:
            raise ConfigError(f"bad iterations: got {self.iterations}, want 1-1000000")
        if self.cpus != "all" and not re.fullmatch(r"\d{1,2}(,\d{1,2})*", self.cpus):
            raise ConfigError(f"bad cpus: got {self.cpus!r}, want 'all' or a list like '0,1'")
        if self.timeout_s is not None and not 1 <= self.timeout_s <= 86400:
            raise ConfigError(f"bad timeout: got {self.timeout_s}, want 1-86400 s")


@dataclass(frozen=True)
class Resolved:
    spec: RunSpec
    guest: GuestConfig
    workload: workloads.Workload
    accel_reason: str

    @property
    def workload_timeout(self) -> float:
        return self.spec.timeout_s or self.workload.timeout_s

    def manifest(self) -> dict:
        p = self.guest.profile
        return {
            "kernel": self.guest.kernel.manifest(),
            "profile": {"name": p.name, "accel": self.guest.accel, "accel_reason": self.accel_reason,
                        "smp": p.smp, "memory_mib": p.memory_mib, "cpu": p.cpu,
                        "record_replay": p.record_replay, "kind": p.kind},
            "hypervisor": self._hypervisor_manifest(),
            "workload": {"name": self.workload.name, "path": str(self.workload.directory),
                         "iterations": self.guest.iterations, "cpus": self.guest.cpus,
                         "timeout_s": self.workload_timeout},
            "initramfs": str(self.guest.initramfs),
            "replay": {"mode": self.guest.replay,
                       "file": str(self.guest.replay_file) if self.guest.replay_file else None},
        }

    def _hypervisor_manifest(self) -> dict | None:
        hv, p = self.guest.hypervisor, self.guest.profile
        if hv is None:
            return None
        return {**hv.manifest(), "cmdline": xen.xen_cmdline(p),
                "dom0": {"vcpus": p.dom0_vcpu_count, "memory_mib": p.dom0_memory_mib}}


def resolve(spec: RunSpec, *, gdb: bool = False, paused: bool = False, single_thread_tcg: bool = False,
            progress: Callable | None = None, extra_files: dict[str, bytes] | None = None) -> Resolved:
    """Load the profile, recipe and workload; fetch the kernel if needed; build the initramfs; pick the accel.

    Cheap checks (names, values) run before anything slow (downloads, probe boots).
    """
    from .accel import resolve_accel

    profile = profiles.load_profile(spec.profile)
    recipe = kernels.load_recipe(spec.kernel)  # unknown names fail before any download
    wl = workloads.load_workload(spec.workload)
    if spec.cpus != "all":
        bad = [c for c in spec.cpus.split(",") if int(c) >= profile.guest_cpus]
        if bad:
            raise ConfigError(f"bad cpus: got {spec.cpus!r}, profile {profile.name} has CPUs "
                              f"0-{profile.guest_cpus - 1}")
    # xen-pv: the small hypervisor image first, so a wrong or missing one fails before a kernel download.
    hypervisor = xen.get_hypervisor(profile, progress=progress) if profile.kind == "xen-pv" else None
    kernel = kernels.get_kernel(recipe.name, progress=progress)
    if hypervisor is not None:
        xen.check_dom0_kernel(kernel)
    if wl.modules:  # built against this kernel's headers, cached by (sources, release)
        from .modules import initramfs_files
        extra_files = {**(extra_files or {}), **initramfs_files(wl.modules, kernel)}
    img = initramfs.build_initramfs(wl, extra_files)
    cfg = GuestConfig(
        kernel=kernel, profile=profile, initramfs=img, workload=wl.name,
        iterations=spec.iterations or wl.iterations, cpus=spec.cpus, accel="tcg", gdb=gdb, paused=paused,
        single_thread_tcg=single_thread_tcg, replay="record" if profile.record_replay else None,
        hypervisor=hypervisor,
    )
    accel, why = resolve_accel(cfg)
    from dataclasses import replace
    cfg = replace(cfg, accel=accel)
    return Resolved(spec, cfg, wl, why)
