"""Command line: arguments and ``-o`` options (also in the form mount(8)
and /etc/fstab pass them through mount.fuse3) -> table + mount options.

Bad input is one line on stderr naming the problem and exit status 2; no
mount is attempted and the lower tree is not touched.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from dataclasses import dataclass, field

from . import __version__
from .idmap import (Extent, TableError, build_idmap, parse_bindfs_pairs, parse_map_spec,
                    read_subid_maps)
from . import libfuse
from .daemon import MountOptions, mounts_itself, serve
from .mount import mounts
from .tableargs import (EXIT_USAGE, OneLineParser, UsageError, add_table_arguments,
                        extents_of, table_from_args, userns_extents)

# mount(8) and fstab pass these; they mean nothing to shiftfs (or are the default)
IGNORED_OPTIONS = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users",
                   "nouser", "owner", "group", "comment", "x-systemd", "rw", "async",
                   "allow_other", "default_permissions", "nosuid", "nodev", "loop"}
KERNEL_FLAGS = {"noexec", "exec", "noatime", "nodiratime", "relatime", "strictatime",
                "lazytime", "sync", "dirsync"}


@dataclass
class Request:
    lower: str = ""
    mountpoint: str = ""
    uid_extents: list[Extent] = field(default_factory=list)
    gid_extents: list[Extent] = field(default_factory=list)
    options: MountOptions = field(default_factory=MountOptions)
    dry_run: bool = False
    quiet: bool = False
    mount_helper: bool = False  # run by mount.fuse3 (mount -t fuse.shiftfs, /etc/fstab)
    flags_given: set[str] = field(default_factory=set)  # explicit ro/rw/suid/... to catch conflicts


def invoked_by_mount_helper() -> bool:
    """True when mount.fuse3 started us. It runs ``/bin/sh -c "'shiftfs' ..."``
    (the shell may exec us, leaving mount(8) as the parent)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{os.getppid()}/comm", "rb") as f:
            comm = f.read().strip()
    except OSError:
        return False
    if comm in (b"mount", b"mount.fuse3", b"mount.fuse"):
        return True
    return len(argv) > 2 and argv[1] == b"-c" and argv[2].startswith(b"'") \
        and argv[2].split(b"' ", 1)[0].endswith(b"shiftfs")


_CONFLICTS = (("ro", "rw"), ("suid", "nosuid"), ("dev", "nodev"), ("exec", "noexec"))
_FLAG_ALIASES = {"allow_suid": "suid", "allow_dev": "dev"}


def _note_flag(key: str, req: Request) -> None:
    flag = _FLAG_ALIASES.get(key, key)
    for a, b in _CONFLICTS:
        if flag in (a, b):
            other = b if flag == a else a
            if other in req.flags_given:
                raise UsageError(f"conflicting mount options '{other}' and '{flag}'")
            req.flags_given.add(flag)


def _timeout(name: str, value: str) -> float:
    try:
        result = float(value)
    except ValueError:
        raise UsageError(f"option {name}={value}: not a number of seconds") from None
    if result != result or result in (float("inf"), float("-inf")):
        raise UsageError(f"option {name}={value}: not a finite number of seconds")
    if result < 0:
        raise UsageError(f"option {name}={value}: must not be negative")
    return result


def apply_o_options(text: str, req: Request) -> None:
    """One ``-o`` argument: comma-separated key[=value] items."""
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        key, has_value, value = item.partition("=")
        if not has_value and not (req.mount_helper and key in ("suid", "dev")):
            _note_flag(key, req)
        if key in ("uidmap", "gidmap") and has_value:
            target = req.uid_extents if key == "uidmap" else req.gid_extents
            target.extend(extents_of(value, key))
        elif key == "map" and has_value:
            uids, gids = parse_map_spec(value.replace("+", " "))
            req.uid_extents += uids
            req.gid_extents += gids
        elif key == "bindfs-map" and has_value:
            uids, gids = parse_bindfs_pairs(value)
            req.uid_extents += uids
            req.gid_extents += gids
        elif key == "userns" and has_value:
            uids, gids = userns_extents(value)
            req.uid_extents += uids
            req.gid_extents += gids
        elif key == "subuid" and has_value:
            uids, gids = read_subid_maps(value)
            req.uid_extents += uids
            req.gid_extents += gids
        elif key in ("attr_timeout", "entry_timeout", "negative_timeout") and has_value:
            setattr(req.options, key, _timeout(key, value))
            req.options.timeouts_given = True
        elif key == "timeout" and has_value:
            t = _timeout(key, value)
            req.options.attr_timeout = req.options.entry_timeout = req.options.negative_timeout = t
            req.options.timeouts_given = True
        elif key == "cache" and has_value:
            if value not in ("auto", "watch", "timeout", "forever"):
                raise UsageError(f"-o cache={value}: expected auto, watch, timeout or forever")
            req.options.cache = value
        elif key == "passthrough" and has_value:
            if value not in ("auto", "off"):
                raise UsageError(f"-o passthrough={value}: expected auto or off")
            req.options.passthrough = value
        elif key == "ro" and not has_value:
            req.options.read_only = True
        elif key in ("suid", "dev") and not has_value and req.mount_helper:
            # mount.fuse3 adds dev,suid to every mount not marked nodev,nosuid
            # (mount(8) keeps an explicit suid/dev to itself): not a request
            continue
        elif key in ("suid", "allow_suid") and not has_value:
            req.options.suid = True
        elif key in ("dev", "allow_dev") and not has_value:
            req.options.dev = True
        elif key == "debug" and not has_value:
            req.options.debug = True
        elif key in KERNEL_FLAGS and not has_value:
            req.options.kernel_flags.append(key)
        elif key in IGNORED_OPTIONS or key.startswith("x-"):
            continue
        else:
            raise UsageError(f"unknown mount option '{item}'")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="shiftfs",
        description="Mount LOWER at MOUNTPOINT, showing lower ids as upper ids through a range table.",
        epilog="An extent LOWER:UPPER:COUNT shows lower ids LOWER..LOWER+COUNT-1 as "
               "UPPER..UPPER+COUNT-1 (the order of a /proc/PID/uid_map line). "
               "See shiftfs(1).")
    p.add_argument("lower", help="directory whose ids are as stored (the lower tree)")
    p.add_argument("mountpoint", help="where the shifted (upper) view appears")
    add_table_arguments(p)
    p.add_argument("-o", dest="o_options", action="append", default=[], metavar="OPTS",
                   help="mount options: uidmap=,gidmap=,map=,ro,allow_suid,allow_dev,attr_timeout=,... (see shiftfs(1))")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="log every request (implies -f)")
    p.add_argument("-s", "--single-thread", action="store_true", help="serve requests on one thread")
    p.add_argument("-n", "--dry-run", action="store_true", help="check everything, print the table, do not mount")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the effective table")
    p.add_argument("-V", "--version", action="version", version=f"shiftfs {__version__}")
    return p


_VALUE_OPTIONS = ("-u", "--uidmap", "-g", "--gidmap", "-m", "--map")


def _glue_dash_values(argv: list[str]) -> list[str]:
    # argparse takes '--uidmap -1:0:1' for a missing value; glue such values
    # on so the table parser can say what is wrong with them
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1][:1] == "-" \
                and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}" if argv[i].startswith("--")
                       else argv[i] + argv[i + 1])
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def parse_args(argv: list[str]) -> Request:
    ns = build_parser().parse_args(_glue_dash_values(argv))
    req = Request(lower=ns.lower, mountpoint=ns.mountpoint, dry_run=ns.dry_run, quiet=ns.quiet,
                  mount_helper=invoked_by_mount_helper())
    uids, gids = table_from_args(ns)
    req.uid_extents += uids
    req.gid_extents += gids
    for text in ns.o_options:
        apply_o_options(text, req)
    req.options.foreground = ns.foreground or ns.debug
    req.options.debug = req.options.debug or ns.debug
    req.options.threads = not ns.single_thread
    return req


def check_paths(req: Request) -> None:
    """Refuse what would fail or recurse, before anything is mounted."""
    for what, path in (("lower directory", req.lower), ("mount point", req.mountpoint)):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UsageError(f"{what} '{path}' does not exist") from None
        except OSError as e:
            raise UsageError(f"{what} '{path}': {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{what} '{path}' is not a directory")
    lower = os.path.realpath(req.lower)
    target = os.path.realpath(req.mountpoint)
    if target == lower or target.startswith(lower.rstrip("/") + "/"):
        raise UsageError(f"mount point '{req.mountpoint}' is inside the lower directory "
                         f"'{req.lower}' (the mount would contain itself)")
    if any(mp == target for _src, mp, _t in mounts()):
        raise UsageError(f"mount point '{req.mountpoint}' is already a mount point")


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse does not exist (load the fuse module or give the container the device)")
    st = os.stat("/dev/fuse")
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (10, 229):
        raise UsageError("/dev/fuse is not the FUSE device (character device 10,229)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UsageError("/dev/fuse is not readable and writable by this user")
    if mounts_itself():
        return  # no libfuse needed
    try:
        libfuse.load()  # libfuse3, which runs fusermount3
    except ImportError as e:
        raise UsageError(str(e)) from None


def safety_warnings(req: Request, idmap) -> list[str]:
    warnings = []
    maps_to_root = idmap.uids.to_lower(0) is not None
    if req.options.suid and maps_to_root:
        lower = idmap.uids.to_lower(0)
        warnings.append(f"warning: -o suid with lower uid {lower} shown as upper 0: a set-uid "
                        f"file owned by lower {lower} runs as root on this host")
    elif req.options.suid:
        import pwd
        for pw in pwd.getpwall():  # a real host user: set-uid files run as them
            lower = idmap.uids.to_lower(pw.pw_uid)
            if lower is not None and pw.pw_uid < 65534:
                warnings.append(f"warning: -o suid with lower uid {lower} shown as host user "
                                f"'{pw.pw_name}' ({pw.pw_uid}): its set-uid files run as that user")
                break
    if req.options.dev:
        warnings.append("warning: -o dev: device nodes in the lower tree open this host's devices")
    return warnings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        req = parse_args(argv)
        idmap = build_idmap(req.uid_extents, req.gid_extents)
        check_paths(req)
        if not req.dry_run:
            check_fuse()
    except (UsageError, TableError) as e:
        print(f"shiftfs: {e}", file=sys.stderr)
        return EXIT_USAGE
    for line in safety_warnings(req, idmap):
        print(f"shiftfs: {line}", file=sys.stderr)
    if not req.quiet or req.dry_run:
        print(f"shiftfs: {req.lower} -> {req.mountpoint}")
        print(idmap.describe())
    if req.dry_run:
        return 0
    sys.stdout.flush()
    return serve(req.lower, req.mountpoint, idmap, req.options)
