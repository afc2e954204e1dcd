"""Processes a test or a benchmark looks at, read from /proc: a process's
parent, a daemon's family (a shiftfs mount is served by its supervisor and
the server it forked; both count), their CPU time, the fanotify marks a
daemon holds."""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces and
    parentheses): field 0 is the state, 1 the parent, 11 and 12 utime and
    stime."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def ppid(pid: int) -> int:
    """The parent of ``pid``; 0 if it is gone."""
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, ValueError, IndexError):
        return 0


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (no /proc/PID/task/TID/children
    on every kernel)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and ppid(int(p)) == pid]


def family(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out = [pid]
    for child in children(pid):
        out += family(child)
    return out


def cpu_seconds(*pids: int) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def fd_targets(pid: int) -> list[str]:
    """Where each of ``pid``'s fds points (fds closed meanwhile left out)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def fanotify_marks(pid: int) -> int:
    """The fanotify inode marks ``pid`` holds (its fanotify fds' fdinfo)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[fanotify]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                total += sum(line.startswith("fanotify ino:") for line in f)
        except OSError:
            continue
    return total
