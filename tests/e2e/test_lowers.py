"""Lowers the kernel's idmapped mounts cannot shift, served by shiftfs.

Each kind of lower is made here and served with b:0:100000:65536:
- the merged directory of an overlayfs mount,
- sshfs, over an sshd this module starts on a private port of 127.0.0.1
  (a throwaway host key and authorized key; sftp as root),
- bindfs (another FUSE filesystem, in C),
- tmpfs, which the kernel *can* idmap (since Linux 6.3): the test measures
  that too and then holds shiftfs to the same results.

"store" is where a lower's data really lands, seen by the kernel unshifted:
the sftp server's directory for sshfs, bindfs's source, the overlay's merged
directory and the tmpfs itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest

from shiftfs.mount import is_mounted, unmount

from tests.callers import Errno, call_as, call_as_userns_root
from tests.daemon import foreground_daemon
from tests.oracle.kernel_idmap import idmapped_mount
from tests.tables import BASE, STD, args, table, tuples

pytestmark = pytest.mark.needs_root

UP = BASE  # the table (STD): lower 0..65535 seen as 100000..165535
EXTENTS = tuples(STD)
ROOT = dict(uid_extents=EXTENTS, gid_extents=EXTENTS)  # container root: upper 100000
USER = 1000  # a container user, upper 101000
OWNERS = {"by-root": (0, 0), "by-user": (USER, USER), "by-www": (33, 34)}
KINDS = ["overlayfs", "sshfs", "bindfs", "tmpfs"]
# what mount_setattr(MOUNT_ATTR_IDMAP) gives on each (Linux 6.18, measured):
# overlayfs and FUSE filesystems do not set FS_ALLOW_IDMAP; tmpfs does (6.3+)
KERNEL_IDMAP = {"overlayfs": errno.EINVAL, "sshfs": errno.EINVAL, "bindfs": errno.EINVAL,
                "tmpfs": None}


@dataclass
class Lower:
    kind: str
    path: str  # what shiftfs serves
    store: str  # where its data lands


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


def _unmount_kernel(mp: str) -> None:
    if is_mounted(mp, None):
        if subprocess.run(["umount", mp], capture_output=True).returncode:
            subprocess.run(["umount", "-l", mp], capture_output=True)


def _unmount_fuse(mp: str) -> None:
    if is_mounted(mp, None):
        try:
            unmount(mp)
        except OSError:
            unmount(mp, lazy=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd():
    """An sshd of our own on 127.0.0.1: (port, client key). Killed at teardown."""
    base = tempfile.mkdtemp(prefix="shiftfs-sshd-", dir="/tmp")
    for key in ("host", "client"):
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{base}/{key}")
    os.rename(f"{base}/client.pub", f"{base}/authorized_keys")
    port = _free_port()
    with open(f"{base}/sshd_config", "w") as f:
        f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base}/host\n"
                f"AuthorizedKeysFile {base}/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                "StrictModes no\nPidFile none\nSubsystem sftp internal-sftp\n")
    made_run_dir = not os.path.isdir("/run/sshd")  # sshd insists on its privsep directory
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = open(f"{base}/log", "wb")
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", f"{base}/sshd_config"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, open(f"{base}/log").read()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "sshd did not listen within 10 s"
            time.sleep(0.05)
        yield port, f"{base}/client"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        if made_run_dir:
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")
        subprocess.run(["rm", "-rf", base])


def _populate(store: str) -> None:
    """Files and a directory of several lower owners, written to the store."""
    for name, (uid, gid) in OWNERS.items():
        with open(f"{store}/{name}", "w") as f:
            f.write(name)
        os.chown(f"{store}/{name}", uid, gid)
    os.mkdir(f"{store}/home")
    os.chown(f"{store}/home", USER, USER)
    os.mkdir(f"{store}/shared")  # set-gid, group 50: new entries take its group
    os.chown(f"{store}/shared", 0, 50)
    os.chmod(f"{store}/shared", 0o2777)


@contextlib.contextmanager
def make_lower(kind: str, base: str, sshd_info):
    """The lower of ``kind`` under ``base``, populated; always unmounted."""
    with contextlib.ExitStack() as stack:
        def mkdir(name):
            path = os.path.join(base, name)
            os.makedirs(path)
            os.chmod(path, 0o755)
            return path
        if kind == "tmpfs":
            path = mkdir("tmpfs")
            _run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path)
            stack.callback(_unmount_kernel, path)
            _populate(path)
            yield Lower(kind, path, path)
        elif kind == "overlayfs":
            lowerdir, upper, work, path = (mkdir(n) for n in ("ovl.lower", "ovl.upper",
                                                               "ovl.work", "ovl"))
            _populate(lowerdir)  # the owners come from the lower layer: chown copies up
            _run("mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={lowerdir},upperdir={upper},workdir={work}", path)
            stack.callback(_unmount_kernel, path)
            yield Lower(kind, path, path)
        elif kind == "bindfs":
            src, path = mkdir("bindfs.src"), mkdir("bindfs")
            _populate(src)
            _run("bindfs", src, path)
            stack.callback(_unmount_fuse, path)
            yield Lower(kind, path, src)
        elif kind == "sshfs":
            port, key = sshd_info
            src, path = mkdir("sftp.root"), mkdir("sshfs")
            _populate(src)
            ssh = (f"ssh -F /dev/null -i {key} -p {port} -o BatchMode=yes -o LogLevel=ERROR "
                   "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null")
            # allow_other: shiftfs acts with the caller's fsuid, not root's
            _run("sshfs", "-o", f"ssh_command={ssh}", "-o", "allow_other",
                 f"root@127.0.0.1:{src}", path)
            stack.callback(_unmount_fuse, path)
            yield Lower(kind, path, src)
        else:
            raise ValueError(kind)


@pytest.fixture(params=KINDS)
def lower(request, e2e_dir):
    sshd_info = request.getfixturevalue("sshd") if request.param == "sshfs" else None
    with make_lower(request.param, e2e_dir, sshd_info) as low:
        yield low


@pytest.fixture(params=["sshfs", "bindfs"])
def fuse_lower(request, e2e_dir):
    sshd_info = request.getfixturevalue("sshd") if request.param == "sshfs" else None
    with make_lower(request.param, e2e_dir, sshd_info) as low:
        yield low


@pytest.fixture
def sshfs_lower(e2e_dir, sshd):
    with make_lower("sshfs", e2e_dir, sshd) as low:
        yield low


def ids(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


# ---- what the kernel gives -------------------------------------------------------

def test_kernel_idmapped_mount_of_the_lower(lower, e2e_dir):
    """EINVAL for overlayfs, sshfs and bindfs (their filesystems do not allow
    idmapped mounts); tmpfs can be idmapped, and shows the shifted ids."""
    target = os.path.join(e2e_dir, "idmapped")
    os.mkdir(target)
    want = KERNEL_IDMAP[lower.kind]
    try:
        with idmapped_mount(lower.path, target, EXTENTS, EXTENTS):
            assert want is None, f"the kernel idmapped a {lower.kind} lower"
            assert ids(f"{target}/by-user") == (UP + USER, UP + USER)
    except OSError as e:
        assert want is not None, f"{lower.kind}: {e}"
        assert e.errno == want, e
    assert not is_mounted(target, None)


# ---- what shiftfs gives ------------------------------------------------------------

def test_ids_and_changes_through_shiftfs(lower, mounts):
    mnt = mounts.shiftfs(lower.path, table(UP))
    store = lower.store
    for name, (uid, gid) in OWNERS.items():
        assert ids(f"{mnt}/{name}") == (UP + uid, UP + gid), name
    assert ids(f"{mnt}/home") == (UP + USER, UP + USER)

    def as_root():  # container root (upper 100000), in its own user namespace
        with open(f"{mnt}/made", "w") as f:
            f.write("data through the mount")
        os.chown(f"{mnt}/made", USER, USER + 1)  # container ids: lower 1000:1001
        os.mkdir(f"{mnt}/dir")
        os.chmod(f"{mnt}/dir", 0o750)
        os.rename(f"{mnt}/made", f"{mnt}/dir/moved")
        os.symlink("dir/moved", f"{mnt}/link")
        os.link(f"{mnt}/dir/moved", f"{mnt}/hard")
        os.unlink(f"{mnt}/by-www")
        with open(f"{mnt}/hard") as f:
            return f.read()
    assert call_as_userns_root(as_root, **ROOT) == "data through the mount"
    assert ids(f"{store}/dir/moved") == (USER, USER + 1)
    assert ids(f"{mnt}/dir/moved") == (UP + USER, UP + USER + 1)
    assert ids(f"{store}/dir") == (0, 0)
    assert stat.S_IMODE(os.stat(f"{store}/dir").st_mode) == 0o750
    assert not os.path.exists(f"{store}/made") and not os.path.exists(f"{store}/by-www")
    assert os.readlink(f"{store}/link") == "dir/moved"
    assert ids(f"{store}/link") == (0, 0)
    a, b = os.stat(f"{store}/dir/moved"), os.stat(f"{store}/hard")
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
    with open(f"{store}/dir/moved") as f:
        assert f.read() == "data through the mount"

    def as_user():  # container user 1000 (upper 101000), no privileges
        with open(f"{mnt}/home/mine", "w") as f:
            f.write("mine")
        os.mkdir(f"{mnt}/home/sub")
        os.chmod(f"{mnt}/home/mine", 0o600)
        with open(f"{mnt}/shared/grouped", "w") as f:
            f.write("in a set-gid directory")
        return os.stat(f"{mnt}/home/mine").st_uid, open(f"{mnt}/home/mine").read()
    assert call_as(as_user, uid=UP + USER, gid=UP + USER) == (UP + USER, "mine")
    assert ids(f"{store}/home/mine") == (USER, USER)
    assert ids(f"{store}/home/sub") == (USER, USER)
    assert stat.S_IMODE(os.stat(f"{store}/home/mine").st_mode) == 0o600
    assert ids(f"{store}/shared/grouped") == (USER, 50)
    assert ids(f"{mnt}/shared/grouped") == (UP + USER, UP + 50)


def test_chown_of_a_symlink_never_reaches_its_target(lower, mounts):
    """lchown and lutimes through the mount change the symlink itself, where
    the lower can; sshfs cannot (sftp SETSTAT follows symlinks, so it would
    change whatever the link points to, on the server): refused there with
    EOPNOTSUPP, and the target is untouched either way."""
    mnt = mounts.shiftfs(lower.path, table(UP))
    os.symlink("by-root", f"{lower.store}/link")
    target_mtime = os.stat(f"{lower.store}/by-root").st_mtime_ns
    got = call_as_userns_root(lambda: os.chown(f"{mnt}/link", USER, USER, follow_symlinks=False),
                              **ROOT)
    times = call_as_userns_root(lambda: os.utime(f"{mnt}/link", (1, 1), follow_symlinks=False),
                                **ROOT)
    target = os.stat(f"{lower.store}/by-root")
    assert (target.st_uid, target.st_gid, target.st_mtime_ns) == (0, 0, target_mtime)
    if lower.kind == "sshfs":
        assert (got, times) == (Errno(errno.EOPNOTSUPP), Errno(errno.EOPNOTSUPP))
        assert ids(f"{lower.store}/link") == (0, 0)
    else:
        assert (got, times) == (None, None)
        link = os.lstat(f"{lower.store}/link")
        assert (link.st_uid, link.st_gid, link.st_mtime) == (USER, USER, 1)


def test_a_new_set_uid_file_gets_its_creators_owner_and_keeps_its_mode(fuse_lower, mounts):
    """sshfs makes a new file the server user's (root): shiftfs chowns it to
    its creator, and puts back the set-uid bit the chown would clear."""
    mnt = mounts.shiftfs(fuse_lower.path, table(UP))

    def make():
        fd = os.open(f"{mnt}/home/tool", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o4755)
        os.close(fd)
    assert call_as(make, uid=UP + USER, gid=UP + USER, umask=0o022) is None
    st = os.lstat(f"{fuse_lower.store}/home/tool")
    # bindfs itself makes a file as root and then chowns it, which clears
    # set-id bits (measured on bindfs 1.14 alone): its limit, not shiftfs's
    mode = 0o755 if fuse_lower.kind == "bindfs" else 0o4755
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, mode)


def test_idle_fds_on_a_fuse_lower_never_go_stale(fuse_lower):
    """A FUSE lower's file handles name its inodes only while its kernel
    keeps them: once the fd is given back and the inode evicted (memory
    pressure; here drop_caches), open_by_handle_at gives ESTALE. On such a
    lower nodes no request names keep their fds, and every node still
    answers."""
    from shiftfs.idmap import build_idmap
    from shiftfs.idmap import Extent
    from shiftfs.filesystem import Context
    from shiftfs.ops import Operations
    CTX = Context(0, 0, os.getpid())
    os.mkdir(f"{fuse_lower.store}/many")
    for i in range(20):
        with open(f"{fuse_lower.store}/many/f{i}", "w") as f:
            f.write(str(i))
    ops = Operations(fuse_lower.path, build_idmap([Extent(0, UP, 65536)], []))
    try:
        many = ops.lookup(CTX, 1, b"many").node_id
        nodes = [ops.lookup(CTX, many, f"f{i}".encode()).node_id for i in range(20)]
        ops.table.request_done()  # the lookups' requests have ended
        assert ops.table.give_back(20) == 0
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")  # evict unused dentries and inodes, as memory pressure does
        sizes = [ops.getattr(CTX, n, None)[0].st_size for n in nodes]
        assert sizes == [len(str(i)) for i in range(20)]
    finally:
        ops.destroy()


def test_what_sshfs_cannot_do_fails_with_a_clear_errno(sshfs_lower, mounts):
    """sftp has no extended attributes (so no ACLs or file capabilities) and
    no device nodes or FIFOs: the errno sshfs gives, never EIO."""
    mnt = mounts.shiftfs(sshfs_lower.path, table(UP))

    def attempts():
        out = []
        for call in (lambda: os.setxattr(f"{mnt}/by-user", "user.x", b"1"),
                     lambda: os.listxattr(f"{mnt}/by-user"),
                     lambda: os.getxattr(f"{mnt}/by-user", "system.posix_acl_access"),
                     lambda: os.mkfifo(f"{mnt}/fifo")):
            try:
                call()
                out.append(0)
            except OSError as e:
                out.append(e.errno)
        return out
    got = call_as_userns_root(attempts, **ROOT)
    assert got == [errno.EOPNOTSUPP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM]
    setfacl = subprocess.run(["setfacl", "-m", f"u:{UP + USER}:r", f"{mnt}/by-user"],
                             capture_output=True, text=True)
    assert setfacl.returncode != 0 and "not supported" in setfacl.stderr
    # a symlink cannot be chowned there without reaching its target, so the
    # one a user makes stays the server user's (lower 0, upper 100000)
    assert call_as(lambda: os.symlink("mine", f"{mnt}/home/link"), uid=UP + USER,
                   gid=UP + USER) is None
    assert ids(f"{sshfs_lower.store}/home/link") == (0, 0)


def test_the_mount_names_what_the_lower_lacks(lower, e2e_dir):
    mp = os.path.join(e2e_dir, "logged")
    os.mkdir(mp)
    log = os.path.join(e2e_dir, "log")
    with foreground_daemon(lower.path, mp, *args(STD), log=log):
        os.listdir(mp)
    lacks = [line for line in open(log).read().splitlines() if "lacks" in line]
    if lower.kind == "tmpfs":
        assert lacks == []
        return
    assert len(lacks) == 1, lacks
    line = lacks[0]
    assert lower.path in line
    assert ("file handles" in line) == (lower.kind != "tmpfs")
    assert ("extended attributes" in line) == (lower.kind == "sshfs")
    assert ("symlink" in line) == (lower.kind == "sshfs")
