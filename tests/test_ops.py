"""The operator against its reference: values, gradients, registration, compile, errors."""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import asl_cli
from asl_cli.ops import active_shift, grid_sample_shift, output_size, reference_active_shift
from conftest import HANG_GUARD_S

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# (N, C, H, W, stride, padding, shift scale): odd and unequal sizes, C = 1, shifts larger than
# the image, strides 1 and 2, padding.
CASES = [
    (2, 3, 7, 9, 1, 0, 1.5),
    (1, 1, 5, 4, 1, 0, 0.7),
    (3, 5, 8, 5, 2, 1, 2.5),
    (2, 4, 6, 6, 1, 2, 1.0),
    (2, 3, 9, 7, 2, 0, 1.2),
    (1, 2, 4, 6, 1, 0, 12.0),
    (2, 6, 1, 1, 1, 0, 0.8),
    (1, 3, 11, 3, (2, 1), (0, 1), 1.7),
    # channels_last images whose pixels and channels are multiples of 8 (the CPU transposes them
    # to planes in 8 x 8 register blocks), at strides 1 and 2
    (2, 16, 8, 12, 1, 0, 2.0),
    (2, 8, 8, 8, 2, 1, 1.5),
    # shifts of up to 10 px: the CPU blends channels that reach at most 8 px outside from
    # zero-bordered planes and the others with bounds checks, both in one call
    (2, 16, 16, 16, 1, 0, 10.0),
    (2, 8, 16, 24, 2, 1, 10.0),
]


def rand_shift(C, scale, dtype=torch.float64, device="cpu"):
    return ((torch.rand(C, 2, dtype=dtype) * 2 - 1) * scale).to(device)


def ref_grads(x, s, stride, padding, g):
    xx = x.detach().clone().requires_grad_(True)
    ss = s.detach().clone().requires_grad_(True)
    reference_active_shift(xx, ss, stride, padding).backward(g)
    return xx.grad, ss.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, channels_last, dtype, device):
    N, C, H, W, stride, padding, scale = case
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(N, C, H, W, dtype=dtype, device=device).contiguous(memory_format=fmt)
    s = rand_shift(C, scale, dtype, device)
    y = active_shift(x, s, stride, padding)
    r = reference_active_shift(x, s, stride, padding)
    sp = (stride, stride) if isinstance(stride, int) else stride
    pp = (padding, padding) if isinstance(padding, int) else padding
    assert y.shape == (N, C, output_size(H, sp[0], pp[0]), output_size(W, sp[1], pp[1]))
    assert y.dtype == dtype
    if channels_last and C > 1 and H * W > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, r, **tol)

    g = torch.randn_like(y)
    x2 = x.detach().requires_grad_(True)
    s2 = s.detach().requires_grad_(True)
    active_shift(x2, s2, stride, padding).backward(g)
    gx, gs = ref_grads(x, s, stride, padding, g)
    torch.testing.assert_close(x2.grad, gx, **tol)
    gtol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s2.grad, gs, **gtol)


@pytest.mark.parametrize("device", DEVICES)
def test_integer_and_negative_shifts(device):
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, device=device)
    s = torch.tensor([[0.0, 0.0], [-2.0, 1.0], [3.0, -1.0], [-1.0, -3.0]], dtype=torch.float64, device=device)
    torch.testing.assert_close(active_shift(x, s), reference_active_shift(x, s))


def zero_filled_roll(x, dx, dy):
    """y[i, j] = x[i + dy, j + dx], zero where that is outside."""
    H, W = x.shape[-2:]
    y = torch.zeros_like(x)
    for i in range(H):
        for j in range(W):
            if 0 <= i + dy < H and 0 <= j + dx < W:
                y[..., i, j] = x[..., i + dy, j + dx]
    return y


def test_integer_shift_is_zero_filled_roll():
    x = torch.randn(2, 3, 5, 6)
    shifts = [(1, 0), (-2, 1), (0, -3)]
    s = torch.tensor(shifts, dtype=torch.float32)
    y = active_shift(x, s)
    for c, (dx, dy) in enumerate(shifts):
        torch.testing.assert_close(y[:, c], zero_filled_roll(x[:, c], dx, dy), atol=0, rtol=0)


def test_stride_two_samples_at_2i_plus_shift():
    # The authors' stride-2 layers sample at (2i + beta, 2j + alpha) with no padding.
    x = torch.arange(64, dtype=torch.float64).reshape(1, 1, 8, 8)
    s = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    y = active_shift(x, s, stride=2)
    assert y.shape == (1, 1, 4, 4)
    expected = torch.tensor([[x[0, 0, 2 * i + 1, 2 * j + 1].item() if 2 * i + 1 < 8 and 2 * j + 1 < 8 else 0 for j in range(4)] for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(y[0, 0], expected)


def test_half_pixel_is_average_of_neighbours():
    x = torch.randn(1, 1, 4, 5, dtype=torch.float64)
    s = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    y = active_shift(x, s)
    torch.testing.assert_close(y[0, 0, :, :-1], 0.5 * (x[0, 0, :, :-1] + x[0, 0, :, 1:]))
    torch.testing.assert_close(y[0, 0, :, -1], 0.5 * x[0, 0, :, -1])


def test_grid_sample_peer_agrees():
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    s = rand_shift(3, 2.0)
    torch.testing.assert_close(grid_sample_shift(x, s), reference_active_shift(x, s))


def away_from_integers(C, device="cpu"):
    base = torch.randint(-2, 2, (C, 2), dtype=torch.float64)
    return (base + 0.2 + 0.6 * torch.rand(C, 2, dtype=torch.float64)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((1, 2), (1, 0))])
def test_gradcheck(stride, padding, device):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    s = away_from_integers(3, device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: active_shift(a, b, stride, padding), (x, s))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_channels_last(device):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    s = away_from_integers(3, device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: active_shift(a, b), (x, s))


def test_integer_position_gradient_is_right_difference():
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    s = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    active_shift(x, s).sum().backward()
    xp = torch.nn.functional.pad(x, (0, 1, 0, 1))
    d_alpha = (xp[..., :-1, 1:] - xp[..., :-1, :-1]).sum()
    d_beta = (xp[..., 1:, :-1] - xp[..., :-1, :-1]).sum()
    torch.testing.assert_close(s.grad[0], torch.stack([d_alpha, d_beta]))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 5, 6, device=device, requires_grad=True)
    s = away_from_integers(3, device).float().requires_grad_(True)
    for args in [(x, s, [1, 1], [0, 0]), (x, s, [2, 2], [1, 1])]:
        torch.library.opcheck(torch.ops.asl.active_shift.default, args)
        y = torch.ops.asl.active_shift(*args)
        g = torch.randn_like(y)
        for op in (torch.ops.asl.active_shift_grad_input.default, torch.ops.asl.active_shift_grad_shift.default,
                   torch.ops.asl.active_shift_backward.default):
            torch.library.opcheck(op, (g, x.detach(), s.detach(), args[2], args[3]))
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(torch.ops.asl.active_shift.default, (xc, s, [1, 1], [0, 0]))


def test_torch_compile_fullgraph_matches_eager():
    from asl_cli.nn import ActiveShift2d

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), ActiveShift2d(8, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 9, 10)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    g_compiled = model[1].shift.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(g_compiled, model[1].shift.grad)


@pytest.mark.slow
def test_torch_compile_inductor():
    from asl_cli.nn import ActiveShift2d

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), ActiveShift2d(8), torch.nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


@pytest.mark.parametrize("reach", [2.0, 0.9])  # channels_last: planes (many offsets) or the stencil (few)
@pytest.mark.parametrize("channels_last", [False, True])
def test_shift_gradient_is_deterministic_across_threads(channels_last, reach):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 16, 20, 20).contiguous(memory_format=fmt)
    s = (torch.rand(16, 2) * 2 - 1) * reach
    g = torch.randn(4, 16, 20, 20).contiguous(memory_format=fmt)
    prev = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            outs.append(torch.ops.asl.active_shift_grad_shift(g, x, s, [1, 1], [0, 0]))
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(outs[0], o) for o in outs)


@pytest.mark.parametrize("stride", [1, 2])
def test_nchw_planes_split_between_threads(stride):
    """NCHW planes are shared out between threads in runs that start mid-channel (65 x 33 planes
    of 8 x 8: two threads split them at plane 1073, channel 17): every output and gradient against
    the reference, and the same bits at one and two threads."""
    x = torch.randn(65, 33, 8, 8, dtype=torch.float64, requires_grad=True)
    s = rand_shift(33, 1.0).requires_grad_(True)
    y_ref = reference_active_shift(x, s, stride)
    g = torch.randn_like(y_ref)
    gx_ref, gs_ref = torch.autograd.grad(y_ref, (x, s), g)
    prev = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            xf, sf = x.detach().float(), s.detach().float()
            y = torch.ops.asl.active_shift(xf, sf, [stride, stride], [0, 0])
            outs.append((y, *torch.ops.asl.active_shift_backward(g.float(), xf, sf, [stride, stride], [0, 0])))
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    for got, want in zip(outs[1], (y_ref, gx_ref, gs_ref)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_small_and_large_images(stride, dtype):
    """On the CPU a channels_last image whose zero-bordered copy fits in 256 KiB goes through that
    copy, a larger one row by row with its side pixels apart: both against the reference, with
    the forward and the input gradient equal to NCHW's bit for bit."""
    for H, W in ((12, 10), (84, 76)):  # 16 channels: a few KiB, and 400-800 KiB
        x = torch.randn(2, 16, H, W, dtype=dtype)
        s = rand_shift(16, 1.5, dtype)
        y = active_shift(x, s, stride)
        g = torch.randn_like(y)
        grads = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            xr = x.detach().to(memory_format=fmt, copy=True).requires_grad_(True)
            sr = s.clone().requires_grad_(True)
            out = active_shift(xr, sr, stride)
            out.backward(g.contiguous(memory_format=fmt))
            grads.append((out.detach(), xr.grad, sr.grad))
        (y0, gx0, gs0), (y1, gx1, gs1) = grads
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1), (H, W)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(y1, reference_active_shift(x, s, stride), **tol)
        gx, gs = ref_grads(x, s, stride, 0, g)
        torch.testing.assert_close(gx1, gx, **tol)
        gtol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(gs1, gs, **gtol)


def test_flop_counter_counts_four_macs_per_output():
    x = torch.randn(2, 8, 10, 12)
    s = torch.zeros(8, 2)
    with FlopCounterMode(display=False) as fc:
        active_shift(x, s, stride=2)
    assert fc.get_total_flops() == 2 * 4 * 2 * 8 * 5 * 6


def test_empty_batch():
    y = active_shift(torch.randn(0, 3, 5, 5), torch.zeros(3, 2))
    assert y.shape == (0, 3, 5, 5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_non_finite_shift_gives_nan_channel(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 5, 5).contiguous(memory_format=fmt).requires_grad_(True)
    s = torch.tensor([[0.3, 0.1], [math.nan, 0.0], [0.0, math.inf]], requires_grad=True)
    y = active_shift(x, s)
    assert torch.isfinite(y[:, 0]).all()
    assert torch.isnan(y[:, 1]).all() and torch.isnan(y[:, 2]).all()
    y.sum().backward()
    assert torch.isfinite(s.grad[0]).all() and torch.isnan(s.grad[1:]).all()


def test_huge_shift_gives_zeros():
    x = torch.randn(1, 2, 5, 5)
    s = torch.tensor([[1e30, 0.0], [0.0, -1e30]])
    assert torch.equal(active_shift(x, s), torch.zeros_like(x))


@pytest.mark.parametrize(
    "args,exc,words",
    [
        ((torch.randn(3, 5, 5), torch.zeros(3, 2)), ValueError, "4-D"),
        ((torch.randn(1, 3, 5, 5), torch.zeros(4, 2)), ValueError, "(C, 2)"),
        ((torch.randn(1, 3, 5, 5), torch.zeros(3)), ValueError, "(C, 2)"),
        ((torch.randn(1, 3, 5, 5).half(), torch.zeros(3, 2)), TypeError, "float16"),
        ((torch.randint(0, 5, (1, 3, 5, 5)), torch.zeros(3, 2)), TypeError, "int64"),
        ((torch.randn(1, 3, 5, 5), torch.zeros(3, 2, dtype=torch.long)), TypeError, "shift"),
        ((torch.randn(1, 3, 5, 5), torch.zeros(3, 2), 0), ValueError, "stride"),
        ((torch.randn(1, 3, 5, 5), torch.zeros(3, 2), 1, -1), ValueError, "padding"),
        ((torch.randn(1, 3, 5, 5), torch.zeros(3, 2), (1, 2, 3)), TypeError, "stride"),
        ((torch.randn(1, 3, 5, 5), torch.zeros(3, 2, device="meta")), ValueError, "device"),
    ],
)
def test_bad_input_errors(args, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        active_shift(*args)


def test_raw_op_checks_arguments():
    with pytest.raises(ValueError, match="4-D"):
        torch.ops.asl.active_shift(torch.randn(3, 5, 5), torch.zeros(3, 2), [1, 1], [0, 0])
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.asl.active_shift(torch.randn(1, 3, 5, 5), torch.zeros(3, 2, dtype=torch.long), [1, 1], [0, 0])
    with pytest.raises(ValueError, match="grad_output must have shape"):
        torch.ops.asl.active_shift_grad_input(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 5, 5), torch.zeros(3, 2), [1, 1], [0, 0])
    with pytest.raises(ValueError, match="stride"):
        torch.ops.asl.active_shift(torch.randn(1, 3, 5, 5), torch.zeros(3, 2), [0, 1], [0, 0])


def test_backend_report():
    b = asl_cli.backends()
    assert b["cpu"] in ("compiled C++", "pure-PyTorch reference")
    assert "cuda" in b


def test_reference_fallback_without_extension():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import asl_cli\n"
        "assert any('pure-PyTorch reference' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "assert asl_cli.backends()['cpu'] == 'pure-PyTorch reference'\n"
        "x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)\n"
        "s = (torch.rand(3, 2, dtype=torch.float64) * 0.6 + 0.2).requires_grad_(True)\n"
        "assert torch.autograd.gradcheck(lambda a, b: asl_cli.active_shift(a, b, 2, 1), (x, s))\n"
        "try:\n"
        "    torch.ops.asl.active_shift_grad_input(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 5, 5), torch.zeros(3, 2), [1, 1], [0, 0])\n"
        "except ValueError as e:\n"
        "    assert 'grad_output must have shape' in str(e)\n"
        "else:\n"
        "    raise SystemExit('the reference accepted a wrong grad_output')\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, ASL_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_half_precision(dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 8, 13, 10, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    s = rand_shift(8, 2.0, torch.float32, "cuda")
    y = active_shift(x, s)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), reference_active_shift(x.float(), s), atol=2e-2, rtol=2e-2)
    xr = x.detach().requires_grad_(True)
    sr = s.detach().requires_grad_(True)
    active_shift(xr, sr).float().sum().backward()
    assert sr.grad.dtype == torch.float32 and xr.grad.dtype == dtype
    _, gs = ref_grads(x.float(), s, 1, 0, torch.ones(4, 8, 13, 10, device="cuda"))
    torch.testing.assert_close(sr.grad, gs, atol=0.5, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_wrong_grad_shape_raises_and_never_crashes(device):
    """Run in a child process, so that a crash in the error path fails this test alone."""
    code = (
        "import torch, asl_cli\n"
        f"x, s, g = torch.randn(8, 16, 17, 19, device='{device}'), torch.rand(16, 2, device='{device}'), torch.randn(8, 16, 9, 10, device='{device}')\n"
        "for op in (torch.ops.asl.active_shift_grad_shift, torch.ops.asl.active_shift_grad_input, torch.ops.asl.active_shift_backward):\n"
        "    try:\n"
        "        op(g, x, s, [2, 2], [1, 1])\n"
        "    except ValueError as e:\n"
        "        assert 'grad_output must have shape' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit(f'{op} accepted a wrong grad_output')\n"
        "print('raised')\n"
    )
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0 and "raised" in out.stdout, out.stderr[-3000:]


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_and_is_deterministic():
    x = torch.randn(8, 16, 17, 19)
    s = rand_shift(16, 3.0, torch.float32)
    g = torch.randn(8, 16, 10, 11)  # the output's shape at stride 2, padding 1
    cpu = [torch.ops.asl.active_shift(x, s, [2, 2], [1, 1]), torch.ops.asl.active_shift_grad_shift(g, x, s, [2, 2], [1, 1])]
    xc, sc, gc = x.cuda(), s.cuda(), g.cuda()
    gpu = [torch.ops.asl.active_shift(xc, sc, [2, 2], [1, 1]), torch.ops.asl.active_shift_grad_shift(gc, xc, sc, [2, 2], [1, 1])]
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-3, rtol=1e-4)
    again = torch.ops.asl.active_shift_grad_shift(gc, xc, sc, [2, 2], [1, 1])
    assert torch.equal(again, gpu[1])


@pytest.mark.cuda
def test_cuda_compile_fullgraph():
    from asl_cli.nn import ActiveShift2d

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), ActiveShift2d(8), torch.nn.ReLU()).cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_random_cases_against_reference():
    """Random sizes, strides, paddings, layouts and shift magnitudes (integer ones too), float64."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        N, C, H, W = rng.randint(1, 2), rng.randint(1, 4), rng.randint(1, 9), rng.randint(1, 9)
        stride, padding = [rng.randint(1, 3), rng.randint(1, 3)], [rng.randint(0, 2), rng.randint(0, 2)]
        x = torch.randn(N, C, H, W, dtype=torch.float64)
        if rng.random() < 0.3:
            x = x.contiguous(memory_format=torch.channels_last)
        s = (torch.rand(C, 2, dtype=torch.float64) - 0.5) * rng.choice([1, 3, 8, 20])
        if rng.random() < 0.2:
            s = s.round()
        y = torch.ops.asl.active_shift(x, s, stride, padding)
        g = torch.randn_like(y)
        gx, gs = ref_grads(x, s, tuple(stride), tuple(padding), g)
        torch.testing.assert_close(y, reference_active_shift(x, s, tuple(stride), tuple(padding)), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(torch.ops.asl.active_shift_grad_input(g, x, s, stride, padding), gx, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(torch.ops.asl.active_shift_grad_shift(g, x, s, stride, padding), gs, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_op_equals_the_two_gradient_ops(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, 8, 12, dtype=torch.float64).contiguous(memory_format=fmt)
    s = rand_shift(5, 2.0)
    for stride, padding in [([1, 1], [0, 0]), ([2, 2], [1, 1])]:
        g = torch.randn_like(torch.ops.asl.active_shift(x, s, stride, padding))
        gi, gs = torch.ops.asl.active_shift_backward(g, x, s, stride, padding)
        torch.testing.assert_close(gi, torch.ops.asl.active_shift_grad_input(g, x, s, stride, padding))
        torch.testing.assert_close(gs, torch.ops.asl.active_shift_grad_shift(g, x, s, stride, padding))


@pytest.mark.parametrize("shape, stride, scale", [((3, 16, 12, 8), 1, 2.5), ((2, 24, 16, 16), 2, 2.5),
                                                  ((2, 5, 7, 9), 1, 2.5), ((2, 16, 16, 16), 1, 10.0),
                                                  ((2, 16, 16, 16), 2, 10.0), ((2, 64, 8, 8), 1, 1.0),
                                                  ((2, 32, 16, 16), 2, 1.0), ((2, 20, 9, 7), 1, 1.0)])
def test_channels_last_gives_the_nchw_result_bit_for_bit(shape, stride, scale):
    """On the CPU, channels_last images take a stencil over the channels' tap offsets (few
    distinct offsets, e.g. shifts within a pixel) or the NCHW plane kernels on transposed images
    (many): the forward pass and the input gradient equal NCHW's exactly either way, both taps
    summed in the same order. The shift gradient sums the same products in another order in the
    stencil, so it equals NCHW's to rounding there and exactly through the planes."""
    x = torch.randn(shape)
    s = rand_shift(shape[1], scale, torch.float32)
    args = ([stride, stride], [1, 1])
    y = torch.ops.asl.active_shift(x, s, *args)
    g = torch.randn_like(y)
    xc, gc = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    yc = torch.ops.asl.active_shift(xc, s, *args)
    assert yc.is_contiguous(memory_format=torch.channels_last) and torch.equal(yc, y)
    gi, gs = torch.ops.asl.active_shift_backward(g, x, s, *args)
    gic, gsc = torch.ops.asl.active_shift_backward(gc, xc, s, *args)
    assert gic.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gic, gi)
    if scale > 1:  # offsets spread over several pixels: the plane kernels
        assert torch.equal(gsc, gs)
    torch.testing.assert_close(gsc, gs, rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.ops.asl.active_shift_grad_input(gc, xc, s, *args), gi)
    assert torch.equal(torch.ops.asl.active_shift_grad_shift(gc, xc, s, *args), gsc)


# Shapes served by the CUDA fast path (NCHW, stride 1, rows of whole 16-byte chunks) and its
# edges: tiny planes, planes split over several blocks, padding, shifts beyond the image,
# integer shifts, every sub-chunk offset.
FAST_CASES = [
    (2, 8, 8, 8, 0, 1.0),
    (3, 5, 16, 32, 0, 3.0),
    (1, 4, 40, 64, 0, 9.0),
    (2, 3, 9, 16, 2, 1.5),
    (1, 2, 300, 512, 0, 2.0),
    (2, 6, 12, 24, 0, 30.0),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", FAST_CASES)
def test_cuda_fast_path_matches_reference(case, dtype):
    N, C, H, W, pad, scale = case
    x = torch.randn(N, C, H, W, dtype=dtype, device="cuda")
    s = rand_shift(C, scale, dtype, "cuda")
    s[0] = s[0].round()  # an integer shift: one-sided differences
    s[-1] = torch.tensor([-0.5 - 8 * (C % 3), 1.25], dtype=dtype)  # crosses chunk boundaries
    y = active_shift(x, s, 1, pad)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(y, reference_active_shift(x, s, 1, pad), **tol)
    g = torch.randn_like(y)
    gi, gs = torch.ops.asl.active_shift_backward(g, x, s, [1, 1], [pad, pad])
    rgi, rgs = ref_grads(x, s, 1, pad, g)
    torch.testing.assert_close(gi, rgi, **tol)
    gtol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(gs, rgs, **gtol)
    again = torch.ops.asl.active_shift_backward(g, x, s, [1, 1], [pad, pad])
    assert torch.equal(again[1], gs) and torch.equal(again[0], gi)  # deterministic


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_fast_path_half_precision(dtype):
    x = torch.randn(4, 6, 16, 32, device="cuda").to(dtype)
    s = rand_shift(6, 2.5, torch.float32, "cuda")
    y = active_shift(x, s)
    torch.testing.assert_close(y.float(), reference_active_shift(x.float(), s), atol=2e-2, rtol=2e-2)
    g = torch.randn_like(y)
    gi, gs = torch.ops.asl.active_shift_backward(g, x, s, [1, 1], [0, 0])
    rgi, rgs = ref_grads(x.float(), s, 1, 0, g.float())
    assert gi.dtype == dtype and gs.dtype == torch.float32
    torch.testing.assert_close(gi.float(), rgi, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(gs, rgs, atol=0.5, rtol=2e-2)


@pytest.mark.cuda
def test_cuda_fast_path_non_finite_and_gradcheck():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, device="cuda", requires_grad=True)
    s = (rand_shift(3, 1.5, torch.float64, "cuda") + 0.013).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: active_shift(a, b), (x, s))
    bad = s.detach().clone()
    bad[1, 0] = float("nan")
    y = active_shift(x.detach(), bad)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    gi, gs = torch.ops.asl.active_shift_backward(torch.ones_like(y), x.detach(), bad, [1, 1], [0, 0])
    assert torch.isnan(gi[:, 1]).all() and torch.isfinite(gi[:, [0, 2]]).all()
    assert torch.isnan(gs[1]).all() and torch.isfinite(gs[[0, 2]]).all()


@pytest.mark.parametrize("case", ["grad_shape", "shift_rows", "device", "stride"])
def test_fake_kernels_check_like_the_real_ones(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, s, g = torch.randn(2, 3, 5, 5), torch.zeros(3, 2), torch.randn(2, 3, 5, 5)
        call = {
            "grad_shape": lambda: torch.ops.asl.active_shift_grad_input(torch.randn(2, 3, 4, 5), x, s, [1, 1], [0, 0]),
            "shift_rows": lambda: torch.ops.asl.active_shift(x, torch.zeros(4, 2), [1, 1], [0, 0]),
            "device": lambda: torch.ops.asl.active_shift_grad_shift(g, x, torch.zeros(3, 2, device="meta"), [1, 1], [0, 0]),
            "stride": lambda: torch.ops.asl.active_shift_backward(g, x, s, [0, 1], [0, 0]),
        }[case]
        with pytest.raises(ValueError):
            call()


def test_raw_op_with_a_meta_shift_raises():
    with pytest.raises(ValueError, match="same device"):
        torch.ops.asl.active_shift(torch.randn(1, 3, 5, 5), torch.zeros(3, 2, device="meta"), [1, 1], [0, 0])


def _derivative_case(stride=1, padding=1, integer=False):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    s = torch.rand(3, 2, dtype=torch.float64) * 5 - 2.5
    if integer:  # the one-sided (right) derivative, which finite differences cannot check
        s[0, 0] = 1.0
    return x, s, (lambda a, b: active_shift(a, b, stride, padding)), (lambda a, b: reference_active_shift(a, b, stride, padding))


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), ((2, 1), (0, 2))])
def test_forward_mode_gradcheck(stride, padding):
    x, s, f, _ = _derivative_case(stride, padding)
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), s.requires_grad_()), check_forward_ad=True,
                                    check_batched_grad=True, check_batched_forward_grad=True)


def test_forward_mode_tangents_equal_the_reference():
    import torch.autograd.forward_ad as fwAD

    x, s, f, ref = _derivative_case(integer=True)
    tx, ts = torch.randn_like(x), torch.randn_like(s)
    expected = torch.func.jvp(ref, (x, s), (tx, ts))[1]
    assert expected.abs().max() > 1  # a real tangent, not zeros
    torch.testing.assert_close(torch.func.jvp(f, (x, s), (tx, ts))[1], expected)
    for t_in in ((tx, None), (None, ts)):  # each argument's tangent alone
        want = torch.func.jvp(ref, (x, s), tuple(t if t is not None else torch.zeros_like(v) for t, v in zip(t_in, (x, s))))[1]
        with fwAD.dual_level():
            args = [fwAD.make_dual(v, t) if t is not None else v for v, t in zip((x, s), t_in)]
            torch.testing.assert_close(fwAD.unpack_dual(f(*args)).tangent, want)
    with fwAD.dual_level():  # the raw registered operator too
        out = torch.ops.asl.active_shift(fwAD.make_dual(x, tx), fwAD.make_dual(s, ts), [1, 1], [1, 1])
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, expected)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "vmap", "hessian"])
def test_torch_func_transforms_equal_the_reference(transform):
    x, s, f, ref = _derivative_case(integer=True)
    loss = lambda fn: (lambda a, b: fn(a, b).pow(2).sum())  # noqa: E731
    if transform == "grad":
        got, want = (torch.func.grad(loss(fn), argnums=(0, 1))(x, s) for fn in (f, ref))
    elif transform in ("jacrev", "jacfwd"):
        got, want = (getattr(torch.func, transform)(fn, argnums=(0, 1))(x, s) for fn in (f, ref))
    elif transform == "vmap":
        xs, ss = torch.stack([x, 2 * x]), torch.stack([s, -s])
        got = [torch.vmap(f)(xs, ss), torch.vmap(f, in_dims=(0, None))(xs, s), torch.vmap(f, in_dims=(None, 0))(x, ss)]
        want = [torch.stack([ref(x, s), ref(2 * x, -s)]), torch.stack([ref(x, s), ref(2 * x, s)]), torch.stack([ref(x, s), ref(x, -s)])]
    else:
        got, want = ([torch.func.hessian(lambda b: loss(fn)(x, b))(s)] for fn in (f, ref))
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w)


def test_double_backward_equals_the_reference():
    x, s, f, _ = _derivative_case()
    assert torch.autograd.gradgradcheck(f, (x.requires_grad_(), s.requires_grad_()))


def test_raw_op_under_torch_func_says_what_to_call():
    x, s, _, _ = _derivative_case()
    with pytest.raises(RuntimeError, match="asl_cli.ops.active_shift"):
        torch.func.grad(lambda b: torch.ops.asl.active_shift(x, b, [1, 1], [0, 0]).sum())(s)


@pytest.mark.skipif(asl_cli.backends()["cpu"] != "compiled C++", reason="compares with the compiled library's declarations")
def test_fallback_schemas_equal_the_compiled_ones():
    from asl_cli.ops import FALLBACK_SCHEMAS

    for name, text in FALLBACK_SCHEMAS.items():
        assert str(getattr(torch.ops.asl, name).default._schema) == f"asl::{text}"


@pytest.mark.cuda
@pytest.mark.parametrize("shape,stride,padding", [((2, 3, 9, 10), 1, 0), ((2, 70, 11, 9), 2, 1), ((1, 33, 5, 64), 1, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_channels_last_forward_kernel(shape, stride, padding, dtype):
    """The channels_last forward (a block per output row, shifts decoded in shared memory)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    s = (torch.rand(shape[1], 2, generator=g, dtype=torch.float64) * 8 - 4)
    s[0] = torch.tensor([math.nan, 0.0])
    s[-1] = torch.tensor([1e6, -1e6])
    ref = reference_active_shift(x.to(dtype).double(), s, stride, padding)
    out = active_shift(x.to(dtype).cuda().contiguous(memory_format=torch.channels_last), s.float().cuda(), stride, padding)
    assert out.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 if dtype != torch.bfloat16 else 2e-2
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.parametrize("shape,padding", [((2, 3, 9, 10), 0), ((2, 70, 11, 9), 1), ((1, 33, 5, 64), 0), ((3, 16, 56, 56), 0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_channels_last_backward_kernel(shape, padding, dtype):
    """The channels_last backward at stride 1 (grad_input and the shift gradient's partial sums in
    one pass, 32 channels per block): reference gradients, non-finite and far-out shifts,
    run-to-run determinism."""
    g = torch.Generator().manual_seed(4)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    s = torch.rand(C, 2, generator=g, dtype=torch.float64) * 6 - 3
    s[0] = s[0].round()  # integer shift: one-sided differences
    if C > 2:
        s[1] = torch.tensor([math.nan, 0.0])
        s[2] = torch.tensor([1e6, -1e6])
    Ho, Wo = shape[2] + 2 * padding, shape[3] + 2 * padding
    go = torch.randn(shape[0], C, Ho, Wo, generator=g, dtype=torch.float64).to(dtype)
    rgi, rgs = ref_grads(x.double(), s, 1, padding, go.double())
    cl = torch.channels_last
    xc, goc = x.cuda().contiguous(memory_format=cl), go.cuda().contiguous(memory_format=cl)
    sc = s.to(torch.float64 if dtype == torch.float64 else torch.float32).cuda()
    gi, gs = torch.ops.asl.active_shift_backward(goc, xc, sc, [1, 1], [padding, padding])
    assert gi.is_contiguous(memory_format=cl)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    ok = torch.isfinite(s).all(1)  # a channel with a non-finite shift gets NaN gradients
    if C > 2:
        assert torch.isnan(gi[:, 1]).all() and torch.isnan(gs[1]).all()
    torch.testing.assert_close(gi.double().cpu()[:, ok], rgi[:, ok], rtol=tol, atol=tol)
    scale = max(1.0, rgs[ok].abs().max().item())
    torch.testing.assert_close(gs.double().cpu()[ok], rgs[ok], rtol=tol, atol=tol * scale)
    again = torch.ops.asl.active_shift_backward(goc, xc, sc, [1, 1], [padding, padding])
    assert torch.equal(again[0].nan_to_num(), gi.nan_to_num()) and torch.equal(again[1].nan_to_num(), gs.nan_to_num())


@pytest.mark.parametrize("simd", ["scalar", "avx2", "avx512"])
def test_every_instruction_set_matches_the_reference(simd):
    """The CPU kernels are compiled for AVX-512, AVX2 and one lane, and the best the CPU has is
    used; ASL_CPU_SIMD picks a lower one, so every form is checked on this machine (forms the CPU
    lacks fall back to the best it has). Values and both gradients against the reference, both
    memory formats, with forward and input gradient equal across them bit for bit."""
    script = r"""
import torch
from asl_cli.ops import active_shift, reference_active_shift
torch.manual_seed(0)
pair = lambda v: [v, v] if isinstance(v, int) else list(v)
cases = [(2, 3, 7, 9, 1, 0, 1.5), (3, 5, 8, 5, 2, 1, 2.5), (2, 4, 6, 6, 1, 2, 1.0), (1, 2, 4, 6, 1, 0, 12.0),
         (1, 3, 11, 3, (2, 1), (0, 1), 1.7), (2, 16, 8, 12, 1, 0, 2.0), (2, 64, 8, 8, 1, 0, 1.0), (2, 32, 16, 16, 2, 0, 1.0),
         (1, 20, 33, 37, 1, 0, 3.0), (2, 16, 12, 8, 3, 1, 1.0), (2, 17, 4, 4, 1, 0, 1.0), (2, 40, 9, 9, 1, 0, 4.0),
         (2, 24, 8, 8, 2, 0, 3.0), (2, 64, 8, 8, 2, 1, 1.0), (1, 32, 7, 9, (2, 1), 1, 1.0)]
for N, C, H, W, st, pd, sc in cases:
    for dt in (torch.float32, torch.float64):
        x = torch.randn(N, C, H, W, dtype=dt)
        s = (torch.rand(C, 2, dtype=dt) * 2 - 1) * sc
        outs = []
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            y = active_shift(x.contiguous(memory_format=fmt), s, st, pd)
            g = torch.randn(y.shape, dtype=dt, generator=torch.Generator().manual_seed(1))
            gi, gs = torch.ops.asl.active_shift_backward(g.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt), s,
                                                         pair(st), pair(pd))
            xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
            r = reference_active_shift(xr, sr, st, pd)
            r.backward(g)
            tol = dict(rtol=1e-4, atol=1e-4) if dt == torch.float32 else dict(rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(y, r, **tol)
            torch.testing.assert_close(gi, xr.grad, **tol)
            torch.testing.assert_close(gs, sr.grad, rtol=1e-3 if dt == torch.float32 else 1e-8, atol=1e-3 if dt == torch.float32 else 1e-8)
            outs.append((y, gi))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), (N, C, H, W, st, pd, sc, dt)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S,
                         env={**os.environ, "ASL_CPU_SIMD": simd})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("H, W", [(8, 8), (7, 7), (6, 10), (1, 1), (2, 32), (4, 16), (8, 5), (1, 64), (9, 7)])
def test_stride_two_small_planes_match_the_reference(H, W):
    """At stride 2, planes of at most 64 floats with at most 16 outputs (8 x 8 -> 4 x 4) take each
    tap of the whole output as one permute across the plane's four AVX-512 vectors: values and
    both gradients against the reference at shifts within a pixel, across the image and beyond
    it, an integer shift, padding 0 and 1, an inf reaching only the outputs that tap it, and
    channels_last (through the same planes) equal to NCHW bit for bit."""
    for padding in (0, 1):
        for scale in (0.9, 2.5, 12.0):
            x = torch.randn(3, 24, H, W)
            x[1, 2, H // 2, W // 2] = float("inf")
            s = rand_shift(24, scale, torch.float32)
            s[0] = torch.tensor([1.0, -1.0])
            args = ([2, 2], [padding, padding])
            y = torch.ops.asl.active_shift(x, s, *args)
            r = reference_active_shift(x.double(), s.double(), 2, padding)
            assert torch.equal(torch.isinf(y), torch.isinf(r)) and torch.equal(torch.isnan(y), torch.isnan(r))
            finite = torch.isfinite(r)
            torch.testing.assert_close(y.double()[finite], r[finite], atol=1e-5, rtol=1e-5)
            x[1, 2, H // 2, W // 2] = 0.5
            g = torch.randn_like(y)
            gi, gs = torch.ops.asl.active_shift_backward(g, x, s, *args)
            rgi, rgs = ref_grads(x.double(), s.double(), 2, padding, g.double())
            torch.testing.assert_close(gi.double(), rgi, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gs.double(), rgs, atol=1e-3, rtol=1e-4)
            xc, gc = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
            gic, _ = torch.ops.asl.active_shift_backward(gc, xc, s, *args)
            assert torch.equal(torch.ops.asl.active_shift(xc, s, *args), torch.ops.asl.active_shift(x, s, *args))
            assert torch.equal(gic, gi), (H, W, padding, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", [1, 2, (2, 1), (1, 2)])
@pytest.mark.parametrize("spread", ["within a pixel", "rows", "columns", "both", "two pixels"])
def test_channels_last_blended_offsets(stride, dtype, spread):
    """channels_last with every channel vector's integer offsets within four adjacent values per
    axis (channels a multiple of the vector): each lane blends its own four taps at column stride
    1 and 2 (forward; input gradient at strides 1 and 2, where each lane takes one tap, stride 2
    up to three offsets; correlations at column stride 1). Shifts within a pixel (two offsets per
    axis), with a few channels one pixel further in rows, columns or both (three, the reach of
    shifts that training has carried past a pixel; in both directions, so a vector's smallest
    offset moves too), and with some two pixels further in both (four). Values and both
    gradients against the reference at odd sizes and paddings, integer shifts among them, the
    forward and input gradient equal to NCHW's bit for bit, and an inf reaching only the
    outputs that tap it."""
    sp = [stride, stride] if isinstance(stride, int) else list(stride)
    for N, C, H, W, pad in [(2, 32, 7, 9, 0), (1, 16, 12, 5, 1), (2, 64, 8, 8, 0), (1, 48, 3, 3, 2), (1, 16, 1, 1, 0)]:
        x = torch.randn(N, C, H, W, dtype=dtype)
        s = torch.rand(C, 2, dtype=dtype) * 2 - 1
        if spread in ("columns", "both"):
            s[4::7, 0] += 1.0
        if spread in ("rows", "both"):
            s[5::6, 1] -= 1.0
        if spread == "two pixels":
            s[4::7, 0] += 2.0
            s[5::6, 1] -= 2.0
        s[1] = torch.tensor([1.0, 0.0])
        s[2] = torch.tensor([-1.0, -1.0])
        x[0, 3, H // 2, W // 2] = float("inf")
        xc = x.contiguous(memory_format=torch.channels_last)
        args = (sp, [pad, pad])
        y = torch.ops.asl.active_shift(xc, s, *args)
        r = reference_active_shift(x.double(), s.double(), sp, pad)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(torch.isinf(y), torch.isinf(r)) and torch.equal(torch.isnan(y), torch.isnan(r))
        assert torch.equal(y, torch.ops.asl.active_shift(x, s, *args))
        finite = torch.isfinite(r)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(y.double()[finite], r[finite], **tol)
        x[0, 3, H // 2, W // 2] = 0.25
        xc = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn(y.shape, dtype=dtype)
        gi, gs = torch.ops.asl.active_shift_backward(g.contiguous(memory_format=torch.channels_last), xc, s, *args)
        rgi, rgs = ref_grads(x.double(), s.double(), sp, pad, g.double())
        torch.testing.assert_close(gi.double(), rgi, **tol)
        gtol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(gs.double(), rgs, **gtol)
        assert torch.equal(gi, torch.ops.asl.active_shift_backward(g, x, s, *args)[0]), (N, C, H, W, pad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_an_infinite_input_reaches_only_the_outputs_that_tap_it(channels_last):
    """Taps outside a channel's four are never read (masked loads), so an inf elsewhere in the
    image, or in another channel's taps, leaves the other outputs finite, as in the reference."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 32, 9, 11)
    x[1, 5, 4, 6] = float("inf")
    x[0, 20, 0, 0] = float("-inf")
    s = torch.rand(32, 2) * 2 - 1
    y = active_shift(x.contiguous(memory_format=fmt), s)
    r = reference_active_shift(x, s)
    assert torch.equal(torch.isnan(y), torch.isnan(r)) and torch.equal(torch.isinf(y), torch.isinf(r))
    finite = torch.isfinite(r)
    torch.testing.assert_close(y[finite], r[finite])
