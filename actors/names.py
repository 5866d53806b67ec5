"""Names of a job's actors on a Ray cluster, so that another driver (an operator's command with
`--address`) finds a running job's line actors and supervisor."""
from __future__ import annotations

import hashlib
from pathlib import Path

NAMESPACE = "rareclip"  # named actors live in one fixed Ray namespace


def job_key(results_dir: Path) -> str:
    """Names one job's actors apart from other jobs' on the same cluster: its result folder."""
    return hashlib.sha256(str(Path(results_dir).resolve()).encode()).hexdigest()[:10]


def line_actor_name(job: str, line_id: str) -> str:
    return f"rareclip-line-{job}-{line_id}"


def writer_actor_name(job: str) -> str:
    return f"rareclip-writer-{job}"


def supervisor_actor_name(job: str) -> str:
    return f"rareclip-supervisor-{job}"
