"""Guest kernel modules: built out of tree against Debian's headers for the cached guest kernel.

A module is a directory ``guest-kernels/modules/NAME/`` with a ``Kbuild`` (``obj-m := NAME.o``) and its
sources. A workload asks for it with ``modules = ["NAME"]`` in its ``workload.toml``; the run then builds it
for the run's kernel (or reuses the cached build) and ships it in the initramfs as ``/lib/modules/NAME.ko``,
where the workload's ``run.sh`` loads it with busybox ``insmod``.

Headers come from the Debian packages of exactly the kernel's version, fetched with ``apt-get download`` and
unpacked with ``dpkg-deb`` into the cache (never installed, no root needed beyond apt's own)::

    linux-headers-<release>           .config, Module.symvers, generated headers, a one-line Makefile
    linux-headers-<abi>-common[-rt]   the source headers and the top-level Makefile
    linux-kbuild-<version>            scripts/ (fixdep, modpost, ...), as relative symlinks from both trees

    $LAZYTRACE_CACHE/headers/<release>/usr/src/linux-headers-<release>/   make -C here M=<build dir> modules
                                      /headers.json                       packages and versions unpacked
    $LAZYTRACE_CACHE/modules/<release>/<name>-<source hash>.ko

The flavour Makefile is ``include /usr/src/linux-headers-<abi>-common/Makefile`` (an absolute path): it is
rewritten to the unpacked common tree, which finds its own source tree from the path of its Makefile. The
compiler is the one the kernel was built with (``CC`` in the flavour's ``.kernelvariables``, e.g. ``gcc-12``);
kbuild refuses nothing if it differs, but Debian builds with that one, so it is required.

Builds are cached by (hash of the module's sources, kernel release): a cached ``.ko`` is reused while its
``vermagic`` still names the release. Concurrent runs build in private directories and rename into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import kernels
from .errors import ConfigError, InfraError, KernelError, ToolMissingError, UnknownNameError
from .paths import KERNEL_RECIPES_DIR, cache_dir

log = logging.getLogger(__name__)

#: Module sources: one directory per module, each with a Kbuild.
MODULES_DIR = KERNEL_RECIPES_DIR / "modules"
#: Where the initramfs holds built modules (``insmod /lib/modules/NAME.ko``).
GUEST_MODULE_DIR = "lib/modules"
#: A module build (headers already unpacked): ~1-15 s on this machine, more when the host is loaded.
BUILD_TIMEOUT_S = 600
#: ``dpkg-deb -x`` of one headers package (the common one is ~10 MB compressed).
UNPACK_TIMEOUT_S = 300
#: Files of a module directory that are build products, not sources (never hashed, never copied).
_BUILD_PRODUCTS = re.compile(r"(\.(o|ko|mod|mod\.c|cmd|order|symvers)$|^\.)")
#: Bump when the layout of the headers cache or the build procedure changes.
CACHE_FORMAT = 2


# --- module sources ----------------------------------------------------------------------------------------

def available(directory: Path = MODULES_DIR) -> list[str]:
    """Names of the module source directories (those with a Kbuild)."""
    d = Path(directory)
    return sorted(p.name for p in d.iterdir() if (p / "Kbuild").is_file()) if d.is_dir() else []


def module_dir(name: str, directory: Path = MODULES_DIR) -> Path:
    """The source directory of module ``name``.

    :raises UnknownNameError: no ``guest-kernels/modules/NAME/Kbuild``.
    """
    d = Path(directory) / name
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not (d / "Kbuild").is_file():
        raise UnknownNameError(f"unknown module {name!r} (known: {', '.join(available(directory)) or 'none'}; "
                               f"a module is a directory {directory}/NAME with a Kbuild)")
    return d


def source_files(src: Path) -> list[Path]:
    """The module's source files (Kbuild, .c, .h, ...), sorted; build products are left out."""
    return sorted(p for p in Path(src).iterdir() if p.is_file() and not _BUILD_PRODUCTS.search(p.name))


def source_hash(src: Path) -> str:
    """A short hash of the module's sources (names and contents): the build cache key with the release."""
    h = hashlib.sha256(f"lazytrace-module-v{CACHE_FORMAT}\n".encode())
    for p in source_files(src):
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --- headers -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dependency:
    """One package relation from a ``Depends:`` field (first alternative only)."""

    name: str
    op: str | None = None
    version: str | None = None


def parse_depends(field: str) -> list[Dependency]:
    """Parse a Debian ``Depends:`` value; of ``a | b`` alternatives the first is kept.

    ``"linux-kbuild-6.1 (>= 6.1.192-2), gcc-12"`` gives ``linux-kbuild-6.1`` ``>=`` ``6.1.192-2`` and
    ``gcc-12`` with no relation.
    """
    out = []
    for item in field.split(","):
        first = item.split("|")[0].strip()
        if not first:
            continue
        m = re.fullmatch(r"([a-z0-9][a-z0-9+.-]*)(?::\S+)?\s*(?:\(\s*(<<|<=|=|>=|>>)\s*(\S+)\s*\))?", first)
        if not m:
            raise KernelError(f"cannot parse package relation {first!r} in Depends: {field}")
        out.append(Dependency(m.group(1), m.group(2), m.group(3)))
    return out


def header_dependencies(depends: str) -> list[Dependency]:
    """Of a ``linux-headers-<release>`` package's dependencies, the ones that carry kbuild files:
    ``linux-headers-*`` (the common source headers) and ``linux-kbuild-*`` (scripts). The rest (compiler
    packages, ``linux-base``, the image) are not needed to build a module."""
    return [d for d in parse_depends(depends) if d.name.startswith(("linux-headers-", "linux-kbuild-"))]


def _satisfies(version: str, op: str | None, want: str | None) -> bool:
    if op is None or want is None:
        return True
    dpkg_op = {"=": "eq", ">=": "ge", "<=": "le", ">>": "gt", "<<": "lt"}[op]
    return subprocess.run(["dpkg", "--compare-versions", version, dpkg_op, want]).returncode == 0


def _pick_version(dep: Dependency, prefer: str) -> str:
    """The version of ``dep`` to fetch: ``prefer`` (the kernel's own version) if apt has it and it
    satisfies the relation, else the highest version apt has that does.

    :raises KernelError: apt has no version satisfying the relation.
    """
    stanzas = kernels._package_stanzas(dep.name)
    versions = [s["Version"] for s in stanzas]
    ok = [v for v in versions if _satisfies(v, dep.op, dep.version)]
    if prefer in ok:
        return prefer
    if not ok:
        rel = f" ({dep.op} {dep.version})" if dep.op else ""
        raise KernelError(f"{dep.name}{rel} is not available from apt (has: {', '.join(versions) or 'nothing'}); "
                          "run apt-get update, or is the suite in apt's sources?")
    best = ok[0]
    for v in ok[1:]:
        if kernels._version_gt(v, best):
            best = v
    return best


def kernel_version(kernel: kernels.Kernel) -> str:
    """The Debian version of the kernel's image package (recorded at fetch time), e.g. ``6.1.192-2``.

    :raises KernelError: the cache does not record it (an old fetch: fetch the kernel again).
    """
    v = kernel.info.get("packages", {}).get("image", {}).get("version")
    if not v:
        raise KernelError(f"kernel {kernel.recipe.name}: {kernel.directory}/kernel.json does not record the "
                          f"image package version; run `lazytrace kernels fetch {kernel.recipe.name}` again")
    return v


def headers_packages(kernel: kernels.Kernel) -> list[tuple[str, str]]:
    """The ``(package, version)`` list to unpack for building modules against ``kernel``.

    :raises KernelError: apt does not know the headers of this exact kernel version.
    """
    version = kernel_version(kernel)
    flavour = f"linux-headers-{kernel.release}"
    stanza = next((s for s in kernels._package_stanzas(flavour) if s["Version"] == version), None)
    if stanza is None:
        raise KernelError(f"{flavour}={version} is not available from apt: the headers of the cached kernel "
                          "are needed to build its modules (run apt-get update; if Debian moved on, fetch "
                          f"the kernel again: `lazytrace kernels fetch {kernel.recipe.name}`)")
    pkgs = [(flavour, version)]
    for dep in header_dependencies(stanza.get("Depends", "")):
        pkgs.append((dep.name, dep.version if dep.op == "=" else _pick_version(dep, version)))
    return pkgs


def headers_root(release: str) -> Path:
    return cache_dir() / "headers" / release


def flavour_dir(root: Path, release: str) -> Path:
    """Where ``make -C`` goes: ``<root>/usr/src/linux-headers-<release>``."""
    return Path(root) / "usr" / "src" / f"linux-headers-{release}"


def relocate_makefile(text: str, root: Path) -> str:
    """Point the flavour Makefile's absolute ``include /usr/src/...`` at the unpacked tree under ``root``
    (also when it already points at an earlier location of the cache).

    :raises KernelError: the Makefile does not have the expected shape.
    """
    new, n = re.subn(r"^include\s+\S*?/usr/src/", f"include {Path(root).as_posix()}/usr/src/", text, flags=re.M)
    if n != 1:
        raise KernelError("unexpected flavour Makefile in Debian's headers package (want one line "
                          f"'include /usr/src/linux-headers-<abi>-common/Makefile'): {text[:200]!r}")
    return new


def ensure_headers(kernel: kernels.Kernel) -> Path:
    """Fetch and unpack the headers for ``kernel`` into the cache (idempotent); return the flavour dir.

    :raises KernelError: the packages are not available for this kernel version.
    :raises InfraError: apt or dpkg-deb failed.
    """
    root = headers_root(kernel.release)
    info_path = root / "headers.json"
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
        except ValueError:
            info = {}
        if info.get("format") == CACHE_FORMAT and info.get("kernel_version") == kernel_version(kernel):
            mk = flavour_dir(root, kernel.release) / "Makefile"
            text = mk.read_text()
            if f"include {root.as_posix()}/usr/src/" not in text:  # the cache directory was moved
                mk.write_text(relocate_makefile(text, root))
            return flavour_dir(root, kernel.release)
    pkgs = headers_packages(kernel)
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kernel.release}-", dir=root.parent))
    try:
        for name, version in pkgs:
            _unpack(_download(name, version, debs), tmp)
        fl = flavour_dir(tmp, kernel.release)
        mk = fl / "Makefile"
        if not mk.exists():
            raise KernelError(f"{pkgs[0][0]}={pkgs[0][1]} has no usr/src/linux-headers-{kernel.release}/Makefile")
        mk.write_text(relocate_makefile(mk.read_text(), root))
        (tmp / "headers.json").write_text(json.dumps({
            "format": CACHE_FORMAT, "release": kernel.release, "kernel_version": kernel_version(kernel),
            "packages": [{"name": n, "version": v} for n, v in pkgs]}, indent=2))
        if root.exists():
            shutil.rmtree(root)
        try:
            tmp.rename(root)
        except OSError:
            if not (root / "headers.json").exists():  # not a concurrent twin that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("unpacked headers for %s: %s", kernel.release, ", ".join(f"{n}={v}" for n, v in pkgs))
    return flavour_dir(root, kernel.release)


def _download(name: str, version: str, debs: Path) -> Path:
    """``apt-get download name=version`` into the deb cache (reused if already there)."""
    have = list(debs.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
    if have:
        return have[0]
    with tempfile.TemporaryDirectory(dir=debs) as tmpd:
        kernels._apt(["apt-get", "download", "-q", f"{name}={version}"], cwd=Path(tmpd))
        got = list(Path(tmpd).glob("*.deb"))
        if not got:
            raise InfraError(f"apt-get download {name}={version} produced no .deb")
        dest = debs / got[0].name
        shutil.move(str(got[0]), dest)
        return dest


def _unpack(deb: Path, dest: Path) -> None:
    argv = ["dpkg-deb", "-x", str(deb), str(dest)]
    if shutil.which(argv[0]) is None:
        raise ToolMissingError("dpkg-deb not found: lazytrace unpacks Debian's kernel headers with it")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=UNPACK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise InfraError(f"dpkg-deb -x {deb.name} timed out after {UNPACK_TIMEOUT_S} s", argv=argv) from exc
    if proc.returncode != 0:
        raise InfraError(f"cannot unpack {deb.name}", argv=argv, returncode=proc.returncode,
                         log_tail=proc.stderr[-2000:])


def kernel_compiler(flavour: Path) -> str:
    """The compiler Debian built this kernel with, from the flavour's ``.kernelvariables`` (``gcc-12``).

    :raises ToolMissingError: it is not installed on this host.
    """
    cc = "gcc"
    kv = Path(flavour) / ".kernelvariables"
    if kv.exists():
        m = re.search(r"^CC\s*=.*?(\S*gcc(?:-\d+)?)\s*$", kv.read_text(), flags=re.M)
        if m:
            cc = m.group(1).replace("$(CROSS_COMPILE)", "")
    if shutil.which(cc) is None:
        raise ToolMissingError(f"{cc} not found: the guest kernel was built with it and its modules must be "
                               f"too (apt-get install {cc} make)")
    return cc


# --- building ----------------------------------------------------------------------------------------------

def vermagic(ko: Path) -> str:
    """The ``vermagic`` string of a built module (``6.1.0-56-cloud-amd64 SMP preempt_dynamic mod_unload ...``).

    :raises ConfigError: not an ELF module, or it has no vermagic.
    """
    try:
        with open(ko, "rb") as f:
            sec = ELFFile(f).get_section_by_name(".modinfo")
            data = sec.data() if sec is not None else b""
    except (ELFError, OSError) as exc:
        raise ConfigError(f"{ko}: not a readable kernel module: {exc}") from exc
    for entry in data.split(b"\0"):
        if entry.startswith(b"vermagic="):
            return entry[len(b"vermagic="):].decode(errors="replace")
    raise ConfigError(f"{ko}: no vermagic in .modinfo (not a kernel module?)")


def built_path(name: str, kernel: kernels.Kernel, src: Path | None = None) -> Path:
    """Where the cached build of module ``name`` for ``kernel`` lives (whether or not it exists yet)."""
    src = src or module_dir(name)
    return cache_dir() / "modules" / kernel.release / f"{name}-{source_hash(src)}.ko"


def build_module(name: str, kernel: kernels.Kernel, *, directory: Path = MODULES_DIR) -> Path:
    """Build module ``name`` for ``kernel`` (or reuse the cached build); return the ``.ko`` path.

    :raises UnknownNameError: no such module.
    :raises ConfigError: the module does not compile (the compiler's output is in the error).
    :raises KernelError: no headers for this kernel version.
    :raises ToolMissingError: make, the kernel's compiler or dpkg-deb is missing.
    """
    src = module_dir(name, directory)
    out = built_path(name, kernel, src)
    if out.exists() and vermagic(out).split(" ")[0] == kernel.release:
        return out
    flavour = ensure_headers(kernel)
    kernel_compiler(flavour)
    if shutil.which("make") is None:
        raise ToolMissingError("make not found: kernel modules are built with kbuild (apt-get install make)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=out.parent) as tmpd:
        build = Path(tmpd)
        for p in source_files(src):
            shutil.copy2(p, build / p.name)
        # No BTF for our modules: 6.12's headers ship a BTF vmlinux, and kbuild would then need pahole
        # (dwarves) on the host; lazytrace reads nothing from module BTF.
        argv = ["make", "-C", str(flavour), f"M={build}", "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KBUILD_", "ARCH", "CROSS_COMPILE"))}
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired as exc:
            raise InfraError(f"building module {name} timed out after {BUILD_TIMEOUT_S} s", argv=argv) from exc
        ko = build / f"{name}.ko"
        if proc.returncode != 0 or not ko.exists():
            raise ConfigError(f"module {name} does not build against {kernel.release}'s headers", argv=argv,
                              returncode=proc.returncode, log_tail=(proc.stdout + proc.stderr)[-3000:])
        vm = vermagic(ko)
        if vm.split(" ")[0] != kernel.release:
            raise KernelError(f"module {name} was built with vermagic {vm!r}, want release {kernel.release}")
        tmp_out = out.with_suffix(f".tmp{os.getpid()}")
        shutil.copy2(ko, tmp_out)
        tmp_out.replace(out)
    log.info("built module %s for %s: %s (%d KiB)", name, kernel.release, out, out.stat().st_size // 1024)
    return out


def guest_path(name: str) -> str:
    """The initramfs path of module ``name`` (``lib/modules/NAME.ko``; insmod /lib/modules/NAME.ko)."""
    return f"{GUEST_MODULE_DIR}/{name}.ko"


def initramfs_files(names: tuple[str, ...] | list[str], kernel: kernels.Kernel) -> dict[str, bytes]:
    """Build the named modules for ``kernel``: ``{initramfs path: .ko bytes}`` for ``build_initramfs``."""
    return {guest_path(n): build_module(n, kernel).read_bytes() for n in names}
