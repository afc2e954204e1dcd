"""The rootless attack surface (issue 20, item 5): a user with an
/etc/subuid range runs shiftfs itself and mounts through fusermount3
(``--subuid USER``, or a table of its own choosing). Does the mount let
that user reach anything it could not reach without shiftfs?

The daemon is the user's own process, with the user's ids and no
capability, so every lower access it makes is one the user could make
directly; what the kernel decides on the upper side (default_permissions
against the table's ids) only adds a check. The privileged parts are
fusermount3 (set-uid root) and the kernel's treatment of the mount. Each
test below is an attack through one of them:

- files the table shows as the user's own, or as ids of its range, that
  on the host belong to root or to another user: read, written, chmod'ed,
  listed through the mount, by the user and by an id of its range;
- a table that shows the user's own files as root's, with ``-o suid`` and
  ``-o dev``: a set-uid copy of id(1), a copy of cat(1) with a namespaced
  file capability whose root the table makes host root, and a device node
  of root's that the table shows as the user's;
- a lower whose path carries mount options for fusermount3.

Every mount lives in a mount namespace of its own (where /etc/fuse.conf
says user_allow_other, /etc/subuid and /etc/subgid give the user a range,
and the interpreter under /root is reachable) and goes with its daemon.
Callers enter that namespace (nsenter) as the uid they attack as, and run
only system binaries."""

from __future__ import annotations

import contextlib
import os
import shlex
import struct
import subprocess
from pathlib import Path

import pytest

from tests import rootless as namespace

pytestmark = pytest.mark.needs_root

RUSER = namespace.RUSER  # the user that mounts
RANGE = 100000  # its /etc/subuid and /etc/subgid range: 100000..165535
BOB = 1001  # another host user (on the lower: not the user's)

_SETUP = namespace.PROLOGUE + r"""
echo "$RNAME:$RANGE:65536" > "$SCRATCH/subid"
mount --bind "$SCRATCH/subid" /etc/subuid
mount --bind "$SCRATCH/subid" /etc/subgid
exec setpriv --reuid=$RUSER --regid=$RUSER --clear-groups -- env -i PATH=/usr/bin:/bin \
    PYTHONPATH="$CODE" HOME=/ "$PYTHON" -m shiftfs -f -q "$@" "$LOWER" "$MNT"
"""


def _mount_line(pid: int, mnt: Path) -> str | None:
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                if line.split()[4] == str(mnt):
                    return line
    except OSError:
        pass
    return None


class Rootless:
    """shiftfs run by RUSER through fusermount3 in a mount namespace of its
    own; ``as_(uid, cmd)`` runs a shell command there as ``uid``."""

    def __init__(self, pid: int, mnt: Path, log: Path) -> None:
        self.pid, self.mnt, self.log = pid, mnt, log

    def as_(self, uid: int, cmd: str, inside: bool = True) -> subprocess.CompletedProcess:
        enter = ["nsenter", f"--target={self.pid}", "--mount", "--"] if inside else []
        return subprocess.run([*enter, "setpriv", f"--reuid={uid}", f"--regid={uid}",
                               "--clear-groups", "--", "sh", "-c", cmd],
                              capture_output=True, text=True, timeout=60, cwd="/")

    def can(self, uid: int, cmd: str, inside: bool = True) -> bool:
        return self.as_(uid, cmd + " >/dev/null 2>&1", inside).returncode == 0

    def mount_options(self) -> list[str]:
        line = _mount_line(self.pid, self.mnt)
        assert line is not None
        return line.split()[5].split(",")


@contextlib.contextmanager
def rootless(lower: Path, workdir: Path, *args: str):
    with namespace.daemon(lower, workdir, _SETUP, *args, RANGE=str(RANGE)) as (proc, mnt, log):
        yield Rootless(proc.pid, mnt, log)


def _secret(path: Path, uid: int, mode: int, text: str = "secret\n") -> None:
    path.write_text(text)
    os.chown(path, uid, uid)
    os.chmod(path, mode)


@pytest.fixture
def hosts_files(lower):
    """A lower the user owns (lower 1000 on disk), holding what is not its:
    root's 0600 file and 0700 directory (lower 0: shown as the user's own
    under --subuid), and bob's 0600 file and 0700 directory (lower 1001:
    shown as 101000, an id of the user's range)."""
    os.chown(lower, RUSER, RUSER)
    _secret(lower / "root-secret", 0, 0o600)
    (lower / "root-dir").mkdir(mode=0o700)
    _secret(lower / "root-dir" / "note", 0, 0o644)
    _secret(lower / "bob-secret", BOB, 0o600)
    (lower / "bob-dir").mkdir(mode=0o700)
    os.chown(lower / "bob-dir", BOB, BOB)
    _secret(lower / "bob-dir" / "note", BOB, 0o644)
    _secret(lower / "mine", RUSER, 0o644, "the user's own\n")
    return lower


# what each caller tries, on a path relative to the lower or the mount
ATTEMPTS = {
    "read": "cat {p}",
    "append": "echo more >> {p}",
    "truncate": "truncate -s 0 {p}",
    "chmod": "chmod 666 {p}",
    "chown": "chown {uid} {p}",
    "list": "ls {p}/",
    "rename": "mv {p} {p}.moved",
    "remove": "rm -rf {p}",
}


def test_files_of_root_and_of_another_user_stay_theirs(hosts_files, workdir):
    """Through a --subuid mount, root's files look like the user's and
    bob's like its range's: neither the user (1000) nor an id of its range
    (101000, which the table shows as their owner) nor bob himself gets
    through the mount anything it does not get directly on the lower; and
    the files are unchanged afterwards."""
    lower = hosts_files
    before = {p: (p.stat().st_uid, p.stat().st_mode, p.read_bytes() if p.is_file() else None)
              for p in sorted(lower.rglob("*"))}
    with rootless(lower, workdir, "--subuid", str(RUSER)) as r:
        shown = r.as_(RUSER, f"stat -c '%n %u %a' {r.mnt}/root-secret {r.mnt}/bob-secret")
        assert shown.stdout.split() == [f"{r.mnt}/root-secret", str(RUSER), "600",
                                        f"{r.mnt}/bob-secret", str(RANGE + BOB - 1), "600"], shown
        got = {}
        for uid in (RUSER, RANGE + BOB - 1, BOB):
            for target in ("root-secret", "root-dir", "root-dir/note", "bob-secret", "bob-dir",
                           "bob-dir/note"):
                for name, cmd in ATTEMPTS.items():
                    through = r.can(uid, cmd.format(p=shlex.quote(f"{r.mnt}/{target}"), uid=uid))
                    got[(uid, target, name)] = through
        leaks = [k for k, ok in got.items() if ok]
        assert leaks == [], leaks
        assert r.as_(RUSER, f"cat {r.mnt}/mine").stdout == "the user's own\n"
    after = {p: (p.stat().st_uid, p.stat().st_mode, p.read_bytes() if p.is_file() else None)
             for p in sorted(lower.rglob("*"))}
    assert after == before


def _id_copy(lower: Path) -> Path:
    p = lower / "suid-id"
    p.write_bytes(Path("/usr/bin/id").read_bytes())
    os.chown(p, RUSER, RUSER)
    os.chmod(p, 0o4755)
    return p


def _capability_v3(caps: int, rootid: int) -> bytes:
    """security.capability, revision 3 (namespaced): effective, permitted
    ``caps``, its root ``rootid`` (what `unshare -r setcap` by the user
    writes: the user's own uid)."""
    return struct.pack("<IIIIII", 0x03000000 | 1, caps & 0xFFFFFFFF, 0, caps >> 32, 0, rootid)


CAP_DAC_OVERRIDE = 1


def test_a_table_that_shows_the_users_files_as_roots_gives_no_privilege(lower, workdir):
    """The user's own table shows its files as root's (lower 1000 = upper
    0) and it asks for -o suid and -o dev. fusermount3 mounts nosuid,nodev
    all the same: a set-uid copy of id(1) runs as the user, a copy of
    cat(1) with a file capability the table moves to host root
    (cap_dac_override, root 1000 on disk, shown as root 0) has no
    capability, and a device node of root's that the table shows as an
    id of the user's range (lower 0 = upper 100000) cannot be opened by
    that id."""
    os.chown(lower, RUSER, RUSER)
    _id_copy(lower)
    cat = lower / "cap-cat"
    cat.write_bytes(Path("/usr/bin/cat").read_bytes())
    os.chown(cat, RUSER, RUSER)
    os.chmod(cat, 0o755)
    os.setxattr(cat, "security.capability", _capability_v3(1 << CAP_DAC_OVERRIDE, RUSER))
    os.mknod(lower / "root-null", 0o600 | 0o020000, os.makedev(1, 3))  # root's, 0600
    table = ["--uidmap", "1000:0:1", "--uidmap", "0:100000:1000",
             "--gidmap", "1000:0:1", "--gidmap", "0:100000:1000"]
    with rootless(lower, workdir, *table, "-o", "suid", "-o", "dev") as r:
        opts = r.mount_options()
        assert "nosuid" in opts and "nodev" in opts, opts
        st = r.as_(RUSER, f"stat -c '%u %a' {r.mnt}/suid-id {r.mnt}/cap-cat").stdout.split()
        assert st == ["0", "4755", "0", "755"], st  # root's set-uid file, as the table shows it
        ran = r.as_(RUSER, f"{r.mnt}/suid-id")
        assert ran.returncode == 0 and "euid" not in ran.stdout, ran
        caps = r.as_(RUSER, f"{r.mnt}/cap-cat /proc/self/status")
        eff = [line.split()[1] for line in caps.stdout.splitlines() if line.startswith("CapEff")]
        assert eff == ["0000000000000000"], caps
        # the file cap, read through the mount, is host root's: only nosuid holds it back
        shown = r.as_(RUSER, f"getcap {r.mnt}/cap-cat").stdout
        assert "cap_dac_override" in shown and "rootid" not in shown, shown
        assert r.as_(RANGE, f"stat -c '%u %a' {r.mnt}/root-null").stdout.split() == [
            str(RANGE), "600"]
        assert not r.can(RANGE, f"head -c0 {r.mnt}/root-null")
    # the baselines: on the lower, no privilege either
    assert "euid" not in r.as_(RUSER, f"{lower}/suid-id", inside=False).stdout
    assert not r.can(RANGE, f"head -c0 {lower}/root-null", inside=False)


def test_a_device_node_of_roots_shown_as_the_users_is_not_opened(lower, workdir):
    """--subuid: root's /dev/null-like node (0600) is shown as the user's
    (lower 0 = the user), and -o dev is asked for: the user cannot open it
    through the mount, as it cannot on the lower."""
    os.chown(lower, RUSER, RUSER)
    os.mknod(lower / "root-null", 0o600 | 0o020000, os.makedev(1, 3))
    with rootless(lower, workdir, "--subuid", str(RUSER), "-o", "dev") as r:
        assert "nodev" in r.mount_options()
        shown = r.as_(RUSER, f"stat -c '%u %a %t:%T' {r.mnt}/root-null").stdout.split()
        assert shown == [str(RUSER), "600", "1:3"], shown
        assert not r.can(RUSER, f"head -c0 {r.mnt}/root-null")
        assert not r.can(RUSER, f"echo x > {r.mnt}/root-null")
    assert not r.can(RUSER, f"head -c0 {lower}/root-null", inside=False)


def test_a_lower_path_carries_no_options_to_fusermount3(workdir):
    """The lower's path is the mount's fsname, which goes to fusermount3
    among the -o words: commas in it are escaped, so a path named
    'x,suid,dev,allow_root' adds none of those."""
    lower = workdir / "x,suid,dev,allow_root"
    lower.mkdir()
    os.chown(lower, RUSER, RUSER)
    with rootless(lower, workdir, "--subuid", str(RUSER), "-o", "suid") as r:
        line = _mount_line(r.pid, r.mnt)
        opts = r.mount_options()
        assert "nosuid" in opts and "nodev" in opts, line
        fstype, source, superopts = line.split(" - ", 1)[1].split()
        assert (fstype, source) == ("fuse.shiftfs", str(lower)), line
        assert "allow_root" not in superopts.split(","), line
