"""Losing a node: on a local multi-node Ray cluster (a head and two worker nodes that alone can
host lines), the node running a line is removed mid-stream; the line resumes on the other node
from its snapshot and the result table equals an uncrashed run's. A module of its own: it needs
its own Ray instance."""
import pytest
import ray
from ray.cluster_utils import Cluster

from pipelines.drill import compare_results
from pipelines.line_cluster import LineCluster, start_ray, stop_ray
from tests.pipeline_helpers import (
    KillPlan,
    line_frames,
    pipeline_config,
    read_rows,
    write_folder,
)

LINES, FRAMES = ("l0", "l1"), 64


@pytest.fixture(scope="module")
def multinode():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    workers = [cluster.add_node(num_cpus=1, resources={"line_host": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    start_ray(cluster.address)
    yield cluster, workers
    stop_ray()
    cluster.shutdown()


def test_a_line_resumes_on_another_node_when_its_node_is_removed(multinode, tiny_config, tmp_path):
    cluster, workers = multinode
    for i, line in enumerate(LINES):
        write_folder(tmp_path / "src", line, line_frames(50 + i, FRAMES))

    def config(out):
        # two lines fit on one worker node: the displaced one has somewhere to go
        return pipeline_config(
            tiny_config,
            tmp_path / "src",
            tmp_path / out,
            snapshot={"every_frames": 4},
            gap_timeout_s=600.0,
            max_in_flight=2,
            line_resources={"line_host": 0.5},
        )

    reference = config("reference")
    job = LineCluster(reference)
    try:
        job.run(progress=False)
    finally:
        job.shutdown()

    faulty = config("faulty")
    job = LineCluster(faulty)
    worker_ids = {w.node_id for w in workers}
    moved = {}

    def remove_node_of(name):
        line = name.split(":", 1)[1]
        node_id = ray.get(job.line_actors[line].node_id.remote())
        assert node_id in worker_ids, "a line ran on a node without line_host"
        [node] = [w for w in workers if w.node_id == node_id]
        moved["from"] = node_id
        cluster.remove_node(node)

    try:
        plan = KillPlan(job, [("node-of:l0", "l0", 5)], min_snapshots=1, kill=remove_node_of)
        counts = job.run(progress=False, on_poll=plan).counts
        events = ray.get(job.supervisor.status.remote())["events"]
        moved["to"] = ray.get(job.line_actors["l0"].node_id.remote())
    finally:
        job.shutdown()
    assert counts == {line: FRAMES for line in LINES}
    assert len(plan.killed) == 1, events
    assert moved["to"] in worker_ids and moved["to"] != moved["from"], moved
    restarts = [int(e.rsplit(" ", 1)[1]) for e in events if e.startswith("line l0 restarted")]
    assert len(restarts) == 1 and 0 < restarts[0] <= plan.killed[0][1], events
    verdict = compare_results(reference.results_dir, faulty.results_dir)
    assert verdict["ok"], {k: v for k, v in verdict.items() if v}
    assert [(r["line_id"], r["seq"]) for r in read_rows(faulty.results_dir)] == [
        (line, seq) for line in LINES for seq in range(FRAMES)
    ]
