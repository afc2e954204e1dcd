"""What a rootless shiftfs needs around it in a test: a mount namespace of
its own in which uid RUSER may use /dev/fuse (0666), /etc/fuse.conf says
user_allow_other (shiftfs mounts allow_other), the user has a name
(fusermount3 wants one; CI's Debian root has no uid 1000), and the
interpreter is reachable (it may live under a 0700 /root). PROLOGUE is
the shell that sets this up; each test's script goes on from there with
its own files and the exec of shiftfs; ``daemon`` runs such a script and
waits for the mount, and ``mount_as_user`` is the plain case (the standard
table, no /etc/subuid)."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import shiftfs

from tests.daemon import running
from tests.tables import STD, args

RUSER = 1000
CODE = os.path.dirname(os.path.dirname(os.path.abspath(shiftfs.__file__)))
RNAME_FALLBACK = "shiftfs-rootless"

PROLOGUE = r"""
set -e
mount --make-rprivate /
mount -t tmpfs -o mode=755,size=1m shiftfs-rootless "$SCRATCH"
if [ "$(stat -c %a /dev/fuse)" != 666 ]; then   # Debian makes it 0666; this machine 0600
    mknod "$SCRATCH/fuse" c 10 229; chmod 666 "$SCRATCH/fuse"; mount --bind "$SCRATCH/fuse" /dev/fuse
fi
echo user_allow_other > "$SCRATCH/fuse.conf"    # shiftfs mounts allow_other
mount --bind "$SCRATCH/fuse.conf" /etc/fuse.conf
if ! getent passwd "$RUSER" >/dev/null; then     # fusermount3 wants the user's name
    cp /etc/passwd "$SCRATCH/passwd"; echo "$RNAME:x:$RUSER:$RUSER::/:/bin/false" >> "$SCRATCH/passwd"
    mount --bind "$SCRATCH/passwd" /etc/passwd
fi
if [ -n "$BLOCKED" ]; then                       # an interpreter under a 0700 /root
    mkdir "$SCRATCH/stash"; mount --bind "$KEEP" "$SCRATCH/stash"
    mount -t tmpfs -o mode=755,size=1m shiftfs-rootless "$BLOCKED"
    mkdir -p "$KEEP"; mount --move "$SCRATCH/stash" "$KEEP"
fi
"""


def user_name(uid: int = RUSER) -> str:
    """The user's name, or the one PROLOGUE gives it where it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return RNAME_FALLBACK


def blocked_prefix():
    """(the first ancestor of the interpreter's tree others cannot search,
    the child of it that holds the tree), or ("", "")."""
    parts = os.path.realpath(sys.prefix).split("/")
    for i in range(2, len(parts) + 1):
        if not os.stat("/".join(parts[:i])).st_mode & 0o001:
            return "/".join(parts[:i]), "/".join(parts[:i + 1])
    return "", ""


def environment(scratch, uid: int = RUSER) -> dict:
    """The variables PROLOGUE reads."""
    blocked, keep = blocked_prefix()
    return dict(SCRATCH=str(scratch), BLOCKED=blocked, KEEP=keep, RUSER=str(uid),
                RNAME=user_name(uid), PATH="/usr/sbin:/usr/bin:/sbin:/bin")


def mount_points(pid: int) -> list[str]:
    """The mount points in the mount namespace of ``pid`` (none once it is gone)."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return [line.split()[4] for line in f]
    except OSError:
        return []


@contextlib.contextmanager
def daemon(lower: Path, workdir: Path, script: str, *words: str,
           **env: str) -> Iterator[tuple[subprocess.Popen, Path, Path]]:
    """``script`` (PROLOGUE, then the exec of shiftfs as RUSER with the words
    ``"$@"``) in ``unshare -m``, mounting ``lower`` at workdir/rootless-mnt;
    ``env`` adds variables to the ones PROLOGUE reads (and CODE, PYTHON,
    LOWER, MNT). Yields (the process, the mount point, its log) once the
    mount shows in the namespace; the daemon is always stopped (SIGTERM:
    it unmounts through fusermount3; the mount would go with the namespace
    anyway)."""
    mnt = workdir / "rootless-mnt"
    scratch = workdir / "rootless-scratch"
    mnt.mkdir()
    scratch.mkdir()
    os.chown(mnt, RUSER, RUSER)
    env = dict(environment(scratch, RUSER), CODE=CODE, PYTHON=os.path.realpath(sys.executable),
               LOWER=str(lower), MNT=str(mnt), **env)
    log = workdir / "rootless.log"
    with running(["unshare", "-m", "sh", "-c", script, "setup", *words], mnt, log=log, env=env,
                 mounted=lambda proc: str(mnt) in mount_points(proc.pid), by_signal=True,
                 what="rootless shiftfs") as proc:
        yield proc, mnt, log


_MOUNT = PROLOGUE + r"""
exec setpriv --reuid=$RUSER --regid=$RUSER --clear-groups -- env -i PATH=/usr/bin:/bin \
    PYTHONPATH="$CODE" HOME=/ "$PYTHON" -m shiftfs -f -q "$@" "$LOWER" "$MNT"
"""


@contextlib.contextmanager
def mount_as_user(lower: Path, workdir: Path, *extra: str) -> Iterator[tuple[int, Path, Path]]:
    """shiftfs run by uid RUSER with the standard table (and ``extra``
    words) and mounted through fusermount3, in a mount namespace of its
    own. Yields (daemon pid, the mount as this process reaches it:
    /proc/PID/root/..., its log)."""
    with daemon(lower, workdir, _MOUNT, *args(STD), *extra) as (proc, mnt, log):
        yield proc.pid, Path(f"/proc/{proc.pid}/root{mnt}"), log
