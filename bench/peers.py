"""The mounts compared, each over the same lower tree: native (the tree
itself), bindfs, fuse-overlayfs, shiftfs and a kernel idmapped bind mount,
all with the standard table (lower 0..65535 seen as 100000..165535). The
FUSE daemons run in the foreground, our own children (tests/daemon.py):
every mount is unmounted and its daemon reaped on the way out."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

from shiftfs.mount import is_mounted

from bench.common import FUSE_FS, ROOT, USER_LOWER, USER_UPPER, log, sh
from tests.daemon import foreground_daemon, running
from tests.tables import BASE, STD, args, text, tuples


def revision() -> str:
    """The checkout's commit: git, or .git/HEAD read directly where git is
    not installed (CI's Debian root has none)."""
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                              capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        try:
            head = open(os.path.join(ROOT, ".git", "HEAD")).read().strip()
            if head.startswith("ref: "):
                head = open(os.path.join(ROOT, ".git", head[5:])).read().strip()
            return head[:7] + " (no git here: dirty state unknown)"
        except OSError:
            return "unknown"


def _fresh(mnt: str) -> None:
    os.makedirs(mnt, exist_ok=True)
    if is_mounted(mnt, None):
        raise RuntimeError(f"{mnt} is already a mount point (a previous run left it?)")


def fuse_daemon(stack: contextlib.ExitStack, cmd: list[str], mnt: str, what: str) -> int:
    """A FUSE daemon in the foreground (so its pid is ours), mounted; always
    unmounted and reaped when ``stack`` closes. Its pid."""
    _fresh(mnt)
    return stack.enter_context(running(cmd, mnt, what=what, warn=log, cwd=ROOT)).pid


def bindfs(stack, lower: str, work: str) -> dict:
    mnt = os.path.join(work, "mnt-bindfs")
    pid = fuse_daemon(stack, ["bindfs", "-f", f"--uid-offset={BASE}", f"--gid-offset={BASE}",
                              lower, mnt], mnt, "bindfs")
    return dict(path=mnt, uid=USER_UPPER, pid=pid)


def fuse_overlayfs(stack, lower: str, work: str) -> dict:
    """lowerdir = the tree, an empty upperdir and workdir (writes land in the
    upperdir: the workloads clean up through the mount)."""
    mnt = os.path.join(work, "mnt-fuse-overlayfs")
    upper, wd = os.path.join(work, "ovl-upper"), os.path.join(work, "ovl-work")
    for d in (upper, wd):
        if os.path.exists(d):
            sh(["rm", "-rf", d])
        os.mkdir(d, 0o755)
    ext = text(STD)
    pid = fuse_daemon(stack, ["fuse-overlayfs", "-f", "-o",
                              f"lowerdir={lower},upperdir={upper},workdir={wd},"
                              f"uidmapping={ext},gidmapping={ext},allow_other", mnt],
                      mnt, "fuse-overlayfs")
    return dict(path=mnt, uid=USER_UPPER, pid=pid, clean_via_mount=True)


def shiftfs(stack, lower: str, work: str, extra: list[str]) -> dict:
    mnt = os.path.join(work, "mnt-shiftfs")
    _fresh(mnt)
    proc = stack.enter_context(foreground_daemon(lower, mnt, *args(STD), *extra, warn=log, cwd=ROOT))
    return dict(path=mnt, uid=USER_UPPER, pid=proc.pid)


def kernel(stack, lower: str, work: str) -> dict:
    mnt = os.path.join(work, "mnt-kernel")
    os.makedirs(mnt, exist_ok=True)
    from tests.oracle.kernel_idmap import idmapped_mount
    stack.enter_context(idmapped_mount(lower, mnt, tuples(STD), tuples(STD)))
    return dict(path=mnt, uid=USER_UPPER, pid=None)


def _describe(fss: dict) -> None:
    """Each mount's device and, for the FUSE ones, its read-ahead."""
    for name, fs in fss.items():
        st = os.stat(fs["path"])
        fs["dev"] = st.st_dev
        bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        fs["read_ahead_kb"] = open(bdi).read().strip() if name in FUSE_FS and os.path.exists(bdi) else ""


def mount_all(stack: contextlib.ExitStack, work: str, shiftfs_args: list[str], skip: set):
    """Every filesystem not in ``skip``, mounted on ``stack``: ({name: its
    path, the uid that writes there, the daemon's pid, dev, ...}, notes)."""
    lower = os.path.join(work, "lower")
    fss = {"native": dict(path=lower, uid=USER_LOWER, pid=None)}
    notes = []
    coh = os.path.join(lower, "coh")            # coherence probes (not in paths.txt)
    if os.path.exists(coh):
        sh(["rm", "-rf", coh])
    os.mkdir(coh, 0o755)
    if "bindfs" not in skip:
        fss["bindfs"] = bindfs(stack, lower, work)
    if "fuse-overlayfs" not in skip:
        if not shutil.which("fuse-overlayfs"):
            notes.append("fuse-overlayfs not installed (apt-get install fuse-overlayfs); column left out")
        else:
            fss["fuse-overlayfs"] = fuse_overlayfs(stack, lower, work)
    if "shiftfs" not in skip:
        fss["shiftfs"] = shiftfs(stack, lower, work, shiftfs_args)
    if "kernel" not in skip:
        try:
            fss["kernel"] = kernel(stack, lower, work)
        except Exception as e:  # noqa: BLE001 - report and go on without it
            notes.append(f"kernel idmapped mount skipped: {e}")
    _describe(fss)
    return fss, notes
