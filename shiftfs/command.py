"""The console script and ``python -m shiftfs``: ``shiftfs scan ...`` goes
to scan.py, ``shiftfs status|upgrade MNT`` to control.py, anything else to
cli.py (so cli, which scan builds on, never imports scan). ``--resume FD``
is how an upgrading supervisor re-executes itself (supervisor.py)."""

from __future__ import annotations

import sys

from . import cli, control, daemon, scan


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "scan":
        return scan.main(argv[1:])
    if argv and argv[0] in ("status", "upgrade"):
        return control.main(argv)
    if len(argv) == 2 and argv[0] == "--resume":
        return daemon.resume(int(argv[1]))
    return cli.main(argv)
