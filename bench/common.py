"""What the modules of bench.run share: the checkout, the mapped user,
the filesystems compared, and small shell helpers."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.tables import STD, upper_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout

USER_LOWER = 1000                # the mapped user, as stored
USER_UPPER = upper_of(USER_LOWER, STD)  # ... and as seen through the shifting mounts
FSNAMES = ("native", "bindfs", "fuse-overlayfs", "shiftfs", "kernel")
FUSE_FS = ("bindfs", "fuse-overlayfs", "shiftfs")
SHORT = {"fuse-overlayfs": "fuse-ovl"}   # column heads


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
