"""The request path against requests the kernel never sends (issue 20,
item 5): shiftfs's Session and Operations served over a socket
(fuse_wire.Wire), so that a test chooses every byte and sees every reply.

What must hold, whatever comes: every request but FORGET, BATCH_FORGET
and INTERRUPT is answered exactly once (an errno, EIO and one log line
for a bug), the reader keeps serving, an fh is only ever one the daemon
handed out for that node, a FORGET never closes an fd a running request
acts on, and a READDIRPLUS reply fills the size the kernel gave and never
passes it."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from tests.fuse_wire import ROOT, Wire, dirents, forget_batch
from shiftfs import protocol as P
from shiftfs.session import MAX_WRITE

pytestmark = pytest.mark.needs_root

NO_REPLY = (P.FORGET, P.BATCH_FORGET, P.INTERRUPT)


@pytest.fixture
def tree(lower):
    (lower / "f").write_bytes(b"the file's own bytes")
    (lower / "g").write_bytes(b"another file")
    (lower / "d").mkdir()
    os.symlink("the-target", lower / "l")
    return lower


@pytest.fixture
def wire(tree):
    w = Wire(tree)
    yield w
    w.close()


@pytest.fixture
def slow_wire(tree):
    """Every request to the pool (as for a FUSE or network lower), so that
    two requests on one node run at once."""
    w = Wire(tree, slow=True)
    yield w
    w.close()


# ---- short and malformed bodies ----------------------------------------------------

def test_every_request_with_a_short_body_is_answered_once(wire):
    """Every opcode (and unknown ones), its body cut anywhere: one reply
    each, with an errno where it cannot be served; a bug is EIO and one
    log line; the reader serves on. On ab0dc50 each bug logged a
    traceback of 7 lines, and a BATCH_FORGET whose count passed its body
    forgot nothing."""
    node, _ = wire.lookup(ROOT, b"f")
    sent = 0
    for op in [*range(1, 54), 99, 4096]:
        if op == P.INIT:
            continue
        for cut in (0, 1, 7, 8, 15, 16, 17, 24, 39, 40, 63, 88):
            before = len(wire.log.lines)
            if op in NO_REPLY:  # of an unknown node: no reply, at most one line
                wire.send(op, 1 << 40, b"\xff" * cut)
                assert wire.alive()  # served in order: the line, if any, is written
                assert len(wire.log.lines) - before <= 1, wire.log.lines[before:]
                continue
            u = wire.send(op, node, b"\xff" * cut)
            r = wire.reply(u)
            sent += 1
            lines = wire.log.lines[before:]
            assert len(lines) <= 1, lines
            bugs = [line for line in lines if " failed: " in line]
            if bugs:
                assert r.error == -errno.EIO, (op, cut, r, bugs)
    assert wire.silence() == []  # nothing answered twice, no INTERRUPT or FORGET answered
    assert wire.alive()
    assert sent > 600


def test_a_request_shorter_than_its_header_is_logged_and_skipped(wire):
    wire.sock.send(b"\x00" * 10)
    assert wire.silence() == []
    assert wire.alive()
    assert any("shorter than its header" in line for line in wire.log.lines)


def test_forget_and_batch_forget_of_unknown_ids_change_nothing(wire):
    """Unknown ids, the root, a count past the body, an entry cut in two:
    the node that is known keeps its one lookup until the FORGET that
    takes it."""
    node, _ = wire.lookup(ROOT, b"f")
    wire.send(P.FORGET, 1 << 40, P.FORGET_IN.pack(5))
    wire.send(P.FORGET, ROOT, P.FORGET_IN.pack(1 << 62))
    wire.send(P.BATCH_FORGET, 0, forget_batch([(1 << 40, 1), (ROOT, 1 << 62), (0, 1)]))
    wire.send(P.BATCH_FORGET, 0, P.BATCH_FORGET_IN.pack(1000, 0) + P.FORGET_ONE.pack(1 << 41, 1))
    wire.send(P.BATCH_FORGET, 0, P.BATCH_FORGET_IN.pack(2, 0) + P.FORGET_ONE.pack(1 << 42, 1)
              + b"\x01\x02\x03")
    wire.send(P.BATCH_FORGET, 0, P.BATCH_FORGET_IN.pack(0, 0))
    assert wire.silence() == []
    assert wire.alive()
    assert wire.call(P.GETATTR, node, P.GETATTR_IN.pack(0, 0, 0)).error == 0
    # a count past the body: the whole entries there are taken
    wire.send(P.BATCH_FORGET, 0, P.BATCH_FORGET_IN.pack(9, 0) + P.FORGET_ONE.pack(node, 1) + b"\x00")
    assert wire.call(P.STATFS, ROOT).error == 0  # after the forget, served in order
    assert node not in wire.ops.table._by_id


def test_interrupt_is_never_answered(slow_wire, tree):
    """INTERRUPT of a request that runs, of one that never was, and one
    with no body: no reply to any; the running request is answered once."""
    w = slow_wire
    node, _ = w.lookup(ROOT, b"l")
    started, go = _pause(w, "readlink")
    u = w.send(P.READLINK, node)
    assert started.wait(10)
    w.send(P.INTERRUPT, 0, P.INTERRUPT_IN.pack(u))
    w.send(P.INTERRUPT, 0, P.INTERRUPT_IN.pack(123456789))
    w.send(P.INTERRUPT, 0, b"")
    time.sleep(0.2)
    go.set()
    r = w.reply(u)
    assert r.error == 0 and r.body == b"the-target"
    assert w.silence() == []


# ---- a FORGET while a request on the node runs --------------------------------------

def _pause(w, method, act=None):
    """Make the handler ``method`` wait, once it holds its node, until
    ``go`` is set; ``started`` says it got there. With ``act(fd)``, the
    handler is that, on the node's fd as it was before the wait (what a
    handler does between taking its node and its last call on the fd)."""
    started, go = threading.Event(), threading.Event()
    real = getattr(w.ops, method)
    table = w.ops.table

    def paused(ctx, node_id, *args):
        fd = table.get(node_id).fd  # held until the request ends, as the handler holds it
        started.set()
        go.wait(20)
        return act(fd) if act else real(ctx, node_id, *args)
    setattr(w.ops, method, paused)
    return started, go


def test_a_forget_never_closes_the_fd_a_running_request_acts_on(slow_wire, tree):
    """The kernel's last FORGET of a node while a request on it still runs
    (two pool threads): the node leaves the table, but its fd stays open
    until the request ends. On ab0dc50 FORGET closed it at once; the
    number went to the next fd opened (here another symlink's), and the
    READLINK answered that link's target."""
    w = slow_wire
    os.symlink("someone-else's", tree / "other")
    node, _ = w.lookup(ROOT, b"l")
    held = w.ops.table._by_id[node]
    fd = held.fd
    started, go = _pause(w, "readlink", lambda fd: os.readlink(b"", dir_fd=fd))
    u = w.send(P.READLINK, node)
    assert started.wait(10)
    w.send(P.FORGET, node, P.FORGET_IN.pack(1))
    deadline = time.monotonic() + 10
    while node in w.ops.table._by_id:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    grabbed = [os.open(tree / "other", os.O_PATH | os.O_NOFOLLOW) for _ in range(4)]
    try:
        assert fd not in grabbed
        go.set()
        r = w.reply(u)
        assert r.error == 0 and r.body == b"the-target", r.body
    finally:
        for g in grabbed:
            os.close(g)
    deadline = time.monotonic() + 10
    while held.fd >= 0:  # closed once the request ended
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert node not in w.ops.table._by_id


def test_a_lookup_racing_the_last_forget_of_its_node(slow_wire, tree):
    """LOOKUP and FORGET of one node, again and again, on pool threads at
    once: each LOOKUP gives a node that serves, and once every lookup is
    forgotten the table holds only the root."""
    w = slow_wire
    for _ in range(200):
        u1 = w.send(P.LOOKUP, ROOT, b"f\0")
        u2 = w.send(P.LOOKUP, ROOT, b"f\0")
        ids = []
        for u in (u1, u2):
            r = w.reply(u)
            assert r.error == 0, r
            ids.append(P.ENTRY_OUT.unpack_from(r.body)[0])
        for node in ids:
            w.send(P.FORGET, node, P.FORGET_IN.pack(1))
    deadline = time.monotonic() + 10
    while len(w.ops.table) > 1:
        assert time.monotonic() < deadline, len(w.ops.table)
        time.sleep(0.01)


# ---- file handles ------------------------------------------------------------------------

def test_an_fh_the_daemon_did_not_hand_out_is_refused(wire):
    """A READ, WRITE, FSYNC, LSEEK, GETATTR or READDIR whose fh is not an
    open of that node (fd 0, a node's O_PATH fd, another node's open file,
    a directory's, one released) gives EBADF; a RELEASEDIR of a file's fh
    closes nothing. On ab0dc50 a READ of fh 0 read the daemon's stdin and
    a READ with another node's fh read that file."""
    f, _ = wire.lookup(ROOT, b"f")
    g, _ = wire.lookup(ROOT, b"g")
    d, _ = wire.lookup(ROOT, b"d")
    fh_g = wire.open(g)
    r = wire.call(P.OPENDIR, d, P.OPEN_IN.pack(0, 0))
    fh_d = P.OPEN_OUT.unpack_from(r.body)[0]
    fh_gone = wire.open(f)
    assert wire.call(P.RELEASE, f, P.RELEASE_IN.pack(fh_gone, 0, 0, 0)).error == 0
    o_path = wire.ops.table._by_id[f].fd
    for fh in (0, 1, 2, o_path, fh_g, fh_d, fh_gone, 1 << 40):
        read = wire.call(P.READ, f, P.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        assert read.error == -errno.EBADF, (fh, read.body[:40])
        write = wire.call(P.WRITE, f, P.WRITE_IN.pack(fh, 0, 1, 0, 0, 0, 0) + b"x")
        assert write.error == -errno.EBADF, fh
        for op, body in ((P.FSYNC, P.FSYNC_IN.pack(fh, 0, 0)),
                         (P.LSEEK, P.LSEEK_IN.pack(fh, 0, 0, 0)),
                         (P.GETATTR, P.GETATTR_IN.pack(P.GETATTR_FH, 0, fh)),
                         (P.FALLOCATE, P.FALLOCATE_IN.pack(fh, 0, 1, 0, 0))):
            assert wire.call(op, f, body).error == -errno.EBADF, (op, fh)
    for fh in (fh_g, o_path, 0):
        for op in (P.READDIR, P.READDIRPLUS):
            assert wire.call(op, d, P.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)).error == -errno.EBADF
    assert wire.call(P.RELEASEDIR, d, P.RELEASE_IN.pack(fh_g, 0, 0, 0)).error == 0
    assert wire.call(P.RELEASE, g, P.RELEASE_IN.pack(fh_d, 0, 0, 0)).error == 0
    ok = wire.call(P.READ, g, P.READ_IN.pack(fh_g, 0, 4096, 0, 0, 0, 0))
    assert ok.error == 0 and ok.body == b"another file"
    listed = wire.call(P.READDIR, d, P.READ_IN.pack(fh_d, 0, 4096, 0, 0, 0, 0))
    assert listed.error == 0 and {n for n, _o, _i in dirents(listed.body, False)} == {b".", b".."}


def test_a_read_larger_than_max_write_is_bounded(wire):
    f, _ = wire.lookup(ROOT, b"f")
    fh = wire.open(f)
    r = wire.call(P.READ, f, P.READ_IN.pack(fh, 0, 0xFFFFFFFF, 0, 0, 0, 0))
    assert r.error == 0 and r.body == b"the file's own bytes"
    d, _ = wire.lookup(ROOT, b"d")
    fh_d = P.OPEN_OUT.unpack_from(wire.call(P.OPENDIR, d, P.OPEN_IN.pack(0, 0)).body)[0]
    r = wire.call(P.READDIRPLUS, d, P.READ_IN.pack(fh_d, 0, 0xFFFFFFFF, 0, 0, 0, 0))
    assert r.error == 0 and len(r.body) <= MAX_WRITE


# ---- READDIRPLUS: the reply fills the kernel's size -------------------------------------

def _names_of_every_length(count):
    """Names of 1..255 bytes, most of 255, with every byte but '/' and NUL."""
    names = set()
    for i in range(count):
        length = 255 if i % 3 else 1 + (i * 37) % 255
        stem = b"%05d" % i
        body = bytes(1 + (i * 7 + k) % 255 for k in range(length))
        name = (stem + body.replace(b"/", b"_"))[:max(length, len(stem))]
        names.add(name)
    return names


@pytest.mark.parametrize("size", [4096, 4096 + 152 + 8, 32768, 1 << 20])
def test_readdirplus_fills_the_size_the_kernel_gave_and_never_passes_it(tree, size):
    names = _names_of_every_length(1500)
    for n in names:
        (tree / "d" / os.fsdecode(n)).touch()
    w = Wire(tree)
    try:
        d, _ = w.lookup(ROOT, b"d")
        fh = P.OPEN_OUT.unpack_from(w.call(P.OPENDIR, d, P.OPEN_IN.pack(0, 0)).body)[0]
        seen, replies, off = [], [], 0
        while True:
            r = w.call(P.READDIRPLUS, d, P.READ_IN.pack(fh, off, size, 0, 0, 0, 0))
            assert r.error == 0, r
            if not r.body:
                break
            entries = dirents(r.body, True)
            replies.append((len(r.body), entries))
            seen.extend(entries)
            off = entries[-1][1]
        for (length, _e), (_l, following) in zip(replies, replies[1:]):
            assert length <= size
            # full: the next entry would not have fitted
            assert length + P.dirent_size(len(following[0][0]), True) > size
        assert sorted(n for n, _o, _i in seen) == sorted(names | {b".", b".."})
        looked_up = [node for _n, _o, node in seen if node]
        assert len(looked_up) == len(names)  # every entry with attributes but the dot ones
        for node in looked_up:
            w.send(P.FORGET, node, P.FORGET_IN.pack(1))
        w.call(P.RELEASEDIR, d, P.RELEASE_IN.pack(fh, 0, 0, 0))
        w.send(P.FORGET, d, P.FORGET_IN.pack(1))
        assert w.alive()
        assert len(w.ops.table) == 1  # each entry counted once: all forgotten now
    finally:
        w.close()


# ---- the -d log ------------------------------------------------------------------------

def test_the_debug_log_shows_a_name_on_one_line(tree, capfd):
    """A caller's name with a newline in it: with -d, the line for its
    request is one line, and no line of the caller's making appears. On
    ab0dc50 the name was printed as it is, newline and all."""
    w = Wire(tree)
    w.session.debug = True
    try:
        w.call(P.LOOKUP, ROOT, b"x\nshiftfs: UNLINK /etc/passwd pid 1 -> ok\0")
    finally:
        w.close()
    err = capfd.readouterr().err
    assert "\nshiftfs: UNLINK" not in err, err
    assert "x\\nshiftfs: UNLINK" in err, err
