#!/usr/bin/env python3
"""Side-by-side benchmark: native lower tree vs bindfs vs fuse-overlayfs vs
shiftfs vs a kernel idmapped mount, one markdown table.

    python3 bench/run.py --rounds 3 --out bench/results.md     # full (~20k files, 1 GiB)
    python3 bench/run.py --quick                               # small smoke run
    python3 bench/run.py --loop 6G --all-mapped --strace ...   # on a private ext4 the run makes

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
import datetime
import importlib.util
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
sys.path.insert(0, ROOT)  # shiftfs itself (versions()); test helpers are loaded by file (_helper)


def _helper(name: str, rel: str):
    """A module of the test suite, loaded from its file (bench/ does not put
    tests/ on sys.path)."""
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod

OFFSET = 100000
USER_LOWER = 1000                 # the mapped user, as stored
USER_UPPER = USER_LOWER + OFFSET  # ... and as seen through the shifting mounts
FSNAMES = ("native", "bindfs", "fuse-overlayfs", "shiftfs", "kernel")
FUSE_FS = ("bindfs", "fuse-overlayfs", "shiftfs")
SHORT = {"fuse-overlayfs": "fuse-ovl"}   # column heads

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

# 2: files of unmapped owners are world-readable, so root can read every file
# through an idmapped mount too (root's DAC override needs a mapped owner)
TREE_VERSION = 2
OWNERS = [(0, 0)] * 6 + [(1000, 1000)] * 2 + [(1001, 100), (33, 33), (100, 65534), (70000, 70000)]
# --all-mapped: an image whose every owner is in the table (the usual case):
# no frozen inode, whose lifetime-0 attributes dominate the warm rows
MAPPED_OWNERS = [o for o in OWNERS if max(o) < 65536]


def build_tree(work: str, p: dict) -> None:
    lower = os.path.join(work, "lower")
    stamp = os.path.join(work, "stamp.json")
    want = json.dumps(dict(p, tree=TREE_VERSION), sort_keys=True)
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
    owners = MAPPED_OWNERS if p.get("all_mapped") else OWNERS
    n = 0
    for t in range(p["top"]):
        top = os.path.join(lower, f"t{t:02d}")
        os.mkdir(top, 0o755)
        for s in range(p["sub"]):
            d = os.path.join(top, f"d{s:02d}")
            os.mkdir(d, 0o755)
            uid, gid = rnd.choice(owners)
            os.chown(d, uid, gid)
            for i in range(p["files"]):
                path = os.path.join(d, f"f{i:03d}")
                mode = rnd.choice((0o644, 0o600, 0o755, 0o664))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
                os.write(fd, payload[: rnd.randrange(0, 8192)])
                os.close(fd)
                uid, gid = rnd.choice(owners)
                os.chown(path, uid, gid)
                if uid >= 65536:
                    os.chmod(path, mode | 0o044)
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


# ---- a private filesystem for the run -------------------------------------------

@contextlib.contextmanager
def loop_fs(work: str, size: str):
    """A private ext4 on a loop image (``WORK.img``, sparse, SIZE like 6G)
    mounted at ``work``: no other writer or watcher on the filesystem the
    mounts serve. The image (and the tree built in it) is kept for the next
    run with the same size; unmounted on the way out."""
    img = work.rstrip("/") + ".img"
    want = subprocess.run(["numfmt", "--from=iec", size.upper().removesuffix("B")],
                          capture_output=True, text=True, check=True).stdout.strip()
    if is_mounted(work):
        raise RuntimeError(f"{work} is already a mount point (a previous run left it?)")
    if not os.path.exists(img) or str(os.path.getsize(img)) != want:
        log(f"making a {size} ext4 in {img} ...")
        with open(img, "wb") as f:
            f.truncate(int(want))
        sh(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", img])
    os.makedirs(work, exist_ok=True)
    sh(["mount", "-o", "loop", img, work])
    try:
        sh(["mount", "--make-private", work])
        os.chmod(work, 0o755)
        yield img
    finally:
        os.sync()
        if subprocess.run(["umount", work], capture_output=True).returncode:
            time.sleep(1)
            if subprocess.run(["umount", work], capture_output=True).returncode:
                log(f"{work} still busy: detached lazily")
                subprocess.run(["umount", "-l", work], capture_output=True)


def where(work: str) -> str:
    """What filesystem the run's tree is on, for the report."""
    st = os.stat(work)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == dev:
                rest = fields[fields.index("-") + 1:]
                return f"{rest[0]} on {rest[1]} (mounted at {fields[4]})"
    return "?"


# ---- the mounts ---------------------------------------------------------------

def revision() -> str:
    """The checkout's commit: git, or .git/HEAD read directly where git is
    not installed (CI's Debian root has none)."""
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                              capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        try:
            head = open(os.path.join(ROOT, ".git", "HEAD")).read().strip()
            if head.startswith("ref: "):
                head = open(os.path.join(ROOT, ".git", head[5:])).read().strip()
            return head[:7] + " (no git here: dirty state unknown)"
        except OSError:
            return "unknown"


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
            log(f"{what} (pid {proc.pid}) still running 10 s after the unmount; SIGTERM")
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"{what} (pid {proc.pid}) ignored SIGTERM; SIGKILL")
                proc.kill()
                proc.wait(timeout=10)


def mount_all(stack: contextlib.ExitStack, work: str, shiftfs_args: list[str], skip: set):
    lower = os.path.join(work, "lower")
    fss = {"native": dict(path=lower, uid=USER_LOWER, pid=None)}
    notes = []
    coh = os.path.join(lower, "coh")            # coherence probes (not in paths.txt)
    if os.path.exists(coh):
        sh(["rm", "-rf", coh])
    os.mkdir(coh, 0o755)
    if "bindfs" not in skip:
        mnt = os.path.join(work, "mnt-bindfs")
        pid = stack.enter_context(fuse_daemon(
            ["bindfs", "-f", f"--uid-offset={OFFSET}", f"--gid-offset={OFFSET}", lower, mnt],
            mnt, "bindfs"))
        fss["bindfs"] = dict(path=mnt, uid=USER_UPPER, pid=pid)
    if "fuse-overlayfs" not in skip:
        import shutil
        if not shutil.which("fuse-overlayfs"):
            notes.append("fuse-overlayfs not installed (apt-get install fuse-overlayfs); column left out")
        else:
            mnt = os.path.join(work, "mnt-fuse-overlayfs")
            upper, wd = os.path.join(work, "ovl-upper"), os.path.join(work, "ovl-work")
            for d in (upper, wd):
                if os.path.exists(d):
                    sh(["rm", "-rf", d])
                os.mkdir(d, 0o755)
            ext = f"0:{OFFSET}:65536"
            pid = stack.enter_context(fuse_daemon(
                ["fuse-overlayfs", "-f", "-o", f"lowerdir={lower},upperdir={upper},workdir={wd},"
                 f"uidmapping={ext},gidmapping={ext},allow_other", mnt], mnt, "fuse-overlayfs"))
            # writes land in the upperdir: clean up through the mount
            fss["fuse-overlayfs"] = dict(path=mnt, uid=USER_UPPER, pid=pid, clean_via_mount=True)
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
            idmapped_mount = _helper("shiftfs_bench_kernel_idmap",
                                     "tests/oracle/kernel_idmap.py").idmapped_mount
            ext = [(0, OFFSET, 65536)]
            stack.enter_context(idmapped_mount(lower, mnt, ext, ext))
            fss["kernel"] = dict(path=mnt, uid=USER_UPPER, pid=None)
        except Exception as e:  # noqa: BLE001 - report and go on without it
            notes.append(f"kernel idmapped mount skipped: {e}")
    global REV_AT_MOUNT
    REV_AT_MOUNT = revision() + " (at mount time)"
    for name, fs in fss.items():
        st = os.stat(fs["path"])
        fs["dev"] = st.st_dev
        bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        fs["read_ahead_kb"] = open(bdi).read().strip() if name in FUSE_FS and os.path.exists(bdi) else ""
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


MMAP_SCRIPT = r"""
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
t = time.perf_counter()
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
m.madvise(mmap.MADV_SEQUENTIAL)
total = 0
for off in range(0, len(m), 4096):  # one byte a page: the faults are the cost
    total += m[off]
m.close()
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

    def big_mmap(fs):
        return inner_timed([sys.executable, "-c", MMAP_SCRIPT, os.path.join(fs["path"], "big")])

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

    def wpath(fs, name):
        """Where a written file is removed from: the lower, or through the
        mount for fuse-overlayfs (its writes are in the upperdir)."""
        return os.path.join(fs["path"] if fs.get("clean_via_mount") else lower, "w", name)

    def dd_clean(fs):
        os.unlink(wpath(fs, state["dd"]))
        os.sync()

    def creates(fs):
        name = uniq("c")
        state["c"] = name
        return inner_timed(["setpriv", f"--reuid={fs['uid']}", f"--regid={fs['uid']}", "--clear-groups",
                            "--", sys.executable, "-c", CREATE_SCRIPT,
                            os.path.join(fs["path"], "w", name), str(p["creates"])])

    def rm_lower(key):
        def clean(fs):
            sh(["rm", "-rf", wpath(fs, state[key])])
            os.sync()
        return clean

    def untar(fs):
        name = uniq("u")
        state["u"] = name
        d = shlex.quote(os.path.join(fs["path"], "w", name))
        return timed(as_user(fs["uid"], f"mkdir {d} && tar xf {shlex.quote(small)} -C {d}"))

    nothing = lambda fs: None  # noqa: E731
    # the goals of issue 13 ("Benchmark and goals"); with FUSE passthrough
    # (Linux 6.9+, negotiated by shiftfs itself) the data rows have issue
    # 10's goals against native
    passthrough = tuple(int(x) for x in platform.release().split(".")[:2]) >= (6, 9)
    return [
        # row, prep, run, cleanup, goal (ratio, against)
        ("find -ls cold", lambda fs: drop_caches(), find, nothing, (1.5, "native")),
        ("find -ls warm", find, find, nothing, (1.5, "native")),
        ("du -s warm", du, du, nothing, (1.5, "native")),
        ("tar cf - | cat cold", lambda fs: drop_caches(), tar, nothing, (0.8, "bindfs")),
        ("tar cf - | cat warm", tar, tar, nothing, None),
        ("stat every path warm", nothing, stat, nothing, (1.5, "native")),
        (f"read {p['big_mib']} MiB, lower cached", big_prep, big_read, nothing,
         (1.2, "native") if passthrough else (0.5, "bindfs")),
        (f"mmap-read {p['big_mib']} MiB, lower cached", big_prep, big_mmap, nothing,
         (1.2, "native") if passthrough else None),
        (f"re-read {p['big_mib']} MiB", big_read, big_read, nothing, (1.1, "native")),
        (f"dd write {p['write_mib']} MiB (user)", nothing, dd_write, dd_clean,
         (1.5, "native") if passthrough else (0.3, "bindfs")),
        (f"create+write {p['creates']} x 4 KiB (user)", nothing, creates, rm_lower("c"), (0.8, "bindfs")),
        ("untar small tree (user)", nothing, untar, rm_lower("u"), (0.8, "bindfs")),
    ]


# ---- daemon CPU per request, RSS -------------------------------------------------

# the tests count requests the same way
RequestCounter = _helper("shiftfs_bench_fuse_requests", "tests/fuse_requests.py").RequestCounter


def family(pid: int) -> list[int]:
    """The daemon and its children: a shiftfs mount is served by its
    supervisor and the server it forked; both count."""
    out = [pid]
    for entry in os.listdir("/proc"):  # (no /proc/PID/task/TID/children on every kernel)
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out += family(int(entry))
    return out


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in family(pid):
        fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def nfds(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in family(pid))


def nreq(counts) -> int:
    return sum(v for k, v in counts.items() if k.startswith("FUSE_"))


def rss_kib(pid: int) -> int:
    total = 0
    for p in family(pid):
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def settle(pid: int, timeout=5.0) -> None:
    """Wait until the daemon's fd count stops changing (FORGETs after a
    drop_caches are answered asynchronously)."""
    last, t_end = nfds(pid), time.monotonic() + timeout
    while time.monotonic() < t_end:
        time.sleep(0.2)
        n = nfds(pid)
        if n == last:
            return
        last = n


def daemon_stats(fss: dict, work: str, counter: RequestCounter | None):
    rows = []
    for name in FUSE_FS:
        fs = fss.get(name)
        if not fs:
            continue
        pid, path = fs["pid"], shlex.quote(fs["path"])
        walk = f"find {path} -ls >/dev/null && tar cf - --numeric-owner -C {path} . | cat >/dev/null"
        drop_caches()
        settle(pid)
        mem0 = (rss_kib(pid), nfds(pid))
        cpu0 = cpu_seconds(pid)
        if counter:
            counter.start(fs["dev"])
        sh(walk, stdout=subprocess.DEVNULL)
        counts = counter.stop() if counter else collections.Counter()
        cpu = cpu_seconds(pid) - cpu0
        mem1 = (rss_kib(pid), nfds(pid))
        for _ in range(2):
            drop_caches()
            sh(walk, stdout=subprocess.DEVNULL)
        mem3 = (rss_kib(pid), nfds(pid))
        drop_caches()
        settle(pid)
        mem4 = (rss_kib(pid), nfds(pid))
        n = nreq(counts)
        rows.append(dict(fs=name, cpu_s=cpu, requests=n, us_per_req=(cpu / n * 1e6) if n else None,
                         mem=[mem0, mem1, mem3, mem4], ops=counts))
    return rows


def request_counts(fss: dict, workloads, counter: RequestCounter) -> dict:
    """One untimed run of each workload on each FUSE mount, requests counted
    by opcode, and the daemon's CPU over it."""
    out = {}
    for row, prep, run, clean, _goal in workloads:
        for name in FUSE_FS:
            fs = fss.get(name)
            if not fs:
                continue
            prep(fs)
            cpu0 = cpu_seconds(fs["pid"])
            counter.start(fs["dev"])
            dt = run(fs)
            counts = counter.stop()
            cpu = cpu_seconds(fs["pid"]) - cpu0
            clean(fs)
            out[(row, name)] = dict(ops=counts, cpu_s=cpu, secs=dt)
            log(f"{row:40s} counted  {name:14s} {nreq(counts):8d} requests")
    return out


def syscall_counts(fss: dict, workloads, counter: RequestCounter, notes: list) -> dict:
    """One more run of the create+write workload on each FUSE mount with its
    daemon under ``strace -f -y`` (every thread; the trace goes to /dev/shm,
    not to a measured filesystem) and its requests counted: syscalls by
    name, and those on /dev/fuse (reading requests, writing replies and
    notifications) told apart by the fd strace names."""
    import shutil
    if not shutil.which("strace"):
        notes.append("strace not installed: no syscall counts")
        return {}
    rows = [w for w in workloads if w[0].startswith("create+write")]
    out = {}
    for row, prep, run, clean, _goal in rows:
        for name in FUSE_FS:
            fs = fss.get(name)
            if not fs:
                continue
            trace = f"/dev/shm/shiftfs-bench-strace-{os.getpid()}-{name}"
            prep(fs)
            tracer = subprocess.Popen(["strace", "-f", "-qq", "-y", "-o", trace, "-p", str(fs["pid"])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached to every thread
            counter.start(fs["dev"])
            run(fs)
            counts = counter.stop()
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=60)
            clean(fs)
            calls, fuse_io = collections.Counter(), 0
            with open(trace, errors="replace") as f:
                for line in f:
                    parts = line.split(None, 1)
                    if len(parts) < 2 or "(" not in parts[1] or parts[1].startswith(("+++", "---", "<...")):
                        continue
                    call, _, args = parts[1].partition("(")
                    calls[call] += 1
                    if "</dev/fuse>" in args.split(",", 1)[0]:
                        fuse_io += 1
            os.unlink(trace)
            n = nreq(counts)
            out[(row, name)] = dict(requests=n, calls=calls, fuse_io=fuse_io)
            log(f"{row:40s} strace   {name:14s} {sum(calls.values())} syscalls, {n} requests")
    return out


def acl_probe(fss: dict, counter: RequestCounter, n=1000) -> dict:
    """Where the GETXATTRs of a warm walk come from: n lstat()s of one file
    t00/d00/f000, by an absolute path (through the mount root), and relative
    to a cwd of t00 and of t00/d00 inside the mount. The tracepoint names no
    node, so the differences attribute the requests to path components."""
    out = {}
    here = os.getcwd()
    for name in FUSE_FS:
        fs = fss.get(name)
        if not fs:
            continue
        res = {}
        for label, cwd, rel in (("absolute", None, os.path.join(fs["path"], "t00", "d00", "f000")),
                                ("from t00", os.path.join(fs["path"], "t00"), "d00/f000"),
                                ("from t00/d00", os.path.join(fs["path"], "t00", "d00"), "f000")):
            try:
                if cwd:
                    os.chdir(cwd)
                os.lstat(rel)
                counter.start(fs["dev"])
                for _ in range(n):
                    os.lstat(rel)
                res[label] = counter.stop()
            finally:
                os.chdir(here)
        out[name] = res
        log(f"acl probe {name:14s} " + ", ".join(f"{k}: {nreq(c)} requests" for k, c in res.items()))
    return out


# ---- coherence: a change made directly on the lower, seen through the mount --

def _poll(check, timeout=5.0):
    t0 = time.perf_counter()
    while True:
        if check():
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            return None
        time.sleep(0.001)


def _exists(path):
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False


def coherence(fss: dict, work: str) -> dict:
    lower = os.path.join(work, "lower", "coh")
    out = {}
    for name in FUSE_FS + ("kernel",):
        fs = fss.get(name)
        if not fs:
            continue
        up = os.path.join(fs["path"], "coh")
        lo = lambda n: os.path.join(lower, f"{name}-{n}")      # noqa: E731
        mp = lambda n: os.path.join(up, f"{name}-{n}")         # noqa: E731
        res = {}
        # chmod
        with open(lo("a"), "w"):
            pass
        os.chmod(lo("a"), 0o644)
        _poll(lambda: _exists(mp("a")))
        os.lstat(mp("a"))
        os.chmod(lo("a"), 0o600)
        res["chmod"] = _poll(lambda: (os.lstat(mp("a")).st_mode & 0o777) == 0o600)
        # a new file, after its name was looked up (negative entry)
        _exists(mp("new"))
        os.listdir(up)
        with open(lo("new"), "w"):
            pass
        res["new file"] = _poll(lambda: _exists(mp("new")))
        # a removal
        with open(lo("gone"), "w"):
            pass
        _poll(lambda: _exists(mp("gone")))
        os.unlink(lo("gone"))
        res["removal"] = _poll(lambda: not _exists(mp("gone")))
        # a rename
        with open(lo("from"), "w"):
            pass
        _poll(lambda: _exists(mp("from")))
        _exists(mp("to"))
        os.rename(lo("from"), lo("to"))
        res["rename"] = _poll(lambda: _exists(mp("to")) and not _exists(mp("from")))
        out[name] = res
        log(f"coherence {name:14s} " + ", ".join(
            f"{k} {'>5 s' if v is None else f'{v * 1000:.0f} ms'}" for k, v in res.items()))
    return out


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


REV_AT_MOUNT = ""   # the shiftfs revision the daemon was started from


def versions() -> str:
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    from shiftfs import libfuse as sfuse
    rev = REV_AT_MOUNT or revision()
    ovl = first_line(["sh", "-c", "fuse-overlayfs --version 2>&1 | grep -i 'fuse-overlayfs'"])
    return (f"{first_line(['bindfs', '--version'])}; {ovl}; libfuse {sfuse.LIBFUSE_VERSION[0]}."
            f"{sfuse.LIBFUSE_VERSION[1]} ({os.path.basename(sfuse.LIBFUSE_PATH)}); "
            f"Python {platform.python_version()}; shiftfs {rev}")


def fmt_ops(counts, skip=()) -> str:
    return ", ".join(f"{k.replace('FUSE_', '')} {v}" for k, v in counts.most_common()
                     if k.startswith("FUSE_") and k not in skip) or "–"


def fmt_xattr(counts) -> str:
    n = counts.get("FUSE_GETXATTR", 0)
    if not n:
        return "0"
    parts = [f"{k[6:]} {v}" for k, v in counts.most_common() if k.startswith("xattr:")]
    return f"{n} ({', '.join(parts)})"


WALKS = ("find", "du", "tar", "stat")  # rows whose daemon CPU is reported per path walked


def report(results, workloads, fss, dstats, rcounts, coh, aprobe, notes, args, p, elapsed,
           cpu=None, sysc=None) -> str:
    present = [n for n in FSNAMES if n in fss]
    nfiles = p["top"] * p["sub"] * p["files"]
    npaths = sum(1 for _ in open(os.path.join(args.work, "paths.txt"))) + 1   # + the root
    out = [f"## shiftfs benchmark, {datetime.date.today().isoformat()}", "",
           f"- machine: {machine()}",
           f"- versions: {versions()}",
           f"- command: `{' '.join(['python3', 'bench/run.py'] + sys.argv[1:])}`",
           f"- tree: {nfiles} small files (0–8 KiB) in {p['top'] * (p['sub'] + 1)} directories "
           f"({npaths} paths with the root), "
           f"owners varied ({'all mapped' if p.get('all_mapped') else 'one in twelve unmapped'}), one {p['big_mib']} MiB file; "
           f"{args.rounds} round(s), workloads interleaved across filesystems, medians; "
           f"run took {elapsed / 60:.1f} min",
           f"- filesystem: {getattr(args, 'where', '?')}",
           "- mounts: bindfs `--uid-offset=100000 --gid-offset=100000` (defaults otherwise); "
           "fuse-overlayfs `-o lowerdir=TREE,upperdir=U,workdir=W,uidmapping=0:100000:65536,"
           "gidmapping=0:100000:65536,allow_other` (U, W empty at start; writes land in U); "
           "shiftfs `--uidmap 0:100000:65536 --gidmap 0:100000:65536` (defaults"
           + (f", plus `{' '.join(args.shiftfs_args)}`" if args.shiftfs_args else "") + "); "
           "kernel = idmapped bind mount with the same map",
           "- read_ahead_kb: " + ", ".join(f"{n} {fss[n]['read_ahead_kb']}" for n in FUSE_FS
                                         if n in fss and fss[n]['read_ahead_kb']),
           ""]
    others = [n for n in ("native", "bindfs", "fuse-overlayfs") if n in present]
    head = (["workload"] + [SHORT.get(n, n) for n in present]
            + [f"shiftfs ÷ {SHORT.get(n, n)}" for n in others] + ["kernel ÷ native", "goal", "met"])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    verdicts = []
    for row, _prep, _run, _clean, goal in workloads:
        med = {n: statistics.median(results[row][n]) if results[row].get(n) else None for n in present}
        s, k, nat = med.get("shiftfs"), med.get("kernel"), med.get("native")
        ratios = {n: (s / med[n] if s and med.get(n) else None) for n in others}
        rk = k / nat if k and nat else None
        if goal:
            limit, against = goal
            val = ratios.get(against)
            tgt = f"≤ {limit} × {against}"
            met = "–" if val is None else ("yes" if val <= limit else "**no**")
            if val is not None:
                verdicts.append((row, tgt, val, val <= limit))
        else:
            tgt, met = "–", "–"
        out.append("| " + " | ".join([row] + [fmt_t(med[n]) for n in present]
                                     + [fmt_r(ratios[n]) for n in others] + [fmt_r(rk), tgt, met]) + " |")
    def walked(row):   # the stat script stats every path twice (warm-up + timed), both counted
        return npaths * (2 if row.startswith("stat every path") else 1)
    fuse_present = [n for n in FUSE_FS if n in fss]
    if cpu and any(cpu[row].get("shiftfs") for row in cpu):
        out += ["", "Daemon CPU in the timed runs (the daemon's user+system time, /proc/PID/stat, "
                "medians over the rounds): per path walked for the walks (per path: readdirplus "
                "answers many paths in one request), per request for the rest (requests from the "
                "counted run below):", "",
                "| workload | per | " + " | ".join(SHORT.get(n, n) for n in fuse_present)
                + " | " + " | ".join(f"shiftfs ÷ {SHORT.get(n, n)}" for n in fuse_present if n != "shiftfs")
                + " |", "|---|---|" + "---|" * (2 * len(fuse_present) - 1)]
        for row, *_ in workloads:
            per_path = row.startswith(WALKS)
            vals = {}
            for name in fuse_present:
                xs = cpu[row].get(name)
                if not xs:
                    continue
                if per_path:
                    vals[name] = statistics.median(xs) / walked(row) * 1e6
                else:
                    c = (rcounts or {}).get((row, name))
                    n = nreq(c["ops"]) if c else 0
                    vals[name] = statistics.median(xs) / n * 1e6 if n else None
            s_ = vals.get("shiftfs")
            cells = [f"{vals[n]:.1f} µs" if vals.get(n) is not None else "–" for n in fuse_present]
            ratios = [fmt_r(s_ / vals[n] if s_ and vals.get(n) else None)
                      for n in fuse_present if n != "shiftfs"]
            out.append(f"| {row} | {'path' if per_path else 'request'} | " + " | ".join(cells + ratios) + " |")
            # issue 18's goals: per path on the cold walk, per request on create+write
            if s_ and vals.get("bindfs") and (row == "find -ls cold" or row.startswith("create+write")):
                limit = 1.0 if per_path else 1.5
                verdicts.append((f"daemon CPU per {'path' if per_path else 'request'}, {row}",
                                 f"≤ {limit} × bindfs", s_ / vals["bindfs"], s_ / vals["bindfs"] <= limit))
    if sysc:
        out += ["", "Syscalls per request on create+write (one more run, the daemon under `strace -f -y`, "
                "every thread; /dev/fuse I/O = reading requests and writing replies and notifications, "
                "told apart by the fd; futex = waits and wake-ups between threads):", "",
                "| daemon | requests | syscalls / request | /dev/fuse I/O | futex | besides /dev/fuse I/O "
                "| besides /dev/fuse I/O and futex | the others, per request |",
                "|---|---|---|---|---|---|---|---|"]
        for (row, name), c in sysc.items():
            n = c["requests"] or 1
            total = sum(c["calls"].values())
            futex = c["calls"].get("futex", 0)
            rest = collections.Counter(c["calls"])
            rest.pop("futex", None)
            top = ", ".join(f"{k} {v / n:.2f}" for k, v in rest.most_common(12))
            out.append(f"| {name} | {c['requests']} | {total / n:.2f} | {c['fuse_io'] / n:.2f} | "
                       f"{futex / n:.2f} | {(total - c['fuse_io']) / n:.2f} | "
                       f"{(total - c['fuse_io'] - futex) / n:.2f} | {top} |")
            if name == "shiftfs":
                v = (total - c["fuse_io"]) / n
                verdicts.append(("syscalls per request on create besides /dev/fuse I/O", "≤ 4", v, v <= 4))
    if dstats:
        out += ["", "Daemon cost over a cold walk (`find -ls` + `tar cf - | cat` of the whole tree, after "
                "drop_caches); requests counted with the `fuse:fuse_request_send` tracepoint. Inode-table "
                "figures: the daemon's RSS and open fds (/proc/PID/fd) before, after that walk, after two "
                "more (each after drop_caches), and after a final drop_caches (the kernel FORGETs what it "
                "evicts):", "",
                "| daemon | requests | CPU | µs / request | RSS: before / 1 walk / 3 walks / dropped | "
                "fds: before / 1 walk / 3 walks / dropped | requests by opcode |",
                "|---|---|---|---|---|---|---|"]
        for d in dstats:
            us = f"{d['us_per_req']:.1f}" if d["us_per_req"] else "–"
            rss = " / ".join(f"{m[0] / 1024:.1f}" for m in d["mem"]) + " MiB"
            fds = " / ".join(str(m[1]) for m in d["mem"])
            out.append(f"| {d['fs']} | {d['requests']} | {d['cpu_s']:.2f} s | {us} | {rss} | {fds} | "
                       f"{fmt_ops(d['ops'])} |")
        by = {d["fs"]: d for d in dstats}
        if by.get("shiftfs", {}).get("us_per_req") and by.get("bindfs", {}).get("us_per_req"):
            r = by["shiftfs"]["us_per_req"] / by["bindfs"]["us_per_req"]
            out += ["", f"Goal: daemon CPU per request ≤ 1.5 × bindfs's: shiftfs ÷ bindfs = {r:.2f} "
                    f"({'met' if r <= 1.5 else '**missed**'})."]
            verdicts.append(("daemon CPU per request (cold walk)", "≤ 1.5 × bindfs", r, r <= 1.5))
    if rcounts:
        out += ["", "Requests per workload (one extra, untimed run of each workload on each FUSE mount, "
                "after the same prep as the timed runs; `fuse:fuse_request_send` counts by opcode; "
                "GETXATTR split by attribute name, told apart by request length; per path = requests ÷ "
                f"the {npaths} paths of the tree, for the whole-tree warm workloads (2 × that for "
                "`stat every path`, whose script stats every path twice, warm-up and timed, both counted); CPU = the daemon's "
                "user+system time over the run):", "",
                "| workload | daemon | requests | per path | GETXATTR | daemon CPU | µs / request | "
                "requests by opcode |", "|---|---|---|---|---|---|---|---|"]
        for row, *_ in workloads:
            for name in FUSE_FS:
                c = rcounts.get((row, name))
                if not c:
                    continue
                n = nreq(c["ops"])
                per = f"{n / walked(row):.3f}" if row.endswith("warm") else "–"
                if c["ops"].get("LOST"):
                    notes.append(f"{row} on {name}: {c['ops']['LOST']} trace events lost")
                us = f"{c['cpu_s'] / n * 1e6:.1f}" if n else "–"
                out.append(f"| {row} | {name} | {n} | {per} | {fmt_xattr(c['ops'])} | {c['cpu_s']:.2f} s | "
                           f"{us} | {fmt_ops(c['ops'], skip=('FUSE_GETXATTR',))} |")
        warm = [w[0] for w in workloads if w[0].endswith("warm")]
        sw = [(r, nreq(rcounts[(r, "shiftfs")]["ops"]), rcounts[(r, "shiftfs")]["ops"])
              for r in warm if (r, "shiftfs") in rcounts]
        if sw:
            out += ["", "Goal: warm walk requests ≤ 2 % of the paths walked, 0 GETXATTR of the root "
                    "(shiftfs): " + "; ".join(
                        f"{r}: {n} requests = {100 * n / walked(r):.1f} % of {walked(r)} paths walked "
                        f"({'met' if n <= 0.02 * walked(r) else '**missed**'}), GETXATTR "
                        f"{c.get('xattr:system.posix_acl_access', 0)} posix_acl_access"
                        for r, n, c in sw) + "."]
            for r, n, c in sw:
                verdicts.append((f"{r}: requests per path", "≤ 0.02", n / walked(r), n <= 0.02 * walked(r)))
    if aprobe:
        out += ["", "Where warm-walk GETXATTRs come from: 1000 warm `lstat()`s of t00/d00/f000 by an "
                "absolute path (through the mount root) and relative to a cwd inside the mount; requests "
                "over the 1000 calls:", "",
                "| daemon | absolute | from cwd t00 | from cwd t00/d00 |", "|---|---|---|---|"]
        for name, res in aprobe.items():
            out.append(f"| {name} | " + " | ".join(
                f"{nreq(c)}: {fmt_ops(c) if nreq(c) else '–'}" + (
                    f" ({', '.join(f'{k[6:]} {v}' for k, v in c.items() if k.startswith('xattr:'))})"
                    if c.get("FUSE_GETXATTR") else "")
                for c in res.values()) + " |")
    if coh:
        kinds = ["chmod", "new file", "removal", "rename"]
        out += ["", "Coherence: a change made directly on the lower, polled through the mount every ms "
                "until visible (up to 5 s; the name or file was looked up through the mount first). "
                "fuse-overlayfs does not support changes to its lowerdir behind its back:", "",
                "| mount | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for name, res in coh.items():
            out.append(f"| {name} | " + " | ".join(
                "> 5 s" if res.get(k) is None else f"{res[k] * 1000:.0f} ms" for k in kinds) + " |")
    if verdicts:
        out += ["", "Goals (issue 13; the data rows issue 10's where passthrough is on): met " + ", ".join(f"{r} ({v:.2f})" for r, _t, v, ok in verdicts if ok)
                + "; missed " + (", ".join(f"{r} ({v:.2f}, goal {t})" for r, t, v, ok in verdicts if not ok)
                                 or "none") + "."]
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
    p = dict(QUICK if args.quick else FULL)
    if args.all_mapped:
        p["all_mapped"] = True
    args.rounds = args.rounds or (1 if args.quick else 3)
    work = args.workdir or ("/tmp/shiftfs-bench-quick" if args.quick else "/tmp/shiftfs-bench") \
        + ("-loop" if args.loop else "") + ("-mapped" if args.all_mapped else "")
    args.work = work
    with contextlib.ExitStack() as outer:
        if args.loop:
            outer.enter_context(loop_fs(work, args.loop))
        else:
            os.makedirs(work, exist_ok=True)
        if args.rebuild and os.path.exists(os.path.join(work, "stamp.json")):
            os.unlink(os.path.join(work, "stamp.json"))
        build_tree(work, p)
        args.where = where(work) + (f", a private loop image of {args.loop} made by the run"
                                    if args.loop else "")
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        t_start = time.monotonic()
        workloads = make_workloads(work, p)
        if args.only:
            keys = [k.strip() for k in args.only.split(",")]
            workloads = [w for w in workloads if any(k in w[0] for k in keys)]
        results = {w[0]: collections.defaultdict(list) for w in workloads}
        cpu = {w[0]: collections.defaultdict(list) for w in workloads}
        with contextlib.ExitStack() as stack:
            fss, notes = mount_all(stack, work, args.shiftfs_args, set(filter(None, args.skip.split(","))))
            order = [n for n in FSNAMES if n in fss]
            for row, prep, run, clean, _t in workloads:
                for r in range(args.rounds):
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
            dstats, rcounts, coh, aprobe, sysc = [], {}, {}, {}, {}
            if not args.no_daemon_stats:
                counter = None
                try:
                    counter = RequestCounter()
                except (OSError, RuntimeError) as e:
                    notes.append(f"request counting unavailable ({e}); CPU per request not computed")
                try:
                    if counter:
                        rcounts = request_counts(fss, workloads, counter)
                        aprobe = acl_probe(fss, counter)
                        if args.strace:
                            sysc = syscall_counts(fss, workloads, counter, notes)
                    dstats = daemon_stats(fss, work, counter)
                finally:
                    if counter:
                        counter.close()
                coh = coherence(fss, work)
        text = report(results, workloads, fss, dstats, rcounts, coh, aprobe, notes, args, p,
                      time.monotonic() - t_start, cpu, sysc)
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
