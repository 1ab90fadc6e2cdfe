"""Embedded mode's WAL checkpoints, on a thread of their own.

By default SQLite checkpoints a WAL database in the commit that takes the log past 1,000
pages: that commit copies the log into the database file and waits for the disk. Embedded
mode commits on the event loop's thread, so the whole process stood still meanwhile:
in one benchmark run here (~4,000 turns), 117 commits took over 4 ms, most 5-60 ms and
two over 500 ms, which became the p99 of every request in flight. The inline connection
therefore never checkpoints (`wal_autocheckpoint=0`, see inline_session.py) and this
thread runs a PASSIVE checkpoint, which neither waits for nor blocks the writer, every
`interval` seconds on a connection of its own; the driver lets go of the GIL while SQLite
works. In the same run after the change, 4 commits took over 4 ms.

PASSIVE alone let the log grow without end under steady load: SQLite starts the log file
over only when a write begins while every frame of it is already in the database file,
and with turns committing all the time some frames always arrived after the last PASSIVE.
Measured here: 345 MB of log after ~4,000 turns (about 34 pages per turn). So once the log
holds `restart_frames` pages after a PASSIVE, the thread also runs a RESTART checkpoint,
which copies what came since (a few pages), syncs and lets the next write start the file
over. RESTART cannot run beside a writer, so the thread first takes the inline sessions'
lock on the event loop: transactions wait their turn on the loop (~1 ms, measured 0.7-1.4
ms for a RESTART after a PASSIVE here) instead of the loop sleeping in SQLite's busy
handler. The file keeps its size and is written over from the start, which is cheaper for
the filesystem than allocating new blocks; `journal_size_limit` (inline_session.py) trims
it after a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterator

from agent_orchestrator.observability.logging import get_logger

log = get_logger(__name__)

#: Seconds between checkpoints: the log holds about this much of the writes between them.
INTERVAL = 1.0
#: Pages in the log after a PASSIVE checkpoint from which the log is started over (SQLite's
#: own auto-checkpoint size).
RESTART_FRAMES = 1000
#: Longest wait for the inline sessions' lock before a RESTART is left to the next round.
LOCK_WAIT = 1.0
#: Longest wait of a RESTART for other connections' readers (the health check, a backup):
#: the inline sessions wait meanwhile, so it gives up soon and tries again next round.
READERS_WAIT = 0.1
#: Bytes the log file is cut back to when it starts over after a burst made it larger.
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024


class WalCheckpointer:
    def __init__(
        self, path: str, interval: float = INTERVAL, *, restart_frames: int = RESTART_FRAMES
    ) -> None:
        self.path = path
        self.interval = interval
        self.restart_frames = restart_frames
        self.restarts = 0  # RESTART checkpoints that completed (tests, diagnostics)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writers: asyncio.Lock | None = None

    def start(
        self, loop: asyncio.AbstractEventLoop | None = None, writers: asyncio.Lock | None = None
    ) -> None:
        """`writers`, a lock of `loop` that every write transaction holds, is taken for a
        RESTART; without one the RESTART relies on SQLite's busy handler alone."""
        self._loop, self._writers = loop, writers
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="sqlite-wal-checkpoints", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + LOCK_WAIT + 5)
            self._thread = None

    def _run(self) -> None:
        connection = sqlite3.connect(self.path, timeout=READERS_WAIT)
        try:
            while not self._stop.wait(self.interval):
                try:
                    self._checkpoint(connection)
                except sqlite3.Error as error:
                    # The next round tries again; the log only grows meanwhile.
                    log.warning("WAL checkpoint failed", error=str(error))
        finally:
            connection.close()

    def _checkpoint(self, connection: sqlite3.Connection) -> None:
        busy, frames, _ = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if busy or frames < self.restart_frames:
            return
        with self._writers_paused() as paused:
            if not paused:
                return
            busy, _, _ = connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        if busy:
            log.debug("WAL restart waited out by a reader; next round tries again")
        else:
            self.restarts += 1

    @contextlib.contextmanager
    def _writers_paused(self) -> Iterator[bool]:
        """Holds the writers' lock on the event loop for the duration of the block;
        yields False when it could not be had within LOCK_WAIT (or the loop is gone)."""
        loop, writers = self._loop, self._writers
        if loop is None or writers is None:
            yield True
            return
        holding = threading.Event()

        async def hold() -> None:
            async with writers:
                holding.set()
                await loop.create_future()  # until cancelled, which releases the lock

        try:
            held = asyncio.run_coroutine_threadsafe(hold(), loop)
        except RuntimeError:  # the loop is closed: nobody is writing
            yield True
            return
        try:
            yield holding.wait(LOCK_WAIT)
        finally:
            # Cancelling releases the lock, or stops the wait for it.
            with contextlib.suppress(RuntimeError):
                held.cancel()
