"""Smoke test of the benchmark harness (bench/): its measurements run on a tiny model and the
report it writes carries numbers. The timings themselves are not checked (the machine is noisy)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import adamd_runs, raw_grpc, report
from bench.common import FP32, best_of, parse_size

ROOT = Path(__file__).resolve().parents[2]
N = 100_000


def test_parse_size() -> None:
    assert parse_size("100k") == 100_000
    assert parse_size("25M") == 25_000_000
    assert parse_size("1e6") == 1_000_000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_measurements_and_report(tmp_path: Path) -> None:
    size = report.SizeResult(N)
    with raw_grpc.raw_server() as c:
        size.raw_push = best_of(lambda: c.push(FP32 * N), 1)
        size.raw_pull = best_of(lambda: c.pull(FP32 * N), 1)
    size.adamd = adamd_runs.measure_over_service(N, 1)
    size.step = adamd_runs.measure_server_step(N, 1)
    assert size.adamd.errors == []
    assert size.adamd.push_full and size.adamd.push_transport and size.adamd.pull
    assert "default" in size.adamd.remote_adam
    assert size.adamd.server_peak and size.adamd.server_peak >= (size.adamd.server_idle_rss or 0)
    assert size.step.server_step > 0 and size.step.local_fused > 0

    text = report.render(report.RunResult([size], reps=1, command="test"))
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(text)
    ratio_rows = [line for line in text.splitlines() if line.startswith("| 100k |")]
    assert len(ratio_rows) == 2  # one in the ratio table, one in the figures table
    assert re.search(r"\| 100k \| \d+\.\d\dx \|", text)
    assert "## Targets" in text and "## Machine and versions" in text


@pytest.mark.slow
def test_cli_quick(tmp_path: Path) -> None:
    out = tmp_path / "B.md"
    subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--sizes", "100k", "--out", str(out)],
        cwd=ROOT,
        check=True,
        timeout=240,
        capture_output=True,
    )
    text = out.read_text()
    assert re.search(r"\| 100k \| \d+\.\d\dx \|", text)
    assert "| 2 |" in text  # sync scaling with 2 workers ran
    assert "## Errors during the run" not in text


def test_report_keeps_sections_other_harnesses_own() -> None:
    text = report.put_section("# report\n", "concurrency", "## Concurrency\nfigures")
    assert report.kept_sections(text) == [
        "<!-- begin concurrency -->\n## Concurrency\nfigures\n<!-- end concurrency -->"
    ]
    again = report.put_section(text, "concurrency", "## Concurrency\nnew figures")
    assert again.count("<!-- begin concurrency -->") == 1 and "new figures" in again


@pytest.mark.slow
def test_concurrency_quick() -> None:
    """Many sync workers as aio coroutines, and stalled streams ended by the idle deadline."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.concurrency", "--quick"],
        cwd=ROOT,
        check=True,
        timeout=240,
        capture_output=True,
        text=True,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    sync, stalled = rows[0]["sync"], rows[1]["stalled"]
    assert sync["partial_replies"] == 0 and sync["versions_reached"] == sync["rounds"]
    assert stalled["stalled_ended"] == {"DEADLINE_EXCEEDED": stalled["streams"]}


def test_tls_cost_writes_its_section(tmp_path: Path) -> None:
    """bench.tls against a plaintext and a TLS server: a table with figures for both, in its
    own section of the report (which `python -m bench` keeps)."""
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# report\n")
    subprocess.run(
        [sys.executable, "-m", "bench.tls", "--size", "100k", "--reps", "1", "--out", str(out)],
        cwd=ROOT,
        check=True,
        timeout=240,
        capture_output=True,
    )
    text = out.read_text()
    (block,) = report.kept_sections(text)
    assert block.startswith("<!-- begin tls -->") and "Load average" in block
    rows = re.findall(
        r"^\| (push \(transport\)|push \(full\)|pull) \| ([\d.]+) \| ([\d.]+) \|", text, re.M
    )
    assert [r[0] for r in rows] == ["push (transport)", "push (full)", "pull"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def test_two_host_quick(tmp_path: Path) -> None:
    """bench.two_host on tiny sizes across a network-namespace pair (tc-shaped, the 10gbe variant):
    a step row and a training row with figures for every contender, in its own report section, and
    no namespace left behind."""
    from bench import two_host

    problem = two_host.namespace_problem()
    if problem:
        pytest.skip(f"cannot make network namespaces here: {problem}")
    # Its namespaces carry its process id (runs never clash): this process's, when imported here.
    assert (
        f"adxh{os.getpid()}s",
        f"adxh{os.getpid()}w",
    ) == (two_host.SERVER_NS, two_host.WORKER_NS)
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# report\n")
    bench = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.two_host",
            "--quick",
            "--variants",
            "10gbe",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    bench_pid = bench.pid
    _, err = bench.communicate(timeout=300)
    assert bench.returncode == 0, err[-3000:]
    text = out.read_text()
    (block,) = report.kept_sections(text)
    assert block.startswith("<!-- begin two-host -->") and "Errors during the run" not in block
    step_rows = re.findall(
        r"^\| 10gbe \| (adamd [^|]+|torch RPC) \| \d+ \(\d+\) \| ([\d.]+) \| [\d.]+x \| [\d.]+x \|",
        text,
        re.M,
    )
    assert [r[0].strip() for r in step_rows] == list(two_host.CONTENDERS_STEP)
    assert all(float(r[1]) > 0 for r in step_rows)  # bytes on the wire, measured
    assert re.search(
        r"^\| 10gbe \| adamd bf16 \| \d+ \| \d+ \| \d+ \| [+-]\d+% \| [+-]\d+% \|", text, re.M
    )
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(rf"^adxh{bench_pid}[sw]\b", netns, re.M)  # its own, named by its pid


def test_sharded_quick() -> None:
    """bench.sharded on tiny sizes: 1 and 2 servers on their own network hosts, tc-limited and
    not, a row with figures for each, and no namespace of its own left behind."""
    from bench import two_host

    problem = two_host.namespace_problem()
    if problem:
        pytest.skip(f"cannot make network namespaces here: {problem}")
    tiny = ["--params", "200k", "--steps", "1", "--servers", "1,2", "--workers", "2"]
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench.sharded", *tiny, "--rate", "100mbit"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = bench.communicate(timeout=300)
    assert bench.returncode == 0, err
    rows = re.findall(r"^\| ([12]) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2", "1", "2"], out  # throttled, then not
    assert all(float(r[2]) > 0 for r in rows)
    # Its namespaces are named after its pid (other runs, or the netns tests, have their own).
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(rf"^adsh{bench.pid % 100000}[sw]", listed, re.M), listed
