"""The workloads, each a row of the report: (row name, prep(fs), run(fs) ->
seconds, cleanup(fs), goal (ratio, against) or None). ``fs`` is one
filesystem of bench.peers.mount_all."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time

from bench.common import as_user, drop_caches, sh


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


def nothing(fs) -> None:
    pass


def cold(fs) -> None:
    drop_caches()


class Runs:
    """The preps, runs and cleanups of the workloads on the tree in ``work``;
    what a run wrote is remembered for its cleanup."""

    def __init__(self, work: str, p: dict) -> None:
        self.lower = os.path.join(work, "lower")
        self.paths = os.path.join(work, "paths.txt")
        self.small = os.path.join(work, "small.tar")
        self.p = p
        self.seq = 0
        self.state = {}

    def uniq(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{os.getpid()}_{self.seq}"

    def find(self, fs):
        return timed(f"find {shlex.quote(fs['path'])} -ls >/dev/null")

    def du(self, fs):
        return timed(["du", "-s", fs["path"]])

    def tar(self, fs):
        return timed(f"tar cf - --numeric-owner -C {shlex.quote(fs['path'])} . | cat >/dev/null")

    def stat(self, fs):
        return inner_timed([sys.executable, "-c", STAT_SCRIPT, fs["path"], self.paths])

    def big_read(self, fs):
        return timed(["dd", f"if={fs['path']}/big", "of=/dev/null", "bs=1M"], stderr=subprocess.DEVNULL)

    def big_mmap(self, fs):
        return inner_timed([sys.executable, "-c", MMAP_SCRIPT, os.path.join(fs["path"], "big")])

    def big_prep(self, fs):
        timed(["cat", os.path.join(self.lower, "big")])     # lower cached
        if fs["pid"] is not None:                           # the FUSE mount's own cache dropped
            fadvise_dontneed(os.path.join(fs["path"], "big"))

    def dd_write(self, fs):
        name = self.state["dd"] = self.uniq("dd")
        cmd = (f"dd if=/dev/zero of={shlex.quote(fs['path'])}/w/{name} bs=1M "
               f"count={self.p['write_mib']} 2>/dev/null")
        return timed(as_user(fs["uid"], cmd))

    def wpath(self, fs, name):
        """Where a written file is removed from: the lower, or through the
        mount for fuse-overlayfs (its writes are in the upperdir)."""
        return os.path.join(fs["path"] if fs.get("clean_via_mount") else self.lower, "w", name)

    def dd_clean(self, fs):
        os.unlink(self.wpath(fs, self.state["dd"]))
        os.sync()

    def creates(self, fs):
        name = self.state["c"] = self.uniq("c")
        return inner_timed(["setpriv", f"--reuid={fs['uid']}", f"--regid={fs['uid']}", "--clear-groups",
                            "--", sys.executable, "-c", CREATE_SCRIPT,
                            os.path.join(fs["path"], "w", name), str(self.p["creates"])])

    def rm_lower(self, key):
        def clean(fs):
            sh(["rm", "-rf", self.wpath(fs, self.state[key])])
            os.sync()
        return clean

    def untar(self, fs):
        name = self.state["u"] = self.uniq("u")
        d = shlex.quote(os.path.join(fs["path"], "w", name))
        return timed(as_user(fs["uid"], f"mkdir {d} && tar xf {shlex.quote(self.small)} -C {d}"))


def make_workloads(work: str, p: dict):
    r = Runs(work, p)
    # the goals of issue 13 ("Benchmark and goals"); with FUSE passthrough
    # (Linux 6.9+, negotiated by shiftfs itself) the data rows have issue
    # 10's goals against native
    passthrough = tuple(int(x) for x in platform.release().split(".")[:2]) >= (6, 9)
    return [
        # row, prep, run, cleanup, goal (ratio, against)
        ("find -ls cold", cold, r.find, nothing, (1.5, "native")),
        ("find -ls warm", r.find, r.find, nothing, (1.5, "native")),
        ("du -s warm", r.du, r.du, nothing, (1.5, "native")),
        ("tar cf - | cat cold", cold, r.tar, nothing, (0.8, "bindfs")),
        ("tar cf - | cat warm", r.tar, r.tar, nothing, None),
        ("stat every path warm", nothing, r.stat, nothing, (1.5, "native")),
        (f"read {p['big_mib']} MiB, lower cached", r.big_prep, r.big_read, nothing,
         (1.2, "native") if passthrough else (0.5, "bindfs")),
        (f"mmap-read {p['big_mib']} MiB, lower cached", r.big_prep, r.big_mmap, nothing,
         (1.2, "native") if passthrough else None),
        (f"re-read {p['big_mib']} MiB", r.big_read, r.big_read, nothing, (1.1, "native")),
        (f"dd write {p['write_mib']} MiB (user)", nothing, r.dd_write, r.dd_clean,
         (1.5, "native") if passthrough else (0.3, "bindfs")),
        (f"create+write {p['creates']} x 4 KiB (user)", nothing, r.creates, r.rm_lower("c"), (0.8, "bindfs")),
        ("untar small tree (user)", nothing, r.untar, r.rm_lower("u"), (0.8, "bindfs")),
    ]
