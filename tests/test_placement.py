"""Where line actors go: GPU and CPU shares, and the devices a line actor can use."""
import pytest

from pipelines.placement import LinePlacement, line_device_problem, place_lines
from rareclip_core.config import ConfigError


def test_lines_take_a_share_of_a_gpu_where_the_cluster_has_gpus_and_run_on_cpu_otherwise():
    assert place_lines(8, {"GPU": 2, "CPU": 16}, lines_per_gpu=4, line_num_cpus=0.5) == LinePlacement(0.25, 0.5)
    assert place_lines(8, {"CPU": 16}, lines_per_gpu=4, line_num_cpus=0.5) == LinePlacement(0, 0.5)


def test_more_lines_than_the_gpus_hold_are_refused_naming_the_fix():
    with pytest.raises(ConfigError, match=r"9 lines at lines_per_gpu=4 need 2.25 GPUs, the cluster has 2: raise lines_per_gpu"):
        place_lines(9, {"GPU": 2, "CPU": 16}, lines_per_gpu=4, line_num_cpus=0.5)


def test_fit_all_raises_lines_per_gpu_and_lowers_the_cpu_share_until_every_line_fits():
    # 15 lines on 2 GPUs: 8 per GPU (1/8 each); 6 CPUs shared by 15 lines: 0.4 each, not 0.5
    assert place_lines(15, {"GPU": 2, "CPU": 6}, lines_per_gpu=4, line_num_cpus=0.5, fit_all=True) == LinePlacement(0.125, 0.4)
    # 7 CPUs / 15 lines = 0.4666..., cut down (not rounded up) to 4 decimals so that 15 shares fit
    assert place_lines(15, {"CPU": 7}, lines_per_gpu=4, line_num_cpus=0.5, fit_all=True) == LinePlacement(0, 0.4666)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0"])
def test_a_line_can_use_auto_cpu_and_its_own_gpu_on_a_cluster_with_gpus(device):
    assert line_device_problem(device, {"GPU": 1, "CPU": 8}) is None


def test_cuda_on_a_cluster_without_gpus_is_refused_naming_the_setting_and_the_fix():
    problem = line_device_problem("cuda", {"CPU": 8}, field="line_detector.cam2.device")
    assert problem == ("line_detector.cam2.device is 'cuda', but the Ray cluster has no GPU: "
                       "set it to 'auto' or 'cpu', or join a cluster with GPUs")
    assert line_device_problem("auto", {"CPU": 8}) is None


@pytest.mark.parametrize("device", ["cuda:1", "cuda:12", "cuda:01"])
def test_a_gpu_index_past_0_is_refused_as_a_line_actor_sees_only_its_own_gpu(device):
    assert "sees only the GPU that Ray gives it, as cuda:0" in line_device_problem(device, {"GPU": 4})
