"""--eval-every N: the test split is evaluated every N epochs and after the last; the skipped epochs say so.
--test-subset N: a fixed, class-stratified share of the test split."""

import json


def test_eval_every_skips_the_test_split_between(cli, tmp_path):
    out = tmp_path / "run"
    cli("train", "--model", "compact-student-s", "--data", "digits", "--epochs", 3, "--eval-every", 2,
        "--no-progress", "--out", out)
    m = json.loads((out / "metrics.json").read_text())
    tops = [h["test_top1"] for h in m["history"]]
    assert tops[0] is None and isinstance(tops[1], float) and isinstance(tops[2], float), tops
    assert m["test_top1"] == tops[2] and m["best_top1"] == max(tops[1:])


def test_test_subset_evaluates_a_fixed_stratified_share(cli, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        cli("train", "--model", "compact-student-s", "--data", "digits", "--epochs", 1, "--test-subset", 100,
            "--no-progress", "--out", out)
        runs.append(json.loads((out / "metrics.json").read_text()))
    assert [m["train_data"]["test_images"] for m in runs] == [100, 100]
    assert runs[0]["test_top1"] == runs[1]["test_top1"]  # the same images, the same seed: the same figure
    assert round(runs[0]["test_top1"] * 100, 6) == round(runs[0]["test_top1"] * 100)  # a share of 100 images
