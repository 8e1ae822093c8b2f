"""The fused pre-activation BatchNorm-ReLU and 1x1 convolution (batch_norm_relu_conv1x1) against
the reference, and bn_relu_conv_skip / PreActBlock against the plain modules."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asl_cli.nn import bn_relu_conv_skip, fuse_bn_relu
from asl_cli.ops import backends, reference_batch_norm_relu_conv1x1
from asl_cli.zoo.blocks import PreActBlock
from conftest import HANG_GUARD_S

compiled = pytest.mark.skipif(backends()["cpu"] != "compiled C++", reason="needs the compiled CPU extension")
LAYOUTS = [torch.contiguous_format, torch.channels_last]
# (N, C_in, H, W, C_out): channels_last float32 with 16..64 channels in and out (multiples of 16)
# take the AVX-512 kernel where the CPU has it, rows not a multiple of its blocks of 4 and 256
# included; the others the composition
SHAPES = [(4, 16, 8, 8, 16), (2, 32, 5, 7, 64), (3, 64, 9, 11, 32), (2, 48, 3, 3, 16), (1, 16, 33, 17, 48),
          (2, 5, 7, 3, 4), (2, 80, 4, 5, 16), (3, 16, 4, 4, 8)]


def inputs(shape, dtype=torch.float32, fmt=torch.contiguous_format, seed=0):
    N, C, H, W, Co = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g, dtype=dtype) * 2 + 3).contiguous(memory_format=fmt)
    w = torch.randn(C, generator=g, dtype=dtype)
    b = torch.randn(C, generator=g, dtype=dtype) * 0.5
    cw = (torch.randn(Co, C, 1, 1, generator=g, dtype=dtype) / C ** 0.5).contiguous(memory_format=fmt)
    return x, w, b, cw


def reference_backward(grad, x, w, b, cw, residual=None):
    """The four gradients by autograd through the reference (mean and invstd are the batch's)."""
    params = [t.detach().clone().requires_grad_() for t in (x, w, b, cw)]
    out, _, _ = reference_batch_norm_relu_conv1x1(params[0], params[1], params[2], 1e-5, params[3])
    grads = list(torch.autograd.grad(out, params, grad))
    if residual is not None:
        grads[0] = grads[0] + residual
    return grads


@compiled
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_residual", [False, True])
def test_forward_and_backward_match_the_reference(shape, fmt, dtype, with_residual):
    x, w, b, cw = inputs(shape, dtype, fmt)
    out, mean, invstd = torch.ops.asl.batch_norm_relu_conv1x1(x, w, b, 1e-5, cw)
    ref, rmean, rinvstd = reference_batch_norm_relu_conv1x1(x, w, b, 1e-5, cw)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(mean, rmean, **tol)
    torch.testing.assert_close(invstd, rinvstd, **tol)
    assert out.is_contiguous(memory_format=fmt)
    g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    res = torch.randn_like(x) if with_residual else None
    got = torch.ops.asl.batch_norm_relu_conv1x1_backward(g, x, w, b, mean, invstd, cw, res)
    want = reference_backward(g, x, w, b, cw, res)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol)
    assert got[0].is_contiguous(memory_format=fmt) and got[3].shape == cw.shape


@compiled
def test_the_residual_is_added_to_the_input_gradient_as_it_is_written():
    x, w, b, cw = inputs(SHAPES[0], fmt=torch.channels_last)
    out, mean, invstd = torch.ops.asl.batch_norm_relu_conv1x1(x, w, b, 1e-5, cw)
    g, r = torch.randn_like(out), torch.randn_like(x)
    plain = torch.ops.asl.batch_norm_relu_conv1x1_backward(g, x, w, b, mean, invstd, cw)
    added = torch.ops.asl.batch_norm_relu_conv1x1_backward(g, x, w, b, mean, invstd, cw, r)
    assert torch.equal(added[0], plain[0] + r)
    for a, e in zip(added[1:], plain[1:]):
        assert torch.equal(a, e)


@compiled
@pytest.mark.parametrize("simd", ["scalar"])
def test_without_avx512_the_composition_matches_the_reference(simd):
    """ASL_CPU_SIMD below avx512 turns the fused kernel off: the composition of batch_norm_relu's
    kernels and ATen's convolution then serves the same shapes."""
    script = r"""
import torch
from asl_cli.ops import reference_batch_norm_relu_conv1x1
torch.manual_seed(0)
x = (torch.randn(2, 16, 5, 7) * 2 + 3).contiguous(memory_format=torch.channels_last)
w, b, cw = torch.randn(16), torch.randn(16) * 0.5, torch.randn(32, 16, 1, 1) / 4
got = torch.ops.asl.batch_norm_relu_conv1x1(x, w, b, 1e-5, cw)
want = reference_batch_norm_relu_conv1x1(x, w, b, 1e-5, cw)
for a, e in zip(got, want):
    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
g = torch.randn(got[0].shape).contiguous(memory_format=torch.channels_last)
ps = [t.clone().requires_grad_() for t in (x, w, b, cw)]
want = torch.autograd.grad(reference_batch_norm_relu_conv1x1(ps[0], ps[1], ps[2], 1e-5, ps[3])[0], ps, g)
got = torch.ops.asl.batch_norm_relu_conv1x1_backward(g, x, w, b, got[1], got[2], cw)
for a, e in zip(got, want):
    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S,
                         env={**os.environ, "ASL_CPU_SIMD": simd})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_gradcheck_float64(fmt):
    x, w, b, cw = (t.requires_grad_() for t in inputs((2, 3, 4, 5, 4), torch.float64, fmt))
    assert torch.autograd.gradcheck(lambda *a: torch.ops.asl.batch_norm_relu_conv1x1(a[0], a[1], a[2], 1e-5, a[3])[0],
                                    (x, w, b, cw))


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_opcheck(fmt):
    x, w, b, cw = inputs((2, 16, 4, 4, 16), torch.float32, fmt)
    torch.library.opcheck(torch.ops.asl.batch_norm_relu_conv1x1, (x, w, b, 1e-5, cw))
    x, w, b, cw = (t.requires_grad_() for t in inputs((2, 8, 4, 4, 4), torch.float64, fmt))
    torch.library.opcheck(torch.ops.asl.batch_norm_relu_conv1x1, (x, w, b, 1e-5, cw))
    x, w, b, cw = inputs((2, 16, 4, 4, 32), torch.float32, fmt)
    out, mean, invstd = torch.ops.asl.batch_norm_relu_conv1x1(x, w, b, 1e-5, cw)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.asl.batch_norm_relu_conv1x1_backward, (g, x, w, b, mean, invstd, cw))
    torch.library.opcheck(torch.ops.asl.batch_norm_relu_conv1x1_backward, (g, x, w, b, mean, invstd, cw, torch.randn_like(x)))


@compiled
def test_result_does_not_depend_on_the_thread_count():
    """The fused kernel's sums run over fixed blocks in a fixed order (the composition's
    convolution is ATen's, whose weight gradient makes no such promise)."""
    x, w, b, cw = inputs((8, 32, 16, 16, 32), torch.float32, torch.channels_last)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, mean, invstd = torch.ops.asl.batch_norm_relu_conv1x1(x, w, b, 1e-5, cw)
            g = torch.ones_like(out) * 0.1 + out * 0.01
            results.append((out, mean, invstd, *torch.ops.asl.batch_norm_relu_conv1x1_backward(g, x, w, b, mean, invstd, cw, x)))
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(*results):
        assert torch.equal(a, e)


BAD = [
    ("3-D input", lambda x, w, b, cw: (x[0], w, b, 1e-5, cw), ValueError, "4-D"),
    ("integer input", lambda x, w, b, cw: (x.long(), w, b, 1e-5, cw), TypeError, "float32 or float64"),
    ("weight of the wrong size", lambda x, w, b, cw: (x, w[:3], b, 1e-5, cw), ValueError, "weight must be"),
    ("negative eps", lambda x, w, b, cw: (x, w, b, -1.0, cw), ValueError, "eps must be >= 0"),
    ("a 3x3 conv_weight", lambda x, w, b, cw: (x, w, b, 1e-5, cw.expand(-1, -1, 3, 3)), ValueError, "conv_weight must be"),
    ("conv_weight of other input channels", lambda x, w, b, cw: (x, w, b, 1e-5, cw[:, :3]), ValueError, "conv_weight must be"),
    ("conv_weight of another dtype", lambda x, w, b, cw: (x, w, b, 1e-5, cw.double()), TypeError, "conv_weight dtype"),
]


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("name,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_wrong_inputs_raise(impl, name, make, exc, match):
    fn = torch.ops.asl.batch_norm_relu_conv1x1 if impl == "op" else reference_batch_norm_relu_conv1x1
    with pytest.raises(exc, match=match):
        fn(*make(*inputs((2, 4, 3, 3, 6))))


def test_backward_rejects_wrong_gradients_and_statistics():
    fn = torch.ops.asl.batch_norm_relu_conv1x1_backward
    x, w, b, cw = inputs((2, 4, 3, 3, 6))
    out, mean, invstd = torch.ops.asl.batch_norm_relu_conv1x1(x, w, b, 1e-5, cw)
    g = torch.randn_like(out)
    with pytest.raises(ValueError, match="grad_output must be"):
        fn(torch.randn_like(x), x, w, b, mean, invstd, cw)
    with pytest.raises(ValueError, match="mean must be"):
        fn(g, x, w, b, mean[:3], invstd, cw)
    with pytest.raises(TypeError, match="invstd must be"):
        fn(g, x, w, b, mean, invstd.double(), cw)
    with pytest.raises(ValueError, match="grad_residual must have the input's shape"):
        fn(g, x, w, b, mean, invstd, cw, g)
    with pytest.raises(TypeError, match="grad_residual must be"):
        fn(g, x, w, b, mean, invstd, cw, x.double())


def fused_pair(C=16, Co=32):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())
    conv = nn.Conv2d(C, Co, 1, bias=False)
    fuse_bn_relu(seq)
    return seq, conv


def test_bn_relu_conv_skip_uses_one_call_where_it_fuses(monkeypatch):
    calls = []
    real = torch.ops.asl.batch_norm_relu_conv1x1
    monkeypatch.setattr(torch.ops.asl, "batch_norm_relu_conv1x1", lambda *a: calls.append(1) or real(*a))
    seq, conv = fused_pair()
    x = torch.randn(2, 16, 5, 5)
    for fmt, want in ((torch.channels_last, 1), (torch.contiguous_format, 0)):
        calls.clear()
        bn_relu_conv_skip(seq, conv, x.contiguous(memory_format=fmt))
        assert len(calls) == want, fmt
    calls.clear()
    for other in (nn.Conv2d(16, 32, 1, bias=True), nn.Conv2d(16, 32, 1, stride=2, bias=False),
                  nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.Conv2d(16, 24, 1, bias=False)):
        bn_relu_conv_skip(seq, other, x.contiguous(memory_format=torch.channels_last))
    seq.eval()
    bn_relu_conv_skip(seq, conv, x.contiguous(memory_format=torch.channels_last))
    assert calls == []


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_bn_relu_conv_skip_trains_as_the_plain_modules(fmt):
    """Outputs, the four parameters' gradients, the input's two gradients summed and the running
    statistics: those of BatchNorm2d, ReLU and Conv2d run in turn, to float rounding."""
    seq, conv = fused_pair()
    plain_seq, plain_conv = copy.deepcopy(seq), copy.deepcopy(conv)
    x = (torch.randn(4, 16, 6, 6) * 2 + 1).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, skip = bn_relu_conv_skip(seq, conv, xa)
    (out.square().sum() + (skip * 3).sum()).backward()
    ref = plain_conv(torch.relu(F.batch_norm(xb, plain_seq[0].running_mean, plain_seq[0].running_var,
                                             plain_seq[0].weight, plain_seq[0].bias, True, 0.1, 1e-5)))
    (ref.square().sum() + (xb * 3).sum()).backward()
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for p, q in zip(list(seq.parameters()) + [conv.weight], list(plain_seq.parameters()) + [plain_conv.weight]):
        torch.testing.assert_close(p.grad, q.grad, **tol)
    torch.testing.assert_close(seq[0].running_mean, plain_seq[0].running_mean)
    torch.testing.assert_close(seq[0].running_var, plain_seq[0].running_var)
    assert int(seq[0].num_batches_tracked) == 1


def test_a_fused_identity_block_trains_as_the_plain_one():
    """Three SGD steps of a fused PreActBlock without a projection (its preact and conv1 one
    batch_norm_relu_conv1x1 call) against the same block unfused: parameters and statistics agree."""
    torch.manual_seed(0)
    plain = PreActBlock(16, 16, 32, 1, generator=torch.Generator().manual_seed(0)).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(plain)
    fuse_bn_relu(fused)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, fused)]
    for _ in range(3):
        x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
        for m, opt in zip((plain, fused), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (k, a), e in zip(fused.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=k)


def test_flop_counter_counts_the_convolution_forward_and_backward():
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b, cw = (t.requires_grad_() for t in inputs((2, 16, 4, 5, 32)))
    with FlopCounterMode(display=False) as fc:
        torch.ops.asl.batch_norm_relu_conv1x1(x, w, b, 1e-5, cw)[0].sum().backward()
    macs = 2 * 4 * 5 * 16 * 32
    assert fc.get_total_flops() == 2 * macs * 3
