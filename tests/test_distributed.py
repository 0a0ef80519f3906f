"""Distillation across processes: torchrun with gloo on CPU, as a user runs it; the CUDA path where a GPU is."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from edgekd.core.train_loop import cuda_speedups

# Short but converging: 12 epochs of digits bring the student near its ceiling, where two runs
# that differ only in how the batches were shuffled land within a point or so of each other.
def distill_args(epochs=12):
    return ["distill", "--student", "compact-student", "--loss", "kd", "--alpha", "0.5", "--epochs", epochs,
            "--batch-size", 64, "--no-progress"]


DISTILL = distill_args()
EXPECTED_FILES = {"config.yaml", "metrics.json", "student.pt", "student.state.pt"}


def _torchrun(nproc, args, log_dir=None):
    """The command a user types, `torchrun --standalone --nproc_per_node N -m edgekd ARGS`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    if log_dir is not None:  # one stdout/stderr file per rank, to see who printed what
        cmd += ["--log-dir", str(log_dir), "--redirects", "3"]
    return cmd + ["-m", "edgekd", *map(str, args)]


def _run(cmd, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _rank_logs(log_dir, rank):
    """(stdout, stderr) of one rank from torchrun's --log-dir tree (run id/attempt_0/RANK/std*.log)."""
    outs = list(log_dir.rglob(f"attempt_*/{rank}/stdout.log"))
    assert len(outs) == 1, f"expected one stdout log for rank {rank}, found {outs}"
    return outs[0].read_text(), (outs[0].parent / "stderr.log").read_text()


@pytest.mark.slow  # two torchrun jobs of 12 epochs: over a minute on 2 cores
def test_two_processes_match_one_and_only_rank_0_writes(tmp_path, digits_run, cli):
    teacher = digits_run / "teacher.pt"
    alone, ddp, logs = tmp_path / "alone", tmp_path / "ddp", tmp_path / "logs"
    cli(*DISTILL, "--teacher", teacher, "--threads", 1, "--out", alone)
    _run(_torchrun(2, [*DISTILL, "--teacher", teacher, "--out", ddp], log_dir=logs))

    one, two = (json.loads((d / "metrics.json").read_text()) for d in (alone, ddp))
    dist = two["distributed"]
    # Both ranks ran, each on its own half of every epoch (DistributedSampler: ceil(N / 2) images).
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert dist["global_batch"] == 64 and dist["per_process_batch"] == 32
    assert [r["rank"] for r in dist["ranks"]] == [0, 1] and len({r["pid"] for r in dist["ranks"]}) == 2
    per_epoch = -(-two["train_data"]["train_images"] // 2)
    assert [r["train_images_seen"] for r in dist["ranks"]] == [per_epoch * 12] * 2
    assert one["distributed"]["world_size"] == 1

    # The same global batch gives the same accuracy, within 2 points, on all 360 test images.
    assert abs(two["test_top1"] - one["test_top1"]) <= 0.02, (one["test_top1"], two["test_top1"])
    assert one["test_top1"] > 0.8  # both actually learned: the comparison is not between two failures

    # Only rank 0 wrote: the run folder holds one run's files, and rank 1 printed nothing.
    # besides the run's files only edgekd's marker and lock (edgekd.outdir), nothing from rank 1
    assert {p.name for p in ddp.iterdir()} - {".edgekd", ".edgekd.lock"} == EXPECTED_FILES
    out0, _ = _rank_logs(logs, 0)
    out1, err1 = _rank_logs(logs, 1)
    assert "student compact-student 12/12" in out0 and "-> " in out0
    assert out1.strip() == "" and "12/12" not in err1


def _descendants(pid):
    """Every process below ``pid`` (torchrun starts its workers in their own sessions, so killpg misses them)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                kids = []
            found += kids
            queue += kids
    return found


@pytest.mark.slow  # a killed torchrun job and its resume
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers through /proc (Linux)")
def test_a_killed_two_process_run_resumes_under_torchrun(tmp_path, digits_run):
    import time

    out, cache = tmp_path / "run", tmp_path / "cache"
    args = [*distill_args(epochs=6), "--teacher", digits_run / "teacher.pt", "--teacher-cache", cache, "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_torchrun(2, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = out / "student.state.pt"
    deadline = time.monotonic() + 600
    while True:
        assert time.monotonic() < deadline, "no end-of-epoch state appeared"
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
        try:
            if state.exists() and torch.load(state, weights_only=True)["epoch"] >= 1:
                break
        except Exception:  # being replaced this instant
            pass
        time.sleep(0.05)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # the whole job, mid-run, as a lost machine would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
    assert not (out / "student.pt").exists() and not (out / "metrics.json").exists()
    before = torch.load(state, weights_only=True)["history"]

    _run(_torchrun(2, ["distill", "--resume", out]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5, 6]
    # Continued, not restarted: the epochs done before the kill are kept as they were (timings included).
    assert 1 <= len(before) < 6 and metrics["history"][:len(before)] == before
    assert metrics["distributed"]["world_size"] == 2
    assert metrics["teacher_cache"] is not None and len(list(cache.iterdir())) == 1
    assert metrics["test_top1"] > 0.5


def test_global_batch_must_split_evenly(tmp_path, cli_main, monkeypatch):
    for name, value in (("WORLD_SIZE", "3"), ("RANK", "0"), ("LOCAL_RANK", "0")):  # rank 0 of a torchrun job of 3
        monkeypatch.setenv(name, value)
    proc = cli_main("distill", "--batch-size", "64", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--batch-size 64 is the global batch and must split evenly over the 3 processes" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_amp_needs_cuda(tmp_path, cli_main):
    proc = cli_main("train", "--amp", "fp16", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "--amp fp16 needs --device cuda" in proc.stderr


def test_cuda_speedups_resolve_per_device(monkeypatch):
    from edgekd.core.config import TrainOptions as T

    assert cuda_speedups(T(device="cpu")) == (None, False)
    assert cuda_speedups(T(device="cpu", channels_last="on")) == (None, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cuda_speedups(T(device="cuda")) == (torch.bfloat16, True)
    assert cuda_speedups(T(device="cuda:1", amp="off", channels_last="off")) == (None, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a T4: fp16 + scaler
    assert cuda_speedups(T(device="cuda")) == (torch.float16, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_cuda_amp_channels_last_distill(tmp_path, digits_run, cli):
    out = tmp_path / "cuda"
    cli("distill", "--teacher", digits_run / "teacher.pt", "--device", "cuda", "--epochs", 3, "--out", out,
        "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"]["ranks"][0]["device"].startswith("cuda")
    assert metrics["test_top1"] > 0.5
    ckpt = torch.load(out / "student.pt", weights_only=True)  # saved for CPU loading, whatever it trained on
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())


@pytest.mark.slow  # compiling takes about a minute on 2 cores
def test_compiled_student_trains_under_torchrun_and_saves_a_plain_checkpoint(tmp_path, digits_run):
    out = tmp_path / "compiled"
    _run(_torchrun(2, [*distill_args(epochs=1), "--teacher", digits_run / "teacher.pt", "--compile", "--out", out]))
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["state_dict"])  # no wrapper prefixes
    assert json.loads((out / "metrics.json").read_text())["distributed"]["world_size"] == 2
