"""The fused training BatchNorm-ReLU operator against the reference, and BatchNormReLU2d against
nn.BatchNorm2d + nn.ReLU."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from asl_cli.nn import BatchNormReLU2d, bn_relu_skip, fuse_bn_relu
from asl_cli.ops import reference_batch_norm_relu, reference_batch_norm_relu_backward
from asl_cli.ops import backends
from conftest import HANG_GUARD_S

compiled = pytest.mark.skipif(backends()["cpu"] != "compiled C++", reason="needs the compiled CPU extension")
LAYOUTS = [torch.contiguous_format, torch.channels_last]
# channels: 16, 32, 48 and 80 take the channels_last AVX-512 loops (whole vectors, 80 in a chunk of
# four and one of one) where the CPU has them; 5, 24 and 8 the others
SHAPES = [(4, 16, 8, 8), (2, 5, 7, 3), (3, 24, 1, 1), (1, 8, 33, 17), (2, 32, 5, 7), (3, 48, 3, 3), (2, 80, 4, 5)]


def inputs(shape, dtype=torch.float32, fmt=torch.contiguous_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 3).contiguous(memory_format=fmt)  # a mean far from 0
    w = torch.randn(C, generator=g, dtype=dtype)
    b = torch.randn(C, generator=g, dtype=dtype) * 0.5
    return x, w, b


@compiled
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_backward_match_the_reference(shape, fmt, dtype):
    x, w, b = inputs(shape, dtype, fmt)
    out, mean, invstd = torch.ops.asl.batch_norm_relu(x, w, b, 1e-5)
    ref, rmean, rinvstd = reference_batch_norm_relu(x, w, b, 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(mean, rmean, **tol)
    torch.testing.assert_close(invstd, rinvstd, **tol)
    assert out.is_contiguous(memory_format=fmt)
    g = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    got = torch.ops.asl.batch_norm_relu_backward(g, x, w, b, mean, invstd)
    want = reference_batch_norm_relu_backward(g, x, w, b, mean, invstd)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol)
    assert got[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[-1:])
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("residual_fmt", ["same", "other"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_residual_is_added_as_autograd_adds_it(impl, shape, fmt, residual_fmt, dtype):
    """grad_input with grad_residual is grad_input without it, plus grad_residual: the same bits as
    autograd's sum of a tensor's two gradients, in any layout of grad_residual."""
    fn = torch.ops.asl.batch_norm_relu_backward if impl == "op" else reference_batch_norm_relu_backward
    x, w, b = inputs(shape, dtype, fmt)
    _, mean, invstd = torch.ops.asl.batch_norm_relu(x, w, b, 1e-5)
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(shape, dtype=dtype, generator=gen).contiguous(memory_format=fmt)
    other = torch.contiguous_format if fmt == torch.channels_last else torch.channels_last
    r = torch.randn(shape, dtype=dtype, generator=gen).contiguous(memory_format=fmt if residual_fmt == "same" else other)
    gx, gw, gb = fn(g, x, w, b, mean, invstd)
    gx_r, gw_r, gb_r = fn(g, x, w, b, mean, invstd, r)
    assert torch.equal(gx_r, gx + r) and torch.equal(gw_r, gw) and torch.equal(gb_r, gb)
    assert gx_r.is_contiguous(memory_format=fmt)


@compiled
@pytest.mark.parametrize("simd", ["scalar", "avx2"])
def test_lower_instruction_sets_match_the_reference(simd):
    """ASL_CPU_SIMD below avx512 turns the channels_last AVX-512 loops off: the loops every CPU runs
    then give the same values as the reference at channel counts that would take them."""
    script = r"""
import torch
from asl_cli.ops import reference_batch_norm_relu, reference_batch_norm_relu_backward
torch.manual_seed(0)
for shape in [(2, 16, 5, 7), (2, 80, 4, 5)]:
    x = (torch.randn(shape) * 2 + 3).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1]), torch.randn(shape[1]) * 0.5
    got = torch.ops.asl.batch_norm_relu(x, w, b, 1e-5)
    want = reference_batch_norm_relu(x, w, b, 1e-5)
    g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    got += torch.ops.asl.batch_norm_relu_backward(g, x, w, b, got[1], got[2], x)
    want += reference_batch_norm_relu_backward(g, x, w, b, got[1], got[2], x)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S,
                         env={**os.environ, "ASL_CPU_SIMD": simd})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_gradcheck_float64(fmt):
    x, w, b = inputs((2, 3, 4, 5), torch.float64, fmt)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: torch.ops.asl.batch_norm_relu(*a, 1e-5)[0], (x, w, b))


def test_matches_autograd_through_aten():
    x, w, b = inputs((4, 6, 5, 5), torch.float64)
    params = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = torch.relu(torch.nn.functional.batch_norm(params[0], None, None, params[1], params[2], True, 0.0, 1e-5))
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, params, g)
    params2 = [t.clone().requires_grad_() for t in (x, w, b)]
    got = torch.autograd.grad(torch.ops.asl.batch_norm_relu(*params2, 1e-5)[0], params2, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_opcheck(fmt):
    x, w, b = inputs((2, 8, 4, 4), torch.float32, fmt)
    torch.library.opcheck(torch.ops.asl.batch_norm_relu, (x, w, b, 1e-5))
    x, w, b = (t.requires_grad_() for t in inputs((2, 8, 4, 4), torch.float64, fmt))
    torch.library.opcheck(torch.ops.asl.batch_norm_relu, (x, w, b, 1e-5))
    _, mean, invstd = torch.ops.asl.batch_norm_relu(x.detach(), w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(torch.ops.asl.batch_norm_relu_backward, (torch.randn_like(x), x.detach(), w.detach(), b.detach(), mean, invstd))
    torch.library.opcheck(torch.ops.asl.batch_norm_relu_backward,
                          (torch.randn_like(x), x.detach(), w.detach(), b.detach(), mean, invstd, torch.randn_like(x)))


@compiled
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_result_does_not_depend_on_the_thread_count(fmt):
    x, w, b = inputs((8, 32, 16, 16), torch.float32, fmt)
    g = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, mean, invstd = torch.ops.asl.batch_norm_relu(x, w, b, 1e-5)
            results.append((out, mean, invstd, *torch.ops.asl.batch_norm_relu_backward(g, x, w, b, mean, invstd),
                            torch.ops.asl.batch_norm_relu_backward(g, x, w, b, mean, invstd, x)[0]))
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(*results):
        assert torch.equal(a, e)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_module_trains_like_batchnorm_and_relu(momentum, fmt):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(), nn.Conv2d(8, 4, 1))
    plain = plain.to(memory_format=fmt)
    fused = copy.deepcopy(plain)
    assert fuse_bn_relu(fused) == 1
    assert isinstance(fused[1], BatchNormReLU2d) and isinstance(fused[2], nn.Identity)
    assert list(fused.state_dict()) == list(plain.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, fused)]
    for step in range(3):
        x = torch.randn(4, 3, 10, 10).contiguous(memory_format=fmt)
        for m, opt in zip((plain, fused), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (k, a), e in zip(fused.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=k)
    for m in (plain, fused):
        m.eval()
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-5)


def test_forward_mode_ad_and_func_transforms_take_the_plain_pair():
    torch.manual_seed(0)
    bn = BatchNormReLU2d(4)
    x, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    ref = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    with torch.autograd.forward_ad.dual_level():
        got = torch.autograd.forward_ad.unpack_dual(bn(torch.autograd.forward_ad.make_dual(x, t))).tangent
        want = torch.autograd.forward_ad.unpack_dual(ref(torch.autograd.forward_ad.make_dual(x, t))).tangent
    torch.testing.assert_close(got, want)
    # under torch.func the running statistics cannot be updated (as for nn.BatchNorm2d)
    bn, ref = BatchNormReLU2d(4, track_running_stats=False), nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    _, got = torch.func.jvp(bn, (x,), (t,))
    _, want = torch.func.jvp(ref, (x,), (t,))
    torch.testing.assert_close(got, want)


def test_fuse_leaves_other_modules_alone():
    m = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm1d(4), nn.ReLU(),
                      nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(inplace=True)))
    assert fuse_bn_relu(m) == 1
    assert type(m[0]) is nn.BatchNorm2d and type(m[3]) is nn.BatchNorm1d and isinstance(m[4], nn.ReLU)
    assert isinstance(m[5][0], BatchNormReLU2d)


BAD = [
    ("3-D input", lambda x, w, b: (x[0], w, b), ValueError, "4-D"),
    ("integer input", lambda x, w, b: (x.long(), w, b), TypeError, "float32 or float64"),
    ("weight of the wrong size", lambda x, w, b: (x, w[:3], b), ValueError, "weight must be"),
    ("bias of another dtype", lambda x, w, b: (x, w, b.double()), TypeError, "bias dtype"),
    ("one value per channel", lambda x, w, b: (x[:1, :, :1, :1], w, b), ValueError, "more than 1 value per channel"),
    ("negative eps", lambda x, w, b: (x, w, b, -1.0), ValueError, "eps must be >= 0"),
]


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("name,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_wrong_inputs_raise(impl, name, make, exc, match):
    x, w, b = inputs((2, 4, 3, 3))
    fn = torch.ops.asl.batch_norm_relu if impl == "op" else reference_batch_norm_relu
    args = make(x, w, b)
    with pytest.raises(exc, match=match):
        fn(*args, *(() if len(args) == 4 else (1e-5,)))


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_backward_rejects_a_gradient_of_another_shape_and_wrong_statistics(impl):
    fn = torch.ops.asl.batch_norm_relu_backward if impl == "op" else reference_batch_norm_relu_backward
    x, w, b = inputs((2, 4, 3, 3))
    _, mean, invstd = torch.ops.asl.batch_norm_relu(x, w, b, 1e-5)
    with pytest.raises(ValueError, match="grad_output must have the input's shape"):
        fn(torch.randn(2, 4, 3, 2), x, w, b, mean, invstd)
    with pytest.raises(ValueError, match="mean must be"):
        fn(torch.randn_like(x), x, w, b, mean[:3], invstd)
    with pytest.raises(TypeError, match="invstd must be"):
        fn(torch.randn_like(x), x, w, b, mean, invstd.double())
    with pytest.raises(ValueError, match="grad_residual must have the input's shape"):
        fn(torch.randn_like(x), x, w, b, mean, invstd, torch.randn(2, 4, 3, 2))
    with pytest.raises(TypeError, match="grad_residual must be"):
        fn(torch.randn_like(x), x, w, b, mean, invstd, torch.randn_like(x).double())


def test_train_fuses_on_the_cpu_in_channels_last_by_default():
    from asl_cli.train.model_setup import use_fused_bn_relu

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_fused_bn_relu("auto", cpu, True)
    assert not use_fused_bn_relu("auto", cpu, False) and not use_fused_bn_relu("auto", cuda, True)
    assert use_fused_bn_relu(True, cuda, False) and not use_fused_bn_relu(False, cpu, True)


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_bn_relu_skip_gives_the_input_both_gradients_as_autograd_would(fmt):
    """pre, skip = bn_relu_skip(bn, x); loss of pre and skip: the same bits for x, weight and bias
    as bn(x) and x itself (autograd summing x's two gradients), and the same running statistics."""
    torch.manual_seed(0)
    bn = BatchNormReLU2d(16)
    x = (torch.randn(4, 16, 6, 6) * 2 + 1).contiguous(memory_format=fmt)
    results = []
    for fused in (True, False):
        m = copy.deepcopy(bn)
        xi = x.clone().requires_grad_()
        pre, skip = bn_relu_skip(m, xi) if fused else (m(xi), xi)
        if fused:
            assert skip is not xi and torch.equal(skip, xi) and skip.grad_fn is not None
        (pre * torch.linspace(-1, 1, pre.numel()).view_as(pre) + skip.square()).sum().backward()
        results.append((pre.detach(), xi.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var))
    for a, e in zip(*results):
        assert torch.equal(a, e)


def test_bn_relu_skip_of_a_plain_pair_is_the_pair_and_the_input_itself():
    seq = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(2, 4, 3, 3)
    pre, skip = bn_relu_skip(seq, x)
    assert skip is x and torch.equal(pre, seq(x))
