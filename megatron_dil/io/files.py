"""Files that are either complete and verified or absent: atomic publication, content digests, verification.

Every artifact megatron_dil writes (datasets, reference caches, converted checkpoints, training checkpoints, exports)
goes through these helpers, so one mechanism guarantees that a reader never sees a half-written file and always
detects one that changed after it was written:

- ``publish(partial, final)``: rename a completed staging directory into place (replacing an older one only once the
  new one is complete); ``atomic_write_text`` does the same for one small file.
- ``file_record(path)`` → ``{"size": bytes, "blake2b": hex}``: the streamed BLAKE2b-256 digest of the content
  (hashlib, ~1 GB/s per core); ``record_files(root, names)`` records several files relative to ``root``.
  ``file_digest`` hashes a file once per node (``DigestMemo``): the ranks of a node that verify the same unchanged
  file wait for the first one's digest instead of each reading it again.
- ``verify_files(root, records, what)`` raises ``IntegrityError`` naming the first file that is missing, has another
  size (cheap check first) or another digest, and what to do about it.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

_CHUNK = 1 << 22  # 4 MiB reads


class IntegrityError(ValueError):
    """A file does not match the size/digest recorded when it was written (damaged, truncated or swapped)."""


def publish(partial: str | Path, final: str | Path) -> None:
    """Move a completed ``partial`` directory (or file) to ``final``, replacing an older one only after it is complete."""
    partial, final = Path(partial), Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        _remove(old)
        os.replace(final, old)
        os.replace(partial, final)
        _remove(old)
    else:
        os.replace(partial, final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class DigestMemo:
    """Node-local memo of file digests, so N ranks of a node verifying one file read it once, not N times.

    An entry is keyed by what any change to a file's bytes changes: (device, inode, size, mtime, ctime) and the real
    path; the kernel sets ctime on every write and it cannot be set back by a user. An entry is locked with
    ``flock`` while its digest is computed, so ranks asking at the same time wait for the first one. As in git's
    "racily clean" rule, a digest is stored only for a file whose ctime is at least ``RACY_SECONDS`` old: a write
    in the same clock tick as the hash would leave ctime unchanged. The memo lives in ``MEGATRON_DIL_DIGEST_MEMO``
    (default: ``megatron_dil-digests-UID`` in the temporary directory, mode 0700); ``MEGATRON_DIL_DIGEST_MEMO=off``
    or a directory that cannot be used hashes every time.
    """

    RACY_SECONDS = 2.0

    def __init__(self, directory: str | Path | None = None) -> None:
        setting = os.environ.get("MEGATRON_DIL_DIGEST_MEMO", "") if directory is None else str(directory)
        self.directory = (None if setting == "off" else
                          Path(setting) if setting else Path(tempfile.gettempdir()) / f"megatron_dil-digests-{os.getuid()}")

    def digest(self, path: str | Path) -> str:
        entry = self._entry(path)
        if entry is None:
            return _stream_digest(path)
        with open(entry, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
            handle.seek(0)
            if len(known := handle.read()) == 64:
                return known
            before = os.stat(path)
            digest = _stream_digest(path)
            if time.time_ns() - before.st_ctime_ns >= self.RACY_SECONDS * 1e9 and _identity(os.stat(path)) == \
                    _identity(before):
                handle.truncate(0)
                handle.write(digest)
            return digest

    def _entry(self, path: str | Path) -> Path | None:
        if self.directory is None:
            return None
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.directory.stat().st_uid != os.getuid():
                return None  # another user's directory: never trust its entries
            key = f"{os.path.realpath(path)}\0{_identity(os.stat(path))}".encode()
            return self.directory / hashlib.blake2b(key, digest_size=16).hexdigest()
        except OSError:
            return None


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _stream_digest(path: str | Path) -> str:
    """BLAKE2b-256 of the file's bytes, streamed in 4 MiB chunks (hex)."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """BLAKE2b-256 of the file's bytes (hex), computed once per node for an unchanged file (``DigestMemo``)."""
    return DigestMemo().digest(path)


def file_record(path: str | Path) -> dict[str, int | str]:
    """``{"size": bytes, "blake2b": hex digest}`` of one file."""
    return {"size": os.path.getsize(path), "blake2b": file_digest(path)}


def record_files(root: str | Path, names: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """Records of ``root/name`` for each name (relative names are the keys)."""
    return {name: file_record(Path(root) / name) for name in names}


def verify_file(path: str | Path, record: dict, what: str, remedy: str, check_digest: bool = True) -> None:
    """Raise ``IntegrityError`` if ``path`` is missing or its size (then, if asked, its digest) differs from ``record``.

    ``what`` names the artifact in the message (e.g. "dataset runs/data/x_train"), ``remedy`` says what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{what}: {path} is missing; {remedy}")
    size = path.stat().st_size
    if size != record["size"]:
        raise IntegrityError(f"{what}: {path} has {size} bytes but {record['size']} were written "
                             f"(truncated or replaced); {remedy}")
    if check_digest and file_digest(path) != record["blake2b"]:
        raise IntegrityError(f"{what}: {path} does not match the checksum recorded when it was written "
                             f"(damaged or replaced); {remedy}")


def verify_files(root: str | Path, records: dict[str, dict], what: str, remedy: str,
                 check_digest: bool = True) -> None:
    """``verify_file`` for every recorded file under ``root``."""
    for name, record in records.items():
        verify_file(Path(root) / name, record, what, remedy, check_digest)
