"""Real Xen, seconds not minutes: faults of the hypervisor itself are guest faults with Xen's reason.

Needs only the hypervisor (a 2 MB package, fetched on demand), not the dom0 kernel: the dom0 "kernel" here
is a file Xen cannot build a domain from, so Xen panics a few seconds after reset.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tracer import initramfs, kernels, profiles, workloads, xen
from tracer.errors import GuestPanicError
from tracer.qemu import Guest, GuestConfig

pytestmark = pytest.mark.vm

XEN_PROFILE = "xen-pv-smp2"
#: Xen reaches its dom0 builder ~5 s after reset on an idle host; generous for a loaded one.
BOOT_TIMEOUT_S = 60.0


def test_xen_panic_is_a_guest_fault_with_its_reason(tmp_path: Path, run_dir: Path):
    prof = profiles.load_profile(XEN_PROFILE)
    hv = xen.get_hypervisor(prof)
    bogus = tmp_path / "kernel"
    bogus.mkdir()
    (bogus / "bzImage").write_bytes(b"not a kernel\n" * 64)
    k = kernels.Kernel(kernels.load_recipe("debian-6.1-amd64"), "0.0.0-bogus", bogus, {})
    cfg = GuestConfig(kernel=k, profile=prof, hypervisor=hv, workload="idle", iterations=1,
                      initramfs=initramfs.build_initramfs(workloads.load_workload("idle")))
    with pytest.raises(GuestPanicError) as ei:
        with Guest(run_dir, cfg) as g:
            g.run_workload(workload_timeout=10, boot_timeout=BOOT_TIMEOUT_S)
    msg = ei.value.message
    # the message names Xen's panic and its reason line, not just "Panic on CPU 0:"
    assert msg.startswith("guest panic: (XEN) Panic on CPU ") and msg.count("(XEN)") == 2, msg
    assert re.search(r"\(XEN\) Could not (construct domain 0|set up DOM0)", msg), msg  # xen/arch/x86/setup.c
    console = (run_dir / "console.log").read_bytes().decode(errors="replace")
    assert xen.console_facts(console)["build_id"] == hv.build_id
    assert "(XEN) ELF: not an ELF binary" in console  # Xen's dom0 builder looked at the module and refused it
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    assert f"lazytrace-{run_dir.name}," not in out and str(run_dir) not in out
