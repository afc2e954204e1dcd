"""The README's demo: ``python3 -m shiftfs.demo`` (as root).

Builds a small tree owned by a few lower ids, mounts it shifted by
``b:0:100000:65536``, shows ``ls -ln`` of both sides, writes a file through
the mount as a mapped user, shows where it landed, and unmounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from .idmap import Extent
from .mount import mount

TABLE = [Extent(0, 100000, 65536)]


def _show(title: str, path: str) -> None:
    print(f"\n$ ls -ln {path}    # {title}")
    sys.stdout.flush()
    subprocess.run(["ls", "-ln", path], check=True)


def main() -> int:
    if os.geteuid() != 0:
        print("shiftfs.demo: run as root (it mounts and writes as other users)", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="shiftfs-demo-")
    os.chmod(work, 0o755)
    lower, upper = os.path.join(work, "lower"), os.path.join(work, "upper")
    try:
        os.mkdir(lower, 0o755)
        os.mkdir(upper)
        for name, uid, gid, mode in (("etc", 0, 0, 0o755), ("home", 0, 0, 0o755),
                                     ("home/alice", 1000, 1000, 0o755), ("var-www", 33, 33, 0o775)):
            os.mkdir(os.path.join(lower, name), mode)
            os.chown(os.path.join(lower, name), uid, gid)
        for name, uid, gid in (("etc/passwd", 0, 0), ("home/alice/notes", 1000, 1000),
                               ("stray", 70000, 70000)):
            with open(os.path.join(lower, name), "w") as f:
                f.write(f"owned by lower {uid}\n")
            os.chown(os.path.join(lower, name), uid, gid)
        print("shiftfs demo: lower ids 0..65535 are seen as 100000..165535 "
              "(shiftfs LOWER UPPER --map b:0:100000:65536)")
        with mount(lower, upper, uidmap=TABLE, gidmap=TABLE):
            _show("lower tree, as stored", lower)
            _show("through shiftfs: 0 -> 100000, 33 -> 100033, 70000 unmapped -> 65534", upper)
            _show("lower home", os.path.join(lower, "home"))
            _show("upper home", os.path.join(upper, "home"))
            target = os.path.join(upper, "home", "alice", "hello")
            print(f"\n$ setpriv --reuid 101000 --regid 101000 --clear-groups sh -c 'echo hi > {target}'")
            sys.stdout.flush()
            subprocess.run(["setpriv", "--reuid", "101000", "--regid", "101000", "--clear-groups",
                            "sh", "-c", f"echo hi > {target}"], check=True)
            _show("upper: written by upper user 101000", os.path.join(upper, "home", "alice"))
            _show("lower: it landed as lower 1000, the image's own id",
                  os.path.join(lower, "home", "alice"))
        print(f"\nunmounted {upper}; the lower tree changed only by the file written.")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
