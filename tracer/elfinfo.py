"""What lazytrace needs to know about a kernel image: build-id, banner, DWARF presence, symbols.

``vmlinux`` is an ELF with DWARF (Debian's ``-dbg`` package); ``bzImage`` is the compressed boot image whose
setup header points at a version string (``kernel_version``, Documentation/arch/x86/boot.rst). Together they
tell whether a vmlinux belongs to the kernel that boots.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .errors import KernelError


def build_id(vmlinux: Path) -> str:
    """The GNU build-id of an ELF file, as hex.

    :raises KernelError: not an ELF, or no build-id note.
    """
    try:
        with open(vmlinux, "rb") as f:
            elf = ELFFile(f)
            for sec in elf.iter_sections():
                if sec.header.sh_type == "SHT_NOTE":
                    for note in sec.iter_notes():
                        if note["n_name"] == "GNU" and note["n_type"] == "NT_GNU_BUILD_ID":
                            return note["n_desc"]
    except (ELFError, OSError) as exc:
        raise KernelError(f"{vmlinux}: not a readable ELF file: {exc}") from exc
    raise KernelError(f"{vmlinux}: no GNU build-id note")


def has_dwarf(vmlinux: Path) -> bool:
    """True if the ELF has a non-empty ``.debug_info`` section."""
    with open(vmlinux, "rb") as f:
        sec = ELFFile(f).get_section_by_name(".debug_info")
        return sec is not None and sec.header.sh_size > 0


def vmlinux_banner(vmlinux: Path) -> str:
    """The ``linux_banner`` string ("Linux version 6.1.0-... #1 SMP ... Debian 6.1.192-2 (date)").

    Read through the symbol table: the image also holds an older, unstamped copy of the banner
    (init/version.c vs init/version-timestamp.c), so a plain string search would find the wrong one.
    """
    try:
        with open(vmlinux, "rb") as f:
            elf = ELFFile(f)
            symtab = elf.get_section_by_name(".symtab")
            syms = symtab.get_symbol_by_name("linux_banner") if symtab is not None else None
            if not syms:
                raise KernelError(f"{vmlinux}: no linux_banner symbol (stripped image?)")
            addr = syms[0]["st_value"]
            for sec in elf.iter_sections():
                start = sec.header.sh_addr
                if sec.header.sh_type == "SHT_PROGBITS" and start <= addr < start + sec.header.sh_size:
                    f.seek(sec.header.sh_offset + addr - start)
                    raw = f.read(512)
                    return raw.split(b"\x00", 1)[0].decode("latin-1").rstrip("\n")
    except (ELFError, OSError) as exc:
        raise KernelError(f"{vmlinux}: not a readable ELF file: {exc}") from exc
    raise KernelError(f"{vmlinux}: linux_banner is not in a loadable section")


def bzimage_version(bzimage: Path) -> str:
    """The version string from a bzImage's setup header (``kernel_version`` at 0x20e, boot protocol >= 2.00).

    :raises KernelError: not a bzImage.
    """
    with open(bzimage, "rb") as f:
        head = f.read(0x10000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise KernelError(f"{bzimage}: not an x86 bzImage (no 'HdrS' setup header)")
    (ptr,) = struct.unpack_from("<H", head, 0x20E)
    off = ptr + 0x200
    end = head.find(b"\x00", off)
    if ptr == 0 or end < 0:
        raise KernelError(f"{bzimage}: setup header has no kernel_version string")
    return head[off:end].decode("latin-1")


def release_of(version: str) -> str:
    """The kernel release (``uname -r``) at the start of a bzImage version or after 'Linux version'."""
    v = version.removeprefix("Linux version ")
    return v.split(" ", 1)[0]


def check_pair(bzimage: Path, vmlinux: Path) -> tuple[str, str]:
    """Check that a bzImage and a vmlinux are the same build.

    The bzImage string is ``<release> (<builder>) #<n> SMP ... <date>``; ``linux_banner`` is
    ``Linux version <release> (<builder>) (<compiler>) #<n> SMP ... <date>``: the release and the
    ``#n ...`` tail must both agree.

    :returns: (bzImage version, vmlinux banner)
    :raises KernelError: they differ (the message shows both).
    """
    bz = bzimage_version(bzimage)
    banner = vmlinux_banner(vmlinux)
    tail_bz = bz[bz.find("#"):].strip() if "#" in bz else ""
    tail_vm = banner[banner.find("#"):].strip()
    if release_of(bz) != release_of(banner) or not tail_bz or tail_bz != tail_vm:
        raise KernelError(
            f"bzImage and vmlinux are different builds:\n    bzImage: {bz}\n    vmlinux: {banner}\n"
            "refetch the kernel (lazytrace kernels fetch NAME) or fix the recipe's paths"
        )
    return bz, banner


def missing_symbols(vmlinux: Path, names: Iterable[str]) -> list[str]:
    """The names among ``names`` that are not in the vmlinux symbol table."""
    wanted = set(names)
    with open(vmlinux, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        if symtab is None:
            return sorted(wanted)
        for sym in symtab.iter_symbols():
            wanted.discard(sym.name)
            if not wanted:
                break
    return sorted(wanted)
