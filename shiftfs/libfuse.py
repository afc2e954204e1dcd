"""Mounting through libfuse where the daemon cannot mount itself (no
CAP_SYS_ADMIN): ``fuse_session_mount`` runs fusermount3, which reads
/etc/fuse.conf, checks the mount point and passes back the /dev/fuse fd.
From then on the fd is served by session.py; libfuse's request loop is
never run. At the end ``fuse_session_unmount`` runs ``fusermount3 -u``.

mfusepy finds and loads libfuse **3** (forced: it prefers libfuse 2 where
bindfs installed it). Only four libfuse calls are used, with no struct
layouts of libfuse's own."""

from __future__ import annotations

import ctypes
import errno
import os

if not os.environ.get("FUSE_LIBRARY_PATH"):
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"

try:
    import mfusepy
except (OSError, EnvironmentError) as _e:  # libfuse3 missing
    raise ImportError(f"libfuse3 not found ({_e}); install the fuse3 package") from None

if mfusepy.fuse_version_major != 3:
    raise ImportError(
        f"shiftfs needs libfuse 3, but mfusepy loaded {mfusepy._libfuse_path} "
        f"(version {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor})")

LIBFUSE_PATH = mfusepy._libfuse_path
LIBFUSE_VERSION = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)
_lib = mfusepy._libfuse


class _Args(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("allocated", ctypes.c_int)]


_vp = ctypes.c_void_p
_lib.fuse_session_new.restype = _vp
_lib.fuse_session_new.argtypes = [ctypes.POINTER(_Args), _vp, ctypes.c_size_t, _vp]
_lib.fuse_session_mount.restype = ctypes.c_int
_lib.fuse_session_mount.argtypes = [_vp, ctypes.c_char_p]
_lib.fuse_session_fd.restype = ctypes.c_int
_lib.fuse_session_fd.argtypes = [_vp]
_lib.fuse_session_unmount.restype = None
_lib.fuse_session_unmount.argtypes = [_vp]
_lib.fuse_session_destroy.restype = None
_lib.fuse_session_destroy.argtypes = [_vp]
_NO_OPS = ctypes.create_string_buffer(512)  # no handlers: libfuse never serves a request


class FusermountMount:
    """A mount made by fusermount3 at ``mountpoint`` with the -o words
    ``options``; ``fd`` is its /dev/fuse fd."""

    def __init__(self, mountpoint: str, options: list[str]) -> None:
        words = [b"shiftfs"] + [w for opt in options for w in (b"-o", opt.encode())]
        self._argv = (ctypes.c_char_p * (len(words) + 1))(*words, None)
        self._args = _Args(len(words), self._argv, 0)
        self._se = _lib.fuse_session_new(ctypes.byref(self._args), _NO_OPS, 0, None)
        if not self._se:
            raise OSError(errno.EINVAL, "libfuse refused the mount options")
        if _lib.fuse_session_mount(self._se, mountpoint.encode()) != 0:
            _lib.fuse_session_destroy(self._se)
            self._se = None
            raise OSError(errno.EIO, f"fusermount3 could not mount {mountpoint}")
        self.fd = _lib.fuse_session_fd(self._se)

    def unmount(self) -> None:
        """fusermount3 -u, and the fd closed (once)."""
        if self._se:
            se, self._se = self._se, None
            _lib.fuse_session_unmount(se)
            _lib.fuse_session_destroy(se)
