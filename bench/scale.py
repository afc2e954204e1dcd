#!/usr/bin/env python3
"""Two rows of issue 18's table that need scale rather than speed, on a
private loop-mounted ext4 this module makes (no other writer or watcher on
the filesystem the mounts serve; the image and the tree are kept for the
next run):

1. **Daemon RSS after walking 200,000 files twice** (goal ≤ 100 MiB): bindfs,
   fuse-overlayfs and shiftfs, each freshly mounted over one lower tree of
   ``--files`` empty files (100 per directory). The RSS (VmRSS, summed over
   the daemon's process family: shiftfs's supervisor and the server it
   forked, tests/procs.py) and the open fds are taken after a drop_caches
   (before), after a cold ``find MNT -ls``, after a second one (drop_caches
   between the walks) and after a final drop_caches (the kernel forgets
   its inodes; a daemon that frees what it held shrinks). Each walk's
   wall time and requests (the ``fuse:fuse_request_send`` tracepoint) too.
2. **A stat by one caller while another fsyncs 256 MiB of dirty data through
   the mount** (goal p99 ≤ 50 ms): native (the lower itself), bindfs,
   fuse-overlayfs, shiftfs and the kernel idmapped mount, all mounted at
   once. A writer (the mapped user, lower 1000 = upper 101000) writes 256
   MiB into a new file, buffered, then fsyncs it; meanwhile a second
   process (root, a different caller) times, once per millisecond, two
   things: an ``os.stat`` of an existing file (``probe/file``: after the
   first, the kernel answers it from the attributes it caches, so it need
   not reach the daemon) and an ``os.stat`` of a name never used before
   (``probe/nx-PID-N``: a negative LOOKUP that must reach the daemon every
   time). The samples overlapping the fsync are kept: p50, p99 and max of
   each, the fsync's duration, the number of samples, the dirty memory
   (/proc/meminfo) just before the fsync, and the requests the daemon got
   while the file was written and while it was fsynced (with FUSE
   passthrough the writes go to the lower file without the daemon; the
   FSYNC still reaches it).

Rounds are interleaved across the mounts; the tables show medians over the
rounds and ratios of the medians.

    python3 -m bench.scale [--rounds N] [--out FILE] [--files N]   # from the repository root

Needs root, /dev/fuse, bindfs and fuse-overlayfs. Prints a markdown section
(and writes it to FILE). Every mount it makes is unmounted on the way out,
also on failure or Ctrl-C; the processes it starts are reaped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import select
import shlex
import signal
import statistics
import subprocess
import sys
import time

from bench.common import USER_LOWER, USER_UPPER, drop_caches, log, sh
from bench.measure import nfds, nreq, rss_kib
from bench.peers import bindfs, fuse_overlayfs, kernel, revision, shiftfs
from bench.report import machine, versions
from bench.tree import loop_fs, where
from tests.fuse_requests import RequestCounter
from tests.procs import family, fanotify_marks
from tests.tables import STD, text

PER_DIR = 100
WRITE_MIB = 256
GOAL_RSS_MIB = 100
GOAL_P99_MS = 50
TREE_VERSION = 1
DAEMONS = ("bindfs", "fuse-overlayfs", "shiftfs")
MOUNTS = ("native", "bindfs", "fuse-overlayfs", "shiftfs", "kernel")
SHORT = {"fuse-overlayfs": "fuse-ovl"}

# the writer: the mapped user; writes, says so, fsyncs when told, reports when
WRITER = r"""
import os, sys, time
path, mib = sys.argv[1], int(sys.argv[2])
block = memoryview(b"\x5a" * (1 << 20))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for _ in range(mib):
    done = 0
    while done < len(block):
        done += os.write(fd, block[done:])
print("written", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
os.fsync(fd)
t1 = time.monotonic()
os.close(fd)
os.unlink(path)
print(t0, t1, flush=True)
"""

# the prober (root): once per ms, a stat of an existing file and of a new name
PROBER = r"""
import json, os, select, sys, time
existing, newdir = sys.argv[1], sys.argv[2]
tag, i, out = os.getpid(), 0, []
os.stat(existing)
print("ready", flush=True)
nxt = time.monotonic()
while True:
    t0 = time.monotonic()
    os.stat(existing)
    t1 = time.monotonic()
    try:
        os.stat(f"{newdir}/nx-{tag}-{i}")
    except FileNotFoundError:
        pass
    t2 = time.monotonic()
    out.append((t0, t1, t2))
    i += 1
    nxt = max(nxt + 0.001, t2)
    if select.select([sys.stdin], [], [], max(0.0, nxt - time.monotonic()))[0]:
        break
json.dump(out, sys.stdout)
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=200_000, help="files in the lower tree (100 a directory)")
    ap.add_argument("--out", help="also write the markdown section here")
    ap.add_argument("--workdir", default="/tmp/shiftfs-scale-loop",
                    help="where the loop image (WORKDIR.img) is mounted")
    ap.add_argument("--only", choices=("rss", "fsync"), help="one of the two measures")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (mounts, drop_caches, setpriv)")
    args.argv = ["python3", "-m", "bench.scale"] + (sys.argv[1:] if argv is None else list(argv))
    return args


def image_size(files: int) -> str:
    """Room for the files' inodes (mkfs.ext4 gives one per 16 KiB) and the
    256 MiB a writer writes, with a margin."""
    return f"{max(5, math.ceil(files * 16384 * 1.3 / 2**30) + 1)}G"


def build_tree(work: str, files: int) -> str:
    """WORK/lower: ``files`` empty files, 100 a directory (d0000/f000 ...),
    owned by lower 0; w/ (the writer's, lower 1000) and probe/file. Built
    once; a stamp says for how many files."""
    lower, stamp = os.path.join(work, "lower"), os.path.join(work, "stamp.json")
    want = json.dumps(dict(files=files, per_dir=PER_DIR, tree=TREE_VERSION))
    if os.path.exists(stamp) and open(stamp).read() == want:
        return lower
    log(f"building {files} files in {lower} ...")
    if os.path.exists(lower):
        sh(["rm", "-rf", lower])
    os.makedirs(lower)
    os.chmod(work, 0o755)
    for d in range(math.ceil(files / PER_DIR)):
        sub = os.path.join(lower, f"d{d:04d}")
        os.mkdir(sub, 0o755)
        for i in range(min(PER_DIR, files - d * PER_DIR)):
            os.close(os.open(os.path.join(sub, f"f{i:03d}"), os.O_WRONLY | os.O_CREAT, 0o644))
    for d in ("w", "probe"):
        os.mkdir(os.path.join(lower, d), 0o755)
        os.chown(os.path.join(lower, d), USER_LOWER, USER_LOWER)
    with open(os.path.join(lower, "probe", "file"), "w") as f:
        f.write("probe\n")
    os.chown(os.path.join(lower, "probe", "file"), USER_LOWER, USER_LOWER)
    os.sync()
    with open(stamp, "w") as f:
        f.write(want)
    return lower


def mount_one(stack: contextlib.ExitStack, name: str, lower: str, work: str) -> dict:
    """One of MOUNTS over ``lower``: its path, the uid that writes there, the
    daemon's pid (None for native and kernel) and the device."""
    if name == "native":
        fs = dict(path=lower, uid=USER_LOWER, pid=None)
    elif name == "bindfs":
        fs = bindfs(stack, lower, work)
    elif name == "fuse-overlayfs":
        fs = fuse_overlayfs(stack, lower, work)
    elif name == "shiftfs":
        fs = shiftfs(stack, lower, work, [])
    else:
        fs = kernel(stack, lower, work)
    fs["dev"] = os.stat(fs["path"]).st_dev
    return fs


# ---- 1. daemon RSS over a big tree --------------------------------------------

def snapshot(pid: int) -> tuple[int, int]:
    """(RSS in KiB over the daemon's family, its open fds)."""
    return rss_kib(pid), nfds(pid)


def settle(pid: int, timeout: float = 30.0, quiet: float = 2.0) -> None:
    """Wait until the daemon's RSS, fds and fanotify marks stop changing
    (the FORGETs after a drop_caches are answered asynchronously, and a
    daemon may drop marks before fds): unchanged for ``quiet`` seconds, or
    ``timeout``."""
    def now():
        return snapshot(pid), sum(fanotify_marks(p) for p in family(pid))
    last, since, t_end = now(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < t_end:
        time.sleep(0.25)
        cur = now()
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def walk(fs: dict, counter: RequestCounter | None) -> tuple[float, int | None]:
    """A ``find MNT -ls``: seconds, and the requests it sent."""
    if counter:
        counter.start(fs["dev"])
    t0 = time.monotonic()
    sh(f"find {shlex.quote(fs['path'])} -ls >/dev/null")
    dt = time.monotonic() - t0
    return dt, (nreq(counter.stop()) if counter else None)


def rss_run(name: str, lower: str, work: str, counter: RequestCounter | None) -> dict:
    """One fresh mount of daemon ``name``: its RSS and fds before, after
    walk 1, after walk 2 and after a final drop_caches; the walks' seconds
    and requests. (The FORGETs that follow a drop_caches do not pass the
    tracepoint: the kernel queues them apart from requests.)"""
    with contextlib.ExitStack() as stack:
        fs = mount_one(stack, name, lower, work)
        pid = fs["pid"]
        drop_caches()
        settle(pid)
        points, secs, reqs = [snapshot(pid)], [], []
        for _ in range(2):
            drop_caches()
            dt, n = walk(fs, counter)
            secs.append(dt)
            reqs.append(n)
            points.append(snapshot(pid))
        drop_caches()
        settle(pid)
        points.append(snapshot(pid))
    log(f"rss {name:14s} " + " ".join(f"{r / 1024:.1f}M/{f}fd" for r, f in points)
        + f"; walks {secs[0]:.1f} s, {secs[1]:.1f} s")
    return dict(points=points, secs=secs, reqs=reqs)


def rss_rounds(lower: str, work: str, rounds: int, counter) -> dict:
    """Every daemon in turn, ``rounds`` times: {name: [rss_run, ...]}."""
    out = {name: [] for name in DAEMONS}
    for r in range(rounds):
        for name in DAEMONS:
            log(f"rss round {r + 1}: {name}")
            out[name].append(rss_run(name, lower, work, counter))
    return out


# ---- 2. a stat beside an fsync --------------------------------------------------

def dirty_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _line(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise RuntimeError(f"no answer from {proc.args[-3:]} within {timeout:g} s")
    return proc.stdout.readline().strip()


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _reap(proc: subprocess.Popen) -> None:
    """Our own child: asked to end by EOF on its stdin, killed if it does not."""
    with contextlib.suppress(OSError):
        proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fsync_round(name: str, fs: dict, counter: RequestCounter | None) -> dict:
    """One writer's 256 MiB and fsync on ``fs``, probed as the module says."""
    path = os.path.join(fs["path"], "w", f"fsync-{name}")
    probe = os.path.join(fs["path"], "probe")
    os.sync()
    write_counts = fsync_counts = None
    writer = _start(["setpriv", f"--reuid={fs['uid']}", f"--regid={fs['uid']}", "--clear-groups",
                     "--", sys.executable, "-c", WRITER, path, str(WRITE_MIB)])
    prober = None
    try:
        if counter and fs["pid"]:
            counter.start(fs["dev"])
        if _line(writer) != "written":
            raise RuntimeError(f"{name}: the writer failed")
        if counter and fs["pid"]:
            write_counts = counter.stop()
        prober = _start([sys.executable, "-c", PROBER, os.path.join(probe, "file"), probe])
        if _line(prober) != "ready":
            raise RuntimeError(f"{name}: the prober failed")
        dirty = dirty_mib()
        if counter and fs["pid"]:
            counter.start(fs["dev"])
        writer.stdin.write("go\n")
        writer.stdin.flush()
        t0, t1 = map(float, _line(writer, 600).split())
        prober.stdin.write("stop\n")
        prober.stdin.flush()
        samples = json.loads(prober.stdout.read())
        if counter and fs["pid"]:
            fsync_counts = counter.stop()
    finally:
        for p in (writer, prober):
            if p:
                _reap(p)
    return dict(fsync=t1 - t0, dirty=dirty, write_ops=write_counts, fsync_ops=fsync_counts,
                **latencies(samples, t0, t1))


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``xs``; nan if empty."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def latencies(samples, t0: float, t1: float) -> dict:
    """The prober's samples overlapping the fsync [t0, t1]: p50, p99, max and
    count for each probe, in seconds."""
    out = {}
    for key, a, b in (("existing", 0, 1), ("new", 1, 2)):
        xs = [s[b] - s[a] for s in samples if s[a] < t1 and s[b] > t0]
        out[key] = dict(p50=pct(xs, 0.5), p99=pct(xs, 0.99), max=max(xs, default=float("nan")),
                        n=len(xs))
    return out


def fsync_rounds(lower: str, work: str, rounds: int, counter, notes: list) -> dict:
    """Every mount at once, a round on each in turn: {name: [fsync_round, ...]}."""
    out = {}
    with contextlib.ExitStack() as stack:
        fss = {}
        for name in MOUNTS:
            try:
                fss[name] = mount_one(stack, name, lower, work)
            except Exception as e:  # noqa: BLE001 - the kernel column is optional
                if name != "kernel":
                    raise
                notes.append(f"kernel idmapped mount left out: {e}")
        for r in range(rounds):
            for name, fs in fss.items():
                res = fsync_round(name, fs, counter)
                out.setdefault(name, []).append(res)
                log(f"fsync round {r + 1} {name:14s} fsync {res['fsync'] * 1000:7.0f} ms, "
                    f"dirty {res['dirty']:.0f} MiB; stat p99 {res['existing']['p99'] * 1000:.2f} ms, "
                    f"new name p99 {res['new']['p99'] * 1000:.2f} ms, "
                    f"{res['new']['n']} samples")
    return out


# ---- the report -------------------------------------------------------------------

def med(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def ms(x: float) -> str:
    if math.isnan(x):
        return "–"
    return f"{x * 1000:.2f} ms" if x < 0.1 else f"{x * 1000:.0f} ms"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def ratio(a: float, b: float) -> str:
    if not b or math.isnan(a) or math.isnan(b):
        return "–"
    return f"{a / b:.2f}" if a / b >= 0.1 else f"{a / b:.2g}"


def med_ops(runs, key: str) -> dict:
    """The median count of each opcode over the rounds."""
    ops = sorted({k for r in runs if r[key] for k in r[key] if k.startswith("FUSE_") or k == "LOST"})
    return {k: int(med([r[key].get(k, 0) for r in runs if r[key] is not None])) for k in ops}


def fmt_ops(ops: dict) -> str:
    parts = sorted(ops.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k.replace('FUSE_', '')} {v}" for k, v in parts if v) or "none"


def rss_table(res: dict) -> list[str]:
    """One row per daemon (medians of each point), then the ratios."""
    rows = ["| daemon | RSS before | after walk 1 | after walk 2 | after drop_caches "
            "| open fds (same four points) | walk 1 / walk 2 | requests walk 1 / walk 2 "
            "| goal (after walk 2) | met |", "|---|---|---|---|---|---|---|---|---|---|"]
    meds = {}
    for name, runs in res.items():
        rss = [med([r["points"][i][0] for r in runs]) for i in range(4)]
        fds = [med([r["points"][i][1] for r in runs]) for i in range(4)]
        secs = [med([r["secs"][i] for r in runs]) for i in range(2)]
        reqs = [med([r["reqs"][i] for r in runs]) for i in range(2)]
        meds[name] = rss
        met = "yes" if rss[2] <= GOAL_RSS_MIB * 1024 else "**no**"
        rows.append(f"| {name} | " + " | ".join(mib(x) for x in rss)
                    + f" | {' / '.join(f'{x:.0f}' for x in fds)} | {secs[0]:.1f} s / {secs[1]:.1f} s"
                    + f" | {' / '.join('–' if math.isnan(x) else f'{x:,.0f}' for x in reqs)}"
                    + f" | ≤ {GOAL_RSS_MIB} MiB | {met} |")
    for peer in ("bindfs", "fuse-overlayfs"):
        if "shiftfs" in meds and peer in meds:
            rows.append(f"| shiftfs ÷ {SHORT.get(peer, peer)} | "
                        + " | ".join(ratio(a, b) for a, b in zip(meds["shiftfs"], meds[peer]))
                        + " | | | | | |")
    return rows


def _probe_cells(runs, key: str) -> tuple[list[float], str]:
    vals = [med([r[key][q] for r in runs]) for q in ("p50", "p99", "max")]
    return vals, " / ".join(ms(v) for v in vals)


def fsync_table(res: dict) -> list[str]:
    rows = ["| mount | stat of an existing file: p50 / p99 / max | stat of a new name (negative "
            "LOOKUP): p50 / p99 / max | samples (existing / new) | fsync of 256 MiB | dirty before "
            "fsync | goal (p99, both) | met |", "|---|---|---|---|---|---|---|---|"]
    meds = {}
    for name, runs in res.items():
        ex, ex_text = _probe_cells(runs, "existing")
        new, new_text = _probe_cells(runs, "new")
        fsync = med([r["fsync"] for r in runs])
        meds[name] = ex + new + [fsync]
        n = [int(med([r[k]["n"] for r in runs])) for k in ("existing", "new")]
        met = "yes" if max(ex[1], new[1]) <= GOAL_P99_MS / 1000 else "**no**"
        rows.append(f"| {name} | {ex_text} | {new_text} | {n[0]} / {n[1]} | {ms(fsync)} "
                    f"| {med([r['dirty'] for r in runs]):.0f} MiB | ≤ {GOAL_P99_MS} ms | {met} |")
    for peer in ("native", "bindfs", "fuse-overlayfs"):
        if "shiftfs" in meds and peer in meds:
            s, p = meds["shiftfs"], meds[peer]
            rows.append(f"| shiftfs ÷ {SHORT.get(peer, peer)} | "
                        + " / ".join(ratio(s[i], p[i]) for i in range(3)) + " | "
                        + " / ".join(ratio(s[i], p[i]) for i in range(3, 6))
                        + f" | | {ratio(s[6], p[6])} | | | |")
    return rows


def requests_table(res: dict) -> list[str]:
    rows = ["| mount | requests while 256 MiB were written | requests from just before the fsync "
            "until the prober stopped |", "|---|---|---|"]
    for name, runs in res.items():
        if runs[0]["write_ops"] is None:
            continue
        rows.append(f"| {name} | {fmt_ops(med_ops(runs, 'write_ops'))} "
                    f"| {fmt_ops(med_ops(runs, 'fsync_ops'))} |")
    return rows


def report(args, rss: dict, fsy: dict, notes: list, minutes: float) -> str:
    ext = text(STD)
    lines = [f"## Scale: daemon RSS over {args.files:,} files, a stat beside an fsync "
             f"(issue 18), {datetime.date.today().isoformat()}", "",
             f"- machine: {machine()}",
             f"- versions: {versions(args.revision)}",
             f"- command: `{shlex.join(args.argv)}`",
             f"- filesystem: {args.where}",
             f"- tree: {args.files:,} empty files, {PER_DIR} a directory, every owner mapped; "
             f"{args.rounds} round(s) interleaved across the mounts, medians; run took {minutes:.1f} min",
             f"- mounts: bindfs `--uid-offset=100000 --gid-offset=100000`; fuse-overlayfs "
             f"`-o lowerdir=TREE,upperdir=U,workdir=W,uidmapping={ext},gidmapping={ext},allow_other`; "
             f"shiftfs `--uidmap {ext} --gidmap {ext}` (defaults); kernel = idmapped bind mount, same map"]
    if rss:
        lines += ["", f"### Daemon RSS and open fds, walking {args.files:,} files twice", "",
                  "Each daemon freshly mounted per round; RSS = VmRSS summed over the daemon's "
                  "processes (shiftfs: supervisor and server); `find MNT -ls` as root, "
                  "drop_caches before each walk; the last point after one more drop_caches, "
                  "once RSS and fds stopped changing. Requests: the `fuse:fuse_request_send` "
                  "tracepoint (FORGETs do not pass it).", "", *rss_table(rss)]
    if fsy:
        lines += ["", "### A stat while another caller fsyncs 256 MiB", "",
                  f"The writer (upper uid {USER_UPPER}; native: {USER_LOWER}) writes 256 MiB "
                  "buffered into a new file, then fsyncs it; a second process (root) times, every "
                  "1 ms, a stat of an existing file (after the first, answered from the kernel's "
                  "attribute cache where the mount lets it cache) and a stat of a name never used "
                  "before (a negative LOOKUP: reaches the daemon every time). Samples overlapping "
                  "the fsync; ratios of the medians.", "", *fsync_table(fsy), "",
                  "Requests each daemon got (median per round, the tracepoint):", "",
                  *requests_table(fsy)]
    if notes:
        lines += [""] + [f"- note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def measure(args) -> tuple[dict, dict, list]:
    notes = []
    counter = None
    try:
        counter = RequestCounter()
    except (OSError, RuntimeError) as e:
        notes.append(f"request counting unavailable: {e}")
    try:
        lower = build_tree(args.work, args.files)
        args.revision = revision() + " (at mount time)"
        rss = rss_rounds(lower, args.work, args.rounds, counter) if args.only != "fsync" else {}
        fsy = fsync_rounds(lower, args.work, args.rounds, counter, notes) if args.only != "rss" else {}
    finally:
        if counter:
            counter.close()
    return rss, fsy, notes


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work = args.workdir
    size = image_size(args.files)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    with loop_fs(args.work, size):
        args.where = where(args.work) + f", a private loop image of {size} made by the run"
        rss, fsy, notes = measure(args)
    out = report(args, rss, fsy, notes, (time.monotonic() - t0) / 60)
    print(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
