"""shiftfs: a uid/gid-shifting passthrough FUSE filesystem.

``from shiftfs import mount`` mounts a lower tree shifted through a range
table for the duration of a ``with`` block; see shiftfs.mount.mount.
"""

__version__ = "0.1.0"

from .idmap import Extent, IdMap, IdTable, TableError, build_idmap  # noqa: E402
from .mount import MountError, mount  # noqa: E402

__all__ = ["Extent", "IdMap", "IdTable", "TableError", "build_idmap", "MountError", "mount", "__version__"]
