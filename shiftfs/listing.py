"""One READDIR or READDIRPLUS reply, filled from a directory stream
(ops.readdir) in the kernel's dirent layout: the wire side of a listing,
apart from the session's dispatch."""

from __future__ import annotations

from . import protocol as P


def fill(fs, ctx, nodeid: int, fh: int, off: int, size: int, plus: bool):
    """One reply of at most ``size`` bytes from the stream of the open
    directory ``fh``, from offset ``off``, and its undo: an entry goes in only
    if it fits, and only then is it looked up (a readdirplus entry
    counts as a lookup, so one left out must not be counted). An error
    after the first entry ends the reply; it comes again next time."""
    out = bytearray(size)  # zeros: no padding to write
    pos = 0
    stream = fs.readdir(nodeid, fh, off)
    counted = []
    peek, advance, dirent = stream.peek, stream.advance, P.pack_dirent
    extra = P.DIRENT.size + 7 + (P.ENTRY_OUT.size if plus else 0)
    try:
        if plus:
            entry = fs.readdir_entry
            esize, plus_into = P.ENTRY_OUT.size, P.pack_direntplus_into
        while True:
            item = peek()
            if item is None:
                break
            name, d_ino, d_type, d_off = item
            if pos + ((len(name) + extra) & ~7) > size:
                break
            if plus:
                e = entry(ctx, nodeid, fh, name, d_type)
                if e is None:  # no attributes: the kernel looks it up when it needs them
                    P.ENTRY_OUT.pack_into(out, pos, 0, 0, 0, 0, 0, 0, d_ino, 0, 0, 0, 0, 0,
                                          0, 0, 0, d_type << 12, 0, 0, 0, 0, 0, 0)
                    pos = dirent(out, pos + esize, d_ino, d_off, name, d_type, True)
                else:
                    counted.append(e.node_id)
                    pos = plus_into(out, pos, *e, d_ino, d_off, name, d_type)
            else:
                pos = dirent(out, pos, d_ino, d_off, name, d_type, True)
            advance()
    except OSError:
        if pos == 0:
            raise

    def undo():  # the kernel never saw these entries: their lookups go back
        fs.forget([(n, 1) for n in counted])
    return memoryview(out)[:pos], (undo if counted else None)
