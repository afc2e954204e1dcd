#!/usr/bin/env python3
"""Draw docs/performance.svg from the tables in bench/results.md.

    python3 -m bench.chart                       # bench/results.md -> docs/performance.svg
    python3 -m bench.chart --results R --out O   # other files

(from the repository root).

Every table of bench/results.md whose header starts
``| workload | native | ...`` (what bench/run.py writes) becomes one panel.
Its peers are the columns between ``native`` and the first ratio column
(``... ÷ ...``), today bindfs, fuse-ovl, shiftfs and kernel. Each workload is
a group of bars, one per peer: the peer's time divided by native's, on a
logarithmic axis centred on 1 × native (left of the line: faster than the
tree itself, right: slower). A panel is titled by the ``## `` heading above
its table, with the machine, libfuse and shiftfs revision from its
``- machine:`` and ``- versions:`` lines.

No dependency: the SVG is written by hand, and the same results always give
the same bytes (tests/test_docs.py checks that the committed chart is what
this script draws from the committed results).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results.md"
OUT = REPO / "docs" / "performance.svg"

COLOURS = {"bindfs": "#9aa9bf", "fuse-ovl": "#c9b48a", "shiftfs": "#1f5fa8", "kernel": "#7fb27f"}
SPARE = ["#b58ab8", "#d08770", "#88c0d0", "#a3be8c"]  # for peers results.md may add later
UNITS = {"µs": 0.001, "us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60000.0}

# geometry (px)
WIDTH = 960
LABEL_W = 250          # workload names
PLOT_X = LABEL_W + 10  # where the axis starts
PLOT_W = WIDTH - PLOT_X - 70
BAR_H = 7
GROUP_GAP = 9
PANEL_HEAD = 44
PANEL_GAP = 22


@dataclass
class Row:
    workload: str
    ratios: dict[str, float]     # peer -> time / native


@dataclass
class Panel:
    title: str
    subtitle: str
    peers: list[str]
    rows: list[Row] = field(default_factory=list)


def cells(line: str) -> list[str]:
    """The cells of a markdown table row; an escaped \\| stays in its cell."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") else inner
    parts = re.split(r"(?<!\\)\|", inner)
    return [p.strip().replace("\\|", "|") for p in parts]


def duration_ms(text: str) -> float | None:
    """'307 ms', '20.6 s', '1.5 min' -> milliseconds; anything else (–, > 5 s) -> None."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*(µs|us|ms|s|min)", text.strip())
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def number(text: str) -> float | None:
    m = re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text.strip())
    return float(m.group(0)) if m else None


def plain(md: str) -> str:
    return re.sub(r"[`*]", "", md).strip()


def subtitle_of(meta: dict[str, str]) -> str:
    bits = []
    if "machine" in meta:
        bits.append(meta["machine"])
    versions = meta.get("versions", "")
    for pattern in (r"libfuse [0-9.]+", r"Python [0-9.]+", r"shiftfs [0-9a-f]{7,}(?:-dirty)?"):
        m = re.search(pattern, versions)
        if m:
            bits.append(m.group(0))
    return "; ".join(bits)


def parse(text: str) -> list[Panel]:
    panels: list[Panel] = []
    heading = ""
    meta: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading, meta = plain(line[3:]), {}
        m = re.match(r"- (machine|versions): (.*)", line)
        if m:
            meta[m.group(1)] = m.group(2).strip()
        head = cells(line) if line.lstrip().startswith("|") else []
        if len(head) > 2 and head[0] == "workload" and head[1] == "native":
            ratio_at = next((k for k, h in enumerate(head) if "÷" in h), len(head))
            peers = head[2:ratio_at]
            # the table's own "PEER ÷ native" column where it has one (computed from the
            # unrounded medians), else the ratio of the two printed times
            ratio_col = {h.split("÷")[0].strip(): k for k, h in enumerate(head)
                         if re.fullmatch(r"\S+ ÷ native", h)}
            panel = Panel(heading or "results", subtitle_of(meta), peers)
            i += 2  # the header and its |---| line
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                row = cells(lines[i])
                extra = len(row) - len(head)  # a workload with an unescaped | in it
                if extra > 0:
                    row = [" | ".join(row[:extra + 1])] + row[extra + 1:]
                native = duration_ms(row[1]) if len(row) > 1 else None
                if native:
                    ratios = {}
                    for k, peer in enumerate(peers, start=2):
                        printed = ratio_col.get(peer)
                        r = number(row[printed]) if printed is not None and printed < len(row) else None
                        t = duration_ms(row[k]) if k < len(row) else None
                        if r is None and t is not None:
                            r = t / native
                        if r is not None:
                            ratios[peer] = r
                    panel.rows.append(Row(plain(row[0]), ratios))
                i += 1
            if panel.rows:
                panels.append(panel)
            continue
        i += 1
    return panels


def clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1].rstrip() + "…"


def fmt(ratio: float) -> str:
    return f"{ratio:.2f}"


def svg(panels: list[Panel], source: str) -> str:
    ratios = [r for p in panels for row in p.rows for r in row.ratios.values() if r > 0]
    steps = [m * 10.0 ** e for e in range(-4, 5) for m in (1, 2, 5)]  # 1-2-5 ticks
    lo = max([v for v in steps if v <= min(ratios + [1.0]) / 1.05], default=steps[0])
    hi = min([v for v in steps if v >= max(ratios + [1.0]) * 1.05], default=steps[-1])
    ticks = [v for v in steps if lo <= v <= hi]
    span = math.log10(hi) - math.log10(lo)

    def x(r: float) -> float:
        r = min(max(r, lo), hi)
        return PLOT_X + (math.log10(r) - math.log10(lo)) / span * PLOT_W

    peers: list[str] = []
    for p in panels:
        peers += [q for q in p.peers if q not in peers]
    colour = {}
    spare = iter(SPARE)
    for q in peers:
        colour[q] = COLOURS.get(q) or next(spare, "#888888")

    out: list[str] = []
    y = 64  # below the title and legend
    for p in panels:
        group_h = len(p.peers) * BAR_H + GROUP_GAP
        out.append(f'<text x="10" y="{y + 16}" class="t">{escape(clip(p.title, 125))}</text>')
        if p.subtitle:
            out.append(f'<text x="10" y="{y + 32}" class="s">{escape(clip(p.subtitle, 160))}</text>')
        y += PANEL_HEAD
        plot_top = y
        bars: list[str] = []
        for row in p.rows:
            bars.append(f'<text x="{LABEL_W}" y="{y + len(p.peers) * BAR_H / 2 + 4:.1f}" '
                       f'class="w" text-anchor="end">{escape(row.workload)}</text>')
            for k, peer in enumerate(p.peers):
                r = row.ratios.get(peer)
                if r is None:
                    continue
                x0, x1 = sorted((x(1.0), x(r)))
                by = y + k * BAR_H
                bold = ' class="me"' if peer == "shiftfs" else ""
                bars.append(f'<rect x="{x0:.1f}" y="{by}" width="{max(x1 - x0, 1):.1f}" '
                           f'height="{BAR_H - 1}" fill="{colour[peer]}"><title>{escape(peer)}: '
                           f'{fmt(r)} × native</title></rect>')
                if peer == "shiftfs":
                    tx = x1 + 3 if r >= 1 else x0 - 3
                    anchor = "start" if r >= 1 else "end"
                    bars.append(f'<text x="{tx:.1f}" y="{by + BAR_H - 1}" text-anchor="{anchor}"'
                               f'{bold}>{fmt(r)}</text>')
            y += group_h
        # the axis of this panel (1-2-5 steps and the 1 × native line), under its bars
        for v in ticks:
            gx = x(v)
            out.append(f'<line x1="{gx:.1f}" y1="{plot_top - 4}" x2="{gx:.1f}" y2="{y - GROUP_GAP + 4}" '
                       f'class="{"one" if v == 1 else "grid"}"/>')
            label = f"{v:g} ×" if v != 1 else "1 × native"
            out.append(f'<text x="{gx:.1f}" y="{y + 8}" class="a" text-anchor="middle">{label}</text>')
        out += bars
        y += 14 + PANEL_GAP
    height = y

    legend = []
    lx = 10
    for q in peers:
        legend.append(f'<rect x="{lx}" y="36" width="12" height="10" fill="{colour[q]}"/>'
                      f'<text x="{lx + 16}" y="45" class="w">{escape(q)}</text>')
        lx += 30 + 7 * len(q)
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Verdana, sans-serif">',
        "<style>.t{font-size:12px;font-weight:bold}.s{font-size:10px;fill:#555}"
        ".w{font-size:11px}.a{font-size:9px;fill:#555}.me{font-size:9px;font-weight:bold;fill:#1f5fa8}"
        "text{font-size:9px}.grid{stroke:#ddd}.one{stroke:#333;stroke-width:1.2}</style>",
        f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>',
        f'<text x="10" y="20" class="t">Time ÷ native (log scale; left of the line: faster than '
        f'the tree itself). Drawn by bench/chart.py from {escape(source)}</text>',
        *legend,
    ]
    return "\n".join(head + out + ["</svg>", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="markdown results (bench/results.md)")
    ap.add_argument("--out", type=Path, default=OUT, help="SVG to write (docs/performance.svg)")
    args = ap.parse_args(argv)
    panels = parse(args.results.read_text(encoding="utf-8"))
    if not panels:
        print(f"chart: no '| workload | native | ...' table in {args.results}", file=sys.stderr)
        return 1
    try:
        source = str(args.results.resolve().relative_to(REPO))
    except ValueError:
        source = args.results.name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg(panels, source), encoding="utf-8")
    rows = sum(len(p.rows) for p in panels)
    print(f"chart: {len(panels)} tables, {rows} workloads -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
