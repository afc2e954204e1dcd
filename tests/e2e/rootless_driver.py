"""Scenario 5, the part that runs *inside* the user namespace.

Run by test_scenarios.test_scenario5_rootless as uid 0 of a user namespace
whose ids 0..131071 are host 100000..231071 (no host privileges at all), in
a mount namespace of its own:

    python3 -m e2e.rootless_driver WORKDIR

It builds the rootfs as that namespace's root (so the image is stored with
namespace ids 0..65535, i.e. host 100000..165535, the way a rootless
engine's storage looks), mounts shiftfs (table 0:65536:65536, namespace ids)
as this unprivileged user, runs a nested container (its 0..65535 at
namespace 65536..131071) in it and prints one JSON object of observations.
"""

from __future__ import annotations

import json
import os
import sys

from shiftfs.idmap import Extent
from shiftfs.mount import is_mounted, mount

from . import container
from .rootfs import build_rootfs

NESTED = 65536

SCRIPT = r"""
echo "ID $(id -u):$(id -g)"
echo "ROOT $(stat -c %u:%g /)"
echo "WWW $(stat -c %u:%g /var/www/index.html)"
echo "FOREIGN $(stat -c %u:%g /foreign)"
mkdir /srv/nested && chown 33:50 /srv/nested && echo "MKDIR ok"
tar -xpf /srv/pkg.tar -C /srv/nested && echo "TAR ok"
su user -c 'echo x > /home/user/from-user' && echo "SU ok"
mkdir /srv/shared/sub && echo "SGID $(stat -c %u:%g:%a /srv/shared/sub)"
chown 0 /foreign && echo "CHOWN-FOREIGN ok" || echo "CHOWN-FOREIGN refused"
mknod /dev/null2 c 1 3 && echo "MKNOD ok" || echo "MKNOD refused"
"""
SUID_SCRIPT = r"""
su user -c 'echo EUID $(/usr/bin/busybox-suid whoami); /usr/local/bin/cat /proc/self/status | grep CapEff'
"""


def main(workdir: str) -> int:
    lower = build_rootfs(os.path.join(workdir, "lower"))
    result: dict = {"euid": os.geteuid(), "uid_map": open("/proc/self/uid_map").read().split()}
    with open(os.path.join(lower, "foreign"), "w"):  # owned by a namespace id outside the table
        pass
    os.chown(os.path.join(lower, "foreign"), 70000, 70000)
    result["cap_on_disk"] = os.getxattr(os.path.join(lower, "usr/local/bin/cat"),
                                        "security.capability").hex()
    for options, key, script in (([], "default", SCRIPT), (["-o", "suid"], "suid", SUID_SCRIPT)):
        mnt = os.path.join(workdir, f"mnt-{key}")
        os.makedirs(mnt, exist_ok=True)
        with mount(lower, mnt, uidmap=[Extent(0, NESTED, 65536)],
                   gidmap=[Extent(0, NESTED, 65536)], options=options):
            r = container.run(mnt, script, uid_map=((0, NESTED, 65536),))
            result[key] = {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
                           "root_seen_here": f"{os.stat(mnt).st_uid}:{os.stat(mnt).st_gid}"}
        result[key]["unmounted"] = not is_mounted(mnt, None)
    result["on_disk"] = {p: [os.lstat(os.path.join(lower, p)).st_uid,
                             os.lstat(os.path.join(lower, p)).st_gid]
                         for p in ("srv/nested", "srv/nested/opt/app/www", "home/user/from-user",
                                   "foreign")}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
