#!/usr/bin/env python3
"""How long a mount is without a server: SIGKILL of the server, then the
time until a request that must reach the daemon (the lookup of a name
never looked up before) is answered, measured from the kill. Repeated
``--rounds`` times on one mount; prints the median and the worst, as a
markdown row for bench/results.md.

    python3 -m bench.restart --rounds 20     # from the repository root
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from shiftfs.mount import mount
from shiftfs.supervisor import read_status

from tests.tables import STD


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="shiftfs-restart-", dir="/tmp")
    os.chmod(base, 0o755)
    lower, mnt = os.path.join(base, "lower"), os.path.join(base, "mnt")
    os.mkdir(lower)
    os.mkdir(mnt)
    for i in range(args.rounds):
        open(os.path.join(lower, f"n{i}"), "w").close()
    gaps = []
    try:
        with mount(lower, mnt, uidmap=STD):
            os.listdir(mnt)
            for i in range(args.rounds):
                server = read_status(mnt)["server"]
                t0 = time.monotonic()
                os.kill(server, signal.SIGKILL)
                os.stat(os.path.join(mnt, f"n{i}"))  # a LOOKUP: waits for the next server
                gaps.append(time.monotonic() - t0)
                while read_status(mnt)["server"] == server:
                    time.sleep(0.01)
                time.sleep(0.2)
    finally:
        subprocess.run(["rm", "-rf", base])
    ms = [g * 1000 for g in gaps]
    print(f"| kill of the server -> next request answered ({args.rounds} kills) | "
          f"median {statistics.median(ms):.0f} ms | worst {max(ms):.0f} ms | goal ≤ 500 ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
