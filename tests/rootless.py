"""What a rootless shiftfs needs around it in a test: a mount namespace of
its own in which uid RUSER may use /dev/fuse (0666), /etc/fuse.conf says
user_allow_other (shiftfs mounts allow_other), the user has a name
(fusermount3 wants one; CI's Debian root has no uid 1000), and the
interpreter is reachable (it may live under a 0700 /root). PROLOGUE is
the shell that sets this up; each test's script goes on from there with
its own files and the exec of shiftfs."""

from __future__ import annotations

import os
import pwd
import sys

RUSER = 1000
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
