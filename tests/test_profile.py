"""edgekd bench --profile: where the time goes, per operator, in ONNX Runtime and OpenVINO rows."""

import json

import pytest


@pytest.mark.slow  # an INT8 export and a bench run, twice
def test_bench_profile_records_per_operator_times(digits_run, onnx_bundle, tmp_path, cli):
    ov = tmp_path / "student-ov-int8"
    cli("export", digits_run / "student.pt", "--format", "openvino", "--precision", "int8", "--calib-size", 50,
        "--val-size", 100, "--max-drop", 100, "--no-speed-check", "--out", ov, "--no-progress")
    out = tmp_path / "bench"
    cli("bench", digits_run / "teacher.pt", onnx_bundle, ov, "--profile", "--quick", "--limit", 200, "--out", out,
        "--no-progress")
    rows = {r["backend"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"torch", "onnxruntime", "openvino"}
    assert rows["torch"]["profile"] is None and "ONNX Runtime and OpenVINO" in rows["torch"]["profile_note"]
    for backend in ("onnxruntime", "openvino"):
        p = rows[backend]["profile"]
        assert p["runtime"] == backend and p["total_ms"] > 0 and p["runs"] > 0
        assert p["by_type"] and all(t["op_type"] and t["ms"] > 0 and t["precision"] for t in p["by_type"])
        assert any("Conv" in t["op_type"] for t in p["by_type"])  # Conv / FusedConv / Convolution
        assert abs(sum(t["share"] for t in p["by_type"]) - 1) < 0.01
        assert p["by_layer"] and all(x["name"] and x["precision"] for x in p["by_layer"])
    assert rows["onnxruntime"]["profile"]["precision_share"].get("fp32", 0) > 0.5
    assert rows["openvino"]["profile"]["precision_share"].get("int8", 0) > 0  # the INT8 IR ran int8 kernels
    convs = [x for x in rows["openvino"]["profile"]["by_layer"] if x["op_type"] == "Convolution"]
    assert convs and all(x["precision"] == "int8" and x["exec_type"].upper().endswith("I8") for x in convs)
    report = (out / "report.md").read_text()
    section = report.split("## Where the time goes")[1]
    assert "student-onnx** (onnxruntime, fp32" in section and "student-ov-int8** (openvino, int8" in section
    assert "int8" in section.split("student-ov-int8**")[1].splitlines()[0]
    assert "![time share by operator type](profile.png)" in report
    assert (out / "profile.png").stat().st_size > 1000

    plain = tmp_path / "plain"
    cli("bench", onnx_bundle, "--quick", "--limit", 50, "--runs", 5, "--out", plain, "--no-progress")
    result = json.loads((plain / "results.json").read_text())
    assert result["settings"]["profile"] is False and not any("profile" in r for r in result["rows"])
    assert "Where the time goes" not in (plain / "report.md").read_text() and not (plain / "profile.png").exists()
