"""shiftfs scan: which lower ids a tree holds, which the table covers, which
entries would be frozen through the mount."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys

import pytest

from shiftfs.command import main
from shiftfs.idmap import Extent, build_idmap
from shiftfs.scan import _ids, scan

from tests.callers import call_as

pytestmark = pytest.mark.needs_root  # chown to arbitrary ids; one test mounts


@pytest.fixture
def tree(lower):
    """lower: 0 (root, dir, file), 1000 user, 70000 (outside 0..65535) file,
    a symlink with an unmapped group, a fifo, a nested dir."""
    (lower / "etc").mkdir()
    (lower / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (lower / "home").mkdir()
    (lower / "home" / "user").mkdir()
    (lower / "home" / "user" / "notes").write_text("hi")
    os.chown(lower / "home" / "user", 1000, 1000)
    os.chown(lower / "home" / "user" / "notes", 1000, 1000)
    (lower / "stray").write_text("")
    os.chown(lower / "stray", 70000, 5)
    os.symlink("/etc/passwd", lower / "link")  # never followed
    os.chown(lower / "link", 1000, 80000, follow_symlinks=False)
    os.mkfifo(lower / "fifo")
    return lower


def run(capsys, *argv):
    status = main(["scan", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def test_counts_coverage_and_frozen(tree):
    r = scan(str(tree), build_idmap([Extent(0, 100000, 65536)], []))
    # ".", etc, etc/passwd, home, home/user, home/user/notes, stray, link, fifo
    assert r.entries == 9
    assert r.uids == {0: 5, 1000: 3, 70000: 1}
    assert r.gids == {0: 5, 1000: 2, 5: 1, 80000: 1}
    assert r.unmapped_uids() == [70000]
    assert r.unmapped_gids() == [80000]
    assert r.frozen_count == 2
    frozen = {f.path: f for f in r.frozen}
    assert set(frozen) == {"stray", "link"}
    assert frozen["link"].kind == "symlink" and frozen["link"].unmapped(r.idmap) == ["gid"]
    assert frozen["stray"].unmapped(r.idmap) == ["uid"]
    assert r.errors == []


def test_symlinks_are_not_followed(tree, workdir):
    outside = workdir / "outside"
    outside.mkdir()
    for i in range(5):
        (outside / f"f{i}").write_text("")
        os.chown(outside / f"f{i}", 99999, 99999)
    os.symlink(outside, tree / "dirlink")
    r = scan(str(tree), build_idmap([Extent(0, 100000, 65536)], []))
    assert 99999 not in r.uids
    assert r.entries == 10


def test_table_covering_everything(tree):
    idmap = build_idmap([Extent(0, 100000, 65536), Extent(70000, 300000, 1)],
                        [Extent(0, 100000, 100000)])
    r = scan(str(tree), idmap)
    assert r.frozen_count == 0 and r.frozen == []


def test_limit_keeps_count_exact(lower):
    for i in range(20):
        (lower / f"f{i:02d}").write_text("")
        os.chown(lower / f"f{i:02d}", 70000 + i, 0)
    r = scan(str(lower), build_idmap([Extent(0, 100000, 65536)], []), limit=5)
    assert r.frozen_count == 20 and len(r.frozen) == 5
    assert len(scan(str(lower), r.idmap, limit=0).frozen) == 20


def test_text_report(capsys, tree):
    status, out, err = run(capsys, tree, "--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536")
    assert status == 0, err
    assert "9 entries, 3 distinct uids, 4 distinct gids" in out
    assert "70000 -> unmapped, shown as 65534  (1)" in out
    assert "1000 -> 101000  (3)" in out
    assert "not covered by the table: uids 70000; gids 80000" in out
    assert "frozen: 2 entries" in out and "read-only through the mount" in out
    assert "  stray  (file; unmapped uid 70000)" in out
    assert "  link  (symlink; unmapped gid 80000)" in out
    assert err == ""  # not a terminal: no progress


def test_json_report(capsys, tree):
    status, out, err = run(capsys, tree, "-m", "b:0:100000:65536", "--json")
    assert status == 0, err
    doc = json.loads(out)
    assert doc["entries"] == 9
    assert doc["table"] == {"uid": ["0:100000:65536"], "gid": ["0:100000:65536"]}
    uids = {u["lower"]: u for u in doc["uids"]}
    assert uids[70000] == {"lower": 70000, "upper": None, "mapped": False,
                           "shown_as": 65534, "entries": 1}
    assert uids[1000]["upper"] == 101000 and uids[1000]["entries"] == 3
    assert doc["unmapped"] == {"uids": [70000], "gids": [80000]}
    assert doc["frozen"]["count"] == 2
    stray = next(e for e in doc["frozen"]["entries"] if e["path"] == "stray")
    assert stray == {"path": "stray", "type": "file", "uid": 70000, "gid": 5,
                     "shown_uid": 65534, "shown_gid": 100005, "unmapped": ["uid"]}
    assert doc["errors"] == []


def test_table_options_are_the_mount_ones(capsys, tree):
    """'+' separated extents, --map prefixes, bindfs pairs: parsed by the
    same code as the mount command line."""
    status, out, _ = run(capsys, tree, "-u", "0:100000:1000+1000:5000:1+70000:70000:1",
                         "-g", "0:100000:65536+80000:80000:1", "--json")
    assert status == 0
    doc = json.loads(out)
    assert doc["frozen"]["count"] == 0
    assert {u["lower"]: u["upper"] for u in doc["uids"]} == {0: 100000, 1000: 5000, 70000: 70000}


def test_strict_exit_status(capsys, tree):
    assert run(capsys, tree, "-u", "0:100000:65536", "--strict")[0] == 3
    assert run(capsys, tree, "-u", "0:0:100000", "--strict")[0] == 0


@pytest.mark.parametrize("argv, needle", [
    ([], "no mapping given"),
    (["-u", "0:1:10", "-u", "5:100:10"], "overlap on the lower side"),
    (["-u", "0:1:1"], None),
    (["-u", "0:1"], "COUNT missing"),  # as for a mount: it most likely meant a range
    (["-u", "x:1:1"], "lower id 'x' is not a non-negative number"),
    (["-u", "0:1:1", "--limit", "-1"], "must not be negative"),
    (["-u", "0:1:1", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors(capsys, tree, argv, needle):
    status, out, err = run(capsys, tree, *argv)
    if needle is None:
        assert status == 0
        return
    assert status == 2
    assert needle in err and err.startswith("shiftfs scan: ") and err.count("\n") == 1
    assert out == ""


def test_missing_or_unreadable_lower(capsys, tree, workdir):
    status, _out, err = run(capsys, workdir / "missing", "-u", "0:1:1")
    assert status == 1 and "No such file or directory" in err
    status, _out, err = run(capsys, tree / "stray", "-u", "0:1:1")
    assert status == 1 and "not a directory" in err.lower()


def _scan_summary(lower, idmap):
    r = scan(lower, idmap)
    return r.entries, r.errors


def test_unreadable_subdirectory_is_reported_and_skipped(tree):
    """As a caller without CAP_DAC_READ_SEARCH (root would read anything)."""
    os.chmod(tree / "home" / "user", 0o700)
    idmap = build_idmap([Extent(0, 100000, 65536)], [])
    entries, errors = call_as(_scan_summary, str(tree), idmap, uid=65534, gid=65534)
    assert errors == [("home/user", "Permission denied")]
    assert entries == 8  # home/user itself counted, its contents not


def test_progress_on_a_terminal_only(tree):
    for i in range(2000):
        (tree / "etc" / f"n{i}").write_text("")
    args = [sys.executable, "-m", "shiftfs", "scan", str(tree), "-u", "0:100000:65536"]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # stderr on a pty: progress lines, erased at the end; the report stays on stdout
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args + ["--progress"], stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    out = proc.stdout.read().decode()
    proc.wait()
    seen = _drain_pty(leader)
    assert proc.returncode == 0
    assert b"scanned " in seen and b"\x1b[K" in seen
    assert "2009 entries" in out
    # not a terminal: nothing on stderr
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stderr == ""


def test_progress_auto_detects_a_terminal(tree):
    """Without --progress the choice is stderr's isatty()."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys, shiftfs.scan as s; s.PROGRESS_INTERVAL = 0; "
            "sys.exit(s.main(sys.argv[1:]))")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code, str(tree), "-u", "0:100000:65536"],
                            stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    proc.wait()
    seen = _drain_pty(leader)
    assert b"scanned " in seen


def _drain_pty(leader: int) -> bytes:
    """All a child wrote to the pty, then close it."""
    seen = b""
    while select.select([leader], [], [], 0.2)[0]:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO once the child side is gone
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    return seen


def test_id_ranges_are_compact():
    assert _ids([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"
    assert _ids([]) == ""


def test_frozen_as_reported_through_a_real_mount(tree, mounter):
    """What scan calls frozen is what the mount shows as the overflow id and
    refuses to change."""
    r = scan(str(tree), build_idmap([Extent(0, 100000, 65536)], []))
    mnt = mounter(tree)
    for f in r.frozen:
        st = os.lstat(mnt / f.path)
        assert 65534 in (st.st_uid, st.st_gid)
    with pytest.raises(OSError):
        os.chmod(mnt / "stray", 0o600)
    assert os.lstat(mnt / "home" / "user" / "notes").st_uid == 101000
