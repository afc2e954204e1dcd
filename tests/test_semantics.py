"""Mounted checks of the documented differences from kernel idmapped
mounts (docs/semantics.md, Differences from kernel idmapped mounts) that the differential suite cannot show by
itself: what shiftfs does *instead*, on its own defaults."""

import errno
import os
import shutil
import struct
import subprocess
import time

import pytest

from shiftfs.idmap import Extent

from tests.callers import call_as

pytestmark = pytest.mark.needs_root

USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
OVERFLOW_UID = int(open("/proc/sys/kernel/overflowuid").read())


def acl(*entries):
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_nosuid_by_default(lower, mounter):
    """D4's context: without -o suid no set-id bit is honoured, so a set-uid
    file (here owned by lower 0, shown as upper 100000) runs as the caller."""
    binary = lower / "id"
    shutil.copy(shutil.which("id"), binary)
    os.chown(binary, 0, 0)
    os.chmod(binary, 0o4755)
    mnt = mounter(lower)
    st = os.stat(mnt / "id")
    assert (st.st_uid, st.st_mode & 0o7777) == (100000, 0o4755)  # the bit is shown...
    euid = call_as(lambda: subprocess.run([str(mnt / "id"), "-u"], capture_output=True,
                                          text=True, check=True).stdout.strip(),
                   uid=100005, gid=100005)
    assert euid == "100005"  # ...but not applied
    assert os.statvfs(mnt).f_flag & os.ST_NOSUID


def test_acl_entry_with_unmapped_id_grants_nothing_and_survives_a_write(lower, mounter):
    """Issue 12.4 / D1: an ACL entry naming an unmapped lower id (70000, and
    a group 70000) is not shown through the mount, so the kernel grants
    nothing by it: a caller with the overflow ids (65534, nobody) gets
    EACCES, as on a kernel idmapped mount. The rest of the ACL reads and
    works normally, and an ACL written through the mount (setfacl -m of
    another entry) keeps the unmapped entries on disk."""
    f = lower / "f"
    f.write_text("x")
    os.chown(f, 1000, 1000)
    os.setxattr(f, "system.posix_acl_access", acl(
        (USER_OBJ, 6, 0xFFFFFFFF), (USER, 6, 1001), (USER, 6, 70000), (GROUP_OBJ, 4, 0xFFFFFFFF),
        (GROUP, 6, 70000), (MASK, 6, 0xFFFFFFFF), (OTHER, 0, 0xFFFFFFFF)))
    mnt = mounter(lower)
    value = os.getxattr(mnt / "f", "system.posix_acl_access")
    entries = list(struct.iter_unpack("<HHI", value[4:]))
    assert [(tag, ident) for tag, _perm, ident in entries if tag in (USER, GROUP)] == [(USER, 101001)]

    def append(path):
        try:
            with open(path, "a") as fh:
                fh.write("y")
            return "ok"
        except OSError as e:
            return e.errno
    assert call_as(append, str(mnt / "f"), uid=OVERFLOW_UID, gid=OVERFLOW_UID) == errno.EACCES
    assert call_as(append, str(mnt / "f"), uid=101001, gid=101001) == "ok"  # the mapped entry works
    out = subprocess.run(["setfacl", "-m", "u:101002:r", str(mnt / "f")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    stored = list(struct.iter_unpack("<HHI", os.getxattr(f, "system.posix_acl_access")[4:]))
    assert [(t, i) for t, _p, i in stored if t in (USER, GROUP)] == [
        (USER, 1001), (USER, 1002), (USER, 70000), (GROUP, 70000)]


FROZEN_TABLE = [Extent(0, 0, 2000)]  # host root mapped (it may rename); lower 5000 is not


def _frozen_dir(lower, name="fzd", mode=0o700, gid=5000):
    d = lower / "pub" / name
    d.mkdir(parents=True)
    (d / "c").write_text("x")
    os.chmod(lower / "pub", 0o777)
    os.chown(d, 5000, gid)
    os.chmod(d, mode)
    return d


def test_frozen_dir_search_follows_renames(lower, mounter):
    """Lookups in a frozen directory are checked for search permission
    without capabilities, also after a directory above it was renamed
    through the mount (the check follows the new path)."""
    _frozen_dir(lower)
    mnt = mounter(lower, uidmap=FROZEN_TABLE, options=["-o", "entry_timeout=30,attr_timeout=30"])
    os.lstat(mnt / "pub" / "fzd")
    with pytest.raises(PermissionError):
        os.lstat(mnt / "pub" / "fzd" / "c")
    os.rename(mnt / "pub", mnt / "pub2")
    with pytest.raises(PermissionError):
        os.lstat(mnt / "pub2" / "fzd" / "c")
    with pytest.raises(PermissionError):
        os.listdir(mnt / "pub2" / "fzd")


def test_access_follows_frozen_rule(lower, mounter):
    """(Was D7.) access(2), which the FUSE client answers itself, refuses
    host root a frozen 0600 file as an idmapped mount does: the file's
    owner is shown as (uid_t)-1, which the client holds as INVALID_UID, so
    CAP_DAC_OVERRIDE does not apply. stat still shows the overflow id."""
    f = lower / "f"
    f.write_text("x")
    os.chown(f, 5000, 5000)
    os.chmod(f, 0o600)
    mnt = mounter(lower, uidmap=FROZEN_TABLE)
    assert (os.stat(mnt / "f").st_uid, os.stat(mnt / "f").st_gid) == (65534, 65534)
    assert not os.access(mnt / "f", os.R_OK)
    with pytest.raises(PermissionError):
        open(mnt / "f").close()


def test_name_in_frozen_dir_is_cached_and_still_refused(lower, mounter, counter):
    """(Was D8.) A name a member of a frozen directory's group looked up is
    kept by the kernel (no LOOKUP the second time), and host root, who may
    not search the directory, is refused by the kernel's own check before
    the name is reached, also with long timeouts."""
    _frozen_dir(lower, mode=0o750, gid=1500)
    mnt = mounter(lower, uidmap=FROZEN_TABLE, options=["-o", "entry_timeout=60,attr_timeout=60"])
    c = mnt / "pub" / "fzd" / "c"
    member = dict(uid=1001, gid=1001, groups=(1500,))
    assert call_as(lambda: os.lstat(c).st_uid, **member) == 0
    counter.start(os.stat(mnt).st_dev)
    assert call_as(lambda: os.lstat(c).st_uid, **member) == 0
    with pytest.raises(PermissionError):
        os.lstat(c)
    with pytest.raises(PermissionError):
        os.listdir(mnt / "pub" / "fzd")
    counts = counter.stop()
    # the kernel refreshes a directory's attributes once after refusing
    assert set(counts) <= {"FUSE_GETATTR", "FUSE_GETXATTR", "xattr:system.posix_acl_access"}, counts


def test_frozen_inodes_are_cached_and_decided_by_the_kernel(lower, mounter, counter):
    """Frozen inodes are cached like any inode: a second stat of a frozen
    file or directory sends no request. The FUSE client decides access to
    them itself, as an idmapped mount does, since their unmapped ids are
    shown as (uid_t)-1: host root's open of a frozen 0600 file, its listing
    of a frozen 0750 directory and its search there are refused again and
    again without a request, and a member of the directory's group keeps
    its way in from the kernel's cache."""
    d = _frozen_dir(lower, mode=0o750, gid=1500)
    f = lower / "pub" / "secret"
    f.write_text("x")
    os.chown(f, 5000, 5000)
    os.chmod(f, 0o600)
    mnt = mounter(lower, uidmap=FROZEN_TABLE)
    fz, sec = mnt / "pub" / "fzd", mnt / "pub" / "secret"
    member = dict(uid=1001, gid=1001, groups=(1500,))
    os.lstat(fz), os.lstat(sec)
    assert call_as(lambda: os.lstat(fz / "c").st_size, **member) == 1
    counter.start(os.stat(mnt).st_dev)
    for _ in range(3):
        time.sleep(0.05)  # a lifetime 0 would run out at the next jiffy
        os.lstat(fz), os.lstat(sec)
    counts = counter.stop()
    assert sum(v for k, v in counts.items() if k.startswith("FUSE_")) == 0, counts
    counter.start(os.stat(mnt).st_dev)
    for _ in range(3):
        with pytest.raises(PermissionError):
            open(sec).close()
        with pytest.raises(PermissionError):
            os.listdir(fz)
        with pytest.raises(PermissionError):
            os.lstat(fz / "c")
        assert call_as(lambda: os.lstat(fz / "c").st_size, **member) == 1
    counts = counter.stop()
    # what reaches the daemon: only the kernel's one refresh of the
    # attributes (and so the ACL) of the inode after each refusal
    assert set(counts) <= {"FUSE_GETATTR", "FUSE_GETXATTR", "xattr:system.posix_acl_access"}, counts
    assert counts["FUSE_GETATTR"] == 9, counts
    assert d.is_dir()
