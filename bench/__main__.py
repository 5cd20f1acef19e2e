"""`python -m bench`: run every benchmark suite and write BENCHMARKS.md from scratch.

One run, one report: the headline table (same host, two hosts, sharding, GPU when a CUDA result
exists), then one section per suite with its tables and how each figure is measured. The suites
are listed in bench/suites.py; `--quick` is a smoke run of every one (a minute or two), `--only`
and `--skip` choose among them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .compose import Run, load_average, render
from .suites import SUITES, run_suite


def build_parser() -> argparse.ArgumentParser:
    names = ",".join(s.name for s in SUITES)
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run of every suite (tiny sizes)")
    p.add_argument(
        "--out", type=Path, default=Path("BENCHMARKS.md"), help="report file (BENCHMARKS.md)"
    )
    p.add_argument("--only", default="", help=f"suites to run, comma-separated, of {names}")
    p.add_argument("--skip", default="", help="suites not to run, comma-separated")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    unknown = (only | skip) - {s.name for s in SUITES}
    if unknown:
        raise SystemExit(f"unknown suite(s) {sorted(unknown)}; known: {[s.name for s in SUITES]}")
    suites = [s for s in SUITES if (not only or s.name in only) and s.name not in skip]
    given = argv if argv is not None else sys.argv[1:]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start, t0 = load_average(), time.perf_counter()
    sections = [run_suite(s, args.quick) for s in suites]
    run = Run(
        command=("python -m bench " + shlex.join(given)).strip(),
        started=started,
        wall_s=time.perf_counter() - t0,
        sections=sections,
        load_start=load_start,
        load_end=load_average(),
    )
    args.out.write_text(render(run))
    failed = [r.figure for s in sections for r in s.rows if r.verdict.startswith("failed")]
    print(f"wrote {args.out} ({run.wall_s:.0f} s)", file=sys.stderr)
    if failed:
        print(
            f"{len(failed)} suite(s) failed: {', '.join(failed)}; see {args.out}", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
