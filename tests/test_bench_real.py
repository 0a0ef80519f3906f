"""The benchmark run for real, small: digits checkpoints, an ONNX bundle and an OpenVINO IR bundle, through the CLI."""

import csv
import json
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _tool(name):
    """Import a script of tools/ (not an installed module) by its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"edgekd_tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DESIGN_ROW_KEYS = {"model", "backend", "precision", "device", "batch_size", "top1", "latency_ms", "throughput_ips",
                   "size_mb", "params", "speedup_vs_teacher", "top1_delta_vs_teacher", "status"}


@pytest.fixture(scope="module")
def openvino_bundle(onnx_bundle, tmp_path_factory):
    """An OpenVINO FP32 IR converted from the ONNX bundle (the way docs/bench.md makes one)."""
    from edgekd.export.openvino_ir import onnx_bundle_to_openvino

    out = tmp_path_factory.mktemp("ov") / "student-ov"
    manifest = onnx_bundle_to_openvino(str(onnx_bundle), str(out))
    assert manifest.format == "openvino" and sorted(manifest.files) == ["model.bin", "model.xml"]
    return out


@pytest.fixture(scope="module")
def bench_run(digits_run, onnx_bundle, openvino_bundle, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("bench") / "out"
    proc = cli("bench", digits_run / "teacher.pt", digits_run / "student.pt", onnx_bundle, openvino_bundle,
                   "--batch-sizes", "1,4", "--runs", 6, "--rounds", 2, "--warmup", 2, "--min-time", 0, "--out", out, "--no-progress")
    return out, proc


def test_small_real_run_rows_follow_the_schema(bench_run):
    out, proc = bench_run
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["backend"], r["batch_size"]) for r in rows] == [
        (m, b, n) for m, b in (("teacher", "torch"), ("student", "torch"), ("student-onnx", "onnxruntime"),
                               ("student-ov", "openvino")) for n in (1, 4)]
    for r in rows:
        assert DESIGN_ROW_KEYS <= set(r), DESIGN_ROW_KEYS - set(r)
        assert r["status"] == "ok" and r["device"] == "cpu" and r["precision"] == "fp32" and r["images"] == 360
        lat = r["latency_ms"]
        assert {"p50", "p90", "p99", "mean", "std", "min", "max", "runs"} <= set(lat)
        # 2 rounds of 3 calls; a visit in a slow spell is done again (at most 2x2 extra rounds) and left out.
        kept = [v for v in r["visits"] if v["kept"]]
        assert 1 <= len(kept) <= 2 and len(r["visits"]) <= 2 + 2 * 2 and lat["runs"] == 3 * len(kept)
        assert [v["p50_ms"] for v in kept] == r["round_p50_ms"] and all(len(v["check_ms"]) == 2 for v in r["visits"])
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["throughput_ips"] == pytest.approx(r["batch_size"] * 1000 / lat["mean"])
        assert 0 <= r["top5"] <= 1 and r["top1"] <= r["top5"]
        assert r["first_inference_ms"] > 0 and r["peak_rss_mb"] > 0 and r["threads"] >= 1 and r["params"] > 0
        assert isinstance(r["best"], bool)
    teacher, student, onnx, ov = rows[0], rows[2], rows[4], rows[6]
    assert teacher["speedup_vs_teacher"] == 1.0 and teacher["top1_delta_vs_teacher"] == 0.0
    assert teacher["agreement_vs_teacher"] == 1.0
    # The three runtimes compute the same student in FP32: the same answers on the same images.
    assert student["top1"] == onnx["top1"] == ov["top1"] and student["top5"] == onnx["top5"] == ov["top5"]
    assert ov["runtime_precision"] == "f32" and onnx["agreement_vs_teacher"] == student["agreement_vs_teacher"]
    assert sum(r["best"] for r in rows if r["batch_size"] == 1) <= 1
    env = result["environment"]
    assert {"cpu", "cores", "threads_requested", "platform", "python", "versions", "edgekd", "git_commit",
            "command", "loadavg_start", "loadavg_end"} <= set(env)
    assert env["versions"]["openvino"] and env["versions"]["onnxruntime"]
    assert result["settings"]["batch_sizes"] == [1, 4] and result["settings"]["rounds"] == 2


def test_small_real_run_writes_csv_report_and_plots(bench_run):
    out, proc = bench_run
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8 and rows[0]["model"] == "teacher" and float(rows[0]["p50_ms"]) > 0
    report = (out / "report.md").read_text()
    tables = report.split("**batch size ")
    assert len(tables) == 3 and all(t.split("| teacher |")[0].count("| student") == 0 for t in tables[1:])
    assert "360 held-out images" in report and "Load average" in report and "## Environment" in report
    assert "the slower of 50 ms of untimed calls just before and just after it" in report
    assert "- Slow spells: a visit counts when" in report and "results.json keeps every visit" in report
    best = json.loads((out / "results.json").read_text())["rows"]
    assert report.count("★ best |") == sum(r["best"] for r in best)
    for name in ("accuracy_vs_latency.png", "latency.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"({name})" in report
    assert "| teacher | torch | fp32 | cpu |" in proc.stdout
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_compare_with_an_earlier_run_and_pinned_cpu(bench_run, onnx_bundle, tmp_path, cli):
    old, _ = bench_run
    out = tmp_path / "again"
    first = min(os.sched_getaffinity(0))
    proc = cli("bench", onnx_bundle, "--cpus", first, "--batch-sizes", "1,4", "--runs", 4, "--min-time", 0, "--rounds", 1, "--warmup", 1,
               "--remeasure-slow", 0, "--compare", old / "results.json", "--out", out, "--no-progress")
    assert f"compared with {old / 'results.json'}" in proc.stdout
    assert "only in the earlier run: teacher torch fp32 cpu batch 1" in proc.stdout
    assert "more accurate: none" in proc.stdout and "less accurate: none" in proc.stdout
    assert (out / "compare.md").read_text().strip() in proc.stdout
    assert "Compared with an earlier run" in (out / "report.md").read_text()
    rows = json.loads((out / "results.json").read_text())["rows"]
    # --cpus pins the worker; the threads follow the pinned cores unless --threads says otherwise.
    assert all(r["affinity"] == [first] and r["threads"] == 1 for r in rows)
    # --remeasure-slow 0: no checks, every visit counts.
    assert all(r["visits"] == [{"p50_ms": r["latency_ms"]["p50"], "check_ms": None, "kept": True}] for r in rows)
    assert "Slow spells" not in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["environment"]["cpus_pinned"] == [first]


def test_unavailable_devices_and_backends_become_rows_with_reasons(digits_run, tmp_path, cli):
    import torch

    out = tmp_path / "devices"
    proc = cli("bench", digits_run / "student.pt", "--backends", "torch,onnxruntime,openvino",
               "--device", "cpu,cuda,openvino:GPU", "--runs", 3, "--min-time", 0, "--rounds", 1, "--warmup", 1, "--limit", 50,
               "--out", out, "--no-progress")
    rows = {(r["backend"], r["device"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert len(rows) == 9
    for backend in ("torch", "onnxruntime", "openvino"):
        assert rows[backend, "cpu"]["status"] == "ok", rows[backend, "cpu"]["status"]
    # The checkpoint runs in ONNX Runtime and OpenVINO through an exported ONNX file: the same answers.
    assert rows["torch", "cpu"]["top1"] == rows["onnxruntime", "cpu"]["top1"] == rows["openvino", "cpu"]["top1"]
    assert "torch does not run on openvino:GPU" in rows["torch", "openvino:GPU"]["status"]
    assert "onnxruntime does not run on openvino:GPU" in rows["onnxruntime", "openvino:GPU"]["status"]
    assert "openvino does not run on cuda" in rows["openvino", "cuda"]["status"]
    import openvino as ov

    if "GPU" not in ov.Core().available_devices:
        assert "OpenVINO device GPU is not available here" in rows["openvino", "openvino:GPU"]["status"]
    if not torch.cuda.is_available():
        assert rows["torch", "cuda"]["status"].startswith("CUDA is not available")
        assert "CUDAExecutionProvider" in rows["onnxruntime", "cuda"]["status"]
    for r in rows.values():
        assert r["status"] == "ok" or (r["latency_ms"] is None and r["speedup_vs_teacher"] is None)
    assert "does not run on" in proc.stdout and (out / "latency.png").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rows_are_measured(digits_run, onnx_bundle, tmp_path, cli):
    out = tmp_path / "cuda"
    cli("bench", digits_run / "student.pt", "--device", "cuda", "--runs", 5, "--rounds", 1, "--out", out, "--no-progress")
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["status"] == "ok" and row["gpu"] and row["gpu_peak_mb"] > 0


def test_harness_overhead_script_reports_a_ratio(onnx_bundle):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "overhead.py"), str(onnx_bundle), "--batch-sizes", "1,4",
                           "--runs", "20", "--warmup", "2", "--repeats", "1", "--limit", "50", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["batch_size"] for r in rows] == [1, 4]
    for r in rows:
        assert r["runs_each"] == 20 and r["ratio"] == pytest.approx(r["harness_p50_ms"] / r["bare_p50_ms"])


def test_spells_script_watches_a_bare_loop_over_time(onnx_bundle, tmp_path):
    import subprocess
    import sys

    summarize_series = _tool("spells").summarize_series

    plot = tmp_path / "spells.png"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "spells.py"), str(onnx_bundle), "--seconds", "1",
                           "--window", "0.1", "--threads", "1,2", "--plot", str(plot), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert sorted(out["series"]) == ["1", "2"] and [s["threads"] for s in out["summary"]] == [1, 2]
    assert all(len(v) >= 2 and min(v) > 0 for v in out["series"].values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The summary on a known series: fastest 1.0; 1.3 and 1.5 are slow (> 1.15), the longest spell two windows.
    (s,) = summarize_series({1: [1.0, 1.1, 1.3, 1.5, 1.0]}, tolerance=0.15, window=0.5)
    assert (s["fastest_ms"], s["median_ms"], s["slowest_ms"], s["slow_share"], s["longest_spell_s"]) == (
        1.0, 1.1, 1.5, 0.4, 1.0)


# (bench options, what the one-line error says)
BAD_OPTIONS = [
    (["--batch-sizes", "1,0"], "expected a comma-separated list of positive whole numbers"),
    (["--backends", "tensorrt"], "unknown bench backend 'tensorrt'"),
    (["--cpus", "4096"], "names CPUs this process cannot use"),
    (["--compare", "/no/such/results.json"], "does not exist"),
    (["--device", "cpu,gpu"], "unknown device 'gpu'"),
    (["--remeasure-slow", "-5"], "expected a number of 0 or more, got '-5'"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS, ids=[" ".join(args) for args, _ in BAD_OPTIONS])
def test_bad_bench_options_are_one_line_errors(args, message, digits_run, tmp_path, cli_main, one_line_error):
    one_line_error(cli_main("bench", digits_run / "student.pt", *args, "--out", tmp_path / "o"), message)
    assert not (tmp_path / "o").exists()
