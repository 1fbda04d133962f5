"""Atomic publication and content verification shared by every artifact (megatron_dil/io/files.py)."""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_dil.io import (IntegrityError, atomic_write_text, file_digest, file_record, publish, record_files,
                             verify_files)


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


# ---------------------------------------------------------------------------------------------- node-local digest memo
@pytest.fixture
def counted_hashing(monkeypatch):
    """Count the real reads of a file's bytes behind file_digest."""
    from megatron_dil.io import files
    calls = []
    real = files._stream_digest

    def counting(path):
        calls.append(str(path))
        return real(path)
    monkeypatch.setattr(files, "_stream_digest", counting)
    return calls


def _settled(path, data: bytes) -> None:
    """Write ``data`` and let the clock tick past its ctime (the memo's racy window is set to 0 by the tests)."""
    path.write_bytes(data)
    time.sleep(0.05)


def test_digest_memo_reads_an_unchanged_file_once_and_sees_every_change(tmp_path, monkeypatch, counted_hashing):
    from megatron_dil.io.files import DigestMemo
    monkeypatch.setenv("MEGATRON_DIL_DIGEST_MEMO", str(tmp_path / "memo"))
    monkeypatch.setattr(DigestMemo, "RACY_SECONDS", 0.0)
    target = tmp_path / "x.bin"
    _settled(target, b"0123456789" * 100)
    want = hashlib.blake2b(target.read_bytes(), digest_size=32).hexdigest()
    assert [file_digest(target) for _ in range(3)] == [want] * 3
    assert len(counted_hashing) == 1
    stat = target.stat()  # same size, mtime set back: only ctime tells, and the memo keys on it
    _settled(target, b"1123456789" + b"0123456789" * 99)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(target) == hashlib.blake2b(target.read_bytes(), digest_size=32).hexdigest() != want
    assert len(counted_hashing) == 2
    with pytest.raises(IntegrityError, match="x.bin does not match"):
        verify_files(tmp_path, {"x.bin": {"size": 1000, "blake2b": want}}, "dataset x", "rerun it")


def test_digest_memo_never_stores_a_racy_digest(tmp_path, monkeypatch, counted_hashing):
    """A file written within RACY_SECONDS of its hash could change again in the same clock tick: not memoised."""
    monkeypatch.setenv("MEGATRON_DIL_DIGEST_MEMO", str(tmp_path / "memo"))
    (tmp_path / "fresh.bin").write_bytes(b"abc")
    file_digest(tmp_path / "fresh.bin")
    file_digest(tmp_path / "fresh.bin")
    assert len(counted_hashing) == 2


def test_digest_memo_concurrent_readers_wait_for_one_hash(tmp_path, monkeypatch, counted_hashing):
    from megatron_dil.io.files import DigestMemo
    monkeypatch.setenv("MEGATRON_DIL_DIGEST_MEMO", str(tmp_path / "memo"))
    monkeypatch.setattr(DigestMemo, "RACY_SECONDS", 0.0)
    _settled(tmp_path / "shared.bin", os.urandom(1 << 23))
    with ThreadPoolExecutor(4) as pool:  # flock excludes separate open()s, threads included
        digests = set(pool.map(lambda _: file_digest(tmp_path / "shared.bin"), range(4)))
    assert len(digests) == 1 and len(counted_hashing) == 1


@pytest.mark.parametrize("setting", ["off", "foreign"])
def test_digest_memo_off_or_foreign_directory_hashes_every_time(tmp_path, monkeypatch, counted_hashing, setting):
    from megatron_dil.io.files import DigestMemo
    monkeypatch.setattr(DigestMemo, "RACY_SECONDS", 0.0)
    if setting == "off":
        monkeypatch.setenv("MEGATRON_DIL_DIGEST_MEMO", "off")
    else:  # a directory owned by someone else (faked: our uid differs from its owner's)
        monkeypatch.setenv("MEGATRON_DIL_DIGEST_MEMO", str(tmp_path / "memo"))
        monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    _settled(tmp_path / "x.bin", b"abc")
    file_digest(tmp_path / "x.bin")
    file_digest(tmp_path / "x.bin")
    assert len(counted_hashing) == 2
