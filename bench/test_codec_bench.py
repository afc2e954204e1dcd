"""pytest-benchmark: cost of the xattr codecs per getxattr/setxattr.

The non-matching dispatch is what nearly every getxattr pays (security.selinux,
user.*), so it is the number that matters most.
"""

import struct

import pytest

from shiftfs.idmap import Extent, build_idmap
from shiftfs.xattrs import acl_to_lower, acl_to_upper, cap_to_lower, cap_to_upper, to_upper

USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def acl(*entries):
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.fixture(scope="module")
def idmap():
    return build_idmap([Extent(0, 100000, 65536)], [Extent(0, 100000, 65536)])


def ten_entry_acl(base):
    return acl((USER_OBJ, 6, NO_ID), (USER, 6, base + 1), (USER, 4, base + 2),
               (USER, 4, base + 3), (GROUP_OBJ, 4, NO_ID), (GROUP, 4, base + 10),
               (GROUP, 6, base + 11), (GROUP, 4, base + 12), (MASK, 6, NO_ID),
               (OTHER, 4, NO_ID))


def test_acl_to_upper_10(benchmark, idmap):
    value = ten_entry_acl(1000)
    assert benchmark(acl_to_upper, value, idmap) == ten_entry_acl(101000)


def test_acl_to_lower_10(benchmark, idmap):
    value = ten_entry_acl(101000)
    assert benchmark(acl_to_lower, value, idmap) == ten_entry_acl(1000)


def test_cap_to_upper_v2(benchmark, idmap):
    value = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    assert len(benchmark(cap_to_upper, value, idmap)) == 24


def test_cap_to_lower_v3(benchmark, idmap):
    value = struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, 100000)
    assert len(benchmark(cap_to_lower, value, idmap)) == 20


@pytest.mark.parametrize("name", ["security.selinux", b"security.selinux"], ids=["str", "bytes"])
def test_dispatch_non_matching(benchmark, idmap, name):
    value = b"system_u:object_r:etc_t:s0\0"
    assert benchmark(to_upper, name, value, idmap) is value
