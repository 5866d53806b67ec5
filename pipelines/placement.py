"""Where line actors go: the one rule for sharing GPUs and CPUs among a job's lines."""
from __future__ import annotations

import math
from dataclasses import dataclass

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
