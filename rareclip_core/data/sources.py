"""Frame sources: where each line's frames come from and in which order.

A frame's sequence number is its position in its line's ordered source, so re-reading a source
after a crash gives every frame the same number again (exactly-once rests on that).
"""
from __future__ import annotations

import csv
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .datasets import load_dataset, shuffled


@dataclass(frozen=True)
class FrameRef:
    line_id: str
    seq: int
    uri: str
    data: Optional[bytes] = None  # the frame's bytes when the source carries them (NATS), else read from `uri`


def read_uri(uri: str) -> bytes:
    """Bytes of a local path or any URI pyarrow.fs understands (s3://, gs://, file://)."""
    if "://" not in uri:
        return Path(uri).read_bytes()
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


class FolderSource:
    """One folder per line under `root` (or the given `lines`). `listing(line)` is the line's
    frames present now, by name: every entry that is not a folder or hidden (a name starting with
    '.', the way to write a file before renaming it complete), broken links included (they get an
    error row). A `live` source grows, and takes a file only once it is complete: not modified
    for `settle_s` seconds (a camera still writing it keeps touching it).

    A live folder is listed again every poll and holds every frame of the day: a name once
    taken is not looked at again (no `stat`), so a poll costs little more than reading the folder."""

    def __init__(self, root: str, lines: Optional[list[str]] = None, live: bool = False, settle_s: float = 0.0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"source folder {self.root} does not exist (expected <root>/<line_id>/<images>)")
        self._lines = lines or sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self._lines:
            raise FileNotFoundError(f"source folder {self.root} has no line subfolders")
        self.live = live
        self.settle_s = settle_s if live else 0.0
        self._taken: dict[str, set[str]] = {}  # line -> names listed before (files, complete)

    def lines(self) -> list[str]:
        return list(self._lines)

    def listing(self, line_id: str) -> list[str]:
        folder = self.root / line_id
        if not folder.is_dir():
            return []
        taken = self._taken.setdefault(line_id, set())
        now = time.time()
        found = []
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name not in taken:
                    if name.startswith(".") or entry.is_dir():
                        continue
                    if self.settle_s and now - entry.stat(follow_symlinks=False).st_mtime < self.settle_s:
                        continue  # still being written
                    taken.add(name)
                found.append(name)
        found.sort()
        prefix = f"{folder}{os.sep}"
        return [prefix + name for name in found]


class ManifestSource:
    """A CSV or Parquet table with columns line_id, uri and optional timestamp (or a folder of
    such tables, read in name order: a job's ingest ledger folder replays its frames exactly); a
    line's order is by timestamp when present (stable), else the table's row order."""

    live = False

    def __init__(self, path: str, lines: Optional[list[str]] = None):
        target = Path(path)
        if target.is_dir():
            files = sorted(p for p in target.iterdir() if p.suffix in (".csv", ".parquet") and not p.name.startswith("."))
        elif target.is_file():
            files = [target]
        else:
            raise FileNotFoundError(f"manifest {target} does not exist")
        rows = [row for file in files for row in _table_rows(file)]
        missing = {"line_id", "uri"} - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"manifest {target} lacks column(s) {sorted(missing)}; needs line_id, uri[, timestamp]")
        self._by_line: dict[str, list[str]] = {}
        has_time = "timestamp" in rows[0]
        order = sorted(range(len(rows)), key=lambda i: (str(rows[i]["timestamp"]), i)) if has_time else range(len(rows))
        for i in order:
            self._by_line.setdefault(str(rows[i]["line_id"]), []).append(str(rows[i]["uri"]))
        if lines:
            self._by_line = {k: v for k, v in self._by_line.items() if k in lines}

    def lines(self) -> list[str]:
        return sorted(self._by_line)

    def listing(self, line_id: str) -> list[str]:
        return list(self._by_line.get(line_id, []))


class DatasetSource:
    """An evaluation dataset (MVTec AD, VisA or the generic layout): each category is a line, in
    the official test order or shuffled with `random.seed(s); random.shuffle` (the paper's protocol)."""

    live = False

    def __init__(self, kind: str, root: str, lines: Optional[list[str]] = None, shuffle_seed: Optional[int] = None):
        data = load_dataset(kind, root, split="test")
        if lines:
            unknown = set(lines) - set(data)
            if unknown:
                raise ValueError(f"categories {sorted(unknown)} not in {root}; found {sorted(data)}")
            data = {k: data[k] for k in lines}
        self.samples = {k: (v if shuffle_seed is None else shuffled(v, shuffle_seed)) for k, v in data.items()}

    def lines(self) -> list[str]:
        return sorted(self.samples)

    def listing(self, line_id: str) -> list[str]:
        return [sample.path for sample in self.samples[line_id]]


def _table_rows(file: Path) -> list[dict]:
    if file.suffix == ".parquet":
        return pq.read_table(file).to_pylist()
    with file.open(newline="") as fh:
        return list(csv.DictReader(fh))


class FrameLedger:
    """One line's frames in the order they were first seen: seq -> uri, kept in a CSV file
    (`line_id,seq,uri`, readable as a manifest). New frames are appended and fsynced before
    they are fed, so a frame's seq never depends on a later listing: a file whose name sorts
    before those already seen simply gets the next seq when it appears."""

    def __init__(self, path: Path, line_id: str):
        self.path, self.line_id = path, line_id
        self.uris: list[str] = [row["uri"] for row in _table_rows(path)] if path.is_file() else []
        self.recorded = Counter(self.uris)  # uri -> times recorded

    def __len__(self) -> int:
        return len(self.uris)

    def extend(self, listing: list[str]) -> int:
        """Append the entries of `listing` not yet in the ledger (as many times as a uri is listed
        more often than recorded), in listing order; returns how many."""
        listed = Counter(listing)
        if len(listed) == len(listing):  # each uri once (a folder): new = not recorded yet
            new = [uri for uri in listing if uri not in self.recorded]
        else:
            listed.clear()
            new = []
            for uri in listing:
                listed[uri] += 1
                if listed[uri] > self.recorded[uri]:
                    new.append(uri)
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.is_file() or self.path.stat().st_size == 0
            with self.path.open("a", newline="") as fh:
                writer = csv.writer(fh)
                if fresh:
                    writer.writerow(["line_id", "seq", "uri"])
                writer.writerows([self.line_id, len(self.uris) + i, uri] for i, uri in enumerate(new))
                fh.flush()
                os.fsync(fh.fileno())
            self.uris.extend(new)
            self.recorded.update(new)
        return len(new)


class Source:
    """What ingestion reads: a source's lines and, per line, its frames with their seqs. With a
    ledger folder, seqs come from the line's `FrameLedger` (folder and manifest sources: their
    listings can change between runs); a dataset's fixed order needs none."""

    def __init__(self, inner, ledger_dir: Optional[str] = None):
        self.inner = inner
        self.live = inner.live
        self.ledger_dir = None if ledger_dir is None else Path(ledger_dir)
        self._ledgers: dict[str, FrameLedger] = {}
        self._lock = threading.Lock()  # an ingest actor lists from two threads (feeding, totals)

    def lines(self) -> list[str]:
        return self.inner.lines()

    def frames(self, line_id: str, start_seq: int = 0) -> Iterator[FrameRef]:
        """The line's frames known now, from `start_seq` on (new ones are recorded first)."""
        if self.ledger_dir is None:
            uris = self.inner.listing(line_id)[start_seq:]
        else:
            with self._lock:
                ledger = self._ledgers.get(line_id)
                if ledger is None:
                    ledger = self._ledgers[line_id] = FrameLedger(self.ledger_dir / f"{line_id}.csv", line_id)
                ledger.extend(self.inner.listing(line_id))
                uris = ledger.uris[start_seq:]
        for seq, uri in enumerate(uris, start=start_seq):
            yield FrameRef(line_id, seq, uri)
