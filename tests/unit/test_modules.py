"""Guest kernel modules: sources, Debian header packages, the build cache, workloads that ship modules.

The pure parts (Depends parsing, Makefile relocation, source hashing, workload validation) need nothing.
``test_build_lazyviolate_for_the_default_kernel`` builds the real module against Debian's real headers for the
cached default kernel (apt-get download of ~15 MB the first time, then cached): it skips, saying what to run,
when that kernel is not fetched.
"""

from __future__ import annotations

import gzip
import io
import subprocess
from pathlib import Path

import pytest

from tracer import initramfs, kernels, modules, workloads
from tracer.errors import ConfigError, KernelError, ToolMissingError, UnknownNameError

# Real Depends fields of Debian's headers packages (apt-cache show, November 2026).
DEPENDS_61 = ("linux-headers-6.1.0-56-common (= 6.1.192-2), linux-kbuild-6.1 (>= 6.1.192-2), "
              "linux-compiler-gcc-12-x86")
DEPENDS_612 = ("linux-base (>= 4.12~), linux-headers-6.12.117+deb12-common (= 6.12.117-1~deb12u1), "
               "linux-image-6.12.117+deb12-cloud-amd64 (= 6.12.117-1~deb12u1) | "
               "linux-image-6.12.117+deb12-cloud-amd64-unsigned (= 6.12.117-1~deb12u1), "
               "linux-kbuild-6.12.117+deb12, gcc-12")
DEPENDS_61_RT = ("linux-headers-6.1.0-56-common-rt (= 6.1.192-2), linux-kbuild-6.1 (>= 6.1.192-2), "
                 "linux-compiler-gcc-12-x86")


def test_parse_depends_keeps_relations_and_first_alternative():
    deps = modules.parse_depends(DEPENDS_612)
    assert [d.name for d in deps] == [
        "linux-base", "linux-headers-6.12.117+deb12-common", "linux-image-6.12.117+deb12-cloud-amd64",
        "linux-kbuild-6.12.117+deb12", "gcc-12"]
    assert (deps[0].op, deps[0].version) == (">=", "4.12~")
    assert (deps[1].op, deps[1].version) == ("=", "6.12.117-1~deb12u1")
    assert deps[3].op is None and deps[3].version is None


@pytest.mark.parametrize("depends, want", [
    (DEPENDS_61, [("linux-headers-6.1.0-56-common", "=", "6.1.192-2"), ("linux-kbuild-6.1", ">=", "6.1.192-2")]),
    (DEPENDS_612, [("linux-headers-6.12.117+deb12-common", "=", "6.12.117-1~deb12u1"),
                   ("linux-kbuild-6.12.117+deb12", None, None)]),
    (DEPENDS_61_RT, [("linux-headers-6.1.0-56-common-rt", "=", "6.1.192-2"),
                     ("linux-kbuild-6.1", ">=", "6.1.192-2")]),
])
def test_header_dependencies_are_the_kbuild_trees(depends, want):
    assert [(d.name, d.op, d.version) for d in modules.header_dependencies(depends)] == want


def test_unparsable_relation_is_a_kernel_error():
    with pytest.raises(KernelError, match="cannot parse package relation"):
        modules.parse_depends("linux-kbuild-6.1 (~= 1)")


def test_relocate_makefile_points_at_the_unpacked_common_tree(tmp_path: Path):
    text = "include /usr/src/linux-headers-6.1.0-56-common/Makefile\n"
    out = modules.relocate_makefile(text, tmp_path)
    assert out == f"include {tmp_path}/usr/src/linux-headers-6.1.0-56-common/Makefile\n"
    # A cache that moved: the include follows it.
    assert modules.relocate_makefile(out, tmp_path / "moved") == \
        f"include {tmp_path}/moved/usr/src/linux-headers-6.1.0-56-common/Makefile\n"
    with pytest.raises(KernelError, match="unexpected flavour Makefile"):
        modules.relocate_makefile("all:\n\ttrue\n", tmp_path)


def test_kernel_compiler_comes_from_kernelvariables(tmp_path: Path):
    (tmp_path / ".kernelvariables").write_text(
        "override ARCH = x86\nCC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-99\n")
    with pytest.raises(ToolMissingError, match="gcc-99 not found.*apt-get install gcc-99"):
        modules.kernel_compiler(tmp_path)


def test_source_hash_follows_sources_not_build_products(tmp_path: Path):
    (tmp_path / "Kbuild").write_text("obj-m := m.o\n")
    (tmp_path / "m.c").write_text("int x;\n")
    h = modules.source_hash(tmp_path)
    for product in ("m.o", "m.ko", "m.mod", "m.mod.c", ".m.o.cmd", "modules.order", "Module.symvers"):
        (tmp_path / product).write_text("junk")
    assert modules.source_hash(tmp_path) == h
    assert [p.name for p in modules.source_files(tmp_path)] == ["Kbuild", "m.c"]
    (tmp_path / "m.c").write_text("int y;\n")
    assert modules.source_hash(tmp_path) != h


def test_shipped_module_is_known_and_unknown_names_are_refused():
    assert "lazyviolate" in modules.available()
    assert (modules.module_dir("lazyviolate") / "lazyviolate.c").exists()
    with pytest.raises(UnknownNameError, match="unknown module 'nope' .*lazyviolate"):
        modules.module_dir("nope")
    with pytest.raises(UnknownNameError):
        modules.module_dir("../lazyviolate")


def test_violate_workloads_ask_for_the_module():
    names = [w for w in workloads.available() if w.startswith("violate-")]
    assert set(names) >= {"violate-apply-kernel", "violate-lazy-preempt", "violate-lazy-migrate",
                          "violate-unpaired", "violate-irq-lazy"}
    for n in names:
        wl = workloads.load_workload(n)
        assert wl.modules == ("lazyviolate",)
        scenario = n.removeprefix("violate-")
        assert f"scenario={scenario}" in wl.script.read_text()
    assert workloads.load_workload("fork-exec").modules == ()


@pytest.mark.parametrize("body, message", [
    ('modules = "lazyviolate"', "bad modules: got 'lazyviolate', want a list of strings"),
    ('modules = ["nope"]', "modules: unknown module 'nope'"),
])
def test_bad_modules_key(tmp_path: Path, body: str, message: str):
    (tmp_path / "run.sh").write_text("true\n")
    (tmp_path / "workload.toml").write_text(body + "\n")
    with pytest.raises(ConfigError, match=message):
        workloads.load_workload(str(tmp_path))


def test_vermagic_of_a_non_module(tmp_path: Path):
    p = tmp_path / "x.ko"
    p.write_bytes(b"not an elf")
    with pytest.raises(ConfigError, match="not a readable kernel module"):
        modules.vermagic(p)


def _default_kernel() -> kernels.Kernel:
    k = kernels.cached(kernels.load_recipe(kernels.DEFAULT_KERNEL))
    if k is None:
        pytest.skip(f"kernel {kernels.DEFAULT_KERNEL} not fetched (run `lazytrace kernels fetch "
                    f"{kernels.DEFAULT_KERNEL}`)")
    return k


def test_build_lazyviolate_for_the_default_kernel(tmp_path: Path):
    """The real module, built against the real Debian headers; the second build is the cached file."""
    k = _default_kernel()
    ko = modules.build_module("lazyviolate", k)
    assert ko.parent.name == k.release
    vm = modules.vermagic(ko)
    assert vm.split(" ")[0] == k.release and "mod_unload" in vm
    assert modules.build_module("lazyviolate", k) == ko
    info = (modules.headers_root(k.release) / "headers.json").read_text()
    assert f"linux-headers-{k.release}" in info and modules.kernel_version(k) in info
    # The module names its license (GPL: it uses EXPORT_SYMBOL_GPL symbols) and its scenarios parameter.
    modinfo = ko.read_bytes()
    assert b"license=GPL" in modinfo and b"parm=scenario:" in modinfo

    files = modules.initramfs_files(["lazyviolate"], k)
    assert files == {"lib/modules/lazyviolate.ko": ko.read_bytes()}
    img = initramfs.build_initramfs(workloads.load_workload("violate-unpaired"), files)
    data = gzip.decompress(img.read_bytes())
    listing = subprocess.run([str(initramfs.find_busybox()), "cpio", "-t"], input=data, capture_output=True,
                             check=True).stdout.decode()
    assert "lib/modules/lazyviolate.ko" in listing.split()
    assert io.BytesIO(data).read(6) == b"070701"
