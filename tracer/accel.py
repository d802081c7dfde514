"""Choose the accelerator. ``auto`` is decided by a short probe boot, never by /dev/kvm's presence.

On the machines this project runs on, /dev/kvm exists but KVM guests hang (a nested "pvm" module with no
vmx/svm), so a profile asking for ``auto`` boots the idle workload under KVM with a short deadline and falls
back to TCG with a warning when it does not reach /init.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from .errors import LazytraceError
from .qemu import Guest, GuestConfig

log = logging.getLogger(__name__)

PROBE_BOOT_TIMEOUT_S = 20.0


def kvm_usable(cfg: GuestConfig) -> tuple[bool, str]:
    """Boot ``cfg`` (its kernel, idle initramfs) under KVM; True if it reaches /init in time."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is absent or not accessible"
    probe = replace(cfg, accel="kvm", gdb=False, paused=False, replay=None)
    with tempfile.TemporaryDirectory(prefix="lazytrace-kvm-probe-") as tmp:
        try:
            with Guest(Path(tmp), probe) as g:
                g.wait_for("@@LAZYTRACE:INIT@@", PROBE_BOOT_TIMEOUT_S, what="/init under KVM", boot=True)
            return True, "probe boot reached /init under KVM"
        except LazytraceError as exc:
            return False, f"probe boot under KVM failed: {exc.message}"


def resolve_accel(cfg: GuestConfig, warn=log.warning) -> tuple[str, str]:
    """The accelerator to use for ``cfg.profile.accel`` and why."""
    want = cfg.profile.accel
    if want == "tcg":
        return "tcg", "profile asks for tcg"
    ok, why = kvm_usable(cfg)
    if ok:
        return "kvm", why
    if want == "kvm":
        warn(f"profile {cfg.profile.name} asks for kvm but {why}; falling back to TCG")
    else:
        warn(f"accel auto: {why}; using TCG")
    return "tcg", why
