"""The client side of a mount, for Python callers and the command line:
``mount()`` (a context manager that runs ``shiftfs -f`` in a child and
waits until the mount is live), ``unmount``, and what /proc/self/mountinfo
says (``is_mounted``, ``mounts``). Nothing of the FUSE layer: serving a
mount is daemon.py's."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, Sequence

from .idmap import Extent, IdMap, build_idmap, parse_extents

FSTYPE = "fuse.shiftfs"


# ---- looking at mounts ---------------------------------------------------------

def _unescape(field_text: str) -> str:
    return field_text.encode().decode("unicode_escape")


def _mountinfo_fields() -> Iterator[list[str]]:
    """The fields of each /proc/self/mountinfo line, in mount order (mount
    id, parent id, MAJOR:MINOR, root, mount point, ..., "-", fstype,
    source, ...), still escaped."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            yield line.split()


def mountinfo() -> list[tuple[str, str, str, str]]:
    """(device MAJOR:MINOR, source, mount point, fstype) from
    /proc/self/mountinfo, in mount order."""
    result = []
    for fields in _mountinfo_fields():
        sep = fields.index("-")
        result.append((fields[2], _unescape(fields[sep + 2]), _unescape(fields[4]),
                       fields[sep + 1]))
    return result


def mount_point_of(mnt_id: int) -> str | None:
    """Where the mount with id ``mnt_id`` is now (None: not mounted)."""
    for fields in _mountinfo_fields():
        if int(fields[0]) == mnt_id:
            return _unescape(fields[4])
    return None


def mounts() -> list[tuple[str, str, str]]:
    """(source, mount point, fstype) from /proc/self/mountinfo."""
    return [(source, mp, fstype) for _dev, source, mp, fstype in mountinfo()]


def is_mounted(mountpoint: str, fstype: str | None = FSTYPE) -> bool:
    target = os.path.realpath(mountpoint)
    return any(mp == target and (fstype is None or t == fstype) for _s, mp, t in mounts())


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """fusermount3 -u (-z for lazy), falling back to umount(8)."""
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"unmount of {mountpoint} failed: {result.stderr.strip()}")


def extent_args(flag: str, extents: Sequence[Extent]) -> list[str]:
    args = []
    for e in extents:
        args += [flag, str(e)]
    return args


class MountError(OSError):
    """The shiftfs child could not mount; the message carries its stderr."""


def _extents(items: str | Extent | Sequence[Extent | str]) -> list[Extent]:
    # a string is one or more extents, as on the command line, never a
    # sequence of characters
    if isinstance(items, str):
        return parse_extents(items)
    if isinstance(items, Extent):
        return [items]
    return [e for item in items for e in _extents(item)]


@contextlib.contextmanager
def mount(lower: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
          idmap: IdMap | None = None, *,
          uidmap: str | Sequence[Extent | str] = (), gidmap: str | Sequence[Extent | str] = (),
          options: Sequence[str] = (), timeout: float = 20.0) -> Iterator[str]:
    """Mount ``lower`` shifted at ``mountpoint`` for the duration of a ``with``
    block: run ``shiftfs -f`` in a child process, wait until the mount is
    live, yield the mount point (a str), and always unmount and reap the
    child, also when the body raises.

    The table is an :class:`~shiftfs.idmap.IdMap` (``build_idmap(...)``, the
    object the command line builds) or ``uidmap``/``gidmap``: a string of
    one or more ``LOWER:UPPER:COUNT`` extents as on the command line
    (``"0:100000:65536"``, ``"0:100000:1000 1000:1000:1"``), or a sequence
    of such strings or :class:`~shiftfs.idmap.Extent`; a missing side copies
    the other. ``options`` are further command-line
    words, e.g. ``["-o", "ro"]`` or ``["--userns", "1234"]``.

    Raises :class:`~shiftfs.idmap.TableError` (a ValueError) for a bad table
    before anything is started, :class:`MountError` when ``mountpoint`` is
    already a mount point or the child exits without mounting (its message
    is the child's error), and TimeoutError
    when the mount is not live within ``timeout`` seconds.

    >>> with mount("/srv/rootfs", "/mnt/c1", uidmap=["0:100000:65536"]) as mp:
    ...     os.stat(mp).st_uid
    100000
    """
    if idmap is not None:
        uids, gids = idmap.uids.extents, idmap.gids.extents
    else:
        uids, gids = _extents(uidmap), _extents(gidmap)
        if uids or gids:
            checked = build_idmap(uids, gids)  # refuse a bad table here, not in the child
            uids, gids = checked.uids.extents, checked.gids.extents
    lower, mountpoint = os.fspath(lower), os.fspath(mountpoint)
    if is_mounted(mountpoint, None):  # else its presence would read as "live"
        raise MountError(f"{mountpoint} is already a mount point")
    cmd = ([sys.executable, "-m", "shiftfs", "-f", "-q", lower, mountpoint]
           + extent_args("--uidmap", uids) + extent_args("--gidmap", gids) + list(options))
    # stderr to a file, not a pipe: a chatty child (-d) must never block on it
    errlog = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=errlog)
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mountpoint):
            if proc.poll() is not None:
                errlog.seek(0)
                err = errlog.read().decode(errors="replace").strip()
                raise MountError(f"shiftfs exited with status {proc.returncode} "
                                 f"without mounting {mountpoint}: {err}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"shiftfs did not mount {mountpoint} within {timeout}s")
            time.sleep(0.01)
        yield mountpoint
    finally:
        try:
            _stop(proc, mountpoint)
        finally:
            errlog.close()


def _stop(proc: subprocess.Popen, mountpoint: str) -> None:
    if is_mounted(mountpoint):
        try:
            unmount(mountpoint)
        except OSError:
            # busy: detach now; the daemon serves the open files until they
            # are released, then the kernel ends the connection and it exits
            unmount(mountpoint, lazy=True)
            threading.Thread(target=proc.wait, daemon=True).start()
            return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
