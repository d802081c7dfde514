"""Guest kernel recipes (``guest-kernels/*.toml``): resolve, fetch, unpack, verify, cache.

A recipe names Debian packages, never a fixed version: the ABI (``6.1.0-56``) changes with every Debian
kernel update, so it is resolved at fetch time from a meta package (``linux-image-cloud-amd64``) and the exact
package version is recorded. Packages are fetched with ``apt-get download`` (never installed into /boot) and
only the files lazytrace needs are unpacked into the cache::

    $LAZYTRACE_CACHE/kernels/<release>/bzImage     boot image (from linux-image-<abi>-unsigned)
                                      /vmlinux     DWARF image (from linux-image-<abi>-dbg)
                                      /config      kernel .config
                                      /kernel.json what was fetched: packages, versions, build-id, banner
    $LAZYTRACE_CACHE/kernels/<recipe>.json         which release the recipe last resolved to

Recipe example (``guest-kernels/debian-6.1-cloud.toml``)::

    description = "Debian 12 cloud kernel 6.1"
    meta_packages = ["linux-image-cloud-amd64"]   # first one offering a matching version wins
    version_prefix = "6.1."                        # "" = the meta package's apt candidate
    image_package = "linux-image-{abi}-unsigned"
    dbg_package = "linux-image-{abi}-dbg"
    cmdline = ["preempt=full"]                     # appended to lazytrace's own kernel arguments
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import elfinfo
from .errors import ConfigError, InfraError, KernelError, ToolMissingError, UnknownNameError
from .paths import KERNEL_RECIPES_DIR, cache_dir

log = logging.getLogger(__name__)

DEFAULT_KERNEL = "debian-cloud"

#: Symbols every recipe's vmlinux must have for the tracer's required probes and per-CPU reads.
REQUIRED_SYMBOLS = ("native_set_pte", "__switch_to", "__x64_sys_sethostname", "init_mm", "linux_banner",
                    "__per_cpu_offset")

APT_TIMEOUT_S = 900


@dataclass(frozen=True)
class KernelRecipe:
    """A guest kernel recipe.

    :param name: file stem in ``guest-kernels/``.
    :param meta_packages: Debian meta packages whose ``Depends`` name ``linux-image-<abi>``; tried in order.
    :param version_prefix: accept only meta package versions starting with this (``""`` = apt's candidate).
    :param image_package: boot image package, ``{abi}`` substituted.
    :param dbg_package: DWARF package, ``{abi}`` substituted.
    :param cmdline: extra kernel arguments this kernel needs.
    :param required_symbols: symbols checked by ``verify`` in addition to :data:`REQUIRED_SYMBOLS`.
    """

    name: str
    description: str = ""
    meta_packages: tuple[str, ...] = ("linux-image-cloud-amd64",)
    version_prefix: str = ""
    image_package: str = "linux-image-{abi}-unsigned"
    dbg_package: str = "linux-image-{abi}-dbg"
    cmdline: tuple[str, ...] = ()
    required_symbols: tuple[str, ...] = ()
    kind: str = "plain"

    @classmethod
    def from_toml(cls, path: Path) -> KernelRecipe:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read kernel recipe: {exc}") from exc
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        for key in ("meta_packages", "cmdline", "required_symbols"):
            if key in data:
                if not isinstance(data[key], list) or not all(isinstance(x, str) for x in data[key]):
                    raise ConfigError(f"{path}: bad {key}: got {data[key]!r}, want a list of strings")
                data[key] = tuple(data[key])
        for key in ("image_package", "dbg_package"):
            if key in data and "{abi}" not in str(data[key]):
                raise ConfigError(f"{path}: bad {key}: got {data[key]!r}, want a name containing '{{abi}}'")
        if "meta_packages" in data and not data["meta_packages"]:
            raise ConfigError(f"{path}: bad meta_packages: got [], want at least one package")
        return cls(name=path.stem, **data)


@dataclass(frozen=True)
class Kernel:
    """A fetched kernel in the cache: what a run boots and what the tracer reads symbols from."""

    recipe: KernelRecipe
    release: str
    directory: Path
    info: dict = field(default_factory=dict, compare=False)

    @property
    def bzimage(self) -> Path:
        return self.directory / "bzImage"

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def config(self) -> Path:
        return self.directory / "config"

    @property
    def build_id(self) -> str:
        return self.info.get("build_id", "")

    def manifest(self) -> dict:
        """What the run manifest records about the kernel."""
        return {"recipe": self.recipe.name, "release": self.release, **{
            k: self.info.get(k) for k in ("packages", "build_id", "banner", "bzimage_version")}}


# --- recipes -----------------------------------------------------------------------------------------------

def available(directory: Path = KERNEL_RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.toml"))


def load_recipe(name: str, directory: Path = KERNEL_RECIPES_DIR) -> KernelRecipe:
    path = Path(directory) / f"{name}.toml"
    if not path.exists():
        raise UnknownNameError(f"unknown kernel {name!r} (known: {', '.join(available(directory))})")
    return KernelRecipe.from_toml(path)


# --- apt ---------------------------------------------------------------------------------------------------

def _apt(argv: list[str], cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise ToolMissingError(f"{argv[0]} not found: lazytrace fetches kernels with Debian's apt tools")
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise InfraError(f"{argv[0]} timed out after {APT_TIMEOUT_S} s", argv=argv) from exc
    if proc.returncode != 0:
        raise InfraError(f"{' '.join(argv[:2])} failed", argv=argv, returncode=proc.returncode,
                         log_tail="\n".join((proc.stderr or proc.stdout).splitlines()[-10:]))
    return proc.stdout


def _version_gt(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0


def _package_stanzas(pkg: str) -> list[dict[str, str]]:
    """All versions apt knows of a package, as dicts of control fields (empty if none)."""
    try:
        out = _apt(["apt-cache", "show", pkg])
    except InfraError:
        return []
    stanzas = []
    for block in out.strip().split("\n\n"):
        d: dict[str, str] = {}
        for line in block.splitlines():
            m = re.match(r"^([A-Za-z0-9-]+): ?(.*)$", line)
            if m:
                d[m.group(1)] = m.group(2)
        if d.get("Version"):
            stanzas.append(d)
    return stanzas


def _candidate(pkg: str) -> str | None:
    out = _apt(["apt-cache", "policy", pkg])
    m = re.search(r"Candidate:\s*(\S+)", out)
    return m.group(1) if m and m.group(1) != "(none)" else None


@dataclass(frozen=True)
class Resolved:
    abi: str
    meta_package: str
    meta_version: str
    image: tuple[str, str, int]   # (package, version, size)
    dbg: tuple[str, str, int]


def resolve(recipe: KernelRecipe) -> Resolved:
    """Resolve a recipe to exact packages with apt's metadata (no download).

    :raises KernelError: no meta package offers a version matching the recipe on this Debian release.
    """
    tried = []
    for meta in recipe.meta_packages:
        stanzas = _package_stanzas(meta)
        if not stanzas:
            tried.append(f"{meta}: unknown to apt")
            continue
        if recipe.version_prefix:
            matching = [s for s in stanzas if s["Version"].startswith(recipe.version_prefix)]
            best = None
            for s in matching:
                if best is None or _version_gt(s["Version"], best["Version"]):
                    best = s
        else:
            cand = _candidate(meta)
            best = next((s for s in stanzas if s["Version"] == cand), None)
        if best is None:
            tried.append(f"{meta}: versions {', '.join(s['Version'] for s in stanzas)}")
            continue
        m = re.search(r"linux-image-(\S+?)\s*(\(|,|$)", best.get("Depends", ""))
        if not m:
            tried.append(f"{meta} {best['Version']}: no linux-image-<abi> dependency")
            continue
        abi = m.group(1)
        pkgs = []
        for tmpl in (recipe.image_package, recipe.dbg_package):
            name = tmpl.format(abi=abi)
            st = _package_stanzas(name)
            if not st:
                raise KernelError(f"kernel {recipe.name}: {name} is not available from apt "
                                  "(run apt-get update; is the suite in apt's sources?)")
            top = st[0]
            for s in st[1:]:
                if _version_gt(s["Version"], top["Version"]):
                    top = s
            pkgs.append((name, top["Version"], int(top.get("Size", "0"))))
        return Resolved(abi, meta, best["Version"], pkgs[0], pkgs[1])
    want = f"a version starting {recipe.version_prefix!r}" if recipe.version_prefix else "a candidate"
    raise KernelError(f"kernel {recipe.name}: no meta package offers {want} on this Debian release "
                      f"({Path('/etc/debian_version').read_text().strip() if Path('/etc/debian_version').exists() else '?'}); "
                      f"tried: {'; '.join(tried)}")


# --- cache -------------------------------------------------------------------------------------------------

def kernels_cache() -> Path:
    return cache_dir() / "kernels"


def cached(recipe: KernelRecipe) -> Kernel | None:
    """The kernel a recipe last resolved to, if it is in the cache and complete."""
    pointer = kernels_cache() / f"{recipe.name}.json"
    if not pointer.exists():
        return None
    try:
        release = json.loads(pointer.read_text())["release"]
        d = kernels_cache() / release
        info = json.loads((d / "kernel.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    k = Kernel(recipe, release, d, info)
    if not (k.bzimage.exists() and k.vmlinux.exists()):
        return None
    return k


def get_kernel(name: str, *, fetch_missing: bool = True, progress: Callable | None = None) -> Kernel:
    """The cached kernel for a recipe; fetched first if absent and ``fetch_missing``.

    A cached kernel is checked cheaply (files present, sizes unchanged since verification).

    :raises KernelError: not fetched (and not allowed to fetch), or the cache was altered since it was verified.
    """
    recipe = load_recipe(name)
    k = cached(recipe)
    if k is None:
        if not fetch_missing:
            raise KernelError(f"kernel {name!r} is not fetched: run `lazytrace kernels fetch {name}`")
        k = fetch(recipe, progress=progress)
    sizes = k.info.get("sizes", {})
    for fname, size in sizes.items():
        p = k.directory / fname
        if not p.exists() or p.stat().st_size != size:
            raise KernelError(f"kernel {name!r}: {p} changed since it was verified "
                              f"(run `lazytrace kernels verify {name}` or fetch it again)")
    return k


def fetch(recipe: KernelRecipe, *, progress: Callable[[str, int, int], None] | None = None) -> Kernel:
    """Resolve, download and unpack a recipe's kernel into the cache, then verify it (idempotent).

    :param progress: called as ``progress(what, done_bytes, total_bytes)`` during the download.
    """
    res = resolve(recipe)
    release = res.abi
    kernels_cache().mkdir(parents=True, exist_ok=True)
    d = kernels_cache() / release
    info_path = d / "kernel.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("packages", {}).get("image", {}).get("version") == res.image[1]:
            _point(recipe, release)
            return Kernel(recipe, release, d, info)
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    files = []
    for pkg, version, size in (res.image, res.dbg):
        fname = f"{pkg}_{version.replace(':', '%3a')}_amd64.deb"
        path = debs / fname
        if not path.exists() or (size and path.stat().st_size != size):
            _download(pkg, version, size, debs, path, progress)
        files.append(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{release}-", dir=kernels_cache()))
    try:
        _extract(files[0], tmp, {f"./boot/vmlinuz-{release}": "bzImage", f"./boot/config-{release}": "config"})
        if progress:
            progress("unpacking vmlinux", 0, 1)
        _extract(files[1], tmp, {f"./usr/lib/debug/boot/vmlinux-{release}": "vmlinux"})
        info = verify_files(tmp / "bzImage", tmp / "vmlinux", recipe)
        info["packages"] = {
            "meta": {"name": res.meta_package, "version": res.meta_version},
            "image": {"name": res.image[0], "version": res.image[1]},
            "dbg": {"name": res.dbg[0], "version": res.dbg[1]},
        }
        info["release"] = release
        (tmp / "kernel.json").write_text(json.dumps(info, indent=2))
        tmp.chmod(0o755)
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _point(recipe, release)
    return Kernel(recipe, release, d, info)


def _point(recipe: KernelRecipe, release: str) -> None:
    (kernels_cache() / f"{recipe.name}.json").write_text(json.dumps({"release": release}))


def _download(pkg: str, version: str, size: int, debs: Path, dest: Path,
              progress: Callable[[str, int, int], None] | None) -> None:
    """``apt-get download`` into a scratch dir, reporting progress from the growing file."""
    with tempfile.TemporaryDirectory(dir=debs) as tmpd:
        done = threading.Event()
        result: dict = {}

        def run() -> None:
            try:
                _apt(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=Path(tmpd))
            except Exception as exc:
                result["error"] = exc
            finally:
                done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        while not done.wait(0.5):
            if progress:
                got = sum(p.stat().st_size for p in Path(tmpd).rglob("*") if p.is_file())
                progress(pkg, got, size)
        t.join()
        if "error" in result:
            raise result["error"]
        got = list(Path(tmpd).glob("*.deb"))
        if not got:
            raise InfraError(f"apt-get download {pkg}={version} produced no .deb")
        shutil.move(str(got[0]), dest)
        if progress:
            progress(pkg, size, size)


def _extract(deb: Path, dest: Path, members: dict[str, str]) -> None:
    """Unpack only ``members`` (tar paths -> file names in ``dest``) from a .deb."""
    with tempfile.TemporaryDirectory(dir=dest) as tmpd:
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "-C", tmpd, *members], stdin=fsys.stdout, capture_output=True,
                             text=True)
        fsys.stdout.close()
        fsys.wait()
        if fsys.returncode != 0 or tar.returncode != 0:
            raise KernelError(f"{deb}: cannot unpack {', '.join(members)}: {tar.stderr.strip()}")
        for member, name in members.items():
            (Path(tmpd) / member).rename(dest / name)


def verify_files(bzimage: Path, vmlinux: Path, recipe: KernelRecipe) -> dict:
    """Verify a bzImage/vmlinux pair: same build, DWARF present, required symbols resolve.

    :returns: facts for ``kernel.json`` (banner, bzImage version, build-id, sizes).
    :raises KernelError: the specific problem.
    """
    for p in (bzimage, vmlinux):
        if not Path(p).exists():
            raise KernelError(f"kernel {recipe.name}: {p} is missing")
    bz, banner = elfinfo.check_pair(bzimage, vmlinux)
    if not elfinfo.has_dwarf(vmlinux):
        raise KernelError(f"kernel {recipe.name}: {vmlinux} has no DWARF (.debug_info): "
                          "the tracer needs the -dbg package's vmlinux")
    missing = elfinfo.missing_symbols(vmlinux, REQUIRED_SYMBOLS + recipe.required_symbols)
    if missing:
        raise KernelError(f"kernel {recipe.name}: symbols the tracer needs are missing from {vmlinux}: "
                          + ", ".join(missing))
    return {
        "bzimage_version": bz,
        "banner": banner,
        "build_id": elfinfo.build_id(vmlinux),
        "sizes": {"bzImage": Path(bzimage).stat().st_size, "vmlinux": Path(vmlinux).stat().st_size},
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def verify(name: str) -> Kernel:
    """Full verification of a cached kernel (``lazytrace kernels verify NAME``)."""
    recipe = load_recipe(name)
    k = cached(recipe)
    if k is None:
        raise KernelError(f"kernel {name!r} is not fetched: run `lazytrace kernels fetch {name}`")
    info = verify_files(k.bzimage, k.vmlinux, recipe)
    if k.info.get("build_id") and info["build_id"] != k.info["build_id"]:
        raise KernelError(f"kernel {name!r}: vmlinux build-id {info['build_id']} differs from the one recorded "
                          f"at fetch time ({k.info['build_id']})")
    merged = {**k.info, **info}
    (k.directory / "kernel.json").write_text(json.dumps(merged, indent=2))
    return Kernel(recipe, k.release, k.directory, merged)
