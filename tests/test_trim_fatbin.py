"""bench/trim_fatbin.py on a hand-built ELF64 file: one fat binary of an sm_80 and an sm_90 cubin entry."""

from __future__ import annotations

import struct

import pytest

from bench.trim_fatbin import main, trim


def elf_with_fatbin(entries: list[tuple[int, bytes]]) -> tuple[bytearray, dict[int, tuple[int, int]]]:
    """An ELF64 file whose only sections are a null one, ``.shstrtab`` and ``.nv_fatbin``; and where each entry's
    payload lies (SM -> offset, size)."""
    names = b"\0.shstrtab\0.nv_fatbin\0"
    body, where = bytearray(), {}
    for sm, payload in entries:  # entry header: kind, version, header size, payload size, ..., SM at byte 28
        header = bytearray(64)
        struct.pack_into("<HHII", header, 0, 2, 0x101, 64, len(payload))
        struct.pack_into("<I", header, 28, sm)
        where[sm] = (len(body) + 64, len(payload))
        body += header + payload
    fatbin = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body
    names_at, fatbin_at = 64, 64 + len(names)
    table_at = fatbin_at + len(fatbin)
    data = bytearray(64) + names + fatbin
    data[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", data, 0x28, table_at)
    struct.pack_into("<HHH", data, 0x3A, 64, 3, 1)
    for name, offset, size in ((0, 0, 0), (1, names_at, len(names)), (11, fatbin_at, len(fatbin))):
        data += struct.pack("<IIQQQQ", name, 1, 0, 0, offset, size) + bytes(24)
    return data, {sm: (fatbin_at + 16 + o, n) for sm, (o, n) in where.items()}


def test_only_the_kept_architectures_code_survives(tmp_path, capsys):
    data, where = elf_with_fatbin([(80, b"\x11" * 40), (90, b"\x22" * 24)])
    original = bytes(data)
    found = trim(data, {90})
    assert found == {(2, 80): 40, (2, 90): 24}
    (a, n80), (b, n90) = where[80], where[90]
    assert data[a:a + n80] == bytes(n80) and data[b:b + n90] == b"\x22" * 24
    assert data[:a] == original[:a] and data[a + n80:] == original[a + n80:]  # headers and all else unchanged
    library = tmp_path / "lib.so"
    library.write_bytes(original)
    main([str(library), "90"])
    assert library.read_bytes() == bytes(data)
    assert "sm_80 cubin: 0.0 MiB zeroed" in capsys.readouterr().out


def test_a_file_without_gpu_code_is_refused():
    data, _ = elf_with_fatbin([])
    at = data.index(b".nv_fatbin")
    data[at:at + 10] = b".text\0\0\0\0\0"
    with pytest.raises(ValueError, match="no .nv_fatbin"):
        trim(data, {90})
    with pytest.raises(ValueError, match="not an ELF64"):
        trim(bytearray(b"MZ" + bytes(100)), {90})
