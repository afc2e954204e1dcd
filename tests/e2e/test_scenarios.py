"""The five end-to-end scenarios of issue 7: one rootfs, many containers,
nothing changed on disk. Each runs real containers (user + mount + pid
namespaces, chrooted into the mount) over a busybox rootfs built in setup.

docs/use-cases.md ("Use cases") shows each scenario as a recipe for people.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import shiftfs
from shiftfs.mount import is_mounted

from . import container
from tests.tables import table
from .rootfs import (CAP_BINARY, PACKAGE_MEMBERS, SETGID_DIR, SETUID_BINARY, STAFF, USER, WWW,
                     diff_manifests, manifest)

pytestmark = pytest.mark.needs_root

A, B, C = 100000, 200000, 300000  # host ranges of containers A, B and the migrated one
RANGE = 65536


def cmap(host: int):
    """A container's uid_map/gid_map: container 0..65535 at host ``host``..."""
    return ((0, host, RANGE),)


def lines_with(prefix: str, text: str) -> list[str]:
    return [line[len(prefix):].strip() for line in text.splitlines() if line.startswith(prefix)]


def owners(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def only_under(paths, *prefixes) -> list[str]:
    return [p for p in paths if not any(p == q or p.startswith(q + "/") for q in prefixes)]


# ---- scenario 1: one rootfs, two mounts, two containers at the same time -------

CONTAINER_SCRIPT = r"""
set -e
echo "ID $(id -u):$(id -g)"
echo "ROOT $(stat -c %u:%g /)"
echo "WWW $(stat -c %u:%g /var/www/index.html)"
echo "HOME $(stat -c %u:%g /home/user)"
echo LS; ls -ln /
touch /tmp/ready-{me}
i=0
while [ ! -e /tmp/ready-{other} ]; do
    i=$((i+1)); [ $i -lt 600 ] || {{ echo "never saw container {other}"; exit 3; }}
    sleep 0.05
done
echo "OTHER $(stat -c %u:%g /tmp/ready-{other})"
mkdir /srv/{me}
echo "written by {me}" > /srv/{me}/file
chown {user}:{user} /srv/{me}/file
chown {www}:{staff} /srv/{me}
tar -xpf /srv/pkg.tar -C /srv/{me}
chown -h {user}:{www} /srv/{me}/opt/app/link  # busybox tar does not lchown symlinks
su user -c 'echo mine > /home/user/from-{me}; /bin/id -u'
echo "USERFILE $(stat -c %u:%g /home/user/from-{me})"
mkdir /srv/shared/{me}
echo "SGID $(stat -c %u:%g:%a /srv/shared/{me})"
echo "TARTREE"; cd /srv/{me} && find opt | sort | while read p; do echo "$p $(stat -c %u:%g:%a "$p")"; done
echo DONE
"""


def test_scenario1_shared_rootfs_two_containers(rootfs, mounts):
    before = manifest(rootfs)
    mnt_a = mounts.shiftfs(rootfs, table(A), name="a")
    mnt_b = mounts.shiftfs(rootfs, table(B), name="b")

    # Control: the same rootfs without shiftfs is unusable from a container
    # (every file shows as nobody, root cannot enter its own home).
    plain = container.run(rootfs, "stat -c %u:%g /; ls /root", uid_map=cmap(A))
    assert plain.stdout.split()[0] == "65534:65534" and plain.returncode != 0

    fmt = dict(user=USER, www=WWW, staff=STAFF)
    with container.Container.start(mnt_a, CONTAINER_SCRIPT.format(me="a", other="b", **fmt),
                                   uid_map=cmap(A)) as ca, \
         container.Container.start(mnt_b, CONTAINER_SCRIPT.format(me="b", other="a", **fmt),
                                   uid_map=cmap(B)) as cb:
        ra, rb = ca.wait(90).check(), cb.wait(90).check()

    for me, other, r, mnt, host in (("a", "b", ra, mnt_a, A), ("b", "a", rb, mnt_b, B)):
        out = r.stdout
        assert "DONE" in out
        # inside: its rootfs is owned by its own root, users are the image's users
        assert lines_with("ID ", out) == ["0:0"]
        assert lines_with("ROOT ", out) == ["0:0"]
        assert lines_with("WWW ", out) == [f"{WWW}:{WWW}"]
        assert lines_with("HOME ", out) == [f"{USER}:{USER}"]
        ls = out.split("LS\n", 1)[1].split("OTHER", 1)[0]
        assert all(line.split()[2:4] == ["0", "0"] for line in ls.splitlines()
                   if line.split()[-1:] in (["bin"], ["etc"], ["usr"], ["root"], ["tmp"]))
        # the other container's marker (lower 0) is also owned by *this* container's root
        assert lines_with("OTHER ", out) == ["0:0"]
        assert lines_with("USERFILE ", out) == [f"{USER}:{USER}"]
        assert lines_with("SGID ", out) == [f"0:{STAFF}:2775"]
        tartree = dict(line.split() for line in out.split("TARTREE\n", 1)[1].split("DONE")[0]
                       .splitlines())
        for name, kind, mode, uid, gid, _ in PACKAGE_MEMBERS:
            seen = tartree[name]
            if kind == "symlink":
                seen = seen.rsplit(":", 1)[0]  # a symlink's mode is always 777
            want = f"{uid}:{gid}" + ("" if kind == "symlink" else f":{mode & 0o7777:o}")
            assert seen == want, name

        # on disk: everything it wrote carries container ids, 0-based
        d = os.path.join(rootfs, "srv", me)
        assert owners(d) == (WWW, STAFF)
        assert owners(os.path.join(d, "file")) == (USER, USER)
        assert owners(os.path.join(rootfs, "tmp", f"ready-{me}")) == (0, 0)
        assert owners(os.path.join(rootfs, "home/user", f"from-{me}")) == (USER, USER)
        assert owners(os.path.join(rootfs, "srv/shared", me)) == (0, STAFF)
        for name, kind, mode, uid, gid, _ in PACKAGE_MEMBERS:
            st = os.lstat(os.path.join(d, name))
            assert (st.st_uid, st.st_gid) == (uid, gid), name
            if kind != "symlink":
                assert st.st_mode & 0o7777 == mode, name

        # from the host, each mount shows the lower tree in its own range,
        # including what the *other* container wrote
        assert owners(os.path.join(mnt, "srv", other, "file")) == (host + USER, host + USER)
        assert owners(os.path.join(mnt, "srv", other)) == (host + WWW, host + STAFF)

    # nothing else changed on disk
    diff = diff_manifests(before, manifest(rootfs))
    assert diff["removed"] == []
    assert only_under(diff["added"], "srv/a", "srv/b", "srv/shared/a", "srv/shared/b",
                      "tmp/ready-a", "tmp/ready-b", "home/user/from-a", "home/user/from-b") == []
    assert list(diff["changed"]) == []


def test_scenario1_setid_and_file_capabilities_in_container(rootfs, mounts):
    """The image's set-uid binary and file capability work for the container,
    relative to *its* root, when the mount allows it (-o suid), and not by
    default (nosuid)."""
    script = (f"su user -c 'echo EUID $(/{SETUID_BINARY} whoami); /{CAP_BINARY} /proc/self/status'"
              " | grep -E '^EUID|^CapEff'")
    safe = mounts.shiftfs(rootfs, table(A), name="nosuid")
    out = container.run(safe, script, uid_map=cmap(A)).check().stdout.split()
    assert out == ["EUID", "CapEff:", "0000000000000000"]  # whoami refused to run as 'user'

    suid = mounts.shiftfs(rootfs, table(A), options=["-o", "suid"], name="suid")
    out = container.run(suid, script, uid_map=cmap(A)).check().stdout.split()
    # set-uid root = the container's root; cap_net_bind_service = bit 10
    assert out == ["EUID", "root", "CapEff:", "0000000000000400"]


# ---- scenario 2: inspection by a host user ---------------------------------------

HOST_USER = 1000  # an ordinary host account (no privileges)


def as_host_user(script: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={HOST_USER}", f"--regid={HOST_USER}",
                           "--clear-groups", "/bin/sh", "-ec", script],
                          capture_output=True, text=True, timeout=timeout)


def inspection_table(container_root: int, user: int = HOST_USER) -> list:
    """Container root (lower ``container_root``) shown as ``user``; the rest of the
    container's range at its usual host ids (A + n), so nothing else is the user's."""
    from shiftfs.idmap import Extent
    return [Extent(container_root, user, 1), Extent(container_root + 1, A + 1, RANGE - 1)]


def test_scenario2_host_user_inspects_container_files(rootfs, mounts):
    before = manifest(rootfs)
    running = mounts.shiftfs(rootfs, table(A), name="container")
    inspect = mounts.shiftfs(rootfs, inspection_table(0), name="inspect")

    # the container's root-only files, read and edited by host user 1000
    r = as_host_user(f"""
        cd {inspect}
        echo "ROOTDIR $(stat -c %u:%g:%a root)"
        cat root/.profile > /dev/null && echo READ-OK
        echo 'changed-by-host-user' > etc/hostname
        echo 'new' > root/from-host
        mkdir root/dir-from-host
        echo "NEW $(stat -c %u:%g root/from-host)"
        cat home/user/notes.txt 2>/dev/null || echo NOT-MINE
    """)
    assert r.returncode == 0, r.stderr
    assert lines_with("ROOTDIR ", r.stdout) == [f"{HOST_USER}:{HOST_USER}:700"]
    assert "READ-OK" in r.stdout
    assert lines_with("NEW ", r.stdout) == [f"{HOST_USER}:{HOST_USER}"]
    assert "NOT-MINE" in r.stdout  # container user 1000 is host 101000 here, not the host user

    # on disk: the edit kept container root's ownership, new files carry container root's ids
    assert owners(os.path.join(rootfs, "etc/hostname")) == (0, 0)
    assert owners(os.path.join(rootfs, "root/from-host")) == (0, 0)
    assert owners(os.path.join(rootfs, "root/dir-from-host")) == (0, 0)
    # and the running container sees them as its own root's
    out = container.run(running, "cat /etc/hostname; stat -c %u:%g /root/from-host /root/dir-from-host",
                        uid_map=cmap(A)).check().stdout.split()
    assert out == ["changed-by-host-user", "0:0", "0:0"]

    # the host user cannot hand files to ids outside the table, nor take others'
    r = as_host_user(f"chown {HOST_USER + 5} {inspect}/root/from-host")
    assert r.returncode != 0
    diff = diff_manifests(before, manifest(rootfs))
    assert diff["added"] == ["root/dir-from-host", "root/from-host"]
    assert diff["removed"] == []
    assert set(diff["changed"]) == {"etc/hostname"}
    assert set(diff["changed"]["etc/hostname"]) == {"size", "sha256"}
    # the user xattr is still there
    assert diff["changed"]["etc/hostname"].get("xattrs") is None


# ---- scenario 3: snapshot migration ---------------------------------------------

READ_ONLY_WORKLOAD = r"""
set -e
ls -lnR /bin /etc /srv /var /usr /opt /home /root | wc -l
find / -xdev -type f -exec cat {} + | wc -c
tar -cf - /etc /srv /var /home /root /usr/local | tar -tvf - | wc -l
su user -c 'ls -l /srv/shared; cat /srv/shared/readme /home/user/notes.txt' | wc -c
sha256sum /bin/busybox
"""

WRITE_WORKLOAD = r"""
set -e
echo "message of the day" > /etc/motd
echo "log line" >> /var/log/messages
rm /home/user/notes.txt
chown 1:1 /var/www/index.html
mkdir /srv/shared/sub
su user -c 'echo data > /srv/shared/by-user'
echo "SUB $(stat -c %u:%g:%a /srv/shared/sub)"
"""


def host_read_everything(mnt: str) -> None:
    """Read-only use from the host: every attribute, xattr, ACL and byte."""
    subprocess.run(["getfacl", "-R", "-p", "-n", mnt], check=True, capture_output=True)
    subprocess.run(["getfattr", "-R", "-h", "-d", "-m", "-", mnt], check=True, capture_output=True)
    manifest(mnt)


@pytest.mark.parametrize("copy_with", ["tar", "cp"])
def test_scenario3_snapshot_migration(rootfs, mounts, e2e_dir, copy_with):
    m0 = manifest(rootfs, with_times=True)

    # read-only use, from a container and from the host: not a byte or a time changes
    mnt = mounts.shiftfs(rootfs, table(A), name="a")
    container.run(mnt, READ_ONLY_WORKLOAD, uid_map=cmap(A)).check()
    host_read_everything(mnt)
    assert manifest(rootfs, with_times=True) == m0

    # writes: the lower tree differs by exactly what was written
    out = container.run(mnt, WRITE_WORKLOAD, uid_map=cmap(A)).check().stdout
    assert lines_with("SUB ", out) == [f"0:{STAFF}:2775"]
    m1 = manifest(rootfs)
    without_times = {path: {k: v for k, v in entry.items() if k != "mtime_ns"}
                     for path, entry in m0.items()}
    diff = diff_manifests(without_times, m1)
    assert diff["added"] == ["etc/motd", "srv/shared/by-user", "srv/shared/sub"]
    assert diff["removed"] == ["home/user/notes.txt"]
    assert set(diff["changed"]) == {"var/log/messages", "var/www/index.html", "var/www/hardlink.html"}
    assert set(diff["changed"]["var/log/messages"]) == {"size", "sha256"}
    assert diff["changed"]["var/www/index.html"] == {"uid": (WWW, 1), "gid": (WWW, 1)}
    # new entries: container ids, 0-based; set-gid group and default ACL inherited on disk
    assert (m1["etc/motd"]["uid"], m1["etc/motd"]["gid"]) == (0, 0)
    assert (m1["srv/shared/by-user"]["uid"], m1["srv/shared/by-user"]["gid"]) == (USER, STAFF)
    sub, parent = m1["srv/shared/sub"], m1[SETGID_DIR]
    assert (sub["uid"], sub["gid"], sub["mode"]) == (0, STAFF, "0o2775")
    assert sub["xattrs"]["system.posix_acl_default"] == parent["xattrs"]["system.posix_acl_default"]
    assert "system.posix_acl_access" in m1["srv/shared/by-user"]["xattrs"]
    mounts.close()  # unmount before copying, as a migration would

    # migrate: copy the tree elsewhere, serve it under a third table
    copy = os.path.join(e2e_dir, "migrated")
    if copy_with == "tar":
        os.mkdir(copy)
        tar = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner",
                              "-C", rootfs, "-cpf", "-", "."], check=True, capture_output=True)
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner",
                        "-C", copy, "-xpf", "-"], input=tar.stdout, check=True, capture_output=True)
    else:
        subprocess.run(["cp", "-a", rootfs, copy], check=True)
    m_copy = manifest(copy)
    assert diff_manifests(m1, m_copy) == {"added": [], "removed": [], "changed": {}}

    mounts2 = type(mounts)(e2e_dir)
    try:
        mnt_c = mounts2.shiftfs(copy, table(C), name="c")
        out = container.run(mnt_c, """
            echo "ROOT $(stat -c %u:%g /)"; echo "ID $(id -u)"
            su user -c 'cat /srv/shared/readme'
            echo "CAP $(stat -c %u /usr/local/bin/cat)"
        """, uid_map=cmap(C)).check().stdout
        assert lines_with("ROOT ", out) == ["0:0"] and lines_with("ID ", out) == ["0"]
        assert "shared" in out.split()
        # from the host the copy is in the third range, ACL entries included
        acl = subprocess.run(["getfacl", "-n", "-p", os.path.join(mnt_c, SETGID_DIR)],
                             check=True, capture_output=True, text=True).stdout
        assert f"user:{C + USER}:rwx" in acl and f"group:{C + WWW}:r-x" in acl
        assert f"default:user:{C + USER}:rwx" in acl
        assert owners(os.path.join(mnt_c, "var/www/hardlink.html")) == (C + 1, C + 1)
    finally:
        mounts2.close()
    assert diff_manifests(m_copy, manifest(copy)) == {"added": [], "removed": [], "changed": {}}


# ---- scenario 4: shiftfs as the lower layer of overlayfs --------------------------

def test_scenario4_overlay_on_shiftfs(rootfs, mounts):
    before = manifest(rootfs, with_times=True)
    image = mounts.shiftfs(rootfs, table(A), name="image")
    ovl_1, upper_1 = mounts.overlay(image, "c1", owner=(A, A))  # upper root = container root
    ovl_2, upper_2 = mounts.overlay(image, "c2", owner=(A, A))

    script = r"""
        set -e
        echo "ROOT $(stat -c %u:%g /)"
        echo "WWW $(stat -c %u:%g /var/www/index.html)"
        echo "{name}" > /etc/hostname          # copy-up of a lower file
        rm /home/user/notes.txt                 # whiteout
        mkdir -p /srv/{name} && chown 33:33 /srv/{name}
        su user -c 'echo from-user > /home/user/mine'
        tar -xpf /srv/pkg.tar -C /srv/{name}
        echo "HOSTNAME $(cat /etc/hostname)"
        echo "GONE $(ls /home/user)"
        echo "PKG $(stat -c %u:%g:%a /srv/{name}/opt/app/www)"
        echo "SGID $(mkdir /srv/shared/{name} && stat -c %u:%g:%a /srv/shared/{name})"
    """
    with container.Container.start(ovl_1, script.format(name="one"), uid_map=cmap(A)) as c1, \
         container.Container.start(ovl_2, script.format(name="two"), uid_map=cmap(A)) as c2:
        r1, r2 = c1.wait(60).check(), c2.wait(60).check()
    for name, r, upper, other in (("one", r1, upper_1, "two"), ("two", r2, upper_2, "one")):
        assert lines_with("ROOT ", r.stdout) == ["0:0"]
        assert lines_with("WWW ", r.stdout) == [f"{WWW}:{WWW}"]
        assert lines_with("HOSTNAME ", r.stdout) == [name]
        assert lines_with("GONE ", r.stdout) == ["mine"]
        assert lines_with("PKG ", r.stdout) == [f"{WWW}:{WWW}:2750"]
        assert lines_with("SGID ", r.stdout) == [f"0:{STAFF}:2775"]
        # the per-container upper holds host ids (overlayfs writes as the caller's
        # fsuid: container root = host A), copied-up metadata included
        assert owners(os.path.join(upper, "etc/hostname")) == (A, A)
        assert owners(os.path.join(upper, "srv", name)) == (A + WWW, A + WWW)
        assert owners(os.path.join(upper, "home/user/mine")) == (A + USER, A + USER)
        assert not os.path.exists(os.path.join(upper, "srv", other))
        # the other container's changes are invisible here
        assert not os.path.exists(os.path.join(ovl_1 if name == "one" else ovl_2, "srv", other))
    # the image itself did not change at all
    assert manifest(rootfs, with_times=True) == before


# ---- scenario 5: rootless: shiftfs itself unprivileged in a user namespace ----------

ROOTLESS_HOST = 100000  # the namespace's 0..131071 are host 100000..231071


def _world_readable_code(dest: str) -> str:
    """Copy the packages the driver imports (shiftfs, as imported here, and this
    e2e package) into ``dest``, readable by anyone, and return ``dest``. The
    driver runs as host uid 100000, which cannot be assumed to reach the
    checkout: it may be cloned anywhere (e.g. under a 0700 /root)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name, src in (("shiftfs", os.path.dirname(os.path.abspath(shiftfs.__file__))),
                      ("e2e", os.path.dirname(os.path.abspath(__file__)))):
        shutil.copytree(src, os.path.join(dest, name), ignore=ignore)
    os.chmod(dest, 0o755)
    for dirpath, dirnames, filenames in os.walk(dest):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    return dest


def _reachable_by_others(path: str) -> bool:
    """Can a process with no host privileges and a foreign uid open ``path``?"""
    parts = os.path.abspath(path).split("/")
    for i in range(2, len(parts)):
        st = os.stat("/".join(parts[:i]))
        if not st.st_mode & 0o001:
            return False
    return True


def _prepare_private_mount_ns(scratch: str) -> None:
    """In the (host-root) child only, in its own mount namespace: make what this
    CI machine keeps root-only reachable, as it is on a normal distribution.
    /dev/fuse is 0666 on Debian (here 0600) and Python may live under /root."""
    container._unshare(container.CLONE_NEWNS)
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    os.makedirs(scratch, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755,size=1m", "tmpfs", scratch], check=True)
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        node = os.path.join(scratch, "fuse")
        os.mknod(node, 0o20666, os.makedev(10, 229))
        os.chmod(node, 0o666)
        subprocess.run(["mount", "--bind", node, "/dev/fuse"], check=True)
    prefix = os.path.realpath(sys.prefix)
    if not _reachable_by_others(prefix):
        # e.g. /root/.pyenv/...: cover the unreachable ancestor with a 0755 tmpfs
        # holding just the interpreter's tree (bind-mounted back in)
        parts = prefix.split("/")
        blocked = next("/".join(parts[:i]) for i in range(2, len(parts) + 1)
                       if not os.stat("/".join(parts[:i])).st_mode & 0o001)
        keep = "/".join(prefix.split("/")[:len(blocked.split("/")) + 1])
        stash = os.path.join(scratch, "stash")
        os.mkdir(stash)
        subprocess.run(["mount", "--bind", keep, stash], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755,size=1m", "tmpfs", blocked],
                       check=True)
        os.makedirs(keep)
        subprocess.run(["mount", "--move", stash, keep], check=True)


def run_rootless_session(session: str, timeout: float = 120) -> container.Result:
    """Fork; the child gets a user namespace (0..131071 -> host 100000..) and, as its
    uid 0, runs rootless_driver; returns its Result. Killed (whole group) on timeout."""
    out_path, err_path = os.path.join(session, "..", "rootless.out"), os.path.join(session, "..", "rootless.err")
    code = _world_readable_code(os.path.join(os.path.dirname(session), "code"))

    def become_rootless_daemon_host():
        container._unshare(container.CLONE_NEWNS)  # a mount namespace this user owns
        os.chdir(session)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C",
               "PYTHONPATH": code,
               "PYTHONDONTWRITEBYTECODE": "1", "HOME": session}
        os.execve(sys.executable, [sys.executable, "-B", "-m", "e2e.rootless_driver", session], env)

    span = ((0, ROOTLESS_HOST, 2 * RANGE),)
    pid = container.fork_as_userns_root(
        out_path, err_path, span, span, become_rootless_daemon_host,
        before_unshare=lambda: _prepare_private_mount_ns(
            os.path.join(os.path.dirname(session), "scratch")))
    ctr = container.Container(pid, out_path, err_path, os.path.join(session, "..", "unused"))
    with ctr:
        return ctr.wait(timeout)


def test_scenario5_rootless(e2e_dir):
    session = os.path.join(e2e_dir, "rootless")
    os.mkdir(session)
    os.chown(session, ROOTLESS_HOST, ROOTLESS_HOST)  # the namespace's root owns its storage
    r = run_rootless_session(session)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # the daemon ran as root of its namespace, which is host 100000 and nothing more
    assert res["euid"] == 0 and res["uid_map"] == ["0", str(ROOTLESS_HOST), str(2 * RANGE)]

    out = res["default"]["stdout"]
    assert res["default"]["rc"] == 0, res["default"]
    assert lines_with("ID ", out) == ["0:0"]
    assert lines_with("ROOT ", out) == ["0:0"]
    assert lines_with("WWW ", out) == [f"{WWW}:{WWW}"]
    assert "MKDIR ok" in out and "TAR ok" in out and "SU ok" in out
    assert lines_with("SGID ", out) == [f"0:{STAFF}:2775"]
    # what it cannot do: ids outside the table stay foreign, no device nodes
    assert lines_with("FOREIGN ", out) == ["65534:65534"]
    assert "CHOWN-FOREIGN refused" in out
    assert "MKNOD refused" in out
    assert all(res[k]["unmounted"] for k in ("default", "suid"))

    # on disk, in the namespace's ids: 0-based container ids...
    assert res["on_disk"]["srv/nested"] == [WWW, STAFF]
    assert res["on_disk"]["srv/nested/opt/app/www"] == [WWW, WWW]
    assert res["on_disk"]["home/user/from-user"] == [USER, USER]
    # ...which are host 100000-based, as in any rootless engine's storage
    lower = os.path.join(session, "lower")
    assert owners(os.path.join(lower, "srv/nested")) == (ROOTLESS_HOST + WWW, ROOTLESS_HOST + STAFF)
    assert owners(os.path.join(lower, "home/user/from-user")) == (ROOTLESS_HOST + USER,) * 2
    assert owners(lower) == (ROOTLESS_HOST, ROOTLESS_HOST)

    # -o suid inside the namespace: set-uid and file capabilities relative to the
    # nested container's root
    suid = res["suid"]["stdout"].split()
    assert suid == ["EUID", "root", "CapEff:", "0000000000000400"], res["suid"]


# ---- the documented recipe, literally: shiftfs CLI + util-linux unshare ------------

@pytest.mark.skipif(not shutil.which("newuidmap"), reason="needs newuidmap (Debian package uidmap)")
def test_recipe_with_util_linux_unshare(rootfs, e2e_dir):
    """Use case 1 (docs/use-cases.md), as a user types it: the daemonizing CLI and
    `unshare --map-users`. util-linux hands maps to newuidmap(1), which wants
    /etc/subuid and /etc/subgid lines for root: they are bind-mounted over the
    real files in a private mount namespace, so the host's files are never touched."""
    subid = os.path.join(e2e_dir, "subid")
    with open(subid, "w") as f:
        f.write(f"root:{A}:{RANGE}\nroot:{B}:{RANGE}\n")
    mnt = os.path.join(e2e_dir, "recipe-a")
    os.mkdir(mnt)
    script = f"""
        set -e
        mount --make-rprivate /
        mount --bind {subid} /etc/subuid
        mount --bind {subid} /etc/subgid
        {sys.executable} -m shiftfs {rootfs} {mnt} --uidmap 0:{A}:{RANGE} --gidmap 0:{A}:{RANGE}
        trap 'fusermount3 -u {mnt}' EXIT
        unshare --map-users={A},0,{RANGE} --map-groups={A},0,{RANGE} --setuid 0 --setgid 0 \\
            --mount --pid --fork --mount-proc --root={mnt} \\
            /bin/sh -c 'id -u; stat -c %u:%g /; echo hi > /root/recipe; chown 33:33 /root/recipe'
    """
    try:
        r = subprocess.run(["unshare", "--mount", "/bin/sh", "-c", script],
                           capture_output=True, text=True, timeout=60)
    finally:
        if is_mounted(mnt, None):  # the mount lives in the wrapper's namespace; belt and braces
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["0", "0:0"]
    assert owners(os.path.join(rootfs, "root/recipe")) == (WWW, WWW)
