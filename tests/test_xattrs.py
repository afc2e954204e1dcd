"""Unit tests for shiftfs.xattrs: ACL and capability codecs, dispatch.

Expected values are built here with struct from the kernel's layout, never
taken from the code under test.
"""

import errno
import os
import random
import shutil
import struct
import subprocess

import pytest

from shiftfs.idmap import Extent, IdMap, IdTable, build_idmap
from shiftfs.xattrs import (CODECS, XattrError, acl_entries, acl_keep_unmapped, acl_to_lower, acl_to_upper,
                            cap_fields, cap_to_lower, cap_to_upper, to_lower, to_upper)

# Kernel constants, restated so a typo in the module cannot hide here.
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
NO_ID = 0xFFFFFFFF
REV1, REV2, REV3 = 0x01000000, 0x02000000, 0x03000000
EFFECTIVE = 0x1
CAP_NET_RAW = 13

ACL_NAMES = ["system.posix_acl_access", "system.posix_acl_default",
             b"system.posix_acl_access", b"system.posix_acl_default"]


def acl(*entries, version=2):
    return struct.pack("<I", version) + b"".join(struct.pack("<HHI", *e) for e in entries)


def cap_v1(flags, permitted, inheritable):
    return struct.pack("<III", REV1 | flags, permitted, inheritable)


def cap_v2(flags, p0, i0, p1=0, i1=0):
    return struct.pack("<IIIII", REV2 | flags, p0, i0, p1, i1)


def cap_v3(flags, p0, i0, p1=0, i1=0, root=0):
    return struct.pack("<IIIIII", REV3 | flags, p0, i0, p1, i1, root)


def shifted(base=100000, count=65536, overflow_uid=65534, overflow_gid=65534):
    table = [Extent(0, base, count)]
    return IdMap(IdTable(table), IdTable(table), overflow_uid, overflow_gid)


def minimal_acl(*extra):
    return acl((USER_OBJ, 6, NO_ID), *extra, (GROUP_OBJ, 4, NO_ID),
               (MASK, 6, NO_ID), (OTHER, 4, NO_ID))


def check_errno(err, fn, *args):
    with pytest.raises(XattrError) as info:
        fn(*args)
    assert isinstance(info.value, OSError)
    assert info.value.errno == err


# ---- ACLs ---------------------------------------------------------------

def test_acl_to_upper_maps_user_and_group_ids():
    m = build_idmap([Extent(0, 100000, 65536)], [Extent(0, 200000, 65536)])
    lower = minimal_acl((USER, 6, 1234), (GROUP, 4, 5678))
    assert acl_to_upper(lower, m) == minimal_acl((USER, 6, 101234), (GROUP, 4, 205678))
    assert acl_to_lower(minimal_acl((USER, 6, 101234), (GROUP, 4, 205678)), m) == lower


def test_acl_idless_entries_stay_byte_identical():
    # Odd values in the id field of id-less tags are not ours to fix.
    value = acl((USER_OBJ, 7, 0), (GROUP_OBJ, 5, 42), (MASK, 7, 3), (OTHER, 0, 12345))
    m = shifted()
    assert acl_to_upper(value, m) == value
    assert acl_to_lower(value, m) == value


def test_acl_header_only_passes():
    assert acl_to_upper(acl(), shifted()) == acl()
    assert acl_to_lower(acl(), shifted()) == acl()


def test_acl_entries_with_unmapped_lower_ids_are_left_out():
    """Issue 12.4: an entry the mount cannot map must grant nothing, and the
    FUSE client enforces what it is shown, so it is not shown."""
    m = shifted(count=1000, overflow_uid=60001, overflow_gid=60002)
    value = minimal_acl((USER, 6, 5000), (USER, 4, 7), (GROUP, 4, 5000), (GROUP, 2, NO_ID))
    assert acl_to_upper(value, m) == minimal_acl((USER, 4, 100007))


def test_acl_written_back_keeps_the_entries_it_could_not_show():
    m = shifted(count=1000)
    stored = acl((USER_OBJ, 6, NO_ID), (USER, 6, 7), (USER, 4, 5000), (GROUP_OBJ, 4, NO_ID),
                 (GROUP, 2, 6000), (MASK, 6, NO_ID), (OTHER, 0, NO_ID))
    shown = acl_to_upper(stored, m)
    assert shown == acl((USER_OBJ, 6, NO_ID), (USER, 6, 100007), (GROUP_OBJ, 4, NO_ID),
                        (MASK, 6, NO_ID), (OTHER, 0, NO_ID))
    # setfacl -m u:100008:r through the mount: what it writes, and what is stored
    written = acl((USER_OBJ, 6, NO_ID), (USER, 6, 100007), (USER, 4, 100008), (GROUP_OBJ, 4, NO_ID),
                  (MASK, 6, NO_ID), (OTHER, 0, NO_ID))
    merged = acl_keep_unmapped(acl_to_lower(written, m), stored, m)
    assert merged == acl((USER_OBJ, 6, NO_ID), (USER, 6, 7), (USER, 4, 8), (USER, 4, 5000),
                         (GROUP_OBJ, 4, NO_ID), (GROUP, 2, 6000), (MASK, 6, NO_ID), (OTHER, 0, NO_ID))
    # a minimal ACL written over one with hidden named entries gets a mask
    minimal = acl((USER_OBJ, 6, NO_ID), (GROUP_OBJ, 4, NO_ID), (OTHER, 0, NO_ID))
    assert acl_keep_unmapped(minimal, stored, m) == acl(
        (USER_OBJ, 6, NO_ID), (USER, 4, 5000), (GROUP_OBJ, 4, NO_ID), (GROUP, 2, 6000),
        (MASK, 6, NO_ID), (OTHER, 0, NO_ID))
    assert acl_keep_unmapped(written, None, m) == written


@pytest.mark.parametrize("tag", [USER, GROUP])
@pytest.mark.parametrize("upper_id", [0, 99999, 165536, NO_ID])
def test_acl_unmapped_upper_id_cannot_be_written(tag, upper_id):
    check_errno(errno.EINVAL, acl_to_lower, minimal_acl((tag, 6, upper_id)), shifted())


MALFORMED_ACLS = {
    "empty": b"",
    "short header": b"\x02\x00\x00",
    "partial entry": acl((USER_OBJ, 6, NO_ID)) + b"\x01\x00\x06",
    "one byte over": acl((USER_OBJ, 6, NO_ID)) + b"\x00",
    "version 0": acl((USER_OBJ, 6, NO_ID), version=0),
    "version 1": acl((USER_OBJ, 6, NO_ID), version=1),
    "version 3": acl(version=3),
    "version big-endian 2": struct.pack(">I", 2) + struct.pack("<HHI", USER_OBJ, 6, NO_ID),
    "tag 0": acl((0, 6, NO_ID)),
    "tag 3": acl((USER_OBJ, 6, NO_ID), (3, 6, 1)),
    "tag 0x40": acl((0x40, 6, 1)),
    "tag 0xffff": acl((0xFFFF, 6, 1)),
}


@pytest.mark.parametrize("name", MALFORMED_ACLS)
@pytest.mark.parametrize("fn", [acl_to_upper, acl_to_lower, lambda v, m: acl_entries(v)])
def test_acl_malformed_refused(name, fn):
    check_errno(errno.EINVAL, fn, MALFORMED_ACLS[name], shifted())


def test_acl_accepts_bytearray_and_memoryview():
    value = minimal_acl((USER, 6, 1))
    expected = minimal_acl((USER, 6, 100001))
    assert acl_to_upper(bytearray(value), shifted()) == expected
    assert acl_to_upper(memoryview(value), shifted()) == expected


def random_table(rng):
    """1-4 extents, disjoint on both sides, upper side in shuffled order."""
    n = rng.randint(1, 4)
    counts = [rng.choice([1, rng.randint(1, 70000)]) for _ in range(n)]
    lowers, pos = [], rng.randint(0, 2000)
    for c in counts:
        lowers.append(pos)
        pos += c + rng.randint(0, 50000)
    uppers, pos = [0] * n, rng.randint(0, 300000)
    for i in rng.sample(range(n), n):
        uppers[i] = pos
        pos += counts[i] + rng.randint(0, 50000)
    return [Extent(lo, up, c) for lo, up, c in zip(lowers, uppers, counts)]


def ref_map(extents, id_, upward):
    for e in extents:
        src, dst = (e.lower, e.upper) if upward else (e.upper, e.lower)
        if src <= id_ < src + e.count:
            return dst + id_ - src
    return None


def random_mapped_id(rng, extents, side):
    e = rng.choice(extents)
    return getattr(e, side) + rng.randrange(e.count)


@pytest.mark.parametrize("seed", range(200))
def test_acl_round_trip_random(seed):
    rng = random.Random(seed)
    uext, gext = random_table(rng), random_table(rng)
    m = IdMap(IdTable(uext), IdTable(gext), 65534, 65533)
    entries = []
    for _ in range(rng.randint(0, 12)):
        tag = rng.choice([USER_OBJ, USER, USER, GROUP_OBJ, GROUP, GROUP, MASK, OTHER])
        if tag in (USER, GROUP):
            id_ = random_mapped_id(rng, uext if tag == USER else gext, "lower")
        else:
            id_ = rng.choice([NO_ID, 0, rng.getrandbits(32)])
        entries.append((tag, rng.randrange(8), id_))
    lower = acl(*entries)
    expected_upper = acl(*[
        (t, p, ref_map(uext if t == USER else gext, i, True) if t in (USER, GROUP) else i)
        for t, p, i in entries])
    assert acl_to_upper(lower, m) == expected_upper
    assert acl_to_lower(expected_upper, m) == lower


@pytest.mark.parametrize("seed", range(100))
def test_acl_random_unmapped_ids(seed):
    rng = random.Random(1000 + seed)
    uext, gext = random_table(rng), random_table(rng)
    m = IdMap(IdTable(uext), IdTable(gext), 60001, 60002)
    entries = [(rng.choice([USER, GROUP]), 6, rng.getrandbits(32)) for _ in range(8)]
    expected = []
    for t, p, i in entries:
        up = ref_map(uext if t == USER else gext, i, True)
        if up is not None:  # entries with unmapped ids are left out
            expected.append((t, p, up))
    assert acl_to_upper(acl(*entries), m) == acl(*expected)
    unmappable = [(t, p, i) for t, p, i in entries
                  if ref_map(uext if t == USER else gext, i, False) is None]
    if unmappable:
        check_errno(errno.EINVAL, acl_to_lower, acl(*entries), m)


# ---- capabilities -------------------------------------------------------

def test_cap_v2_reads_as_v3_with_mapped_root():
    lower = cap_v2(EFFECTIVE, 1 << CAP_NET_RAW, 0, 3, 4)
    assert cap_to_upper(lower, shifted()) == cap_v3(EFFECTIVE, 1 << CAP_NET_RAW, 0, 3, 4,
                                                   root=100000)


def test_cap_v3_whose_root_maps_to_lower_0_is_stored_as_v2():
    upper = cap_v3(EFFECTIVE, 5, 6, 7, 8, root=100000)
    assert cap_to_lower(upper, shifted()) == cap_v2(EFFECTIVE, 5, 6, 7, 8)


def test_cap_v3_mapped_root_stays_v3_both_ways():
    lower = cap_v3(0, 1, 2, 3, 4, root=42)
    upper = cap_v3(0, 1, 2, 3, 4, root=100042)
    assert cap_to_upper(lower, shifted()) == upper
    assert cap_to_lower(upper, shifted()) == lower


def test_cap_root_that_maps_to_upper_0_reads_as_v2():
    m = build_idmap([Extent(1000, 0, 1000)], [Extent(1000, 0, 1000)])
    assert cap_to_upper(cap_v3(EFFECTIVE, 9, 0, root=1000), m) == cap_v2(EFFECTIVE, 9, 0)
    assert cap_to_lower(cap_v2(EFFECTIVE, 9, 0), m) == cap_v3(EFFECTIVE, 9, 0, root=1000)


def test_cap_identity_root_unchanged():
    m = build_idmap([Extent(0, 0, 65536)], [Extent(0, 0, 65536)])
    for value in (cap_v1(EFFECTIVE, 1, 2), cap_v2(0, 1, 2, 3, 4)):
        assert cap_to_upper(value, m) == value
        assert cap_to_lower(value, m) == value


def test_cap_v1_with_shifted_root_becomes_v3():
    # v1 has one data pair and no root id; the second pair is zero.
    assert cap_to_upper(cap_v1(EFFECTIVE, 7, 8), shifted()) == cap_v3(EFFECTIVE, 7, 8, 0, 0,
                                                                     root=100000)


def test_cap_v3_unmapped_root():
    check_errno(errno.EOVERFLOW, cap_to_upper, cap_v3(0, 1, 0, root=70000), shifted())
    check_errno(errno.EINVAL, cap_to_lower, cap_v3(0, 1, 0, root=5), shifted())


def test_cap_v1_v2_unmapped_root_0():
    # Root id 0 is implied; with lower 0 unmapped it cannot be shown, and upper
    # 0 unmapped means a v2 written through the mount has nowhere to go.
    m = build_idmap([Extent(1, 100001, 100)], [Extent(1, 100001, 100)])
    for value in (cap_v1(0, 1, 0), cap_v2(0, 1, 0)):
        check_errno(errno.EOVERFLOW, cap_to_upper, value, m)
        check_errno(errno.EINVAL, cap_to_lower, value, shifted())


def test_cap_fields():
    assert cap_fields(cap_v1(EFFECTIVE, 1, 2)) == (REV1, REV1 | EFFECTIVE, 0)
    assert cap_fields(cap_v2(0, 1, 2)) == (REV2, REV2, 0)
    assert cap_fields(cap_v3(EFFECTIVE, 1, 2, root=77)) == (REV3, REV3 | EFFECTIVE, 77)


MALFORMED_CAPS = {
    "empty": b"",
    "short header": b"\x00\x00\x00",
    "header only v2": struct.pack("<I", REV2),
    "revision 0": struct.pack("<IIIII", 0, 1, 2, 3, 4),
    "revision 4": struct.pack("<IIIIII", 0x04000000, 1, 2, 3, 4, 0),
    "revision 0xff": struct.pack("<IIIIII", 0xFF000000, 1, 2, 3, 4, 0),
    "v1 of 20 bytes": struct.pack("<IIIII", REV1, 1, 2, 3, 4),
    "v2 of 12 bytes": struct.pack("<III", REV2, 1, 2),
    "v2 of 24 bytes": struct.pack("<IIIIII", REV2, 1, 2, 3, 4, 5),
    "v2 of 21 bytes": cap_v2(0, 1, 2) + b"\x00",
    "v3 of 20 bytes": struct.pack("<IIIII", REV3, 1, 2, 3, 4),
    "v3 of 28 bytes": cap_v3(0, 1, 2) + b"\x00" * 4,
    "big-endian v2": struct.pack(">IIIII", REV2, 1, 2, 3, 4),
}


@pytest.mark.parametrize("name", MALFORMED_CAPS)
@pytest.mark.parametrize("fn", [cap_to_upper, cap_to_lower])
def test_cap_malformed_refused(name, fn):
    check_errno(errno.EINVAL, fn, MALFORMED_CAPS[name], shifted())


@pytest.mark.parametrize("seed", range(200))
def test_cap_round_trip_random(seed):
    rng = random.Random(seed)
    uext = random_table(rng)
    m = IdMap(IdTable(uext), IdTable(uext))
    flags = rng.choice([0, EFFECTIVE])
    data = [rng.getrandbits(32) for _ in range(4)]
    lower_root = random_mapped_id(rng, uext, "lower")
    upper_root = ref_map(uext, lower_root, True)
    lower = cap_v3(flags, *data, root=lower_root) if lower_root else cap_v2(flags, *data)
    upper = cap_v3(flags, *data, root=upper_root) if upper_root else cap_v2(flags, *data)
    assert cap_to_upper(lower, m) == upper
    assert cap_to_lower(upper, m) == lower


# ---- dispatch -----------------------------------------------------------

@pytest.mark.parametrize("name", ACL_NAMES)
def test_dispatch_acl_names(name):
    m = shifted()
    lower = minimal_acl((USER, 6, 1), (GROUP, 4, 2))
    upper = minimal_acl((USER, 6, 100001), (GROUP, 4, 100002))
    assert to_upper(name, lower, m) == upper
    assert to_lower(name, upper, m) == lower


@pytest.mark.parametrize("name", ["security.capability", b"security.capability"])
def test_dispatch_cap_names(name):
    assert to_upper(name, cap_v2(0, 1, 2), shifted()) == cap_v3(0, 1, 2, root=100000)
    assert to_lower(name, cap_v3(0, 1, 2, root=100000), shifted()) == cap_v2(0, 1, 2)
    check_errno(errno.EINVAL, to_lower, name, b"junk", shifted())


@pytest.mark.parametrize("name", ["user.test", b"user.test", "security.selinux",
                                  "trusted.overlay.opaque", "system.posix_acl_access2",
                                  b"system.posix_acl", "SYSTEM.POSIX_ACL_ACCESS",
                                  "security.capability\0", ""])
def test_dispatch_other_names_pass_through(name):
    # Looks like a malformed ACL/capability; must not be parsed at all.
    value = b"\x02\x00\x00\x00\x02\x00\x06\x00\x01\x00\x00"
    assert to_upper(name, value, shifted()) is value
    assert to_lower(name, value, shifted()) is value
    assert value == b"\x02\x00\x00\x00\x02\x00\x06\x00\x01\x00\x00"


def test_codecs_cover_both_spellings():
    names = {"system.posix_acl_access", "system.posix_acl_default", "security.capability"}
    assert set(CODECS) == names | {n.encode() for n in names}


def test_xattr_error_is_an_oserror_with_errno():
    err = XattrError(errno.EOVERFLOW, "detail")
    assert isinstance(err, OSError) and err.errno == errno.EOVERFLOW
    assert "detail" in str(err)


# ---- against the real tools ---------------------------------------------

def run_tool(*argv):
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} not installed (apt-get install -y acl attr libcap2-bin)")
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        if "not supported" in proc.stderr.lower():
            pytest.skip(f"{argv[0]}: {proc.stderr.strip()}")
        pytest.fail(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


def test_setfacl_value_decodes(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"")
    run_tool("setfacl", "-m", "u:1234:rw,g:5678:r", str(f))
    value = os.getxattr(f, "system.posix_acl_access")
    entries = acl_entries(value)
    assert (USER, 6, 1234) in entries
    assert (GROUP, 4, 5678) in entries
    assert {t for t, _, _ in entries} == {USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER}

    upper = acl_entries(acl_to_upper(value, shifted()))
    assert (USER, 6, 101234) in upper and (GROUP, 4, 105678) in upper


def test_acl_to_lower_is_what_setfacl_reads(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    run_tool("setfacl", "-d", "-m", "u:1:r", str(d))  # make sure default ACLs work here
    # The kernel wants entries in tag order, ids ascending.
    upper = acl((USER_OBJ, 6, NO_ID), (USER, 6, 101234), (GROUP_OBJ, 4, NO_ID),
                (GROUP, 4, 105678), (MASK, 6, NO_ID), (OTHER, 4, NO_ID))
    os.setxattr(d, "system.posix_acl_default", to_lower("system.posix_acl_default", upper,
                                                        shifted()))
    listing = run_tool("getfacl", "-n", "-d", "-c", str(d)).split()
    assert "user:1234:rw-" in listing
    assert "group:5678:r--" in listing


def test_setcap_value_decodes(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"")
    run_tool("setcap", "cap_net_raw+ep", str(f))
    value = os.getxattr(f, "security.capability")
    assert cap_fields(value) == (REV2, REV2 | EFFECTIVE, 0)
    assert struct.unpack("<IIIII", value)[1] == 1 << CAP_NET_RAW

    upper = cap_to_upper(value, shifted())
    assert cap_fields(upper) == (REV3, REV3 | EFFECTIVE, 100000)
    # The kernel accepts our v3 as is and getcap reads the same root id back.
    os.setxattr(f, "security.capability", upper)
    assert "[rootid=100000]" in run_tool("getcap", "-n", str(f))
    assert "cap_net_raw=ep" in run_tool("getcap", str(f))
