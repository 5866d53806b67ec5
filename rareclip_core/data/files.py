"""Files that appear only when complete, and appends that land whole or not at all."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp_path)` to a hidden temporary name beside `path`, fsync, then
    rename: readers see the whole file or none (names starting with '.' are never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}{path.suffix}"
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_folder(folder: Path | str) -> None:
    """Make the files created or renamed in `folder` survive a power loss (local disks)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_whole(path: Path, data: Callable[[int], bytes], fsync: bool = True) -> None:
    """Append `data(size)` (the bytes to add, given the file's size now: a header for a new file,
    say) to `path`, made if missing, whole or not at all: a write that fails part way (a full
    disk) cuts the file back to its size before it, so a retry appends after the last whole
    record rather than after a torn one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        rest = memoryview(data(start))
        try:
            while rest:
                rest = rest[os.write(fd, rest):]
            if fsync:
                os.fsync(fd)
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)
