#!/usr/bin/env python3
"""Reads the daemon serves itself: READ replies spliced from the lower fd
(shiftfs/splice.py) against pread + writev (SHIFTFS_SPLICE=off), both with
``-o passthrough=off``, beside native, bindfs and fuse-overlayfs, on a
private ext4 in a loop image; rounds interleaved across the mounts,
medians, as ratios. Wall time, and the daemon's CPU (user+system, its
whole family) per MiB read.

Workloads: ``dd bs=1M`` of a 512 MiB file cold (drop_caches first), and
with the lower cached (the mount's own page cache dropped with
POSIX_FADV_DONTNEED). ``--read-ahead KB`` sets the FUSE mounts'
read_ahead_kb (the largest buffered READ) for the run. ``--sizes`` adds
O_DIRECT reads of each size through the two shiftfs mounts (one READ per
read(2)), lower cached: where splicing starts to pay.

    python3 -m bench.splice --rounds 5 --sizes 4,16,64,256,1024
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time

from bench.common import drop_caches, log, sh
from bench.peers import bindfs, fuse_overlayfs, revision
from bench.tree import loop_fs
from bench.workloads import fadvise_dontneed
from tests.daemon import foreground_daemon
from tests.procs import family
from tests.tables import STD, args as table_args

MIB = 1 << 20
FILE = "big"
SHIFTFS = ("shiftfs", "shiftfs-pread")


def _shiftfs(lower: str, work: str, name: str, splice: str, read_ahead: int | None) -> dict:
    """A shiftfs mount made afresh for each measurement (``mount``), and
    unmounted after it: with two shiftfs mounts of one lower up at once,
    the one mounted second read a cached lower 1.5-2 x slower even with
    the same settings (cause not found), so only one is up at a time."""
    mnt = os.path.join(work, "mnt-" + name)
    os.makedirs(mnt, exist_ok=True)
    env = dict(os.environ, SHIFTFS_SPLICE=splice)

    @contextlib.contextmanager
    def mount():
        with foreground_daemon(lower, mnt, *table_args(STD), "-o", "passthrough=off", warn=log,
                               env=env) as proc:
            _read_ahead(mnt, read_ahead)
            yield proc.pid
    return dict(path=mnt, pid=None, mount=mount)


def _read_ahead(path: str, kb: int | None) -> str:
    st = os.stat(path)
    bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    if kb is not None:
        with open(bdi, "w") as f:
            f.write(str(kb))
    return open(bdi).read().strip()


def _dd(path: str, bs: str, count: int | None = None, direct: bool = False) -> float:
    cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", "status=none"]
    cmd += [f"count={count}"] if count else []
    cmd += ["iflag=direct"] if direct else []
    t = time.perf_counter()
    sh(cmd)
    return time.perf_counter() - t


def cpu_seconds(pid: int) -> float:
    """On-CPU time of ``pid``'s family, every thread (schedstat: ns, not
    /proc/PID/stat's 10 ms ticks)."""
    total = 0
    for p in family(pid):
        for t in os.listdir(f"/proc/{p}/task"):
            with contextlib.suppress(OSError):
                total += int(open(f"/proc/{p}/task/{t}/schedstat").read().split()[0])
    return total / 1e9


def _one(fs: dict, prep, run) -> tuple[float, float]:
    if "mount" in fs:
        with fs["mount"]() as pid:  # a fresh mount, unmounted after
            return _one({**{k: v for k, v in fs.items() if k != "mount"}, "pid": pid}, prep, run)
    prep(fs)
    cpu0 = cpu_seconds(fs["pid"]) if fs.get("pid") else 0.0
    wall = run(fs)
    cpu = (cpu_seconds(fs["pid"]) - cpu0) if fs.get("pid") else 0.0
    return wall, cpu


def _cold(fs):
    drop_caches()


def _lower_cached(lower_file):
    def prep(fs):
        sh(["cat", lower_file], stdout=subprocess.DEVNULL)
        fadvise_dontneed(os.path.join(fs["path"], FILE))
    return prep


def rounds(fss: dict, workloads, n: int) -> dict:
    """{workload: {fs: [(wall, cpu), ...]}}, the order of the mounts turned
    by one each round and reversed every other round: a mount read right
    after another was measured slower (a carry-over this VM shows, cause
    unknown: 1.5-8 x for the fifth mount, lower cached), and a rotation
    alone always puts the same mount after the same one."""
    out = {name: {fs: [] for fs in fss} for name, _p, _r, _w in workloads}
    names = list(fss)
    for r in range(n):
        order = names[r // 2 % len(names):] + names[:r // 2 % len(names)]
        if r % 2:
            order.reverse()
        for name, prep, run, which in workloads:
            for fs in order:
                if which is None or fs in which:
                    out[name][fs].append(_one(fss[fs], prep, run))
        log(f"round {r + 1}/{n} done")
    return out


def table(results: dict, mib: dict) -> str:
    fsn = [fs for fs in next(iter(results.values()))]
    lines = ["| workload | " + " | ".join(fsn) + " | shiftfs ÷ native | shiftfs ÷ shiftfs-pread"
             " (wall) | daemon CPU per MiB: " + ", ".join(f for f in fsn if f != "native")
             + " | CPU shiftfs ÷ shiftfs-pread | CPU shiftfs ÷ bindfs |",
             "|---" * (len(fsn) + 6) + "|"]
    for name, per in results.items():
        wall = {fs: statistics.median(w for w, _c in v) for fs, v in per.items() if v}
        cpu = {fs: statistics.median(c for _w, c in v) / mib[name] for fs, v in per.items() if v}

        def ratio(a, b, d):
            return f"{d[a] / d[b]:.2f}" if a in d and b in d and d[b] else "–"
        cells = [f"{wall[fs] * 1000:.0f} ms" if fs in wall else "–" for fs in fsn]
        cpus = ", ".join(f"{cpu[fs] * 1e6:.0f} µs" for fs in fsn if fs != "native" and fs in cpu)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio('shiftfs', 'native', wall)}"
                     f" | {ratio('shiftfs', 'shiftfs-pread', wall)} | {cpus}"
                     f" | {ratio('shiftfs', 'shiftfs-pread', cpu)} | {ratio('shiftfs', 'bindfs', cpu)} |")
    return "\n".join(lines)


@contextlib.contextmanager
def pipe_max_size(size: int | None):
    path = "/proc/sys/fs/pipe-max-size"
    old = open(path).read().strip()
    if size:
        with open(path, "w") as f:
            f.write(str(size))
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=512, help="size of the file read (MiB)")
    ap.add_argument("--workdir", default="/tmp/shiftfs-bench-splice")
    ap.add_argument("--read-ahead", type=int, help="read_ahead_kb of the FUSE mounts")
    ap.add_argument("--splice", default="on",
                    help="SHIFTFS_SPLICE of the splicing mount (a number: the smallest READ spliced)")
    ap.add_argument("--pipe-max-size", type=int, metavar="BYTES",
                    help="/proc/sys/fs/pipe-max-size for the run (restored after): 2097152 lets a "
                         "daemon without CAP_SYS_RESOURCE splice 1 MiB READs")
    ap.add_argument("--sizes", default="", help="O_DIRECT read sizes in KiB, comma-separated")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (mounts, drop_caches)")
    t0 = time.monotonic()
    work = a.workdir
    with pipe_max_size(a.pipe_max_size), loop_fs(work, f"{a.mib * 2 + 512}M"), contextlib.ExitStack() as stack:
        lower = os.path.join(work, "lower")
        os.makedirs(lower, exist_ok=True)
        big = os.path.join(lower, FILE)
        if not os.path.exists(big) or os.path.getsize(big) != a.mib * MIB:
            sh(["dd", "if=/dev/urandom", f"of={big}", "bs=1M", f"count={a.mib}", "status=none"])
        fss = {"native": dict(path=lower, pid=None), "bindfs": bindfs(stack, lower, work),
               "fuse-overlayfs": fuse_overlayfs(stack, lower, work),
               "shiftfs": _shiftfs(lower, work, "shiftfs", a.splice, a.read_ahead),
               "shiftfs-pread": _shiftfs(lower, work, "shiftfs-pread", "off", a.read_ahead)}
        ra = {fs: _read_ahead(v["path"], a.read_ahead) for fs, v in fss.items()
              if fs in ("bindfs", "fuse-overlayfs")}
        with fss["shiftfs"]["mount"]():
            ra["shiftfs"] = _read_ahead(fss["shiftfs"]["path"], None)
        dd = lambda fs: _dd(os.path.join(fs["path"], FILE), "1M")  # noqa: E731
        workloads = [(f"dd bs=1M {a.mib} MiB cold", _cold, dd, None),
                     (f"dd bs=1M {a.mib} MiB, lower cached", _lower_cached(big), dd, None)]
        mib = {w[0]: a.mib for w in workloads}
        for kb in filter(None, a.sizes.split(",")):
            count = max(1, min(a.mib * 1024 // int(kb), 65536))
            name = f"O_DIRECT reads of {kb} KiB ({count * int(kb) // 1024} MiB), lower cached"
            mib[name] = count * int(kb) / 1024
            workloads.append((name, _lower_cached(big), lambda fs, kb=kb, count=count: _dd(
                os.path.join(fs["path"], FILE), f"{kb}K", count, direct=True), SHIFTFS))
        results = rounds(fss, workloads, a.rounds)
    print(f"- shiftfs {revision()}; Linux {os.uname().release}; {os.cpu_count()} CPUs; "
          f"{a.rounds} rounds interleaved, medians; read_ahead_kb {ra}; SHIFTFS_SPLICE={a.splice}; "
          f"pipe-max-size {a.pipe_max_size or 'as it was'}; "
          f"run took {(time.monotonic() - t0) / 60:.1f} min\n")
    print(table(results, mib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
