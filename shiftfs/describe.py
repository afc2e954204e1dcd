"""The -d log's words for a request: the path below the mount a node id
stands for (where its names are known), and the caller's upper ids with
the lower ids they stand for. Every name is shown on one line, whatever
its bytes."""

from __future__ import annotations

from .idmap import IdMap

# the arguments that are (node id, name) for each handler that names one
_NAMED = {"lookup": (0, 1), "mknod": (0, 1), "mkdir": (0, 1), "unlink": (0, 1),
          "rmdir": (0, 1), "create": (0, 1), "rename": (0, 1), "symlink": (1, 2),
          "link": (1, 2), "getxattr": (0, 1), "setxattr": (0, 1), "removexattr": (0, 1)}


class Describer:
    def __init__(self, table, idmap: IdMap) -> None:
        self.table, self.idmap = table, idmap

    def caller(self, uid: int, gid: int) -> str:
        """The caller's upper ids and the lower ids they stand for."""
        lu, lg = self.idmap.uids.to_lower(uid), self.idmap.gids.to_lower(gid)
        return (f"upper {uid}:{gid} lower {'unmapped' if lu is None else lu}:"
                f"{'unmapped' if lg is None else lg}")

    def args(self, op: str, args: tuple) -> str:
        """What a request names, as a path below the mount ("?" for a part
        that is not known)."""
        if op in ("forget", "forget_multi"):
            return str(args[0])
        node_at, name_at = _NAMED.get(op, (0, None))
        path = self.path_of(args[node_at])
        if name_at is None:
            return path
        name = shown(args[name_at])
        if op.endswith("xattr"):
            return f"{path} {name}"
        return path.rstrip("/") + "/" + name

    def path_of(self, node_id: int) -> str:
        parts = []
        for _ in range(256):
            if node_id == self.table.root.node_id:
                return "/" + "/".join(reversed(parts))
            node = self.table.peek(node_id)
            if node is None or not node.name:
                break
            parts.append(shown(node.name))
            node_id = node.parent_id
        return "?/" + "/".join(reversed(parts))


def shown(raw: bytes) -> str:
    """A name on one line whatever its bytes: a caller's name with a
    newline in it must not write a log line of its own."""
    text = raw.decode(errors="backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
