"""edgekd quantize's fast fake quantizer (edgekd.core.fakequant.fast_quantizers): NNCF's symmetric quantizer
arithmetic in fewer passes. It must give what NNCF's own gives: the same outputs and input gradients, the same
scale gradients up to summation order, NNCF's forward back after the block, and NNCF's path for what it does
not take (bf16). Tiny models and tensors; no timing here (tools/measure_patience.py measures the speed)."""

import pytest
import torch
from torch import nn

from edgekd.core.fakequant import _SymmetricFakeQuantize, fast_quantizers, import_nncf, quantizer_modules


def _nncf_symmetric(x, scale, level_low, level_high, eps=1e-16):
    from nncf.torch.quantization.quantize_functions import symmetric_quantize

    import_nncf()
    return symmetric_quantize(x, level_high - level_low + 1, level_low, level_high, scale, eps)


def _grads(fn, x, scale, g):
    x, scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
    out = fn(x, scale)
    out.backward(g)
    return out.detach(), x.grad, scale.grad


@pytest.mark.parametrize("shape, scale_shape, levels", [
    ((4, 3, 5, 5), (1,), (-128, 127)),            # signed activations, per tensor
    ((4, 3, 5, 5), (1,), (0, 255)),               # unsigned activations (after a ReLU), per tensor
    ((6, 3, 3, 3), (6, 1, 1, 1), (-127, 127)),    # conv weights, per output channel, narrow range
    ((10, 8), (10, 1), (-127, 127)),              # linear weights, per output channel
])
def test_same_arithmetic_as_nncf(shape, scale_shape, levels):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 2  # wide enough that some elements fall outside the range on both sides
    scale = torch.rand(*scale_shape) + 0.5
    g = torch.randn(*shape)
    low, high = levels
    ref = _grads(lambda x, s: _nncf_symmetric(x, s, low, high), x, scale, g)
    fast = _grads(lambda x, s: _SymmetricFakeQuantize.apply(x, s.abs() + 1e-16, low, high, high - low + 1),
                  x, scale, g)
    assert torch.equal(ref[0], fast[0])  # the quantized values, bit for bit
    assert torch.equal(ref[1], fast[1])  # straight-through inside the range, zero outside
    assert (ref[1] == 0).any() and (ref[1] != 0).any()
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-5, atol=1e-5)  # the scale's: only the order of the sum


class _Tiny(nn.Module):
    """conv-bn-relu(inplace), conv-relu(inplace), a residual add, pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.relu, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Linear(8, 4)

    def forward(self, x):
        y = self.relu(self.bn(self.conv1(x)))
        y = self.relu(self.conv2(y)) + y
        return self.fc(y.mean((2, 3)))


def _tiny_qat_model():
    nncf = import_nncf()
    torch.manual_seed(0)
    model = _Tiny()
    images = [torch.randn(1, 3, 8, 8) for _ in range(8)]
    return nncf.quantize(model.eval(), nncf.Dataset(images), subset_size=len(images))


def test_fast_quantizers_train_as_nncf_does_and_give_nncf_back():
    qmodel = _tiny_qat_model().train()
    x, target = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))

    def step():
        qmodel.zero_grad()
        out = qmodel(x)
        nn.functional.cross_entropy(out, target).backward()  # through ReLU(inplace=True) after a quantizer
        return out.detach(), {n: p.grad.clone() for n, p in qmodel.named_parameters() if p.grad is not None}

    ref_out, ref_grads = step()
    quantizers = quantizer_modules(qmodel)
    with fast_quantizers(qmodel) as patched:
        assert patched == len(quantizers) > 0
        assert all("forward" in vars(q) for q in quantizers)
        out, grads = step()
    assert all("forward" not in vars(q) for q in quantizers)  # NNCF's own forward again (export traces it)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_takes_nncf_path():
    qmodel = _tiny_qat_model().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = qmodel(x)
        with fast_quantizers(qmodel):
            out = qmodel(x)
    assert out.dtype == ref.dtype and torch.equal(out, ref)


def test_evaluation_without_gradients_gives_nncf_values():
    qmodel = _tiny_qat_model().eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        ref = qmodel(x)
        with fast_quantizers(qmodel):
            out = qmodel(x)
    assert torch.equal(out, ref)
