"""A small but realistic result dataset (Parquet rows, PNG frames, float16 maps) for tests."""
import datetime as dt
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from actors.result_table import FILE_SCHEMA, STATUS_ERROR, STATUS_OK, map_path

LINES = ("bottle", "cable", "screw")
ROWS_PER_LINE = 40
DATES = ("2026-03-01", "2026-03-02")
FRAME_SIZES = ((160, 120), (128, 128), (120, 160))  # (width, height)
MAP_SIZE = 64
THRESHOLD = 0.7
ENV_RESULTS = "RARECLIP_TEST_RESULTS"


def results_dir_under_test(tmp_path_factory) -> Path:
    """The dataset the generic tests check: $RARECLIP_TEST_RESULTS if set, else a fresh fixture."""
    if os.environ.get(ENV_RESULTS):
        return Path(os.environ[ENV_RESULTS])
    return write_results_fixture(tmp_path_factory.mktemp("fixture"))


def write_results_fixture(root) -> Path:
    """Write frames under `root/frames` and the result dataset under `root/results`; return the latter."""
    root = Path(root)
    results = root / "results"
    rng = np.random.default_rng(0)
    start = dt.datetime(2026, 3, 1, 22, 0, tzinfo=dt.timezone.utc)
    for line_index, line in enumerate(LINES):
        rows = []
        for seq in range(ROWS_PER_LINE):
            width, height = FRAME_SIZES[(seq + line_index) % len(FRAME_SIZES)]
            frame = root / "frames" / line / f"{seq:05d}.png"
            frame.parent.mkdir(parents=True, exist_ok=True)
            score = float(rng.beta(2, 5) if seq % 7 else rng.uniform(0.7, 1.0))
            defect = rng.uniform(0.2, 0.8, size=2)  # (x, y) in the centered square, as fractions
            _frame_pixels(width, height, defect, score, line_index).save(frame)
            ingest = start + dt.timedelta(minutes=5 * seq)  # crosses midnight: two dates
            latency = float(rng.uniform(20, 80))
            row = {
                "seq": seq,
                "uri": str(frame),
                "ingest_time": ingest,
                "scored_time": ingest + dt.timedelta(milliseconds=latency),
                "latency_ms": latency,
                "threshold": THRESHOLD,
                "model_id": "rareclip-vit-b16",
                "score": None,
                "is_anomaly": None,
                "error": None,
                "map_uri": None,
            }
            if seq % 13 == 5:
                row.update(status=STATUS_ERROR, error=f"decode failed: truncated file {frame.name}")
            else:
                anomaly_map = _anomaly_map(defect, score, rng)
                map_uri = map_path(line, seq)  # where the ResultWriter puts maps
                (results / map_uri).parent.mkdir(parents=True, exist_ok=True)
                np.save(results / map_uri, anomaly_map.astype(np.float16))
                row.update(status=STATUS_OK, score=score, is_anomaly=score >= THRESHOLD, map_uri=map_uri)
            rows.append(row)
        _write_partitions(results, line, rows)
    return results


def _frame_pixels(width: int, height: int, defect, score: float, line_index: int) -> Image.Image:
    """A smooth shaded part with a dark disc (darker for higher scores) at `defect` of the center square."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    side = min(width, height)
    centre_x = (width - side) // 2 + defect[0] * side
    centre_y = (height - side) // 2 + defect[1] * side
    shade = 150 + 60 * np.sin(x / width * np.pi) * np.cos(y / height * np.pi / 2)
    disc = np.hypot(x - centre_x, y - centre_y) < 0.1 * side
    gray = np.where(disc, shade * (1 - 0.8 * score), shade)
    tint = np.array([(1.0, 0.9, 0.8), (0.8, 0.9, 1.0), (0.9, 1.0, 0.85)][line_index], dtype=np.float32)
    return Image.fromarray(np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8))


def _anomaly_map(defect, score: float, rng) -> np.ndarray:
    """A MAP_SIZE x MAP_SIZE map peaking (at `score`) over the defect, plus a little noise."""
    y, x = np.mgrid[0:MAP_SIZE, 0:MAP_SIZE] + 0.5
    peak = np.exp(-((x - defect[0] * MAP_SIZE) ** 2 + (y - defect[1] * MAP_SIZE) ** 2) / (2 * 4.0**2))
    return score * peak + 0.05 * rng.random((MAP_SIZE, MAP_SIZE))


def _write_partitions(results: Path, line: str, rows: list) -> None:
    """Write one Parquet file per (line, date) the way the ResultWriter does: temp name, then rename."""
    for date in DATES:
        part = [row for row in rows if row["scored_time"].date().isoformat() == date]
        directory = results / f"line_id={line}" / f"date={date}"
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / ".tmp-part-0.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=FILE_SCHEMA), temporary)
        os.replace(temporary, directory / "part-0.parquet")
