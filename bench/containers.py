#!/usr/bin/env python3
"""Container workloads (issue 18): a Debian 13 root whose ids 0..65535 are on
disk (a "portable" image), served with the table b:0:100000:65536 and entered
as a container whose root is host uid 100000, by five ways of shifting:

    native          a copy chown'ed by +100000 (every uid and gid), entered directly
    kernel          an idmapped bind mount (open_tree + mount_setattr(MOUNT_ATTR_IDMAP))
    bindfs          bindfs --uid-offset=100000 --gid-offset=100000
    fuse-overlayfs  lowerdir=IMAGE, uidmapping=0:100000:65536 (disk 0 shown as 100000)
    shiftfs         python3 -m shiftfs -q IMAGE MNT --map b:0:100000:65536

    python3 -m bench.containers --rounds 3 --out bench/containers.md
    python3 -m bench.containers --rounds 1 --only start,find      # debugging

Needs root, util-linux unshare, bindfs, fuse-overlayfs, fuse3, dpkg-deb, and
the Debian 13 root the CI uses (--base; it is only read: copied). Everything
happens on a private loop-mounted ext4 (WORKDIR/fs, a sparse --loop-size file)
that is unmounted and removed at the end (--keep keeps it and the prepared
image for the next run). Every mount the run makes is unmounted on the way
out, on failure too.

The image is prepared once (in the loop fs): a copy of --base, with make
installed and zlib's Debian source fetched by apt-get inside a chroot of the
copy (packages from the Debian registry; cached in --cache for later runs),
four local .debs and a 10,000-file tarball under /root/bench. Each column then
gets its own copy of that image (so writes through one mount never change the
tree under another); native's copy is chown'ed +100000 (set-id bits and file
capabilities put back after the chown).

The container: `unshare --user --mount --pid --fork` (the uid/gid maps
100000 0 65536 written by this script: util-linux 2.38's --map-users goes
through newuidmap, which refuses ranges that /etc/subuid does not grant, and
this run does not edit /etc/subuid), then inside it /dev bound and a new
/proc mounted on the root, `setpriv --reuid=0 --regid=0 --clear-groups` and
`unshare --root=ROOT --wd=/root env -i ... /bin/sh -c CMD`. A time is the
wall time from starting that unshare to its exit: the container's start is in
every row (the `start` rows are that alone).

Rows run in rounds; in each round each row runs on every column, the column
order rotated per round; ratios are to native in the same round and the table
shows medians over rounds. "cold" = the column freshly mounted (unmounted and
mounted again; native: nothing to mount) after `sync; echo 3 >
/proc/sys/vm/drop_caches`, then the host's unshare, sh, setpriv and mount read
back in (so that only the image is cold, alike for every column); "warm" = the same command ran just before,
untimed. Write rows run after a `sync` and clean up after themselves,
untimed. After the timed rounds, an untimed pass counts the FUSE requests of
some rows with the fuse:fuse_request_send tracepoint (a private tracefs
instance filtered on the connection).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import fcntl
import io
import os
import platform
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tarfile
import time

from tests.oracle import kernel_idmap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CI_CACHE = "/var/cache/shiftfs-ci"  # .ci/other-release caches its Debian 13 root here


def default_base() -> str | None:
    """The newest complete Debian 13 root .ci/other-release has cached (its
    name changes with .ci/setup)."""
    try:
        roots = [os.path.join(CI_CACHE, d) for d in os.listdir(CI_CACHE) if d.startswith("trixie-")]
    except OSError:
        return None
    roots = [r for r in roots if os.path.exists(os.path.join(r, ".complete"))]
    return max(roots, key=os.path.getmtime) if roots else None
SHIFT, COUNT = 100000, 65536
COLUMNS = ["native", "kernel", "bindfs", "fuse-overlayfs", "shiftfs"]
FUSE_COLUMNS = ["bindfs", "fuse-overlayfs", "shiftfs"]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMPORTS = "import json, email, http.client, xml.dom.minidom, sqlite3, asyncio, unittest, decimal, pytest"
DEBS = ["bench-a", "bench-b", "bench-c", "bench-d"]
DEB_FILES = 300
TREE_DIRS, TREE_FILES, TREE_SIZE = 100, 100, 5000  # 10,000 files of ~5 KB


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def out(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def ismount(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def umount(path: str) -> None:
    if not ismount(path):
        return
    if subprocess.run(["umount", path], capture_output=True).returncode != 0:
        time.sleep(0.5)
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            log(f"umount {path} busy: lazy unmount")
            subprocess.run(["umount", "-l", path], capture_output=True)


def wait_gone(pid: int, what: str, timeout: float = 15.0) -> None:
    """Wait for a daemon this run started to exit (after its unmount); kill it
    (by its pid) if it does not."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.05)
    log(f"{what} (pid {pid}) still running {timeout:.0f} s after its unmount: SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---- the columns ---------------------------------------------------------------


class Column:
    """One way of showing the image shifted: mount() / umount() / pids()."""

    def __init__(self, name: str, work: str):
        self.name = name
        self.tree = os.path.join(work, "c-" + name)      # this column's copy of the image
        self.mnt = self.tree if name == "native" else os.path.join(work, "m-" + name)
        self.proc: subprocess.Popen | None = None
        self.daemon_pids: list[int] = []
        self.upper = os.path.join(work, "ovl-upper")
        self.wdir = os.path.join(work, "ovl-work")
        self.log: str | None = None
        self._idmapped: contextlib.ExitStack | None = None  # the kernel column's mount

    @property
    def root(self) -> str:
        return self.mnt

    def mount(self) -> None:
        if self.name == "native":
            return
        os.makedirs(self.mnt, exist_ok=True)
        if self.name == "kernel":  # util-linux 2.38 ignores X-mount.idmap: the oracle's syscalls
            self._idmapped = contextlib.ExitStack()
            self._idmapped.enter_context(kernel_idmap.idmapped_mount(
                self.tree, self.mnt, [(0, SHIFT, COUNT)], [(0, SHIFT, COUNT)]))
        elif self.name == "bindfs":
            self._fuse(["bindfs", "-f", f"--uid-offset={SHIFT}", f"--gid-offset={SHIFT}",
                        self.tree, self.mnt])
        elif self.name == "fuse-overlayfs":
            for d in (self.upper, self.wdir):
                os.makedirs(d, exist_ok=True)
            ext = f"0:{SHIFT}:{COUNT}"
            self._fuse(["fuse-overlayfs", "-f", "-o",
                        f"lowerdir={self.tree},upperdir={self.upper},workdir={self.wdir},"
                        f"uidmapping={ext},gidmapping={ext},allow_other", self.mnt])
        elif self.name == "shiftfs":
            env = dict(os.environ, PYTHONPATH=ROOT)
            cmd = [sys.executable, "-m", "shiftfs", "-q", self.tree, self.mnt, "--map", f"b:0:{SHIFT}:{COUNT}"]
            if self.log:  # in the foreground, its log (stderr) kept
                with open(self.log, "a") as f:
                    self.proc = subprocess.Popen(cmd + ["-f"], env=env, cwd=ROOT, stdout=f, stderr=f)
                end = time.time() + 20
                while not ismount(self.mnt):
                    if self.proc.poll() is not None or time.time() > end:
                        raise RuntimeError(f"shiftfs -f: no mount (see {self.log})")
                    time.sleep(0.02)
            else:  # as a user runs it: it daemonizes once mounted
                sh(cmd, env=env, cwd=ROOT)
            st = out([sys.executable, "-m", "shiftfs", "status", self.mnt])
            # "MNT: supervisor 1, server 2, restarts 0, open files kept 0"
            words = st.replace(",", " ").split()
            self.daemon_pids = [int(words[words.index("supervisor") + 1]),
                                int(words[words.index("server") + 1])]
        if not ismount(self.mnt):
            raise RuntimeError(f"{self.name}: nothing mounted at {self.mnt}")

    def _fuse(self, cmd) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.daemon_pids = [self.proc.pid]
        end = time.time() + 20
        while not ismount(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            if time.time() > end:
                raise RuntimeError(f"{cmd[0]}: no mount after 20 s")
            time.sleep(0.02)

    def umount(self) -> None:
        if self.name == "native":
            return
        if self._idmapped is not None:
            self._idmapped.close()
            self._idmapped = None
        else:
            umount(self.mnt)
        for pid in self.daemon_pids:
            wait_gone(pid, self.name)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.proc, self.daemon_pids = None, []

    def remount(self) -> None:
        self.umount()
        self.mount()

    def rss_kb(self) -> int:
        return sum(rss_kb(p) for p in self.daemon_pids)

    def cpu_s(self) -> float:
        tot = 0
        for pid in self.daemon_pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                tot += int(fields[11]) + int(fields[12])  # utime, stime
            except OSError:
                pass
        return tot / os.sysconf("SC_CLK_TCK")

    def dev(self) -> int:
        return os.stat(self.mnt).st_dev


# ---- entering the container ------------------------------------------------------

# $1 root, $2 command, $3 the part run as the namespace's root (util-linux mount
# wants uid 0, which the entering process, host root, is not in the new namespace)
ENTER = 'read _ && exec setpriv --reuid=0 --regid=0 --clear-groups -- /bin/sh -c "$3" sh "$1" "$2"'
INNER = ('mount --rbind /dev "$1/dev" && mount -t proc proc "$1/proc" && '
         'exec unshare --root="$1" --wd=/root -- '
         f'/usr/bin/env -i PATH={PATH} HOME=/root LC_ALL=C.UTF-8 TERM=dumb /bin/sh -c "$2"')
MAPS = f"0 {SHIFT} {COUNT}\n"


class Failed(Exception):
    pass


def run_in(root: str, cmd: str, timeout: float = 900, stdout=subprocess.DEVNULL) -> float:
    """Run cmd as root of a container whose root directory is `root`; return
    the wall time. Raises Failed (with stderr's tail) on a non-zero exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(["unshare", "--user", "--keep-caps", "--mount", "--pid", "--fork", "--propagation", "private",
                          "--", "/bin/sh", "-c", ENTER, "sh", root, cmd, INNER],
                         stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        me = os.readlink("/proc/self/ns/user")
        while True:
            try:
                if os.readlink(f"/proc/{p.pid}/ns/user") != me:
                    break
            except FileNotFoundError:
                break
            if p.poll() is not None:
                break
            time.sleep(0.0002)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{p.pid}/{name}", "w") as f:
                f.write(MAPS)
        p.stdin.write(b"\n")
        p.stdin.close()
        p.stdin = None
        _, err = p.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-6:]
        raise Failed(f"exit {p.returncode}: " + " | ".join(tail))
    return dt


# ---- preparing the image -------------------------------------------------------


def chroot_sh(root: str, cmd: str) -> None:
    """Run cmd as real root chrooted in root (with /dev and /proc), for preparing the image."""
    sh(["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "--", "/bin/sh", "-c",
        'mount --rbind /dev "$1/dev" && mount -t proc proc "$1/proc" && '
        f'exec chroot "$1" /usr/bin/env -i PATH={PATH} HOME=/root LC_ALL=C.UTF-8 '
        'DEBIAN_FRONTEND=noninteractive /bin/sh -c "$2"', "sh", root, cmd])


def prepare_image(work: str, base: str, cache: str, notes: list) -> str:
    img = os.path.join(work, "image")
    stamp = os.path.join(work, "image.ok")
    if os.path.exists(stamp):
        log(f"prepared image kept from an earlier run: {img}")
        notes.extend(open(stamp).read().splitlines())
        return img
    if os.path.exists(img):
        sh(["rm", "-rf", img])
    log(f"copying {base} -> {img}")
    lock = os.path.join(os.path.dirname(base), ".lock")
    with open(lock, "a") as lk:
        # .ci/other-release builds a new root and removes the older ones under this lock
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not os.path.isdir(base):
            raise RuntimeError(f"{base} is gone (replaced by a newer CI root?); pass --base")
        sh(["cp", "-a", base, img])
    os.makedirs(cache, exist_ok=True)
    bench = os.path.join(img, "root", "bench")
    os.makedirs(bench, exist_ok=True)
    prep_notes = []
    # make (gcc is there, make is not) and zlib's source, from Debian's registry (cached)
    debs = sorted(f for f in os.listdir(cache) if f.endswith(".deb"))
    src = sorted(f for f in os.listdir(cache) if f.startswith("zlib_") and ".orig.tar" in f)
    if not debs or not src:
        log("apt-get inside the copy: make, and zlib's source")
        srclist = os.path.join(img, "etc/apt/sources.list.d/zz-bench-src.list")
        with open(srclist, "w") as f:
            f.write("deb-src http://deb.debian.org/debian trixie main\n")
        try:
            chroot_sh(img, "apt-get -q update >/dev/null && "
                           "apt-get -q -y --no-install-recommends --download-only install make >/dev/null && "
                           "mkdir -p /root/src && cd /root/src && "
                           # the registry serves the orig tarball; the .dsc may be missing (404): not needed
                           "(apt-get -q source --download-only zlib >/dev/null 2>&1 || true)")
        finally:
            os.unlink(srclist)
        arch = os.path.join(img, "var/cache/apt/archives")
        for f in os.listdir(arch):
            if f.endswith(".deb"):
                shutil.copy(os.path.join(arch, f), cache)
        for f in os.listdir(os.path.join(img, "root/src")):
            shutil.copy(os.path.join(img, "root/src", f), cache)
        sh(["rm", "-rf", os.path.join(img, "root/src")])
        chroot_sh(img, "apt-get clean")
        debs = sorted(f for f in os.listdir(cache) if f.endswith(".deb"))
        src = sorted(f for f in os.listdir(cache) if f.startswith("zlib_") and ".orig.tar" in f)
        if not debs or not src:
            raise RuntimeError(f"could not fetch make ({debs}) or zlib's source ({src})")
    tmp = os.path.join(img, "root/debs-make")
    os.makedirs(tmp, exist_ok=True)
    for f in debs:
        shutil.copy(os.path.join(cache, f), tmp)
    chroot_sh(img, "dpkg -i /root/debs-make/*.deb >/dev/null && rm -rf /root/debs-make")
    prep_notes.append("image: make installed into the copy (" + ", ".join(debs) + ")")
    # zlib source in /usr/src/zlib, built out of tree in the container
    sh(["tar", "-xf", os.path.join(cache, src[-1]), "-C", os.path.join(img, "usr/src")])
    top = [d for d in os.listdir(os.path.join(img, "usr/src")) if d.startswith("zlib")]
    os.rename(os.path.join(img, "usr/src", top[0]), os.path.join(img, "usr/src/zlib"))
    prep_notes.append(f"zlib source: {src[-1]} (Debian's orig tarball) in /usr/src/zlib")
    build_debs(work, bench)
    build_tarball(os.path.join(bench, "tree.tar"))
    sh(["chown", "-R", "0:0", bench, os.path.join(img, "usr/src/zlib")])
    with open(stamp, "w") as f:
        f.write("\n".join(prep_notes) + "\n")
    notes.extend(prep_notes)
    return img


def build_debs(work: str, bench: str) -> None:
    rnd = random.Random(18)
    os.makedirs(os.path.join(bench, "debs"), exist_ok=True)
    for name in DEBS:
        d = os.path.join(work, "deb-" + name)
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(os.path.join(d, "DEBIAN"))
        with open(os.path.join(d, "DEBIAN/control"), "w") as f:
            f.write(f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: bench <bench@localhost>\n"
                    f"Description: shiftfs container bench package {name}\n {DEB_FILES} small files\n")
        for i in range(DEB_FILES):
            sub = os.path.join(d, "usr/share", name, f"d{i % 10}")
            os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, f"f{i:03d}.txt"), "w") as f:
                f.write("".join(rnd.choice("abcdefghij \n") for _ in range(rnd.randint(500, 3000))))
        sh(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", d,
            os.path.join(bench, "debs", f"{name}_1.0_all.deb")], stdout=subprocess.DEVNULL)
        shutil.rmtree(d)


def build_tarball(path: str) -> None:
    rnd = random.Random(5)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for d in range(TREE_DIRS):
            ti = tarfile.TarInfo(f"tree/d{d:03d}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(ti)
            for i in range(TREE_FILES):
                data = rnd.randbytes(TREE_SIZE)
                ti = tarfile.TarInfo(f"tree/d{d:03d}/f{i:03d}")
                ti.size, ti.mode, ti.mtime = len(data), 0o644, 1700000000
                tar.addfile(ti, io.BytesIO(data))


def shift_tree(top: str) -> None:
    """chown every entry +SHIFT (uid and gid); set-id bits and file
    capabilities, which chown drops, put back."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for p in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            st = os.lstat(p)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            cap = None
            if stat.S_ISREG(st.st_mode):
                with contextlib.suppress(OSError):
                    cap = os.getxattr(p, "security.capability")
            os.lchown(p, st.st_uid + SHIFT, st.st_gid + SHIFT)
            if not stat.S_ISLNK(st.st_mode):
                if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                    os.chmod(p, stat.S_IMODE(st.st_mode))
                if cap is not None:
                    os.setxattr(p, "security.capability", cap)


# ---- request counting ----------------------------------------------------------

TRACE = "/sys/kernel/tracing"


class Requests:
    def __init__(self):
        if not os.path.isdir(os.path.join(TRACE, "events")):
            subprocess.run(["mount", "-t", "tracefs", "nodev", TRACE], capture_output=True)
        self.inst = os.path.join(TRACE, "instances", f"shiftfs-containers-{os.getpid()}")
        os.mkdir(self.inst)
        self.ev = os.path.join(self.inst, "events/fuse/fuse_request_send")
        if not os.path.isdir(self.ev):
            self.close()
            raise RuntimeError("no fuse:fuse_request_send tracepoint")
        self._w(os.path.join(self.inst, "buffer_size_kb"), "131072")

    @staticmethod
    def _w(path, text):
        with open(path, "w") as f:
            f.write(text)

    def start(self, dev: int) -> None:
        self._w(os.path.join(self.ev, "filter"), f"connection == {(os.major(dev) << 20) | os.minor(dev)}")
        self._w(os.path.join(self.inst, "trace"), "")
        self._w(os.path.join(self.ev, "enable"), "1")

    def stop(self) -> collections.Counter:
        self._w(os.path.join(self.ev, "enable"), "0")
        c = collections.Counter()
        with open(os.path.join(self.inst, "trace")) as f:
            for line in f:
                i = line.find("(FUSE_")
                if not line.startswith("#") and i >= 0:
                    c[line[i + 6: line.index(")", i)]] += 1
        for cpu in os.listdir(os.path.join(self.inst, "per_cpu")):
            for line in open(os.path.join(self.inst, "per_cpu", cpu, "stats")):
                if line.startswith("overrun:") and int(line.split()[1]):
                    c["LOST"] += int(line.split()[1])
        return c

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(self.inst)


# ---- the rows ------------------------------------------------------------------

BUILD = "/root/build-zlib"
ROWS = [
    # key, label, command, mode (cold / warm / first), class (read / write), prep, cleanup
    ("start-cold", "start `/bin/true`, cold", "/bin/true", "cold", "read", None, None),
    ("start-warm", "start `/bin/true`, warm", "/bin/true", "warm", "read", None, None),
    ("dpkg-l", "`dpkg -l`", "dpkg -l >/dev/null", "warm", "read", None, None),
    ("dpkg-verify", "`dpkg --verify`", "dpkg --verify >/dev/null", "warm", "read", None, None),
    ("imports-cold", "python3 imports (8 stdlib modules + pytest), cold", f"python3 -c '{IMPORTS}'",
     "cold", "read", None, None),
    ("imports-warm", "python3 imports, warm", f"python3 -c '{IMPORTS}'", "warm", "read", None, None),
    ("find-cold", "`find / -xdev -ls`, cold", "find / -xdev -ls >/dev/null", "cold", "read", None, None),
    ("find-warm", "`find / -xdev -ls`, warm", "find / -xdev -ls >/dev/null", "warm", "read", None, None),
    ("configure", "zlib `./configure` (out of tree)",
     f"cd {BUILD} && /usr/src/zlib/configure >/dev/null", "first", "read",
     f"rm -rf {BUILD} && mkdir {BUILD}", f"rm -rf {BUILD}"),
    ("make", "zlib `make -j2`", f"cd {BUILD} && make -j2 >/dev/null", "first", "read",
     f"rm -rf {BUILD} && mkdir {BUILD} && cd {BUILD} && /usr/src/zlib/configure >/dev/null", f"rm -rf {BUILD}"),
    ("dpkg-i", f"`dpkg -i` {len(DEBS)} local .debs ({DEB_FILES} files each)",
     "dpkg -i /root/bench/debs/*.deb >/dev/null", "first", "write", None, None),
    ("dpkg-r", f"`dpkg -r` the {len(DEBS)}", "dpkg -r " + " ".join(DEBS) + " >/dev/null", "first", "write",
     None, None),
    ("untar", f"untar {TREE_DIRS * TREE_FILES} files of {TREE_SIZE // 1000} KB (50 MB)",
     "mkdir /root/untar && tar -xf /root/bench/tree.tar -C /root/untar", "first", "write",
     "rm -rf /root/untar", None),
    ("rm", "`rm -rf` that tree", "rm -rf /root/untar", "first", "write", None, None),
]
GOAL = {"read": 1.3, "write": 3.0}
TRACED = ["start-warm", "dpkg-verify", "imports-warm", "find-cold", "find-warm", "dpkg-i", "untar", "rm"]


# short rows run several times in a round (median of those)
REPS = {"start-cold": 3, "start-warm": 5, "dpkg-l": 5, "imports-cold": 2, "imports-warm": 3, "find-warm": 2,
        "configure": 2, "make": 2}


def warm_host() -> None:
    """After drop_caches: the host's helpers that enter the container (unshare,
    sh, setpriv, mount and their libraries) read back in, so that a cold row
    is cold in the image only, the same for every column (a FUSE daemon's
    remount would otherwise warm some of them for its column alone)."""
    subprocess.run("unshare --version; setpriv --version; mount --version; umount --version; /bin/sh -c :",
                   shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ready(col: Column, row, warm_up: bool) -> bool:
    """Before a run of ``row``: its prep, then for a cold row the caches
    dropped and the column remounted, for a warm one (``warm_up``) one
    untimed run. Whether a cold or warm step was taken."""
    _key, _label, cmd, mode, _klass, prep, _cleanup = row
    if prep:
        run_in(col.root, prep)
    if mode == "cold":
        drop_caches()
        col.remount()
        warm_host()
        return True
    if mode == "warm" and warm_up:
        run_in(col.root, cmd)
        return True
    return False


def run_row(row, col: Column) -> float:
    key, label, cmd, mode, klass, prep, cleanup = row
    ts = []
    for _ in range(REPS.get(key, 1)):
        if not ready(col, row, warm_up=not ts) and klass == "write":
            os.sync()
        try:
            ts.append(run_in(col.root, cmd))
        finally:
            if cleanup:
                run_in(col.root, cleanup)
    return statistics.median(ts)


def check_ownership(cols: dict, notes: list) -> None:
    """What the container sees and what lands on disk, through each column:
    every column must show the container the same owners and modes as native
    (a listing of / compared), and files the container's root creates (a
    file, a directory, the untarred tree) must land on disk as 0:0 (native:
    100000:100000)."""
    listings = {}
    for name, col in cols.items():
        probe = "/root/.owner-probe"
        disk = os.path.join(col.tree if name != "fuse-overlayfs" else col.upper, "root")
        want = SHIFT if name == "native" else 0
        try:
            lst = os.path.join(os.path.dirname(col.tree), f"listing-{name}.txt")
            with open(lst, "w") as f:
                run_in(col.root, "find / -xdev -printf '%U:%G %m %y %p\\n' | sort", stdout=f)
            listings[name] = open(lst).read().splitlines()
            os.unlink(lst)
            run_in(col.root, f"touch {probe} && mkdir {probe}.d && mkdir /root/untar && "
                             "tar -xf /root/bench/tree.tar -C /root/untar && "
                             f"test \"$(stat -c %u:%g {probe} {probe}.d | sort -u)\" = 0:0")
            bad = []
            for p in [os.path.join(disk, ".owner-probe"), os.path.join(disk, ".owner-probe.d")] + [
                    os.path.join(dp, n) for dp, dn, fn in os.walk(os.path.join(disk, "untar")) for n in dn + fn]:
                st = os.lstat(p)
                if (st.st_uid, st.st_gid) != (want, want):
                    bad.append(f"{p[len(disk):]} {st.st_uid}:{st.st_gid}")
            if bad:
                notes.append(f"**{name}: {len(bad)} entries created by the container's root are not "
                             f"{want}:{want} on disk, e.g. {bad[:3]}**")
        except (Failed, OSError) as e:
            notes.append(f"**{name}: ownership check failed: {e}**")
        finally:
            with contextlib.suppress(Failed):
                run_in(col.root, f"rm -rf {probe} {probe}.d /root/untar")
    ref = listings.get("native")
    for name, lst in listings.items():
        if ref is None or name == "native":
            continue
        a, b = set(ref), set(lst)
        if a != b:
            only_n, only_c = sorted(a - b), sorted(b - a)
            notes.append(f"**{name} shows the container {len(only_c)} entries unlike native "
                         f"(e.g. {only_c[:3]} where native has {only_n[:3]})**")
    if ref is not None:
        notes.append(f"the container sees the same owner, mode and type of all {len(ref)} paths of `find / "
                     f"-xdev` through " + ", ".join(n for n in listings if n != "native" and set(listings[n]) == set(ref))
                     + " as through native")


def versions() -> dict:
    v = {"kernel": platform.release(),
         "host": "Debian " + open("/etc/debian_version").read().strip(),
         "util-linux": out(["unshare", "--version"]).split()[-1],
         "bindfs": out(["bindfs", "--version"]).split()[-1],
         "fuse-overlayfs": [ln for ln in subprocess.run(["fuse-overlayfs", "--version"], capture_output=True,
                                                         text=True).stdout.splitlines()
                            if "overlayfs" in ln][0].split()[-1],
         "fusermount3": out(["fusermount3", "--version"]).split()[-1],
         "python": platform.python_version()}
    try:
        import shiftfs
        v["shiftfs"] = getattr(shiftfs, "__version__", "?")
    except ImportError:
        v["shiftfs"] = "?"
    v["commit"] = out(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]) or "?"
    if out(["git", "-C", ROOT, "status", "--porcelain", "--", "shiftfs"]):
        v["commit"] += " (+ uncommitted changes in shiftfs/)"
    return v


# ---- the report ----------------------------------------------------------------


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def render(args, v, rows, times, errors, rss, reqs, cpu, notes, elapsed, image_info) -> str:
    L = []
    L.append("# Container workloads (issue 18)\n")
    L.append(f"Run {datetime.date.today().isoformat()} by `python3 -m bench.containers --rounds {args.rounds}"
             + (f" --only {args.only}" if args.only else "") + f"`; {args.rounds}"
             f" round(s), {elapsed / 60:.1f} min in all (preparing included).\n")
    L.append(f"Machine: Linux {v['kernel']}, {v['host']} host, 2 cores; util-linux {v['util-linux']}, "
             f"bindfs {v['bindfs']}, fuse-overlayfs {v['fuse-overlayfs']}, fuse3 {v['fusermount3']}, "
             f"Python {v['python']}; shiftfs {v['shiftfs']} at commit {v['commit']}. {image_info}\n")
    L.append("Each cell is time ÷ native in the same round, median over rounds; native is the median "
             "wall time in seconds (container start included). Goal for shiftfs: ahead of bindfs and "
             "fuse-overlayfs on every row, ≤ 1.3 × native on read-mostly rows, ≤ 3 × native on write rows.\n")
    L.append("| workload | native s | kernel | bindfs | fuse-overlayfs | shiftfs | goal | met |")
    L.append("|---|---|---|---|---|---|---|---|")
    for row in rows:
        key, label, _, _, klass, _, _ = row
        nat = times[key].get("native", [])
        cells, ratios = [], {}
        for c in COLUMNS[1:]:
            rs = [t[c] / t["native"] for t in times[key + "#rounds"] if c in t and "native" in t]
            ratios[c] = statistics.median(rs) if rs else None
            e = errors.get((key, c))
            cells.append((fmt_ratio(ratios[c]) if rs else "err") + (" (err)" if e and rs else ""))
        goal = GOAL[klass]
        s = ratios.get("shiftfs")
        peers = [ratios[c] for c in ("bindfs", "fuse-overlayfs") if ratios.get(c) is not None]
        if s is None:
            met = "—"
        else:
            miss = []
            if s > goal:
                miss.append(f"{s / goal:.2f} × over")
            if any(s >= p for p in peers):
                miss.append("behind " + ", ".join(c for c in ("bindfs", "fuse-overlayfs")
                                                  if ratios.get(c) is not None and s >= ratios[c]))
            met = "yes" if not miss else "no: " + "; ".join(miss)
        L.append(f"| {label} | {statistics.median(nat):.3f} | " if nat else f"| {label} | err | ")
        L[-1] += " | ".join(cells) + f" | ≤ {goal} × | {met} |"
    L.append("")
    if rss:
        L.append("FUSE daemons' RSS (MiB; shiftfs = supervisor + server), the largest seen after a row, "
                 "and at the end of the last round:\n")
        L.append("| daemon | max RSS | RSS at the end |")
        L.append("|---|---|---|")
        for c in FUSE_COLUMNS:
            if c in rss:
                L.append(f"| {c} | {max(rss[c]) / 1024:.1f} | {rss[c][-1] / 1024:.1f} |")
        L.append("")
    if reqs:
        L.append("FUSE requests the kernel sent (fuse:fuse_request_send on the connection) and the daemon's "
                 "CPU time (utime + stime of all its threads, /proc/PID/stat; shiftfs: supervisor + server), "
                 "one untimed run of each row after the timed rounds, prepared as the timed runs:\n")
        L.append("| row | daemon | requests | daemon CPU s | µs CPU / request | by opcode |")
        L.append("|---|---|---|---|---|---|")
        for (key, c), cnt in reqs.items():
            tot = sum(n for o, n in cnt.items() if o != "LOST")
            ops = ", ".join(f"{o} {n}" for o, n in cnt.most_common() if o != "LOST")
            lost = f" (+{cnt['LOST']} lost)" if cnt.get("LOST") else ""
            cs = cpu.get((key, c), 0.0)
            per = f"{cs / tot * 1e6:.0f}" if tot else "—"
            L.append(f"| {key} | {c} | {tot}{lost} | {cs:.2f} | {per} | {ops} |")
        L.append("")
    if errors:
        L.append("Errors:\n")
        for (key, c), e in sorted(errors.items()):
            L.append(f"- {key} on {c}: {e}")
        L.append("")
    if notes:
        L.append("Notes from the run:\n")
        L.extend(f"- {n}" for n in notes)
        L.append("")
    L.append("Per-round times (s):\n")
    L.append("| workload | round | " + " | ".join(COLUMNS) + " |")
    L.append("|---|---|" + "---|" * len(COLUMNS))
    for row in rows:
        for i, t in enumerate(times[row[0] + "#rounds"]):
            L.append(f"| {row[0]} | {i + 1} | " + " | ".join(f"{t[c]:.3f}" if c in t else "err"
                                                           for c in COLUMNS) + " |")
    L.append("")
    return "\n".join(L)


# ---- main ----------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated row keys (default: every row): "
                    + ",".join(r[0] for r in ROWS))
    ap.add_argument("--columns", default=",".join(COLUMNS[1:]), help="columns beside native")
    ap.add_argument("--base", default=default_base(),
                    help=f"the Debian 13 root to copy (only read; default: the newest in {CI_CACHE})")
    ap.add_argument("--workdir", default="/var/tmp/shiftfs-containers")
    ap.add_argument("--cache", default="/var/cache/shiftfs-containers",
                    help="where make's .debs and zlib's source are kept between runs")
    ap.add_argument("--loop-size", default="12G")
    ap.add_argument("--keep", action="store_true", help="keep the loop file and the prepared image")
    ap.add_argument("--no-requests", action="store_true", help="skip the request-counting pass")
    ap.add_argument("--shiftfs-log", metavar="FILE",
                    help="run shiftfs in the foreground (-f) with its log kept in FILE; its lines "
                         "other than the 'serving' one are reported")
    ap.add_argument("--out", help="write the markdown report here (default: stdout)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root")
    if not args.base:
        ap.error(f"no Debian 13 root in {CI_CACHE} (run .ci/other-release once, or pass --base)")
    wanted = [c for c in args.columns.split(",") if c]
    rows = [r for r in ROWS if not args.only or r[0] in args.only.split(",")]
    t_start = time.time()
    notes: list[str] = [f"load average at the start: {open('/proc/loadavg').read().split()[0]} "
                        "(the machine is shared with another session's test runs)"]
    work = args.workdir
    fs = os.path.join(work, "fs")
    img_file = work.rstrip("/") + ".img"
    cols: dict[str, Column] = {}
    v = versions()
    with contextlib.ExitStack() as stack:
        os.makedirs(fs, exist_ok=True)
        if not ismount(fs):
            if not os.path.exists(img_file):
                sh(["truncate", "-s", args.loop_size, img_file])
                sh(["mkfs.ext4", "-q", "-F", img_file])
            sh(["mount", "-o", "loop", img_file, fs])
        sh(["mount", "--make-private", fs])

        def _cleanup_fs():
            for c in cols.values():
                with contextlib.suppress(Exception):
                    c.umount()
            umount(fs)
            if not args.keep:
                with contextlib.suppress(OSError):
                    os.unlink(img_file)
                    os.rmdir(fs)
                    os.rmdir(work)
        stack.callback(_cleanup_fs)

        img = prepare_image(fs, args.base, args.cache, notes)
        du = out(["du", "-sh", "--apparent-size", img]).split()[0]
        nfiles = 1 + sum(len(d) + len(f) for _, d, f in os.walk(img))
        image_info = (f"Image: Debian {open(os.path.join(img, 'etc/debian_version')).read().strip()} "
                      f"root ({du}, {nfiles} paths), from {args.base}.")
        for name in ["native"] + wanted:
            col = Column(name, fs)
            for d in (col.tree, col.upper if name == "fuse-overlayfs" else None,
                      col.wdir if name == "fuse-overlayfs" else None):
                if d and os.path.exists(d):
                    sh(["rm", "-rf", d])
            log(f"copy for {name}")
            sh(["cp", "-a", img, col.tree])
            if name == "native":
                log("chown +100000 of native's copy")
                shift_tree(col.tree)
            cols[name] = col
            if name == "shiftfs" and args.shiftfs_log:
                col.log = os.path.abspath(args.shiftfs_log)
                open(col.log, "w").close()
        for col in cols.values():
            col.mount()
        check_ownership(cols, notes)

        times = {r[0]: collections.defaultdict(list) for r in rows}
        for r in rows:
            times[r[0] + "#rounds"] = []
        errors: dict = {}
        rss = collections.defaultdict(list)
        names = list(cols)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            log(f"round {rnd + 1}/{args.rounds}, order {' '.join(order)}")
            for row in rows:
                this = {}
                for c in order:
                    try:
                        dt = run_row(row, cols[c])
                        this[c] = dt
                        times[row[0]][c].append(dt)
                    except Failed as e:
                        errors[(row[0], c)] = str(e)[:400]
                        log(f"  {row[0]} on {c}: FAILED {e}")
                    if c in FUSE_COLUMNS and cols[c].daemon_pids:
                        rss[c].append(cols[c].rss_kb())
                times[row[0] + "#rounds"].append(this)
                log(f"  {row[0]:13s} " + "  ".join(f"{c} {this[c]:.3f}" for c in names if c in this))
        reqs, cpu = {}, {}
        if not args.no_requests:
            try:
                tr = Requests()
            except (OSError, RuntimeError) as e:
                notes.append(f"request counts skipped: {e}")
                tr = None
            if tr is not None:
                log("request counts")
                try:
                    for row in [r for r in rows if r[0] in TRACED]:
                        key, _, cmd, mode, klass, prep, cleanup = row
                        for c in [c for c in FUSE_COLUMNS if c in cols]:
                            col = cols[c]
                            try:
                                if key == "rm":  # rm needs the tree untar made
                                    run_in(col.root, "mkdir /root/untar && tar -xf /root/bench/tree.tar -C /root/untar")
                                ready(col, row, warm_up=True)
                                os.sync()
                                t0 = col.cpu_s()
                                tr.start(col.dev())
                                run_in(col.root, cmd)
                                reqs[(key, c)] = tr.stop()
                                cpu[(key, c)] = col.cpu_s() - t0
                                if key == "untar":
                                    run_in(col.root, "rm -rf /root/untar")
                                if cleanup:
                                    run_in(col.root, cleanup)
                            except Failed as e:
                                tr.stop()
                                notes.append(f"request count of {key} on {c} failed: {e}")
                finally:
                    tr.close()
        elapsed = time.time() - t_start
        notes.append(f"load average at the end: {open('/proc/loadavg').read().split()[0]}")
        if args.shiftfs_log and "shiftfs" in cols:
            for c in cols.values():  # the log is complete once the daemons are gone
                with contextlib.suppress(Exception):
                    c.umount()
            lines = [ln.rstrip() for ln in open(args.shiftfs_log) if ln.strip() and " serving " not in ln]
            notes.append(f"shiftfs ran in the foreground, its log in {args.shiftfs_log}: "
                         + (f"{len(lines)} line(s) besides 'serving', e.g. " + "; ".join(lines[:5])
                            if lines else "nothing but its 'serving' lines"))
        report = render(args, v, rows, times, errors, rss, reqs, cpu, notes, elapsed, image_info)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
        log(f"wrote {args.out}")
    else:
        print(report)
    log(f"done in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
