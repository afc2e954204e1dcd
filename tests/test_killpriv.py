"""FUSE_HANDLE_KILLPRIV_V2: the daemon clears set-uid, set-gid and file
capabilities on write and truncate, so the kernel no longer asks for
security.capability before every write (it asks once per inode, then marks
it S_NOSEC). Negotiated by a root daemon on both libfuse generations: 3.17
knows the flag (conn->want); on 3.14 the INIT reply is patched through
libfuse's custom io (fuse.Session.use_fd). The kill bits come from the raw
request (libfuse passes none of them on).

What is held here: request counts over a multi-MiB write (fuse:fuse_request_send
tracepoint), and the bits and capabilities left after writes, truncates and
O_TRUNC opens by the owner, a group member, another user and root, against
a kernel idmapped mount of a copy of the same tree."""

from __future__ import annotations

import os
import subprocess

import pytest


from tests.callers import Errno, call_as
from tests.tables import ROOT_KEPT, tuples, upper_of

pytestmark = pytest.mark.needs_root

MIB = 1 << 20
OWNER = upper_of(1000, ROOT_KEPT)  # 101000
OTHER = upper_of(1001, ROOT_KEPT)  # 101001
CAPS = "cap_net_raw+ep"


def _write_mib(path, mib: int) -> None:
    block = b"\xa5" * MIB
    with open(path, "r+b", buffering=0) as f:
        for _ in range(mib):
            f.write(block)


@pytest.mark.parametrize("who", ["root", "user"])
def test_a_multi_mib_write_asks_for_security_capability_once(lower, mounter, counter, who):
    """16 writes of 1 MiB: one GETXATTR security.capability (the first
    write, before the inode is S_NOSEC), not one per write. A user's writes
    carry the kill bit (no CAP_FSETID), root's do not; both are counted."""
    (lower / "f").write_bytes(b"")
    os.chown(lower / "f", 1000, 1000)
    os.chmod(lower / "f", 0o644)
    mnt = mounter(lower, ROOT_KEPT, options=["-o", "passthrough=off"])
    counter.start(os.stat(mnt).st_dev)
    if who == "root":
        _write_mib(mnt / "f", 16)
    else:
        assert call_as(_write_mib, mnt / "f", 16, uid=OWNER, gid=OWNER) is None
    counts = counter.stop()
    assert counts["FUSE_WRITE"] >= 16, counts
    assert counts["xattr:security.capability"] <= 1, counts
    assert counts["FUSE_SETATTR"] == 0, counts
    assert os.path.getsize(lower / "f") == 16 * MIB
    assert os.stat(lower / "f").st_mode & 0o7777 == 0o644


def test_a_mib_write_with_passthrough_asks_once_too(lower, mounter, counter):
    """With passthrough (libfuse 3.17) the writes reach no daemon, and the
    capability is asked once (backing_file_write_iter's file_remove_privs on
    an S_NOSEC inode does nothing); on 3.14 the daemon serves them."""
    (lower / "f").write_bytes(b"")
    mnt = mounter(lower, ROOT_KEPT)
    counter.start(os.stat(mnt).st_dev)
    _write_mib(mnt / "f", 8)
    counts = counter.stop()
    assert counts["xattr:security.capability"] <= 1, counts
    assert os.path.getsize(lower / "f") == 8 * MIB


# ---- set-id bits and capabilities after a write, against the kernel ------------

MODES = [0o4755, 0o2755, 0o2745, 0o6777, 0o4777, 0o2777, 0o2767, 0o6767, 0o0755]
CALLERS = {  # uid, gid, supplementary groups
    "owner": (OWNER, OWNER, ()),
    "group": (OTHER, OTHER, (OWNER,)),
    "other": (OTHER, OTHER, ()),
    "root": (0, 0, ()),
}


def _op(path, what: str):
    if what == "write":
        with open(path, "r+b", buffering=0) as f:
            f.write(b"w")
    elif what == "truncate":
        os.truncate(path, 1)
    elif what == "o_trunc":
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    return None


def _prepare(low, name: str, mode: int, caps: bool) -> None:
    path = low / name
    path.write_bytes(b"0" * 4096)
    os.chown(path, 1000, 1000)
    if caps:
        subprocess.run(["setcap", CAPS, str(path)], check=True)
    os.chmod(path, mode)  # after setcap (setcap keeps the mode, but be sure)


def _outcome(low, name: str):
    path = low / name
    try:
        os.getxattr(path, "security.capability")
        caps = True
    except OSError:
        caps = False
    return os.stat(path).st_mode & 0o7777, caps


def _cases():
    for mode in MODES:
        for caps in (False, True) if mode in (0o0755, 0o4755, 0o6777) else (False,):
            yield mode, caps


def _run_all(low, mnt, ops):
    out = {}
    for what in ops:
        for who, (uid, gid, groups) in CALLERS.items():
            for mode, caps in _cases():
                name = f"{what}-{who}-{mode:o}-{'cap' if caps else 'nocap'}"
                path = mnt / name
                if uid == 0:
                    try:
                        result = _op(path, what)
                    except OSError as e:
                        result = Errno(e.errno)
                else:
                    result = call_as(_op, path, what, uid=uid, gid=gid, groups=groups)
                out[name] = (result,) + _outcome(low, name)
    return out


@pytest.mark.parametrize("passthrough", ["off", "auto"])
def test_set_id_bits_and_caps_after_writes_and_truncates_agree_with_the_kernel(
        workdir, mounter, passthrough):
    """write, truncate and O_TRUNC open by the owner, a
    group member, another user and root, on set-uid, set-gid (with and
    without group exec) and capability-carrying files: the errno, the bits
    and the capability left on the lower are the kernel's."""
    from tests.oracle.kernel_idmap import idmapped_mount
    ops = ["write", "truncate", "o_trunc"]
    results = {}
    for kind in ("shiftfs", "kernel"):
        low = workdir / f"lower-{kind}"
        low.mkdir()
        os.chmod(low, 0o755)
        for what in ops:
            for who in CALLERS:
                for mode, caps in _cases():
                    _prepare(low, f"{what}-{who}-{mode:o}-{'cap' if caps else 'nocap'}", mode,
                             caps)
        if kind == "shiftfs":
            mnt = mounter(low, ROOT_KEPT, options=["-o", f"passthrough={passthrough}"])
            results[kind] = _run_all(low, mnt, ops)
        else:
            mnt = workdir / "mnt-kernel"
            mnt.mkdir()
            ext = tuples(ROOT_KEPT)
            with idmapped_mount(str(low), str(mnt), ext, ext):
                results[kind] = _run_all(low, mnt, ops)
    differ = {k: (v, results["kernel"][k]) for k, v in results["shiftfs"].items()
              if v != results["kernel"][k]}
    assert not differ, "\n" + "\n".join(f"{k}: shiftfs {a} kernel {b}"
                                         for k, (a, b) in sorted(differ.items()))
    # the matrix means something: set-id bits both cleared and kept
    setid = {k: (r, mode) for k, (r, mode, _c) in results["kernel"].items()
             if int(k.split("-")[-2], 8) & 0o6000 and r is None}
    assert any(mode & 0o6000 for _r, mode in setid.values())
    assert any(mode & 0o6000 != int(k.split("-")[-2], 8) & 0o6000 for k, (_r, mode) in setid.items())
