"""DKD and the FitNets hint against hand computations on small tensors; label smoothing; schedules."""

import math

import pytest
import torch

from edgekd.core.train_loop import lr_factor
from edgekd.core.losses import LOSSES, make_loss

S = torch.tensor([[2.0, 0.5, -1.0, 0.3], [0.1, 0.2, 3.0, -0.4]])
T = torch.tensor([[1.5, 1.0, -0.5, 0.0], [-1.0, 0.5, 2.0, 1.0]])
Y = torch.tensor([0, 2])


def softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def hand_dkd(s_row, t_row, label, temp):
    """TCKD and NCKD of one sample, written out from the DKD paper's definitions."""
    ps, pt = softmax(s_row, temp), softmax(t_row, temp)
    tckd = kl([pt[label], 1 - pt[label]], [ps[label], 1 - ps[label]])
    rest = [i for i in range(len(s_row)) if i != label]
    qs = softmax([s_row[i] for i in rest], temp)
    qt = softmax([t_row[i] for i in rest], temp)
    return tckd * temp ** 2, kl(qt, qs) * temp ** 2


def test_dkd_matches_hand_computation():
    temp, alpha, beta = 4.0, 1.0, 8.0
    loss, params = make_loss("dkd", temperature=temp, alpha=alpha, beta=beta, warmup=1)
    assert params == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "ce_weight": 1.0, "warmup": 1}
    parts = loss(S, T, Y)
    terms = [hand_dkd(s, t, y, temp) for s, t, y in zip(S.tolist(), T.tolist(), Y.tolist())]
    tckd = sum(a for a, _ in terms) / 2
    nckd = sum(b for _, b in terms) / 2
    ce = sum(-math.log(softmax(s)[y]) for s, y in zip(S.tolist(), Y.tolist())) / 2
    assert parts["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert parts["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert parts["task_loss"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(ce + alpha * tckd + beta * nckd, rel=1e-5)


def test_dkd_warmup_ramps_the_distillation_terms_in():
    loss, _ = make_loss("dkd", warmup=4)
    full = loss.alpha * loss(S, T, Y)["tckd"] + loss.beta * loss(S, T, Y)["nckd"]
    for epoch, ramp in [(1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)]:
        loss.set_epoch(epoch)
        assert loss(S, T, Y)["kd_loss"].item() == pytest.approx(ramp * full.item(), rel=1e-6)


def test_dkd_terms_vanish_when_the_student_matches_the_teacher():
    loss, _ = make_loss("dkd", warmup=1)
    same = loss(S, S, Y)
    assert same["tckd"].item() == pytest.approx(0.0, abs=1e-6) and same["nckd"].item() == pytest.approx(0.0, abs=1e-6)


def test_fitnet_hint_is_the_mse_through_the_adapter():
    loss, params = make_loss("fitnet")
    assert params["beta"] == 100.0
    s_feat, t_feat = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    loss.build_adapter(s_feat.shape, t_feat.shape)
    loss.eval()  # batch-norm of the adapter with running statistics: a fixed function to compare against
    adapted = torch.nn.functional.interpolate(loss.adapter(s_feat), size=(2, 2), mode="bilinear", align_corners=False)
    hand = ((adapted - t_feat) ** 2).mean().item()
    parts = loss(S, T, Y, features=(s_feat, t_feat))
    assert parts["hint"].item() == pytest.approx(hand, rel=1e-5)
    assert parts["kd_loss"].item() == pytest.approx(100.0 * hand, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(parts["task_loss"].item() + 100.0 * hand, rel=1e-5)


def test_fitnet_adapter_learns_and_student_features_get_gradients():
    loss, _ = make_loss("fitnet")
    s_feat = torch.randn(4, 3, 4, 4, requires_grad=True)
    loss.build_adapter(s_feat.shape, (4, 6, 4, 4))
    parts = loss(S.repeat(2, 1), T.repeat(2, 1), Y.repeat(2), features=(s_feat, torch.randn(4, 6, 4, 4)))
    parts["loss"].backward()
    assert s_feat.grad is not None and loss.adapter[0].weight.grad.abs().sum() > 0


def test_label_smoothing_reaches_every_loss():
    eps = 0.1
    for name in ("ce", "kd", "dkd", "seed", "mse"):
        plain = make_loss(name)[0](S, T, Y)["task_loss"].item()
        smooth = make_loss(name, label_smoothing=eps)[0](S, T, Y)["task_loss"].item()
        # CE with smoothing = (1 - eps) * CE + eps * mean over classes of -log p.
        hand = sum((1 - eps) * -math.log(softmax(s)[y]) + eps * sum(-math.log(p) for p in softmax(s)) / 4
                   for s, y in zip(S.tolist(), Y.tolist())) / 2
        assert smooth == pytest.approx(hand, rel=1e-5) and smooth != plain


def test_new_methods_are_registered_with_documented_defaults():
    assert {"kd", "dkd", "fitnet"} <= set(LOSSES.names())
    assert LOSSES.meta("fitnet")["needs_features"] and LOSSES.meta("dkd")["needs_teacher"]


def test_learning_rate_warmup_then_cosine_or_step():
    total, warm = 100, 10
    assert lr_factor(0, total, warm, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, total, warm, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, total, warm, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, total, warm, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, total, warm, "cosine") < 0.01
    assert [lr_factor(s, total, 0, "step") for s in (0, 49, 50, 75, 99)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    assert lr_factor(80, total, warm, "constant") == 1.0
