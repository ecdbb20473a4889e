"""Just enough of ELF to package edgemoe-rt: machine, DT_NEEDED, RUNPATH and symbol versions needed.

``edgemoe package`` reads the binary and the TVM runtime libraries with this (no ``readelf`` on the
packaging machine needed): which libraries to ship (the DT_NEEDED closure inside the TVM site
folder), which the board must already have and at what version (``GLIBC_2.34``, ``GLIBCXX_3.4.30``
from the version-needed section), and whether every file is code for the device's CPU. It also
points the packaged binary's RUNPATH at ``$ORIGIN/../lib`` in place (as ``cmake --install`` does)
so that no build-machine path travels to the board. 64-bit little-endian ELF only: every device
edgemoe-rt runs on (x86_64, aarch64) is.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import TargetError

# e_machine values (ELF gABI) of the CPUs edgemoe-rt is built for.
MACHINES = {"x86_64": 62, "aarch64": 183}
_SHT_DYNAMIC, _SHT_DYNSYM = 6, 11
_SHT_VERDEF, _SHT_VERNEED = 0x6FFFFFFD, 0x6FFFFFFE
_DT_NEEDED, _DT_SONAME, _DT_RPATH, _DT_RUNPATH = 1, 14, 15, 29
_STRING_TAGS = (_DT_NEEDED, _DT_SONAME, _DT_RPATH, _DT_RUNPATH)


@dataclass
class ElfInfo:
    """What packaging needs to know about one ELF file.

    Attributes:
        machine: ``e_machine`` (62 x86_64, 183 aarch64).
        needed: DT_NEEDED library names, in order.
        runpath: DT_RUNPATH (or DT_RPATH) entries.
        versions: Per needed library, the symbol versions it must provide (``{"libc.so.6": ["GLIBC_2.17", ...]}``).
    """

    machine: int
    needed: list[str] = field(default_factory=list)
    runpath: list[str] = field(default_factory=list)
    versions: dict[str, list[str]] = field(default_factory=dict)


def machine_name(machine: int) -> str:
    """``183`` → ``aarch64`` (or ``e_machine 40`` for CPUs edgemoe-rt is not built for)."""
    return next((name for name, m in MACHINES.items() if m == machine), f"e_machine {machine}")


class _Elf:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = self.path.read_bytes()
        d = self.data
        if d[:4] != b"\x7fELF":
            raise TargetError(f"{path} is not an ELF file")
        if d[4] != 2 or d[5] != 1:
            raise TargetError(f"{path} is not a 64-bit little-endian ELF file")
        self.machine = struct.unpack_from("<H", d, 18)[0]
        shoff = struct.unpack_from("<Q", d, 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", d, 0x3A)
        # (type, offset, size, link, info, entsize) per section header.
        self.sections = [
            struct.unpack_from("<4xI16xQQII8xQ", d, shoff + i * shentsize) for i in range(shnum if shoff else 0)
        ]

    def section(self, kind: int):
        return next((s for s in self.sections if s[0] == kind), None)

    def string(self, table, offset: int) -> str:
        start = table[1] + offset
        return self.data[start : self.data.index(b"\0", start)].decode("utf-8", "replace")

    def dynamic(self) -> list[tuple[int, int]]:
        """(tag, value) of each DT_* entry up to DT_NULL."""
        sec = self.section(_SHT_DYNAMIC)
        if sec is None:
            return []
        out = []
        for off in range(sec[1], sec[1] + sec[2], 16):
            tag, val = struct.unpack_from("<qQ", self.data, off)
            if tag == 0:
                break
            out.append((tag, val))
        return out

    def dynstr(self):
        sec = self.section(_SHT_DYNAMIC)
        return self.sections[sec[3]] if sec is not None else None

    def verneed(self) -> list[tuple[int, list[int]]]:
        """(string offset of the library's name, [string offsets of its version names]) per entry."""
        sec = self.section(_SHT_VERNEED)
        out = []
        if sec is None:
            return out
        off = sec[1]
        for _ in range(sec[4]):
            _version, count, file_off, aux, nxt = struct.unpack_from("<HHIII", self.data, off)
            names, a = [], off + aux
            for _ in range(count):
                _hash, _flags, _other, name, anext = struct.unpack_from("<IHHII", self.data, a)
                names.append(name)
                a += anext
            out.append((file_off, names))
            if not nxt:
                break
            off += nxt
        return out

    def string_refs(self) -> list[int]:
        """Every .dynstr offset something refers to (dynamic entries, dynamic symbols, version sections)."""
        refs = [val for tag, val in self.dynamic() if tag in _STRING_TAGS]
        sym = self.section(_SHT_DYNSYM)
        if sym is not None and sym[5]:
            refs += [struct.unpack_from("<I", self.data, o)[0] for o in range(sym[1], sym[1] + sym[2], sym[5])]
        for file_off, names in self.verneed():
            refs += [file_off, *names]
        sec = self.section(_SHT_VERDEF)
        if sec is not None:
            off = sec[1]
            for _ in range(sec[4]):
                _v, _f, _ndx, count, _hash, aux, nxt = struct.unpack_from("<HHHHIII", self.data, off)
                a = off + aux
                for _ in range(count):
                    name, anext = struct.unpack_from("<II", self.data, a)
                    refs.append(name)
                    a += anext
                if not nxt:
                    break
                off += nxt
        return refs


def read_elf(path: str | Path) -> ElfInfo:
    """Machine, DT_NEEDED, RUNPATH and the symbol versions needed of a 64-bit little-endian ELF file.

    Raises:
        TargetError: Not an ELF file, or not 64-bit little-endian.
    """
    elf = _Elf(Path(path))
    info = ElfInfo(elf.machine)
    strtab = elf.dynstr()
    if strtab is None:
        return info  # static: needs nothing
    for tag, val in elf.dynamic():
        if tag == _DT_NEEDED:
            info.needed.append(elf.string(strtab, val))
        elif tag in (_DT_RUNPATH, _DT_RPATH):
            info.runpath += [p for p in elf.string(strtab, val).split(":") if p]
    for file_off, names in elf.verneed():
        info.versions[elf.string(strtab, file_off)] = [elf.string(strtab, n) for n in names]
    return info


def set_runpath(path: str | Path, runpath: str) -> bool:
    """Overwrite a file's DT_RUNPATH string in place with ``runpath`` (NUL-padded), as CMake's install does.

    Only when the new string fits in the old one and no other entry shares the old string's bytes
    (linkers merge string tails); otherwise the file is left as it is.

    Returns:
        Whether the RUNPATH was rewritten.
    """
    elf = _Elf(Path(path))
    strtab = elf.dynstr()
    entry = next((val for tag, val in elf.dynamic() if tag == _DT_RUNPATH), None)
    if strtab is None or entry is None:
        return False
    old = elf.string(strtab, entry).encode()
    new = runpath.encode()
    refs = elf.string_refs()
    if len(new) > len(old) or refs.count(entry) > 1 or any(entry < ref < entry + len(old) for ref in refs):
        return False
    start = strtab[1] + entry
    data = bytearray(elf.data)
    data[start : start + len(old)] = new.ljust(len(old), b"\0")
    Path(path).write_bytes(bytes(data))
    return True


def _version_key(name: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def newest_versions(infos: list[ElfInfo], libraries: set[str]) -> dict[str, list[str]]:
    """Per library in ``libraries``, the newest version of each family (GLIBC_, GLIBCXX_, CXXABI_, GCC_) needed."""
    best: dict[str, dict[str, str]] = {}
    for info in infos:
        for lib, names in info.versions.items():
            if lib not in libraries:
                continue
            for name in names:
                family = name.rstrip("0123456789.")
                cur = best.setdefault(lib, {}).get(family)
                if cur is None or _version_key(name) > _version_key(cur):
                    best[lib][family] = name
    return {lib: sorted(fams.values()) for lib, fams in sorted(best.items())}
