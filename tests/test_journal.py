"""The node journal (supervisor.NodeJournal): what one server writes, the
next reads back whole, in slots sized for the lower's file handles."""

import os

from shiftfs.node import Node, inode_key
from shiftfs.supervisor import SLOT_SIZES, NodeJournal


def _node(node_id, ino, handle, dev=0x10302, parent=1):
    node = Node(node_id, -1, inode_key(dev, ino), 0o100000)
    node.nlookup, node.parent_id, node.handle, node.backing = 3, parent, handle, 7
    return node


def test_a_next_server_reads_every_node_back():
    journal = NodeJournal()
    journal.fit(bytes(16))  # ext4's 16-byte handle
    nodes = [_node(100 + i, 5000 + i, os.urandom(16)) for i in range(300)]
    for node in nodes:
        journal.put(node)
    for node in nodes[::3]:
        journal.drop(node)
    nodes[1].nlookup = 9
    journal.count(nodes[1])
    again = NodeJournal(journal.fd)  # as the next server opens it
    got = {r[1]: r for r in again.records()}
    kept = [n for i, n in enumerate(nodes) if i % 3]
    assert sorted(got) == [n.node_id for n in kept]
    for n in kept:
        _slot, node_id, nlookup, parent, (dev, ino), mode, backing, handle = got[n.node_id]
        assert (nlookup, parent, inode_key(dev, ino), mode, backing, handle) == \
            (n.nlookup, n.parent_id, n.key, n.mode, n.backing, n.handle)
    assert got[nodes[1].node_id][2] == 9


def test_slots_are_small_for_local_handles_and_wide_for_long_ones():
    small, middle, wide = NodeJournal(), NodeJournal(), NodeJournal()
    small.fit(bytes(16))  # ext4
    middle.fit(bytes(8 + 20))  # btrfs
    wide.fit(bytes(8 + 64))  # an NFS file handle
    assert (small.slot_size, middle.slot_size, wide.slot_size) == SLOT_SIZES
    node = _node(5, 6, os.urandom(8 + 128))  # MAX_HANDLE_SZ: fits a wide slot
    wide.put(node)
    assert [r[-1] for r in NodeJournal(wide.fd).records()] == [node.handle]
    small.fit(bytes(8 + 64))  # a later server keeps the first one's size
    assert NodeJournal(small.fd).slot_size == SLOT_SIZES[0]
    xfs = _node(9, 10, os.urandom(8 + 12))  # an xfs inode past 2^32: still fits
    small.put(xfs)
    assert [r[-1] for r in NodeJournal(small.fd).records()] == [xfs.handle]


def test_a_handle_too_long_for_its_slot_is_not_kept():
    """Not the number of another inode's handle: none, so the next server
    answers ESTALE for that node rather than reopen a guess."""
    journal = NodeJournal()
    journal.fit(bytes(16))
    long, short = _node(5, 6, os.urandom(8 + 40)), _node(7, 8, os.urandom(16))
    journal.put(long)
    journal.put(short)
    got = {r[1]: r[-1] for r in NodeJournal(journal.fd).records()}
    assert got == {5: None, 7: short.handle}
