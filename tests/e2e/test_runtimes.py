"""The recipes for real container runtimes (docs/use-cases.md, 6), as tested: systemd-nspawn,
podman (runc) and LXC (lxc-execute), each over a shiftfs mount of a real
Debian minbase root (tests/e2e/debian.py, built once per machine and cached).

Each runtime gets one private copy of the image, mounted twice over the
same lower: ``b:0:100000:65536`` (container A) and ``b:0:200000:65536``
(container B). For each runtime:

- a read-only session (start, ``id``, stat of files of several owners, a
  set-uid binary, ``getent``) with the recipe's flags leaves the image's
  manifest (paths, types, modes, ids, sizes, content hashes, xattrs, mtimes)
  exactly as it was;
- A and B at the same time: container root creates and chowns, an
  unprivileged user inside writes its own files, each sees what the other
  wrote with its own ids; the lower holds container ids (0, 33, 1000), never
  100000 or 200000; nothing else in the image changes;
- the runtime's defaults that the recipe turns off are shown to write into
  the image (or to fail on EOVERFLOW), so the flags are known to matter.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import textwrap

import pytest

from shiftfs.idmap import Extent

from tests.tables import table
from .debian import KNOWN, RESOLV_CONF, USER, copy_image
from .rootfs import diff_manifests, manifest

pytestmark = pytest.mark.needs_root

A, B = 100000, 200000
RANGE = 65536
WWW, MAIL = 33, 8  # www-data, group mail: ids the image's own passwd/group know
TIMEOUT = 120


# ---- the runtimes, as docs/use-cases.md gives them -----------------------------------

class Runtime:
    name = ""
    binary = ""

    def __init__(self, work: str) -> None:
        self.work = work

    def argv(self, mnt: str, host: int, name: str, script: str, *, defaults: bool = False) -> list[str]:
        raise NotImplementedError

    def cleanup(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass


class Nspawn(Runtime):
    name = "nspawn"
    binary = "systemd-nspawn"
    # what each flag is for: the "systemd-nspawn" recipe in docs/use-cases.md
    SAFE = ["--link-journal=no",   # else: mkdir /var/log/journal as host root -> EOVERFLOW
            "--resolv-conf=off",   # else: copies the host's resolv.conf over the image's
            "--timezone=off"]      # else: unlinks /etc/localtime, fails to make it again

    def argv(self, mnt, host, name, script, *, defaults=False, safe=None):
        return (["systemd-nspawn", "-q", "-D", mnt, f"--machine={name}",
                 f"--private-users={host}:{RANGE}", "--private-users-ownership=off",
                 # no systemd as PID 1 here (and no system bus): do not ask it for a unit
                 "--keep-unit", "--register=no"]
                + (self.SAFE if safe is None else safe) + ["/bin/sh", "-c", script])


class Podman(Runtime):
    name = "podman"
    binary = "podman"

    def __init__(self, work: str) -> None:
        super().__init__(work)
        # a private store, not the machine's; podman wants a runroot path
        # under 50 characters
        self.store = tempfile.mkdtemp(prefix="shiftfs-podman-", dir="/tmp")
        self.global_args = ["--root", os.path.join(self.store, "root"),
                            "--runroot", os.path.join(self.store, "run")]

    def close(self):
        subprocess.run(["podman", *self.global_args, "system", "reset", "-f"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.store, ignore_errors=True)

    def argv(self, mnt, host, name, script, *, defaults=False):
        return (["podman", *self.global_args,
                 "run", "--rm", "--name", name, "--runtime", "runc",
                 "--uidmap", f"0:{host}:{RANGE}", "--gidmap", f"0:{host}:{RANGE}",
                 "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000",
                 "--network", "none"]
                + ([] if defaults else ["--no-hosts", "--tmpfs", "/run"])
                + ["--rootfs", mnt, "/bin/sh", "-c", script])

    def cleanup(self, name):
        subprocess.run(["podman", *self.global_args, "rm", "-f", "-i", name],
                       capture_output=True, timeout=60)


class Lxc(Runtime):
    name = "lxc"
    binary = "lxc-execute"

    def argv(self, mnt, host, name, script, *, defaults=False):
        lxcpath = os.path.join(self.work, "lxc")
        os.makedirs(lxcpath, exist_ok=True)
        conf = os.path.join(self.work, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(textwrap.dedent(f"""\
                lxc.uts.name = {name}
                lxc.rootfs.path = dir:{mnt}
                lxc.idmap = u 0 {host} {RANGE}
                lxc.idmap = g 0 {host} {RANGE}
                lxc.net.0.type = empty
                lxc.mount.auto = proc:mixed sys:ro
                lxc.autodev = 1
                """))
        # LXC as root maps ids with newuidmap when it is installed, which
        # insists on root's ranges in /etc/subuid and /etc/subgid (docs/use-cases.md:
        # add them). The test does not edit the host's files: it binds its
        # own over them in a private mount namespace of the launcher.
        subid = os.path.join(self.work, "subid")
        with open(subid, "w") as f:
            f.write(f"root:{A}:{RANGE}\nroot:{B}:{RANGE}\n")
        lxc = ["lxc-execute", "-n", name, "-P", lxcpath, "-f", conf,
               "-o", os.path.join(self.work, f"{name}.log"), "-l", "WARN", "--"]
        wrapper = ('for f in /etc/subuid /etc/subgid; do [ -e "$f" ] || : > "$f"; '
                   'mount --bind "$0" "$f" || exit 125; done; exec "$@"')
        return (["unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper, subid]
                + lxc + ["/bin/sh", "-c", script])

    def cleanup(self, name):
        subprocess.run(["lxc-stop", "-k", "-n", name, "-P", os.path.join(self.work, "lxc")],
                       capture_output=True, timeout=60)


RUNTIMES = {r.name: r for r in (Nspawn, Podman, Lxc)}


# ---- running them ----------------------------------------------------------------------

class Run:
    """A runtime process in its own process group, always reaped."""

    def __init__(self, runtime: Runtime, argv: list[str], name: str) -> None:
        self.runtime, self.name = runtime, name
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out = self.err = ""

    def wait(self, timeout: float = TIMEOUT) -> "Run":
        try:
            self.out, self.err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.out, self.err = self.proc.communicate()
            raise AssertionError(f"{self.runtime.name} {self.name}: still running after "
                                 f"{timeout}s\n{self.out}\n{self.err}")
        return self

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.runtime.cleanup(self.name)

    def check(self) -> "Run":
        assert self.proc.returncode == 0, (f"{self.runtime.name} {self.name} exited "
                                           f"{self.proc.returncode}\n--- stdout\n{self.out}"
                                           f"\n--- stderr\n{self.err}")
        return self

    def close(self) -> None:
        if self.proc.returncode is None:
            self.kill()
            self.proc.communicate()


def run(runtime: Runtime, mnt: str, host: int, name: str, script: str, **kw) -> Run:
    r = Run(runtime, runtime.argv(mnt, host, name, script, **kw), name)
    try:
        return r.wait()
    finally:
        r.close()


def values(prefix: str, text: str) -> list[str]:
    return [line[len(prefix):].strip() for line in text.splitlines() if line.startswith(prefix)]


def owners(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture(params=sorted(RUNTIMES))
def runtime(request, e2e_dir):
    cls = RUNTIMES[request.param]
    assert shutil.which(cls.binary), f"{cls.binary} is not installed (.ci/packages.txt has it)"
    work = tempfile.mkdtemp(prefix=f"rt-{cls.name}-", dir=e2e_dir)
    os.chmod(work, 0o755)
    rt = cls(work)
    try:
        yield rt
    finally:
        rt.close()


def _checked_copy(dest: str) -> str:
    lower = copy_image(dest)
    for rel, (uid, gid, mode) in KNOWN.items():
        st = os.lstat(os.path.join(lower, rel))
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, mode), rel
    return lower


@pytest.fixture
def image(e2e_dir):
    """A private copy of the Debian image, checked to hold the ids the tests expect."""
    return _checked_copy(os.path.join(e2e_dir, "debian"))


@pytest.fixture(scope="module")
def shared_image():
    """One copy for the read-only sessions (each compares the manifest it
    takes before with the one after, so a session that wrote fails by itself)."""
    base = tempfile.mkdtemp(prefix="shiftfs-e2e-ro-", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        yield _checked_copy(os.path.join(base, "debian"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def unique(runtime: Runtime, tag: str) -> str:
    return f"shiftfs-{runtime.name}-{tag}-{os.getpid()}"


# ---- the recipes ---------------------------------------------------------------------

READ_ONLY = r"""
set -e
echo "ID $(id -u):$(id -g)"
for p in / {known}; do echo "STAT $p $(stat -c %u:%g:%a "$p")"; done
echo "PASSWD $(getent passwd user | cut -d: -f3,4)"
echo "OS $(. /etc/os-release; echo $ID)"
cat /etc/hostname > /dev/null
ls -ln /etc > /dev/null
echo DONE
"""


def read_only_script() -> str:
    return READ_ONLY.format(known=" ".join("/" + p for p in KNOWN))


def test_read_only_session_leaves_the_image_unchanged(runtime, shared_image, mounts):
    image = shared_image
    before = manifest(image, with_times=True)
    mnt = mounts.shiftfs(image, table(A), name="a")
    r = run(runtime, mnt, A, unique(runtime, "ro"), read_only_script()).check()
    assert "DONE" in r.out
    assert values("ID ", r.out) == ["0:0"]
    stats = dict(v.split() for v in values("STAT ", r.out))
    assert stats.pop("/") == "0:0:755"
    assert stats == {"/" + p: f"{u}:{g}:{m:o}" for p, (u, g, m) in KNOWN.items()}
    assert values("PASSWD ", r.out) == [f"{USER}:{USER}"]
    assert values("OS ", r.out) == ["debian"]
    # seen from the host, the same files are in A's range
    assert owners(os.path.join(mnt, "etc/shadow")) == (A, A + 42)
    diff = diff_manifests(before, manifest(image, with_times=True))
    assert diff == {"added": [], "removed": [], "changed": {}}


SESSION = r"""
set -e
echo "ID $(id -u):$(id -g)"
mkdir /srv/{me}
echo "written by root of {me}" > /srv/{me}/file
chown {user}:{user} /srv/{me}/file
chown {www}:{mail} /srv/{me}
touch /srv/ready-{me}
i=0
while [ ! -e /srv/ready-{other} ]; do
    i=$((i+1)); [ $i -lt 1200 ] || {{ echo "never saw container {other}"; exit 3; }}
    sleep 0.05
done
echo "OTHER $(stat -c %u:%g /srv/{other}/file) $(stat -c %u:%g /srv/{other})"
echo "USERID $(su user -s /bin/sh -c 'echo mine > /home/user/from-{me}; mkdir /home/user/dir-{me}; id -u')"
echo "USERFILE $(stat -c %u:%g /home/user/from-{me}) $(stat -c %u:%g /home/user/dir-{me})"
if su user -s /bin/sh -c 'touch /srv/{me}/by-user' 2>/dev/null; then echo "USERWRITE yes"; else echo "USERWRITE no"; fi
if su user -s /bin/sh -c 'chown 0 /home/user/from-{me}' 2>/dev/null; then echo "USERCHOWN yes"; else echo "USERCHOWN no"; fi
echo DONE
"""


def test_two_containers_on_two_tables_over_one_lower(runtime, image, mounts):
    before = manifest(image)
    mnt = {"a": mounts.shiftfs(image, table(A), name="a"),
           "b": mounts.shiftfs(image, table(B), name="b")}
    host = {"a": A, "b": B}
    runs = {}
    try:
        for me, other in (("a", "b"), ("b", "a")):
            script = SESSION.format(me=me, other=other, user=USER, www=WWW, mail=MAIL)
            runs[me] = Run(runtime, runtime.argv(mnt[me], host[me], unique(runtime, me), script),
                           unique(runtime, me))
        for r in runs.values():
            r.wait()
        for r in runs.values():
            r.check()
    finally:
        for r in runs.values():
            r.close()

    for me, other in (("a", "b"), ("b", "a")):
        out = runs[me].out
        assert "DONE" in out
        assert values("ID ", out) == ["0:0"]
        # what the other container wrote, with this container's ids
        assert values("OTHER ", out) == [f"{USER}:{USER} {WWW}:{MAIL}"]
        assert values("USERID ", out) == [str(USER)]
        assert values("USERFILE ", out) == [f"{USER}:{USER} {USER}:{USER}"]
        assert values("USERWRITE ", out) == ["no"]  # /srv/{me} is 0755 www-data's
        assert values("USERCHOWN ", out) == ["no"]

        # on the lower: container ids, 0-based, never the host ranges
        assert owners(os.path.join(image, "srv", me)) == (WWW, MAIL)
        assert owners(os.path.join(image, "srv", me, "file")) == (USER, USER)
        assert owners(os.path.join(image, "srv", f"ready-{me}")) == (0, 0)
        assert owners(os.path.join(image, "home/user", f"from-{me}")) == (USER, USER)
        assert owners(os.path.join(image, "home/user", f"dir-{me}")) == (USER, USER)
        # from the host, each mount shows it in its own range
        for view in ("a", "b"):
            assert owners(os.path.join(mnt[view], "srv", me, "file")) == (host[view] + USER,) * 2
            assert owners(os.path.join(mnt[view], "srv", me)) == (host[view] + WWW,
                                                                   host[view] + MAIL)

    diff = diff_manifests(before, manifest(image))
    assert diff["removed"] == []
    assert sorted(diff["added"]) == sorted(
        ["srv/a", "srv/a/file", "srv/b", "srv/b/file", "srv/ready-a", "srv/ready-b",
         "home/user/from-a", "home/user/from-b", "home/user/dir-a", "home/user/dir-b"])
    assert list(diff["changed"]) == []


# ---- what the defaults the recipes turn off do ----------------------------------------

@pytest.fixture
def work(e2e_dir):
    path = tempfile.mkdtemp(prefix="rt-", dir=e2e_dir)
    os.chmod(path, 0o755)
    return path


def test_nspawn_defaults_write_into_the_image(work, image, mounts):
    """Without the recipe's flags nspawn fails on EOVERFLOW (host root
    creating through a table that does not map upper 0), or writes into the
    image by itself. Each case is what a flag of docs/use-cases.md is for."""
    runtime = Nspawn(work)
    # an image whose time zone is not the host's (nspawn leaves a matching one alone)
    localtime = os.path.join(image, "etc/localtime")
    zone = "Etc/UTC" if os.path.realpath("/etc/localtime").endswith("/Europe/Paris") else "Europe/Paris"
    os.unlink(localtime)
    os.symlink(f"../usr/share/zoneinfo/{zone}", localtime)
    mnt = mounts.shiftfs(image, table(A), name="a")
    before = manifest(image, with_times=True)
    journal = run(runtime, mnt, A, unique(runtime, "journal"), "true",
                  safe=["--resolv-conf=off", "--timezone=off"])
    assert journal.proc.returncode != 0
    assert "Failed to create /var/log/journal: Value too large" in journal.err
    assert diff_manifests(before, manifest(image, with_times=True)) == {
        "added": [], "removed": [], "changed": {}}

    r = run(runtime, mnt, A, unique(runtime, "defaults"), "cat /etc/resolv.conf",
            safe=["--link-journal=no"]).check()
    diff = diff_manifests(before, manifest(image, with_times=True))
    # --resolv-conf=auto: the host's copied over the image's own
    assert r.out != RESOLV_CONF
    with open(os.path.join(image, "etc/resolv.conf")) as f:
        assert f.read() != RESOLV_CONF
    assert "etc/resolv.conf" in diff["changed"]
    # --timezone=auto: /etc/localtime unlinked by host root (allowed), then
    # the new symlink refused (EOVERFLOW): the image has lost it
    assert diff["removed"] == ["etc/localtime"]
    assert diff["added"] == []
    assert set(diff["changed"]) <= {"etc", "etc/resolv.conf"}


@pytest.fixture
def podman(work):
    rt = Podman(work)
    try:
        yield rt
    finally:
        rt.close()


def test_podman_defaults_write_into_the_image(podman, image, mounts):
    runtime = podman
    mnt = mounts.shiftfs(image, table(A), name="a")
    before = manifest(image, with_times=True)
    run(runtime, mnt, A, unique(runtime, "defaults"), "true", defaults=True).check()
    diff = diff_manifests(before, manifest(image, with_times=True))
    # mount points for its own /etc/hosts and /run/.containerenv, made in
    # the image by runc as container root (lower 0)
    assert diff["added"] == ["etc/hosts", "run/.containerenv"]
    assert owners(os.path.join(image, "etc/hosts")) == (0, 0)
    assert diff["removed"] == []
    assert set(diff["changed"]) == {"etc", "run"}

    # an image without /etc/mtab cannot start at all: podman makes the
    # symlink as host root, whose id the table does not map
    os.unlink(os.path.join(image, "etc/mtab"))
    r = run(runtime, mnt, A, unique(runtime, "mtab"), "true")
    assert r.proc.returncode != 0
    assert "creating /etc/mtab symlink: value too large" in r.err
    assert not os.path.lexists(os.path.join(image, "etc/mtab"))


# ---- host root, when the table does not map upper 0 (issue 11, item 2) ---------------

HOST_ROOT_LOWER = 65536  # a lower id no file of the image has (shiftfs scan lists them)


def test_host_root_through_the_mount(work, image, mounts):
    """By default host root (upper 0, not in the table) cannot create
    anything through the mount: EOVERFLOW, as on a kernel idmapped mount,
    and nothing reaches the image. The table itself can give host root a
    lower id of its own (``b:65536:0:1``): its files then land as 65536 on
    disk, and a container, whose user namespace does not map host root,
    sees them as nobody and can neither take them over nor change them."""
    plain = mounts.shiftfs(image, table(A), name="plain")
    for make in (lambda p: open(p, "x").close(), os.mkdir, lambda p: os.symlink("x", p),
                 lambda p: os.mknod(p, 0o600 | stat.S_IFIFO)):
        target = os.path.join(plain, "srv", "by-host-root")
        with pytest.raises(OSError) as e:
            make(target)
        assert e.value.errno == errno.EOVERFLOW
        assert not os.path.lexists(os.path.join(image, "srv", "by-host-root"))
    with pytest.raises(OSError) as e:  # nor give anything to itself
        os.chown(os.path.join(plain, "etc/hostname"), 0, 0)
    assert e.value.errno == errno.EOVERFLOW
    assert owners(os.path.join(image, "etc/hostname")) == (0, 0)

    mnt = mounts.shiftfs(image, [Extent(0, A, RANGE), Extent(HOST_ROOT_LOWER, 0, 1)], name="r")
    with open(os.path.join(mnt, "srv/by-host-root"), "x") as f:
        f.write("host root's\n")
    os.mkdir(os.path.join(mnt, "srv/host-dir"), 0o755)
    for rel in ("srv/by-host-root", "srv/host-dir"):
        assert owners(os.path.join(image, rel)) == (HOST_ROOT_LOWER, HOST_ROOT_LOWER)
        assert owners(os.path.join(mnt, rel)) == (0, 0)
    # the container's own ids are as with the plain table
    assert owners(os.path.join(mnt, "home/user")) == (A + USER, A + USER)

    script = r"""
echo "OWNER $(stat -c %u:%g /srv/by-host-root) $(stat -c %u:%g /srv/host-dir)"
try() { if "$@" 2>/dev/null; then echo yes; else echo no; fi; }
echo "CHOWN $(try chown 0:0 /srv/by-host-root)"
echo "CHMOD $(try chmod 666 /srv/by-host-root)"
echo "WRITE $(try sh -c 'echo x >> /srv/by-host-root')"
echo "CREATE $(try touch /srv/host-dir/x)"
echo "READ $(cat /srv/by-host-root)"
"""
    r = run(Nspawn(work), mnt, A, f"shiftfs-nspawn-hostroot-{os.getpid()}", script).check()
    assert values("OWNER ", r.out) == ["65534:65534 65534:65534"]
    for what in ("CHOWN", "CHMOD", "WRITE", "CREATE"):
        assert values(what + " ", r.out) == ["no"], what
    assert values("READ ", r.out) == ["host root's"]
    assert owners(os.path.join(image, "srv/by-host-root")) == (HOST_ROOT_LOWER, HOST_ROOT_LOWER)
    assert not os.path.lexists(os.path.join(image, "srv/host-dir/x"))
    with open(os.path.join(image, "srv/by-host-root")) as f:
        assert f.read() == "host root's\n"
