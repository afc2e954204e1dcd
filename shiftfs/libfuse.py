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

LIBFUSE_PATH: str | None = None
LIBFUSE_VERSION: tuple[int, int] | None = None
_lib = None


class _Args(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("allocated", ctypes.c_int)]


_NO_OPS = ctypes.create_string_buffer(512)  # no handlers: libfuse never serves a request


def load():
    """libfuse 3, loaded through mfusepy on first use (a daemon that mounts
    itself never loads it); ImportError, naming the problem, where it
    cannot be had."""
    global _lib, LIBFUSE_PATH, LIBFUSE_VERSION
    if _lib is not None:
        return _lib
    if not os.environ.get("FUSE_LIBRARY_PATH"):
        os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
    try:
        import mfusepy
    except (OSError, EnvironmentError) as e:  # libfuse3 missing
        raise ImportError(f"libfuse3 not found ({e}); install the fuse3 package") from None
    if mfusepy.fuse_version_major != 3:
        raise ImportError(
            f"shiftfs needs libfuse 3, but mfusepy loaded {mfusepy._libfuse_path} "
            f"(version {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor})")
    lib = mfusepy._libfuse
    vp = ctypes.c_void_p
    for name, restype, argtypes in (
            ("fuse_session_new", vp, [ctypes.POINTER(_Args), vp, ctypes.c_size_t, vp]),
            ("fuse_session_mount", ctypes.c_int, [vp, ctypes.c_char_p]),
            ("fuse_session_fd", ctypes.c_int, [vp]),
            ("fuse_session_unmount", None, [vp]),
            ("fuse_session_destroy", None, [vp])):
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = argtypes
    LIBFUSE_PATH = mfusepy._libfuse_path
    LIBFUSE_VERSION = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)
    _lib = lib
    return lib


class FusermountMount:
    """A mount made by fusermount3 at ``mountpoint`` with the -o words
    ``options``; ``fd`` is its /dev/fuse fd."""

    def __init__(self, mountpoint: str, options: list[str]) -> None:
        lib = load()
        words = [b"shiftfs"] + [w for opt in options for w in (b"-o", opt.encode())]
        self._argv = (ctypes.c_char_p * (len(words) + 1))(*words, None)
        self._args = _Args(len(words), self._argv, 0)
        self._se = lib.fuse_session_new(ctypes.byref(self._args), _NO_OPS, 0, None)
        if not self._se:
            raise OSError(errno.EINVAL, "libfuse refused the mount options")
        if lib.fuse_session_mount(self._se, mountpoint.encode()) != 0:
            lib.fuse_session_destroy(self._se)
            self._se = None
            raise OSError(errno.EIO, f"fusermount3 could not mount {mountpoint}")
        self.fd = lib.fuse_session_fd(self._se)

    def unmount(self) -> None:
        """fusermount3 -u, and the fd closed (once)."""
        if self._se:
            se, self._se = self._se, None
            _lib.fuse_session_unmount(se)
            _lib.fuse_session_destroy(se)
