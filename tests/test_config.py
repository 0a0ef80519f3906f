"""Nothing silent: one typed configuration per command, the same checks for the command line, --config
YAML and --resume; a loss refuses options it does not use; NaN never switches a gate off."""

import pytest

from edgekd import EdgeKDError
from edgekd.core import config as options

# (YAML text, the same value on the command line, what the one-line error says)
BAD_VALUES = [
    ("batch_size: 0\n", ["--batch-size", "0"], "--batch-size: expected a positive whole number, got '0'"),
    ("lr: .nan\n", ["--lr", "nan"], "--lr: expected a positive number, got 'nan'"),
    ("lr: .inf\n", ["--lr", "inf"], "--lr: expected a positive number, got 'inf'"),
    ("schedule: linear\n", ["--schedule", "linear"], "--schedule: expected one of cosine, step, constant, got 'linear'"),
    ("amp: fp8\n", ["--amp", "fp8"], "--amp: expected one of auto, bf16, fp16, off, got 'fp8'"),
    ("epochs: ten\n", ["--epochs", "ten"], "--epochs: expected a positive whole number, got 'ten'"),
    ("momentum: 1.5\n", ["--momentum", "1.5"], "--momentum: expected a number of 0 or more below 1"),
    ("label_smoothing: -0.1\n", ["--label-smoothing", "-0.1"], "--label-smoothing: expected a number of 0 or more"),
]


@pytest.mark.parametrize("command", ["train", "distill"])
@pytest.mark.parametrize("text, argv, message", BAD_VALUES, ids=[c[0].split(":")[0] for c in BAD_VALUES])
def test_a_bad_value_is_the_same_error_from_yaml_and_the_command_line(tmp_path, cli_main, one_line_error, command, text,
                                                                      argv, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    from_yaml = one_line_error(cli_main(command, "--config", cfg, "--out", out))
    from_cli = one_line_error(cli_main(command, *argv, "--out", out))
    assert message in from_cli
    key = text.split(":")[0]
    assert from_yaml == from_cli + f" (key {key} in config file {str(cfg)!r})"
    assert not out.exists()


def test_an_unknown_key_is_named_with_the_closest_valid_one(tmp_path, cli_main, one_line_error):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\nbatchsize: 32\n")
    line = one_line_error(cli_main("train", "--config", cfg, "--out", tmp_path / "o"))
    assert "unknown key 'batchsize'" in line and "did you mean 'batch_size'?" in line
    assert not (tmp_path / "o").exists()


def test_control_options_and_record_keys_in_yaml(tmp_path, cli_main, one_line_error):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("force: true\n")
    line = one_line_error(cli_main("train", "--config", cfg, "--out", tmp_path / "o"))
    assert "unknown key 'force'" in line and "give --force on the command line" in line
    # keys a saved config.yaml carries for the record are accepted and set nothing
    resolved = options.resolve("distill", {}, None)
    cfg.write_text("loss_params: {alpha: 0.9}\nresume: null\ncommand: distill\n")
    assert options.resolve("distill", {}, str(cfg)) == resolved


# (command line, what the one-line error says); each its own test id, the command line itself
REFUSED = [
    (["distill", "--loss", "kd", "--beta", "5"], "--loss kd takes --temperature and --alpha; it does not use --beta"),
    (["distill", "--loss", "mse", "-T", "2"], "--loss mse takes --alpha; it does not use --temperature"),
    (["distill", "--loss", "seed", "--student-layer", "layer1"], "it does not use --student-layer"),
    (["export", "x.pt", "--format", "onnx", "--precision", "int8", "--max-drop", "nan"],
     "--max-drop: expected a number of 0 or more, got 'nan'"),
    (["bench", "x.pt", "--max-drop", "nan"], "--max-drop: expected a number of 0 or more, got 'nan'"),
    (["bench", "x.pt", "--max-drop", "-1"], "--max-drop: expected a number of 0 or more, got '-1'"),
    (["export", "x.pt", "--format", "onnx", "--atol", "inf"], "--atol: expected a positive number, got 'inf'"),
    (["distill", "--alpha", "nan"], "--alpha: expected a number of 0 or more, got 'nan'"),
    (["distill", "--alpha", "1.5"], "--alpha must be between 0 and 1"),
    (["bench", "x.pt", "--remeasure-slow", "nan"], "--remeasure-slow: expected a number of 0 or more, got 'nan'"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[" ".join(argv) for argv, _ in REFUSED])
def test_refused_on_the_command_line(tmp_path, cli_main, one_line_error, argv, message):
    out = tmp_path / "out"
    line = one_line_error(cli_main(*argv, "--out", out))
    assert message in line
    assert not out.exists()


def test_resume_checks_the_saved_config_like_any_other(tmp_path, cli_main, one_line_error):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 2\nschedule: linear\nout: x\n")
    line = one_line_error(cli_main("train", "--resume", run))
    assert "--schedule: expected one of cosine, step, constant, got 'linear'" in line and "being resumed" in line


def test_the_command_line_wins_over_yaml_and_yaml_over_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\nlr: '1e-3'\nbatch_size: 16\n")  # YAML reads 1e-3 without a dot as text
    resolved = options.resolve("train", {"batch_size": "8"}, str(cfg))
    assert (resolved.epochs, resolved.lr, resolved.batch_size, resolved.schedule) == (3, 0.001, 8, "cosine")


def test_resume_takes_back_the_positional_its_own_config_recorded(tmp_path):
    """edgekd quantize saves STUDENT in config.yaml; --resume DIR reads it back (it was refused as an unknown key),
    while a --config file written by hand still may not set a positional."""
    run = tmp_path / "qat"
    run.mkdir()
    (run / "config.yaml").write_text("student: /data/student.pt\nepochs: 2\nlr: 0.001\n")
    import argparse

    ns = argparse.Namespace(command="quantize", func=None, debug=False,
                            **{o.name: None for o in options.COMMANDS["quantize"]})
    ns.resume, ns.epochs = str(run), "1"
    resolved = options.parse_args(ns)
    assert (resolved.student, resolved.epochs, resolved.out) == ("/data/student.pt", 1, str(run))
    ns.resume, ns.config = None, str(run / "config.yaml")
    with pytest.raises(EdgeKDError, match="unknown key 'student' for edgekd quantize"):
        options.parse_args(ns)


def test_every_default_passes_its_own_check():
    for command, opts in options.COMMANDS.items():
        for opt in opts:
            if opt.default is not None:
                assert options.check(opt, opt.default) == opt.default, (command, opt.name)


def test_saved_config_keys_are_unchanged():
    """config.yaml keeps its keys, so the files of earlier runs still load with --resume / --config."""
    parser, _ = __import__("edgekd.cli", fromlist=["build_parser"]).build_parser()
    before = {
        "train": "amp aug_seed augment batch_size bn_recalibrate channels_last compile data data_root device epochs "
                 "label_smoothing lr model momentum norm optimizer out progress resume schedule seed skip_bad_images "
                 "threads train_subset warmup_epochs weight_decay workers",
        "distill": "alpha amp aug_seed augment batch_size beta bn_recalibrate channels_last compile data data_root "
                   "device dkd_warmup epochs label_smoothing loss lr momentum norm optimizer out progress resume "
                   "schedule seed skip_bad_images student student_layer teacher teacher_cache teacher_epochs "
                   "teacher_layer temperature threads train_subset warmup_epochs weight_decay workers",
    }
    for command, keys in before.items():
        args = options.parse_args(parser.parse_args([command, "--out", "o"]))
        assert set(keys.split()) <= set(options.saved(args)), command
        cfg = options.resolve(command, {}, None)
        for key in keys.split():  # an old config.yaml holding every key with its value loads
            options.check(next(o for o in options.COMMANDS[command] if o.name == key), getattr(cfg, key))


def test_make_loss_refuses_an_option_the_loss_does_not_take():
    from edgekd.core.losses import make_loss

    with pytest.raises(EdgeKDError, match="--loss kd takes --temperature and --alpha; it does not use --beta"):
        make_loss("kd", beta=5.0)
    _, params = make_loss("dkd", beta=4.0, warmup=None)
    assert params["beta"] == 4.0


def test_bench_library_refuses_a_nan_max_drop(tmp_path):
    from edgekd.bench.run import Results

    with pytest.raises(EdgeKDError, match="max_drop"):
        Results(out=str(tmp_path / "o"), max_drop=float("nan"))


@pytest.mark.parametrize("text, key", [
    ("epochs: 2\nlr: 0.1\nepochs: 3\n", "epochs"),
    ("loss_params:\n  a: 1\n  b: [1, 2]\n  a: 2\n", "a"),
    ("epochs: 2\nloss_params:\n  x:\n    y: 1\n    y: 1\n", "y"),
], ids=["top", "nested", "deeper"])
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, cli_main, one_line_error, text, key):
    """PyYAML lets the last of two equal keys win without a word; at any depth edgekd names the key and the file."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    message = one_line_error(cli_main("train", "--config", cfg, "--out", tmp_path / "out"))
    assert f"has the key {key!r} more than once" in message and str(cfg) in message
    assert not (tmp_path / "out").exists()


def test_a_key_given_twice_in_the_config_yaml_resume_reads_is_refused(tmp_path, cli_main, one_line_error):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 2\nepochs: 3\n")
    message = one_line_error(cli_main("train", "--resume", run))
    assert "has the key 'epochs' more than once" in message and "config.yaml" in message


def test_a_yaml_merge_key_is_not_a_duplicate(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss_params:\n  base: &b {a: 1}\n  more:\n    <<: *b\n    a: 2\nepochs: 2\n")
    assert options.resolve("train", {}, str(cfg)).epochs == 2


def test_a_python_caller_gets_the_same_checks_and_rules():
    from edgekd.export.options import ExportOptions

    opts = ExportOptions(format="onnx", out="b")
    assert (opts.format, opts.precision, opts.val_size) == ("onnx", "fp32", 1000)
    with pytest.raises(EdgeKDError, match="--val-size: expected a positive whole number, got '0'"):
        ExportOptions(format="onnx", out="b", val_size=0)
    with pytest.raises(AttributeError, match="edgekd export has no option 'no_such_option'"):
        getattr(opts, "no_such_option")
    with pytest.raises(EdgeKDError, match="--amp fp16 needs --device cuda"):
        options.TrainOptions(amp="fp16")
    with pytest.raises(EdgeKDError, match="--teacher-cache-topk K applies to the teacher cache"):
        options.DistillOptions(teacher_cache_topk=5)
    with pytest.raises(EdgeKDError, match="--unlabeled images are learned from the teacher's answers"):
        options.TrainOptions(unlabeled="u")


def test_the_options_classes_are_the_declaration():
    """Every command's class is registered, its fields are its options in --help order, and each is typed."""
    import dataclasses

    import edgekd.cli  # noqa: F401  (imports every command's options class)

    assert sorted(options.CLASSES) == ["bench", "deploy", "distill", "export", "fit", "predict", "prepare", "quantize", "train"]
    for command, cls in options.CLASSES.items():
        assert [f.name for f in dataclasses.fields(cls)] == [o.name for o in options.COMMANDS[command]], command
    assert options.QuantizeOptions().epochs == 1 and options.TrainOptions().epochs == 15
