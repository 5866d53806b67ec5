"""The profile's device busy time (benchmarks/profiling.py) counts overlapping kernels once: it is
the figure that tells a host-bound step from a device-bound one on a lease."""
import torch

from benchmarks.profiling import describe, profile_calls, union_length


def test_busy_time_is_the_union_of_the_kernel_intervals():
    # [0, 3] from two overlapping kernels, [5, 6] holding a nested one, [7, 7.5] alone
    intervals = [(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (5.5, 5.7), (7.0, 7.5)]
    assert union_length(intervals) == 4.5
    assert union_length([]) == 0.0


def test_a_cpu_profile_writes_its_table_and_trace_and_says_it_has_no_device_events(tmp_path):
    x = torch.randn(64, 64)
    summary = profile_calls("matmul", lambda: (x @ x).relu(), 3, torch.device("cpu"), tmp_path)
    assert summary["calls"] == 3 and summary["device_busy_ms"] is None
    assert "aten::mm" in (tmp_path / "matmul-top-ops.txt").read_text()
    assert (tmp_path / "matmul-trace.json.gz").stat().st_size > 0
    assert describe(summary).endswith("(no device events: CPU)")
