"""Where line actors go: the one rule for sharing GPUs and CPUs among a job's lines."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from rareclip_core.config import ConfigError


@dataclass(frozen=True)
class LinePlacement:
    num_gpus: float  # per line actor: 1 / lines_per_gpu where the cluster has GPUs, else 0 (CPU)
    num_cpus: float  # per line actor


def place_lines(n_lines: int, resources: dict, lines_per_gpu: int, line_num_cpus: float, fit_all: bool = False) -> LinePlacement:
    """Each line actor takes 1/lines_per_gpu of a GPU when the cluster (`ray.cluster_resources()`)
    has GPUs, and runs on CPU otherwise. More lines than the GPUs hold at lines_per_gpu are
    refused (they would wait forever), unless `fit_all` (evaluate runs every category at once):
    then lines_per_gpu is raised until they fit, and the CPU share lowered to fit the CPUs."""
    gpus = resources.get("GPU", 0)
    if fit_all:
        if gpus:
            lines_per_gpu = max(lines_per_gpu, math.ceil(n_lines / gpus))
        line_num_cpus = min(line_num_cpus, math.floor(resources.get("CPU", 1) / n_lines * 1e4) / 1e4)
    if gpus and n_lines > gpus * lines_per_gpu:
        raise ConfigError(
            f"{n_lines} lines at lines_per_gpu={lines_per_gpu} need {n_lines / lines_per_gpu:g} GPUs, "
            f"the cluster has {gpus:g}: raise lines_per_gpu"
        )
    return LinePlacement(1 / lines_per_gpu if gpus else 0, line_num_cpus)


def line_device_problem(device: str, resources: dict, field: str = "detector.device") -> Optional[str]:
    """Why a line actor could not use the torch device `device` on a cluster of `resources`
    (`ray.cluster_resources()`), or None. A line actor sees only the GPU share Ray gives it, and
    that GPU is its `cuda:0`: a cluster without GPUs has none to give, and `cuda:N` past 0 names
    a GPU the actor cannot see."""
    if device.startswith("cuda") and not resources.get("GPU"):
        return f"{field} is {device!r}, but the Ray cluster has no GPU: set it to 'auto' or 'cpu', or join a cluster with GPUs"
    if re.fullmatch(r"cuda:0*[1-9]\d*", device):
        return (f"{field} is {device!r}, but a line actor sees only the GPU that Ray gives it, as cuda:0: "
                "set it to 'cuda' (or 'auto'), and let lines_per_gpu share the GPUs out")
    return None
