"""Frame sources: where each line's frames come from and in which order.

A frame's sequence number is its position in its line's ordered source, so re-reading a source
after a crash gives every frame the same number again (exactly-once rests on that).
"""
from __future__ import annotations

import csv
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


def read_uri(uri: str) -> bytes:
    """Bytes of a local path or any URI pyarrow.fs understands (s3://, gs://, file://)."""
    if "://" not in uri:
        return Path(uri).read_bytes()
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


class FolderSource:
    """One folder per line under `root` (or the given `lines`); files sorted by name. `live`
    sources grow: re-reading from a seq later yields the files that appeared since (their
    names must sort after the earlier ones)."""

    def __init__(self, root: str, lines: Optional[list[str]] = None, live: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"source folder {self.root} does not exist (expected <root>/<line_id>/<images>)")
        self._lines = lines or sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self._lines:
            raise FileNotFoundError(f"source folder {self.root} has no line subfolders")
        self.live = live

    def lines(self) -> list[str]:
        return list(self._lines)

    def frames(self, line_id: str, start_seq: int = 0) -> Iterator[FrameRef]:
        """The frames present now, from `start_seq` on."""
        folder = self.root / line_id
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []
        for seq, path in enumerate(files[start_seq:], start=start_seq):
            yield FrameRef(line_id, seq, str(path))


class ManifestSource:
    """A CSV or Parquet table with columns line_id, uri and optional timestamp; a line's order is
    by timestamp when present (stable), else the table's row order."""

    live = False

    def __init__(self, path: str, lines: Optional[list[str]] = None):
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"manifest {file} does not exist")
        if file.suffix == ".parquet":
            rows = pq.read_table(file).to_pylist()
        else:
            with file.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
        missing = {"line_id", "uri"} - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"manifest {file} lacks column(s) {sorted(missing)}; needs line_id, uri[, timestamp]")
        self._by_line: dict[str, list[str]] = {}
        has_time = "timestamp" in rows[0]
        order = sorted(range(len(rows)), key=lambda i: (str(rows[i]["timestamp"]), i)) if has_time else range(len(rows))
        for i in order:
            self._by_line.setdefault(str(rows[i]["line_id"]), []).append(str(rows[i]["uri"]))
        if lines:
            self._by_line = {k: v for k, v in self._by_line.items() if k in lines}

    def lines(self) -> list[str]:
        return sorted(self._by_line)

    def frames(self, line_id: str, start_seq: int = 0) -> Iterator[FrameRef]:
        for seq, uri in enumerate(self._by_line.get(line_id, [])[start_seq:], start=start_seq):
            yield FrameRef(line_id, seq, uri)


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

    def frames(self, line_id: str, start_seq: int = 0) -> Iterator[FrameRef]:
        for seq, sample in enumerate(self.samples[line_id][start_seq:], start=start_seq):
            yield FrameRef(line_id, seq, sample.path)
