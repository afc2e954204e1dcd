#!/usr/bin/env python3
"""Stress run for shiftfs: data integrity, concurrency and daemon memory.

What it does (as root, needs fio and setpriv):
  1. mounts a fresh lower tree with `shiftfs -f` (its own child, so the
     daemon's pid is known) under the table 0:0:1 + 1:100001:65535;
  2. records the RSS (VmRSS) of the server (the process its supervisor
     forked, which holds the nodes and serves the requests) right after
     the mount;
  3. runs, at the same time:
       - fio with verification through the mount: a sequential writer
         (bs=1M, md5) and a random writer (bs=4k, crc32c), --numjobs each,
         every block read back and checked (verify_fatal);
       - N metadata callers, each a different mapped user, creating,
         writing, renaming, chowning, chmodding and deleting in the same
         shared directories;
  4. then a metadata churn of --churn rounds (create/stat/list/unlink) to
     show whether the daemon's memory grows with the number of requests;
  5. records the RSS again (and its peak, VmHWM), checks the daemon is
     alive, the lower tree has no .fuse_hidden files and its listing equals
     the mount's, unmounts cleanly.
Exit status 0 when fio found no corruption and nothing unexpected failed.

    python3 -m bench.stress                      # defaults: 2x2 fio jobs of 128 MiB
    python3 -m bench.stress --size 512M --callers 6 --churn 50000

(from the repository root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tests import tables
from tests.daemon import foreground_daemon, log_tail, server_pid

CALLER = textwrap.dedent(r"""
    import errno, json, os, random, sys, time
    d, seed, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rnd = random.Random(seed)
    pool = [f"n{i}" for i in range(32)]
    counts, end = {}, time.monotonic() + secs
    while time.monotonic() < end:
        a = os.path.join(d, rnd.choice(["", "x/", "y/"]) + rnd.choice(pool))
        b = os.path.join(d, rnd.choice(["", "x/", "y/"]) + rnd.choice(pool))
        op = rnd.choice(["create", "create", "write", "rename", "chown", "chmod", "unlink", "stat", "list"])
        try:
            if op == "create":
                fd = os.open(a, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644); os.write(fd, os.urandom(512)); os.close(fd)
            elif op == "write":
                with open(a, "r+b") as f: f.write(os.urandom(4096))
            elif op == "rename": os.rename(a, b)
            elif op == "chown": os.chown(a, -1, os.getgid())
            elif op == "chmod": os.chmod(a, rnd.choice([0o600, 0o644]))
            elif op == "unlink": os.unlink(a)
            elif op == "stat": os.stat(a)
            else: os.listdir(os.path.dirname(a))
            r = "ok"
        except OSError as e:
            r = errno.errorcode.get(e.errno, str(e.errno))
        counts[r] = counts.get(r, 0) + 1
    print(json.dumps(counts))
""")
RACE_OK = {"ok", "ENOENT", "EEXIST", "EPERM", "EACCES", "EISDIR", "ENOTDIR", "ENOTEMPTY"}


def rss_kib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "Threads:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def fio_cmd(directory: Path, size: str, numjobs: int) -> list[str]:
    common = ["--directory", str(directory), "--size", size, "--numjobs", str(numjobs),
              "--ioengine=psync", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=0",
              "--group_reporting=0", "--output-format=json", "--end_fsync=1"]
    return (["fio"] + common
            + ["--name=seq", "--rw=write", "--bs=1M", "--verify=md5",
               "--name=rand", "--rw=randwrite", "--bs=4k", "--verify=crc32c", "--norandommap=0"])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="128M", help="per fio job (default 128M)")
    ap.add_argument("--numjobs", type=int, default=2, help="jobs per fio section (default 2)")
    ap.add_argument("--callers", type=int, default=4, help="concurrent metadata callers (default 4)")
    ap.add_argument("--churn", type=int, default=20000, help="create/stat/unlink rounds afterwards")
    ap.add_argument("--dir", default=None, help="work directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    return ap.parse_args(argv)


def prepare(work: Path) -> tuple[Path, Path]:
    """The lower tree (fio's directory, the callers' shared ones, churn's)
    and the mount point, in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    lower, mnt = work / "lower", work / "mnt"
    lower.mkdir()
    mnt.mkdir()
    for sub in ("fio", "meta", "meta/x", "meta/y", "churn"):
        (lower / sub).mkdir()
    for sub in ("meta", "meta/x", "meta/y"):
        os.chmod(lower / sub, 0o1777)
    return lower, mnt


def fio_jobs(report: dict) -> list[dict]:
    return [{"name": job["jobname"], "error": job["error"],
             "write_MiBps": round(job["write"]["bw"] / 1024, 1),
             "verify_read_MiBps": round(job["read"]["bw"] / 1024, 1),
             "verified_MiB": round(job["read"]["io_bytes"] / 1048576, 1)} for job in report["jobs"]]


def load(mnt: Path, work: Path, args, result: dict) -> None:
    """fio and the metadata callers at the same time, the server's RSS
    sampled meanwhile; what they gave goes into ``result``."""
    t0 = time.monotonic()
    fio = subprocess.Popen(fio_cmd(mnt / "fio", args.size, args.numjobs), cwd=work,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    callers = []
    caller_py = work / "caller.py"
    caller_py.write_text(CALLER)
    for i in range(args.callers):
        uid = tables.upper_of(1000 + i, tables.ROOT_KEPT)
        callers.append(subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
             sys.executable, str(caller_py), str(mnt / "meta"), str(i), "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"))
    rss_peak_during = 0
    while fio.poll() is None or any(c.poll() is None for c in callers):
        rss_peak_during = max(rss_peak_during, rss_kib(server_pid(mnt))["VmRSS"])
        time.sleep(0.5)
    fio_out, fio_err = fio.communicate()
    result["fio_seconds"] = round(time.monotonic() - t0, 1)
    result["fio_returncode"] = fio.returncode
    result["fio_jobs"] = fio_jobs(json.loads(fio_out[fio_out.index("{"):]))
    if fio.returncode or "verify" in fio_err.lower():
        result["fio_stderr"] = fio_err.strip()[-2000:]
    caller_results = []
    for c in callers:
        out, err = c.communicate(timeout=120)
        caller_results.append(json.loads(out) if out.strip() else {"crashed": err[-500:]})
    result["callers"] = caller_results
    result["rss_after_load_kib"] = rss_kib(server_pid(mnt))
    result["rss_peak_during_load_kib"] = rss_peak_during


def churn(mnt: Path, rounds: int, result: dict) -> None:
    """Memory over many more requests: create, stat, (list,) unlink."""
    t0 = time.monotonic()
    where = mnt / "churn"
    for i in range(rounds):
        p = where / f"f{i % 500}"
        with open(p, "w") as f:
            f.write("x")
        os.stat(p)
        if i % 50 == 0:
            os.listdir(where)
        os.unlink(p)
    result["churn_rounds"] = rounds
    result["churn_seconds"] = round(time.monotonic() - t0, 1)


def check(lower: Path, mnt: Path, daemon: subprocess.Popen, result: dict) -> None:
    """The daemon alive, no .fuse_hidden files on the lower, its listings
    the mount's; ``result["ok"]`` says whether all went well."""
    unexpected = [set(r) - RACE_OK for r in result["callers"] if set(r) - RACE_OK]
    hidden = [str(p) for p in lower.rglob(".fuse_hidden*")]
    same = all(sorted(os.listdir(mnt / s)) == sorted(os.listdir(lower / s))
               for s in ("meta", "meta/x", "meta/y", "fio"))
    alive = daemon.poll() is None
    result.update(daemon_alive=alive, fuse_hidden=hidden, listings_match=same,
                  unexpected_caller_errors=[sorted(u) for u in unexpected])
    result["ok"] = (alive and not hidden and same and not unexpected and result["fio_returncode"] == 0
                    and all(j["error"] == 0 for j in result["fio_jobs"]))


def summary(result: dict) -> str:
    start, end = result.get("rss_start_kib", {}), result.get("rss_end_kib", {})
    if not (start and end):
        return ""
    return (f"\nRSS start {start['VmRSS']} KiB, after fio+callers {result['rss_after_load_kib']['VmRSS']} KiB, "
            f"end {end['VmRSS']} KiB (peak {end['VmHWM']} KiB); fio verify: "
            + ", ".join(f"{j['name']} {j['verified_MiB']} MiB err={j['error']}" for j in result['fio_jobs'])
            + f"; ok={result['ok']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    for tool in ("fio", "setpriv", "fusermount3"):
        if not shutil.which(tool):
            print(f"stress: {tool} not found", file=sys.stderr)
            return 2
    work = Path(args.dir or tempfile.mkdtemp(prefix="shiftfs-stress-", dir="/tmp"))
    lower, mnt = prepare(work)
    log = work / "daemon.log"
    result = {"ok": False}
    try:  # the daemon is always unmounted and reaped (tests/daemon.py)
        with foreground_daemon(lower, mnt, *tables.args(tables.ROOT_KEPT), log=log, cwd="/",
                               warn=lambda said: result.update(daemon_stopped=said)) as daemon:
            os.listdir(mnt)
            result["rss_start_kib"] = rss_kib(server_pid(mnt))
            load(mnt, work, args, result)
            churn(mnt, args.churn, result)
            result["rss_end_kib"] = rss_kib(server_pid(mnt))
            check(lower, mnt, daemon, result)
        result["daemon_exit"] = daemon.returncode
    finally:
        tail = log_tail(log, 1 << 30).strip()
        if tail:
            result["daemon_log_tail"] = tail[-1500:]
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if summary(result):
        print(summary(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
