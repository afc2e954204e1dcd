"""The console script and ``python -m shiftfs``: ``shiftfs scan ...`` goes
to scan.py, anything else to cli.py (so cli, which scan builds on, never
imports scan)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "scan":
        from .scan import main as scan_main
        return scan_main(argv[1:])
    from .cli import main as cli_main
    return cli_main(argv)
