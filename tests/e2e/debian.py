"""A small real Debian root filesystem for the container-runtime recipes,
built once per machine and cached.

``debian_image()`` returns a directory holding a ``debootstrap
--variant=minbase`` root of this machine's Debian release (about 130 MB,
6700 paths; about 30 s to build from the mirror), stored with container ids
0..65535 as an unpacked image is: a real /etc/passwd and /etc/group, set-uid
binaries (su, mount, passwd, ...), files of several owners (shadow 0:42,
/var/mail 0:8, /var/log/wtmp 0:43) and a user 1000 ("user", home 0755
1000:1000). It is cached under ``/var/cache/shiftfs-e2e/`` (or
``$SHIFTFS_E2E_CACHE``), keyed by release and by ``RECIPE`` below; a build
is done under a lock, in a temporary directory renamed into place, so a
half-built image is never used. Tests copy it (``cp -a``, under a second)
and never touch the cache itself.

What the image carries for the runtimes, so that none of them needs to
create anything in it (a create by host root through a mount whose table
does not map upper 0 is EOVERFLOW, and any create changes the image):
``/etc/mtab`` as the symlink podman would make, ``/etc/hostname`` and an
``/etc/resolv.conf`` of its own (which nspawn's and podman's defaults would
overwrite or bind over: the tests can tell).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile

CACHE = os.environ.get("SHIFTFS_E2E_CACHE", "/var/cache/shiftfs-e2e")
MIRROR = os.environ.get("SHIFTFS_E2E_MIRROR", "http://deb.debian.org/debian")
RECIPE = "minbase-v1"  # change it when _customize changes: the cache key
USER = 1000
RESOLV_CONF = "# shiftfs-e2e image: the image's own resolv.conf\n"
HOSTNAME = "shiftfs-e2e\n"
# paths of the image the tests rely on, with their (uid, gid, mode) on disk
KNOWN = {
    "etc/shadow": (0, 42, 0o640),
    "usr/bin/su": (0, 0, 0o4755),
    "home/user": (USER, USER, 0o755),
    "var/mail": (0, 8, 0o2775),
}


def release() -> str:
    with open("/etc/os-release") as f:
        for line in f:
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"') or "bookworm"
    return "bookworm"


def debian_image() -> str:
    """The cached image's path (built first when missing)."""
    rel = release()
    path = os.path.join(CACHE, f"{rel}-{RECIPE}")
    if os.path.isdir(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(path):  # built by someone else meanwhile
            return path
        tmp = tempfile.mkdtemp(prefix=f".{rel}-build-", dir=CACHE)
        try:
            root = os.path.join(tmp, "root")
            r = subprocess.run(["debootstrap", "--variant=minbase", rel, root, MIRROR],
                               capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(f"debootstrap {rel} failed ({r.returncode}):\n"
                                   f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            _customize(root)
            os.chmod(root, 0o755)
            os.rename(root, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _customize(root: str) -> None:
    subprocess.run(["chroot", root, "useradd", "-m", "-u", str(USER), "-U", "-s", "/bin/sh",
                    "user"], check=True, capture_output=True)
    os.chmod(os.path.join(root, "home/user"), 0o755)
    for rel in ("var/cache/apt/archives", "usr/share/locale", "usr/share/doc", "usr/share/man"):
        d = os.path.join(root, rel)
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
    etc = os.path.join(root, "etc")
    for name, text in (("resolv.conf", RESOLV_CONF), ("hostname", HOSTNAME)):
        p = os.path.join(etc, name)
        if os.path.lexists(p):
            os.unlink(p)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, 0o644)
    if not os.path.lexists(os.path.join(etc, "mtab")):
        os.symlink("../proc/self/mounts", os.path.join(etc, "mtab"))


def copy_image(dest: str) -> str:
    """A private copy of the image at ``dest`` (which must not exist)."""
    subprocess.run(["cp", "-a", "--reflink=auto", debian_image(), dest], check=True)
    os.chmod(dest, 0o755)
    return dest
