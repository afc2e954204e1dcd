"""-d/--debug: one line per request with the caller's upper and lower ids."""

from __future__ import annotations

import os

import pytest

from tests.callers import call_as
from tests.daemon import foreground_daemon
from tests.tables import STD, args

pytestmark = pytest.mark.needs_root


def test_debug_logs_each_request_with_upper_and_lower_ids(lower, workdir):
    (lower / "f").write_text("")
    os.chown(lower / "f", 5, 5)
    mnt = workdir / "mnt"
    mnt.mkdir()
    log = workdir / "log"
    with foreground_daemon(lower, mnt, "-d", *args(STD), log=log):
        assert call_as(os.stat, str(mnt / "f"), uid=100005, gid=100007).st_uid == 100005
        call_as(os.stat, str(mnt / "g"), uid=300, gid=300)  # unmapped caller, ENOENT
    lines = log.read_text().splitlines()
    assert any(line.startswith("shiftfs: lookup /f pid ")
               and line.endswith("upper 100005:100007 lower 5:7 -> ok") for line in lines), lines
    assert any(line.startswith("shiftfs: lookup /g ")
               and line.endswith("upper 300:300 lower unmapped:unmapped -> ENOENT") for line in lines)


def test_no_request_log_without_debug(lower, workdir):
    mnt = workdir / "mnt"
    mnt.mkdir()
    log = workdir / "log"
    with foreground_daemon(lower, mnt, *args(STD), log=log):
        os.listdir(mnt)
        os.stat(mnt)
    assert "shiftfs: lookup" not in log.read_text() and "shiftfs: getattr" not in log.read_text()
