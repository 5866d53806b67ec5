"""One job per output folder: a lock held for the job's life, so that two jobs never write the
same result table (they would each write every row)."""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from rareclip_core.config import ConfigError

LOCK_FILE = ".job.lock"


class JobLockError(ConfigError):
    """Another job holds the output folder; the message names it, and `ray_address` is the Ray
    cluster it runs on (None when it did not say): what an operator's command needs as --address
    to act on the running job."""

    def __init__(self, message: str, ray_address: Optional[str] = None):
        super().__init__(message)
        self.ray_address = ray_address

    def address_hint(self) -> str:
        """How to act on the running job instead: `pass --address A`."""
        return f"pass --address {self.ray_address}" if self.ray_address else "pass the --address of its Ray cluster"


class JobLock:
    """`<out>/.job.lock`, locked with flock while the job runs. The operating system releases
    the lock when the holder's process ends, however it ends, so a crashed job leaves no stale
    lock; the file keeps who holds it (pid, host, command, start, Ray cluster) for the refusal
    message."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, ray_address: Optional[str] = None) -> "JobLock":
        """Hold the folder, or raise JobLockError naming its holder; `ray_address`: the Ray
        cluster this job runs on, for the refusal another command gets meanwhile."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"out: cannot use {self.path.parent} as the output folder ({err.strerror or err}); "
                              "give another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise JobLockError(
                f"another job is writing to {self.path.parent}: {describe_holder(holder)}. Wait for it to end or stop "
                "it (Ctrl-C), or give this job another --out", holder_field(holder, "ray_address"),
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "ray_address": ray_address,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "JobLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        ray_cluster = f", Ray at {h['ray_address']}" if h.get("ray_address") else ""
        return f"pid {h['pid']} on {h['host']} since {h['started_utc']}{ray_cluster} ({h['command']})"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "a job whose details are not readable"


def holder_field(text: str, key: str) -> Optional[str]:
    """One field of the lock file's holder record (None when absent or unreadable)."""
    try:
        value = json.loads(text).get(key)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
