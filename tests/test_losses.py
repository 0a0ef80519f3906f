import math

import pytest
import torch

from edgekd.core.losses import make_loss


def softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def hand_ce(row, label):
    return -math.log(softmax(row)[label])


S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
T = torch.tensor([[1.5, 1.0, -0.5], [-1.0, 0.5, 2.0]])
Y = torch.tensor([0, 2])


def hand_kl(t_row, s_row, temp):
    p, q = softmax(t_row, temp), softmax(s_row, temp)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kd_matches_hand_computation_with_t_squared_scaling():
    temp, alpha = 4.0, 0.9
    loss, params = make_loss("kd", temperature=temp, alpha=alpha)
    assert params == {"temperature": 4.0, "alpha": 0.9}
    parts = loss(S, T, Y)
    kl = sum(hand_kl(t, s, temp) for t, s in zip(T.tolist(), S.tolist())) / 2
    ce = sum(hand_ce(s, y) for s, y in zip(S.tolist(), Y.tolist())) / 2
    assert parts["kd_loss"].item() == pytest.approx(kl * temp ** 2, rel=1e-5)
    assert parts["task_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(alpha * kl * temp ** 2 + (1 - alpha) * ce, rel=1e-5)


def test_kd_t_squared_keeps_the_kd_term_comparable_across_temperatures():
    # Without T^2 the KL term shrinks ~1/T^2 as T grows; with it, the scaled term stays the same order.
    k2 = make_loss("kd", temperature=2.0, alpha=1.0)[0](S, T, Y)["kd_loss"].item()
    k8 = make_loss("kd", temperature=8.0, alpha=1.0)[0](S, T, Y)["kd_loss"].item()
    raw2, raw8 = k2 / 4, k8 / 64
    assert raw2 / raw8 > 10 and 0.5 < k2 / k8 < 5


def test_kd_alpha_ends_give_the_pure_terms():
    # alpha weighs the teacher term: alpha=0 is plain hard-label cross-entropy ...
    zero = make_loss("kd", alpha=0.0)[0](S, T, Y)
    assert zero["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(S, Y).item(), rel=1e-6)
    # ... and alpha=1 is the pure soft term: T^2 * (soft cross-entropy - teacher entropy), i.e. T^2 * KL.
    temp = 4.0
    one = make_loss("kd", temperature=temp, alpha=1.0)[0](S, T, Y)
    soft_ce = sum(-sum(p * math.log(q) for p, q in zip(softmax(t, temp), softmax(s, temp)))
                  for t, s in zip(T.tolist(), S.tolist())) / 2
    entropy = sum(-sum(p * math.log(p) for p in softmax(t, temp)) for t in T.tolist()) / 2
    assert one["loss"].item() == pytest.approx(temp ** 2 * (soft_ce - entropy), rel=1e-5)


def test_seed_loss_is_the_articles_formula():
    # Article: CE(s, y) + 0.5 * cross_entropy(log_softmax(s / 0.5), softmax(t / 0.5)), no T^2.
    loss, params = make_loss("seed")
    assert params == {"temperature": 0.5, "alpha": 0.5}
    parts = loss(S, T, Y)
    soft = torch.nn.functional.softmax(T / 0.5, dim=1)
    as_printed = torch.nn.functional.cross_entropy(torch.nn.functional.log_softmax(S / 0.5, dim=1), soft)
    expected = torch.nn.functional.cross_entropy(S, Y) + 0.5 * as_printed
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    hand_soft = sum(-sum(p * math.log(q) for p, q in zip(softmax(t, 0.5), softmax(s, 0.5)))
                    for t, s in zip(T.tolist(), S.tolist())) / 2
    assert parts["kd_loss"].item() == pytest.approx(hand_soft, rel=1e-5)


def test_mse_is_logit_matching():
    loss, _ = make_loss("mse", alpha=1.0)
    parts = loss(S, T, Y)
    hand = sum((a - b) ** 2 for rs, rt in zip(S.tolist(), T.tolist()) for a, b in zip(rs, rt)) / 6
    assert parts["loss"].item() == pytest.approx(hand, rel=1e-6)
    assert make_loss("mse", alpha=1.0)[0](T, T, Y)["kd_loss"].item() == 0.0


def test_every_loss_returns_its_parts_and_backpropagates():
    for name in ("ce", "kd", "seed", "mse"):
        s = S.clone().requires_grad_(True)
        parts = make_loss(name)[0](s, T, Y)
        assert set(parts) == {"loss", "task_loss", "kd_loss"}
        parts["loss"].backward()
        assert s.grad is not None and torch.isfinite(s.grad).all()
