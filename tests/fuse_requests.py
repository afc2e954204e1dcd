"""Counting the requests a FUSE mount receives: the fuse:fuse_request_send
tracepoint in a private tracefs instance, filtered on one connection, counted
by opcode (GETXATTR also by the attribute's name). Used by the tests that
assert which requests reach the daemon and by bench.run (bench/measure.py)."""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess

TRACE = "/sys/kernel/tracing"
# GETXATTR request length = fuse_in_header (40) + fuse_getxattr_in (8) + name + NUL
XATTR_BY_LEN = {40 + 8 + len(n) + 1: n for n in (
    "system.posix_acl_access", "system.posix_acl_default", "security.capability",
    "security.selinux", "security.ima", "trusted.overlay.opaque")}


class RequestCounter:
    """fuse:fuse_request_send in a private tracefs instance, filtered on one
    connection; counts by opcode."""

    def __init__(self, buffer_kb: int = 131072):
        if not os.path.isdir(os.path.join(TRACE, "events")):
            subprocess.run(["mount", "-t", "tracefs", "nodev", TRACE], capture_output=True)
        self.inst = os.path.join(TRACE, "instances", f"shiftfs-{os.getpid()}-{id(self)}")
        os.mkdir(self.inst)
        self._w("buffer_size_kb", str(buffer_kb))
        self.ev = os.path.join(self.inst, "events", "fuse", "fuse_request_send")
        if not os.path.isdir(self.ev):
            self.close()
            raise RuntimeError("no fuse:fuse_request_send tracepoint in this kernel")

    def _w(self, rel, text):
        with open(os.path.join(self.inst, rel) if not rel.startswith("/") else rel, "w") as f:
            f.write(text)

    def start(self, dev: int):
        conn = (os.major(dev) << 20) | os.minor(dev)
        self._w(os.path.join(self.ev, "filter"), f"connection == {conn}")
        self._w("trace", "")
        self._w(os.path.join(self.ev, "enable"), "1")

    def stop(self) -> collections.Counter:
        self._w(os.path.join(self.ev, "enable"), "0")
        counts = collections.Counter()
        with open(os.path.join(self.inst, "trace")) as f:
            for line in f:
                if line.startswith("#"):
                    continue
                i = line.find("(FUSE_")
                if i >= 0:
                    op = line[i + 1: line.index(")", i)]
                    counts[op] += 1
                    if op == "FUSE_GETXATTR":
                        n = int(line[line.index(" len ", i) + 5:].split()[0])
                        counts["xattr:" + XATTR_BY_LEN.get(n, f"name of {n - 49} bytes")] += 1
        lost = 0
        for cpu in os.listdir(os.path.join(self.inst, "per_cpu")):
            for line in open(os.path.join(self.inst, "per_cpu", cpu, "stats")):
                if line.startswith("overrun:"):
                    lost += int(line.split()[1])
        if lost:
            counts["LOST"] = lost
        return counts

    def close(self):
        with contextlib.suppress(OSError):
            os.rmdir(self.inst)
