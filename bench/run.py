#!/usr/bin/env python3
"""Side-by-side benchmark: native lower tree vs bindfs vs shiftfs vs a kernel
idmapped mount, one markdown table.

    python3 bench/run.py --rounds 3 --out bench/results.md     # full (~20k files, 1 GiB)
    python3 bench/run.py --quick                               # small smoke run

Needs root, /dev/fuse, fuse3, bindfs; runs under --workdir (default
/tmp/shiftfs-bench), builds the lower tree there once and keeps it for the
next run (``--rebuild`` to start over). Every mount it makes is unmounted on
the way out, also on failure or Ctrl-C.

Each workload runs on every filesystem in turn (A B C D A B C D ...) for
``--rounds`` rounds; the table shows medians and ratios. "cold" means
``sync; echo 3 > /proc/sys/vm/drop_caches`` before the run; "warm" means the
same command ran just before (untimed). Writes run as a mapped, non-root user
(lower uid 1000 = upper 101000; native runs as 1000).

Daemon CPU per request = the daemon's utime+stime (/proc/PID/stat, all
threads) over a cold walk (find -ls + tar | cat), divided by the number of
FUSE requests the kernel sent to that connection in the same interval,
counted with the fuse:fuse_request_send tracepoint in a private tracefs
instance filtered on the connection.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OFFSET = 100000
USER_LOWER = 1000                 # the mapped user, as stored
USER_UPPER = USER_LOWER + OFFSET  # ... and as seen through the shifting mounts
FSNAMES = ("native", "bindfs", "shiftfs", "kernel")

FULL = dict(top=20, sub=25, files=40, big_mib=1024, write_mib=512, creates=5000, tar_top=1)
QUICK = dict(top=5, sub=10, files=40, big_mib=64, write_mib=64, creates=500, tar_top=1)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def as_user(uid: int, cmd: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", "sh", "-c", cmd]


# ---- the lower tree -----------------------------------------------------------

OWNERS = [(0, 0)] * 6 + [(1000, 1000)] * 2 + [(1001, 100), (33, 33), (100, 65534), (70000, 70000)]


def build_tree(work: str, p: dict) -> None:
    lower = os.path.join(work, "lower")
    stamp = os.path.join(work, "stamp.json")
    want = json.dumps(p, sort_keys=True)
    if os.path.exists(stamp) and open(stamp).read() == want:
        return
    log(f"building lower tree in {lower} ...")
    if os.path.exists(lower):
        sh(["rm", "-rf", lower])
    rnd = random.Random(4)
    os.makedirs(lower)
    os.chmod(work, 0o755)
    os.chmod(lower, 0o755)
    payload = rnd.randbytes(8192)
    n = 0
    for t in range(p["top"]):
        top = os.path.join(lower, f"t{t:02d}")
        os.mkdir(top, 0o755)
        for s in range(p["sub"]):
            d = os.path.join(top, f"d{s:02d}")
            os.mkdir(d, 0o755)
            uid, gid = rnd.choice(OWNERS)
            os.chown(d, uid, gid)
            for i in range(p["files"]):
                path = os.path.join(d, f"f{i:03d}")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, rnd.choice((0o644, 0o600, 0o755, 0o664)))
                os.write(fd, payload[: rnd.randrange(0, 8192)])
                os.close(fd)
                uid, gid = rnd.choice(OWNERS)
                os.chown(path, uid, gid)
                n += 1
    # a writable place for the mapped user
    w = os.path.join(lower, "w")
    os.mkdir(w, 0o755)
    os.chown(w, USER_LOWER, USER_LOWER)
    log(f"  {n} files; writing {p['big_mib']} MiB big file ...")
    block = rnd.randbytes(1 << 20)
    with open(os.path.join(lower, "big"), "wb") as f:
        for _ in range(p["big_mib"]):
            f.write(block)
    os.chmod(os.path.join(lower, "big"), 0o644)
    # the small tree to untar: one top directory, numeric owners
    sh(["tar", "cf", os.path.join(work, "small.tar"), "--numeric-owner", "-C", lower, "t00"])
    with open(os.path.join(work, "paths.txt"), "w") as f:
        for dirpath, dirnames, filenames in os.walk(lower):
            rel = os.path.relpath(dirpath, lower)
            for name in dirnames + filenames:
                f.write(os.path.normpath(os.path.join(rel, name)) + "\n")
    sh("sync")
    with open(stamp, "w") as f:
        f.write(want)


# ---- the mounts ---------------------------------------------------------------

def is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def wait_mounted(path: str, proc: subprocess.Popen, what: str, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}: "
                               f"{proc.stderr.read().decode(errors='replace')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not mount {path}")
        time.sleep(0.02)


@contextlib.contextmanager
def fuse_daemon(cmd: list[str], mnt: str, what: str):
    """Start a FUSE daemon in the foreground (so its pid is ours), wait until
    mounted, always unmount and reap it."""
    os.makedirs(mnt, exist_ok=True)
    if is_mounted(mnt):
        raise RuntimeError(f"{mnt} is already a mount point (a previous run left it?)")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        wait_mounted(mnt, proc, what)
        yield proc.pid
    finally:
        if is_mounted(mnt):
            if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode:
                subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=10)


def mount_all(stack: contextlib.ExitStack, work: str, shiftfs_args: list[str], skip: set):
    lower = os.path.join(work, "lower")
    fss = {"native": dict(path=lower, uid=USER_LOWER, pid=None)}
    notes = []
    if "bindfs" not in skip:
        mnt = os.path.join(work, "mnt-bindfs")
        pid = stack.enter_context(fuse_daemon(
            ["bindfs", "-f", f"--uid-offset={OFFSET}", f"--gid-offset={OFFSET}", lower, mnt],
            mnt, "bindfs"))
        fss["bindfs"] = dict(path=mnt, uid=USER_UPPER, pid=pid)
    if "shiftfs" not in skip:
        mnt = os.path.join(work, "mnt-shiftfs")
        ext = f"0:{OFFSET}:65536"
        pid = stack.enter_context(fuse_daemon(
            [sys.executable, "-m", "shiftfs", "-f", "-q", lower, mnt, "--uidmap", ext,
             "--gidmap", ext] + shiftfs_args, mnt, "shiftfs"))
        fss["shiftfs"] = dict(path=mnt, uid=USER_UPPER, pid=pid)
    if "kernel" not in skip:
        mnt = os.path.join(work, "mnt-kernel")
        os.makedirs(mnt, exist_ok=True)
        try:
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            from oracle.kernel_idmap import idmapped_mount
            ext = [(0, OFFSET, 65536)]
            stack.enter_context(idmapped_mount(lower, mnt, ext, ext))
            fss["kernel"] = dict(path=mnt, uid=USER_UPPER, pid=None)
        except Exception as e:  # noqa: BLE001 - report and go on without it
            notes.append(f"kernel idmapped mount skipped: {e}")
    for name, fs in fss.items():
        st = os.stat(fs["path"])
        fs["dev"] = st.st_dev
        bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        fs["read_ahead_kb"] = open(bdi).read().strip() if name in ("bindfs", "shiftfs") and os.path.exists(bdi) else ""
    return fss, notes


# ---- workloads ----------------------------------------------------------------
# Each: (row name, prep(fs, i), run(fs, i) -> seconds, cleanup(fs, i)).

def timed(cmd, **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=isinstance(cmd, str), check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def inner_timed(cmd) -> float:
    """A child that prints its own elapsed seconds (no interpreter start-up)."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


STAT_SCRIPT = r"""
import os, sys, time
root = sys.argv[1]
paths = [os.path.join(root, p) for p in open(sys.argv[2]).read().split()]
for p in paths: os.lstat(p)
t = time.perf_counter()
for p in paths: os.lstat(p)
print(time.perf_counter() - t)
"""

CREATE_SCRIPT = r"""
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
data = b"x" * 4096
t = time.perf_counter()
os.mkdir(d)
for i in range(n):
    fd = os.open(os.path.join(d, "f%05d" % i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data)
    os.close(fd)
print(time.perf_counter() - t)
"""


def fadvise_dontneed(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_workloads(work: str, p: dict):
    lower = os.path.join(work, "lower")
    paths = os.path.join(work, "paths.txt")
    small = os.path.join(work, "small.tar")
    seq = [0]

    def uniq(prefix):
        seq[0] += 1
        return f"{prefix}{os.getpid()}_{seq[0]}"

    def find(fs):
        return timed(f"find {shlex.quote(fs['path'])} -ls >/dev/null")

    def du(fs):
        return timed(["du", "-s", fs["path"]])

    def tar(fs):
        return timed(f"tar cf - --numeric-owner -C {shlex.quote(fs['path'])} . | cat >/dev/null")

    def stat(fs):
        return inner_timed([sys.executable, "-c", STAT_SCRIPT, fs["path"], paths])

    def big_read(fs):
        return timed(["dd", f"if={fs['path']}/big", "of=/dev/null", "bs=1M"], stderr=subprocess.DEVNULL)

    def big_prep(fs):
        timed(["cat", os.path.join(lower, "big")])          # lower cached
        if fs["pid"] is not None:                           # the FUSE mount's own cache dropped
            fadvise_dontneed(os.path.join(fs["path"], "big"))

    state = {}

    def dd_write(fs):
        name = uniq("dd")
        state["dd"] = name
        cmd = f"dd if=/dev/zero of={shlex.quote(fs['path'])}/w/{name} bs=1M count={p['write_mib']} 2>/dev/null"
        return timed(as_user(fs["uid"], cmd))

    def dd_clean(fs):
        os.unlink(os.path.join(lower, "w", state["dd"]))
        os.sync()

    def creates(fs):
        name = uniq("c")
        state["c"] = name
        return inner_timed(["setpriv", f"--reuid={fs['uid']}", f"--regid={fs['uid']}", "--clear-groups",
                            "--", sys.executable, "-c", CREATE_SCRIPT,
                            os.path.join(fs["path"], "w", name), str(p["creates"])])

    def rm_lower(key):
        def clean(fs):
            sh(["rm", "-rf", os.path.join(lower, "w", state[key])])
            os.sync()
        return clean

    def untar(fs):
        name = uniq("u")
        state["u"] = name
        d = shlex.quote(os.path.join(fs["path"], "w", name))
        return timed(as_user(fs["uid"], f"mkdir {d} && tar xf {shlex.quote(small)} -C {d}"))

    nothing = lambda fs: None  # noqa: E731
    return [
        # row, prep, run, cleanup, target (ratio, against)
        ("find -ls cold", lambda fs: drop_caches(), find, nothing, (0.5, "bindfs")),
        ("find -ls warm", find, find, nothing, (0.5, "bindfs")),
        ("du -s warm", du, du, nothing, (0.5, "bindfs")),
        ("tar cf - | cat cold", lambda fs: drop_caches(), tar, nothing, (1.0, "bindfs")),
        ("tar cf - | cat warm", tar, tar, nothing, (1.0, "bindfs")),
        ("stat every path warm", nothing, stat, nothing, (1.2, "native")),
        (f"read {p['big_mib']} MiB, lower cached", big_prep, big_read, nothing, (1.0, "bindfs")),
        (f"re-read {p['big_mib']} MiB", big_read, big_read, nothing, (1.1, "native")),
        (f"dd write {p['write_mib']} MiB (user)", nothing, dd_write, dd_clean, (0.2, "bindfs")),
        (f"create+write {p['creates']} x 4 KiB (user)", nothing, creates, rm_lower("c"), (0.7, "bindfs")),
        ("untar small tree (user)", nothing, untar, rm_lower("u"), None),
    ]


# ---- daemon CPU per request, RSS -------------------------------------------------

TRACE = "/sys/kernel/tracing"


class RequestCounter:
    """fuse:fuse_request_send in a private tracefs instance, filtered on one
    connection; counts by opcode."""

    def __init__(self):
        if not os.path.isdir(os.path.join(TRACE, "events")):
            subprocess.run(["mount", "-t", "tracefs", "nodev", TRACE], capture_output=True)
        self.inst = os.path.join(TRACE, "instances", f"shiftfs-bench-{os.getpid()}")
        os.mkdir(self.inst)
        self._w("buffer_size_kb", "131072")
        self.ev = os.path.join(self.inst, "events", "fuse", "fuse_request_send")
        if not os.path.isdir(self.ev):
            self.close()
            raise RuntimeError("no fuse:fuse_request_send tracepoint in this kernel")

    def _w(self, rel, text):
        with open(os.path.join(self.inst, rel) if not rel.startswith("/") else rel, "w") as f:
            f.write(text)

    def start(self, dev: int):
        conn = (os.major(dev) << 20) | os.minor(dev)
        self._w(os.path.join(self.ev, "filter"), f"connection == {conn}")
        self._w("trace", "")
        self._w(os.path.join(self.ev, "enable"), "1")

    def stop(self) -> collections.Counter:
        self._w(os.path.join(self.ev, "enable"), "0")
        counts = collections.Counter()
        with open(os.path.join(self.inst, "trace")) as f:
            for line in f:
                if line.startswith("#"):
                    continue
                i = line.find("(FUSE_")
                if i >= 0:
                    counts[line[i + 1: line.index(")", i)]] += 1
        lost = 0
        for cpu in os.listdir(os.path.join(self.inst, "per_cpu")):
            for line in open(os.path.join(self.inst, "per_cpu", cpu, "stats")):
                if line.startswith("overrun:"):
                    lost += int(line.split()[1])
        if lost:
            counts["LOST"] = lost
        return counts

    def close(self):
        with contextlib.suppress(OSError):
            os.rmdir(self.inst)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def daemon_stats(fss: dict, work: str, counter: RequestCounter | None):
    rows = []
    for name in ("bindfs", "shiftfs"):
        fs = fss.get(name)
        if not fs:
            continue
        pid, path = fs["pid"], shlex.quote(fs["path"])
        walk = f"find {path} -ls >/dev/null && tar cf - --numeric-owner -C {path} . | cat >/dev/null"
        drop_caches()
        rss0 = rss_kib(pid)
        cpu0 = cpu_seconds(pid)
        if counter:
            counter.start(fs["dev"])
        sh(walk, stdout=subprocess.DEVNULL)
        counts = counter.stop() if counter else collections.Counter()
        cpu = cpu_seconds(pid) - cpu0
        rss1 = rss_kib(pid)
        for _ in range(2):
            drop_caches()
            sh(walk, stdout=subprocess.DEVNULL)
        rss3 = rss_kib(pid)
        n = sum(v for k, v in counts.items() if k != "LOST")
        rows.append(dict(fs=name, cpu_s=cpu, requests=n, us_per_req=(cpu / n * 1e6) if n else None,
                         rss0=rss0, rss1=rss1, rss3=rss3, ops=counts))
    return rows


# ---- report -------------------------------------------------------------------

def fmt_t(x):
    if x is None:
        return "–"
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def fmt_r(x):
    return "–" if x is None else f"{x:.2f}"


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, Linux {platform.release()}"


def versions() -> str:
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    sys.path.insert(0, ROOT)
    from shiftfs import fuse as sfuse
    rev = first_line(["git", "-C", ROOT, "describe", "--always", "--dirty"])
    return (f"{first_line(['bindfs', '--version'])}; libfuse {sfuse.LIBFUSE_VERSION[0]}."
            f"{sfuse.LIBFUSE_VERSION[1]} ({os.path.basename(sfuse.LIBFUSE_PATH)}); "
            f"Python {platform.python_version()}; shiftfs {rev}")


def report(results, workloads, fss, dstats, notes, args, p, elapsed) -> str:
    present = [n for n in FSNAMES if n in fss]
    nfiles = p["top"] * p["sub"] * p["files"]
    out = [f"## shiftfs benchmark, {datetime.date.today().isoformat()}", "",
           f"- machine: {machine()}",
           f"- versions: {versions()}",
           f"- command: `{' '.join(['python3', 'bench/run.py'] + sys.argv[1:])}`",
           f"- tree: {nfiles} small files (0–8 KiB) in {p['top'] * (p['sub'] + 1)} directories, "
           f"owners varied (one in twelve unmapped), one {p['big_mib']} MiB file; "
           f"{args.rounds} round(s), workloads interleaved across filesystems, medians; "
           f"run took {elapsed / 60:.1f} min",
           "- mounts: bindfs `--uid-offset=100000 --gid-offset=100000` (defaults otherwise); "
           "shiftfs `--uidmap 0:100000:65536 --gidmap 0:100000:65536` (defaults"
           + (f", plus `{' '.join(args.shiftfs_args)}`" if args.shiftfs_args else "") + "); "
           "kernel = idmapped bind mount with the same map",
           "- read_ahead_kb: " + ", ".join(f"{n} {fss[n]['read_ahead_kb']}" for n in ("bindfs", "shiftfs")
                                         if n in fss and fss[n]['read_ahead_kb']),
           ""]
    head = ["workload"] + present + ["shiftfs ÷ native", "shiftfs ÷ bindfs", "kernel ÷ native",
                                     "target", "met"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for row, _prep, _run, _clean, target in workloads:
        med = {n: statistics.median(results[row][n]) if results[row].get(n) else None for n in present}
        s, nat, b, k = med.get("shiftfs"), med.get("native"), med.get("bindfs"), med.get("kernel")
        rn = s / nat if s and nat else None
        rb = s / b if s and b else None
        rk = k / nat if k and nat else None
        if target:
            limit, against = target
            val = rb if against == "bindfs" else rn
            tgt = f"≤ {limit} × {against}"
            met = "–" if val is None else ("yes" if val <= limit else "**no**")
        else:
            tgt, met = "–", "–"
        out.append("| " + " | ".join([row] + [fmt_t(med[n]) for n in present]
                                     + [fmt_r(rn), fmt_r(rb), fmt_r(rk), tgt, met]) + " |")
    if dstats:
        out += ["", "Daemon cost over a cold walk (`find -ls` + `tar cf - | cat` of the whole tree); "
                "requests counted with the `fuse:fuse_request_send` tracepoint; RSS before, after "
                "that walk, and after two more:", "",
                "| daemon | requests | CPU | µs / request | RSS before | after 1 walk | after 3 walks | "
                "top requests |", "|---|---|---|---|---|---|---|---|"]
        for d in dstats:
            top = ", ".join(f"{k.replace('FUSE_', '')} {v}" for k, v in d["ops"].most_common(6))
            us = f"{d['us_per_req']:.1f}" if d["us_per_req"] else "–"
            out.append(f"| {d['fs']} | {d['requests']} | {d['cpu_s']:.2f} s | {us} | "
                       f"{d['rss0'] / 1024:.1f} MiB | {d['rss1'] / 1024:.1f} MiB | "
                       f"{d['rss3'] / 1024:.1f} MiB | {top} |")
        out.append("")
        out.append("Target: ≤ 15 µs per request (shiftfs), RSS flat over a walk.")
    if notes:
        out += [""] + [f"- note: {n}" for n in notes]
    return "\n".join(out) + "\n"


# ---- main ---------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="rounds per workload (default 3, quick 1)")
    ap.add_argument("--quick", action="store_true", help="small tree (2,000 files, 64 MiB): a smoke run")
    ap.add_argument("--workdir", default=None, help="default /tmp/shiftfs-bench[-quick]")
    ap.add_argument("--out", help="write the markdown table here (also printed)")
    ap.add_argument("--only", help="comma-separated substrings of workload names to run")
    ap.add_argument("--skip", default="", help="comma-separated filesystems to leave out")
    ap.add_argument("--no-daemon-stats", action="store_true")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the lower tree")
    ap.add_argument("--json", help="also dump raw timings here")
    ap.add_argument("shiftfs_args", nargs="*", help="extra shiftfs arguments after --, e.g. -- -o attr_timeout=5")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (mounts, drop_caches, setpriv)")
    p = QUICK if args.quick else FULL
    args.rounds = args.rounds or (1 if args.quick else 3)
    work = args.workdir or ("/tmp/shiftfs-bench-quick" if args.quick else "/tmp/shiftfs-bench")
    os.makedirs(work, exist_ok=True)
    if args.rebuild and os.path.exists(os.path.join(work, "stamp.json")):
        os.unlink(os.path.join(work, "stamp.json"))
    build_tree(work, p)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    t_start = time.monotonic()
    workloads = make_workloads(work, p)
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        workloads = [w for w in workloads if any(k in w[0] for k in keys)]
    results = {w[0]: collections.defaultdict(list) for w in workloads}
    with contextlib.ExitStack() as stack:
        fss, notes = mount_all(stack, work, args.shiftfs_args, set(filter(None, args.skip.split(","))))
        order = [n for n in FSNAMES if n in fss]
        for row, prep, run, clean, _t in workloads:
            for r in range(args.rounds):
                for name in order:
                    fs = fss[name]
                    prep(fs)
                    dt = run(fs)
                    clean(fs)
                    results[row][name].append(dt)
                    log(f"{row:40s} round {r + 1} {name:8s} {dt * 1000:9.1f} ms")
        dstats = []
        if not args.no_daemon_stats:
            counter = None
            try:
                counter = RequestCounter()
            except (OSError, RuntimeError) as e:
                notes.append(f"request counting unavailable ({e}); CPU per request not computed")
            try:
                dstats = daemon_stats(fss, work, counter)
            finally:
                if counter:
                    counter.close()
    text = report(results, workloads, fss, dstats, notes, args, p, time.monotonic() - t_start)
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
