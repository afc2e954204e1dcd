#!/usr/bin/env python3
"""The cost of coherence to the rest of the host (issue 19), on a private
loop-mounted ext4 this script makes (no other writer or watcher on it):

- an unrelated writer (20,000 creates and removes in a directory beside
  the lower) with no mount present and with 8 idle shiftfs mounts of one
  lower (each with a walked tree cached): its time, interleaved rounds,
  median, as a ratio;
- the daemon CPU (supervisor and server) each idle mount spends on that
  writer, against bindfs and fuse-overlayfs mounted the same way;
- fanotify marks a daemon holds after walking 20,000 files in 100
  directories, and after the kernel forgot them (drop_caches).

    python3 bench/coherence.py --rounds 3 [--out FILE]

Prints a markdown table (and appends it to FILE).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

from shiftfs.mount import mount
from shiftfs.supervisor import read_status

FILES, DIRS = 20000, 100


def family(pid: int) -> list[int]:
    out = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out += family(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def cpu(pids) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def marks(pid: int) -> int:
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[fanotify]":
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    total += sum(line.startswith("fanotify ino:") for line in f)
        except OSError:
            pass
    return total


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
    """bindfs or fuse-overlayfs mounted over ``lower`` at ``mnt``; its pid."""
    os.makedirs(mnt, exist_ok=True)
    if kind == "bindfs":
        cmd = ["bindfs", "-f", "--uid-offset=100000", "--gid-offset=100000", "-o", "allow_other",
               lower, mnt]
    else:
        up = tempfile.mkdtemp(dir=os.path.dirname(mnt))
        wk = tempfile.mkdtemp(dir=os.path.dirname(mnt))
        cmd = ["fuse-overlayfs", "-f", "-o", f"lowerdir={lower},upperdir={up},workdir={wk},"
               "uidmapping=0:100000:65536,gidmapping=0:100000:65536,allow_other", mnt]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if any(line.split()[4] == mnt for line in open("/proc/self/mountinfo")):
                break
            time.sleep(0.02)
        yield proc.pid
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        proc.wait(timeout=20)


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
    rows = []
    try:
        lower, beside = os.path.join(fs, "lower"), os.path.join(fs, "beside")
        os.makedirs(beside)
        for d in range(DIRS):
            os.makedirs(os.path.join(lower, f"d{d}"))
            for i in range(FILES // DIRS):
                open(os.path.join(lower, f"d{d}", f"f{i}"), "w").close()
        alone, with8, spent = [], [], []
        held = after = 0
        for _ in range(args.rounds):  # interleaved: none, then 8 idle mounts
            alone.append(writer(beside))
            with contextlib.ExitStack() as stack:
                mps = []
                for k in range(8):
                    mp = os.path.join(base, f"m{k}")
                    os.makedirs(mp, exist_ok=True)
                    mps.append(stack.enter_context(mount(lower, mp, uidmap="0:100000:65536")))
                for mp in mps:
                    walk(mp)
                pids = [read_status(mp)["supervisor"] for mp in mps]
                held = marks(read_status(mps[0])["server"])
                c0 = [cpu(family(p)) for p in pids]
                with8.append(writer(beside))
                spent.append(max(cpu(family(p)) - c for p, c in zip(pids, c0)))
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("2")
                time.sleep(1.0)
                after = marks(read_status(mps[0])["server"])
        peers = {}
        for kind in ("bindfs", "fuse-overlayfs"):
            mp = os.path.join(base, f"p-{kind}")
            with peer(kind, lower, mp) as pid:
                walk(mp)
                c0 = cpu(family(pid))
                writer(beside)
                peers[kind] = cpu(family(pid)) - c0
        ratio = statistics.median(with8) / statistics.median(alone)
        rows = [
            f"| unrelated writer (20,000 creates + removes beside the lower): 8 idle shiftfs "
            f"mounts ÷ none | {ratio:.2f} ({statistics.median(with8):.2f} s ÷ "
            f"{statistics.median(alone):.2f} s) | ≤ 1.05 |",
            f"| daemon CPU per idle mount under that writer: shiftfs / bindfs / fuse-overlayfs "
            f"| {max(spent):.2f} s / {peers['bindfs']:.2f} s / {peers['fuse-overlayfs']:.2f} s "
            f"| ≤ 0.05 s |",
            f"| fanotify marks after walking {FILES:,} files in {DIRS} directories / after "
            f"drop_caches | {held} / {after} | |",
        ]
    finally:
        subprocess.run(["umount", "-l", fs], capture_output=True)
        subprocess.run(["rm", "-rf", base])
    table = "\n".join(["| measure | result | goal |", "|---|---|---|", *rows])
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## Coherence's cost to the host (issue 19), {time.strftime('%Y-%m-%d')}\n\n"
                    f"`python3 bench/coherence.py --rounds {args.rounds}` on a private loop-mounted "
                    f"ext4:\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
