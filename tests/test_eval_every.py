"""--eval-every N: the test split is evaluated every N epochs and after the last; the skipped epochs say so."""

import json


def test_eval_every_skips_the_test_split_between(cli, tmp_path):
    out = tmp_path / "run"
    cli("train", "--model", "compact-student-s", "--data", "digits", "--epochs", 3, "--eval-every", 2,
        "--no-progress", "--out", out)
    m = json.loads((out / "metrics.json").read_text())
    tops = [h["test_top1"] for h in m["history"]]
    assert tops[0] is None and isinstance(tops[1], float) and isinstance(tops[2], float), tops
    assert m["test_top1"] == tops[2] and m["best_top1"] == max(tops[1:])
