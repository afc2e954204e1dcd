"""The markdown report of a bench.run run: the header (machine, versions,
command, tree, mounts), the table of medians and ratios with the goals,
and one table for each further measure (bench.measure), then the verdicts
and notes."""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys

from bench.common import FSNAMES, FUSE_FS, SHORT
from bench.measure import nreq
from bench.peers import revision
from shiftfs import libfuse as sfuse

WALKS = ("find", "du", "tar", "stat")  # rows whose daemon CPU is reported per path walked


def fmt_t(x):
    if x is None:
        return "–"
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def fmt_r(x):
    return "–" if x is None else f"{x:.2f}"


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, Linux {platform.release()}"


def versions(rev: str = "") -> str:
    """The peers' versions, libfuse's, Python's, and ``rev`` (the shiftfs
    revision the daemon was started from; the checkout's now if empty)."""
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    rev = rev or revision()
    try:
        sfuse.load()
        lib = f"libfuse {sfuse.LIBFUSE_VERSION[0]}.{sfuse.LIBFUSE_VERSION[1]} " \
              f"({os.path.basename(sfuse.LIBFUSE_PATH)})"
    except ImportError as e:
        lib = f"libfuse ? ({e})"
    ovl = first_line(["sh", "-c", "fuse-overlayfs --version 2>&1 | grep -i 'fuse-overlayfs'"])
    return (f"{first_line(['bindfs', '--version'])}; {ovl}; {lib}; "
            f"Python {platform.python_version()}; shiftfs {rev}")


def fmt_ops(counts, skip=()) -> str:
    return ", ".join(f"{k.replace('FUSE_', '')} {v}" for k, v in counts.most_common()
                     if k.startswith("FUSE_") and k not in skip) or "–"


def fmt_xattr(counts) -> str:
    n = counts.get("FUSE_GETXATTR", 0)
    if not n:
        return "0"
    parts = [f"{k[6:]} {v}" for k, v in counts.most_common() if k.startswith("xattr:")]
    return f"{n} ({', '.join(parts)})"


class Report:
    """The report's sections, in order; each appends its lines to ``out``
    and its goals, met or not, to ``verdicts``."""

    def __init__(self, fss, workloads, args, p, notes) -> None:
        self.fss, self.workloads, self.args, self.p, self.notes = fss, workloads, args, p, notes
        self.present = [n for n in FSNAMES if n in fss]
        self.fuse_present = [n for n in FUSE_FS if n in fss]
        self.npaths = sum(1 for _ in open(os.path.join(args.work, "paths.txt"))) + 1   # + the root
        self.out: list[str] = []
        self.verdicts: list[tuple] = []

    def walked(self, row):   # the stat script stats every path twice (warm-up + timed), both counted
        return self.npaths * (2 if row.startswith("stat every path") else 1)

    def header(self, elapsed: float) -> None:
        args, p, fss = self.args, self.p, self.fss
        nfiles = p["top"] * p["sub"] * p["files"]
        self.out += [
            f"## shiftfs benchmark, {datetime.date.today().isoformat()}", "",
            f"- machine: {machine()}",
            f"- versions: {versions(getattr(args, 'revision', ''))}",
            f"- command: `{' '.join(['python3', '-m', 'bench.run'] + sys.argv[1:])}`",
            f"- tree: {nfiles} small files (0–8 KiB) in {p['top'] * (p['sub'] + 1)} directories "
            f"({self.npaths} paths with the root), "
            f"owners varied ({'all mapped' if p.get('all_mapped') else 'one in twelve unmapped'}), one {p['big_mib']} MiB file; "
            f"{args.rounds} round(s), workloads interleaved across filesystems, medians; "
            f"run took {elapsed / 60:.1f} min",
            f"- filesystem: {getattr(args, 'where', '?')}",
            "- mounts: bindfs `--uid-offset=100000 --gid-offset=100000` (defaults otherwise); "
            "fuse-overlayfs `-o lowerdir=TREE,upperdir=U,workdir=W,uidmapping=0:100000:65536,"
            "gidmapping=0:100000:65536,allow_other` (U, W empty at start; writes land in U); "
            "shiftfs `--uidmap 0:100000:65536 --gidmap 0:100000:65536` (defaults"
            + (f", plus `{' '.join(args.shiftfs_args)}`" if args.shiftfs_args else "") + "); "
            "kernel = idmapped bind mount with the same map",
            "- read_ahead_kb: " + ", ".join(f"{n} {fss[n]['read_ahead_kb']}" for n in FUSE_FS
                                          if n in fss and fss[n]['read_ahead_kb']),
            ""]

    def medians(self, results) -> None:
        present = self.present
        others = [n for n in ("native", "bindfs", "fuse-overlayfs") if n in present]
        head = (["workload"] + [SHORT.get(n, n) for n in present]
                + [f"shiftfs ÷ {SHORT.get(n, n)}" for n in others] + ["kernel ÷ native", "goal", "met"])
        self.out.append("| " + " | ".join(head) + " |")
        self.out.append("|" + "---|" * len(head))
        for row, _prep, _run, _clean, goal in self.workloads:
            med = {n: statistics.median(results[row][n]) if results[row].get(n) else None for n in present}
            s, k, nat = med.get("shiftfs"), med.get("kernel"), med.get("native")
            ratios = {n: (s / med[n] if s and med.get(n) else None) for n in others}
            rk = k / nat if k and nat else None
            if goal:
                limit, against = goal
                val = ratios.get(against)
                tgt = f"≤ {limit} × {against}"
                met = "–" if val is None else ("yes" if val <= limit else "**no**")
                if val is not None:
                    self.verdicts.append((row, tgt, val, val <= limit))
            else:
                tgt, met = "–", "–"
            self.out.append("| " + " | ".join([row] + [fmt_t(med[n]) for n in present]
                                              + [fmt_r(ratios[n]) for n in others] + [fmt_r(rk), tgt, met]) + " |")

    def _cpu_per(self, cpu, rcounts, row) -> dict:
        """The daemons' median CPU on ``row``, per path walked or per request (µs)."""
        vals = {}
        for name in self.fuse_present:
            xs = cpu[row].get(name)
            if not xs:
                continue
            if row.startswith(WALKS):
                vals[name] = statistics.median(xs) / self.walked(row) * 1e6
            else:
                c = (rcounts or {}).get((row, name))
                n = nreq(c["ops"]) if c else 0
                vals[name] = statistics.median(xs) / n * 1e6 if n else None
        return vals

    def cpu(self, cpu, rcounts) -> None:
        if not (cpu and any(cpu[row].get("shiftfs") for row in cpu)):
            return
        fuse_present = self.fuse_present
        self.out += ["", "Daemon CPU in the timed runs (the daemon's user+system time, /proc/PID/stat, "
                     "medians over the rounds): per path walked for the walks (per path: readdirplus "
                     "answers many paths in one request), per request for the rest (requests from the "
                     "counted run below):", "",
                     "| workload | per | " + " | ".join(SHORT.get(n, n) for n in fuse_present)
                     + " | " + " | ".join(f"shiftfs ÷ {SHORT.get(n, n)}" for n in fuse_present if n != "shiftfs")
                     + " |", "|---|---|" + "---|" * (2 * len(fuse_present) - 1)]
        for row, *_ in self.workloads:
            per_path = row.startswith(WALKS)
            vals = self._cpu_per(cpu, rcounts, row)
            s_ = vals.get("shiftfs")
            cells = [f"{vals[n]:.1f} µs" if vals.get(n) is not None else "–" for n in fuse_present]
            ratios = [fmt_r(s_ / vals[n] if s_ and vals.get(n) else None)
                      for n in fuse_present if n != "shiftfs"]
            self.out.append(f"| {row} | {'path' if per_path else 'request'} | " + " | ".join(cells + ratios) + " |")
            # issue 18's goals: per path on the cold walk, per request on create+write
            if s_ and vals.get("bindfs") and (row == "find -ls cold" or row.startswith("create+write")):
                limit = 1.0 if per_path else 1.5
                self.verdicts.append((f"daemon CPU per {'path' if per_path else 'request'}, {row}",
                                      f"≤ {limit} × bindfs", s_ / vals["bindfs"], s_ / vals["bindfs"] <= limit))

    def syscalls(self, sysc) -> None:
        if not sysc:
            return
        self.out += ["", "Syscalls per request on create+write (one more run, the daemon under `strace -f -y`, "
                     "every thread; /dev/fuse I/O = reading requests and writing replies and notifications, "
                     "told apart by the fd; futex = waits and wake-ups between threads):", "",
                     "| daemon | requests | syscalls / request | /dev/fuse I/O | futex | besides /dev/fuse I/O "
                     "| besides /dev/fuse I/O and futex | the others, per request |",
                     "|---|---|---|---|---|---|---|---|"]
        for (row, name), c in sysc.items():
            n = c["requests"] or 1
            total = sum(c["calls"].values())
            futex = c["calls"].get("futex", 0)
            rest = collections.Counter(c["calls"])
            rest.pop("futex", None)
            top = ", ".join(f"{k} {v / n:.2f}" for k, v in rest.most_common(12))
            self.out.append(f"| {name} | {c['requests']} | {total / n:.2f} | {c['fuse_io'] / n:.2f} | "
                            f"{futex / n:.2f} | {(total - c['fuse_io']) / n:.2f} | "
                            f"{(total - c['fuse_io'] - futex) / n:.2f} | {top} |")
            if name == "shiftfs":
                v = (total - c["fuse_io"]) / n
                self.verdicts.append(("syscalls per request on create besides /dev/fuse I/O", "≤ 4", v, v <= 4))

    def daemons(self, dstats) -> None:
        if not dstats:
            return
        self.out += ["", "Daemon cost over a cold walk (`find -ls` + `tar cf - | cat` of the whole tree, after "
                     "drop_caches); requests counted with the `fuse:fuse_request_send` tracepoint. Inode-table "
                     "figures: the daemon's RSS and open fds (/proc/PID/fd) before, after that walk, after two "
                     "more (each after drop_caches), and after a final drop_caches (the kernel FORGETs what it "
                     "evicts):", "",
                     "| daemon | requests | CPU | µs / request | RSS: before / 1 walk / 3 walks / dropped | "
                     "fds: before / 1 walk / 3 walks / dropped | requests by opcode |",
                     "|---|---|---|---|---|---|---|"]
        for d in dstats:
            us = f"{d['us_per_req']:.1f}" if d["us_per_req"] else "–"
            rss = " / ".join(f"{m[0] / 1024:.1f}" for m in d["mem"]) + " MiB"
            fds = " / ".join(str(m[1]) for m in d["mem"])
            self.out.append(f"| {d['fs']} | {d['requests']} | {d['cpu_s']:.2f} s | {us} | {rss} | {fds} | "
                            f"{fmt_ops(d['ops'])} |")
        by = {d["fs"]: d for d in dstats}
        if by.get("shiftfs", {}).get("us_per_req") and by.get("bindfs", {}).get("us_per_req"):
            r = by["shiftfs"]["us_per_req"] / by["bindfs"]["us_per_req"]
            self.out += ["", f"Goal: daemon CPU per request ≤ 1.5 × bindfs's: shiftfs ÷ bindfs = {r:.2f} "
                         f"({'met' if r <= 1.5 else '**missed**'})."]
            self.verdicts.append(("daemon CPU per request (cold walk)", "≤ 1.5 × bindfs", r, r <= 1.5))

    def requests(self, rcounts) -> None:
        if not rcounts:
            return
        self.out += ["", "Requests per workload (one extra, untimed run of each workload on each FUSE mount, "
                     "after the same prep as the timed runs; `fuse:fuse_request_send` counts by opcode; "
                     "GETXATTR split by attribute name, told apart by request length; per path = requests ÷ "
                     f"the {self.npaths} paths of the tree, for the whole-tree warm workloads (2 × that for "
                     "`stat every path`, whose script stats every path twice, warm-up and timed, both counted); CPU = the daemon's "
                     "user+system time over the run):", "",
                     "| workload | daemon | requests | per path | GETXATTR | daemon CPU | µs / request | "
                     "requests by opcode |", "|---|---|---|---|---|---|---|---|"]
        for row, *_ in self.workloads:
            for name in FUSE_FS:
                c = rcounts.get((row, name))
                if not c:
                    continue
                n = nreq(c["ops"])
                per = f"{n / self.walked(row):.3f}" if row.endswith("warm") else "–"
                if c["ops"].get("LOST"):
                    self.notes.append(f"{row} on {name}: {c['ops']['LOST']} trace events lost")
                us = f"{c['cpu_s'] / n * 1e6:.1f}" if n else "–"
                self.out.append(f"| {row} | {name} | {n} | {per} | {fmt_xattr(c['ops'])} | {c['cpu_s']:.2f} s | "
                                f"{us} | {fmt_ops(c['ops'], skip=('FUSE_GETXATTR',))} |")
        self._warm_goal(rcounts)

    def _warm_goal(self, rcounts) -> None:
        # the walks only: a tar opens every file it reads, and every open
        # is an OPEN and a RELEASE, whatever is cached
        warm = [w[0] for w in self.workloads if w[0].endswith("warm") and not w[0].startswith("tar")]
        sw = [(r, nreq(rcounts[(r, "shiftfs")]["ops"]), rcounts[(r, "shiftfs")]["ops"])
              for r in warm if (r, "shiftfs") in rcounts]
        if not sw:
            return
        walked = self.walked
        self.out += ["", "Goal: warm walk requests ≤ 2 % of the paths walked, 0 GETXATTR of the root "
                     "(shiftfs): " + "; ".join(
                         f"{r}: {n} requests = {100 * n / walked(r):.1f} % of {walked(r)} paths walked "
                         f"({'met' if n <= 0.02 * walked(r) else '**missed**'}), GETXATTR "
                         f"{c.get('xattr:system.posix_acl_access', 0)} posix_acl_access"
                         for r, n, c in sw) + "."]
        for r, n, c in sw:
            self.verdicts.append((f"{r}: requests per path", "≤ 0.02", n / walked(r), n <= 0.02 * walked(r)))

    def acl(self, aprobe) -> None:
        if not aprobe:
            return
        self.out += ["", "Where warm-walk GETXATTRs come from: 1000 warm `lstat()`s of t00/d00/f000 by an "
                     "absolute path (through the mount root) and relative to a cwd inside the mount; requests "
                     "over the 1000 calls:", "",
                     "| daemon | absolute | from cwd t00 | from cwd t00/d00 |", "|---|---|---|---|"]
        for name, res in aprobe.items():
            self.out.append(f"| {name} | " + " | ".join(
                f"{nreq(c)}: {fmt_ops(c) if nreq(c) else '–'}" + (
                    f" ({', '.join(f'{k[6:]} {v}' for k, v in c.items() if k.startswith('xattr:'))})"
                    if c.get("FUSE_GETXATTR") else "")
                for c in res.values()) + " |")

    def coherence(self, coh) -> None:
        if not coh:
            return
        kinds = ["chmod", "new file", "removal", "rename"]
        self.out += ["", "Coherence: a change made directly on the lower, polled through the mount every ms "
                     "until visible (up to 5 s; the name or file was looked up through the mount first). "
                     "fuse-overlayfs does not support changes to its lowerdir behind its back:", "",
                     "| mount | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for name, res in coh.items():
            self.out.append(f"| {name} | " + " | ".join(
                "> 5 s" if res.get(k) is None else f"{res[k] * 1000:.0f} ms" for k in kinds) + " |")

    def footer(self) -> None:
        verdicts = self.verdicts
        if verdicts:
            self.out += ["", "Goals (issue 13; the data rows issue 10's where passthrough is on): met " + ", ".join(f"{r} ({v:.2f})" for r, _t, v, ok in verdicts if ok)
                         + "; missed " + (", ".join(f"{r} ({v:.2f}, goal {t})" for r, t, v, ok in verdicts if not ok)
                                          or "none") + "."]
        if self.notes:
            self.out += [""] + [f"- note: {n}" for n in self.notes]


def report(results, workloads, fss, dstats, rcounts, coh, aprobe, notes, args, p, elapsed,
           cpu=None, sysc=None) -> str:
    r = Report(fss, workloads, args, p, notes)
    r.header(elapsed)
    r.medians(results)
    r.cpu(cpu, rcounts)
    r.syscalls(sysc)
    r.daemons(dstats)
    r.requests(rcounts)
    r.acl(aprobe)
    r.coherence(coh)
    r.footer()
    return "\n".join(r.out) + "\n"
