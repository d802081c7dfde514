"""Xen for ``kind = "xen-pv"`` profiles: the hypervisor image (fetch, cache, verify) and its QEMU boot pieces.

On a plain QEMU guest the kernel's lazy MMU hooks are pv-ops patched to NOPs; the backends that really keep
per-CPU lazy state and batch page-table updates are paravirt ones, Xen PV first. Xen's own CI boots Xen with a
PV dom0 under plain ``qemu-system-x86_64`` (TCG), so lazytrace does the same: QEMU's multiboot loader starts
Debian's hypervisor (``-kernel xen``) with the dom0 kernel and lazytrace's initramfs as multiboot modules
(``-initrd "bzImage args,initramfs"``). Xen writes its own log and dom0's ``hvc0`` to its serial console
(``com1``), which is QEMU's serial: the console socket sees both, sentinels included.

The hypervisor comes from a Debian package resolved with apt at fetch time, like the kernels
(:mod:`tracer.kernels`): ``xen-system-amd64`` depends on ``xen-hypervisor-<ver>-amd64``, whose
``boot/xen-<ver>-amd64.gz`` is the 32-bit ELF multiboot image (QEMU's multiboot loader refuses 64-bit ELF
files such as ``xen-syms``, and does not gunzip). Only that member and the build config are unpacked::

    $LAZYTRACE_CACHE/xen/<package version>/xen       the image, gunzipped
                                          /config    Xen's build config (its header names the Xen version)
                                          /xen.json  package, version, build-id, sha256, when verified
    $LAZYTRACE_CACHE/xen/<package>.json              which version the package last resolved to

A profile may instead name a self-built image (``xen_image``: Xen's ``xen/xen``). Every run verifies the image
it boots (present, not compressed, a 32-bit multiboot image, Xen's banner inside, unchanged since fetch):
a wrong or missing image is a :class:`HypervisorError`, before QEMU starts.

The dom0 kernel must be built with ``CONFIG_XEN_DOM0``: Debian's standard amd64 flavour is, the cloud flavour
is not (``guest-kernels/debian-6.1-amd64.toml``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import elfinfo
from .errors import ConfigError, KernelError
from .kernels import Kernel, _candidate, _download, _extract, _package_stanzas, _version_gt
from .paths import cache_dir
from .profiles import MachineProfile

log = logging.getLogger(__name__)

#: Hypervisor arguments lazytrace always passes: log to the serial port QEMU gives us, everything, and
#: never reboot (a dom0 crash then stops the machine instead of looping). The profile's ``xen_cmdline`` follows.
XEN_BASE_CMDLINE = ("console=com1", "com1=115200,8n1", "noreboot", "loglvl=all", "guest_loglvl=all")
#: dom0's console is Xen's virtual console (hvc0), which Xen copies to com1; ``earlyprintk=xen`` makes the
#: kernel's early boot messages (and early panics) visible the same way. Replaces lazytrace's ``console=ttyS0``.
#: Xen keeps the ACPI PM timer for itself and denies dom0 its I/O port, so the kernel's acpi_pm consistency
#: check spins on trapped port reads that return all ones ("PM-Timer failed consistency check (0xffffff)"):
#: measured 10.6 s of dom0's boot under TCG on a loaded 2-core host. dom0 keeps time with the xen
#: clocksource anyway, so that probe is skipped.
DOM0_CMDLINE = ("console=hvc0", "earlyprintk=xen", "initcall_blacklist=init_acpi_pm_clocksource")

#: The hypervisor package a meta package depends on: ``xen-hypervisor-<ver>-amd64``.
HYPERVISOR_PACKAGE_RE = re.compile(r"^xen-hypervisor-(\d+\.\d+)-amd64$")

# Multiboot (version 1): QEMU's loader (hw/i386/multiboot.c) looks for the header in the first 8 KiB at a
# 4-byte aligned offset, magic + flags + checksum == 0 (mod 2^32). Flag bit 16 ("address fields valid")
# unset means the image is loaded as an ELF file, which must then be 32-bit.
MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192
MULTIBOOT_AOUT_KLUDGE = 1 << 16
#: Debian's Xen 4.17 image is 2.5 MB; anything far larger is something else (a vmlinux is ~600 MB).
MAX_IMAGE_BYTES = 64 << 20
#: In every Xen's print_xen_info() banner ("Xen version %d.%d%s (...").
XEN_BANNER = b"Xen version "

#: The console lines Xen prints first (xen/common/kernel.c, print_xen_info / xen/common/version.c).
CONSOLE_VERSION_RE = re.compile(r"\(XEN\) Xen version (\S+) \(([^)]*)\)")
CONSOLE_BUILD_ID_RE = re.compile(r"\(XEN\) build-id: ([0-9a-f]+)")
#: Xen's answer to dom0's poweroff when it cannot enter ACPI S5 itself (xen/common/shutdown.c,
#: hwdom_shutdown(SHUTDOWN_poweroff): machine_halt() spins forever, so QEMU never exits on its own).
#: Normally dom0's ACPI poweroff reaches Xen's "Entering ACPI S5 state" first and QEMU exits.
CONSOLE_HALTED = r"\(XEN\) (?:Hardware Dom\d+|Domain 0) halted: halting machine"


class HypervisorError(KernelError):
    """The hypervisor image is missing, is not a bootable Xen image, or changed since it was verified.

    An input error (exit status 2), like a kernel that is missing or does not match its vmlinux.
    """


@dataclass(frozen=True)
class Hypervisor:
    """A verified Xen image, ready to boot.

    :param image: the uncompressed 32-bit multiboot image passed to QEMU's ``-kernel``.
    :param source: ``package`` (fetched from Debian into the cache) or ``local`` (the profile's ``xen_image``).
    :param info: facts recorded at fetch/verification time (``xen.json``).
    """

    image: Path
    source: str
    info: dict = field(default_factory=dict, compare=False)

    @property
    def version(self) -> str | None:
        """The Xen version (``4.17.7``) from the package's build config; None for a local image."""
        return self.info.get("xen_version")

    @property
    def build_id(self) -> str:
        return self.info.get("build_id", "")

    def manifest(self) -> dict:
        """What the run manifest records about the hypervisor."""
        return {"source": self.source, "image": str(self.image),
                **{k: self.info.get(k) for k in ("package", "xen_version", "build_id", "sha256", "size")}}


# --- image verification ------------------------------------------------------------------------------------

def find_multiboot_header(head: bytes) -> tuple[int, int] | None:
    """The (offset, flags) of a valid multiboot 1 header where QEMU's loader looks for it, else None.

    :raises HypervisorError: the magic is there but its checksum is wrong (a damaged image).
    """
    bad_at = None
    for off in range(0, min(len(head), MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", head, off)
        if magic != MULTIBOOT_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
        bad_at = off
    if bad_at is not None:
        raise HypervisorError(f"multiboot header at offset {bad_at:#x} has a bad checksum (damaged image?)")
    return None


def verify_image(path: Path) -> dict:
    """Check that ``path`` is a Xen image QEMU's multiboot loader can boot.

    :returns: facts for ``xen.json``: build-id, sha256, size, multiboot header offset and flags.
    :raises HypervisorError: missing, unreadable, gzip-compressed, 64-bit ELF, no multiboot header, not Xen.
    """
    path = Path(path)
    if not path.is_file():
        raise HypervisorError(f"hypervisor image {path} is missing")
    try:
        with open(path, "rb") as f:
            data = f.read(MULTIBOOT_SEARCH)
            # Read the rest (~2.5 MB for Xen) only if the head could be a multiboot image: a wrong file may
            # be a 600 MB vmlinux.
            if data[:2] != b"\x1f\x8b" and data[:5] != b"\x7fELF\x02":
                data += f.read(MAX_IMAGE_BYTES)
    except OSError as exc:
        raise HypervisorError(f"hypervisor image {path} is unreadable: {exc}") from exc
    what = f"hypervisor image {path}"
    if len(data) > MAX_IMAGE_BYTES:
        raise HypervisorError(f"{what} is larger than {MAX_IMAGE_BYTES >> 20} MiB: not a Xen image")
    if data[:2] == b"\x1f\x8b":
        raise HypervisorError(f"{what} is gzip-compressed: QEMU's multiboot loader needs it uncompressed "
                              "(gunzip it)")
    is_elf = data[:4] == b"\x7fELF"
    if is_elf and data[4] == 2:
        raise HypervisorError(f"{what} is a 64-bit ELF file (xen-syms, or a Linux vmlinux?): QEMU's multiboot "
                              "loader boots only the 32-bit image (Xen's xen/xen, Debian's boot/xen-*.gz gunzipped)")
    try:
        mb = find_multiboot_header(data)
    except HypervisorError as exc:
        raise HypervisorError(f"{what}: {exc.message}") from None
    if mb is None:
        kind = " (it is a Linux bzImage)" if data[0x202:0x206] == b"HdrS" else ""
        raise HypervisorError(f"{what} has no multiboot header in its first {MULTIBOOT_SEARCH} bytes{kind}: "
                              "not a Xen image QEMU can boot")
    off, flags = mb
    if not flags & MULTIBOOT_AOUT_KLUDGE and not is_elf:
        raise HypervisorError(f"{what}: multiboot header asks for ELF loading but the file is not ELF")
    if is_elf and struct.unpack_from("<H", data, 18)[0] != 3:  # e_machine EM_386
        raise HypervisorError(f"{what} is an ELF file for another machine (e_machine "
                              f"{struct.unpack_from('<H', data, 18)[0]}), want i386")
    if XEN_BANNER not in data:
        raise HypervisorError(f"{what} is a multiboot image but not Xen (no '{XEN_BANNER.decode().strip()}' banner)")
    build_id = ""
    if is_elf:
        try:
            build_id = elfinfo.build_id(path)
        except KernelError:
            build_id = ""  # a self-built image without --build-id still boots
    return {
        "build_id": build_id,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "multiboot": {"offset": off, "flags": flags},
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def config_version(config: Path) -> str | None:
    """The Xen version in a build config's header (``# Xen/x86 4.17.7 Configuration``)."""
    try:
        head = Path(config).read_text(errors="replace")[:512]
    except OSError:
        return None
    m = re.search(r"^# Xen/\S+ (\S+) Configuration", head, re.M)
    return m.group(1) if m else None


def console_facts(console_text: str) -> dict:
    """What Xen says about itself on the console: ``{"version", "build_info", "build_id"}`` (None if absent).

    The booted hypervisor's build-id must be the verified image's: tests compare them.
    """
    v = CONSOLE_VERSION_RE.search(console_text)
    b = CONSOLE_BUILD_ID_RE.search(console_text)
    return {"version": v.group(1) if v else None, "build_info": v.group(2) if v else None,
            "build_id": b.group(1) if b else None}


# --- package resolution, fetch, cache ----------------------------------------------------------------------

@dataclass(frozen=True)
class PackageRef:
    """The exact hypervisor package a profile resolves to; ``via`` is the meta package (name, version), if any."""

    name: str
    version: str
    size: int
    via: tuple[str, str] | None = None

    @property
    def members(self) -> dict[str, str]:
        """The .deb members lazytrace unpacks -> their names in the cache directory."""
        ver = HYPERVISOR_PACKAGE_RE.match(self.name).group(1)
        return {f"./boot/xen-{ver}-amd64.gz": "xen.gz", f"./boot/xen-{ver}-amd64.config": "config"}


def _best(stanzas: list[dict[str, str]], prefix: str, pkg: str) -> dict[str, str] | None:
    if prefix:
        best = None
        for s in stanzas:
            if s["Version"].startswith(prefix) and (best is None or _version_gt(s["Version"], best["Version"])):
                best = s
        return best
    cand = _candidate(pkg)
    return next((s for s in stanzas if s["Version"] == cand), None)


def resolve_package(profile: MachineProfile) -> PackageRef:
    """Resolve the profile's ``xen_package`` to an exact ``xen-hypervisor-<ver>-amd64`` version (apt metadata only).

    :raises HypervisorError: apt does not know the package, no version matches, or it names no hypervisor.
    """
    pkg, prefix = profile.xen_package, profile.xen_version_prefix
    stanzas = _package_stanzas(pkg)
    if not stanzas:
        raise HypervisorError(f"profile {profile.name}: hypervisor package {pkg} is unknown to apt "
                              "(run apt-get update; is its suite in apt's sources?)")
    best = _best(stanzas, prefix, pkg)
    if best is None:
        want = f"version starting {prefix!r}" if prefix else "installable candidate"
        raise HypervisorError(f"profile {profile.name}: {pkg} has no {want} (versions: "
                              f"{', '.join(s['Version'] for s in stanzas)})")
    if HYPERVISOR_PACKAGE_RE.match(pkg):
        return PackageRef(pkg, best["Version"], int(best.get("Size", "0")))
    m = re.search(r"(?:^|[\s,|])(xen-hypervisor-\d+\.\d+-amd64)\b", best.get("Depends", ""))
    if not m:
        raise HypervisorError(f"profile {profile.name}: {pkg} {best['Version']} depends on no "
                              "xen-hypervisor-<ver>-amd64 package")
    hv = m.group(1)
    hv_stanzas = _package_stanzas(hv)
    if not hv_stanzas:
        raise HypervisorError(f"profile {profile.name}: {hv} (from {pkg}) is unknown to apt")
    # The meta package and the hypervisor are built from one source package: take the same version.
    same = next((s for s in hv_stanzas if s["Version"] == best["Version"]), None) or _best(hv_stanzas, prefix, hv)
    if same is None:
        raise HypervisorError(f"profile {profile.name}: no version of {hv} matches {pkg} {best['Version']}")
    return PackageRef(hv, same["Version"], int(same.get("Size", "0")), via=(pkg, best["Version"]))


def xen_cache() -> Path:
    return cache_dir() / "xen"


def _pointer(profile: MachineProfile) -> Path:
    key = profile.xen_package + (f"@{profile.xen_version_prefix}" if profile.xen_version_prefix else "")
    return xen_cache() / f"{key}.json"


def _version_dir(version: str) -> Path:
    return xen_cache() / version.replace(":", "%3a")


def cached(profile: MachineProfile) -> Hypervisor | None:
    """The hypervisor the profile's package last resolved to, if it was fetched (not verified here)."""
    try:
        version = json.loads(_pointer(profile).read_text())["version"]
        d = _version_dir(version)
        info = json.loads((d / "xen.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    return Hypervisor(d / "xen", "package", info)


def fetch(profile: MachineProfile, *, progress: Callable[[str, int, int], None] | None = None) -> Hypervisor:
    """Resolve, download and unpack the profile's hypervisor package into the cache; verify it (idempotent).

    :param progress: ``progress(what, done_bytes, total_bytes)`` during the download (as :func:`kernels.fetch`).
    :raises HypervisorError: see :func:`resolve_package` and :func:`verify_image`.
    :raises InfraError: apt failed.
    """
    ref = resolve_package(profile)
    d = _version_dir(ref.version)
    try:
        info = json.loads((d / "xen.json").read_text())
        if info.get("package", {}).get("version") == ref.version:
            verify_image(d / "xen")
            _point(profile, ref.version)
            return Hypervisor(d / "xen", "package", info)
    except (OSError, ValueError, HypervisorError):
        pass  # absent or damaged: fetch again
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    xen_cache().mkdir(parents=True, exist_ok=True)
    deb = debs / f"{ref.name}_{ref.version.replace(':', '%3a')}_amd64.deb"
    if not deb.exists() or (ref.size and deb.stat().st_size != ref.size):
        _download(ref.name, ref.version, ref.size, debs, deb, progress)
    tmp = Path(tempfile.mkdtemp(prefix=".xen-", dir=xen_cache()))
    try:
        try:
            _extract(deb, tmp, ref.members)
        except KernelError as exc:
            raise HypervisorError(f"{ref.name} {ref.version}: {exc.message}") from exc
        with gzip.open(tmp / "xen.gz", "rb") as src, open(tmp / "xen", "wb") as dst:
            shutil.copyfileobj(src, dst)
        (tmp / "xen.gz").unlink()
        info = verify_image(tmp / "xen")
        info["xen_version"] = config_version(tmp / "config")
        info["package"] = {"name": ref.name, "version": ref.version}
        if ref.via:
            info["package"]["via"] = {"name": ref.via[0], "version": ref.via[1]}
        (tmp / "xen.json").write_text(json.dumps(info, indent=2))
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise HypervisorError(f"{ref.name} {ref.version}: cannot unpack the hypervisor image: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _point(profile, ref.version)
    log.info("hypervisor %s %s (Xen %s) in %s", ref.name, ref.version, info["xen_version"], d)
    return Hypervisor(d / "xen", "package", info)


def _point(profile: MachineProfile, version: str) -> None:
    _pointer(profile).write_text(json.dumps({"version": version}))


def get_hypervisor(profile: MachineProfile, *, fetch_missing: bool = True,
                   progress: Callable[[str, int, int], None] | None = None) -> Hypervisor:
    """The verified hypervisor image for a xen-pv profile: its local ``xen_image``, or the cached package
    (fetched first if absent and ``fetch_missing``).

    The image is verified in full on every call (a few milliseconds: it is ~2.5 MB), and a cached one must
    still have the sha256 recorded when it was fetched.

    :raises ConfigError: the profile is not ``kind = "xen-pv"``.
    :raises HypervisorError: the image is missing, not a bootable Xen image, or changed since it was fetched.
    """
    if profile.kind != "xen-pv":
        raise ConfigError(f"profile {profile.name} is kind {profile.kind!r}: it boots no hypervisor")
    if profile.xen_image:
        path = Path(profile.xen_image).expanduser()
        try:
            info = verify_image(path)
        except HypervisorError as exc:
            raise HypervisorError(f"profile {profile.name}: xen_image: {exc.message}") from None
        return Hypervisor(path.resolve(), "local", info)
    hv = cached(profile)
    if hv is None:
        if not fetch_missing:
            raise HypervisorError(f"profile {profile.name}: hypervisor {profile.xen_package} is not fetched")
        return fetch(profile, progress=progress)
    remedy = f"delete {hv.image.parent} and lazytrace fetches it again"
    try:
        info = verify_image(hv.image)
    except HypervisorError as exc:
        raise HypervisorError(f"cached {exc.message} ({remedy})") from None
    if hv.info.get("sha256") and info["sha256"] != hv.info["sha256"]:
        raise HypervisorError(f"cached hypervisor image {hv.image} changed since it was fetched (sha256 "
                              f"{info['sha256'][:16]}..., recorded {hv.info['sha256'][:16]}...; {remedy})")
    return hv


# --- the dom0 kernel ---------------------------------------------------------------------------------------

def check_dom0_kernel(kernel: Kernel) -> None:
    """Refuse a kernel that cannot boot as a Xen PV dom0 (no ``CONFIG_XEN_DOM0``).

    :raises KernelError: the config lacks it, or there is no config to check.
    """
    try:
        text = kernel.config.read_text(errors="replace")
    except OSError as exc:
        raise KernelError(f"kernel {kernel.recipe.name}: cannot read {kernel.config} to check CONFIG_XEN_DOM0: "
                          f"{exc}") from exc
    if not re.search(r"^CONFIG_XEN_DOM0=y$", text, re.M):
        raise KernelError(f"kernel {kernel.recipe.name} ({kernel.release}) cannot boot as a Xen dom0: its config "
                          "lacks CONFIG_XEN_DOM0 (Debian's cloud flavour is built without it); use a standard "
                          "amd64 flavour recipe such as --kernel debian-6.1-amd64")


# --- QEMU command-line pieces ------------------------------------------------------------------------------

def xen_cmdline(profile: MachineProfile) -> str:
    """The hypervisor's command line: lazytrace's base, dom0's memory and vCPUs, then the profile's extras."""
    m = profile.dom0_memory_mib
    return " ".join([*XEN_BASE_CMDLINE, f"dom0_mem={m}M,max:{m}M", f"dom0_max_vcpus={profile.dom0_vcpu_count}",
                     *profile.xen_cmdline])


def multiboot_module(path: Path, args: str = "") -> str:
    """One module for QEMU's multiboot ``-initrd``: ``"path args"`` with every comma doubled.

    QEMU separates modules with commas (a literal comma is written ``,,``) and cuts the path at the first
    space, so a path containing a space cannot be passed.

    :raises ConfigError: the path contains a space.
    """
    if " " in str(path):
        raise ConfigError(f"bad multiboot module path {str(path)!r}: QEMU's multiboot loader cannot pass a path "
                          "containing a space (set LAZYTRACE_CACHE to a path without spaces)")
    return f"{path} {args}".strip().replace(",", ",,")


def multiboot_args(hv: Hypervisor, profile: MachineProfile, bzimage: Path, dom0_cmdline: str,
                   initramfs: Path) -> list[str]:
    """QEMU's boot arguments for Xen + dom0: hypervisor, its command line, and the two modules
    (dom0 kernel with its command line, then the initramfs: Xen takes the first module as dom0's kernel and
    the second as its initrd).
    """
    if " " in str(hv.image):
        raise ConfigError(f"bad hypervisor image path {str(hv.image)!r}: QEMU passes the path as the first word "
                          "of Xen's command line, so it cannot contain a space")
    return ["-kernel", str(hv.image), "-append", xen_cmdline(profile),
            "-initrd", ",".join([multiboot_module(bzimage, dom0_cmdline), multiboot_module(initramfs)])]


__all__ = ["Hypervisor", "HypervisorError", "PackageRef", "check_dom0_kernel", "config_version", "console_facts",
           "fetch", "get_hypervisor", "multiboot_args", "multiboot_module", "resolve_package", "verify_image",
           "xen_cmdline"]
