"""Weights that can't be half-written, silently corrupted, or run code when loaded.

- Every save is atomic: the bytes go to a temporary file in the *same* directory (never ``$TMPDIR``,
  which may be another filesystem, where a "rename" becomes a copy that a kill leaves half done),
  are fsynced, and ``os.replace`` puts them in place. ``atomic_dir`` does the same for a whole
  directory (a training step). A kill leaves at most a ``.NAME.tmp-PID`` entry, which
  ``clean_stale_temps`` removes on the next start.
- Every weights file carries its sha256 in ``FILE.sha256`` (``sha256sum`` format, so
  ``sha256sum -c`` checks it too), computed while the file is written (no second read; see
  ``bench/hash_cost.py``) or once at convert time, and checked before the file is loaded. A file
  with no record loads with a one-line warning (checkpoints made before hashes were recorded).
- Every load is ``torch.load(weights_only=True)``: pickled code can't run; what we save is plain
  tensors and primitives. A file that can't be read is one error naming it, not a zip-reader traceback.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

SUFFIX = ".sha256"
TEMP_MARK = ".tmp-"
CHUNK = 16 << 20  # bytes per read when hashing a file
_verified: dict[tuple, str] = {}  # (path, inode, size, mtime) -> digest, so one process hashes a file once
_warned: set[Path] = set()


class IntegrityError(ValueError):
    """A weights or state file is damaged, incomplete, or does not match its recorded sha256."""


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SUFFIX)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def recorded_sha256(path: Path) -> str | None:
    """The digest in ``path``'s sidecar, or None when there is none."""
    record = sidecar(Path(path))
    if not record.is_file():
        return None
    match = re.match(r"([0-9a-f]{64})\b", record.read_text(encoding="ascii", errors="replace").strip())
    if match is None:
        raise IntegrityError(
            f"{record}: not a sha256 record (expected '<64 hex digits>  {Path(path).name}'); delete it and run: python -m core.integrity record {path}"
        )
    return match.group(1)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file that hashes what passes through it (torch.save writes its zip sequentially)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.hash = f, hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_record(path: Path, digest: str) -> None:
    record, tmp = sidecar(path), _temp_name(sidecar(path))
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{digest}  {path.name}\n")
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, record)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], record: bool = True) -> str:
    """Write ``path`` through ``write(file)`` atomically; records (and returns) its sha256."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = writer.hash.hexdigest()
    if record:
        _write_record(path, digest)
        _remember(path, digest)
    return digest


def save_torch(obj, path: Path) -> str:
    """``torch.save`` atomically, with the file's sha256 recorded beside it. ``obj``: tensors and primitives only."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def copy_file(src: Path, dst: Path) -> str:
    """Copy atomically, hashing on the way; the copy must match ``src``'s record, and gets its own."""
    src, dst = Path(src), Path(dst)
    expected = recorded_sha256(src)

    def write(f) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f, CHUNK)

    digest = atomic_write(dst, write, record=False)
    if expected is not None and digest != expected:
        dst.unlink()
        raise IntegrityError(f"{src}: sha256 {digest[:12]}… does not match its record {expected[:12]}… ({sidecar(src).name}); the file is damaged")
    _write_record(dst, digest)
    _remember(dst, digest)
    return digest


def move(src: Path, dst: Path) -> None:
    """Rename a file and its sha256 record within one filesystem (the record first: a kill between leaves a mismatch, never a silent gap)."""
    src, dst = Path(src), Path(dst)
    digest = recorded_sha256(src)
    if digest is not None:
        _replace(sidecar(src), sidecar(dst))
    _replace(src, dst)
    if digest is not None:
        _remember(dst, digest)


def record(path: Path) -> str:
    """Hash an existing file once (e.g. right after conversion) and record it."""
    path = Path(path)
    digest = sha256_file(path)
    _write_record(path, digest)
    _remember(path, digest)
    return digest


def _key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def _remember(path: Path, digest: str) -> None:
    _verified[_key(path)] = digest


def verify(path: Path, warn: bool = True) -> bool:
    """Check ``path`` against its sidecar; raises IntegrityError naming the file. False: nothing recorded."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path}: missing")
    expected = recorded_sha256(path)
    if expected is None:
        if warn and path not in _warned:
            _warned.add(path)
            print(
                f"warning: {path} has no recorded sha256, so damage can't be detected; record it with: python -m core.integrity record {path}",
                file=sys.stderr,
            )
        return False
    key = _key(path)
    digest = _verified.get(key) or sha256_file(path)
    if digest != expected:
        raise IntegrityError(
            f"{path}: sha256 {digest[:12]}… does not match {expected[:12]}… recorded in {sidecar(path).name}: the file is damaged or "
            "was changed after it was saved; restore it (re-download/convert, or retrain from an earlier step)"
        )
    _verified[key] = digest
    return True


def load_torch(path: Path, mmap: bool = True, verify_hash: bool = True):
    """``torch.load`` with weights_only=True, after the hash check; one IntegrityError naming the file on failure."""
    import torch

    path = Path(path)
    if verify_hash:
        verify(path)
    try:
        return torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - truncated zips, foreign pickles, refused globals: whatever torch.load raises, one error naming the file
        reason = " ".join(str(e).split())[:300]
        size = path.stat().st_size if path.is_file() else 0
        raise IntegrityError(
            f"{path}: cannot be loaded as saved tensors ({size:,} bytes; {type(e).__name__}: {reason}); the file is truncated, damaged or not a torch checkpoint"
        ) from None


def clean_stale_temps(directory: Path) -> list[Path]:
    """Remove temporaries that a killed save left in ``directory`` (those of live processes stay)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if not (entry.name.startswith(".") and TEMP_MARK in entry.name):
            continue
        pid = entry.name.rsplit(TEMP_MARK, 1)[1].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling; on success it replaces ``target`` whole, on failure it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for entry in tmp.iterdir():
            if entry.is_file():
                with open(entry, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if target.exists():  # an older save of the same name (e.g. a step redone after resuming)
            old = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}-old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for entry in target.iterdir():  # what this process just hashed while writing needs no second read
        if entry.is_file() and not entry.name.endswith(SUFFIX) and (digest := recorded_sha256(entry)) is not None:
            _remember(entry, digest)


def main(command: str, paths: list[Path]) -> None:
    """Record or check the sha256 of weights files.

    Args:
        command: "record" (hash each file once and write FILE.sha256) or "check" (compare with the record).
        paths: the files.
    """
    if command not in ("record", "check"):
        raise SystemExit(f"error: command: choose record or check, got {command!r}")
    for path in paths:
        try:
            if command == "record":
                print(f"{record(path)}  {path}")
            else:
                print(f"{path}: {'OK' if verify(path, warn=False) else 'no record'}")
        except (IntegrityError, OSError) as e:
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=True)
