"""Codecs for ids carried inside xattr values: POSIX ACLs and file capabilities.

Pure functions over bytes and an IdMap: no FUSE, no I/O. The daemon calls
``to_upper`` in getxattr (lower -> upper) and ``to_lower`` in setxattr
(upper -> lower); any other xattr passes through untouched. Errors are
XattrError, an OSError carrying the errno the FUSE layer should return.

A capability value can change size on the way (v2 is 20 bytes, v3 24), so
the caller must answer a size query with the length of the translated value.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Callable, NamedTuple, Union

from .idmap import IdMap

Buffer = Union[bytes, bytearray, memoryview]


class XattrError(OSError):
    """A value that cannot cross the mount; ``.errno`` is what FUSE returns."""

    def __init__(self, err: int, detail: str) -> None:
        super().__init__(err, f"{os.strerror(err)}: {detail}")


_u32 = struct.Struct("<I")

# ---- POSIX ACLs ---------------------------------------------------------

ACL_XATTR_VERSION = 2
ACL_USER_OBJ = 0x01
ACL_USER = 0x02
ACL_GROUP_OBJ = 0x04
ACL_GROUP = 0x08
ACL_MASK = 0x10
ACL_OTHER = 0x20
# Tags without an id: their id field is left exactly as found.
_ACL_IDLESS_TAGS = frozenset((ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER))
_ACL_TAGS = _ACL_IDLESS_TAGS | {ACL_USER, ACL_GROUP}

_ACL_HEADER_SIZE = 4
_acl_entry = struct.Struct("<HHI")


def unmapped_acl_id_to_upper(idmap: IdMap, group: bool) -> int:
    """What an ACL entry shows when its lower id has no upper counterpart.

    (uid_t)-1 would say "no id" honestly, but the kernel's FUSE client
    refuses a whole ACL that contains it, so the overflow id is the closest
    we can show. Kernel idmapped mounts show the overflow id too.
    """
    return idmap.overflow_gid if group else idmap.overflow_uid


def _acl_check(value: Buffer) -> None:
    size = len(value)
    if size < _ACL_HEADER_SIZE or (size - _ACL_HEADER_SIZE) % _acl_entry.size:
        raise XattrError(errno.EINVAL, f"POSIX ACL of {size} bytes is not 4 + 8*k")
    version = _u32.unpack_from(value)[0]
    if version != ACL_XATTR_VERSION:
        raise XattrError(errno.EINVAL, f"POSIX ACL version {version}, expected 2")


def acl_entries(value: Buffer) -> list[tuple[int, int, int]]:
    """The (tag, perm, id) entries of an ACL xattr, validated."""
    _acl_check(value)
    entries = list(_acl_entry.iter_unpack(memoryview(value)[_ACL_HEADER_SIZE:]))
    for i, (tag, _perm, _id) in enumerate(entries):
        if tag not in _ACL_TAGS:
            raise XattrError(errno.EINVAL, f"POSIX ACL entry {i}: unknown tag {tag:#x}")
    return entries


def _acl_map(value: Buffer, idmap: IdMap, upward: bool) -> bytes:
    _acl_check(value)
    out = bytearray(value)
    uids, gids = idmap.uids, idmap.gids
    unpack_from, pack_into = _acl_entry.unpack_from, _u32.pack_into
    for off in range(_ACL_HEADER_SIZE, len(out), _acl_entry.size):
        tag, _perm, id_ = unpack_from(out, off)
        if tag == ACL_USER:
            table, group = uids, False
        elif tag == ACL_GROUP:
            table, group = gids, True
        elif tag in _ACL_IDLESS_TAGS:
            continue
        else:
            index = (off - _ACL_HEADER_SIZE) // _acl_entry.size
            raise XattrError(errno.EINVAL, f"POSIX ACL entry {index}: unknown tag {tag:#x}")
        if upward:
            new = table.to_upper(id_)
            if new is None:
                new = unmapped_acl_id_to_upper(idmap, group)
        else:
            new = table.to_lower(id_)
            if new is None:
                kind = "gid" if group else "uid"
                raise XattrError(errno.EINVAL, f"POSIX ACL names {kind} {id_}, "
                                 "which has no lower counterpart")
        pack_into(out, off + 4, new)
    return bytes(out)


def _unmapped_entry(tag: int, id_: int, idmap: IdMap) -> bool:
    return ((tag == ACL_USER and idmap.uids.to_upper(id_) is None)
            or (tag == ACL_GROUP and idmap.gids.to_upper(id_) is None))


def acl_to_upper(value: Buffer, idmap: IdMap) -> bytes:
    """An ACL as stored (lower ids) -> as seen through the mount (upper
    ids). An entry whose lower id has no upper counterpart is left out: the
    kernel's FUSE client enforces what it is shown, and such an entry must
    grant nothing through the mount (a kernel idmapped mount matches no
    caller to it). The rest of the ACL, mask included, is kept."""
    _acl_check(value)
    kept = bytearray(value[:_ACL_HEADER_SIZE])
    for off in range(_ACL_HEADER_SIZE, len(value), _acl_entry.size):
        tag, _perm, id_ = _acl_entry.unpack_from(value, off)
        if not _unmapped_entry(tag, id_, idmap):
            kept += value[off:off + _acl_entry.size]
    return _acl_map(kept, idmap, True)


def acl_keep_unmapped(new_lower: Buffer, old_lower: Buffer | None, idmap: IdMap) -> bytes:
    """An ACL written through the mount (already in lower ids) with the
    entries of the stored ACL that the mount does not show (unmapped ids)
    put back, in the order the kernel wants (by tag, then id): writing an
    ACL through the mount never drops what it could not see. A mask is
    added if named entries need one."""
    new_lower = bytes(new_lower)
    if not old_lower:
        return new_lower
    try:
        old = acl_entries(old_lower)
    except OSError:
        return new_lower
    hidden = [e for e in old if _unmapped_entry(e[0], e[2], idmap)]
    if not hidden:
        return new_lower
    entries = acl_entries(new_lower) + hidden
    if not any(t == ACL_MASK for t, _p, _i in entries):
        perms = 0
        for t, p, _i in entries:
            if t in (ACL_GROUP_OBJ, ACL_USER, ACL_GROUP):
                perms |= p
        entries.append((ACL_MASK, perms, 0xFFFFFFFF))
    order = {ACL_USER_OBJ: 0, ACL_USER: 1, ACL_GROUP_OBJ: 2, ACL_GROUP: 3, ACL_MASK: 4, ACL_OTHER: 5}
    entries.sort(key=lambda e: (order[e[0]], e[2] if e[0] in (ACL_USER, ACL_GROUP) else 0))
    return new_lower[:_ACL_HEADER_SIZE] + b"".join(_acl_entry.pack(*e) for e in entries)


def acl_to_lower(value: Buffer, idmap: IdMap) -> bytes:
    """An ACL as written through the mount (upper ids) -> as to be stored."""
    return _acl_map(value, idmap, False)


# ---- file capabilities --------------------------------------------------

VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_FLAGS_MASK = 0x00FFFFFF
VFS_CAP_FLAGS_EFFECTIVE = 0x000001
VFS_CAP_REVISION_1 = 0x01000000
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_REVISION_3 = 0x03000000
_CAP_SIZES = {VFS_CAP_REVISION_1: 12, VFS_CAP_REVISION_2: 20, VFS_CAP_REVISION_3: 24}
_CAP_ROOTID_OFFSET = 20


def cap_fields(value: Buffer) -> tuple[int, int, int]:
    """(revision, magic_etc, root id) of a security.capability value,
    validated; v1 and v2 carry no root id and mean root id 0."""
    size = len(value)
    if size < 4:
        raise XattrError(errno.EINVAL, f"capability of {size} bytes has no header")
    magic = _u32.unpack_from(value)[0]
    revision = magic & VFS_CAP_REVISION_MASK
    expected = _CAP_SIZES.get(revision)
    if expected is None:
        raise XattrError(errno.EINVAL, f"capability revision {revision >> 24:#x} unknown")
    if size != expected:
        raise XattrError(errno.EINVAL, f"capability revision {revision >> 24} "
                         f"of {size} bytes, expected {expected}")
    root = _u32.unpack_from(value, _CAP_ROOTID_OFFSET)[0] if revision == VFS_CAP_REVISION_3 else 0
    return revision, magic, root


def _cap_encode(value: Buffer, revision: int, magic: int, root: int) -> bytes:
    """``value`` re-encoded for root id ``root``: unchanged (v1 and v2) when
    root is 0, else v3. Flag bits are carried over as found."""
    flags = magic & VFS_CAP_FLAGS_MASK
    if root == 0:
        if revision != VFS_CAP_REVISION_3:
            return bytes(value)
        return _u32.pack(VFS_CAP_REVISION_2 | flags) + bytes(value[4:20])
    data = bytes(value[4:20]) if revision != VFS_CAP_REVISION_1 else bytes(value[4:12]) + bytes(8)
    return _u32.pack(VFS_CAP_REVISION_3 | flags) + data + _u32.pack(root)


def cap_to_upper(value: Buffer, idmap: IdMap) -> bytes:
    """A capability as stored -> as read through the mount. A root id with
    no upper counterpart cannot be shown at all: EOVERFLOW, as the kernel."""
    revision, magic, root = cap_fields(value)
    upper = idmap.uids.to_upper(root)
    if upper is None:
        raise XattrError(errno.EOVERFLOW, f"capability root id {root} has no upper counterpart")
    return _cap_encode(value, revision, magic, upper)


def cap_to_lower(value: Buffer, idmap: IdMap) -> bytes:
    """A capability as written through the mount -> as to be stored."""
    revision, magic, root = cap_fields(value)
    lower = idmap.uids.to_lower(root)
    if lower is None:
        raise XattrError(errno.EINVAL, f"capability root id {root} has no lower counterpart")
    return _cap_encode(value, revision, magic, lower)


# ---- dispatch by name ---------------------------------------------------

class Codec(NamedTuple):
    to_upper: Callable[[Buffer, IdMap], bytes]
    to_lower: Callable[[Buffer, IdMap], bytes]


_ACL_CODEC = Codec(acl_to_upper, acl_to_lower)
_CAP_CODEC = Codec(cap_to_upper, cap_to_lower)

# Keyed by both str and bytes names so either finds its codec in one lookup.
CODECS: dict[Union[str, bytes], Codec] = {}
for _name, _codec in (("system.posix_acl_access", _ACL_CODEC),
                      ("system.posix_acl_default", _ACL_CODEC),
                      ("security.capability", _CAP_CODEC)):
    CODECS[_name] = CODECS[_name.encode()] = _codec
del _name, _codec


def to_upper(name: Union[str, bytes], value: Buffer, idmap: IdMap) -> Buffer:
    """getxattr: the value as seen through the mount (``value`` itself for
    names that carry no ids)."""
    codec = CODECS.get(name)
    return value if codec is None else codec.to_upper(value, idmap)


def to_lower(name: Union[str, bytes], value: Buffer, idmap: IdMap) -> Buffer:
    """setxattr: the value to store (``value`` itself for names that carry
    no ids)."""
    codec = CODECS.get(name)
    return value if codec is None else codec.to_lower(value, idmap)
