"""A stream entered at sample j of a local tar (``clipkit/data/tarindex.py``) yields exactly what reading the tar
from its start through webdataset yields from sample j on: on clean shards, and on shards whose headers the index
does not model (it stops there, and the reader reads those samples from the start)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from clipkit.data import tarindex
from clipkit.data.stream import Reader


def _tar(path: Path, members: list[tuple[str, bytes | None]], fmt=tarfile.USTAR_FORMAT) -> Path:
    """``members``: (name, data), data None for a directory."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _samples(n: int, prefix: str = "", size: int = 700) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [(f"{prefix}{i:05d}.jpg", bytes([i % 251]) * (size + i)), (f"{prefix}{i:05d}.txt", f"c{i}".encode())]
    return out


def _read(url: str, start: int) -> list:
    """(j, sample) from sample ``start`` on, then the name of the error that ended the read, if one did."""
    out: list = []
    try:
        for j, sample in Reader(retries=0).numbered(url, start):
            out.append((j, {k: v for k, v in sample.items() if k != "__url__"}))
    except OSError as err:
        out.append(type(err).__name__)
    return out


def _from(read: list, start: int) -> list:
    return [x for x in read if isinstance(x, str) or x[0] >= start]


LONG = "d" * 90 + "/" + "e" * 60  # (a ustar name with a prefix field)
CASES = {
    "plain": _samples(12),
    "dirs and meta": [
        ("sub/", None),
        ("__meta__", b"x"),
        *_samples(3, "sub/"),
        ("__index__/a.json", b"{}"),
        ("noext", b"skipped"),
        ("sub/more/", None),
        *_samples(4, "sub/more/"),
    ],
    "dotted dirs, upper-case suffixes": [
        ("a.b/x1.JPG", b"1"),
        ("a.b/x1.tar.txt", b"2"),
        ("a.b/x2.jpg", b"3"),
        ("a.b/x2.txt", b"4"),
        ("a.b/x1.cls", b"5"),  # (key x1 again, not adjacent: a new sample)
    ],
    "ustar long names": [(f"{LONG}{i}.jpg", b"x" * i) for i in range(1, 6)],
    "duplicate suffix": [*_samples(3), ("00002.txt", b"again"), *_samples(2, "z")],
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_start_yields_what_reading_from_the_start_yields(tmp_path, case):
    url = str(_tar(tmp_path / "s.tar", CASES[case]))
    whole = _read(url, 0)  # (start 0: no seek, webdataset reads the tar from its start)
    assert len(whole) >= 3
    for start in range(len(whole) + 2):
        assert _read(url, start) == _from(whole, start), (case, start)


def test_the_index_covers_a_clean_shard_and_seeks(tmp_path):
    url = str(_tar(tmp_path / "s.tar", CASES["plain"]))
    index = tarindex.lookup(url)
    assert len(index) == 12
    with open(url, "rb") as f:  # each offset is the header of that sample's first member
        for j, offset in enumerate(index.offsets):
            f.seek(offset)
            assert f.read(100).split(b"\0")[0] == f"{j:05d}.jpg".encode()


def test_the_index_stops_where_it_stops_modelling(tmp_path):
    # A duplicate name within a sample (webdataset fails there): samples 0 and 1 only.
    assert len(tarindex.build(str(_tar(tmp_path / "dup.tar", CASES["duplicate suffix"])))) == 2
    # A pax header (a non-ASCII name in PAX format): the samples before it, less the one in progress there (the
    # next member could have been part of it).
    pax = [*_samples(3), ("é0003.jpg", b"x"), ("é0003.txt", b"y"), *_samples(2, "z")]
    assert len(tarindex.build(str(_tar(tmp_path / "pax.tar", pax, fmt=tarfile.PAX_FORMAT)))) == 2
    # A member above half the reader's member bound: the samples before it.
    big = [*_samples(3), ("00003.jpg", b"x" * 5000), *_samples(2, "z")]
    assert len(tarindex.build(str(_tar(tmp_path / "big.tar", big)), member_cap=8000)) == 3
    # A damaged header checksum in sample 5: samples 0-3 (4 was in progress).
    path = _tar(tmp_path / "bad.tar", _samples(8))
    data = bytearray(path.read_bytes())
    data[tarindex.build(str(path)).offsets[5] + 148] ^= 0x07
    path.write_bytes(bytes(data))
    assert len(tarindex.build(str(path))) == 4


def test_a_truncated_shard_reads_the_same_from_any_start(tmp_path):
    whole = _tar(tmp_path / "whole.tar", _samples(10)).read_bytes()
    url = str(tmp_path / "cut.tar")
    Path(url).write_bytes(whole[: len(whole) * 2 // 3 + 100])  # (inside a member: not a clean end)
    assert len(tarindex.build(url)) < 10
    read = _read(url, 0)  # (tarfile's stream mode gives the cut member short, without an error)
    assert len(read) >= 6
    for start in range(12):
        assert _read(url, start) == _from(read, start), start


def test_a_seek_that_finds_another_key_reads_from_the_start(tmp_path, caplog):
    url = str(_tar(tmp_path / "s.tar", CASES["plain"]))
    cap = Reader().max_member_bytes  # (the reader's bound is part of the index's identity)
    index = tarindex.lookup(url, cap)
    index.offsets[4], index.offsets[5] = index.offsets[5], index.offsets[4]  # (a wrong index, by hand)
    assert _read(url, 4) == _from(_read(url, 0), 4)
    assert "not the one its index names" in caplog.text
    assert tarindex.lookup(url, cap) is None  # (not used again in this process)
