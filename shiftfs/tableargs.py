"""The options that give the table (``-u``, ``-g``, ``-m``, ``--userns``,
``--subuid``), shared by the mount command (cli.py) and ``shiftfs scan``
(scan.py), and how both report bad input: one line, exit status 2."""

from __future__ import annotations

import argparse

from .idmap import (Extent, TableError, parse_bindfs_pairs, parse_extents, parse_map_spec,
                    read_subid_maps, read_userns_maps)

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: reported as one line and exit status 2."""


def extents_of(value: str, what: str = "uidmap") -> list[Extent]:
    if not value.strip():
        raise TableError(f"{what}: empty value, expected LOWER:UPPER:COUNT")
    return parse_extents(value)


# pairs of explicit flags that contradict each other
def userns_extents(pid_text: str) -> tuple[list[Extent], list[Extent]]:
    """The uid and gid extents of the user namespace of process ``pid_text``."""
    if not pid_text.isdigit():
        raise UsageError(f"--userns {pid_text}: not a process id")
    uids, gids = read_userns_maps(int(pid_text))
    for kind, extents in (("uid", uids), ("gid", gids)):
        if not extents:  # else the other side would be copied into it
            raise UsageError(f"--userns {pid_text}: /proc/{pid_text}/{kind}_map is empty "
                             "(the user namespace has no mapping yet)")
    return uids, gids


def add_table_arguments(p: argparse.ArgumentParser) -> None:
    """The options that give the table (shared with ``shiftfs scan``)."""
    p.add_argument("-u", "--uidmap", action="append", default=[], metavar="L:U:C",
                   help="uid extent (repeatable)")
    p.add_argument("-g", "--gidmap", action="append", default=[], metavar="L:U:C",
                   help="gid extent (repeatable)")
    p.add_argument("-m", "--map", action="append", default=[], metavar="SPEC",
                   help="u:/g:/b: prefixed extents, e.g. 'b:0:100000:65536'; or bindfs-style "
                        "FROM/TO pairs such as '1000/0:@1000/@0'")
    p.add_argument("--userns", metavar="PID", help="use the uid_map and gid_map of process PID")
    p.add_argument("--subuid", metavar="USER",
                   help="rootless layout: lower 0 is USER, lower 1.. are USER's /etc/subuid, /etc/subgid ranges")


def table_from_args(ns: argparse.Namespace) -> tuple[list[Extent], list[Extent]]:
    """The uid and gid extents the table options of ``ns`` give."""
    uid_extents: list[Extent] = []
    gid_extents: list[Extent] = []
    for text in ns.uidmap:
        uid_extents += extents_of(text, "--uidmap")
    for text in ns.gidmap:
        gid_extents += extents_of(text, "--gidmap")
    for spec in ns.map:
        if "/" in spec:
            uids, gids = parse_bindfs_pairs(spec)
        else:
            uids, gids = parse_map_spec(spec)
        uid_extents += uids
        gid_extents += gids
    for uids, gids in ([userns_extents(ns.userns)] if ns.userns else []) + (
            [read_subid_maps(ns.subuid)] if ns.subuid else []):
        uid_extents += uids
        gid_extents += gids
    return uid_extents, gid_extents


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print usage too)
        raise UsageError(message)
