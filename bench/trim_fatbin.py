"""Zero the GPU code of every architecture but the ones kept in a CUDA shared library, in place, so that a wheel
holding it compresses to a fraction of its size (how Transformer Engine's 277 MB core wheel fits the device tool's
64 MiB transfer: bench/gpu_fp8_rl.sh). The library still loads and runs on the kept architectures; on any other
it fails at the first kernel launch.

A shared library's GPU code sits in its ELF section ``.nv_fatbin``: a series of fat binaries (header: magic
0xBA55ED50, version, header size, size of the entries), each a series of entries (header: kind (1 PTX, 2 cubin),
version, header size, padded payload size, ..., the SM version at byte 28). Entries whose SM is not kept keep their
header and get a payload of zeros, so every offset stays valid.

    python bench/trim_fatbin.py core/transformer_engine/wheel_lib/libtransformer_engine.so 90

For Transformer Engine 2.20.2 (transformer-engine-cu13): 233 of 327 MiB zeroed (sm_75, 80, 89, 100, 103, 107, 120);
the wheel rebuilt with the trimmed library (``zipfile``, deflate level 9) is 30 MiB against 264 MiB.
"""

from __future__ import annotations

import argparse
import struct
from collections import Counter
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50


def fatbin_section(data: bytes) -> tuple[int, int]:
    """Offset and size of the ELF64 section ``.nv_fatbin``."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not an ELF64 file")
    section_table, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", data, section_table + i * entry_size)
        return name, offset, size

    _, names, _ = section(names_index)
    for i in range(count):
        name, offset, size = section(i)
        if data[names + name:data.index(b"\0", names + name)] == b".nv_fatbin":
            return offset, size
    raise ValueError("no .nv_fatbin section: the file holds no GPU code")


def trim(data: bytearray, keep: set[int]) -> Counter:
    """Zero, in ``data``, the payload of every fat-binary entry whose SM version is not in ``keep``; returns the
    bytes per (kind, SM) found."""
    found: Counter = Counter()
    offset, size = fatbin_section(data)
    position, end = offset, offset + size
    while position < end:
        magic, _, header, entries = struct.unpack_from("<IHHQ", data, position)
        if magic != FATBIN_MAGIC:
            position += 8  # alignment between fat binaries
            continue
        entry, last = position + header, position + header + entries
        while entry < last:
            kind, _, entry_header, payload = struct.unpack_from("<HHII", data, entry)
            sm, = struct.unpack_from("<I", data, entry + 28)
            found[(kind, sm)] += payload
            if sm not in keep:
                data[entry + entry_header:entry + entry_header + payload] = bytes(payload)
            entry += entry_header + payload
        position = last
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("library", type=Path, help="The shared library to trim, in place.")
    parser.add_argument("keep", help="SM versions to keep, comma separated (90: Hopper, H100 and H200).")
    args = parser.parse_args(argv)
    keep = {int(x) for x in args.keep.split(",")}
    data = bytearray(args.library.read_bytes())
    found = trim(data, keep)
    args.library.write_bytes(data)
    for (kind, sm), size in sorted(found.items()):
        print(f"sm_{sm} {'PTX' if kind == 1 else 'cubin'}: {size / 2**20:.1f} MiB {'kept' if sm in keep else 'zeroed'}")


if __name__ == "__main__":
    main()
