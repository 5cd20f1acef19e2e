"""Smoke test of the benchmark harness (bench/): its measurements run on a tiny model and the
report it writes carries numbers computed in the run. The timings themselves are not checked
(the machine is noisy)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import adamd_runs, compose, gpu_check, raw_grpc, same_host, two_host
from bench.common import FP32, best_of, parse_size
from bench.suites import SUITES, Suite, run_suite

ROOT = Path(__file__).resolve().parents[2]
N = 100_000


def test_parse_size() -> None:
    assert parse_size("100k") == 100_000
    assert parse_size("25M") == 25_000_000
    assert parse_size("1e6") == 1_000_000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_measurements_and_report(tmp_path: Path) -> None:
    size = same_host.SizeResult(N)
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

    result = same_host.RunResult([size], reps=1)
    section = same_host.to_section(result, same_host.QUICK)
    text = compose.render(compose.Run("test", "now", 1.0, [section]))
    (tmp_path / "BENCHMARKS.md").write_text(text)
    assert text.index("## Headline") < text.index("## Same host")
    # push and pull against the ceiling, the step against local fused Adam: computed ratios
    for figure in ("push_grad (transport)", "pull(out=)", "server Adam step"):
        assert re.search(
            rf"^\| same host \| {re.escape(figure)}[^|]* \| [\d.]+ (GB/s|ms) \| [\d.]+ .*"
            r"\| \d+\.\d\dx \| [<>]= [\d.]+x \| (met|\*\*NOT met\*\*) \|$",
            text,
            re.M,
        ), figure
    assert re.search(r"^\| 100k \| \d+\.\d\dx \|", text, re.M)  # the ratio table
    assert "## Machine and versions" in text and "### How it is measured" in text


HEADLINE_ROW = re.compile(r"^\| (same host|two hosts|sharding|GPU) \| ([^|]+) \|(.*)\|$", re.M)


@pytest.mark.slow
def test_cli_quick(tmp_path: Path) -> None:
    """`python -m bench --quick`: every suite in one run, one report written from scratch, with a
    headline table of computed rows."""
    out = tmp_path / "B.md"
    out.write_text("<!-- begin stale -->\nold figures\n<!-- end stale -->\n")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "old figures" not in text and "<!-- begin" not in text
    assert text.startswith("# adamd benchmarks\n") and "python -m bench --quick" in text
    rows = HEADLINE_ROW.findall(text)
    areas = {area for area, _, _ in rows}
    assert {"same host", "GPU"} <= areas, rows
    assert not [r for r in rows if "failed:" in r[2]], rows
    computed = [r for r in rows if re.search(r"\| \d+\.\d\dx \|", r[2])]
    assert len(computed) >= 6, rows  # same host's at least, with ratios from this run
    if two_host.namespace_problem() is None:  # as root: across namespaces too
        assert {"two hosts", "sharding"} <= {r[0] for r in computed}, rows
    for suite in SUITES:
        assert f"## {suite.title}" in text or suite.name in ("two_host", "sharded", "gpu_check")


def test_gpu_section_from_a_result_file(tmp_path: Path) -> None:
    """The GPU section comes only from a gpu_check result file, labelled with its machine and
    date; without one, a headline row says it was not measured here."""
    missing = gpu_check.section(path=tmp_path / "none.json")
    assert [r.verdict for r in missing.rows] == [
        f"not measured: no CUDA device on {platform.node() or 'this machine'}"
    ]
    result = tmp_path / "gpu_check.json"
    figures = {"replay": 0.001, "eager": 0.0012, "local": 0.0011, "with_upload": 0.2}
    record: dict[str, object] = {"device": "NVIDIA H100", "host": "gpu-host"}
    record["measured"] = "2026-12-01 10:00 UTC"
    record |= {"seconds": 30, "torch": "2.13.0", "cuda": "12.8", "python": "3.11.7"}
    record |= {"params": 100_000_000, "copy_bandwidth": 3.0e12, "nominal_hbm": 3.35e12}
    result.write_text(json.dumps(record | figures | {"upload_bytes": 400_000_000}))
    section = gpu_check.section(path=result)
    (row,) = section.rows
    assert "NVIDIA H100 on gpu-host, 2026-12-01 10:00 UTC" in row.figure
    assert (row.ours, row.ratio) == ("1.000 ms", "0.91x")  # replay / local fused, from the file
    assert "0.93" in section.markdown()  # 28 B/param x 100M at 3 TB/s = 0.933 ms: 0.93 of it


def test_a_failing_suite_is_reported_and_the_others_run() -> None:
    broken = Suite("no_such_suite", "Broken", "same host")
    section = run_suite(broken, quick=True)
    (row,) = section.rows
    assert row.verdict.startswith("failed: ModuleNotFoundError")
    gpu = run_suite(next(s for s in SUITES if s.name == "gpu_check"), quick=True)
    assert gpu.rows and gpu.rows[0].area == "GPU"


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


def test_tls_cost_prints_its_section() -> None:
    """bench.tls against a plaintext and a TLS server: a table with figures for both."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.tls", "--size", "100k", "--reps", "1"],
        cwd=ROOT,
        check=True,
        timeout=240,
        capture_output=True,
        text=True,
    )
    text = done.stdout
    assert text.startswith("## TLS cost") and "### How it is measured" in text
    rows = re.findall(
        r"^\| (push \(transport\)|push \(full\)|pull) \| ([\d.]+) \| ([\d.]+) \|", text, re.M
    )
    assert [r[0] for r in rows] == ["push (transport)", "push (full)", "pull"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def test_two_host_quick() -> None:
    """bench.two_host on tiny sizes across a network-namespace pair (tc-shaped, the 10gbe variant):
    a step row and a training row with figures for every contender, in the section it prints, and
    no namespace left behind."""
    problem = two_host.namespace_problem()
    if problem:
        pytest.skip(f"cannot make network namespaces here: {problem}")
    # Its namespaces carry its process id (runs never clash): this process's, when imported here.
    assert (
        f"adxh{os.getpid()}s",
        f"adxh{os.getpid()}w",
    ) == (two_host.SERVER_NS, two_host.WORKER_NS)
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench.two_host", "--quick", "--variants", "10gbe"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    bench_pid = bench.pid
    text, err = bench.communicate(timeout=300)
    assert bench.returncode == 0, err[-3000:]
    assert text.startswith("## Two hosts") and "Errors during the run" not in text
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
