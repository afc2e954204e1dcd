"""The id tables the tests and the benchmarks mount with, defined once.

A table is a list of :class:`~shiftfs.idmap.Extent` (lower, upper, count);
the functions below spell it the way each consumer takes it: words of the
``shiftfs`` command line, a ``-o`` option value, ``LOWER:UPPER:COUNT``
strings, or (lower, upper, count) tuples (kernel idmapped mounts, user
namespaces). The same table serves uids and gids unless a caller says
otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from shiftfs.idmap import Extent

BASE = 100000  # the upper id of lower 0 in the shifted tables
COUNT = 65536  # ids 0..65535: a whole image

# an image stored with 0..65535, seen at 100000..165535
STD = [Extent(0, BASE, COUNT)]
# the same, but host root keeps lower 0 (and so may write): lower n > 0 is 100000 + n
ROOT_KEPT = [Extent(0, 0, 1), Extent(1, BASE + 1, COUNT - 1)]
# nothing shifted: ids 0..65535 as they are
IDENTITY = [Extent(0, 0, COUNT)]


def table(upper: int, lower: int = 0, count: int = COUNT) -> list[Extent]:
    """One extent: ``count`` lower ids from ``lower`` seen from ``upper`` on."""
    return [Extent(lower, upper, count)]


def upper_of(lower: int, extents: Sequence[Extent] = STD) -> int:
    """The upper id ``extents`` show lower id ``lower`` as (it must be mapped)."""
    for e in extents:
        if e.lower <= lower <= e.lower_end:
            return e.upper + lower - e.lower
    raise ValueError(f"lower id {lower} is in no extent of {text(extents)}")


def strings(extents: Sequence[Extent]) -> list[str]:
    """``["0:100000:65536"]``: one ``LOWER:UPPER:COUNT`` per extent."""
    return [str(e) for e in extents]


def text(extents: Sequence[Extent]) -> str:
    """``"0:0:1+1:100001:65535"``: the extents as one option value."""
    return "+".join(strings(extents))


def args(uids: Sequence[Extent], gids: Sequence[Extent] | None = None) -> list[str]:
    """Command-line words: ``--uidmap E`` for each extent, then ``--gidmap E``
    (the uid table again unless ``gids`` is given)."""
    gids = uids if gids is None else gids
    return ([w for e in strings(uids) for w in ("--uidmap", e)]
            + [w for e in strings(gids) for w in ("--gidmap", e)])


def option(uids: Sequence[Extent], gids: Sequence[Extent] | None = None) -> str:
    """``uidmap=...,gidmap=...``: the table as a ``-o`` (mount(8), fstab) value."""
    return f"uidmap={text(uids)},gidmap={text(uids if gids is None else gids)}"


def tuples(extents: Sequence[Extent]) -> list[tuple[int, int, int]]:
    """``[(0, 100000, 65536)]``: what idmapped_mount and user namespaces take."""
    return [(e.lower, e.upper, e.count) for e in extents]
