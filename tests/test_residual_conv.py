"""ResidualConv2d: conv(x) + residual, as one oneDNN call when fused, with the plain pair's bits."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asl_cli.nn import ResidualConv2d, fuse_bn_relu
from asl_cli.nn import residual as residual_mod
from asl_cli.zoo import create_model
from asl_cli.zoo.blocks import PreActBlock

needs_onednn = pytest.mark.skipif(residual_mod._CONV_ADD is None, reason="this PyTorch build has no oneDNN convolution with a post-op")
LAYOUTS = [torch.contiguous_format, torch.channels_last]
# (cin, cout, kernel, stride, padding, bias, input size)
CONVS = [(16, 16, 1, 1, 0, False, (4, 8, 8)), (8, 24, 1, 1, 0, False, (3, 5, 7)), (6, 10, 3, 2, 1, True, (2, 9, 9)),
         (5, 5, 3, 1, 1, True, (2, 4, 6))]


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the fused oneDNN call ran."""
    calls = []
    real = residual_mod._CONV_ADD

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(residual_mod, "_CONV_ADD", spy)
    return calls


def make(cin, cout, k, s, p, bias, size, fmt, seed=0):
    torch.manual_seed(seed)
    conv = ResidualConv2d(cin, cout, k, stride=s, padding=p, bias=bias).to(memory_format=fmt)
    n, h, w = size
    x = torch.randn(n, cin, h, w).contiguous(memory_format=fmt).requires_grad_()
    out_hw = [(d + 2 * p - k) // s + 1 for d in (h, w)]
    r = torch.randn(n, cout, *out_hw).contiguous(memory_format=fmt).requires_grad_()
    return conv, x, r


def grads(conv, x, r, fused):
    conv.fuse_add = fused
    for t in [x, r, *conv.parameters()]:
        t.grad = None
    y = conv(x, r)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).contiguous(memory_format=torch.channels_last
                                                                      if y.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format))
    return y.detach(), [t.grad.clone() for t in [x, r, *conv.parameters()]]


@needs_onednn
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("spec", CONVS, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}s{c[3]}")
def test_fused_equals_the_plain_pair_bit_for_bit(spec, fmt, fused_calls):
    conv, x, r = make(*spec, fmt)
    y_plain, g_plain = grads(conv, x, r, fused=False)
    assert not fused_calls
    y, g = grads(conv, x, r, fused=True)
    assert len(fused_calls) == 1
    assert torch.equal(y, y_plain) and y.stride() == y_plain.stride()
    assert len(g) == len(g_plain)
    for a, b in zip(g, g_plain):
        assert torch.equal(a, b)
    # and against the definition
    torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding) + r)


@needs_onednn
def test_only_the_inputs_that_need_it_get_a_gradient(fused_calls):
    conv, x, r = make(16, 16, 1, 1, 0, False, (2, 4, 4), torch.channels_last)
    conv.fuse_add = True
    conv.weight.requires_grad_(False)
    y = conv(x.detach(), r)
    y.sum().backward()
    assert fused_calls and torch.equal(r.grad, torch.ones_like(r)) and conv.weight.grad is None
    with torch.no_grad():
        assert torch.equal(conv(x, r), F.conv2d(x, conv.weight) + r)


FALLBACKS = [
    ("float64", lambda conv, x, r: (conv.double(), x.double(), r.double())),
    ("residual in another layout", lambda conv, x, r: (conv, x, r.contiguous())),
    ("broadcast residual", lambda conv, x, r: (conv, x, r[:1])),
    ("reflect padding", lambda conv, x, r: (setattr(conv, "padding_mode", "reflect") or conv, x, r)),
]


@needs_onednn
@pytest.mark.parametrize("name,change", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_what_it_cannot_fuse_runs_as_the_plain_pair(name, change, fused_calls):
    conv, x, r = change(*make(6, 10, 3, 1, 1, True, (2, 5, 5), torch.channels_last))
    conv.fuse_add = True
    y = conv(x, r)
    assert not fused_calls
    torch.testing.assert_close(y, conv._conv_forward(x, conv.weight, conv.bias) + r, rtol=0, atol=0)


@needs_onednn
def test_tracing_takes_the_plain_pair(fused_calls):
    conv, x, r = make(16, 16, 1, 1, 0, False, (2, 4, 4), torch.channels_last)
    conv.fuse_add = True
    traced = torch.jit.trace(conv, (x.detach(), r.detach()), check_trace=False)
    assert not fused_calls
    assert "add" in str(traced.graph)


def test_without_a_residual_it_is_a_convolution():
    conv, x, _ = make(6, 10, 3, 2, 1, True, (2, 7, 7), torch.contiguous_format)
    conv.fuse_add = True
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, 2, 1))


def test_fuse_bn_relu_switches_the_blocks_addition_on_and_keeps_the_state_dict():
    plain = create_model("asnet20_16x1")
    fused = copy.deepcopy(plain)
    fuse_bn_relu(fused)
    convs = [m.conv2 for m in fused.modules() if isinstance(m, PreActBlock)]
    assert len(convs) == 9 and all(isinstance(c, ResidualConv2d) and c.fuse_add for c in convs)
    assert not any(m.conv2.fuse_add for m in plain.modules() if isinstance(m, PreActBlock))
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert isinstance(convs[0], nn.Conv2d)


@needs_onednn
def test_a_fused_block_trains_as_the_plain_one(fused_calls):
    torch.manual_seed(0)
    plain = PreActBlock(16, 32, 32, 2, spatial="dw3").to(memory_format=torch.channels_last)  # with a projection
    fused = copy.deepcopy(plain)
    fused.conv2.fuse_add = True
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    outs = []
    for m in (plain, fused):
        y = m(x)
        y.square().sum().backward()
        outs.append((y, [p.grad for p in m.parameters()]))
    assert len(fused_calls) == 1
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)
