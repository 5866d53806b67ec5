"""Which feed of an ingestion actor is current, and the rewinds and drops asked of it.

The supervisor numbers the feeds it starts (1, 2, ...) and names in each rewind the feed it is
meant for. Calls to a threaded actor may start in any order, and the supervisor may start a new
feed before the one it replaces has begun (the actor was restarting, a rewind went unanswered).
So a feed older than the newest one begun returns at once, and a rewind waits for its own feed:
taken by an older feed about to end, it would be lost, and its line would wait for frames that
the new feed, started from positions read before the rewind, never sends."""
from __future__ import annotations

import threading
from typing import Optional


class FeedControl:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.newest = 0  # the number of the newest feed begun (0: none yet)
        self.newest_ended = False
        self.rewinds: dict[int, dict[str, int]] = {}  # feed number -> line -> seq to feed it from
        self.drops: set[str] = set()  # lines to stop feeding once their frames in flight are scored
        self.dropped: dict[str, tuple[int, int]] = {}  # line -> (feed, the seq it was fed up to)

    def begin(self, feed: int) -> bool:
        """Feed `feed` starts; False if a newer one has begun (it is replaced before it began)."""
        with self.lock:
            if feed < self.newest:
                return False
            self.newest, self.newest_ended = feed, False
            self.rewinds = {n: asked for n, asked in self.rewinds.items() if n >= feed}
            return True

    def is_current(self, feed: int) -> bool:
        return feed == self.newest

    @property
    def running(self) -> bool:
        return self.newest > 0 and not self.newest_ended

    def rewind(self, line: str, seq: int, feed: int) -> bool:
        """Feed `line` from `seq` in feed `feed` (begun, or not begun yet); False when that feed
        has ended or was replaced: the caller starts a new feed instead."""
        with self.lock:
            if feed < self.newest or (feed == self.newest and self.newest_ended):
                return False
            self.rewinds.setdefault(feed, {})[line] = seq
            return True

    def take(self, feed: int) -> tuple[dict[str, int], set[str]]:
        """The rewinds asked of `feed` since it last looked (a line fed again is no longer
        dropped), and the lines to drop."""
        with self.lock:
            if feed != self.newest:
                return {}, set()
            rewinds = self.rewinds.pop(feed, {})
            for line in rewinds:
                self.drops.discard(line)
                self.dropped.pop(line, None)
            return rewinds, set(self.drops)

    def end_unless_asked(self, feed: int) -> bool:
        """A feed of a finite source with nothing left ends, unless a rewind came for it."""
        with self.lock:
            if self.rewinds.get(feed):
                return False
            self.newest_ended = self.newest_ended or feed == self.newest
            return True

    def end(self, feed: int) -> dict[str, int]:
        """The feed stops (stopped, or replaced): later rewinds of it are refused, and those it
        accepted but did not take are returned (where their lines stand now)."""
        with self.lock:
            self.newest_ended = self.newest_ended or feed == self.newest
            return self.rewinds.pop(feed, {}) if feed == self.newest else {}

    def drop(self, line: str, feed: int) -> Optional[int]:
        """Ask the running feed to drop `line`; the seq it was fed up to once feed `feed` (the
        newest the caller started) let it go: an older feed's answer would be void once `feed`
        begins, fed from positions that still hold the line."""
        with self.lock:
            done = self.dropped.get(line)
            if done is not None and done[0] == feed == self.newest:
                return done[1]
            if self.running:
                self.drops.add(line)
            return None

    def let_go(self, line: str, feed: int, next_seq: int) -> None:
        with self.lock:
            self.drops.discard(line)
            self.dropped[line] = (feed, next_seq)
