"""Run a Python callable as another caller in a forked child and bring back its result or errno.

The child's credentials are what the filesystem under test sees, so tests
exercise the caller's ids and not root's. Results travel back over a pipe as
pickles; the child always leaves through os._exit so no pytest/atexit
machinery runs twice.
"""
import ctypes
import dataclasses
import errno as _errno
import os
import pickle
import select
import signal
import time
import traceback

CALL_TIMEOUT = 60.0
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

_libc = ctypes.CDLL(None, use_errno=True)


@dataclasses.dataclass(frozen=True)
class Errno:
    """An OSError's errno that came back from a call, comparable: Errno(errno.EACCES)."""
    errno: int

    def __repr__(self):
        return f"Errno({_errno.errorcode.get(self.errno, self.errno)})"


def errno_of(result):
    """The errno number if result is an Errno, else None (the call succeeded)."""
    return result.errno if isinstance(result, Errno) else None


class ChildError(Exception):
    """The child raised something that could not be pickled back; carries its traceback text."""


def _unshare(flags, what):
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({what}): {os.strerror(err)}")


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def _child_main(result_w, become, fn, args, kwargs):
    try:
        become()
        try:
            out = ("ok", fn(*args, **kwargs))
        except OSError as e:
            out = ("errno", e.errno)
        data = pickle.dumps(out)
    except BaseException as e:
        # Pickle the exception on its own so one that cannot cross still brings its traceback.
        try:
            exc = pickle.dumps(e)
        except Exception:
            exc = None
        data = pickle.dumps(("raise", exc, traceback.format_exc()))
    _write_all(result_w, data)


def _fork_call(become, fn, args, kwargs, timeout, after_fork=None):
    """Fork; child runs become() then fn; parent runs after_fork(pid) then collects the result."""
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(result_r)
            _child_main(result_w, become, fn, args, kwargs)
        finally:
            os._exit(0)
    os.close(result_w)
    reaped = False
    try:
        if after_fork:
            after_fork(pid)
        chunks, deadline = [], time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([result_r], [], [], left)[0]:
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish within {timeout}s in child {pid}")
            chunk = os.read(result_r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
        reaped = True
    finally:
        os.close(result_r)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if not chunks:
        raise ChildError(f"child {pid} exited without a result (wait status {status:#x})")
    kind, *rest = pickle.loads(b"".join(chunks))
    if kind == "ok":
        return rest[0]
    if kind == "errno":
        return Errno(rest[0])
    exc, tb = rest
    try:
        exc = pickle.loads(exc) if exc is not None else None
    except Exception:
        exc = None
    if exc is None:
        raise ChildError(f"exception in child {pid}:\n{tb}")
    exc.add_note(f"raised in child {pid}:\n{tb}")
    raise exc


def call_as(fn, *args, uid: int, gid: int, groups=(), umask: int | None = None,
            call_timeout: float = CALL_TIMEOUT, **kwargs):
    """Run fn(*args, **kwargs) in a forked child with setgroups(groups), setresgid(gid,gid,gid), setresuid(uid,uid,uid).
    Returns fn's return value (must be picklable). If fn raises OSError, returns an Errno(errno) value object
    (a small frozen dataclass with .errno and a readable repr like 'Errno(EACCES)'); any other exception is re-raised in the parent with the child's traceback text."""
    def become():
        os.setgroups(list(groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if umask is not None:
            os.umask(umask)
    return _fork_call(become, fn, args, kwargs, call_timeout)


def call_as_userns_root(fn, *args, uid_extents, gid_extents, new_mount_ns: bool = False,
                        umask: int | None = None, call_timeout: float = CALL_TIMEOUT, **kwargs):
    """Same, but the child runs as uid 0 / gid 0 inside a NEW user namespace whose uid_map/gid_map lines are the given
    extents, written as "inside outside count" = (lower, upper, count) — i.e. the process is 'container root' with full capabilities in its namespace.
    new_mount_ns=True also gives it a mount namespace of its own (owned by the new user namespace, so it may mount there)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    open_fds = [ready_r, ready_w, go_r, go_w]

    def become():
        os.close(ready_r)
        os.close(go_w)
        _unshare(CLONE_NEWUSER, "CLONE_NEWUSER")
        os.write(ready_w, b"1")
        if os.read(go_r, 1) != b"1":
            raise ChildError("parent could not write the id maps")
        # Creating the namespace gave us every capability in it; take uid/gid 0 there
        # (our old ids are unmapped unless the extents happen to cover them).
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        if new_mount_ns:
            _unshare(CLONE_NEWNS, "CLONE_NEWNS")
        if umask is not None:
            os.umask(umask)

    def after_fork(pid):
        os.close(ready_w)
        os.close(go_r)
        try:
            if os.read(ready_r, 1) == b"1":  # else the child failed and reports why
                _write_id_maps(pid, uid_extents, gid_extents)
                os.write(go_w, b"1")
        finally:
            os.close(ready_r)
            os.close(go_w)  # EOF tells a waiting child the maps never came
            open_fds.clear()

    try:
        return _fork_call(become, fn, args, kwargs, call_timeout, after_fork)
    finally:
        for fd in open_fds:  # only if fork itself failed
            os.close(fd)


def _write_id_maps(pid, uid_extents, gid_extents):
    # Same text as oracle.kernel_idmap.write_id_maps; kept local so this module stands alone.
    for name, extents in (("uid_map", uid_extents), ("gid_map", gid_extents)):
        text = "".join(f"{int(lo)} {int(up)} {int(n)}\n" for lo, up, n in extents)
        if not text:
            raise ValueError(f"{name} needs at least one extent (lower, upper, count)")
        try:
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)  # the kernel wants the whole map in one write
        except OSError as e:
            raise OSError(e.errno, f"writing {name} {text.strip()!r} for pid {pid}: {e.strerror}") from None


class Caller:
    """A caller that lives across calls: a forked child with the given ids
    that runs ``fn(*args)`` on request, so that what it holds (fds, a cwd)
    stays held between calls and two callers can act in turns or at once.
    ``fn`` must be picklable (a module-level function). ``start`` begins a
    call, ``finish`` collects its result (as call_as returns it), ``call``
    does both; ``close`` (or leaving a ``with``) ends the child."""

    _parent_ends: set = set()  # of every live Caller: a child closes the others' too

    def __init__(self, uid: int, gid: int, groups=(), call_timeout: float = CALL_TIMEOUT):
        self.timeout = call_timeout
        req_r, self._req = os.pipe()
        self._res, res_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                for fd in (self._req, self._res, *Caller._parent_ends):
                    os.close(fd)
                os.setgroups(list(groups))
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                with os.fdopen(req_r, "rb") as requests:
                    while True:
                        try:
                            fn, args = pickle.load(requests)
                        except EOFError:
                            break
                        try:
                            out = ("ok", fn(*args))
                        except OSError as e:
                            out = ("errno", e.errno)
                        except BaseException:  # noqa: BLE001 (brought back as text)
                            out = ("raise", traceback.format_exc())
                        data = pickle.dumps(out)
                        _write_all(res_w, len(data).to_bytes(8, "little") + data)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(res_w)
        Caller._parent_ends.update((self._req, self._res))

    def start(self, fn, *args) -> None:
        _write_all(self._req, pickle.dumps((fn, args)))

    def _read(self, n: int, deadline: float) -> bytes:
        chunks = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._res], [], [], left)[0]:
                raise TimeoutError(f"caller {self.pid} did not answer within {self.timeout}s")
            chunk = os.read(self._res, n)
            if not chunk:
                raise ChildError(f"caller {self.pid} died")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def finish(self):
        deadline = time.monotonic() + self.timeout
        size = int.from_bytes(self._read(8, deadline), "little")
        kind, value = pickle.loads(self._read(size, deadline))
        if kind == "ok":
            return value
        if kind == "errno":
            return Errno(value)
        raise ChildError(f"exception in caller {self.pid}:\n{value}")

    def call(self, fn, *args):
        self.start(fn, *args)
        return self.finish()

    def close(self) -> None:
        if self.pid is None:
            return
        Caller._parent_ends.difference_update((self._req, self._res))
        os.close(self._req)  # EOF: the child leaves its loop
        os.close(self._res)
        try:
            if not _wait_exit(self.pid, 5.0):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        finally:
            self.pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wait_exit(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
        time.sleep(0.01)
    return False
