"""The parked nodes: files known by their handle ids that nothing keeps
now, held with their fds a while after their last request (inodes.py,
``_park``), so that the next request on one (a tar's OPEN, GETATTR and
RELEASE of a file come one after the other) needs no open_by_handle_at.
At most PARKED of them, none longer than PARK_SECONDS: a parked fd holds
its inode, and a file replaced behind the mount (a rename over its name)
gets no FORGET until its name is looked up again. The table calls these
under its lock and lets go what they give back."""

from __future__ import annotations

from collections import OrderedDict

PARKED = 1024
PARK_SECONDS = 1.0


class Parked:
    def __init__(self) -> None:
        self._nodes: OrderedDict = OrderedDict()  # node id -> (node, when parked)

    def __bool__(self) -> bool:
        return bool(self._nodes)

    def add(self, node, now: float) -> list:
        """Park ``node`` (again: it goes to the end); the parked nodes that
        go now: those parked PARK_SECONDS ago, and the oldest one past
        PARKED. Under load the parker lets them go as it parks (about one
        a park), not the sweep in another thread (a burst that contends
        for the interpreter with the requests)."""
        nodes = self._nodes
        nodes[node.node_id] = node, now
        nodes.move_to_end(node.node_id)
        out = self.expired(now)
        if len(nodes) > PARKED:
            out.append(nodes.popitem(last=False)[1][0])
        return out

    def discard(self, node_id: int) -> None:
        self._nodes.pop(node_id, None)

    def expired(self, now: float) -> list:
        """The nodes parked PARK_SECONDS ago or more, taken out."""
        nodes, out = self._nodes, []
        while nodes:
            node_id, (node, when) = next(iter(nodes.items()))
            if now - when < PARK_SECONDS:
                break
            del nodes[node_id]
            out.append(node)
        return out
