"""Line snapshots through pyarrow.fs (local paths and object-store URIs alike).

Layout: `<root>/<line_id>/seq-<last seq covered, 12 digits>/{state.safetensors, manifest.json}`.
A snapshot is written under a hidden temporary name (manifest last, fsync on local disks),
then renamed. Loading checks the manifest (format version, line, detector config fingerprint,
SHA-256 of the state file) and falls back to the previous snapshot, logging why.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pyarrow.fs as pafs

from rareclip_core.data.files import fsync_folder

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 3  # 3: k-shot state as the authors keep it (banks.n_reference, reference_laifs); 2: banks stacked
STATE_FILE = "state.safetensors"
MANIFEST_FILE = "manifest.json"
log = logging.getLogger(__name__)


class SnapshotError(ValueError):
    """A snapshot that must not be used; the message says why."""


@dataclass(frozen=True)
class SnapshotInfo:
    line_id: str
    name: str
    next_seq: int  # the snapshot covers seqs < next_seq


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    return pafs.FileSystem.from_uri(root)


def snapshot_name(next_seq: int) -> str:
    return f"seq-{next_seq - 1:012d}"


def snapshot_lines(root: str) -> list[str]:
    """The lines that have a snapshot folder under `root`."""
    fs, base = _filesystem(root)
    selector = pafs.FileSelector(base.rstrip("/"), allow_not_found=True)
    return sorted(i.base_name for i in fs.get_file_info(selector) if i.type == pafs.FileType.Directory)


class SnapshotStore:
    def __init__(self, root: str, line_id: str):
        self.fs, base = _filesystem(root)
        self.line_id = line_id
        self.dir = f"{base.rstrip('/')}/{line_id}"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.rejected: list[str] = []  # why load_latest passed over snapshots, last call

    def list(self) -> list[SnapshotInfo]:
        """Snapshots present, oldest first (by the last seq they cover); not validated."""
        selector = pafs.FileSelector(self.dir, allow_not_found=True)
        names = [i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory]
        found = [SnapshotInfo(self.line_id, n, int(n[4:]) + 1) for n in names if n.startswith("seq-") and n[4:].isdigit()]
        return sorted(found, key=lambda s: s.next_seq)

    def save(self, state: dict[str, torch.Tensor], next_seq: int, fingerprint: str,
             settings: Optional[dict] = None) -> SnapshotInfo:
        """Write atomically the state of a line that has scored every seq < next_seq; `settings`
        (the detector's fingerprinted ones) let a later job say how its own differ."""
        from safetensors.torch import save as save_safetensors

        name = snapshot_name(next_seq)
        final = f"{self.dir}/{name}"
        data = save_safetensors(state)
        manifest = {
            "format_version": FORMAT_VERSION,
            "line_id": self.line_id,
            "next_seq": next_seq,
            "config_fingerprint": fingerprint,
            "detector_settings": settings,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        tmp = f"{self.dir}/.tmp-{uuid.uuid4().hex}"
        self.fs.create_dir(tmp, recursive=True)
        self._write(f"{tmp}/{STATE_FILE}", data)
        self._write(f"{tmp}/{MANIFEST_FILE}", json.dumps(manifest, indent=1).encode())
        if self.fs.get_file_info(final).type != pafs.FileType.NotFound:
            self.fs.delete_dir(final)  # same seq again (e.g. after a restore): the new one wins
        self.fs.move(tmp, final)
        if self.local:
            fsync_folder(self.dir)
        return SnapshotInfo(self.line_id, name, next_seq)

    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as out:
            out.write(data)
        if self.local:
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())

    def manifest(self, info: SnapshotInfo) -> Optional[dict]:
        """One snapshot's manifest; None when it cannot be read as a JSON object."""
        try:
            with self.fs.open_input_stream(f"{self.dir}/{info.name}/{MANIFEST_FILE}") as fh:
                manifest = json.loads(fh.read())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def load(self, info: SnapshotInfo, fingerprint: str) -> dict[str, torch.Tensor]:
        """The state of one snapshot, or SnapshotError naming what is wrong with it."""
        from safetensors.torch import load as load_safetensors

        path = f"{self.dir}/{info.name}"
        try:
            with self.fs.open_input_stream(f"{path}/{MANIFEST_FILE}") as fh:
                manifest = json.loads(fh.read())
            with self.fs.open_input_stream(f"{path}/{STATE_FILE}") as fh:
                data = fh.read()
        except (OSError, ValueError) as err:
            raise SnapshotError(f"{path}: unreadable ({err})") from None
        if not isinstance(manifest, dict):
            raise SnapshotError(f"{path}: manifest is not a JSON object")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise SnapshotError(f"{path}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
        if manifest.get("line_id") != self.line_id or manifest.get("next_seq") != info.next_seq:
            raise SnapshotError(f"{path}: manifest is for {manifest.get('line_id')} seq {manifest.get('next_seq')}")
        if manifest.get("config_fingerprint") != fingerprint:
            raise SnapshotError(f"{path}: written with another detector config ({manifest.get('config_fingerprint')} != {fingerprint})")
        if len(data) != manifest.get("bytes") or hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            raise SnapshotError(f"{path}: checksum mismatch (truncated or corrupted state file)")
        try:
            return load_safetensors(data)
        except Exception as err:  # noqa: BLE001 - any parse failure means unusable
            raise SnapshotError(f"{path}: state file does not parse ({err})") from None

    def load_latest(self, fingerprint: str, at_most: Optional[int] = None) -> tuple[Optional[SnapshotInfo], dict]:
        """The newest valid snapshot (covering at most `at_most` frames); (None, {}) if none.
        Why newer ones were rejected is logged and kept in `self.rejected`."""
        self.rejected = []
        for info in reversed(self.list()):
            if at_most is not None and info.next_seq > at_most:
                continue
            try:
                return info, self.load(info, fingerprint)
            except SnapshotError as err:
                log.warning("line %s: snapshot rejected, trying the previous one: %s", self.line_id, err)
                self.rejected.append(str(err))
        return None, {}

    def describe(self, info: SnapshotInfo, fingerprint: str) -> dict:
        """What an operator sees of one snapshot: size, creation time (from the manifest) and
        `problem`, None when `load` would accept it, else why it would be rejected."""
        path = f"{self.dir}/{info.name}"
        state = self.fs.get_file_info(f"{path}/{STATE_FILE}")
        manifest = self.manifest(info)
        try:
            self.load(info, fingerprint)
            problem = None
        except SnapshotError as err:
            problem = str(err)
        return {
            "line_id": self.line_id,
            "name": info.name,
            "next_seq": info.next_seq,
            "bytes": state.size if state.type == pafs.FileType.File else None,
            "created_utc": manifest.get("created_utc") if manifest else None,
            "problem": problem,
        }

    def delete(self, info: SnapshotInfo) -> None:
        self.fs.delete_dir(f"{self.dir}/{info.name}")

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` snapshots, and temporary folders a crash left behind
        (only the line's own actor writes here, so none is in progress)."""
        selector = pafs.FileSelector(self.dir, allow_not_found=True)
        leftovers = [i.path for i in self.fs.get_file_info(selector) if i.base_name.startswith(".tmp-")]
        for path in leftovers + [f"{self.dir}/{info.name}" for info in self.list()[:-keep]]:
            self.fs.delete_dir(path)

