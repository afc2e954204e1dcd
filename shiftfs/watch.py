"""Invalidations the daemon sends to the kernel on its own.

The shrinker keeps the inode table (and so the daemon's fds) bounded: when
the table passes its high mark it asks the kernel to drop the oldest names
it holds (notify_inval_entry); the kernel then evicts those inodes that
nothing else holds (no open file, no cwd, no cached child) and FORGETs
them. A dropped name costs one LOOKUP the next time it is used.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("shiftfs")


class Shrinker:
    def __init__(self, table, session) -> None:
        self.table, self.session = table, session
        self.rounds = 0
        self.asked = 0
        self._after = 0
        self._thread = threading.Thread(target=self._run, name="shiftfs-shrinker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        table = self.table
        while True:
            table.shrink_wanted.wait()
            table.shrink_wanted.clear()
            try:
                self.shrink()
            except Exception:  # noqa: BLE001 (never take the mount down)
                log.exception("shrinking the inode table failed")

    def shrink(self) -> None:
        table = self.table
        excess = len(table) - table.low
        if excess <= 0:
            return
        self.rounds += 1
        # a cursor, so names the kernel cannot drop (busy) do not stop the
        # shrinker from reaching newer ones
        batch = table.oldest(excess, self._after)
        self._after = batch[-1][0] if len(batch) == excess else 0
        for _node_id, parent_id, name in batch:
            # ENOENT: the kernel no longer has that name; nothing to do
            self.session.inval_entry(parent_id, name)
            self.asked += 1
