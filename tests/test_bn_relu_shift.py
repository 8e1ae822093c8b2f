"""The fused BatchNorm-ReLU-shift training operator against the references of its two parts, its
registration, and the ASL block that uses it against the same block run as two modules."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from asl_cli.nn import bn_relu_shift, fuse_bn_relu
from asl_cli.ops import (backends, reference_active_shift, reference_batch_norm_relu, reference_batch_norm_relu_shift)
from asl_cli.zoo.blocks import PreActBlock
from conftest import HANG_GUARD_S

compiled = pytest.mark.skipif(backends()["cpu"] != "compiled C++", reason="needs the compiled CPU extension")
LAYOUTS = [torch.contiguous_format, torch.channels_last]

# (N, C, H, W, stride, padding, shift scale): scale 1 keeps every channel within a pixel (the
# blended rows where C fills vectors), PAST_A_PIXEL moves a few of those one pixel further each way
# (three offsets per axis, still the blended rows), 2 spreads them over four offsets (the blended
# rows at stride 1 and in the forward; in the backward at stride 2 and for a channel tail the
# padded copies or the two operators), 12 past the image (the two operators in turn); C 20 and 24
# leave a channel tail.
PAST_A_PIXEL = "past a pixel"
CASES = [(2, 32, 7, 9, 1, 0, 1.0), (2, 16, 8, 8, 2, 0, 1.0), (1, 48, 6, 5, 2, 1, 1.0), (2, 16, 5, 7, (2, 1), 1, 1.0),
         (2, 32, 7, 9, 1, 0, PAST_A_PIXEL), (2, 16, 9, 8, 2, 1, PAST_A_PIXEL), (1, 48, 6, 5, 2, 0, PAST_A_PIXEL),
         (2, 32, 7, 9, 1, 1, 2.0), (2, 16, 8, 8, 2, 0, 2.0), (2, 20, 6, 6, 1, 0, 1.0), (2, 24, 9, 8, 2, 1, 2.0),
         (2, 16, 6, 6, 1, 0, 12.0), (3, 16, 2, 2, 1, 0, 1.0)]


def make(case, dtype=torch.float32, fmt=torch.channels_last, seed=0):
    N, C, H, W, stride, padding, scale = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g, dtype=dtype) * 2 + 1).contiguous(memory_format=fmt)
    w = torch.randn(C, generator=g, dtype=dtype)
    b = torch.randn(C, generator=g, dtype=dtype) * 0.5
    if scale == PAST_A_PIXEL:
        s = torch.rand(C, 2, generator=g, dtype=dtype) * 2 - 1
        s[3::5, 0] += 1.0
        s[2::7, 1] -= 1.0
    else:
        s = (torch.rand(C, 2, generator=g, dtype=dtype) * 2 - 1) * scale
    st = [stride, stride] if isinstance(stride, int) else list(stride)
    return x, w, b, s, st, [padding, padding]


def reference_grads(x, w, b, s, st, pd, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s)]
    a, _, _ = reference_batch_norm_relu(leaves[0], leaves[1], leaves[2], 1e-5)
    reference_active_shift(a, leaves[3], st, pd).backward(grad)
    return [t.grad for t in leaves]


@compiled
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_references_and_the_two_operators(case, fmt, dtype):
    """Output, statistics and all four gradients against the references (autograd through
    reference_batch_norm_relu and reference_active_shift); the output equal bit for bit to
    batch_norm_relu followed by active_shift, in the input's memory format."""
    x, w, b, s, st, pd = make(case, dtype, fmt)
    out, mean, invstd = torch.ops.asl.batch_norm_relu_shift(x, w, b, 1e-5, s, st, pd)
    ref, rmean, rinvstd = reference_batch_norm_relu_shift(x, w, b, 1e-5, s, st, pd)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(mean, rmean, **tol)
    torch.testing.assert_close(invstd, rinvstd, **tol)
    assert out.is_contiguous(memory_format=fmt)
    a, m2, i2 = torch.ops.asl.batch_norm_relu(x, w, b, 1e-5)
    assert torch.equal(mean, m2) and torch.equal(invstd, i2)
    assert torch.equal(out, torch.ops.asl.active_shift(a, s, st, pd))
    grad = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    got = torch.ops.asl.batch_norm_relu_shift_backward(grad, x, w, b, mean, invstd, s, st, pd)
    want = reference_grads(x, w, b, s, st, pd, grad)
    gtol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-8)
    for name, g_, e in zip(("input", "weight", "bias", "shift"), got, want):
        torch.testing.assert_close(g_, e.to(g_.dtype), **gtol, msg=lambda m: f"grad {name}: {m}")
    assert got[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_without_the_shift_gradient(case, fmt):
    """shift_grad=False (fixed shifts) gives the same input, weight and bias gradients bit for bit,
    and no shift gradient, in every path (blended rows, padded copies, the two operators) and in
    the composite that other devices run."""
    from asl_cli.ops.batch_norm_relu_shift import _composite_backward

    x, w, b, s, st, pd = make(case, fmt=fmt)
    out, mean, invstd = torch.ops.asl.batch_norm_relu_shift(x, w, b, 1e-5, s, st, pd)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    for op in (torch.ops.asl.batch_norm_relu_shift_backward, _composite_backward):
        full = op(grad, x, w, b, mean, invstd, s, st, pd)
        part = op(grad, x, w, b, mean, invstd, s, st, pd, False)
        assert full[3] is not None and part[3] is None
        for a, e in zip(part[:3], full[:3]):
            assert torch.equal(a, e)


def test_fixed_shifts_skip_the_shift_gradient():
    """Autograd asks the backward for the shift gradient only when the shift requires grad."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flags = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.asl.batch_norm_relu_shift_backward.default:
                self.flags.append(args[9] if len(args) > 9 else (kwargs or {}).get("shift_grad", True))
            return func(*args, **(kwargs or {}))

    x, w, b, s, st, pd = make(CASES[0])
    grads = {}
    for trainable in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)] + [s.detach().clone().requires_grad_(trainable)]
        with Record() as rec:
            out, _, _ = torch.ops.asl.batch_norm_relu_shift(leaves[0], leaves[1], leaves[2], 1e-5, leaves[3], st, pd)
            out.square().sum().backward()
        assert rec.flags == [trainable]
        assert (leaves[3].grad is not None) == trainable
        grads[trainable] = [t.grad for t in leaves[:3]]
    for a, e in zip(grads[False], grads[True]):
        assert torch.equal(a, e)


@compiled
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]])
def test_gradcheck_float64(case):
    x, w, b, s, st, pd = make(case[:2] + (4, 5) + case[4:], torch.float64)
    leaves = [t.requires_grad_() for t in (x, w, b, s)]
    assert torch.autograd.gradcheck(lambda *a: torch.ops.asl.batch_norm_relu_shift(a[0], a[1], a[2], 1e-5, a[3], st, pd)[0],
                                    leaves)


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_opcheck(fmt):
    for dtype in (torch.float32, torch.float64):
        x, w, b, s, st, pd = make((2, 16, 5, 6, 1, 0, 1.0), dtype, fmt)
        torch.library.opcheck(torch.ops.asl.batch_norm_relu_shift, (x, w, b, 1e-5, s, st, pd))
        leaves = [t.requires_grad_() for t in (x, w, b, s)]
        torch.library.opcheck(torch.ops.asl.batch_norm_relu_shift, (leaves[0], leaves[1], leaves[2], 1e-5, leaves[3], st, pd))
        _, mean, invstd = torch.ops.asl.batch_norm_relu_shift(x.detach(), w.detach(), b.detach(), 1e-5, s.detach(), st, pd)
        for shift_grad in (True, False):
            torch.library.opcheck(torch.ops.asl.batch_norm_relu_shift_backward,
                                  (torch.randn(2, 16, 5, 6, dtype=dtype), x.detach(), w.detach(), b.detach(), mean, invstd,
                                   s.detach(), st, pd, shift_grad))


@compiled
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]])
def test_result_does_not_depend_on_the_thread_count(case):
    x, w, b, s, st, pd = make((8,) + case[1:])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, mean, invstd = torch.ops.asl.batch_norm_relu_shift(x, w, b, 1e-5, s, st, pd)
            g = torch.ones_like(out)
            results.append((out, mean, invstd, *torch.ops.asl.batch_norm_relu_shift_backward(g, x, w, b, mean, invstd, s, st, pd)))
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(*results):
        assert torch.equal(a, e)


@compiled
@pytest.mark.parametrize("simd", ["scalar", "avx2"])
def test_lower_instruction_sets_match_the_references(simd):
    """ASL_CPU_SIMD below the CPU's best runs the AVX2 and one-lane forms of the fused kernels
    (blended rows and padded copies) on this machine: the same checks against the references."""
    script = r"""
import torch
from asl_cli.ops import reference_active_shift, reference_batch_norm_relu, reference_batch_norm_relu_shift
for C, stride, scale in [(32, 1, 1.0), (16, 2, 1.0), (16, 1, 2.0), (24, 2, 2.0)]:
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(2, C, 7, 6, generator=g) * 2 + 1).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g) * 0.5
    s = (torch.rand(C, 2, generator=g) * 2 - 1) * scale
    st, pd = [stride, stride], [0, 0]
    out, mean, invstd = torch.ops.asl.batch_norm_relu_shift(x, w, b, 1e-5, s, st, pd)
    torch.testing.assert_close(out, reference_batch_norm_relu_shift(x, w, b, 1e-5, s, st, pd)[0], rtol=1e-4, atol=1e-4)
    grad = torch.randn(out.shape, generator=g).contiguous(memory_format=torch.channels_last)
    got = torch.ops.asl.batch_norm_relu_shift_backward(grad, x, w, b, mean, invstd, s, st, pd)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s)]
    reference_active_shift(reference_batch_norm_relu(*leaves[:3], 1e-5)[0], leaves[3], st, pd).backward(grad)
    for a, e in zip(got, leaves):
        torch.testing.assert_close(a, e.grad, rtol=1e-3, atol=1e-3)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S,
                         env={**os.environ, "ASL_CPU_SIMD": simd})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_non_finite_shift_gives_nan_channels_as_the_two_operators():
    x, w, b, s, st, pd = make(CASES[0])
    s[3, 0] = float("nan")
    out, mean, invstd = torch.ops.asl.batch_norm_relu_shift(x, w, b, 1e-5, s, st, pd)
    a, _, _ = torch.ops.asl.batch_norm_relu(x, w, b, 1e-5)
    want = torch.ops.asl.active_shift(a, s, st, pd)
    assert torch.equal(out.isnan(), want.isnan()) and out[:, 3].isnan().all()
    torch.testing.assert_close(out[~out.isnan()], want[~want.isnan()])


BAD = [
    ("3-D input", lambda x, w, b, s: (x[0], w, b, 1e-5, s), ValueError, "4-D"),
    ("weight of the wrong size", lambda x, w, b, s: (x, w[:3], b, 1e-5, s), ValueError, "weight must be"),
    ("negative eps", lambda x, w, b, s: (x, w, b, -1.0, s), ValueError, "eps must be >= 0"),
    ("shift of the wrong shape", lambda x, w, b, s: (x, w, b, 1e-5, s[:, :1]), ValueError, "shift must have shape"),
    ("integer shift", lambda x, w, b, s: (x, w, b, 1e-5, s.long()), TypeError, "shift must be a floating-point"),
]


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("name,args,exc,match", BAD, ids=[b[0] for b in BAD])
def test_wrong_inputs_raise(impl, name, args, exc, match):
    x, w, b, s, st, pd = make(CASES[0])
    fn = torch.ops.asl.batch_norm_relu_shift if impl == "op" else reference_batch_norm_relu_shift
    with pytest.raises(exc, match=match):
        fn(*args(x, w, b, s), st, pd)


def test_backward_rejects_wrong_gradients_and_statistics():
    x, w, b, s, st, pd = make(CASES[1])
    out, mean, invstd = torch.ops.asl.batch_norm_relu_shift(x, w, b, 1e-5, s, st, pd)
    op = torch.ops.asl.batch_norm_relu_shift_backward
    with pytest.raises(ValueError, match="grad_output must have shape"):
        op(torch.randn(x.shape), x, w, b, mean, invstd, s, st, pd)
    with pytest.raises(ValueError, match="mean must be"):
        op(torch.randn(out.shape), x, w, b, mean[:3], invstd, s, st, pd)
    with pytest.raises(TypeError, match="invstd must be"):
        op(torch.randn(out.shape), x, w, b, mean, invstd.double(), s, st, pd)


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_the_block_trains_as_with_two_modules(fmt, stride):
    """PreActBlock with its BatchNorm-ReLU pairs fused runs bn1 and the shift as one operator;
    three SGD steps give the parameters, running statistics and outputs of the block whose
    bn1-and-shift run as two modules (bn_relu_shift's other branch), with the same state-dict keys."""
    torch.manual_seed(0)
    block = PreActBlock(16, 32, 16, stride, generator=torch.Generator().manual_seed(0)).to(memory_format=fmt)
    fuse_bn_relu(block)
    plain = copy.deepcopy(block)

    def two_modules(m, x):
        pre = m.preact(x)
        out = m.conv2(m.spatial(m.bn1(m.conv1(pre))))
        return out + (m.shortcut(pre) if m.shortcut is not None else x)

    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (block, plain)]
    for _ in range(3):
        x = torch.randn(4, 16, 8, 8).contiguous(memory_format=fmt)
        for run, m, opt in ((block, block, opts[0]), (lambda v: two_modules(plain, v), plain, opts[1])):
            opt.zero_grad()
            run(x).square().mean().backward()
            opt.step()
    assert list(block.state_dict()) == list(plain.state_dict())
    for (k, a), e in zip(block.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=k)
    block.eval(), plain.eval()
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x), two_modules(plain, x), rtol=1e-4, atol=1e-5)


def test_bn_relu_shift_takes_one_call_only_where_it_fuses(monkeypatch):
    from asl_cli.nn import ActiveShift2d, BatchNormReLU2d

    calls = []
    real = torch.ops.asl.batch_norm_relu_shift

    class Ops:
        def __getattr__(self, name):
            if name == "batch_norm_relu_shift":
                return lambda *a: calls.append(1) or real(*a)
            return getattr(torch.ops.asl, name)

    import asl_cli.nn.norm_act as norm_act
    monkeypatch.setattr(norm_act, "torch", type("T", (), {"ops": type("O", (), {"asl": Ops()})(),
                                                          "__getattr__": lambda self, n: getattr(torch, n)})())
    bn, shift = BatchNormReLU2d(16), ActiveShift2d(16)
    x = torch.randn(2, 16, 6, 6)
    out = bn_relu_shift(torch.nn.Sequential(bn, torch.nn.Identity()), shift, x)
    assert len(calls) == 1 and bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(out, shift(torch.relu(torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))),
                               rtol=1e-5, atol=1e-5)
    bn.eval()
    bn_relu_shift(bn, shift, x)
    plain = torch.nn.Sequential(torch.nn.BatchNorm2d(16), torch.nn.ReLU())
    bn_relu_shift(plain, shift, x)
    assert len(calls) == 1
