"""Every benchmark script runs as the docs write it, `python benchmarks/<name>.py ...` from the
repository root, with no PYTHONPATH set."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_there_are_scripts():
    assert {"step_latency.py", "pipeline_throughput.py", "decode_rate.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_starts_without_pythonpath(script):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_table_files_reports_fewer_files_once_merged():
    proc = subprocess.run([sys.executable, "benchmarks/table_files.py", "--lines", "2", "--files", "5",
                           "--compact-files", "2", "--compact-rows", "6"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = {line.split(":")[0]: int(line.split(" files,")[0].rsplit(" ", 1)[1])
             for line in proc.stdout.splitlines() if " files," in line}
    assert files == {"unmerged": 10, "merged": 4}  # per line: 4 flushes merged into one file of 8 rows, + the 5th


def test_ledger_memory_reports_a_window_remembered():
    proc = subprocess.run([sys.executable, "benchmarks/ledger_memory.py", "--frames", "250000", "--rate", "0.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loads = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # files of 100,000 rows, the last recorded at 500,000 s: the first file's newest (200,000 s) is
    # more than 2 days older and forgotten; the second's (400,000 s) is not
    assert [(r["max_file_age_s"], r["frames"], r["remembered"]) for r in loads] == [(0, 250_000, 250_000),
                                                                                    (86_400, 250_000, 150_000)]


def test_the_pipeline_alone_runs_with_the_probe_that_does_no_work():
    """The GPU suite's measure of the pipeline's own ceiling (a detector kind that reads no blocks
    and names no OpenCLIP model)."""
    proc = subprocess.run([sys.executable, "benchmarks/pipeline_throughput.py", "--no-model", "--probe-step-ms", "5",
                           "--pretrained", "none",  # as the GPU suite passes it: the probe has no weights to swap
                           "--frames", "8", "--lines", "1", "--replay-batches"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model none (overhead probe)" in proc.stdout and "lines=1 aggregate_img_s=" in proc.stdout


ISSUE_18_FIELDS = {"device", "config", "image_size", "lines", "p50_ms", "p99_ms", "max_memory_mb", "images_per_s", "command"}


@pytest.mark.parametrize("command", [
    ["step_latency.py", "--config", "configs/detector-tiny.yaml", "--steps", "3", "--warmup", "1", "--fill",
     "--cuda-graphs", "--resize-on-device", "--frame-size", "128"],
    ["detector_latency.py", "--config", "configs/detector-afrclip-tiny.yaml", "--frames", "4", "--warmup", "1", "--size", "64"],
], ids=["step_latency", "detector_latency"])
def test_a_gpu_suite_timing_writes_the_record_the_speed_issue_asks_for(command, tmp_path):
    """The GPU suite's timings, run here on CPU with a tiny model: one JSON record each, with the
    fields docs/benchmarks/ records carry (a lent GPU's minutes are too few to find a broken script)."""
    script, *args = command
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--pretrained", "none", "--device", "cpu",
                           "--json", str(tmp_path / "records.json")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [record] = json.loads((tmp_path / "records.json").read_text())
    assert ISSUE_18_FIELDS <= set(record) and record["device"].startswith("CPU") and 0 < record["p50_ms"] <= record["p99_ms"]
    assert record.get("banks_full", True)  # step_latency's --fill: timed in steady state


def test_random_weights_for_timing_keep_the_network_of_the_real_ones():
    from benchmarks.weights import with_weights
    from configs.loading import load_detector_config

    paper = with_weights(load_detector_config(str(REPO / "configs" / "detector-paper.yaml")), "none")
    assert paper.pretrained is None and paper.quick_gelu is False  # RareCLIP's authors' GELU, as with the real weights
    adapt = with_weights(load_detector_config(str(REPO / "configs" / "detector-adaptclip.yaml")), "none")
    assert adapt.quick_gelu is True  # OpenAI's activation, as with the real weights
    afr = with_weights(load_detector_config(str(REPO / "configs" / "detector-afrclip.yaml")), "none")
    assert afr.cnn_weights is None and afr.quick_gelu is True
    dual = with_weights(load_detector_config(str(REPO / "configs" / "detector-dual-image.yaml")), "none")
    assert dual.quick_gelu is False  # LAION's ViT-B-16+ was trained with GELU
    assert with_weights(paper, "/w/clip.bin").pretrained == "/w/clip.bin"
