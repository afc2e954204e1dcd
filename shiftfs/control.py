"""``shiftfs status MNT`` and ``shiftfs upgrade MNT``: what an operator asks
a mount's supervisor (supervisor.py): who serves it and how often its
server was restarted; and the hand-over of the mount to the installed
version of shiftfs, with nothing unmounted."""

from __future__ import annotations

import os
import signal
import sys
import time

from .supervisor import read_status
from .tableargs import EXIT_USAGE


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"shiftfs: usage: shiftfs {argv[0] if argv else 'status'} MOUNTPOINT", file=sys.stderr)
        return EXIT_USAGE
    what, mountpoint = argv
    status = read_status(mountpoint)
    if status is None:
        print(f"shiftfs: {mountpoint}: no shiftfs supervisor serves it", file=sys.stderr)
        return 1
    if what == "status":
        print(f"{os.path.realpath(mountpoint)}: supervisor {status['supervisor']}, "
              f"server {status['server']}, restarts {status['restarts']}, "
              f"open files kept {status['open_files']}")
        return 0
    old = status["server"]
    os.kill(status["supervisor"], signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read_status(mountpoint)
        if now is not None and now["server"] not in (old, 0) and now["supervisor"] == status["supervisor"]:
            print(f"shiftfs: {mountpoint}: upgraded; server {old} -> {now['server']}")
            return 0
    print(f"shiftfs: {mountpoint}: upgrade not done within 30 s (see the log: an installed "
          f"version that cannot read the mount's state is refused)", file=sys.stderr)
    return 1
