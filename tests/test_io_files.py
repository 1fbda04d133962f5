"""Atomic publication and content verification shared by every artifact (megatron_dil/io/files.py)."""
from __future__ import annotations

import hashlib

import pytest

from megatron_dil.io import IntegrityError, atomic_write_text, file_record, publish, record_files, verify_files


def test_record_is_size_and_independent_blake2b(tmp_path):
    data = bytes(range(256)) * 40000  # > one 4 MiB read chunk, so streaming is exercised
    (tmp_path / "a.bin").write_bytes(data)
    assert file_record(tmp_path / "a.bin") == {"size": len(data),
                                               "blake2b": hashlib.blake2b(data, digest_size=32).hexdigest()}


@pytest.mark.parametrize("damage", ["same_size_flip", "truncate", "delete"])
def test_verify_names_the_damaged_file(tmp_path, damage):
    for name in ("x.idx", "x.bin"):
        (tmp_path / name).write_bytes(b"0123456789" * 10)
    records = record_files(tmp_path, ["x.idx", "x.bin"])
    verify_files(tmp_path, records, "dataset x", "rerun it")
    target = tmp_path / "x.bin"
    if damage == "same_size_flip":
        target.write_bytes(b"1123456789" + b"0123456789" * 9)
    elif damage == "truncate":
        target.write_bytes(b"0123")
    else:
        target.unlink()
    with pytest.raises(IntegrityError, match=r"dataset x: .*x\.bin .*rerun it"):
        verify_files(tmp_path, records, "dataset x", "rerun it")
    if damage == "same_size_flip":  # the cheap size-only check cannot see it; the digest does
        verify_files(tmp_path, records, "dataset x", "rerun it", check_digest=False)


def test_publish_replaces_whole_and_atomic_write(tmp_path):
    final, partial = tmp_path / "out", tmp_path / "out.partial"
    final.mkdir()
    (final / "old.txt").write_text("old")
    partial.mkdir()
    (partial / "new.txt").write_text("new")
    publish(partial, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    atomic_write_text(tmp_path / "latest", "iter_0000002")
    atomic_write_text(tmp_path / "latest", "iter_0000004")
    assert (tmp_path / "latest").read_text() == "iter_0000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "out"]
