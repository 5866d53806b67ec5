"""Frame sources: where each line's frames come from and in which order.

A frame's sequence number is its position in its line's ordered source, so re-reading a source
after a crash gives every frame the same number again (exactly-once rests on that).
"""
from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .datasets import load_dataset, shuffled
from .files import append_whole, fsync_folder

log = logging.getLogger(__name__)


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
    """One folder per line under `root` (or the given `lines`; without them, `lines()` lists the
    folders again at each call). `listing(line)` is the line's
    frames present now, by name: every entry that is not a folder or hidden (a name starting with
    '.', the way to write a file before renaming it complete), broken links included (they get an
    error row). With `recursive`, the files of its subfolders too (not hidden ones, nor links to
    folders), named and ordered by their path under the line's folder (`2026-12-07/0001.png`);
    without it, the first listing that finds subfolders says they are not read. A `live` source grows, and takes a file only once it is complete: not modified
    for `settle_s` seconds (a camera still writing it keeps touching it).

    With `max_file_age_s` (A), the line's ledger remembers the frames recorded within 2A of its
    newest record (`FrameLedger`, bounded memory), and `Source` has the listing leave out files
    modified more than A before that record (`not_before`). A forgotten file was recorded before
    then, after it was written, so it is left out too (for clocks apart by less than A).

    A live folder is listed again every poll and holds every frame of the day: a name once
    taken is not looked at again (no `stat`), so a poll costs little more than reading the folder."""

    def __init__(
        self, root: str, lines: Optional[list[str]] = None, live: bool = False, settle_s: float = 0.0,
        max_file_age_s: float = 0.0, *, recursive: bool = False,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"source folder {self.root} does not exist (expected <root>/<line_id>/<images>)")
        self._lines = lines
        if not self.lines():
            files = [p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")]
            here = (f"; it holds {len(files)} file(s) itself, as a line's folder does: set root to its parent, "
                    f"{self.root.absolute().parent}" if files else "")
            raise FileNotFoundError(f"source folder {self.root} has no line subfolders (expected <root>/<line_id>/<images>){here}")
        self.live = live
        self.settle_s = settle_s if live else 0.0
        self.max_file_age_s = max_file_age_s if live else 0.0
        self.recursive = recursive
        self._told_of_subfolders: set[str] = set()  # lines whose unread subfolders were named
        # line -> complete files listed before: name -> mtime (a live source only reads it; else 0)
        self._taken: dict[str, dict[str, float]] = {}
        self.notices: list[str] = []  # what the job should hear: files left out (`Source.notices`)

    def lines(self) -> list[str]:
        """The given lines, else the line folders under `root` now (hidden ones left out), by name:
        a live job looks again for lines that appeared."""
        if self._lines:
            return list(self._lines)
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def line_address(self, line_id: str) -> str:
        """Where the line's frames come from, in words."""
        return f"folder {self.root / line_id}"

    def _entries(self, folder: Path, prefix: str, taken: dict, subfolders: list[str]) -> Iterator[tuple[str, os.DirEntry]]:
        """(name under the line's folder, entry) of each file listed; a name already `taken` is a
        file without asking. Subfolders are walked where `recursive`, else named in `subfolders`."""
        with os.scandir(folder) as entries:
            for entry in entries:
                name = prefix + entry.name
                if name in taken:
                    yield name, entry
                elif entry.name.startswith("."):
                    continue
                elif entry.is_dir():
                    if not self.recursive:
                        subfolders.append(name)
                    elif not entry.is_symlink():
                        yield from self._entries(Path(entry.path), name + "/", taken, subfolders)
                else:
                    yield name, entry

    def listing(self, line_id: str, not_before: Optional[float] = None) -> list[str]:
        """The line's complete files, in name order; with `not_before`, only those modified then
        or later (the others are frames recorded and forgotten, or files that came too late)."""
        folder = self.root / line_id
        if not folder.is_dir():
            return []
        first = line_id not in self._taken
        taken = self._taken.setdefault(line_id, {})
        now = time.time()
        found, present, too_old, subfolders = [], [], [], []
        for name, entry in self._entries(folder, "", taken, subfolders):
            mtime = taken.get(name)
            if mtime is None:
                mtime = entry.stat(follow_symlinks=False).st_mtime if self.live else 0.0
                if now - mtime < self.settle_s:
                    continue  # still being written
                taken[name] = mtime
                if not_before is not None and mtime < not_before and not first:
                    too_old.append(name)
            present.append(name)
            if not_before is None or mtime >= not_before:
                found.append(name)
        if subfolders and line_id not in self._told_of_subfolders:
            self._told_of_subfolders.add(line_id)
            self.notices.append(
                f"line {line_id}: {len(subfolders)} subfolder(s) of {folder} are not read (first: {min(subfolders)}); "
                "set source.recursive: true to read the frames in them"
            )
            log.warning(self.notices[-1])
        if len(taken) > 2 * len(present) + 1000:  # names gone from the folder (archived): forget them
            self._taken[line_id] = {name: taken[name] for name in present}
        if too_old:
            self.notices.append(
                f"line {line_id}: {len(too_old)} file(s) left out, modified more than {self.max_file_age_s:.0f} s before "
                f"the line's newest frame when they appeared (first: {min(too_old)}); raise the source's "
                f"max_file_age_s to take files that arrive this late"
            )
            log.warning(self.notices[-1])
        found.sort()
        prefix = f"{folder}{os.sep}"
        return [prefix + name for name in found]


class ManifestSource:
    """A CSV or Parquet table with columns line_id, uri and optional timestamp (or a folder of
    such tables, its subfolders included, read in path order: a job's ingest ledger folder
    replays its frames exactly); a line's order is by timestamp when present (stable), else the
    table's row order."""

    live = False
    max_file_age_s = 0.0

    def __init__(self, path: str, lines: Optional[list[str]] = None):
        target = Path(path)
        if target.is_dir():
            files = sorted(
                p for p in target.rglob("*")
                if p.suffix in (".csv", ".parquet") and not any(part.startswith(".") for part in p.relative_to(target).parts)
            )
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
    max_file_age_s = 0.0

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


LEDGER_SEGMENT_ROWS = 100_000  # rows per ledger file (~10 MB): a restart reads only the newest ones
LEDGER_COLUMNS = ["line_id", "seq", "uri", "taken_at"]


@dataclass
class LedgerSegment:
    """One ledger file's frames: seqs first_seq, first_seq + 1, ... in order."""

    first_seq: int
    uris: list[str]
    newest_taken_at: float  # ingestion's clock when it recorded the last of them (unix seconds)


class FrameLedger:
    """One line's frames in the order they were first seen: seq -> uri, in CSV files
    `<folder>/<first seq:012d>.csv` of LEDGER_SEGMENT_ROWS rows (`line_id,seq,uri,taken_at`; the
    ledger folder reads as a manifest). New frames are appended and fsynced before they are fed,
    so a frame's seq never depends on a later listing: a file whose name sorts before those
    already seen simply gets the next seq when it appears.

    It remembers (tells apart from new ones) the uris of the files in memory: every file, as often
    as each uri was recorded (a manifest that lists a file twice scores it twice); or, with
    `remember_s`, the files recorded within remember_s of its newest record (whole files, the
    newest always; a stopped job forgets nothing), which bounds its memory. Seqs whose file is
    forgotten are read back from disk when asked for."""

    def __init__(self, folder: Path, line_id: str, remember_s: Optional[float] = None):
        self.folder, self.line_id, self.remember_s = folder, line_id, remember_s
        self.segments: list[LedgerSegment] = []  # those in memory, oldest first, the newest always
        self.recorded: Counter = Counter()  # uri -> times recorded in the segments in memory
        files = self._files()
        if files:
            _drop_cut_row(files[-1][1])
        for first_seq, path in reversed(files):
            segment = self._read(first_seq, path)
            if self.segments:
                if first_seq + len(segment.uris) != self.segments[0].first_seq:
                    raise ValueError(f"ledger file {path} ends at seq {first_seq + len(segment.uris) - 1} but the next one "
                                     f"starts at {self.segments[0].first_seq}: restore the ledger folder {self.folder}")
                if self._forgotten(segment):
                    break
            self.segments.insert(0, segment)
            self.recorded.update(segment.uris)

    def __len__(self) -> int:
        return self.segments[-1].first_seq + len(self.segments[-1].uris) if self.segments else 0

    @property
    def newest_taken_at(self) -> Optional[float]:
        """When the newest frame was recorded (ingestion's clock, unix seconds); None: none yet."""
        return self.segments[-1].newest_taken_at if self.segments else None

    def uris_from(self, start_seq: int) -> list[str]:
        """The uris of seqs start_seq.. (read from the files where memory no longer holds them)."""
        first_in_memory = self.segments[0].first_seq if self.segments else 0
        uris = []
        if start_seq < first_in_memory:
            files = self._files()
            ends = [first_seq for first_seq, _ in files[1:]] + [len(self)]
            for (first_seq, path), end in zip(files, ends):
                if first_seq < first_in_memory and end > start_seq:
                    uris += self._read(first_seq, path).uris[max(0, start_seq - first_seq):]
        for segment in self.segments:
            uris += segment.uris[max(0, start_seq - segment.first_seq):]
        return uris

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
        now = time.time()
        done = 0
        while done < len(new):
            if not self.segments or len(self.segments[-1].uris) >= LEDGER_SEGMENT_ROWS:
                self.segments.append(LedgerSegment(len(self), [], now))
            segment = self.segments[-1]
            rows = new[done : done + LEDGER_SEGMENT_ROWS - len(segment.uris)]
            self._write(self.folder / f"{segment.first_seq:012d}.csv", segment.first_seq + len(segment.uris), rows, now)
            segment.uris += rows
            segment.newest_taken_at = now
            self.recorded.update(rows)
            done += len(rows)
        while len(self.segments) > 1 and self._forgotten(self.segments[0]):
            self.recorded.subtract(self.segments.pop(0).uris)
            self.recorded = +self.recorded  # drop the uris recorded no more
        return len(new)

    def _forgotten(self, segment: LedgerSegment) -> bool:
        return self.remember_s is not None and segment.newest_taken_at < self.newest_taken_at - self.remember_s

    def _files(self) -> list[tuple[int, Path]]:
        """(first seq, path) of the line's ledger files, in seq order."""
        self._migrate_single_file()
        if not self.folder.is_dir():
            return []
        return sorted((int(p.stem), p) for p in self.folder.iterdir() if p.suffix == ".csv" and p.stem.isdigit())

    def _migrate_single_file(self) -> None:
        """A ledger written as one `<line>.csv` beside the folder (before ledgers had files)
        becomes the folder's files, built aside and renamed into place; `taken_at` is the time
        the single file was last written."""
        legacy = self.folder.parent / f"{self.folder.name}.csv"
        if not legacy.is_file():
            return
        if not self.folder.exists():
            uris = [row["uri"] for row in _table_rows(legacy)]
            staging = self.folder.parent / f".{self.folder.name}.migrating"
            shutil.rmtree(staging, ignore_errors=True)
            for first_seq in range(0, len(uris), LEDGER_SEGMENT_ROWS):
                rows = uris[first_seq : first_seq + LEDGER_SEGMENT_ROWS]
                self._write(staging / f"{first_seq:012d}.csv", first_seq, rows, legacy.stat().st_mtime)
            staging.mkdir(parents=True, exist_ok=True)
            staging.rename(self.folder)
            fsync_folder(self.folder.parent)
        legacy.unlink()

    def _read(self, first_seq: int, path: Path) -> LedgerSegment:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for i, row in enumerate(rows):
            if int(row["seq"]) != first_seq + i:
                raise ValueError(f"ledger file {path}: row {i + 1} has seq {row['seq']}, expected {first_seq + i}; "
                                 f"restore the ledger folder {self.folder}")
        newest = max((float(row["taken_at"]) for row in rows), default=path.stat().st_mtime)  # empty: when made
        return LedgerSegment(first_seq, [row["uri"] for row in rows], newest)

    def _write(self, path: Path, first_seq: int, uris: list[str], taken_at: float) -> None:
        """Append the rows of seqs first_seq.. to a ledger file (made with its header), fsynced.
        All or nothing: a write that fails (a full disk) cuts the file back to where it was, so
        that the retry appends the same rows whole after the last good one."""
        created = not path.is_file()
        if created:
            path.parent.mkdir(parents=True, exist_ok=True)

        def rows(size: int) -> bytes:
            text = io.StringIO()
            writer = csv.writer(text)
            if size == 0:
                writer.writerow(LEDGER_COLUMNS)
            writer.writerows([self.line_id, first_seq + i, uri, f"{taken_at:.3f}"] for i, uri in enumerate(uris))
            return text.getvalue().encode("utf-8")

        append_whole(path, rows)
        if created:
            fsync_folder(path.parent)


def _drop_cut_row(path: Path) -> None:
    """A ledger row cut short by a crash (the file does not end in a newline) was never fed: drop it."""
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) != b"\n":
            fh.seek(0)
            fh.truncate(fh.read().rfind(b"\n") + 1)


def remembered_s(max_file_age_s: float) -> Optional[float]:
    """How long a folder line's ledger remembers what it recorded (see FolderSource); None: always."""
    return 2 * max_file_age_s if max_file_age_s else None


class Source:
    """What ingestion reads: a source's lines and, per line, its frames with their seqs. With a
    ledger folder, seqs come from the line's `FrameLedger` in `<ledger_dir>/<line>/` (folder and
    manifest sources: their listings can change between runs); a dataset's fixed order needs none."""

    def __init__(self, inner, ledger_dir: Optional[str] = None):
        self.inner = inner
        self.live = inner.live
        self.ledger_dir = None if ledger_dir is None else Path(ledger_dir)
        self._ledgers: dict[str, FrameLedger] = {}
        self._lock = threading.Lock()  # an ingest actor lists from two threads (feeding, totals)

    def lines(self) -> list[str]:
        return self.inner.lines()

    def line_address(self, line_id: str) -> str:
        return self.inner.line_address(line_id)

    def notices(self) -> list[str]:
        """What the source has to tell the job since it was last asked (a watched folder's files
        left out as too old)."""
        with self._lock:
            said = getattr(self.inner, "notices", [])
            notices = list(said)
            said.clear()
        return notices

    def frame_count(self, line_id: str) -> int:
        """How many frames the line has now (a finite source: all it has)."""
        return len(self._uris(line_id, 0))

    def forget(self, line_id: str) -> None:
        """Drop the line's ledger from memory: it is read from disk again when next used (another
        ingestion actor may have recorded frames in it since: a line that left and rejoined)."""
        with self._lock:
            self._ledgers.pop(line_id, None)

    def frames(self, line_id: str, start_seq: int = 0) -> Iterator[FrameRef]:
        """The line's frames known now, from `start_seq` on (new ones are recorded first)."""
        for seq, uri in enumerate(self._uris(line_id, start_seq), start=start_seq):
            yield FrameRef(line_id, seq, uri)

    def _uris(self, line_id: str, start_seq: int) -> list[str]:
        """The uris of the line's seqs start_seq.. (new ones recorded first)."""
        if self.ledger_dir is None:
            return self.inner.listing(line_id)[start_seq:]
        with self._lock:
            ledger = self._ledgers.get(line_id)
            age = self.inner.max_file_age_s  # see FolderSource
            if ledger is None:
                ledger = self._ledgers[line_id] = FrameLedger(self.ledger_dir / line_id, line_id, remembered_s(age))
            if age and ledger.newest_taken_at is not None:
                ledger.extend(self.inner.listing(line_id, not_before=ledger.newest_taken_at - age))
            else:
                ledger.extend(self.inner.listing(line_id))
            return ledger.uris_from(start_seq)
