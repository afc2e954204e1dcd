"""Faults and load: signals to the daemon, a killed daemon, a full lower
filesystem, concurrent callers, unmount while busy. Every wait has a
timeout; every mount is cleared in a finally."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shiftfs.mount import is_mounted, mount, mounts

from tests.daemon import REPO, foreground_daemon, space_back
from tests.tables import ROOT_KEPT, args

pytestmark = pytest.mark.needs_root

USERS = [101000, 101001, 101002, 101003]  # lower 1000..1003


def clear(mnt):
    """Last resort for a test that failed half-way."""
    for _ in range(3):
        if not any(m[1] == str(mnt) for m in mounts()):
            return
        r = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=20)
        if r.returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


@dataclass
class Foreground:
    """shiftfs -f under our own Popen: we know its pid and may signal it."""

    proc: subprocess.Popen
    log: Path

    def errors(self) -> str:
        return self.log.read_text()


@pytest.fixture
def fg(workdir):
    """fg(lower, mnt, *extra) -> Foreground: shiftfs -f with ROOT_KEPT, live;
    unmounted and reaped at teardown (tests/daemon.py), also when a test
    killed it."""
    with contextlib.ExitStack() as stack:
        def start(lower, mnt, *extra):
            log = Path(mnt).parent / f"{Path(mnt).name}.log"
            proc = stack.enter_context(foreground_daemon(lower, mnt, *args(ROOT_KEPT), *extra,
                                                         log=log, cwd="/"))
            return Foreground(proc, log)

        yield start


@pytest.fixture
def scene(workdir):
    lower = workdir / "lower"
    lower.mkdir()
    os.chmod(lower, 0o1777)
    (lower / "keep").write_text("kept\n")
    mnt = workdir / "mnt"
    mnt.mkdir()
    yield lower, mnt
    clear(mnt)


# ---- signals ------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_cleanly(scene, fg, sig):
    lower, mnt = scene
    d = fg(lower, mnt)
    (mnt / "written").write_text("data\n")
    d.proc.send_signal(sig)
    assert d.proc.wait(timeout=15) == 0, d.errors()
    assert not any(m[1] == str(mnt) for m in mounts()), "mount left behind"
    assert (lower / "written").read_text() == "data\n"
    assert "Traceback" not in d.errors(), d.errors()


def test_sigkill_then_recover(scene, fg):
    """SIGKILL of the supervisor (its server dies with it: PR_SET_PDEATHSIG):
    the mount is dead (ECONNABORTED for a request the dying server had
    read, ENOTCONN after); fusermount3 -u clears it; a new mount of the
    same lower works; fsync'd data is intact. A server's own death is
    survived: tests/test_restart.py."""
    lower, mnt = scene
    d = fg(lower, mnt)
    payload = os.urandom(3 << 20)
    with open(mnt / "durable", "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    d.proc.kill()  # our own child
    d.proc.wait(timeout=10)
    with pytest.raises(OSError) as info:
        os.stat(mnt / "durable")
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    with pytest.raises(OSError) as info:
        os.listdir(mnt)
    assert info.value.errno == errno.ENOTCONN
    r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert not any(m[1] == str(mnt) for m in mounts())
    assert (lower / "durable").read_bytes() == payload
    d2 = fg(lower, mnt)
    assert (mnt / "durable").read_bytes() == payload
    assert os.stat(mnt / "keep").st_uid == 0
    d2.proc.kill()
    d2.proc.wait(timeout=10)
    # umount -l clears a dead mount too
    r = subprocess.run(["umount", "-l", str(mnt)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert not any(m[1] == str(mnt) for m in mounts())
    with mount(str(lower), str(mnt), uidmap=ROOT_KEPT) as mp:
        assert Path(mp, "durable").read_bytes() == payload


def test_stale_dead_mount_is_refused_as_mount_point(scene, fg):
    lower, mnt = scene
    d = fg(lower, mnt)
    d.proc.kill()
    d.proc.wait(timeout=10)
    r = subprocess.run([sys.executable, "-m", "shiftfs", str(lower), str(mnt), *args(ROOT_KEPT)],
                       capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "not connected" in lines[0] or "already a mount point" in lines[0]


# ---- lower full -------------------------------------------------------------------

def test_lower_full_gives_enospc_and_recovers(workdir):
    small = workdir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=1777", "shiftfs-small", str(small)],
                   check=True)
    mnt = workdir / "mnt"
    mnt.mkdir()
    try:
        (small / "keep").write_text("kept\n")
        with mount(str(small), str(mnt), uidmap=ROOT_KEPT) as mp:
            mp = Path(mp)
            chunk = b"z" * (256 << 10)
            with pytest.raises(OSError) as info:
                with open(mp / "big", "wb") as f:
                    for _ in range(64):  # 16 MiB into 4 MiB
                        f.write(chunk)
                        f.flush()
                    os.fsync(f.fileno())
            assert info.value.errno == errno.ENOSPC
            # nothing else broke
            assert (mp / "keep").read_text() == "kept\n"
            assert sorted(os.listdir(mp)) == ["big", "keep"]
            st = os.statvfs(mp)
            assert st.f_bavail == 0
            os.unlink(mp / "big")
            assert space_back(mp)
            data = os.urandom(1 << 20)
            with open(mp / "after", "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            assert (mp / "after").read_bytes() == data
            assert (small / "after").read_bytes() == data
            os.mkdir(mp / "dir-after")
    finally:
        clear(mnt)
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_lower_out_of_inodes_gives_enospc(workdir):
    small = workdir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=40,mode=1777", "shiftfs-small",
                    str(small)], check=True)
    mnt = workdir / "mnt"
    mnt.mkdir()
    try:
        with mount(str(small), str(mnt), uidmap=ROOT_KEPT) as mp:
            mp = Path(mp)
            made, err = 0, None
            for i in range(100):
                try:
                    (mp / f"f{i}").write_text("x")
                    made += 1
                except OSError as e:
                    err = e.errno
                    break
            assert err == errno.ENOSPC and made > 10
            for i in range(made):
                os.unlink(mp / f"f{i}")
            (mp / "again").write_text("y")
            assert (small / "again").read_text() == "y"
    finally:
        clear(mnt)
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


# ---- concurrency ------------------------------------------------------------------

WORKER = textwrap.dedent(r"""
    import errno, json, os, random, sys, time
    d, seed, secs, gid2 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    rnd = random.Random(seed)
    pool = [f"n{i}" for i in range(24)]
    subs = ["", "a/", "b/"]
    counts, done = {}, 0
    end = time.monotonic() + secs
    while time.monotonic() < end:
        name = os.path.join(d, rnd.choice(subs) + rnd.choice(pool))
        other = os.path.join(d, rnd.choice(subs) + rnd.choice(pool))
        op = rnd.choice(["create", "create", "rename", "chown", "chmod", "unlink", "mkdir", "rmdir",
                         "stat", "list", "write"])
        try:
            if op == "create":
                fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
                os.write(fd, b"%d\n" % seed)
                os.close(fd)
            elif op == "write":
                with open(name, "r+b") as f:
                    f.write(b"w")
            elif op == "rename":
                os.rename(name, other)
            elif op == "chown":
                os.chown(name, -1, rnd.choice([os.getgid(), gid2]), follow_symlinks=False)
            elif op == "chmod":
                os.chmod(name, rnd.choice([0o600, 0o644, 0o664]))
            elif op == "unlink":
                os.unlink(name)
            elif op == "mkdir":
                os.mkdir(name)
            elif op == "rmdir":
                os.rmdir(name)
            elif op == "stat":
                os.stat(name)
            elif op == "list":
                os.listdir(os.path.dirname(name))
            e = "ok"
        except OSError as ex:
            e = errno.errorcode.get(ex.errno, str(ex.errno))
        counts[e] = counts.get(e, 0) + 1
        done += 1
    print(json.dumps({"uid": os.getuid(), "ops": done, "results": counts}))
""")

# what a race among callers may legitimately give (the same as on any filesystem)
EXPECTED_RACE = {"ok", "ENOENT", "EEXIST", "EPERM", "EACCES", "ENOTEMPTY", "EISDIR", "ENOTDIR",
                 "EBUSY", "EINVAL"}


def test_concurrent_callers_create_rename_chown_delete(workdir, mounter):
    lower = workdir / "lower"
    lower.mkdir()
    for sub in ("a", "b"):
        (lower / sub).mkdir()
    for p in (lower, lower / "a", lower / "b"):
        os.chmod(p, 0o1777)
    mp = mounter(lower, uidmap=ROOT_KEPT)
    worker = workdir / "worker.py"
    worker.write_text(WORKER)
    procs = []
    for i, uid in enumerate(USERS):
        # all share group 101100 (lower 1100) as a second group they may chown to
        procs.append(subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--groups=101100",
             sys.executable, str(worker), str(mp), str(i), "6", "101100"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"))
    # and host root (mapped to lower 0) chowning whatever it finds to the callers
    deadline = time.monotonic() + 6
    root_errors = {}
    while time.monotonic() < deadline:
        for sub in ("", "a", "b"):
            try:
                names = os.listdir(mp / sub)
            except OSError as e:
                root_errors[e.errno] = root_errors.get(e.errno, 0) + 1
                continue
            for n in names[:5]:
                try:
                    os.chown(mp / sub / n, USERS[len(n) % 4], -1, follow_symlinks=False)
                except OSError as e:
                    root_errors[e.errno] = root_errors.get(e.errno, 0) + 1
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        reports.append(json.loads(out))
    total = sum(r["ops"] for r in reports)
    assert total > 400, reports  # they really ran concurrently
    for r in reports:
        unexpected = set(r["results"]) - EXPECTED_RACE
        assert not unexpected, (r, unexpected)
        assert r["results"].get("ok", 0) > 20, r
    assert set(root_errors) <= {errno.ENOENT}, root_errors
    # the lower tree is consistent with what the mount shows
    assert not list(lower.rglob(".fuse_hidden*"))
    allowed_lower = {0, 1000, 1001, 1002, 1003, 1100}
    for path in [lower] + list(lower.rglob("*")):
        rel = path.relative_to(lower)
        st_l = os.lstat(path)
        st_u = os.lstat(mp / rel)
        assert st_l.st_uid in allowed_lower and st_l.st_gid in allowed_lower, (rel, st_l)
        assert st_u.st_ino == st_l.st_ino and st_u.st_mode == st_l.st_mode
        assert st_u.st_uid == (0 if st_l.st_uid == 0 else st_l.st_uid + 100000)
        assert st_u.st_gid == (0 if st_l.st_gid == 0 else st_l.st_gid + 100000)
    for sub in ("", "a", "b"):
        assert sorted(os.listdir(mp / sub)) == sorted(os.listdir(lower / sub))


# ---- unmount while busy -------------------------------------------------------------

def _unmount(args, mnt):
    return subprocess.run(args + [str(mnt)], capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("holder", ["open-file", "cwd-inside"])
def test_unmount_while_busy_is_ebusy_and_never_hangs(scene, fg, holder):
    lower, mnt = scene
    d = fg(lower, mnt)
    (mnt / "sub").mkdir()
    if holder == "open-file":
        cmd = [sys.executable, "-c",
               f"import time; f = open({str(mnt / 'keep')!r}); print('ready', flush=True); time.sleep(60)"]
        cwd = "/"
    else:
        cmd = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"]
        cwd = str(mnt / "sub")
    busy = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "ready"
        r = _unmount(["fusermount3", "-u"], mnt)
        assert r.returncode != 0 and "busy" in r.stderr.lower(), r
        r = _unmount(["umount"], mnt)
        assert r.returncode != 0 and "busy" in r.stderr.lower(), r
        assert is_mounted(str(mnt))
        assert (mnt / "keep").read_text() == "kept\n"  # still served
    finally:
        busy.kill()
        busy.wait(timeout=10)
    r = _unmount(["fusermount3", "-u"], mnt)
    assert r.returncode == 0, r.stderr
    assert d.proc.wait(timeout=15) == 0


def test_lazy_unmount_while_busy_detaches_and_daemon_exits(scene, fg):
    lower, mnt = scene
    d = fg(lower, mnt)
    f = open(mnt / "keep")
    try:
        r = _unmount(["fusermount3", "-u", "-z"], mnt)
        assert r.returncode == 0, r.stderr
        assert not any(m[1] == str(mnt) for m in mounts())
        assert f.read() == "kept\n"  # the open file keeps working
    finally:
        f.close()
    assert d.proc.wait(timeout=15) == 0  # the daemon goes when the last user does
