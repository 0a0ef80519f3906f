"""edgekd fit: the budget, the space, and real tiny fits (digits, compact students, 1 epoch, 2 trials) through the
CLI as a subprocess: a bundle within the budget, teacher passes = images x views, the latency table reused, a budget
nobody meets, resume after a kill, an SSH device, and two workers on a real PostgreSQL server."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from edgekd import EdgeKDError
from edgekd.fit.budget import parse_budget
from edgekd.fit.space import Space, default_space, load_space

SPACE = "students: [compact-student-s, compact-student]\ninput_sizes: [32]\nprecisions: [fp32]\nruntimes: [onnxruntime]\n"
SUBSET = 200  # train images of every trial: the teacher runs SUBSET x views times for the whole fit


def test_budget_parses_and_refuses():
    b = parse_budget("p50_ms<=5, size_mb<4,top1>=0.9")
    assert [str(x) for x in b.limits] == ["p50_ms<=5", "size_mb<4", "top1>=0.9"]
    assert b.misses({"p50_ms": 4.0, "size_mb": 3.0, "top1": 0.95}) == {}
    assert set(b.misses({"p50_ms": float("nan"), "size_mb": 4.0, "top1": 0.95})) == {"p50_ms", "size_mb"}
    assert b.misses({"p50_ms": 6.0, "size_mb": 1.0, "top1": 0.5}) == {"p50_ms": 1.0, "top1": pytest.approx(0.4)}
    for bad in ("", "p50<=5", "p50_ms=>5", "p50_ms<=nan", "p50_ms<=inf", "top1>=2", "p50_ms>=5", "top1>=0.5",
                "p50_ms<=5,p50_ms<=4", "p50_ms<=-1"):
        with pytest.raises(EdgeKDError, match="accepted: .*p50_ms"):
            parse_budget(bad)


def test_space_default_and_file(tmp_path):
    small = default_space(32, 3)
    assert "resnet20" in small.students and small.input_sizes == [32] and small.precisions == ["fp32", "fp16", "int8"]
    big = default_space(224, 3)
    assert "resnet20" not in big.students and big.input_sizes == [224, 168, 112]
    f = tmp_path / "s.yaml"
    f.write_text("students: [compact-student]\nprecision: [fp32]\n")
    with pytest.raises(EdgeKDError, match="unknown key 'precision'; did you mean 'precisions'"):
        load_space(str(f), small)
    f.write_text("students: []\n")
    with pytest.raises(EdgeKDError, match="search space is empty"):
        load_space(str(f), small)
    f.write_text("students: [compact-studnet]\n")
    with pytest.raises(EdgeKDError, match="did you mean 'compact-student'"):
        load_space(str(f), small)
    f.write_text("input_sizes: [16]\nruntimes: onnxruntime\n")
    s = load_space(str(f), small)
    assert isinstance(s, Space) and s.input_sizes == [16] and s.runtimes == ["onnxruntime"]


def test_short_schedules_are_pruned_by_successive_halving():
    import optuna

    from edgekd.fit.search import _EpochWatch, _Prune, screen_study, storage

    screen = screen_study(storage("sqlite:///:memory:", 0))
    for top1 in (0.8, 0.85, 0.9):  # each the best so far: none is pruned
        good = screen.ask()
        for epoch in (1, 2, 3):
            good.report(top1, epoch)
            assert not good.should_prune()  # the pruner records each rung when it is asked
        screen.tell(good, top1)
    watch = _EpochWatch(screen.ask(), epochs=3)
    record = type("R", (), {"args": ("student", 1, {"test_top1": 0.1})})()
    with pytest.raises(_Prune):
        watch.filter(record)
    last = _EpochWatch(screen.ask(), epochs=1)  # a trial's last epoch is never pruned
    assert last.filter(record) is False and last.history == [0.1]
    assert optuna.__version__


def test_an_emulated_device_is_refused_as_a_latency_basis(monkeypatch):
    from edgekd.bundle import environment
    from edgekd.fit.options import FitOptions
    from edgekd.fit.run import check_device

    monkeypatch.setattr(environment, "_cpuinfo", lambda: "processor\t: 0\nmodel name\t: Cortex-A72 (emulated: qemu)\n")
    with pytest.raises(EdgeKDError, match="runs under qemu emulation: its timings are not latency"):
        check_device(FitOptions(budget="p50_ms<=5"), parse_budget("p50_ms<=5"))


def _fit_args(teacher, space, out, cache, *extra):
    return ["fit", "--teacher", teacher, "--space", space, "--trials", 2, "--epochs-short", 1, "--epochs", 1,
            "--finalists", 1, "--quick", "--threads", 1, "--train-threads", 1, "--train-subset", SUBSET,
            "--latency-cache", cache, "--out", out, *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digits_run):
    d = tmp_path_factory.mktemp("fit")
    (d / "space.yaml").write_text(SPACE)
    return d, str(digits_run / "teacher.pt")


@pytest.fixture(scope="module")
def first_fit(setup, cli):
    d, teacher = setup
    proc = cli(*_fit_args(teacher, d / "space.yaml", d / "f1", d / "lc", "--budget", "p50_ms<=50,size_mb<=5"))
    return d / "f1", proc


def test_fit_returns_a_bundle_within_the_budget(first_fit):
    out, proc = first_fit
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("trial ") and "min left" in line for line in lines) == 2, proc.stdout
    summary = json.loads((out / "trials.json").read_text())
    w = summary["winner"]
    assert w["measured"]["p50_ms"] <= 50 and w["measured"]["size_mb"] <= 5 and w["status"] == "ok"
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["validation"]["top1_agreement"] > 0.99
    for name in ("report.md", "trials.csv", "pareto.png", "latency.json"):
        assert (out / name).stat().st_size > 0, name
    assert "compact-student" in (out / "trials.csv").read_text()
    table = json.loads((out / "latency.json").read_text())
    assert len(table["entries"]) == 2 and table["sha256"]


def test_the_winning_bundle_carries_a_model_card_with_the_fit(first_fit):
    from huggingface_hub import ModelCard

    from edgekd.bundle.runtime import verify_bundle

    out, _ = first_fit
    verify_bundle(str(out / "bundle"))  # the card's update kept every sha256 of the manifest true
    card = ModelCard.load(out / "bundle" / "MODEL_CARD.md")
    winner = json.loads((out / "trials.json").read_text())["winner"]
    assert "How it was chosen (edgekd fit)" in card.text and winner["key"] in card.text
    assert card.data.eval_results, "the card's model-index has no results"


def test_teacher_runs_once_per_image_and_view(first_fit):
    out, _ = first_fit
    p = json.loads((out / "trials.json").read_text())["teacher_passes"]
    trials = [json.loads((t / "metrics.json").read_text()) for t in sorted((out / "trials").iterdir())]
    assert len(trials) == 2 and {t["train_data"]["images"] for t in trials} == {p["images"]}
    assert SUBSET - 10 <= p["images"] <= SUBSET  # class-stratified: a few fewer than asked
    assert p["passes"] == p["images"] * p["views"] and p["views"] >= 1
    # the second trial and the finalist found every view in the cache: the teacher did not run again
    final = json.loads((out / "work" / "final" / "00" / "metrics.json").read_text())
    assert trials[1]["teacher_cache"]["build_seconds"] == 0.0 and final["teacher_cache"]["build_seconds"] == 0.0
    assert f"Teacher forward passes: {p['passes']} " in (out / "report.md").read_text()


def test_the_finalist_continues_from_its_trials_weights(first_fit):
    """The finalist's full schedule starts from the weights its short trial trained, not from scratch."""
    import hashlib

    out, _ = first_fit
    summary = json.loads((out / "trials.json").read_text())
    final = json.loads((out / "work" / "final" / "00" / "metrics.json").read_text())
    finalist = summary["finalists"][0]
    trial = next(t for t in summary["trials"] if t["candidate"] == finalist["key"])
    source = trial["reused_from"] if trial["reused_from"] is not None else trial["number"]
    weights = out / "trials" / f"{source:04d}" / "student.pt"
    assert finalist["from_trial"] is True and final["pretrained"]["source"] == "file student.pt"
    assert final["pretrained"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert summary["finalist_epochs"] == 1 and "continued from their trials' weights" in (out / "report.md").read_text()


def test_a_fit_owns_its_out_folder(first_fit, cli_main, tmp_path):
    """The fit marks what it wrote: --force over a fit's folder is a fit's to replace (a refusal after it, here a
    teacher that is not trained, leaves the folder as it was), and other commands refuse it, naming fit."""
    from edgekd.base.marker import owned_kinds, read_marker

    out = tmp_path / "f"
    shutil.copytree(first_fit[0], out)
    marker = read_marker(str(out))
    assert marker is not None and marker.command == "fit"
    assert owned_kinds(str(out))["bundle"] == "folder" and owned_kinds(str(out))["report.md"] == "file"
    (out / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = cli_main("fit", "--teacher", "compact-student", "--budget", "p50_ms<=5", "--out", out, "--force")
    assert proc.returncode == 2 and "needs a trained teacher" in proc.stderr, proc.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "notes.txt").read_text() == "mine" and read_marker(str(out)) == marker
    proc = cli_main("bench", first_fit[0] / "bundle", "--out", out, "--force")
    assert proc.returncode == 2 and "holds a run of edgekd 'fit'" in proc.stderr, proc.stderr


@pytest.mark.slow  # a second (and third) real fit: minutes on 2 cores
def test_latency_table_reused_and_a_budget_nobody_meets(setup, first_fit, cli, one_line_error):
    d, teacher = setup
    out = d / "none"
    proc = cli(*_fit_args(teacher, d / "space.yaml", out, d / "lc", "--budget", "p50_ms<=0.000001"), check=False)
    assert "2 of 2 candidates known" in proc.stdout  # the first fit's table, not measured again
    line = one_line_error(proc, "no candidate meets the budget p50_ms<=1e-06")
    assert "closest: compact-student" in line and "misses p50_ms by" in line
    assert not (out / "bundle").exists() and "FAILED" in (out / "report.md").read_text()
    # a damaged table is measured again, never trusted
    table = next(p for p in (d / "lc").iterdir() if p.suffix == ".json")
    table.write_text(table.read_text().replace('"p50_ms": ', '"p50_ms": 1'))
    proc = cli(*_fit_args(teacher, d / "space.yaml", d / "none2", d / "lc", "--budget", "p50_ms<=0.000001"),
               check=False)
    assert "damaged" in proc.stdout and proc.returncode == 2


def test_bad_inputs(setup, cli, one_line_error, tmp_path):
    d, teacher = setup
    one_line_error(cli("fit", "--teacher", teacher, "--budget", "latency<5", "--out", tmp_path / "o", check=False),
                   "accepted: comma-separated KEY OP NUMBER")
    (tmp_path / "empty.yaml").write_text("runtimes: []\n")
    one_line_error(cli("fit", "--teacher", teacher, "--budget", "p50_ms<=5", "--space", tmp_path / "empty.yaml",
                       "--out", tmp_path / "o2", check=False), "search space is empty")
    one_line_error(cli("fit", "--teacher", teacher, "--budget", "p50_ms<=5", "--device", "ssh://nosuchhost.invalid",
                       "--out", tmp_path / "o3", check=False), "nosuchhost")
    assert not (tmp_path / "o" / "report.md").exists() and not (tmp_path / "o3" / "bundle").exists()


def _states(db):
    import optuna

    study = optuna.load_study(study_name="edgekd-fit", storage=f"sqlite:///{db}")
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


@pytest.mark.slow  # a second (and third) real fit: minutes on 2 cores
def test_resume_after_kill_loses_no_finished_trial(setup, first_fit, tmp_path):
    d, teacher = setup
    out = tmp_path / "k"
    args = _fit_args(teacher, d / "space.yaml", out, d / "lc", "--budget", "p50_ms<=50", "--heartbeat", 1)
    args[args.index("--trials") + 1] = 3
    proc = subprocess.Popen([sys.executable, "-m", "edgekd", *map(str, args)], stdout=subprocess.PIPE, text=True)
    done = {}
    for line in proc.stdout:  # kill it once a trial has finished: the next one is running or about to
        if line.startswith("trial "):
            done = {n: s for n, s in _states(out / "study.db").items() if s == "COMPLETE"}
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done, "no trial finished before the kill"
    time.sleep(2.5)  # two heartbeats: the killed worker's running trial is stale and retried
    subprocess.run([sys.executable, "-m", "edgekd", "fit", "--resume", out], check=True, capture_output=True,
                   timeout=900)
    after = _states(out / "study.db")
    assert all(after[n] == "COMPLETE" for n in done)  # no finished trial lost or run again
    assert sum(s in ("COMPLETE", "PRUNED") for s in after.values()) == 3
    assert (out / "bundle" / "manifest.json").exists()


@pytest.mark.slow  # a second (and third) real fit: minutes on 2 cores
def test_fit_on_an_ssh_device(setup, first_fit, cli, sshd, device_python, tmp_path):
    d, teacher = setup
    url = f"ssh://edgedevice{device_python}"
    proc = cli(*_fit_args(teacher, d / "space.yaml", tmp_path / "s", tmp_path / "lc", "--budget", "p50_ms<=50",
                          "--device", url, "--ssh-config", sshd), "--trials", 1, check=False)
    assert proc.returncode == 0, proc.stderr
    w = json.loads((tmp_path / "s" / "trials.json").read_text())["winner"]
    assert w["measured"]["p50_ms"] <= 50
    env = json.loads((tmp_path / "s" / "latency.json").read_text())["device"]
    assert env["device"] == url and "onnxruntime" in env["versions"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres_user():
    """The command prefix that runs PostgreSQL's tools: as is, or (PostgreSQL refuses root) as the postgres user."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("PostgreSQL refuses to run as root and there is no postgres user to run it as")
    if not shutil.which("runuser"):
        pytest.skip("PostgreSQL refuses to run as root and runuser is not installed")
    return ["runuser", "-u", "postgres", "--"]


def _pg_tool(name):
    """A PostgreSQL tool on PATH, or where Debian's postgresql package puts it (/usr/lib/postgresql/N/bin)."""
    import glob

    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.skip(f"PostgreSQL's {name} is not installed")
    return found


@pytest.fixture
def postgres():
    """A real PostgreSQL server on a free port (initdb, pg_ctl, in a fresh folder); skipped with the reason where it
    cannot start. Yields the storage URL of an empty database."""
    import tempfile

    tools = {tool: _pg_tool(tool) for tool in ("initdb", "pg_ctl", "createdb")}
    user = _as_postgres_user()
    folder = tempfile.mkdtemp(prefix="edgekd-pg-")  # not under pytest's root-only tmp: the postgres user reads it
    if user:
        shutil.chown(folder, "postgres")
    data, log, port = os.path.join(folder, "data"), os.path.join(folder, "pg.log"), _free_port()
    try:
        proc = subprocess.run(user + [tools["initdb"], "-D", data, "-A", "trust", "-U", "edgekd"], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"initdb failed: {proc.stderr.strip()[-200:]}")
        start = subprocess.run(user + [tools["pg_ctl"], "-D", data, "-w", "-l", log, "-o",
                                       f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                               capture_output=True, text=True)
        if start.returncode:
            pytest.skip(f"PostgreSQL could not start: {start.stderr.strip()[-200:]}")
        try:
            subprocess.run([tools["createdb"], "-h", "127.0.0.1", "-p", str(port), "-U", "edgekd", "fit"], check=True)
            yield f"postgresql+psycopg://edgekd@127.0.0.1:{port}/fit"
        finally:
            subprocess.run(user + [tools["pg_ctl"], "-D", data, "-m", "fast", "stop"], capture_output=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql(setup, first_fit, postgres, tmp_path):
    d, teacher = setup
    args = _fit_args(teacher, d / "space.yaml", tmp_path / "main", d / "lc", "--budget", "p50_ms<=50",
                     "--storage", postgres)
    args[args.index("--trials") + 1] = 4
    main = subprocess.Popen([sys.executable, "-m", "edgekd", *map(str, args)], stdout=subprocess.PIPE, text=True)
    worker = subprocess.run([sys.executable, "-m", "edgekd", "fit", "--join", postgres, "--out", str(tmp_path / "w"),
                             "--train-threads", "1"], capture_output=True, text=True, timeout=900)
    out, _ = main.communicate(timeout=900)
    assert main.returncode == 0 and worker.returncode == 0, worker.stderr
    import optuna

    study = optuna.load_study(study_name="edgekd-fit", storage=postgres)
    workers = {t.user_attrs.get("worker") for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")}
    assert len(workers) == 2, workers  # both processes ran trials of the one study
    assert (tmp_path / "main" / "bundle" / "manifest.json").exists()


def test_a_later_fit_times_fully_the_quick_entries_near_its_budget(setup, first_fit, tmp_path):
    """The first fit (--quick) stored quick timings; a fit whose latency limit lies near one times that candidate
    again with bench's full timing, in a child process, and keeps the others' quick timings."""
    from edgekd.core.data import load_data
    from edgekd.fit import latency
    from edgekd.fit.options import FitOptions
    from edgekd.fit.run import check_device, latency_phase

    d, teacher = setup
    shutil.copytree(d / "lc", tmp_path / "lc")
    stored = json.loads((first_fit[0] / "latency.json").read_text())["entries"]
    assert {e["timing"] for e in stored.values()} == {"quick"}
    p50s = {k.split("/c")[0]: e["p50_ms"] for k, e in stored.items()}
    limit = min(p50s.values()) * 1.1
    budget = parse_budget(f"p50_ms<={limit}")
    near = {k for k, v in p50s.items() if limit / latency.SCREEN_BAND <= v <= limit * latency.SCREEN_BAND}
    opts = FitOptions(teacher=teacher, space=str(d / "space.yaml"), device="cpu", threads=1, budget=str(budget),
                      latency_cache=str(tmp_path / "lc"), out=str(tmp_path / "out"))
    said = []
    os.makedirs(opts.out)
    rows, _ = latency_phase(opts, budget, check_device(opts, budget), load_data(opts.data, None),
                            load_space(opts.space, default_space(8, 1)), opts.out, said.append)
    assert any(f"{2 - len(near)} of 2 candidates known" in s for s in said), said
    table = json.loads((tmp_path / "out" / "latency.json").read_text())["entries"]
    timings = {k.split("/c")[0]: e["timing"] for k, e in table.items()}
    assert timings == {k: "full" if k in near else "quick" for k in p50s}
    assert all(r["status"] == "ok" for r in rows)
