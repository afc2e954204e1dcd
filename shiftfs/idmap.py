"""The id range table: lower ids (as stored) <-> upper ids (as seen).

An extent ``LOWER:UPPER:COUNT`` says lower ids LOWER..LOWER+COUNT-1 are seen
as UPPER..UPPER+COUNT-1: the order of a /proc/PID/uid_map line (inside,
outside, count) and of bindfs ``--map=from/to``.

Pure Python: no FUSE, no I/O beyond reading /proc and /etc/sub{u,g}id.
Every function name says its direction (``to_upper``: lower -> upper).
"""

from __future__ import annotations

import grp
import pwd
import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Iterable, Sequence

from sortedcontainers import SortedKeyList

ID_MAX = 4294967294  # (uid_t)-1 is "no id"; the last real id is one below
INVALID_ID = 4294967295
_CACHE_LIMIT = 65536


class TableError(ValueError):
    """A table that cannot be used; the message names the offending extent."""


@dataclass(frozen=True, order=True)
class Extent:
    lower: int
    upper: int
    count: int

    @property
    def lower_end(self) -> int:
        return self.lower + self.count - 1

    @property
    def upper_end(self) -> int:
        return self.upper + self.count - 1

    def __str__(self) -> str:
        return f"{self.lower}:{self.upper}:{self.count}"


def _id_field(text: str, what: str, extent_text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()):
        raise TableError(f"extent '{extent_text}': {what} '{text}' is not a non-negative number")
    return int(text)


def parse_extent(text: str) -> Extent:
    """Parse ``LOWER:UPPER:COUNT``. Two fields are refused: ``0:100000``
    most likely means a shift of the whole range, and taking it as one id
    would leave every other id unmapped (frozen) without a word."""
    fields = text.strip().split(":")
    if len(fields) == 2 and all(re.fullmatch(r"[0-9]+", f.strip()) for f in fields):
        lower, upper = (f.strip() for f in fields)
        raise TableError(
            f"extent '{text}': COUNT missing; an extent is LOWER:UPPER:COUNT, e.g. "
            f"{lower}:{upper}:65536 for a range, or {lower}:{upper}:1 (--map {lower}/{upper}) "
            "for one id")
    if len(fields) != 3:
        raise TableError(f"extent '{text}': expected LOWER:UPPER:COUNT")
    lower = _id_field(fields[0], "lower id", text)
    upper = _id_field(fields[1], "upper id", text)
    count = _id_field(fields[2], "count", text)
    extent = Extent(lower, upper, count)
    check_extent(extent)
    return extent


def parse_extents(text: str) -> list[Extent]:
    """One or more extents in one string, as ``--uidmap`` takes them:
    separated by spaces, '+' or ';' ('+' inside ``-o``, where commas
    separate options)."""
    items = [t for t in re.split(r"[\s+;]+", text) if t]
    if not items:
        raise TableError("empty table: expected LOWER:UPPER:COUNT")
    return [parse_extent(t) for t in items]


def check_extent(extent: Extent) -> None:
    if extent.count < 1:
        raise TableError(f"extent '{extent}': count must be at least 1")
    for side, start in (("lower", extent.lower), ("upper", extent.upper)):
        if start + extent.count - 1 > ID_MAX:
            raise TableError(
                f"extent '{extent}': {side} range ends past {ID_MAX}, the largest id")


class IdTable:
    """A bijection between lower and upper ids made of disjoint extents.

    Extents are kept sorted twice, by lower start and by upper start (as the
    kernel keeps a uid_map), and looked up by bisection. Ids asked for are
    memoised: a tree holds few distinct ids and every getattr asks again.
    """

    def __init__(self, extents: Iterable[Extent] = ()) -> None:
        self._by_lower = SortedKeyList(key=lambda e: e.lower)
        self._by_upper = SortedKeyList(key=lambda e: e.upper)
        for extent in extents:
            self._add(extent)
        self._lower_starts = [e.lower for e in self._by_lower]
        self._upper_starts = [e.upper for e in self._by_upper]
        self._to_upper_cache: dict[int, int | None] = {}
        self._to_lower_cache: dict[int, int | None] = {}

    def _add(self, extent: Extent) -> None:
        check_extent(extent)
        for side, index in (("lower", self._by_lower), ("upper", self._by_upper)):
            start = getattr(extent, side)
            end = start + extent.count - 1
            pos = index.bisect_key_right(start)
            for neighbour in index.islice(max(pos - 1, 0), pos + 1):
                n_start = getattr(neighbour, side)
                if n_start <= end and start <= n_start + neighbour.count - 1:
                    raise TableError(
                        f"extents '{neighbour}' and '{extent}' overlap on the {side} side")
        self._by_lower.add(extent)
        self._by_upper.add(extent)

    @property
    def extents(self) -> list[Extent]:
        """Extents in lower order."""
        return list(self._by_lower)

    def __bool__(self) -> bool:
        return bool(self._by_lower)

    def __len__(self) -> int:
        return len(self._by_lower)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdTable) and self.extents == other.extents

    def __repr__(self) -> str:
        return f"IdTable({' '.join(map(str, self._by_lower))})"

    def to_upper(self, lower_id: int) -> int | None:
        """The upper id a lower id is seen as, or None if it is unmapped."""
        try:
            return self._to_upper_cache[lower_id]
        except KeyError:
            pass
        result = None
        pos = bisect_right(self._lower_starts, lower_id) - 1
        if pos >= 0:
            extent = self._by_lower[pos]
            if lower_id - extent.lower < extent.count:
                result = extent.upper + (lower_id - extent.lower)
        if len(self._to_upper_cache) >= _CACHE_LIMIT:
            self._to_upper_cache.clear()
        self._to_upper_cache[lower_id] = result
        return result

    def to_lower(self, upper_id: int) -> int | None:
        """The lower id an upper id is stored as, or None if it is unmapped."""
        try:
            return self._to_lower_cache[upper_id]
        except KeyError:
            pass
        result = None
        pos = bisect_right(self._upper_starts, upper_id) - 1
        if pos >= 0:
            extent = self._by_upper[pos]
            if upper_id - extent.upper < extent.count:
                result = extent.lower + (upper_id - extent.upper)
        if len(self._to_lower_cache) >= _CACHE_LIMIT:
            self._to_lower_cache.clear()
        self._to_lower_cache[upper_id] = result
        return result

    def maps_to_upper(self, upper_id: int) -> bool:
        return self.to_lower(upper_id) is not None


def read_overflow_id(kind: str) -> int:
    """The kernel's overflowuid/overflowgid (shown for unmapped ids)."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 65534


@dataclass
class IdMap:
    """The uid table and the gid table of one mount."""

    uids: IdTable
    gids: IdTable
    overflow_uid: int = 65534
    overflow_gid: int = 65534

    def uid_to_upper(self, lower_uid: int) -> int:
        up = self.uids.to_upper(lower_uid)
        return self.overflow_uid if up is None else up

    def gid_to_upper(self, lower_gid: int) -> int:
        up = self.gids.to_upper(lower_gid)
        return self.overflow_gid if up is None else up

    def describe(self) -> str:
        """The effective table, one extent a line, as printed at mount time."""
        lines = []
        for kind, table in (("u", self.uids), ("g", self.gids)):
            for e in table.extents:
                lines.append(f"{kind}:{e}  lower {e.lower}..{e.lower_end} "
                             f"-> upper {e.upper}..{e.upper_end}")
        return "\n".join(lines)


# ---- sources of extents -------------------------------------------------

def parse_map_spec(spec: str) -> tuple[list[Extent], list[Extent]]:
    """``--map``: ``u:``/``g:``/``b:`` prefixed extents, separated by spaces
    or commas. Returns (uid extents, gid extents)."""
    uid_extents: list[Extent] = []
    gid_extents: list[Extent] = []
    items = [s for s in re.split(r"[\s,]+", spec.strip())]
    if not spec.strip():
        raise TableError("empty map: expected u:, g: or b: LOWER:UPPER:COUNT")
    for item in items:
        if not item:
            raise TableError(f"map '{spec}': empty extent (stray separator)")
        prefix, sep, rest = item.partition(":")
        if not sep or prefix not in ("u", "g", "b"):
            raise TableError(f"extent '{item}': expected a u:, g: or b: prefix")
        extent = parse_extent(rest)
        if prefix in ("u", "b"):
            uid_extents.append(extent)
        if prefix in ("g", "b"):
            gid_extents.append(extent)
    return uid_extents, gid_extents


def _resolve_name(text: str, group: bool, pair: str) -> int:
    if re.fullmatch(r"[0-9]+", text):
        value = int(text)
        if value > ID_MAX:
            raise TableError(f"pair '{pair}': id {value} is past {ID_MAX}")
        return value
    try:
        return grp.getgrnam(text).gr_gid if group else pwd.getpwnam(text).pw_uid
    except KeyError:
        kind = "group" if group else "user"
        raise TableError(f"pair '{pair}': unknown {kind} '{text}'") from None


def parse_bindfs_pairs(spec: str) -> tuple[list[Extent], list[Extent]]:
    """bindfs-style ``1000/0:@1000/@0``: ``from/to`` pairs, ``@`` for groups;
    numbers, user names or group names. Each pair is a one-id extent."""
    uid_extents: list[Extent] = []
    gid_extents: list[Extent] = []
    if not spec.strip():
        raise TableError("empty map: expected FROM/TO pairs")
    for pair in spec.split(":"):
        src, sep, dst = pair.partition("/")
        if not sep or not src or not dst:
            raise TableError(f"pair '{pair}': expected FROM/TO")
        group = src.startswith("@")
        if group != dst.startswith("@"):
            raise TableError(f"pair '{pair}': both sides must be users or both groups (@)")
        if group:
            src, dst = src[1:], dst[1:]
        extent = Extent(_resolve_name(src, group, pair), _resolve_name(dst, group, pair), 1)
        (gid_extents if group else uid_extents).append(extent)
    return uid_extents, gid_extents


def parse_proc_map(text: str, source: str = "map") -> list[Extent]:
    """A /proc/PID/{uid,gid}_map: ``inside outside count`` per line, which is
    lower, upper, count here."""
    extents = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise TableError(f"{source}: line '{line.strip()}' is not 'inside outside count'")
        extents.append(parse_extent(":".join(fields)))
    return extents


def read_userns_maps(pid: int) -> tuple[list[Extent], list[Extent]]:
    """The uid and gid maps of the user namespace process PID is in."""
    result = []
    for kind in ("uid", "gid"):
        path = f"/proc/{pid}/{kind}_map"
        try:
            with open(path, encoding="ascii") as f:
                result.append(parse_proc_map(f.read(), path))
        except OSError as e:
            raise TableError(f"cannot read {path}: {e.strerror}") from None
    return result[0], result[1]


def subid_ranges(text: str, user: str, user_id: int) -> list[tuple[int, int]]:
    """(start, count) ranges of /etc/subuid-format text for a user (by name or id)."""
    ranges = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or line.lstrip().startswith("#"):
            continue
        if fields[0] in (user, str(user_id)):
            try:
                ranges.append((int(fields[1]), int(fields[2])))
            except ValueError:
                continue
    return ranges


def subid_extents(own_id: int, ranges: Sequence[tuple[int, int]]) -> list[Extent]:
    """The rootless layout: lower 0 is the user's own id, lower 1.. the
    subordinate ranges in order."""
    extents = [Extent(0, own_id, 1)]
    next_lower = 1
    for start, count in ranges:
        if count < 1:
            continue
        extents.append(Extent(next_lower, start, count))
        next_lower += count
    return extents


def read_subid_maps(user: str, subuid_path: str = "/etc/subuid",
                    subgid_path: str = "/etc/subgid") -> tuple[list[Extent], list[Extent]]:
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise TableError(f"--subuid: unknown user '{user}'") from None
    result = []
    for path, own_id in ((subuid_path, pw.pw_uid), (subgid_path, pw.pw_gid)):
        try:
            with open(path, encoding="utf-8") as f:
                ranges = subid_ranges(f.read(), pw.pw_name, pw.pw_uid)
        except OSError as e:
            raise TableError(f"cannot read {path}: {e.strerror}") from None
        if not ranges:
            raise TableError(f"{path} has no range for user '{pw.pw_name}'")
        result.append(subid_extents(own_id, ranges))
    return result[0], result[1]


def build_idmap(uid_extents: Sequence[Extent], gid_extents: Sequence[Extent]) -> IdMap:
    """The mount's IdMap. A missing side copies the other: most images use
    the same layout for users and groups (the kernel would refuse; we say
    so in the effective table instead)."""
    if not uid_extents and not gid_extents:
        raise TableError("no mapping given: use --uidmap/--gidmap, --map, --userns or --subuid")
    if not gid_extents:
        gid_extents = uid_extents
    if not uid_extents:
        uid_extents = gid_extents
    try:
        uids = IdTable(uid_extents)
    except TableError as e:
        raise TableError(f"uid table: {e}") from None
    try:
        gids = IdTable(gid_extents)
    except TableError as e:
        raise TableError(f"gid table: {e}") from None
    return IdMap(uids, gids, read_overflow_id("uid"), read_overflow_id("gid"))
