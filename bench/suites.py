"""The suites `python -m bench` runs, in the report's order, and how one is run safely.

Each suite is a module of bench/ with `section(quick: bool) -> compose.Section`: it measures at
report-sized settings (or, quick, a smoke run's) and returns its tables, its "how measured"
text and its headline rows. A suite that needs root (network namespaces, tc) is skipped with the
reason where it cannot make them; a suite that fails becomes a section and a headline row saying
so, and the others still run.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from dataclasses import dataclass

from .compose import Section, failed_row, skipped_row


@dataclass(frozen=True)
class Suite:
    name: str  # bench.<module>, and the name --only/--skip take
    title: str
    area: str  # where its failure shows in the headline table
    needs_root: bool = False


SUITES = (
    Suite("same_host", "Same host", "same host"),
    Suite("two_host", "Two hosts", "two hosts", needs_root=True),
    Suite("sharded", "Sharding", "sharding", needs_root=True),
    Suite("gpu_check", "GPU", "GPU"),
    Suite("concurrency", "Concurrency", "same host"),
    Suite("bulk_hostile", "Bulk channel against slow and silent peers", "same host"),
    Suite("tls", "TLS cost", "same host"),
    Suite("transfer_memory", "Transfer memory", "same host"),
    Suite("worker_memory", "Worker memory", "same host"),
    Suite("cpu_per_byte", "CPU per byte", "same host"),
    Suite("overlap", "Overlap", "same host"),
    Suite("compression", "Convergence over each wire format", "same host"),
)


def _root_problem() -> str | None:
    from .two_host import namespace_problem

    return namespace_problem()


def run_suite(suite: Suite, quick: bool) -> Section:
    """The suite's section; skipped or failed ones as a section saying so, with a headline row."""
    if suite.needs_root and (problem := _root_problem()):
        reason = f"needs root for network namespaces and tc ({problem})"
        return Section(
            suite.title, f"Not run: {reason}.", rows=[skipped_row(suite.area, suite.title, reason)]
        )
    t0 = time.perf_counter()
    print(f"[bench] {suite.name} ...", file=sys.stderr, flush=True)
    try:
        module = importlib.import_module(f"bench.{suite.name}")
        sec: Section = module.section(quick)
    except (Exception, SystemExit) as exc:
        traceback.print_exc()
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        return Section(
            suite.title, f"Failed: {error}", rows=[failed_row(suite.area, suite.title, error)]
        )
    secs = time.perf_counter() - t0
    print(f"[bench] {suite.name}: {secs:.0f} s", file=sys.stderr, flush=True)
    sec.run = (sec.run + f" This suite took {secs:.0f} s.").strip()
    return sec
