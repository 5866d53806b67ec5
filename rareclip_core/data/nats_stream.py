"""NATS JetStream: frames in (a line's subject is its ordered source), verdicts out.

A camera publishes each frame's encoded bytes to `<frames prefix>.<line_id>`; a frame's seq is
its position among its line's messages as ingestion first saw them (0-based), recorded with the
message's stream seq in the line's ledger (`FrameLedger`, `<out>/ledger/<line>/`) before the
frame is fed. New messages are those past the newest recorded one (read with a headers-only
consumer, so no image travels for it): a stream only appends, so a seq never depends on a later
listing, and a restart reads the ledger's newest file, not the line's history. Frames are read
with ephemeral consumers that start at a recorded stream seq and acknowledge nothing, so any seq
can be read again after a crash or by a later `replay` while the stream keeps its message.
The stream may drop a line's old messages (`max_age`, `max_msgs`) once the line's snapshots are
past them: their seqs stay in the ledger, and asking for one that is gone says so.

The client (nats-py, asyncio) lives here only, imported when a NATS source or verdict stream
is used, on an event-loop thread of its own so that threaded callers (the ingest actor, the
writer) call it synchronously.
"""
from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .sources import FrameLedger, FrameRef

log = logging.getLogger(__name__)

FRAME_URI_HEADER = "Frame-Uri"  # optional: what the uri column shows for the frame
MSG_ID_HEADER = "Nats-Msg-Id"  # JetStream drops a second message with the same id (its duplicate window)
START_HINT = "start one with `python run_cluster.py nats-server` (or `nats-server -js -sd DIR`)"


class NatsError(ConnectionError):
    """The NATS server cannot be used; the message names the url and the fix."""


@dataclass(frozen=True)
class StreamSettings:
    """Where a line's messages are: `<subject_prefix>.<line_id>` in JetStream stream `stream`."""

    url: str
    stream: str
    subject_prefix: str
    duplicate_window_s: Optional[float] = None  # a new stream's message-id deduplication window (server default 2 min)

    def subject(self, line_id: str) -> str:
        return f"{self.subject_prefix}.{line_id}"


class NatsLink:
    """One connection to a NATS server on its own event-loop thread; `call` runs a coroutine
    there and waits for it. The client reconnects on its own when the server comes back."""

    def __init__(self, url: str, connect_timeout_s: float = 3.0, request_timeout_s: float = 5.0):
        import nats  # optional dependency: pip install -e ".[nats]"

        self.url = url
        self.request_timeout_s = request_timeout_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nats-link", daemon=True)
        self.thread.start()

        async def quiet(err):  # the client retries by itself; reading and publishing report failures
            log.debug("nats %s: %s", url, err)

        async def connect():
            return await asyncio.wait_for(
                nats.connect(url, connect_timeout=connect_timeout_s, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                             error_cb=quiet),
                connect_timeout_s,
            )

        try:
            self.nc = self.call(connect(), connect_timeout_s + 1)
        except Exception as err:  # noqa: BLE001 - any failure to connect means the same to the user
            self.close()
            raise NatsError(f"cannot reach the NATS server at {url} ({type(err).__name__}): {START_HINT}, "
                            "or fix the url") from None
        self.js = self.nc.jetstream(timeout=request_timeout_s)

    def call(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout or self.request_timeout_s * 4)

    def retry(self, make_coro, what: str, within_s: float):
        """`make_coro()` again until it succeeds or `within_s` has passed (the server restarting)."""
        import nats.errors
        import nats.js.errors

        deadline = time.monotonic() + within_s
        while True:
            try:
                return self.call(make_coro())
            except (nats.errors.Error, asyncio.TimeoutError, TimeoutError, OSError) as err:
                if isinstance(err, nats.js.errors.NotFoundError):
                    raise NatsError(f"{what} at {self.url}: not found ({err})") from None
                if time.monotonic() >= deadline:
                    raise NatsError(f"{what} at {self.url} failed for {within_s:.0f}s ({type(err).__name__}: {err}); "
                                    f"is the server up? {START_HINT}") from None
                log.info("%s: %s; retrying", what, type(err).__name__)
                time.sleep(0.25)

    def ensure_stream(self, settings: StreamSettings) -> None:
        """Create the stream (file storage, keeping every message) if it is missing."""
        import nats.js.errors
        from nats.js.api import StorageType, StreamConfig

        async def info_or_create():
            try:
                return await self.js.stream_info(settings.stream)
            except nats.js.errors.NotFoundError:
                return await self.js.add_stream(StreamConfig(
                    name=settings.stream, subjects=[f"{settings.subject_prefix}.>"], storage=StorageType.FILE,
                    duplicate_window=settings.duplicate_window_s,
                ))

        try:
            self.retry(info_or_create, f"stream {settings.stream}", self.request_timeout_s)
        except NatsError as err:
            if "ServiceUnavailable" in str(err) or "503" in str(err):
                raise NatsError(f"the NATS server at {self.url} has no JetStream: start it with `-js` ({START_HINT})") from None
            raise

    def subscribe(self, subject: str, on_message) -> None:
        """Call `on_message(data)` (on the link's thread) for each message published to `subject`
        from now on (a plain subscription: what a reject gate listening live would do)."""

        async def handler(msg):
            on_message(msg.data)

        self.call(self.nc.subscribe(subject, cb=handler))

    def close(self) -> None:
        """Close the connection, end the tasks the client left (a link to a server that is gone
        keeps its subscriptions' tasks), then the loop and its thread."""
        nc = getattr(self, "nc", None)
        if nc is not None and not nc.is_closed:
            try:
                self.call(nc.close(), 5)
            except Exception:  # noqa: BLE001 - closing a link to a server that is gone
                pass

        async def end_tasks():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call(end_tasks(), 5)
        except Exception:  # noqa: BLE001 - a task that will not end is left to the loop's end
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class NatsFrameSource:
    """The frames of `lines`, each line one subject of the stream (see the module docstring);
    without `lines`, every line with a message in the stream, looked up again at each `lines()`
    call (a camera that starts publishing adds its line). `live`: new messages are seen as they
    arrive; otherwise the source is the messages present when it is opened (a `replay` of a
    finite range). Each line's seqs are kept in a `FrameLedger` under `ledger_dir` (a job's
    `<out>/ledger`); without one, in a temporary folder removed by `close` (a source read once)."""

    def __init__(
        self, settings: StreamSettings, lines: Optional[list[str]], live: bool = False, reconnect_s: float = 60.0,
        ledger_dir: Optional[str] = None,
    ):
        self.settings = settings
        self._lines = list(lines) if lines else None
        self.live = live
        self.reconnect_s = reconnect_s
        self._scratch = None if ledger_dir else tempfile.TemporaryDirectory(prefix="nats-ledger-")
        self._ledger_root = Path(ledger_dir or self._scratch.name)
        # only the newest ledger file of a line in memory: a new frame is one past the newest recorded
        self.ledgers: dict[str, FrameLedger] = {}
        self._indexed: set[str] = set()  # lines whose new messages were looked for since opening
        self._lock = threading.Lock()  # the ingest actor reads from two threads (feeding, totals)
        self.link: Optional[NatsLink] = None
        try:
            self.link = NatsLink(settings.url)
            self.link.ensure_stream(settings)
            self.opened_at = self._last_stream_seq()  # a finite source ends with this message
            # at the start, the server is waited for (an ingestion actor restarting in an outage)
            lines = self._lines or self._line_ids(self.link.retry(self._subjects, self._listing, self.reconnect_s))
            if not lines:
                raise ValueError(
                    f"stream {settings.stream} has no message under {settings.subject_prefix}.> yet, so there is no "
                    "line to read: start the job once a camera has published, or name the lines in the source's `lines`"
                )
            for line in lines:
                ledger = self._ledger(line)
                if len(ledger) and self._newest_stream_seq(line) > self.opened_at:
                    raise NatsError(
                        f"stream {settings.stream} ends at message {self.opened_at}, but line {line}'s frame "
                        f"{len(ledger) - 1} was message {self._newest_stream_seq(line)} ({ledger.folder}): the stream "
                        "was deleted or purged since, and the line's seqs cannot go on in it; use a new `out` folder"
                    )
        except BaseException:
            self.close()
            raise

    def lines(self) -> list[str]:
        """The given lines, else those with a message in the stream now (by subject, in name
        order): asked once, so NatsError at once while the server cannot be reached (a job that
        looks for new lines looks again later)."""
        if self._lines:
            return list(self._lines)
        if not self.link.nc.is_connected:
            raise NatsError(f"{self._listing} at {self.settings.url}: not connected (the client is reconnecting)")
        try:
            return self._line_ids(self.link.call(self._subjects()))
        except Exception as err:  # noqa: BLE001 - the client's errors, timeouts, a lost connection: all say the same
            raise NatsError(f"{self._listing} at {self.settings.url} failed ({type(err).__name__}: {err})") from None

    @property
    def _listing(self) -> str:
        return f"listing the subjects of stream {self.settings.stream}"

    async def _subjects(self) -> dict[str, int]:
        """The stream's subjects under the prefix with a message, and how many each has."""
        info = await self.link.js.stream_info(self.settings.stream, subjects_filter=f"{self.settings.subject_prefix}.>")
        return info.state.subjects or {}

    def _line_ids(self, subjects: dict[str, int]) -> list[str]:
        return sorted(subject[len(self.settings.subject_prefix) + 1:] for subject in subjects)

    def line_address(self, line_id: str) -> str:
        """Where the line's frames come from, in words."""
        return f"subject {self.settings.subject(line_id)} of stream {self.settings.stream}"

    def notices(self) -> list[str]:
        """Nothing to tell the job: a stream leaves no frame out (see `Source.notices`)."""
        return []

    def frame_count(self, line_id: str) -> int:
        """How many frames the line has now (a finite source: all it has)."""
        self._extend_index(line_id)
        return len(self._ledger(line_id))

    def forget(self, line_id: str) -> None:
        """Drop the line's ledger from memory: it is read from disk (and the stream looked at)
        again when next used (another ingestion actor may have recorded messages in it since)."""
        with self._lock:
            self.ledgers.pop(line_id, None)
            self._indexed.discard(line_id)

    def frames(self, line_id: str, start_seq: int = 0) -> Iterator[FrameRef]:
        """The line's frames known now from `start_seq` on, read a few at a time, bytes included."""
        self._extend_index(line_id)
        with self._lock:
            known = [stream_seq_of(uri) for uri in self._ledger(line_id).uris_from(start_seq)]  # seq - start_seq -> stream seq
        done = 0
        while done < len(known):
            seq = start_seq + done
            batch = self._read(line_id, known[done], min(16, len(known) - done), headers_only=False)
            for msg in batch:
                stream_seq = msg.metadata.sequence.stream
                if stream_seq != known[done]:
                    raise NatsError(f"line {line_id}: frame {seq} was stream message {known[done]}, now {stream_seq} is "
                                    f"there: the stream {self.settings.stream} dropped frames (max_age, max_msgs?); "
                                    "keep a line's frames in the stream until its snapshots are past them")
                uri = (msg.headers or {}).get(FRAME_URI_HEADER) or self._uri(stream_seq)
                yield FrameRef(line_id, seq, uri, bytes(msg.data))
                done += 1
                seq += 1
            if not batch:
                raise NatsError(f"line {line_id}: frame {seq} (stream message {known[done]}) is gone from stream "
                                f"{self.settings.stream}; keep a line's frames in the stream until its snapshots are past them")

    def _uri(self, stream_seq: int) -> str:
        return f"nats://{self.settings.stream}/{stream_seq}"

    def _ledger(self, line_id: str) -> FrameLedger:
        if line_id not in self.ledgers:
            self.ledgers[line_id] = FrameLedger(self._ledger_root / line_id, line_id, remember_s=0.0)
        return self.ledgers[line_id]

    def _newest_stream_seq(self, line_id: str) -> int:
        ledger = self._ledger(line_id)
        return stream_seq_of(ledger.uris_from(len(ledger) - 1)[0]) if len(ledger) else 0

    def _extend_index(self, line_id: str) -> None:
        """Record the line's messages past its newest recorded one (a finite source: once, up to
        the message it was opened at), read headers-only."""
        with self._lock:
            if not self.live and line_id in self._indexed:
                return
            new = [m.metadata.sequence.stream
                   for m in self._read(line_id, self._newest_stream_seq(line_id) + 1, None, headers_only=True)]
            if not self.live:
                new = [stream_seq for stream_seq in new if stream_seq <= self.opened_at]
            self._ledger(line_id).extend([self._uri(stream_seq) for stream_seq in new])
            self._indexed.add(line_id)

    def _last_stream_seq(self) -> int:
        async def info():
            return await self.link.js.stream_info(self.settings.stream)

        return self.link.retry(info, f"reading stream {self.settings.stream}", self.reconnect_s).state.last_seq

    def _read(self, line_id: str, start_stream_seq: int, limit: Optional[int], headers_only: bool) -> list:
        """Up to `limit` (default: all) of the line's messages from `start_stream_seq` on, through an
        ephemeral consumer that acknowledges nothing; retried while the server is restarting."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        js, subject = self.link.js, self.settings.subject(line_id)

        async def read():
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_stream_seq, ack_policy=AckPolicy.NONE,
                headers_only=headers_only, inactive_threshold=30.0, mem_storage=True,
            )
            sub = await js.pull_subscribe(subject, stream=self.settings.stream, config=config)
            try:
                pending = (await sub.consumer_info()).num_pending
                wanted = pending if limit is None else min(limit, pending)
                messages = []
                while len(messages) < wanted:
                    messages += await sub.fetch(min(256, wanted - len(messages)), timeout=self.link.request_timeout_s)
                return messages
            finally:
                await sub.unsubscribe()
                await js.delete_consumer(self.settings.stream, config.name)

        return self.link.retry(read, f"reading {subject} from stream {self.settings.stream}", self.reconnect_s)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        if self._scratch is not None:
            self._scratch.cleanup()


def stream_seq_of(uri: str) -> int:
    """The stream seq a ledger's `nats://<stream>/<stream seq>` names."""
    return int(uri.rsplit("/", 1)[1])


VERDICT_FIELDS = ("line_id", "seq", "uri", "score", "is_anomaly", "threshold", "status", "error", "scored_time", "model_id")


def verdict_message(row: dict) -> bytes:
    """A result row as the JSON verdict published for it (`scored_time` in ISO 8601, UTC)."""
    verdict = {name: row.get(name) for name in VERDICT_FIELDS}
    if verdict["scored_time"] is not None:
        verdict["scored_time"] = verdict["scored_time"].isoformat()
    return json.dumps(verdict).encode()


class VerdictPublisher:
    """Publishes each row's verdict to `<subject_prefix>.<line_id>`, once per (line, seq) across
    restarts: a line's verdicts go out in seq order, and a row at or before the last verdict
    already in the stream for its line is not published again; a publish retried after a lost
    acknowledgement is dropped by JetStream (message id `<line>:<seq>`, within the stream's
    duplicate window)."""

    def __init__(self, settings: StreamSettings, reconnect_s: float = 30.0):
        self.settings = settings
        self.reconnect_s = reconnect_s
        self.link = NatsLink(settings.url)
        self.link.ensure_stream(settings)
        self.last_published: dict[str, int] = {}

    @property
    def connected(self) -> bool:
        return self.link.nc.is_connected

    def publish(self, rows: list[dict]) -> None:
        """Publish the rows' verdicts (in order) and wait for the stream to store them; raises
        NatsError when it cannot within `reconnect_s` (the caller keeps the rows and tries again)."""
        rows = [r for r in rows if r["seq"] > self._last_published(r["line_id"])]
        if not rows:
            return

        async def send():  # one after another: a line's verdicts are stored in seq order
            for r in rows:
                await self.link.js.publish(
                    self.settings.subject(r["line_id"]), verdict_message(r), stream=self.settings.stream,
                    headers={MSG_ID_HEADER: f"{r['line_id']}:{r['seq']}"},
                )

        self.link.retry(send, f"publishing verdicts to stream {self.settings.stream}", self.reconnect_s)
        for row in rows:
            self.last_published[row["line_id"]] = row["seq"]

    def _last_published(self, line_id: str) -> int:
        if line_id not in self.last_published:
            import nats.js.errors

            async def last():
                try:
                    msg = await self.link.js.get_last_msg(self.settings.stream, self.settings.subject(line_id))
                except nats.js.errors.NotFoundError:
                    return -1
                return json.loads(msg.data)["seq"]

            self.last_published[line_id] = self.link.retry(last, f"reading the last verdict of {line_id}", self.reconnect_s)
        return self.last_published[line_id]

    def close(self) -> None:
        self.link.close()


def publish_frame(link: NatsLink, settings: StreamSettings, line_id: str, data: bytes, uri: Optional[str] = None,
                  msg_id: Optional[str] = None, within_s: float = 60.0) -> int:
    """Publish one frame's encoded bytes to its line (what a camera does); returns its stream seq.
    `msg_id` (unique per frame) makes a publish retried after a lost acknowledgement (the server
    restarting; retried for `within_s`) store the frame once. A frame over the server's max payload raises NatsError
    naming the setting to raise."""
    if len(data) > link.nc.max_payload:
        raise NatsError(f"frame {uri or 'to ' + settings.subject(line_id)} is {len(data)} bytes, over the NATS server's max_payload of "
                        f"{link.nc.max_payload} bytes: raise `max_payload` in the server's config file "
                        "(e.g. `max_payload: 8MB`, at most 64MB; `nats-server -c FILE`), or send smaller frames")
    headers = {FRAME_URI_HEADER: uri} if uri else {}
    if msg_id:
        headers[MSG_ID_HEADER] = msg_id
    ack = link.retry(lambda: link.js.publish(settings.subject(line_id), data, stream=settings.stream, headers=dict(headers)),
                     f"publishing to {settings.subject(line_id)}", within_s)
    return ack.seq
