"""shiftfs.policy as a table: the kernel's decisions for frozen inodes and
unmapped callers, without a mount. The expected errnos are the ones the
differential suite measured on a kernel idmapped mount
(tests/oracle/test_differential.py); the case names there are given."""

import errno
import os
import stat

import pytest

from shiftfs import policy
from shiftfs.idmap import Extent, IdTable

UIDS = IdTable([Extent(0, 100000, 2000)])
GIDS = IdTable([Extent(0, 100000, 2000)])
Z = 5000  # an unmapped lower id


def st(uid=1000, gid=1000, mode=stat.S_IFREG | 0o644):
    return os.stat_result((mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))


MAPPED, FROZEN, FROZEN_U, FROZEN_G = st(), st(Z, Z), st(Z, 1000), st(1000, Z)
DIR, FROZEN_DIR = st(mode=stat.S_IFDIR | 0o777), st(Z, Z, stat.S_IFDIR | 0o777)


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


@pytest.mark.parametrize("inode,frozen", [(MAPPED, False), (FROZEN, True), (FROZEN_U, True),
                                          (FROZEN_G, True), (st(1999, 1999), False),
                                          (st(2000, 0), True), (st(0, 0xFFFFFFFE), True)])
def test_is_frozen(inode, frozen):
    assert policy.is_frozen(inode, UIDS, GIDS) is frozen


@pytest.mark.parametrize("what,expected", [
    ("write", errno.EACCES),      # write_frozen, truncate_frozen
    ("utimes", errno.EACCES),     # utime_now_frozen
    ("chmod", errno.EOVERFLOW),   # chmod_frozen-host_root, utime_set_frozen-host_root
    ("setxattr", errno.EPERM),    # setxattr_user_frozen, set_acl_frozen, set_cap_frozen
    ("unlink", errno.EOVERFLOW),  # unlink_frozen, rmdir_frozen
    ("rename", errno.EOVERFLOW),  # rename_frozen, rename_onto_frozen
    ("link", errno.EOVERFLOW),    # link_frozen
])
def test_check_modify(what, expected):
    for inode in (FROZEN, FROZEN_U, FROZEN_G):
        assert errno_of(policy.check_modify, inode, UIDS, GIDS, what) == expected
    assert errno_of(policy.check_modify, MAPPED, UIDS, GIDS, what) is None


def test_create_order():
    # create / mkdir / symlink in a frozen directory: an unmapped caller is
    # told EOVERFLOW first (create_in_frozen_dir-unmapped), a mapped one EACCES
    assert errno_of(policy.check_create, False, FROZEN_DIR, UIDS, GIDS) == errno.EOVERFLOW
    assert errno_of(policy.check_create, True, FROZEN_DIR, UIDS, GIDS) == errno.EACCES
    assert errno_of(policy.check_create, False, DIR, UIDS, GIDS) == errno.EOVERFLOW
    assert errno_of(policy.check_create, True, DIR, UIDS, GIDS) is None


def test_delete_order():
    # unlink_frozen: the victim first; unlink_in_frozen_dir: then the directory
    assert errno_of(policy.check_delete, FROZEN, FROZEN_DIR, UIDS, GIDS) == errno.EOVERFLOW
    assert errno_of(policy.check_delete, MAPPED, FROZEN_DIR, UIDS, GIDS) == errno.EACCES
    assert errno_of(policy.check_delete, MAPPED, DIR, UIDS, GIDS) is None


def test_link_order():
    assert errno_of(policy.check_link, FROZEN, True, DIR, UIDS, GIDS) == errno.EOVERFLOW
    assert errno_of(policy.check_link, MAPPED, False, FROZEN_DIR, UIDS, GIDS) == errno.EOVERFLOW
    assert errno_of(policy.check_link, MAPPED, True, FROZEN_DIR, UIDS, GIDS) == errno.EACCES
    assert errno_of(policy.check_link, MAPPED, True, DIR, UIDS, GIDS) is None


@pytest.mark.parametrize("old,old_dir,new,new_dir,caller_mapped,expected", [
    (MAPPED, DIR, None, DIR, True, None),                       # rename
    (MAPPED, DIR, None, DIR, False, errno.EOVERFLOW),           # rename-unmapped (new name)
    (MAPPED, DIR, MAPPED, DIR, False, None),                    # rename_replace-unmapped
    (FROZEN, DIR, None, DIR, True, errno.EOVERFLOW),            # rename_frozen
    (MAPPED, DIR, FROZEN, DIR, True, errno.EOVERFLOW),          # rename_onto_frozen
    (MAPPED, FROZEN_DIR, None, DIR, True, errno.EACCES),        # rename_out_of_frozen_dir
    (MAPPED, DIR, None, FROZEN_DIR, True, errno.EACCES),        # rename_into_frozen_dir
    (MAPPED, DIR, None, FROZEN_DIR, False, errno.EOVERFLOW),    # ...-unmapped
    (MAPPED, DIR, MAPPED, FROZEN_DIR, True, errno.EACCES),      # rename_over_in_frozen_dir
])
def test_check_rename(old, old_dir, new, new_dir, caller_mapped, expected):
    assert errno_of(policy.check_rename, old, old_dir, new, new_dir, caller_mapped,
                    UIDS, GIDS) == expected


@pytest.mark.parametrize("atime,mtime,kind", [
    (None, None, "utimes"),
    (policy.UTIME_NOW, policy.UTIME_NOW, "utimes"),      # utime_now_frozen: EACCES
    (policy.UTIME_NOW, policy.UTIME_OMIT, "chmod"),      # utime_now_omit_frozen: EOVERFLOW
    (5, 6, "chmod"),                                      # utime_set_frozen: EOVERFLOW
])
def test_utimes_kind(atime, mtime, kind):
    assert policy.utimes_kind(atime, mtime) == kind


@pytest.mark.parametrize("inode,caller,new_uid,new_gid,expected", [
    (FROZEN, 0, 1000, 1000, None),                  # chown_frozen_out-host_root
    (FROZEN_U, 0, 1000, -1, None),                  # chown_frozen_uid_only-host_root
    (FROZEN_U, 0, -1, 1000, errno.EOVERFLOW),       # chown_frozen_gid_only-host_root
    (FROZEN, 0, -1, -1, errno.EOVERFLOW),           # (D3: never reaches the daemon)
    (FROZEN_G, 0, 1000, -1, errno.EOVERFLOW),
    (FROZEN, 100000, 1000, 1000, errno.EOVERFLOW),  # only host root may unfreeze
    (MAPPED, 100000, 1001, -1, None),
])
def test_check_chown(inode, caller, new_uid, new_gid, expected):
    assert errno_of(policy.check_chown, inode, UIDS, GIDS, caller, new_uid, new_gid) == expected


@pytest.mark.parametrize("mode,in_group,capable,drops", [
    (stat.S_IFREG | 0o2644, False, False, True),    # chown_sgid_nx_uid-gid_unmapped
    (stat.S_IFREG | 0o2644, True, False, False),
    (stat.S_IFREG | 0o2644, False, True, False),
    (stat.S_IFREG | 0o2754, False, False, False),   # with group exec the FUSE client does it
    (stat.S_IFREG | 0o644, False, False, False),
    (stat.S_IFDIR | 0o2755, False, False, False),   # directories keep S_ISGID on chown
])
def test_chown_drops_sgid(mode, in_group, capable, drops):
    assert policy.chown_drops_sgid(st(mode=mode), in_group, capable) is drops


def test_proc_parsers():
    status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000000010\n"
    assert policy.parse_cap_eff(status) == 0x10
    assert policy.parse_cap_eff("Name: x\n") == 0
    uid_map = "         0     100000       2000\n      5000       4000          1\n"
    assert policy.id_in_map(uid_map, 100000) and policy.id_in_map(uid_map, 101999)
    assert policy.id_in_map(uid_map, 4000)
    assert not policy.id_in_map(uid_map, 102000) and not policy.id_in_map(uid_map, 0)
