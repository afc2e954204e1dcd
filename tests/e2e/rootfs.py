"""A small but real container root filesystem, and a manifest of a tree.

``build_rootfs(root)`` makes a busybox-static rootfs stored with container
ids 0..65535 as an image would be: files owned by several ids, a set-uid
binary, a set-gid directory, POSIX ACLs (access and default) and a file
capability. Build time is well under a second.

``manifest(root)`` records everything shiftfs promises not to change: per
path its type, mode, uid, gid, size, content hash (or link target / device
number), every xattr (POSIX ACLs and security.capability included, raw
bytes). Two manifests are compared with ``diff_manifests``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile

BUSYBOX = "/usr/bin/busybox"

# (name, uid, home) of the container's users; groups below
USERS = [("root", 0, "/root"), ("daemon", 1, "/usr/sbin"), ("www-data", 33, "/var/www"),
         ("user", 1000, "/home/user"), ("nobody", 65534, "/nonexistent")]
GROUPS = [("root", 0), ("daemon", 1), ("www-data", 33), ("staff", 50), ("user", 1000),
          ("nogroup", 65534)]
WWW, USER, STAFF = 33, 1000, 50

# Files that need the container's ids to be right, with the ids they carry on disk.
SETUID_BINARY = "usr/bin/busybox-suid"     # 0:0 04755 (busybox copy; see etc/busybox.conf)
SETGID_DIR = "srv/shared"                  # 0:50 02775 + ACL u:1000:rwx, default ACL
CAP_BINARY = "usr/local/bin/cat"           # busybox copy with cap_net_bind_service=+ep
PACKAGE_TAR = "srv/pkg.tar"                # a "package": members owned by 0, 33, 1000

PACKAGE_MEMBERS = [
    # name, type, mode, uid, gid, content
    ("opt/app", "dir", 0o755, 0, 0, None),
    ("opt/app/bin", "dir", 0o755, 0, 0, None),
    ("opt/app/bin/app", "file", 0o4755, 0, 0, b"#!/bin/sh\necho app\n"),
    ("opt/app/www", "dir", 0o2750, WWW, WWW, None),
    ("opt/app/www/index.html", "file", 0o640, WWW, WWW, b"<h1>hello</h1>\n"),
    ("opt/app/user.conf", "file", 0o600, USER, USER, b"key=value\n"),
    ("opt/app/link", "symlink", 0o777, USER, WWW, b"user.conf"),
]


def _write(root: str, rel: str, data: bytes | str, mode: int = 0o644, uid: int = 0,
           gid: int = 0) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _mkdir(root: str, rel: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
    path = os.path.join(root, rel)
    os.makedirs(path, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def package_tar_bytes() -> bytes:
    """A tar whose members carry numeric owners only (no names), as image layers do."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, mode, uid, gid, content in PACKAGE_MEMBERS:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.uname, info.gname = mode, uid, gid, "", ""
            info.mtime = 1700000000
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, content.decode()
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def build_rootfs(root: str) -> str:
    """Populate ``root`` (created if missing) and return it."""
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o755)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "etc", "dev", "proc",
              "sys", "var", "var/log", "opt", "srv", "home"):
        _mkdir(root, d)
    _mkdir(root, "root", 0o700)
    _mkdir(root, "tmp", 0o1777)
    _mkdir(root, "var/www", 0o755, WWW, WWW)
    _mkdir(root, "home/user", 0o750, USER, USER)

    busybox = os.path.join(root, "bin/busybox")
    shutil.copy2(BUSYBOX, busybox)
    os.chmod(busybox, 0o755)
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = os.path.join(root, "bin", applet)
        if applet != "busybox" and not os.path.lexists(link):
            os.symlink("busybox", link)

    _write(root, "etc/passwd", "".join(f"{n}:x:{u}:{u if u != 65534 else 65534}::{h}:/bin/sh\n"
                                       for n, u, h in USERS))
    _write(root, "etc/group", "".join(f"{n}:x:{g}:{'user' if n == 'staff' else ''}\n"
                                      for n, g in GROUPS))
    _write(root, "etc/shadow", "root:*:19000:0:99999:7:::\n", 0o640, 0, 42)
    _write(root, "etc/hostname", "shiftfs-e2e\n")
    _write(root, "etc/os-release", 'NAME="shiftfs e2e busybox rootfs"\nID=busybox\n')
    _write(root, "root/.profile", "PS1='# '\n", 0o600)
    _write(root, "home/user/notes.txt", "container user's notes\n", 0o640, USER, USER)
    _write(root, "var/www/index.html", "<h1>it works</h1>\n", 0o644, WWW, WWW)
    _write(root, "var/log/messages", "", 0o640, 0, 4)
    os.link(os.path.join(root, "var/www/index.html"), os.path.join(root, "var/www/hardlink.html"))

    # set-uid root binary: a busybox copy; 'busybox-suid whoami' prints the effective
    # user (busybox.conf stops busybox from dropping the privilege for 'whoami'; it makes
    # 'whoami' fail for a non-root caller when the set-uid bit is not honoured)
    _write(root, "etc/busybox.conf", "[SUID]\nwhoami = ssx root.root\n", 0o644)
    _write(root, SETUID_BINARY, open(BUSYBOX, "rb").read(), 0o4755)
    # set-gid directory of group staff, with an access ACL and a default ACL
    _mkdir(root, SETGID_DIR, 0o2775, 0, STAFF)
    subprocess.run(["setfacl", "-m", f"u:{USER}:rwx,g:{WWW}:r-x,m::rwx",
                    "-m", f"d:u:{USER}:rwx,d:g:{WWW}:r-x,d:m::rwx",
                    os.path.join(root, SETGID_DIR)], check=True)
    _write(root, SETGID_DIR + "/readme", "shared\n", 0o664, USER, STAFF)
    subprocess.run(["setfacl", "-m", f"u:{WWW}:r--", os.path.join(root, SETGID_DIR, "readme")],
                   check=True)
    # file capability (stored as v2 by host root, as an image unpacked by root has it)
    _write(root, CAP_BINARY, open(BUSYBOX, "rb").read(), 0o755)
    subprocess.run(["setcap", "cap_net_bind_service=+ep", os.path.join(root, CAP_BINARY)],
                   check=True)
    # a fifo and a user xattr
    os.mkfifo(os.path.join(root, "var/log/fifo"), 0o620)
    os.chown(os.path.join(root, "var/log/fifo"), 0, 4)
    os.setxattr(os.path.join(root, "etc/hostname"), "user.origin", b"shiftfs-e2e")
    _write(root, PACKAGE_TAR, package_tar_bytes(), 0o644)
    return root


# ---- manifest ------------------------------------------------------------------

def _xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False).hex()
        except OSError as e:
            out[name] = f"<errno {e.errno}>"
    return out


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"),
                       (stat.S_ISSOCK, "sock")):
        if test(mode):
            return name
    return "?"


def manifest(root: str, *, with_times: bool = False) -> dict[str, dict]:
    """path -> {type, mode, uid, gid, size, sha256|target|rdev, nlink, xattrs[, mtime]}.

    Walks with lstat only (symlinks are recorded, never followed). The ACLs
    and capabilities are in ``xattrs`` as the raw on-disk bytes.
    """
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [""] + sorted(dirnames + filenames):
            if name == "" and dirpath != root:
                continue
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry = {"type": _kind(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
                     "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size,
                     "nlink": st.st_nlink if not stat.S_ISDIR(st.st_mode) else None,
                     "xattrs": _xattrs(path)}
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                entry["sha256"] = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = st.st_rdev
            if with_times:
                entry["mtime_ns"] = st.st_mtime_ns
            result[rel] = entry
    return result


def diff_manifests(before: dict, after: dict, *, ignore_dir_size: bool = True) -> dict:
    """{'added': [...], 'removed': [...], 'changed': {path: {field: (old, new)}}}."""
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = {}
    for path in sorted(set(before) & set(after)):
        a, b = before[path], after[path]
        fields = {}
        for key in sorted(set(a) | set(b)):
            if ignore_dir_size and key == "size" and a.get("type") == "dir":
                continue
            if a.get(key) != b.get(key):
                fields[key] = (a.get(key), b.get(key))
        if fields:
            changed[path] = fields
    return {"added": added, "removed": removed, "changed": changed}
