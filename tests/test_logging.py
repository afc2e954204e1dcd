"""Once daemonized, shiftfs's own messages go to syslog (stderr is /dev/null)."""

import os
import re
import socket
import subprocess
import sys

import pytest

from shiftfs.mount import is_mounted, unmount

from tests.daemon import foreground_daemon
from tests.tables import STD, args

pytestmark = pytest.mark.needs_root


def test_daemon_logs_to_syslog(lower, workdir):
    sock_path = str(workdir / "log.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(10)
    mp = workdir / "mnt"
    mp.mkdir()
    env = dict(os.environ, SHIFTFS_SYSLOG=sock_path)
    try:
        result = subprocess.run([sys.executable, "-m", "shiftfs", "-q", str(lower), str(mp),
                                 *args(STD)], env=env, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        message = sock.recv(4096).decode()
        assert "shiftfs[" in message and f"serving {lower} at {mp}" in message
        assert message.startswith("<30>")  # facility daemon (3), severity info (6)
    finally:
        sock.close()
        if is_mounted(str(mp), None):
            unmount(str(mp))


def test_debug_says_what_init_settled(lower, workdir):
    mp = workdir / "mnt"
    mp.mkdir()
    log = workdir / "log"
    with foreground_daemon(lower, mp, "-d", *args(STD), log=log):
        os.listdir(mp)
    err = log.read_text()
    # the protocol minor the kernel spoke, and what was granted of what was asked
    assert re.search(r"shiftfs: INIT: protocol 7\.\d+, max_write 1048576, granted .*posix_acl", err), err
