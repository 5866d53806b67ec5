"""A line's normal references added while it runs (an operator's `references add`): each addition
takes effect at a recorded seq, so that a restored line, replaying the frames after its
snapshot, applies it again before exactly the same frame.

`<out>/references/<line>/log.json` lists the additions in order: `{"at_seq": s, "files": [...]}`.
The reference images themselves are copied beside it when they are added (`<s>-<i><suffix>`),
so a replay reads the same bytes even if the originals move or change."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rareclip_core.data.files import atomic_write
from rareclip_core.data.frames import FrameDecoding, FrameError, decode_frame
from rareclip_core.data.sources import read_uri

LOG_FILE = "log.json"


@dataclass(frozen=True)
class ReferenceAddition:
    at_seq: int  # applied just before the frame with this seq is scored
    files: tuple[str, ...]  # the copied reference images (absolute paths)


class ReferenceLog:
    """The additions of one line (see the module docstring); `folder` is `<out>/references/<line>`."""

    def __init__(self, folder: str | Path, decoding: FrameDecoding = FrameDecoding()):
        self.folder = Path(folder)
        self.decoding = decoding  # the job's: a reference is accepted as its frames are
        path = self.folder / LOG_FILE
        entries = json.loads(path.read_text()) if path.is_file() else []
        self.additions = [ReferenceAddition(e["at_seq"], tuple(str(self.folder / f) for f in e["files"])) for e in entries]

    def at(self, seq: int) -> list[ReferenceAddition]:
        return [a for a in self.additions if a.at_seq == seq]

    def add(self, at_seq: int, uris: list[str]) -> ReferenceAddition:
        """Copy the images of `uris` beside the log and record them at `at_seq` (durably, before
        anything uses them). Each must decode as a frame: FrameError/OSError name the first that
        does not. `at_seq` may not precede an earlier addition's."""
        if self.additions and at_seq < self.additions[-1].at_seq:
            raise ValueError(f"references: seq {at_seq} is before the last addition's ({self.additions[-1].at_seq})")
        contents = [self._checked(uri) for uri in uris]  # all refused or none: nothing copied before
        names = []
        for i, (uri, data) in enumerate(zip(uris, contents)):
            name = f"{at_seq}-{len(self.at(at_seq))}-{i}{Path(uri).suffix.lower() or '.img'}"
            atomic_write(self.folder / name, lambda tmp, data=data: tmp.write_bytes(data))
            names.append(name)
        entries = [{"at_seq": a.at_seq, "files": [Path(f).name for f in a.files]} for a in self.additions]
        entries.append({"at_seq": at_seq, "files": names})
        atomic_write(self.folder / LOG_FILE, lambda tmp: tmp.write_text(json.dumps(entries, indent=1)))
        addition = ReferenceAddition(at_seq, tuple(str(self.folder / n) for n in names))
        self.additions.append(addition)
        return addition

    def _checked(self, uri: str) -> bytes:
        """The file's bytes, if they decode as a frame that could be scored."""
        data = read_uri(uri)
        try:
            decode_frame(data, self.decoding)
        except FrameError as err:
            raise FrameError(f"reference {uri}: {err}") from None
        return data


def reference_images(uris, decoding: FrameDecoding = FrameDecoding()) -> list:
    """The images of `uris`, decoded as frames (H x W x 3 uint8)."""
    return [decode_frame(read_uri(uri), decoding) for uri in uris]
