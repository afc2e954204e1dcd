#!/usr/bin/env python3
"""The cost of coherence to the rest of the host (issue 19), on a private
loop-mounted ext4 this script makes (no other writer or watcher on it):

- an unrelated writer (20,000 creates and removes in a directory beside
  the lower) with no mount present and with 8 idle shiftfs mounts of one
  lower (each with a walked tree cached): its time, rounds in alternating
  order, each run on a synced filesystem a minute after the last (ext4
  allocates around inodes freed recently), median, as a ratio;
- the daemon CPU (supervisor and server) each idle mount spends on that
  writer, against bindfs and fuse-overlayfs mounted the same way;
- fanotify marks a daemon holds after walking 20,000 files in 100
  directories, and after the kernel forgot them (drop_caches).

    python3 -m bench.coherence --rounds 3 [--out FILE]     # from the repository root

Prints a markdown table (and appends it to FILE).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from shiftfs.mount import mount
from shiftfs.supervisor import read_status

from tests.daemon import running
from tests.procs import cpu_seconds, family, fanotify_marks as marks
from tests.tables import BASE, STD, text

FILES, DIRS = 20000, 100


def cpu(pids) -> float:
    return cpu_seconds(*pids)


def writer(where: str) -> float:
    """20,000 creates and removes in ``where``; seconds."""
    t = time.monotonic()
    for i in range(FILES):
        p = os.path.join(where, f"w{i}")
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
        os.unlink(p)
    return time.monotonic() - t


def walk(top: str) -> None:
    subprocess.run(["find", top, "-ls"], stdout=subprocess.DEVNULL, check=True)


@contextlib.contextmanager
def peer(kind: str, lower: str, mnt: str):
    """bindfs or fuse-overlayfs mounted over ``lower`` at ``mnt``, with the
    standard table; its pid. Always unmounted and reaped (tests/daemon.py)."""
    os.makedirs(mnt, exist_ok=True)
    if kind == "bindfs":
        cmd = ["bindfs", "-f", f"--uid-offset={BASE}", f"--gid-offset={BASE}", "-o", "allow_other",
               lower, mnt]
    else:
        up = tempfile.mkdtemp(dir=os.path.dirname(mnt))
        wk = tempfile.mkdtemp(dir=os.path.dirname(mnt))
        cmd = ["fuse-overlayfs", "-f", "-o", f"lowerdir={lower},upperdir={up},workdir={wk},"
               f"uidmapping={text(STD)},gidmapping={text(STD)},allow_other", mnt]
    with running(cmd, mnt, what=kind) as proc:
        yield proc.pid


# ext4 skips inode numbers freed in the last 60 s (300 s while their inode
# table block is dirty) when it allocates: a writer run soon after another
# pays for the other's 20,000 removals. Each run starts on a synced
# filesystem at least this long after the previous one ended.
QUIET_S = 61.0


class Writer:
    """The unrelated writer, run so that no run inherits another's cost."""

    def __init__(self, where: str) -> None:
        self.where, self.ended = where, 0.0

    def ready(self) -> None:
        os.sync()
        time.sleep(max(0.0, QUIET_S - (time.monotonic() - self.ended)))

    def run(self) -> float:
        """Ready (``ready``, if not called already), then timed."""
        self.ready()
        took = writer(self.where)
        self.ended = time.monotonic()
        return took


def idle(pids, quiet=1.0, timeout=60.0) -> float:
    """Wait until the daemons of ``pids`` spend no CPU for ``quiet`` s: an
    idle mount (after a walk past 60 % of its fd limit its shrinker works
    for a while); the seconds waited."""
    t0 = time.monotonic()
    last = cpu(x for p in pids for x in family(p))
    while time.monotonic() - t0 < timeout:
        time.sleep(quiet)
        now = cpu(x for p in pids for x in family(p))
        if now == last:
            break
        last = now
    return time.monotonic() - t0


def shiftfs_rounds(base: str, lower: str, beside: str, rounds: int) -> dict:
    """Rounds in alternating order (none, then 8 mounts; then 8 mounts,
    then none): the writer with no mount, and with 8 idle shiftfs mounts of
    ``lower`` (each walked); its times, the most CPU one mount's daemon
    spent meanwhile, and the marks the first mount holds after its walk and
    after drop_caches."""
    alone, with8, spent, waited = [], [], [], []
    held = after = 0
    w = Writer(beside)
    for r in range(rounds):
        if r % 2 == 0:
            alone.append(w.run())
        with contextlib.ExitStack() as stack:
            mps = []
            for k in range(8):
                mp = os.path.join(base, f"m{k}")
                os.makedirs(mp, exist_ok=True)
                mps.append(stack.enter_context(mount(lower, mp, uidmap=STD)))
            for mp in mps:
                walk(mp)
            pids = [read_status(mp)["supervisor"] for mp in mps]
            held = marks(read_status(mps[0])["server"])
            w.ready()
            waited.append(idle(pids))
            c0 = [cpu(family(p)) for p in pids]
            with8.append(w.run())
            spent.append(max(cpu(family(p)) - c for p, c in zip(pids, c0)))
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
            time.sleep(1.0)
            after = marks(read_status(mps[0])["server"])
        if r % 2 == 1:
            alone.append(w.run())
    return dict(alone=alone, with8=with8, spent=spent, held=held, after=after, waited=waited)


def peer_cpu(base: str, lower: str, beside: str) -> dict:
    """The CPU bindfs and fuse-overlayfs, mounted and walked the same way,
    spend on the writer."""
    peers = {}
    for kind in ("bindfs", "fuse-overlayfs"):
        mp = os.path.join(base, f"p-{kind}")
        with peer(kind, lower, mp) as pid:
            walk(mp)
            c0 = cpu(family(pid))
            writer(beside)
            peers[kind] = cpu(family(pid)) - c0
    return peers


def rows(s: dict, peers: dict) -> list[str]:
    with8, alone = statistics.median(s["with8"]), statistics.median(s["alone"])
    return [
        f"| unrelated writer (20,000 creates + removes beside the lower): 8 idle shiftfs "
        f"mounts ÷ none | {with8 / alone:.2f} ({with8:.2f} s ÷ {alone:.2f} s) | ≤ 1.05 |",
        f"| daemon CPU per idle mount under that writer: shiftfs / bindfs / fuse-overlayfs "
        f"| {max(s['spent']):.2f} s / {peers['bindfs']:.2f} s / {peers['fuse-overlayfs']:.2f} s "
        f"| ≤ 0.05 s |",
        f"| fanotify marks after walking {FILES:,} files in {DIRS} directories / after "
        f"drop_caches | {s['held']} / {s['after']} | |",
        f"| wait after the walks until the 8 daemons were idle (RLIMIT_NOFILE "
        f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]}) | "
        f"{' / '.join(f'{x:.1f} s' for x in s['waited'])} | |",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="shiftfs-coherence-", dir="/tmp")
    img, fs = os.path.join(base, "img"), os.path.join(base, "fs")
    os.mkdir(fs)
    subprocess.run(["truncate", "-s", "2G", img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
    subprocess.run(["mount", "-o", "loop", img, fs], check=True)
    table_rows = []
    try:
        lower, beside = os.path.join(fs, "lower"), os.path.join(fs, "beside")
        os.makedirs(beside)
        for d in range(DIRS):
            os.makedirs(os.path.join(lower, f"d{d}"))
            for i in range(FILES // DIRS):
                open(os.path.join(lower, f"d{d}", f"f{i}"), "w").close()
        table_rows = rows(shiftfs_rounds(base, lower, beside, args.rounds),
                          peer_cpu(base, lower, beside))
    finally:
        subprocess.run(["umount", "-l", fs], capture_output=True)
        subprocess.run(["rm", "-rf", base])
    table = "\n".join(["| measure | result | goal |", "|---|---|---|", *table_rows])
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## Coherence's cost to the host (issue 19), {time.strftime('%Y-%m-%d')}\n\n"
                    f"`python3 -m bench.coherence --rounds {args.rounds}` on a private loop-mounted "
                    f"ext4:\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
