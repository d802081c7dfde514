"""xen-pv without booting anything: profiles, hypervisor image verification, the cache, QEMU's multiboot argv.

Images are small hand-built files (a 32-bit ELF with a multiboot header and Xen's banner, and the ways one
can be wrong), plus the real Debian image and kernels when they are in the cache.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tracer import kernels, profiles, xen
from tracer.errors import ConfigError, KernelError
from tracer.qemu import GuestConfig, kernel_cmdline, qemu_argv
from tracer.xen import HypervisorError

XEN_PROFILE = "xen-pv-smp2"
DOM0_KERNEL = "debian-6.1-amd64"


# --- hand-built images ---------------------------------------------------------------------------------------

def elf32_multiboot(*, flags: int = 0x3, checksum_delta: int = 0, banner: bytes = b"Xen version %d.%d%s (",
                    machine: int = 3, mb_offset: int = 0x40) -> bytes:
    """A minimal i386 ELF executable carrying a multiboot 1 header and (optionally) Xen's banner."""
    ehdr = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, 0x200000, 0, 0, 0, 52, 32, 0, 40, 0, 0)
    body = bytearray(ehdr.ljust(mb_offset, b"\x00"))
    body += struct.pack("<III", xen.MULTIBOOT_MAGIC, flags, (-(xen.MULTIBOOT_MAGIC + flags) + checksum_delta) & 0xFFFFFFFF)
    body += bytes(256) + banner + bytes(64)
    return bytes(body)


@pytest.fixture
def good_image(tmp_path: Path) -> Path:
    p = tmp_path / "xen"
    p.write_bytes(elf32_multiboot())
    return p


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_good_image_verifies(good_image: Path):
    info = xen.verify_image(good_image)
    assert info["multiboot"] == {"offset": 0x40, "flags": 0x3}
    assert info["size"] == good_image.stat().st_size and len(info["sha256"]) == 64
    assert info["build_id"] == ""  # no note in the hand-built file: still bootable


@pytest.mark.parametrize("data, message", [
    (gzip.compress(elf32_multiboot()), "is gzip-compressed: QEMU's multiboot loader needs it uncompressed"),
    (b"\x7fELF\x02\x01\x01" + bytes(200), "is a 64-bit ELF file (xen-syms, or a Linux vmlinux?)"),
    (bytes(0x202) + b"HdrS" + bytes(0x1000), "has no multiboot header in its first 8192 bytes (it is a Linux bzImage)"),
    (b"just some text\n" * 100, "has no multiboot header in its first 8192 bytes: not a Xen image QEMU can boot"),
    (elf32_multiboot(checksum_delta=1), "multiboot header at offset 0x40 has a bad checksum"),
    (elf32_multiboot(banner=b"GRUB"), "is a multiboot image but not Xen (no 'Xen version' banner)"),
    (elf32_multiboot(machine=62), "is an ELF file for another machine (e_machine 62), want i386"),
    (elf32_multiboot(mb_offset=9000), "has no multiboot header in its first 8192 bytes"),
    (bytes(64) + elf32_multiboot()[64:], "multiboot header asks for ELF loading but the file is not ELF"),
], ids=["gzip", "elf64", "bzimage", "text", "bad-checksum", "not-xen", "x86_64-machine", "header-too-late",
        "not-elf"])
def test_wrong_images_are_specific_errors(tmp_path: Path, data: bytes, message: str):
    p = write(tmp_path, "xen", data)
    with pytest.raises(HypervisorError) as ei:
        xen.verify_image(p)
    assert message in ei.value.message and str(p) in ei.value.message
    assert ei.value.exit_status == 2


def test_missing_image(tmp_path: Path):
    with pytest.raises(HypervisorError, match=r"hypervisor image .*/nope is missing"):
        xen.verify_image(tmp_path / "nope")


def test_multiboot_header_is_found_only_where_qemu_looks():
    hdr = struct.pack("<III", xen.MULTIBOOT_MAGIC, 0, (-xen.MULTIBOOT_MAGIC) & 0xFFFFFFFF)
    assert xen.find_multiboot_header(bytes(8) + hdr) == (8, 0)
    assert xen.find_multiboot_header(bytes(6) + hdr + bytes(8)) is None      # not 4-byte aligned
    assert xen.find_multiboot_header(bytes(8192) + hdr) is None              # past the search window


# --- real images from the cache (skipped, with the command to run, when they are not fetched) ---------------

def cached_kernel(name: str) -> kernels.Kernel:
    k = kernels.cached(kernels.load_recipe(name))
    if k is None:
        pytest.skip(f"kernel {name} not fetched (run `lazytrace kernels fetch {name}`)")
    return k


def cached_hypervisor() -> xen.Hypervisor:
    hv = xen.cached(profiles.load_profile(XEN_PROFILE))
    if hv is None:
        pytest.skip(f"Xen not fetched (run `lazytrace xen fetch {XEN_PROFILE}`)")
    return hv


def test_debian_image_in_cache_verifies_and_records_its_version():
    hv = cached_hypervisor()
    info = xen.verify_image(hv.image)
    assert info["sha256"] == hv.info["sha256"] and info["build_id"] == hv.info["build_id"] != ""
    assert hv.info["package"]["name"].startswith("xen-hypervisor-") and hv.info["package"]["version"]
    major_minor = xen.HYPERVISOR_PACKAGE_RE.match(hv.info["package"]["name"]).group(1)
    assert hv.version.startswith(major_minor + ".")  # "4.17.7" from xen-hypervisor-4.17-amd64's config
    assert hv.info["package"]["version"].startswith(hv.version)


def test_kernel_images_are_not_hypervisors():
    k = cached_kernel(kernels.DEFAULT_KERNEL)
    with pytest.raises(HypervisorError, match="it is a Linux bzImage"):
        xen.verify_image(k.bzimage)
    with pytest.raises(HypervisorError, match="64-bit ELF file"):
        xen.verify_image(k.vmlinux)


def test_only_dom0_capable_kernels_are_accepted():
    xen.check_dom0_kernel(cached_kernel(DOM0_KERNEL))
    with pytest.raises(KernelError, match=r"cannot boot as a Xen dom0: its config lacks CONFIG_XEN_DOM0"):
        xen.check_dom0_kernel(cached_kernel("debian-6.1-cloud"))


# --- the cache ---------------------------------------------------------------------------------------------

def fake_cached(tmp_path: Path, monkeypatch, image: bytes) -> tuple[profiles.MachineProfile, Path]:
    """A cache holding one 'fetched' hypervisor whose xen.json describes ``elf32_multiboot()``."""
    monkeypatch.setenv("LAZYTRACE_CACHE", str(tmp_path / "cache"))
    prof = profiles.load_profile(XEN_PROFILE)
    d = xen.xen_cache() / "4.17.7-1"
    d.mkdir(parents=True)
    good = write(d, "xen", elf32_multiboot())
    info = {**xen.verify_image(good), "xen_version": "4.17.7",
            "package": {"name": "xen-hypervisor-4.17-amd64", "version": "4.17.7-1"}}
    (d / "xen.json").write_text(json.dumps(info))
    (xen.xen_cache() / f"{prof.xen_package}.json").write_text(json.dumps({"version": "4.17.7-1"}))
    good.write_bytes(image)
    return prof, d / "xen"


def test_cached_image_is_used_when_intact(tmp_path: Path, monkeypatch):
    prof, img = fake_cached(tmp_path, monkeypatch, elf32_multiboot())
    hv = xen.get_hypervisor(prof, fetch_missing=False)
    assert hv.image == img and hv.source == "package" and hv.version == "4.17.7"
    m = hv.manifest()
    assert m["package"] == {"name": "xen-hypervisor-4.17-amd64", "version": "4.17.7-1"}
    assert m["xen_version"] == "4.17.7" and m["sha256"] == hv.info["sha256"]


def test_cached_image_that_changed_is_refused(tmp_path: Path, monkeypatch):
    prof, img = fake_cached(tmp_path, monkeypatch, elf32_multiboot(banner=b"Xen version 9.9 patched ("))
    with pytest.raises(HypervisorError, match=r"changed since it was fetched .*delete .* fetches it again"):
        xen.get_hypervisor(prof, fetch_missing=False)


def test_cached_image_that_vanished_is_refused(tmp_path: Path, monkeypatch):
    prof, img = fake_cached(tmp_path, monkeypatch, b"")
    img.unlink()
    with pytest.raises(HypervisorError, match=r"cached hypervisor image .* is missing \(delete "):
        xen.get_hypervisor(prof, fetch_missing=False)


def test_not_fetched_without_permission_to_fetch(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LAZYTRACE_CACHE", str(tmp_path))
    with pytest.raises(HypervisorError, match="hypervisor xen-system-amd64 is not fetched"):
        xen.get_hypervisor(profiles.load_profile(XEN_PROFILE), fetch_missing=False)


def test_local_image_from_the_profile(tmp_path: Path, good_image: Path):
    prof = profiles.load_profile(XEN_PROFILE).with_overrides(xen_image=str(good_image))
    hv = xen.get_hypervisor(prof)
    assert hv.source == "local" and hv.image == good_image and hv.version is None
    with pytest.raises(HypervisorError, match=r"profile xen-pv-smp2: xen_image: hypervisor image .* is missing"):
        xen.get_hypervisor(prof.with_overrides(xen_image=str(tmp_path / "missing")))


def test_plain_profile_has_no_hypervisor():
    with pytest.raises(ConfigError, match="boots no hypervisor"):
        xen.get_hypervisor(profiles.load_profile("tcg-smp2"))


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="no apt-cache (not a Debian host)")
def test_package_resolution_with_apt_metadata():
    prof = profiles.load_profile(XEN_PROFILE)
    ref = xen.resolve_package(prof)
    assert xen.HYPERVISOR_PACKAGE_RE.match(ref.name) and ref.size > 0
    assert ref.via == ("xen-system-amd64", ref.version)  # meta and hypervisor come from one source package
    assert set(ref.members.values()) == {"xen.gz", "config"}
    direct = xen.resolve_package(prof.with_overrides(xen_package=ref.name))
    assert (direct.name, direct.version, direct.via) == (ref.name, ref.version, None)
    with pytest.raises(HypervisorError, match=r"xen-system-amd64 has no version starting '9\.99\.'"):
        xen.resolve_package(prof.with_overrides(xen_version_prefix="9.99."))
    with pytest.raises(HypervisorError, match="hypervisor package xen-hypervisor-0.0-amd64 is unknown to apt"):
        xen.resolve_package(prof.with_overrides(xen_package="xen-hypervisor-0.0-amd64"))


# --- console and config facts --------------------------------------------------------------------------------

def test_console_facts():
    text = ("\x1b[0m(XEN) Xen version 4.17.7 (Debian 4.17.7+13-g2445b30a44-0+deb12u1) "
            "(pkg-xen-devel@lists.alioth.debian.org) (gcc) debug=n Wed Nov  4 16:52:28 UTC 2026\r\n"
            "(XEN) build-id: 151b373fd64b321593bf987fd923cd10dabadac4\r\n")
    assert xen.console_facts(text) == {"version": "4.17.7", "build_info": "Debian 4.17.7+13-g2445b30a44-0+deb12u1",
                                       "build_id": "151b373fd64b321593bf987fd923cd10dabadac4"}
    assert xen.console_facts("Linux version 6.1") == {"version": None, "build_info": None, "build_id": None}


def test_config_version(tmp_path: Path):
    c = write(tmp_path, "config", b"#\n# Automatically generated file; DO NOT EDIT.\n# Xen/x86 4.17.7 Configuration\n#\n")
    assert xen.config_version(c) == "4.17.7"
    assert xen.config_version(write(tmp_path, "other", b"CONFIG_X=y\n")) is None
    assert xen.config_version(tmp_path / "absent") is None


# --- profiles ------------------------------------------------------------------------------------------------

def test_shipped_xen_profile():
    p = profiles.load_profile(XEN_PROFILE)
    assert (p.kind, p.accel, p.smp, p.memory_mib) == ("xen-pv", "tcg", 2, 1024)
    assert (p.dom0_vcpu_count, p.dom0_memory_mib, p.guest_cpus) == (2, 512, 2)
    assert p.xen_package == "xen-system-amd64" and p.xen_image == ""


@pytest.mark.parametrize("body, message", [
    ("dom0_vcpus = 3", "bad dom0_vcpus: got 3, want 0-2"),
    ("dom0_vcpus = -1", "bad dom0_vcpus: got -1, want 0-2"),
    ("dom0_memory_mib = 1000", "bad dom0_memory_mib: got 1000, want 128-896"),
    ("dom0_memory_mib = 64", "bad dom0_memory_mib: got 64, want 128-896"),
    ("memory_mib = 200\ndom0_memory_mib = 128", "bad memory_mib: got 200, want at least 256 with kind = 'xen-pv'"),
    ('xen_cmdline = "dom0_mem=1G"', "bad xen_cmdline: got 'dom0_mem=1G', want a list of strings"),
    ('xen_cmdline = ["a b"]', "bad xen_cmdline: got ('a b',), want a list of single arguments"),
    ('xen_package = ""', "bad xen_package: got '', want a Debian package name (or set xen_image)"),
])
def test_bad_xen_values_are_refused(tmp_path: Path, body: str, message: str):
    f = tmp_path / "bad.toml"
    f.write_text('kind = "xen-pv"\nsmp = 2\n' + ("" if body.startswith("memory_mib") else "memory_mib = 1024\n") + body + "\n")
    with pytest.raises(ConfigError) as ei:
        profiles.load_profile(str(f))
    assert message in str(ei.value) and str(f) in str(ei.value)


@pytest.mark.parametrize("body", ["dom0_vcpus = 1", 'xen_cmdline = ["sched=credit"]', 'xen_image = "/x"'])
def test_xen_fields_need_kind_xen_pv(tmp_path: Path, body: str):
    f = tmp_path / "plain.toml"
    f.write_text(body + "\n")
    with pytest.raises(ConfigError, match=r"only meaningful with kind = 'xen-pv' \(got kind 'plain'\)"):
        profiles.load_profile(str(f))


def test_dom0_vcpus_zero_means_every_cpu(tmp_path: Path):
    f = tmp_path / "x.toml"
    f.write_text('kind = "xen-pv"\nsmp = 4\nmemory_mib = 1024\n')
    p = profiles.load_profile(str(f))
    assert p.dom0_vcpu_count == 4 == p.guest_cpus and "dom0_max_vcpus=4" in xen.xen_cmdline(p)


# --- QEMU command line ---------------------------------------------------------------------------------------

def test_xen_cmdline_has_lazytrace_base_then_dom0_then_profile_extras():
    p = profiles.load_profile(XEN_PROFILE).with_overrides(xen_cmdline=("sched=credit2", "dom0_mem=256M"))
    words = xen.xen_cmdline(p).split()
    assert words[:len(xen.XEN_BASE_CMDLINE)] == list(xen.XEN_BASE_CMDLINE)
    assert "dom0_mem=512M,max:512M" in words and "dom0_max_vcpus=2" in words
    assert words[-2:] == ["sched=credit2", "dom0_mem=256M"]  # the profile's come last: Xen takes the last one


def test_multiboot_module_quoting(tmp_path: Path):
    assert xen.multiboot_module(Path("/k/bzImage"), "a=1,2 b") == "/k/bzImage a=1,,2 b"
    assert xen.multiboot_module(Path("/c,d/initrd")) == "/c,,d/initrd"
    with pytest.raises(ConfigError, match="cannot pass a path containing a space"):
        xen.multiboot_module(Path("/a b/initrd"))


def fake_kernel(tmp_path: Path, name: str = DOM0_KERNEL) -> kernels.Kernel:
    d = tmp_path / "k"
    d.mkdir(exist_ok=True)
    return kernels.Kernel(kernels.load_recipe(name), "6.1.0-99-amd64", d, {})


def test_qemu_argv_boots_xen_with_dom0_and_initramfs_as_modules(tmp_path: Path, good_image: Path):
    prof = profiles.load_profile(XEN_PROFILE)
    hv = xen.Hypervisor(good_image, "local", {})
    k = fake_kernel(tmp_path)
    cfg = GuestConfig(kernel=k, profile=prof, initramfs=tmp_path / "init.cpio.gz", workload="fork-exec",
                      iterations=3, cpus="0,1", hypervisor=hv)
    argv = qemu_argv(cfg, tmp_path / "run")
    opt = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("-")}
    assert opt["-kernel"] == str(good_image)
    assert opt["-append"] == xen.xen_cmdline(prof)
    assert (opt["-smp"], opt["-m"]) == ("2", "1024M")
    dom0 = kernel_cmdline(cfg)
    assert "console=ttyS0" not in dom0.split() and dom0.split()[:3] == list(xen.DOM0_CMDLINE)
    assert "lt.cpus=0,1" in dom0 and "preempt=full" in dom0
    assert opt["-initrd"] == f"{k.bzimage} {dom0.replace(',', ',,')},{tmp_path / 'init.cpio.gz'}"
    assert argv.count("-kernel") == 1 and "-no-reboot" in argv


def test_plain_argv_is_unchanged(tmp_path: Path):
    k = fake_kernel(tmp_path, kernels.DEFAULT_KERNEL)
    cfg = GuestConfig(kernel=k, profile=profiles.load_profile("tcg-smp2"), initramfs=tmp_path / "i.gz",
                      workload="idle", iterations=1)
    argv = qemu_argv(cfg, tmp_path / "run")
    i = argv.index("-kernel")
    assert argv[i:i + 6] == ["-kernel", str(k.bzimage), "-initrd", str(tmp_path / "i.gz"), "-append",
                             kernel_cmdline(cfg)]
    assert kernel_cmdline(cfg).startswith("console=ttyS0 ")


def test_xen_profile_without_hypervisor_is_refused(tmp_path: Path):
    cfg = GuestConfig(kernel=fake_kernel(tmp_path), profile=profiles.load_profile(XEN_PROFILE),
                      initramfs=tmp_path / "i.gz", workload="idle", iterations=1)
    with pytest.raises(ConfigError, match="kind xen-pv but no hypervisor was resolved"):
        qemu_argv(cfg, tmp_path / "run")


# --- the CLI: a wrong or missing hypervisor is a specific input error, before any download or QEMU ----------

def lazytrace(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def xen_profile_file(tmp_path: Path, image: Path) -> Path:
    f = tmp_path / "my-xen.toml"
    f.write_text(profiles.PROFILES_DIR.joinpath(f"{XEN_PROFILE}.toml").read_text() + f'xen_image = "{image}"\n')
    return f


@pytest.mark.parametrize("image, message", [
    (None, "lazytrace: error: profile my-xen: xen_image: hypervisor image {path} is missing"),
    (b"not xen\n", "lazytrace: error: profile my-xen: xen_image: hypervisor image {path} has no multiboot header"),
    (gzip.compress(elf32_multiboot()), "lazytrace: error: profile my-xen: xen_image: hypervisor image {path} is "
                                       "gzip-compressed"),
], ids=["missing", "not-xen", "gzipped"])
def test_cli_wrong_or_missing_hypervisor(tmp_path: Path, image: bytes | None, message: str):
    path = tmp_path / "xen"
    if image is not None:
        path.write_bytes(image)
    r = lazytrace("boot", "--profile", str(xen_profile_file(tmp_path, path)), "--kernel", DOM0_KERNEL,
                  "--out", str(tmp_path / "run"), env={"LAZYTRACE_CACHE": str(tmp_path / "empty-cache")})
    assert r.returncode == 2, r.stderr
    assert message.format(path=path) in r.stderr
    assert not (tmp_path / "empty-cache" / "kernels").exists()  # refused before fetching a kernel
    assert not (tmp_path / "run" / "console.log").exists()     # and before starting QEMU


def test_cli_cloud_kernel_is_refused_as_dom0(tmp_path: Path):
    cached_kernel("debian-6.1-cloud")
    cached_hypervisor()
    r = lazytrace("boot", "--profile", XEN_PROFILE, "--kernel", "debian-6.1-cloud", "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert "lazytrace: error: kernel debian-6.1-cloud (6.1.0-" in r.stderr
    assert "cannot boot as a Xen dom0: its config lacks CONFIG_XEN_DOM0" in r.stderr


def test_xen_fetch_cli_refuses_a_profile_without_a_hypervisor():
    from click.testing import CliRunner

    from tracer.cli import cli

    r = CliRunner().invoke(cli, ["xen", "fetch", "tcg-smp2"])
    assert r.exit_code == 2 and "it boots no hypervisor" in r.output
    r = CliRunner().invoke(cli, ["xen", "fetch", "no-such-profile"])
    assert r.exit_code == 2 and "unknown profile" in r.output
