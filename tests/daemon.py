"""A FUSE daemon run in the foreground by a test or a benchmark, after
libfuse's test/util.py: start it, wait until its mount is live, and always
unmount it and reap the daemon, also when the body fails.

    with foreground_daemon(lower, mnt, *tables.args(STD), log=log) as proc:
        ...                                        # shiftfs -f -q, our own child
    with running(["bindfs", "-f", lower, mnt], mnt, what="bindfs") as proc:
        ...                                        # any FUSE daemon

The daemon's stderr goes to ``log`` (a temporary file when none is given)
and is quoted when it exits before mounting or does not mount in time
(DaemonError). At the end the mount is unmounted (``fusermount3 -u``, lazily
if that fails) and the daemon must exit within ``timeout`` seconds: if it
does not, it is sent SIGTERM, then SIGKILL, and DaemonError is raised (or
``warn`` is told, for the benchmarks). A daemon whose mount lives in another
mount namespace is stopped with SIGTERM instead (``by_signal``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from shiftfs.mount import is_mounted, unmount
from shiftfs.supervisor import read_status

REPO = Path(__file__).resolve().parent.parent  # the checkout whose shiftfs the daemons run
TIMEOUT = 20.0  # seconds to mount, and to exit after the unmount

Mounted = Callable[[subprocess.Popen], bool]


class DaemonError(RuntimeError):
    """The daemon exited before its mount was live, did not mount in time,
    or did not exit after its unmount."""


def mounted_at(mountpoint, fstype: str | None = None) -> Mounted:
    """The default test of a live mount: one at exactly ``mountpoint`` (of
    ``fstype``, or of any type), in this process's mount namespace."""
    return lambda _proc: is_mounted(str(mountpoint), fstype)


def log_tail(log, size: int = 2000) -> str:
    try:
        return Path(log).read_text(errors="replace")[-size:] if log else ""
    except OSError:
        return ""


def wait_for_mount(proc: subprocess.Popen, mountpoint, *, mounted: Mounted | None = None,
                   timeout: float = TIMEOUT, log=None, what: str = "the daemon") -> None:
    """Return once ``mounted(proc)`` holds; DaemonError (with the end of
    ``log``) if ``proc`` exits first or ``timeout`` seconds pass."""
    mounted = mounted or mounted_at(mountpoint)
    deadline = time.monotonic() + timeout
    while not mounted(proc):
        if proc.poll() is not None:
            raise DaemonError(f"{what} exited with status {proc.returncode} before mounting "
                              f"{mountpoint}: {log_tail(log)}")
        if time.monotonic() > deadline:
            raise DaemonError(f"{what} did not mount {mountpoint} within {timeout:g} s: "
                              f"{log_tail(log)}")
        time.sleep(0.01)


def reap(proc: subprocess.Popen, timeout: float = TIMEOUT, *, what: str = "the daemon",
         warn: Callable[[str], None] | None = None) -> int:
    """Wait for ``proc`` (our own child) to exit; after ``timeout`` seconds
    SIGTERM it, then SIGKILL it, and say so (DaemonError, or ``warn``)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        status = proc.wait(timeout=timeout)
        said = f"{what} (pid {proc.pid}) did not exit within {timeout:g} s; SIGTERM ended it"
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait(timeout=timeout)
        said = f"{what} (pid {proc.pid}) ignored SIGTERM; SIGKILL ended it"
    if warn is None:
        raise DaemonError(said)
    warn(said)
    return status


def stop(proc: subprocess.Popen, mountpoint, *, mounted: Mounted | None = None,
         by_signal: bool = False, timeout: float = TIMEOUT, what: str = "the daemon",
         warn: Callable[[str], None] | None = None) -> None:
    """Unmount ``mountpoint`` if ``mounted`` (lazily if a plain unmount
    fails), or SIGTERM the daemon (``by_signal``: it unmounts itself), and
    reap it, whatever the unmount gave."""
    mounted = mounted or mounted_at(mountpoint)
    try:
        if by_signal:
            if proc.poll() is None:
                proc.terminate()
        elif mounted(proc):
            try:
                unmount(str(mountpoint))
            except OSError:
                unmount(str(mountpoint), lazy=True)
    finally:
        reap(proc, timeout, what=what, warn=warn)


def _abandon(proc, mountpoint, mounted: Mounted | None, by_signal: bool, timeout: float) -> None:
    """A daemon that did not mount (in time): SIGTERM, reaped at once,
    and its mount cleared should it have come up after all."""
    if proc.poll() is None:
        proc.terminate()
    reap(proc, timeout, warn=lambda _said: None)
    if not by_signal and (mounted or mounted_at(mountpoint))(proc):
        unmount(str(mountpoint), lazy=True)


@contextlib.contextmanager
def _stderr_file(log) -> Iterator[str]:
    """The path the daemon's stderr goes to: ``log``, or a temporary file
    removed at the end."""
    if log is not None:
        yield str(log)
        return
    fd, path = tempfile.mkstemp(prefix="shiftfs-daemon-", suffix=".log")
    os.close(fd)
    try:
        yield path
    finally:
        os.unlink(path)


@contextlib.contextmanager
def running(cmd: Sequence[str], mountpoint, *, log=None, mounted: Mounted | None = None,
            what: str | None = None, timeout: float = TIMEOUT, by_signal: bool = False,
            warn: Callable[[str], None] | None = None, **popen) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` (a FUSE daemon in the foreground: its pid is ours), yield
    its Popen once ``mountpoint`` is live; always unmount and reap it.
    ``popen`` goes to subprocess.Popen (stdin and stdout default to
    /dev/null, stderr is ``log``)."""
    what = what or os.path.basename(cmd[0])
    popen.setdefault("stdin", subprocess.DEVNULL)
    popen.setdefault("stdout", subprocess.DEVNULL)
    with _stderr_file(log) as path:
        with open(path, "wb") as err:
            proc = subprocess.Popen(list(cmd), stderr=err, **popen)
        try:
            wait_for_mount(proc, mountpoint, mounted=mounted, timeout=timeout, log=path, what=what)
        except BaseException:
            _abandon(proc, mountpoint, mounted, by_signal, timeout)
            raise
        try:
            yield proc
        finally:
            stop(proc, mountpoint, mounted=mounted, by_signal=by_signal, timeout=timeout,
                 what=what, warn=warn)


def shiftfs_env(env: dict | None = None) -> dict:
    """``env`` (default: ours) with this checkout first on PYTHONPATH, so that
    ``python3 -m shiftfs`` runs it from any working directory."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def limited_fds(count: int) -> list[str]:
    """The command prefix that runs a root daemon under RLIMIT_NOFILE
    ``count``: without CAP_SYS_RESOURCE (gone from its bounding set) it
    cannot raise the limit again, as it otherwise does at start."""
    return ["setpriv", "--bounding-set", "-sys_resource", "--inh-caps", "-sys_resource",
            "prlimit", f"--nofile={count}:{count}", "--"]


def shiftfs_command(lower, mountpoint, *args: str, prefix: Sequence[str] = ()) -> list[str]:
    """``shiftfs -f -q ARGS LOWER MOUNTPOINT`` with this interpreter, after ``prefix``."""
    return [*prefix, sys.executable, "-m", "shiftfs", "-f", "-q", *args, str(lower), str(mountpoint)]


@contextlib.contextmanager
def foreground_daemon(lower, mountpoint, *args: str, log=None, fd_limit: int | None = None,
                      prefix: Sequence[str] = (), **popen) -> Iterator[subprocess.Popen]:
    """``shiftfs -f -q ARGS LOWER MOUNTPOINT`` (after ``prefix``; under
    RLIMIT_NOFILE ``fd_limit``, if given), its stderr in the file ``log``:
    yields its Popen once the mount is live, and always unmounts and reaps
    the daemon. ``popen`` goes to subprocess.Popen (``env`` gets this
    checkout on PYTHONPATH)."""
    prefix = [*(limited_fds(fd_limit) if fd_limit else []), *prefix]
    popen["env"] = shiftfs_env(popen.get("env"))
    with running(shiftfs_command(lower, mountpoint, *args, prefix=prefix), mountpoint, log=log,
                 mounted=lambda _proc: is_mounted(str(mountpoint)), what="shiftfs",
                 **popen) as proc:
        yield proc


def server_pid(mountpoint) -> int:
    """The pid of the server serving ``mountpoint`` now: the process that
    holds the node fds, marks and open files (the one a test signals or
    measures); the process a test starts is its supervisor."""
    status = read_status(str(mountpoint))
    assert status is not None and status["server"] > 0, f"no server for {mountpoint}"
    return status["server"]


def restart_server(mountpoint, timeout: float = 10.0) -> int:
    """SIGKILL the mount's server and wait for the one its supervisor
    starts instead; that one's pid."""
    pid = server_pid(mountpoint)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while (new := read_status(str(mountpoint))["server"]) in (pid, 0):
        assert time.monotonic() < deadline, f"no new server within {timeout:g} s"
        time.sleep(0.01)
    return new


@contextlib.contextmanager
def loop_ext4(path: Path, size: str, *mkfs: str) -> Iterator[Path]:
    """A private ext4 of ``size`` (a loop image beside ``path``, made with
    mkfs.ext4 options ``mkfs``) mounted at ``path``, mode 0755; unmounted
    on the way out, also when the test failed."""
    img = path.with_name(path.name + ".img")
    path.mkdir()
    subprocess.run(["truncate", "-s", size, str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", *mkfs, str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(path)], check=True)
    try:
        os.chmod(path, 0o755)
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)


def space_back(mountpoint, timeout: float = 5.0) -> bool:
    """After a file was closed and unlinked through the mount on a full
    lower: whether space shows as free again within ``timeout`` s (the
    daemon lets the inode go once it has the file's RELEASE and FORGET,
    which the kernel sends after the close and the unlink)."""
    deadline = time.monotonic() + timeout
    while os.statvfs(mountpoint).f_bavail == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.statvfs(mountpoint).f_bavail > 0


def seen_within(check, limit, every: float = 0.002):
    """Seconds until check() held (asked ``every`` seconds, at least once),
    or None if it did not within limit: a change behind the mount shows
    once the watcher's invalidation is in."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            return None
        time.sleep(every)
