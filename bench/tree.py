"""The lower tree the benchmark serves, built once and kept (a stamp says
with which parameters), and the private loop-mounted ext4 it may live on."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import time

from shiftfs.mount import is_mounted

from bench.common import USER_LOWER, log, sh
from tests.tables import COUNT

FULL = dict(top=20, sub=25, files=40, big_mib=1024, write_mib=512, creates=5000, tar_top=1)
QUICK = dict(top=5, sub=10, files=40, big_mib=64, write_mib=64, creates=500, tar_top=1)

# 2: files of unmapped owners are world-readable, so root can read every file
# through an idmapped mount too (root's DAC override needs a mapped owner)
TREE_VERSION = 2
OWNERS = [(0, 0)] * 6 + [(1000, 1000)] * 2 + [(1001, 100), (33, 33), (100, 65534), (70000, 70000)]
# --all-mapped: an image whose every owner is in the table (the usual case):
# no frozen inode, whose lifetime-0 attributes dominate the warm rows
MAPPED_OWNERS = [o for o in OWNERS if max(o) < COUNT]


def _small_files(lower: str, p: dict, rnd: random.Random) -> int:
    """top/sub directories of files of 0-8 KiB, owners and modes varied;
    how many files."""
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
                if uid >= COUNT:
                    os.chmod(path, mode | 0o044)
                n += 1
    return n


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
    n = _small_files(lower, p, rnd)
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


@contextlib.contextmanager
def loop_fs(work: str, size: str):
    """A private ext4 on a loop image (``WORK.img``, sparse, SIZE like 6G)
    mounted at ``work``: no other writer or watcher on the filesystem the
    mounts serve. The image (and the tree built in it) is kept for the next
    run with the same size; unmounted on the way out."""
    img = work.rstrip("/") + ".img"
    want = subprocess.run(["numfmt", "--from=iec", size.upper().removesuffix("B")],
                          capture_output=True, text=True, check=True).stdout.strip()
    if is_mounted(work, None):
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
