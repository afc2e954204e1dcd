"""What the benchmark measures besides time: each FUSE daemon's CPU, RSS
and fds (a shiftfs mount is served by its supervisor and the server it
forked: tests/procs.py's family), the requests each workload sends
(tests/fuse_requests.py, the tracepoint the tests count with), the
syscalls per request (strace), where warm-walk GETXATTRs come from, and
how soon a change made on the lower shows through each mount."""

from __future__ import annotations

import collections
import os
import shlex
import shutil
import signal
import subprocess
import time

from bench.common import FUSE_FS, drop_caches, log, sh
from tests.daemon import seen_within
from tests.fuse_requests import RequestCounter
from tests.procs import cpu_seconds as _cpu, family


def cpu_seconds(pid: int) -> float:
    return _cpu(*family(pid))


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


def _cold_walk(fs: dict, counter: RequestCounter | None) -> dict:
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
    return dict(cpu_s=cpu, requests=n, us_per_req=(cpu / n * 1e6) if n else None,
                mem=[mem0, mem1, mem3, mem4], ops=counts)


def daemon_stats(fss: dict, work: str, counter: RequestCounter | None):
    """Each FUSE daemon over a cold walk: CPU, requests, RSS and fds."""
    return [dict(fs=name, **_cold_walk(fss[name], counter)) for name in FUSE_FS if fss.get(name)]


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


def _strace_counts(trace: str) -> tuple[collections.Counter, int]:
    """Syscalls by name in an ``strace -f -y`` log, and how many were on
    /dev/fuse (told apart by the fd strace names)."""
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
    return calls, fuse_io


def _straced_run(fs: dict, name: str, prep, run, clean, counter: RequestCounter) -> dict:
    trace = f"/dev/shm/shiftfs-bench-strace-{os.getpid()}-{name}"
    prep(fs)
    # every process of the daemon: shiftfs's supervisor and the server it
    # forked (-f follows only forks made after attaching)
    procs = [w for pid in family(fs["pid"]) for w in ("-p", str(pid))]
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-y", "-o", trace, *procs],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached to every thread
    counter.start(fs["dev"])
    run(fs)
    counts = counter.stop()
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=60)
    clean(fs)
    calls, fuse_io = _strace_counts(trace)
    os.unlink(trace)
    return dict(requests=nreq(counts), calls=calls, fuse_io=fuse_io)


def syscall_counts(fss: dict, workloads, counter: RequestCounter, notes: list) -> dict:
    """One more run of the create+write workload on each FUSE mount with its
    daemon under ``strace -f -y`` (every thread; the trace goes to /dev/shm,
    not to a measured filesystem) and its requests counted: syscalls by
    name, and those on /dev/fuse (reading requests, writing replies and
    notifications) told apart by the fd strace names."""
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
            c = out[(row, name)] = _straced_run(fs, name, prep, run, clean, counter)
            log(f"{row:40s} strace   {name:14s} {sum(c['calls'].values())} syscalls, "
                f"{c['requests']} requests")
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
    return seen_within(check, timeout, every=0.001)  # polled every ms, as results.md says


def _exists(path):
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False


def _touch(path):
    with open(path, "w"):
        pass


def _changes(lo, mp, up) -> dict:
    """How long each kind of change on the lower (``lo(name)``) takes to show
    at ``mp(name)``, the name or file looked up through the mount first."""
    res = {}
    _touch(lo("a"))  # chmod
    os.chmod(lo("a"), 0o644)
    _poll(lambda: _exists(mp("a")))
    os.lstat(mp("a"))
    os.chmod(lo("a"), 0o600)
    res["chmod"] = _poll(lambda: (os.lstat(mp("a")).st_mode & 0o777) == 0o600)
    _exists(mp("new"))  # a new file, after its name was looked up (negative entry)
    os.listdir(up)
    _touch(lo("new"))
    res["new file"] = _poll(lambda: _exists(mp("new")))
    _touch(lo("gone"))  # a removal
    _poll(lambda: _exists(mp("gone")))
    os.unlink(lo("gone"))
    res["removal"] = _poll(lambda: not _exists(mp("gone")))
    _touch(lo("from"))  # a rename
    _poll(lambda: _exists(mp("from")))
    _exists(mp("to"))
    os.rename(lo("from"), lo("to"))
    res["rename"] = _poll(lambda: _exists(mp("to")) and not _exists(mp("from")))
    return res


def coherence(fss: dict, work: str) -> dict:
    lower = os.path.join(work, "lower", "coh")
    out = {}
    for name in FUSE_FS + ("kernel",):
        fs = fss.get(name)
        if not fs:
            continue
        up = os.path.join(fs["path"], "coh")
        res = out[name] = _changes(lambda n: os.path.join(lower, f"{name}-{n}"),
                                   lambda n: os.path.join(up, f"{name}-{n}"), up)
        log(f"coherence {name:14s} " + ", ".join(
            f"{k} {'>5 s' if v is None else f'{v * 1000:.0f} ms'}" for k, v in res.items()))
    return out
