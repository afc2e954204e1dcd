"""Table sources: --userns PID (a real process in a new user namespace) and
--subuid USER (/etc/subuid, /etc/subgid), the effective table printed with
--dry-run and at mount time."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import time

import pytest

from shiftfs.cli import main
from shiftfs.idmap import Extent, TableError, build_idmap, read_subid_maps, read_userns_maps
from shiftfs.mount import is_mounted, mount

pytestmark = pytest.mark.needs_root


@contextlib.contextmanager
def userns_process(uid_map: str, gid_map: str):
    """A real process (sleep) in a new user namespace with these maps, written
    from outside as a container runtime does. Yields its pid; killed after."""
    proc = subprocess.Popen(["unshare", "--user", "--", "sleep", "600"])
    try:
        ours = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while True:  # until unshare(2) is done and sleep runs in the new namespace
            try:
                with open(f"/proc/{proc.pid}/comm") as f:
                    if os.readlink(f"/proc/{proc.pid}/ns/user") != ours and f.read().strip() == "sleep":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "unshare --user did not start"
            time.sleep(0.01)
        for kind, text in (("uid", uid_map), ("gid", gid_map)):
            if text:
                with open(f"/proc/{proc.pid}/{kind}_map", "w") as f:
                    f.write(text)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def dirs(lower, workdir):
    mnt = workdir / "mnt"
    mnt.mkdir()
    return lower, mnt


# ---- --userns ------------------------------------------------------------------

def test_userns_maps_of_a_real_process():
    with userns_process("0 100000 65536\n", "0 200000 1000\n1000 5 1\n") as pid:
        uids, gids = read_userns_maps(pid)
    assert uids == [Extent(0, 100000, 65536)]
    assert gids == [Extent(0, 200000, 1000), Extent(1000, 5, 1)]


def test_userns_dry_run_prints_the_effective_table(capsys, dirs):
    lower, mnt = dirs
    with userns_process("0 100000 65536\n", "0 200000 65536\n") as pid:
        status, out, err = run_cli(capsys, "--dry-run", "--userns", pid, lower, mnt)
    assert status == 0, err
    assert "u:0:100000:65536  lower 0..65535 -> upper 100000..165535" in out
    assert "g:0:200000:65536  lower 0..65535 -> upper 200000..265535" in out
    assert not is_mounted(str(mnt), None)


def test_userns_mount_shows_what_the_container_owns(dirs):
    lower, mnt = dirs
    (lower / "etc").mkdir()
    os.chown(lower / "etc", 0, 0)
    (lower / "home").write_text("")
    os.chown(lower / "home", 1000, 1000)
    (lower / "outside").write_text("")
    os.chown(lower / "outside", 70000, 70000)
    with userns_process("0 100000 65536\n", "0 200000 65536\n") as pid:
        with mount(lower, mnt, options=["--userns", str(pid)]):
            assert os.stat(mnt / "etc")[4:6] == (100000, 200000)
            assert os.stat(mnt / "home")[4:6] == (101000, 201000)
            assert os.stat(mnt / "outside")[4:6] == (65534, 65534)


def test_userns_option_form_in_o(capsys, dirs):
    lower, mnt = dirs
    with userns_process("0 300000 10\n", "0 300000 10\n") as pid:
        status, out, err = run_cli(capsys, "-n", lower, mnt, "-o", f"userns={pid}")
    assert status == 0, err
    assert "u:0:300000:10" in out and "g:0:300000:10" in out


def test_userns_without_a_map_yet_is_refused(capsys, dirs):
    lower, mnt = dirs
    with userns_process("0 100000 65536\n", "") as pid:
        status, out, err = run_cli(capsys, "-n", "--userns", pid, lower, mnt)
    assert status == 2
    assert f"/proc/{pid}/gid_map is empty" in err
    assert out == ""


@pytest.mark.parametrize("pid, needle", [("abc", "not a process id"),
                                         ("-1", "not a process id"),
                                         ("999999999", "cannot read /proc/999999999/uid_map")])
def test_userns_bad_pid(capsys, dirs, pid, needle):
    lower, mnt = dirs
    status, out, err = run_cli(capsys, "-n", f"--userns={pid}", lower, mnt)
    assert status == 2
    assert needle in err and err.count("\n") == 1


def test_userns_of_the_initial_namespace_is_the_identity(capsys, dirs):
    lower, mnt = dirs
    status, out, _err = run_cli(capsys, "-n", "--userns", os.getpid(), lower, mnt)
    assert status == 0
    assert "u:0:0:4294967295" in out


# ---- --subuid ------------------------------------------------------------------

@pytest.fixture
def user():
    """A real account with a uid and a primary group different from each other
    is best; any non-root account will do."""
    for pw in pwd.getpwall():
        if pw.pw_uid not in (0,) and pw.pw_name != "root":
            return pw
    pytest.fail("no non-root account in /etc/passwd")


def write(path, text):
    path.write_text(text)
    return str(path)


def test_subid_files_give_the_rootless_layout(tmp_path, user):
    subuid = write(tmp_path / "subuid", f"# comment\nother:1:2\n{user.pw_name}:100000:65536\n"
                   f"{user.pw_uid}:500000:10\n")
    subgid = write(tmp_path / "subgid", f"{user.pw_name}:200000:65536\n")
    uids, gids = read_subid_maps(user.pw_name, subuid, subgid)
    assert uids == [Extent(0, user.pw_uid, 1), Extent(1, 100000, 65536), Extent(65537, 500000, 10)]
    assert gids == [Extent(0, user.pw_gid, 1), Extent(1, 200000, 65536)]
    by_uid = read_subid_maps(str(user.pw_uid), subuid, subgid)  # a uid works as well
    assert by_uid == (uids, gids)
    idmap = build_idmap(uids, gids)
    assert idmap.uids.to_upper(0) == user.pw_uid
    assert idmap.uids.to_upper(1) == 100000
    assert idmap.uids.to_upper(65537) == 500000


def test_subid_errors_name_the_problem(tmp_path, user):
    subuid = write(tmp_path / "subuid", "someone-else:100000:65536\n")
    subgid = write(tmp_path / "subgid", f"{user.pw_name}:200000:65536\n")
    with pytest.raises(TableError, match=f"{subuid} has no range for user '{user.pw_name}'"):
        read_subid_maps(user.pw_name, subuid, subgid)
    with pytest.raises(TableError, match="unknown user 'no-such-user-here'"):
        read_subid_maps("no-such-user-here", subuid, subgid)
    with pytest.raises(TableError, match="cannot read"):
        read_subid_maps(user.pw_name, str(tmp_path / "missing"), subgid)


@contextlib.contextmanager
def etc_subid(subuid_text: str, subgid_text: str):
    """Replace /etc/subuid and /etc/subgid for the block; restore them byte
    for byte (and their absence) afterwards."""
    saved = {}
    for path in ("/etc/subuid", "/etc/subgid"):
        if os.path.exists(path):
            backup = path + ".shiftfs-test-backup"
            shutil.copy2(path, backup)
            saved[path] = backup
        else:
            saved[path] = None
    try:
        with open("/etc/subuid", "w") as f:
            f.write(subuid_text)
        with open("/etc/subgid", "w") as f:
            f.write(subgid_text)
        yield
    finally:
        for path, backup in saved.items():
            if backup is None:
                os.unlink(path)
            else:
                os.replace(backup, path)


def test_subuid_from_the_real_etc_files(capsys, dirs, user):
    lower, mnt = dirs
    before = {p: open(p, "rb").read() if os.path.exists(p) else None
              for p in ("/etc/subuid", "/etc/subgid")}
    with etc_subid(f"{user.pw_name}:100000:65536\n", f"{user.pw_name}:300000:65536\n"):
        status, out, err = run_cli(capsys, "--dry-run", "--subuid", user.pw_name, lower, mnt)
    after = {p: open(p, "rb").read() if os.path.exists(p) else None
             for p in ("/etc/subuid", "/etc/subgid")}
    assert after == before
    assert status == 0, err
    assert f"u:0:{user.pw_uid}:1  lower 0..0 -> upper {user.pw_uid}..{user.pw_uid}" in out
    assert "u:1:100000:65536  lower 1..65536 -> upper 100000..165535" in out
    assert f"g:0:{user.pw_gid}:1" in out
    assert "g:1:300000:65536" in out


def test_subuid_user_without_ranges_is_a_usage_error(capsys, dirs, user):
    lower, mnt = dirs
    with etc_subid("", ""):
        status, out, err = run_cli(capsys, "-n", "--subuid", user.pw_name, lower, mnt)
    assert status == 2
    assert f"/etc/subuid has no range for user '{user.pw_name}'" in err


def test_table_printed_at_mount_time(dirs):
    """Without -q the effective table is printed when the mount is made
    (libfuse then daemonizes; the command returns once the mount is live)."""
    lower, mnt = dirs
    try:
        r = subprocess.run([sys.executable, "-m", "shiftfs", str(lower), str(mnt),
                            "--uidmap", "0:100000:65536", "--gidmap", "0:200000:65536+70000:70000:1"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert is_mounted(str(mnt))
        assert r.stdout.splitlines() == [
            f"shiftfs: {lower} -> {mnt}",
            "u:0:100000:65536  lower 0..65535 -> upper 100000..165535",
            "g:0:200000:65536  lower 0..65535 -> upper 200000..265535",
            "g:70000:70000:1  lower 70000..70000 -> upper 70000..70000",
        ]
    finally:
        if is_mounted(str(mnt), None):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    assert not is_mounted(str(mnt), None)
