#!/usr/bin/env python3
"""Side-by-side benchmark: native lower tree vs bindfs vs fuse-overlayfs vs
shiftfs vs a kernel idmapped mount, one markdown table.

    python3 -m bench.run --rounds 3 --out bench/results.md     # full (~20k files, 1 GiB)
    python3 -m bench.run --quick                               # small smoke run
    python3 -m bench.run --loop 6G --all-mapped --strace ...   # on a private ext4 the run makes

(from the repository root). The parts: bench/tree.py builds the lower tree
(and the loop image), bench/peers.py mounts each filesystem,
bench/workloads.py times the workloads, bench/measure.py takes the daemon
figures, bench/report.py writes the table.

``--loop SIZE`` makes a sparse ext4 image (WORKDIR.img) and mounts it,
private, at the workdir: no other writer or watcher on the filesystem the
mounts serve (kept for the next run; unmounted on the way out).

Needs root, /dev/fuse, fuse3, bindfs, fuse-overlayfs (a missing one is left
out of the table, with a note); runs under --workdir (default
/tmp/shiftfs-bench), builds the lower tree there once and keeps it for the
next run (``--rebuild`` to start over). Every mount it makes is unmounted on
the way out, also on failure or Ctrl-C.

Each workload runs on every filesystem in turn (A B C D A B C D ...) for
``--rounds`` rounds; the table shows medians and ratios. "cold" means
``sync; echo 3 > /proc/sys/vm/drop_caches`` before the run; "warm" means the
same command ran just before (untimed). Writes run as a mapped, non-root user
(lower uid 1000 = upper 101000; native runs as 1000).

Daemon CPU in the timed runs: the daemon's utime+stime (/proc/PID/stat,
all threads) over each timed run, medians; per path walked for the walks
(readdirplus answers ~40 paths in one request, so per request misleads
there), per request for the writes. ``--strace``: syscalls per request
over one more create+write run (strace -f -y; /dev/fuse I/O told apart by
the fd).

Daemon CPU per request = the daemon's utime+stime (/proc/PID/stat, all
threads) over a cold walk (find -ls + tar | cat), divided by the number of
FUSE requests the kernel sent to that connection in the same interval,
counted with the fuse:fuse_request_send tracepoint in a private tracefs
instance filtered on the connection. The same counter, in a separate untimed
pass after the timed rounds, gives the requests each workload sends to each
FUSE daemon, by opcode (GETXATTR split by attribute name, told apart by the
request length: the tracepoint carries no node id or name).

fuse-overlayfs runs with lowerdir = the tree, an empty upperdir/workdir
(recreated each run; writes land in the upperdir) and
uidmapping=/gidmapping= the same table. Coherence: how long a change made
directly on the lower takes to show through each mount (polled every ms, up
to 5 s).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import sys
import time

from bench.common import FSNAMES, log
from bench.measure import (RequestCounter, acl_probe, coherence, cpu_seconds, daemon_stats,
                           request_counts, syscall_counts)
from bench.peers import mount_all, revision
from bench.report import report
from bench.tree import FULL, QUICK, build_tree, loop_fs, where
from bench.workloads import make_workloads


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="rounds per workload (default 3, quick 1)")
    ap.add_argument("--quick", action="store_true", help="small tree (2,000 files, 64 MiB): a smoke run")
    ap.add_argument("--workdir", default=None, help="default /tmp/shiftfs-bench[-quick]")
    ap.add_argument("--out", help="write the markdown table here (also printed)")
    ap.add_argument("--only", help="comma-separated substrings of workload names to run")
    ap.add_argument("--skip", default="", help="comma-separated filesystems to leave out")
    ap.add_argument("--no-daemon-stats", action="store_true",
                    help="leave out the cold-walk daemon figures, the request counts and coherence")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the lower tree")
    ap.add_argument("--all-mapped", action="store_true",
                    help="a tree whose owners are all in the table (no frozen inodes); "
                         "default workdir /tmp/shiftfs-bench-mapped")
    ap.add_argument("--loop", metavar="SIZE",
                    help="run on a private ext4 in a loop image of SIZE (e.g. 6G) that the run makes "
                         "and mounts at the workdir (default /tmp/shiftfs-bench-loop[-mapped]); kept "
                         "for the next run")
    ap.add_argument("--strace", action="store_true",
                    help="also count the daemons' syscalls per request over one more create+write "
                         "run (strace -f, written to /dev/shm)")
    ap.add_argument("--json", help="also dump raw timings here")
    ap.add_argument("shiftfs_args", nargs="*", help="extra shiftfs arguments after --, e.g. -- -o attr_timeout=5")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (mounts, drop_caches, setpriv)")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.work = args.workdir or ("/tmp/shiftfs-bench-quick" if args.quick else "/tmp/shiftfs-bench") \
        + ("-loop" if args.loop else "") + ("-mapped" if args.all_mapped else "")
    return args


def timed_rounds(fss: dict, workloads, rounds: int):
    """Each workload on every filesystem in turn (A B C D A B C D ...):
    seconds, and the daemon's CPU seconds, by row and filesystem."""
    results = {w[0]: collections.defaultdict(list) for w in workloads}
    cpu = {w[0]: collections.defaultdict(list) for w in workloads}
    order = [n for n in FSNAMES if n in fss]
    for row, prep, run, clean, _t in workloads:
        for r in range(rounds):
            for name in order:
                fs = fss[name]
                prep(fs)
                c0 = cpu_seconds(fs["pid"]) if fs["pid"] else None
                dt = run(fs)
                if c0 is not None:
                    cpu[row][name].append(cpu_seconds(fs["pid"]) - c0)
                clean(fs)
                results[row][name].append(dt)
                log(f"{row:40s} round {r + 1} {name:14s} {dt * 1000:9.1f} ms")
    return results, cpu


def daemon_figures(fss: dict, work: str, workloads, strace: bool, notes: list):
    """The untimed measures: (daemon stats, request counts, coherence, ACL
    probe, syscall counts)."""
    dstats, rcounts, aprobe, sysc = [], {}, {}, {}
    counter = None
    try:
        counter = RequestCounter()
    except (OSError, RuntimeError) as e:
        notes.append(f"request counting unavailable ({e}); CPU per request not computed")
    try:
        if counter:
            rcounts = request_counts(fss, workloads, counter)
            aprobe = acl_probe(fss, counter)
            if strace:
                sysc = syscall_counts(fss, workloads, counter, notes)
        dstats = daemon_stats(fss, work, counter)
    finally:
        if counter:
            counter.close()
    return dstats, rcounts, coherence(fss, work), aprobe, sysc


def measure(args, p: dict) -> tuple[str, dict]:
    """Build the tree, mount, run and measure; the report."""
    work = args.work
    build_tree(work, p)
    args.where = where(work) + (f", a private loop image of {args.loop} made by the run"
                                if args.loop else "")
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    t_start = time.monotonic()
    workloads = make_workloads(work, p)
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        workloads = [w for w in workloads if any(k in w[0] for k in keys)]
    with contextlib.ExitStack() as stack:
        fss, notes = mount_all(stack, work, args.shiftfs_args, set(filter(None, args.skip.split(","))))
        args.revision = revision() + " (at mount time)"
        results, cpu = timed_rounds(fss, workloads, args.rounds)
        dstats, rcounts, coh, aprobe, sysc = [], {}, {}, {}, {}
        if not args.no_daemon_stats:
            dstats, rcounts, coh, aprobe, sysc = daemon_figures(fss, work, workloads, args.strace, notes)
    text = report(results, workloads, fss, dstats, rcounts, coh, aprobe, notes, args, p,
                  time.monotonic() - t_start, cpu, sysc)
    return text, results


def main(argv=None) -> int:
    args = parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.all_mapped:
        p["all_mapped"] = True
    with contextlib.ExitStack() as outer:
        if args.loop:
            outer.enter_context(loop_fs(args.work, args.loop))
        else:
            os.makedirs(args.work, exist_ok=True)
        if args.rebuild and os.path.exists(os.path.join(args.work, "stamp.json")):
            os.unlink(os.path.join(args.work, "stamp.json"))
        text, results = measure(args, p)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: dict(v) for k, v in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
