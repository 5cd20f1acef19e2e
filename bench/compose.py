"""The parts of BENCHMARKS.md and how they become one report.

Every suite returns a `Section`: its title, what was run, its tables and notes, how each figure is
measured, and its rows of the headline table (`Row`). `render` puts a whole run together: title,
when, the command, wall time, machine and versions once, the headline table, then the sections.
Nothing here measures anything; every figure comes from the sections handed in.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DASH = "—"


@dataclass
class Row:
    """One line of the headline table: a figure, adamd's value beside its peer's (or the ceiling)
    and the limit, their ratio, the target and whether this run met it."""

    area: str
    figure: str
    ours: str = DASH
    peer: str = DASH
    limit: str = DASH
    ratio: str = DASH
    target: str = DASH
    verdict: str = DASH


def judged(
    area: str,
    figure: str,
    ours: str,
    peer: str,
    limit: str,
    ratio: float | None,
    target: str,
    ok: Callable[[float], bool] | None,
) -> Row:
    """A row whose verdict is computed: `ok(ratio)` (no target when `ok` is None)."""
    if ratio is None:
        return Row(area, figure, ours, peer, limit, DASH, target, "not measured")
    verdict = DASH if ok is None else ("met" if ok(ratio) else "**NOT met**")
    return Row(area, figure, ours, peer, limit, f"{ratio:.2f}x", target, verdict)


def at_most(limit: float) -> Callable[[float], bool]:
    return lambda x: x <= limit


def at_least(limit: float) -> Callable[[float], bool]:
    return lambda x: x >= limit


def failed_row(area: str, suite: str, error: str) -> Row:
    return Row(area, suite, verdict=f"failed: {error}")


def skipped_row(area: str, suite: str, reason: str) -> Row:
    return Row(area, suite, verdict=f"not measured: {reason}")


@dataclass
class Section:
    """A suite's part of the report. `run`: what was run (settings); `body`: markdown lines
    (tables, target lines, reasons); `how`: how each figure is measured (markdown lines)."""

    title: str
    run: str = ""
    body: list[str] = field(default_factory=list)
    how: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def markdown(self, level: int = 2) -> str:
        md = [f"{'#' * level} {self.title}", ""]
        if self.run:
            md += [self.run, ""]
        md += self.body
        if self.how:
            md += ["", f"{'#' * (level + 1)} How it is measured", "", *self.how]
        return "\n".join(md).rstrip() + "\n"


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


HEADLINE_HEAD = (
    "area",
    "figure",
    "adamd",
    "peer or ceiling",
    "limit",
    "ratio",
    "target",
    "verdict",
)


def headline(rows: Sequence[Row]) -> list[str]:
    return table(
        HEADLINE_HEAD,
        [(r.area, r.figure, r.ours, r.peer, r.limit, r.ratio, r.target, r.verdict) for r in rows],
    )


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    ram = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    import torch

    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "os": platform.platform(),
        "torch threads": str(torch.get_num_threads()),
        "CUDA": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "grpcio", "protobuf", "adamd"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Run:
    """One `python -m bench` run: what it was, and what every suite returned."""

    command: str
    started: str  # UTC
    wall_s: float
    sections: list[Section]
    load_start: str = ""
    load_end: str = ""
    machine: dict[str, str] = field(default_factory=machine_info)
    versions: dict[str, str] = field(default_factory=versions)


def render(run: Run) -> str:
    rows = [r for s in run.sections for r in s.rows]
    md = [
        "# adamd benchmarks",
        "",
        f"Generated by `{run.command}` on {run.started}, wall time {run.wall_s:.0f} s; every"
        " figure below is from this one run (nothing is carried over from earlier runs), but"
        " for the GPU section's, which `make gpu-check` measured on the CUDA machine and date"
        " it names, where it has any. The machine is shared and noisy: compare the figures side"
        " by side within this file.",
        "",
        "## Machine and versions",
        "",
        *[f"- {k}: {v}" for k, v in run.machine.items()],
        "- versions: " + ", ".join(f"{k} {v}" for k, v in run.versions.items()),
        f"- load average (1, 5, 15 min) at the start: {run.load_start}; at the end: {run.load_end}",
        "",
        "## Headline",
        "",
        "Each figure beside its peer (a live contender measured in the same run) or its ceiling,"
        " and its limit where one exists; *ratio* is adamd's over the peer's (times: < 1 is"
        " faster; throughputs and memory as stated in the figure).",
        "",
        *headline(rows),
        "",
        "Contents: " + "; ".join(s.title for s in run.sections) + ".",
        "",
    ]
    return "\n".join(md) + "\n" + "\n".join(s.markdown() for s in run.sections)
