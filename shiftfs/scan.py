"""``shiftfs scan LOWER --uidmap ... --gidmap ...``: before serving a tree
with a table, find out which lower ids it holds, which of them the table
covers, and which entries would show as the overflow id through the mount.

Those entries are *frozen*: a kernel idmapped mount (and shiftfs) shows them
but refuses to change them (write, chmod, chown, rename, unlink, xattrs), so
a container sees files it cannot touch.

The walk is ``os.scandir`` without following symlinks (a symlink is an entry
of its own, as through the mount); it crosses into other file systems below
LOWER as the mount does. Exit status: 0 scanned, 1 LOWER could not be
scanned, 2 usage, 3 with ``--strict`` when some entry would be frozen.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Iterator

from .idmap import IdMap, TableError, build_idmap
from .policy import is_frozen
from .tableargs import EXIT_USAGE, OneLineParser, UsageError, add_table_arguments, table_from_args

EXIT_FAILED = 1
EXIT_FROZEN = 3  # --strict and something would be frozen
PROGRESS_INTERVAL = 0.2  # seconds between progress updates on a terminal


@dataclass
class Frozen:
    path: str            # relative to LOWER ("." for LOWER itself)
    uid: int
    gid: int
    kind: str            # file, dir, symlink, ...

    def unmapped(self, idmap: IdMap) -> list[str]:
        return ([name for name, table, value in (("uid", idmap.uids, self.uid),
                                                 ("gid", idmap.gids, self.gid))
                 if table.to_upper(value) is None])


@dataclass
class ScanResult:
    lower: str
    idmap: IdMap
    entries: int = 0
    uids: Counter = field(default_factory=Counter)   # lower uid -> entries
    gids: Counter = field(default_factory=Counter)   # lower gid -> entries
    frozen_count: int = 0
    frozen: list[Frozen] = field(default_factory=list)  # the first ``limit``
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, message)

    def unmapped_uids(self) -> list[int]:
        return sorted(i for i in self.uids if self.idmap.uids.to_upper(i) is None)

    def unmapped_gids(self) -> list[int]:
        return sorted(i for i in self.gids if self.idmap.gids.to_upper(i) is None)

    def to_json(self) -> dict:
        def ids(counter, table, overflow):
            return [{"lower": i, "upper": table.to_upper(i), "mapped": table.to_upper(i) is not None,
                     "shown_as": overflow if table.to_upper(i) is None else table.to_upper(i),
                     "entries": n} for i, n in sorted(counter.items())]
        m = self.idmap
        return {
            "lower": self.lower,
            "table": {"uid": [str(e) for e in m.uids.extents], "gid": [str(e) for e in m.gids.extents]},
            "overflow": {"uid": m.overflow_uid, "gid": m.overflow_gid},
            "entries": self.entries,
            "uids": ids(self.uids, m.uids, m.overflow_uid),
            "gids": ids(self.gids, m.gids, m.overflow_gid),
            "unmapped": {"uids": self.unmapped_uids(), "gids": self.unmapped_gids()},
            "frozen": {
                "count": self.frozen_count,
                "listed": len(self.frozen),
                "entries": [{"path": f.path, "type": f.kind, "uid": f.uid, "gid": f.gid,
                             "shown_uid": m.uid_to_upper(f.uid), "shown_gid": m.gid_to_upper(f.gid),
                             "unmapped": f.unmapped(m)} for f in self.frozen],
            },
            "errors": [{"path": p, "error": e} for p, e in self.errors],
        }


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}


def _walk(root: str, errors: list[tuple[str, str]]) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to root, lstat) for root and everything below it,
    depth first, never following symlinks. Unreadable directories are
    recorded in ``errors`` and skipped."""
    yield ".", os.stat(root)  # LOWER itself may be a symlink, as for the mount
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        try:
            it = os.scandir(path)
        except OSError as e:
            errors.append((rel or ".", e.strerror or str(e)))
            continue
        subdirs = []
        with it:
            for entry in it:
                child = os.path.join(rel, entry.name) if rel else entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    errors.append((child, e.strerror or str(e)))
                    continue
                yield child, st
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(child)
        stack.extend(reversed(subdirs))  # visit in directory order


class _Progress:
    """One self-overwriting line on a terminal; nothing otherwise."""

    def __init__(self, stream: IO[str], enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.last = 0.0
        self.shown = False

    def update(self, entries: int, frozen: int, path: str) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        width = 78
        text = f"scanned {entries} entries, {frozen} frozen: {path}"
        if len(text) > width:
            text = text[:width - 3] + "..."
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def scan(lower: str, idmap: IdMap, limit: int = 1000,
         progress: _Progress | None = None) -> ScanResult:
    """Walk ``lower`` and count its lower ids against ``idmap``. Keeps the
    first ``limit`` frozen entries (0: all). Raises OSError if ``lower``
    itself cannot be read."""
    result = ScanResult(lower=lower, idmap=idmap)
    uids, gids = idmap.uids, idmap.gids
    if not stat.S_ISDIR(os.stat(lower).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", lower)
    os.scandir(lower).close()  # unreadable LOWER is a failure, not an empty tree
    for rel, st in _walk(lower, result.errors):
        result.entries += 1
        result.uids[st.st_uid] += 1
        result.gids[st.st_gid] += 1
        if is_frozen(st, uids, gids):
            result.frozen_count += 1
            if not limit or len(result.frozen) < limit:
                result.frozen.append(Frozen(os.fsdecode(rel), st.st_uid, st.st_gid,
                                            _KINDS.get(stat.S_IFMT(st.st_mode), "other")))
        if progress is not None:
            progress.update(result.entries, result.frozen_count, os.fsdecode(rel))
    if progress is not None:
        progress.done()
    return result


def _id_lines(kind: str, counter: Counter, table, overflow: int) -> list[str]:
    lines = [f"{kind}s: lower -> upper (entries)"]
    for i, n in sorted(counter.items()):
        up = table.to_upper(i)
        shown = f"{up}" if up is not None else f"unmapped, shown as {overflow}"
        lines.append(f"  {i:>10} -> {shown}  ({n})")
    return lines


def report_text(r: ScanResult) -> str:
    m = r.idmap
    lines = [f"shiftfs scan: {r.lower}: {r.entries} entries, "
             f"{len(r.uids)} distinct uids, {len(r.gids)} distinct gids"]
    lines += _id_lines("uid", r.uids, m.uids, m.overflow_uid)
    lines += _id_lines("gid", r.gids, m.gids, m.overflow_gid)
    uu, ug = r.unmapped_uids(), r.unmapped_gids()
    if not r.frozen_count:
        lines.append("the table covers every uid and gid in the tree: nothing is frozen")
    else:
        lines.append(f"not covered by the table: uids {_ids(uu) or '-'}; gids {_ids(ug) or '-'}")
        lines.append(f"frozen: {r.frozen_count} entries would show as {m.overflow_uid}/{m.overflow_gid} "
                     "(overflow id) and be read-only through the mount: no write, chmod, chown, "
                     "rename or unlink, as on a kernel idmapped mount")
        for f in r.frozen:
            why = " and ".join(f"{k} {getattr(f, k)}" for k in f.unmapped(m))
            lines.append(f"  {f.path}  ({f.kind}; unmapped {why})")
        if len(r.frozen) < r.frozen_count:
            lines.append(f"  ... and {r.frozen_count - len(r.frozen)} more (--limit 0 lists all)")
    for path, err in r.errors:
        lines.append(f"shiftfs scan: could not read '{path}': {err}")
    return "\n".join(lines)


def _ids(ids: list[int]) -> str:
    """Compact ranges: 1000-1005,70000."""
    parts, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="shiftfs scan",
                description="Report which lower ids a tree holds, which the table covers, "
                            "and which entries would be frozen (shown as the overflow id, "
                            "read-only) through a shiftfs mount.")
    p.add_argument("lower", help="the lower tree to walk")
    add_table_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--limit", type=int, default=1000, metavar="N",
                   help="list at most N frozen entries (0: all; default 1000)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 3 if any entry would be frozen")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr (default: when stderr is a terminal)")
    return p


def main(argv: list[str]) -> int:
    try:
        ns = build_parser().parse_args(argv)
        if ns.limit < 0:
            raise UsageError(f"--limit {ns.limit}: must not be negative")
        idmap = build_idmap(*table_from_args(ns))
    except (UsageError, TableError) as e:
        print(f"shiftfs scan: {e}", file=sys.stderr)
        return EXIT_USAGE
    show = ns.progress if ns.progress is not None else sys.stderr.isatty()
    try:
        result = scan(ns.lower, idmap, ns.limit, _Progress(sys.stderr, show))
    except OSError as e:
        print(f"shiftfs scan: cannot scan '{ns.lower}': {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nshiftfs scan: interrupted", file=sys.stderr)
        return 130
    try:
        if ns.json:
            json.dump(result.to_json(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(report_text(result))
        sys.stdout.flush()
    except BrokenPipeError:  # | head: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if ns.strict and result.frozen_count:
        return EXIT_FROZEN
    return 0
