"""The console script and ``python -m shiftfs``: ``shiftfs scan ...`` goes
to scan.py, ``shiftfs status|upgrade MNT`` to control.py, anything else to
cli.py (so cli, which scan builds on, never imports scan). ``--resume FD``
is how an upgrading supervisor re-executes itself (supervisor.py)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "scan":
        from .scan import main as scan_main
        return scan_main(argv[1:])
    if argv and argv[0] in ("status", "upgrade"):
        from .control import main as control_main
        return control_main(argv)
    if len(argv) == 2 and argv[0] == "--resume":
        from .mount import resume
        return resume(int(argv[1]))
    from .cli import main as cli_main
    return cli_main(argv)
