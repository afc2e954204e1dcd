"""Containers for the scenarios: a process in new user, mount and pid
namespaces, chrooted into a (shiftfs-mounted) root filesystem.

This is what ``unshare --map-users=100000,0,65536 --map-groups=100000,0,65536
--setuid 0 --setgid 0 --mount --pid --fork --mount-proc --root=MNT CMD``
does, without util-linux's need for newuidmap(1) and /etc/subuid lines: the
test (host root) writes the child's uid_map/gid_map itself. The child then
execs ``unshare --mount --pid --fork --kill-child --mount-proc --root MNT``
as root *of its new namespace*, so /proc is mounted inside the container's
own mount namespace and disappears with it.

Containers are started with ``Container.start`` (several can run at the same
time) and always reaped: ``wait`` kills the whole process group on timeout,
and the context manager kills it on any exit.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
_libc = ctypes.CDLL(None, use_errno=True)
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
DEFAULT_TIMEOUT = 60.0


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


def map_text(extents) -> str:
    """uid_map text; extents are (inside, outside, count) like a uid_map line."""
    return "".join(f"{int(a)} {int(b)} {int(c)}\n" for a, b, c in extents)


def write_maps(pid: int, uid_extents, gid_extents) -> None:
    for name, extents in (("uid_map", uid_extents), ("gid_map", gid_extents)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(map_text(extents))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> "Result":
        if self.returncode != 0:
            raise AssertionError(f"container exited {self.returncode}\n--- stdout\n{self.stdout}"
                                 f"\n--- stderr\n{self.stderr}")
        return self


def fork_as_userns_root(out_path: str, err_path: str, uid_map, gid_map, become,
                        before_unshare=None) -> int:
    """Fork a child in a process group of its own, stdout and stderr to the
    given files, that unshares a user namespace, waits while the parent
    writes ``uid_map``/``gid_map`` (inside, outside, count), becomes root
    there and calls ``become()``, which must exec. Returns the child's pid;
    a child that fails exits 126 with the reason on its stderr."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        try:
            os.setsid()  # own process group: the parent can kill everything we start
            os.close(ready_r)
            os.close(go_w)
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
            if before_unshare is not None:
                before_unshare()
            _unshare(CLONE_NEWUSER)
            os.write(ready_w, b"1")
            if os.read(go_r, 1) != b"1":
                os._exit(125)
            os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            become()
        except BaseException as e:  # noqa: BLE001
            try:
                os.write(2, f"setup failed: {e!r}\n".encode())
            finally:
                os._exit(126)
        os._exit(126)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) == b"1":
            write_maps(pid, uid_map, gid_map)
            os.write(go_w, b"1")
    except BaseException:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)
    return pid


class Container:
    """A running container; use ``Container.start(...)`` then ``wait()``."""

    def __init__(self, pid: int, out_path: str, err_path: str, workdir: str) -> None:
        self.pid = pid
        self._out, self._err, self._workdir = out_path, err_path, workdir
        self.result: Result | None = None

    @classmethod
    def start(cls, root: str, script: str, *, uid_map=((0, 100000, 65536),), gid_map=None,
              user: tuple[int, int] = (0, 0), pid_ns: bool = True, mount_proc: bool = True,
              env: dict | None = None, extra_fds: tuple[int, ...] = ()) -> "Container":
        """Run ``/bin/sh -c script`` chrooted into ``root`` as ``user`` (uid, gid inside
        the container) in a new user namespace with ``uid_map``/``gid_map`` lines
        (inside, outside, count)."""
        gid_map = uid_map if gid_map is None else gid_map
        workdir = tempfile.mkdtemp(prefix="shiftfs-e2e-ctr-")
        out_path, err_path = os.path.join(workdir, "out"), os.path.join(workdir, "err")

        def become_container():
            argv = [UNSHARE, "--mount", "--fork", "--kill-child"]
            if pid_ns:
                argv += ["--pid"] + (["--mount-proc"] if mount_proc else [])
            argv += ["--root", root]
            uid, gid = user
            if (uid, gid) != (0, 0):
                argv += ["--setuid", str(uid), "--setgid", str(gid)]
            argv += ["/bin/sh", "-c", script]
            environ = {"PATH": "/bin:/usr/bin:/sbin:/usr/sbin:/usr/local/bin",
                       "HOME": "/root", "LC_ALL": "C"}
            environ.update(env or {})
            for fd in extra_fds:
                os.set_inheritable(fd, True)
            os.execve(UNSHARE, argv, environ)

        pid = fork_as_userns_root(out_path, err_path, uid_map, gid_map, become_container)
        return cls(pid, out_path, err_path, workdir)

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> Result:
        if self.result is not None:
            return self.result
        deadline = time.monotonic() + timeout
        status = None
        while True:
            done, st = os.waitpid(self.pid, os.WNOHANG)
            if done:
                status = st
                break
            if time.monotonic() > deadline:
                self.kill()
                _, st = os.waitpid(self.pid, 0)
                self._collect(st)
                raise TimeoutError(f"container {self.pid} still running after {timeout}s\n"
                                   f"--- stdout\n{self.result.stdout}\n--- stderr\n{self.result.stderr}")
            time.sleep(0.02)
        return self._collect(status)

    def _collect(self, status: int) -> Result:
        with open(self._out, errors="replace") as f:
            out = f.read()
        with open(self._err, errors="replace") as f:
            err = f.read()
        shutil.rmtree(self._workdir, ignore_errors=True)
        code = os.waitstatus_to_exitcode(status)
        self.result = Result(code, out, err)
        return self.result

    def kill(self) -> None:
        """SIGKILL the container's process group (everything this container started)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc) -> None:
        if self.result is None:
            self.kill()
            try:
                _, st = os.waitpid(self.pid, 0)
                self._collect(st)
            except ChildProcessError:
                pass


def run(root: str, script: str, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> Result:
    """Start a container, wait for it (killing it on timeout), return its Result."""
    with Container.start(root, script, **kwargs) as c:
        return c.wait(timeout)
