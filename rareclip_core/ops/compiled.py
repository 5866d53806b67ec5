"""What `torch.compile` needs to build kernels on a device, checked before a detector is built."""
from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Optional

import torch


def compile_problem(device: torch.device) -> Optional[str]:
    """Why torch.compile (inductor) cannot build kernels for `device` on this machine, or None:
    on CUDA it writes Triton kernels, on the CPU C++ ones."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "torch.compile needs the triton package on CUDA (pip install triton)"
    compiler = os.environ.get("CXX") or "g++"
    return None if shutil.which(compiler) else f"torch.compile needs a C++ compiler on the CPU ({compiler} not found; install g++ or set CXX)"
