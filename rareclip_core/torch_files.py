"""Reading the torch files a user hands the project (checkpoints, weights, a resume file): with
`weights_only=True`, so that nothing in them is unpickled as code, and with errors that name the
setting at fault and say what is wrong with the file, in place of torch's own text (whose advice
for such a file is to load it unsafely)."""
from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path
from typing import Optional

from .config import ConfigError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6, and TorchScript archives (OpenAI's .pt)
PICKLE_PROTOCOL = 0x80  # the first byte of a legacy torch.save (a pickle of protocol 2 or more)
TORCHSCRIPT = ("a TorchScript archive (such as OpenAI's own .pt files), which is never loaded here (torch "
               "reads one only unsafely); use OpenCLIP's copy of the same weights, the file that "
               "`pretrained: openai` downloads (open_clip_model.safetensors, e.g. from the Hugging Face Hub's "
               "timm/vit_large_patch14_clip_336.openai)")


def is_torchscript(file: Path) -> bool:
    """Whether `file` is a TorchScript archive: a zip with TorchScript's `constants.pkl` or `code/`."""
    try:
        with zipfile.ZipFile(file) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_torch_file(path: str | Path, field: str, what: str, fix: str):
    """The object saved in the torch file at `path`. ConfigError naming `field` when there is no
    file there (with `fix`: what to set it to) or it is no readable `what` (a torch checkpoint, ...)."""
    import torch  # here: `weights_file_problem` serves light processes (a job's driver) too

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{field}: no file at {str(path)!r}; {fix}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for foreign or damaged files
        raise ConfigError(f"{field}: {path} is not a readable {what} ({load_failure(err, file)})") from None


def load_failure(err: Exception, file: Path) -> str:
    """Why loading `file` failed, in a few words."""
    if file.is_file() and file.stat().st_size == 0:
        return "the file is empty"
    if is_torchscript(file):
        return TORCHSCRIPT
    if isinstance(err, pickle.UnpicklingError):
        return "not a torch file, or one that holds Python objects besides tensors, which are never unpickled here"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def weights_file_problem(path: str | Path) -> Optional[str]:
    """Why the file at `path` cannot be weights, from its first bytes alone (a job checks every
    weights file so before its actors start): empty, or neither a torch file (zip or pickle) nor
    safetensors, or a TorchScript archive. None when it may be."""
    with Path(path).expanduser().open("rb") as fh:
        head = fh.read(9)
    if not head:
        return "the file is empty"
    if head.startswith(ZIP_MAGIC) and is_torchscript(Path(path).expanduser()):
        return TORCHSCRIPT
    if head.startswith(ZIP_MAGIC) or head[0] == PICKLE_PROTOCOL:
        return None
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 0:  # safetensors: header size, JSON
        return None
    return f"neither a torch file nor safetensors (it begins {head[:8]!r})"
