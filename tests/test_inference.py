"""The fused shift + 1x1 operator and the inference form of zoo models."""
import pytest
import torch
import torch.nn.functional as F

from asl_cli.inference import FORMS, inference_form, make_form
from asl_cli.ops import active_shift, shift_conv1x1
from asl_cli.zoo import create_model


def composed(x, s, w, b, r, stride, padding):
    out = F.conv2d(active_shift(x, s, stride, padding), w.reshape(w.shape[0], -1, 1, 1), b)
    return out + r if r is not None else out


@pytest.mark.parametrize("shape,stride,padding,reach", [((2, 8, 13, 11), 1, 0, 3), ((1, 16, 56, 56), 1, 0, 3), ((2, 5, 9, 10), 2, 0, 3),
                                                       ((1, 7, 8, 9), 1, 1, 3), ((3, 4, 6, 6), (2, 1), (0, 1), 3),
                                                       ((1, 24, 7, 7), 1, 0, 9), ((1, 300, 5, 6), 1, 0, 2),
                                                       ((2, 6, 9, 12), 1, (2, 0), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extras", ["none", "bias", "bias+residual"])
def test_shift_conv1x1_matches_the_composition(shape, stride, padding, reach, dtype, extras):
    # float32 at stride 1 without column padding takes the AVX-512 panel path where there is one
    # (32-pixel panels across rows, masked taps), everything else the tile path
    g = torch.Generator().manual_seed(0)
    N, C, H, W = shape
    x = torch.randn(shape, generator=g, dtype=dtype)
    s = (torch.rand(C, 2, generator=g, dtype=dtype) * 2 - 1) * reach  # reach 9 on 7x7: rows and columns wholly outside
    s[0] = torch.tensor([1.0, -2.0])  # an integer shift
    w = torch.randn(11, C, generator=g, dtype=dtype)
    b = torch.randn(11, generator=g, dtype=dtype) if extras != "none" else None
    ref = composed(x, s, w, b, None, stride, padding)
    r = torch.randn(ref.shape, generator=g, dtype=dtype) if extras == "bias+residual" else None
    if r is not None:
        ref = ref + r
    out = shift_conv1x1(x, s, w, b, r, stride, padding)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_shift_conv1x1_4d_weight_non_finite_shift_and_channels_last_input():
    x = torch.randn(1, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    s = torch.tensor([[0.5, 0.5], [float("nan"), 0.0], [0.0, 0.0], [1.5, -0.5]])
    w = torch.randn(3, 4, 1, 1)
    out = shift_conv1x1(x, s, w)
    assert torch.isnan(out).all()  # channel 1's NaN reaches every output channel, as in the composition
    s[1] = 0.2
    torch.testing.assert_close(shift_conv1x1(x, s, w), composed(x, s, w, None, None, 1, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,exc", [
    (dict(w=torch.randn(3, 5)), ValueError), (dict(w=torch.randn(3, 4).double()), TypeError),
    (dict(b=torch.randn(4)), ValueError), (dict(r=torch.randn(1, 3, 6, 7)), ValueError),
    (dict(s=torch.zeros(5, 2)), ValueError),
])
def test_shift_conv1x1_wrong_inputs(bad, exc):
    args = dict(x=torch.randn(1, 4, 7, 7), s=torch.zeros(4, 2), w=torch.randn(3, 4), b=None, r=None) | bad
    with pytest.raises(exc):
        shift_conv1x1(args["x"], args["s"], args["w"], args["b"], args["r"])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc):
        torch.ops.asl.shift_conv1x1(args["x"], args["s"], args["w"], args["b"], args["r"], [1, 1], [0, 0])


def test_shift_conv1x1_opcheck():
    x, s, w, b = torch.randn(2, 4, 6, 7), torch.rand(4, 2) * 2 - 1, torch.randn(5, 4), torch.randn(5)
    torch.library.opcheck(torch.ops.asl.shift_conv1x1, (x, s, w, b, None, [1, 1], [0, 0]),
                          test_utils=("test_schema", "test_faketensor"))


def conv1x1_reference(x, w, b, scale, shift, relu):
    if scale is not None:
        x = torch.relu(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))
    out = F.conv2d(x, w.reshape(w.shape[0], -1, 1, 1), b)
    return torch.relu(out) if relu else out


@pytest.mark.parametrize("shape,Co", [((2, 50, 23, 29), 50), ((1, 7, 5, 3), 13), ((1, 40, 7, 7), 90), ((3, 17, 1, 1), 5),
                                      ((1, 3, 4, 4), 25)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extras", ["none", "bias+relu", "transform+bias+relu", "transform"])
@pytest.mark.parametrize("layout", ["plain", "transposed weight", "channels_last input"])
def test_conv1x1_matches_the_composition(shape, Co, dtype, extras, layout):
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype)
    w = torch.randn(Co, C, generator=g, dtype=dtype)
    b = torch.randn(Co, generator=g, dtype=dtype) if "bias" in extras else None
    sc, sb = (torch.rand(C, generator=g, dtype=dtype), torch.randn(C, generator=g, dtype=dtype)) if "transform" in extras else (None, None)
    relu = "relu" in extras
    if layout == "transposed weight":
        w = w.t().contiguous().t()  # the inference form's layout
    if layout == "channels_last input":
        x = x.contiguous(memory_format=torch.channels_last)
    out = torch.ops.asl.conv1x1(x, w, b, sc, sb, relu)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, conv1x1_reference(x, w, b, sc, sb, relu), rtol=tol, atol=tol)


@pytest.mark.parametrize("bad,exc", [
    (dict(w=torch.randn(3, 5)), ValueError), (dict(w=torch.randn(3, 4).double()), TypeError),
    (dict(b=torch.randn(4)), ValueError), (dict(b=torch.randn(3).double()), TypeError),
    (dict(sc=torch.rand(4)), ValueError), (dict(sc=torch.rand(5), sb=torch.rand(5)), ValueError),
    (dict(x=torch.randn(4, 7, 7)), ValueError), (dict(x=torch.ones(1, 4, 7, 7, dtype=torch.int32)), TypeError),
])
def test_conv1x1_wrong_inputs(bad, exc):
    args = dict(x=torch.randn(1, 4, 7, 7), w=torch.randn(3, 4), b=None, sc=None, sb=None) | bad
    call = (args["x"], args["w"], args["b"], args["sc"], args["sb"], True)
    with pytest.raises(exc):
        torch.ops.asl.conv1x1(*call)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc):
        torch.ops.asl.conv1x1(*call)


def test_conv1x1_opcheck():
    x, w, b, sc, sb = torch.randn(2, 4, 6, 7), torch.randn(5, 4), torch.randn(5), torch.rand(4), torch.randn(4)
    torch.library.opcheck(torch.ops.asl.conv1x1, (x, w, b, sc, sb, True), test_utils=("test_schema", "test_faketensor"))


def test_blas_path_gives_the_same_products():
    """ASL_CPU_GEMM=blas sends float32 products through BLAS (every CPU without AVX-512 does): the
    fused operators agree with the other path."""
    import subprocess
    import sys

    code = (
        "import torch, asl_cli.ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, s, w = torch.randn(1, 24, 9, 11, generator=g), torch.rand(24, 2, generator=g) - .5, torch.randn(30, 24, generator=g)\n"
        "sc, sb, b = torch.rand(24, generator=g), torch.randn(24, generator=g), torch.randn(30, generator=g)\n"
        "torch.save([torch.ops.asl.shift_conv1x1(x, s, w.t().contiguous().t(), b, None, [1, 1], [0, 0]),\n"
        "            torch.ops.asl.conv1x1(x, w, b, sc, sb, True)], __import__('sys').argv[1])\n"
    )
    outs = []
    for env in ({}, {"ASL_CPU_GEMM": "blas"}):
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "out.pt")
            subprocess.run([sys.executable, "-c", code, path], check=True, env={**os.environ, **env})
            outs.append(torch.load(path))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _trained_like(model):
    """Random BatchNorm statistics and affine parameters, so folding is actually exercised."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name,args,size", [("asnet20_16x1", {}, 32), ("asnet20_16x1", {"spatial": "dw3_bn"}, 32),
                                            ("asnet20_16x1", {"spatial": "dw3"}, 32), ("as_resnet_w32", {}, 64),
                                            ("mobilenet_v2_x0.5", {}, 64), ("shiftresnet20_x1", {}, 32)])
def test_inference_form_gives_the_eager_logits(name, args, size):
    model = _trained_like(create_model(name, **args))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        fast = inference_form(model)
        out = fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())


@pytest.mark.parametrize("form", [f for f in FORMS if f != "compile"])
def test_every_form_agrees(form):
    model = _trained_like(create_model("asnet20_16x1"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(make_form(model, form, x)(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_inference_ops_and_form(dtype):
    g = torch.Generator().manual_seed(0)
    x, s, w = torch.randn(2, 8, 9, 10, generator=g), torch.rand(8, 2, generator=g) * 2 - 1, torch.randn(5, 8, generator=g)
    r = torch.randn(2, 5, 9, 10, generator=g)
    ref = shift_conv1x1(x, s, w, None, r)
    out = shift_conv1x1(x.cuda().to(dtype), s.cuda(), w.cuda().to(dtype), None, r.cuda().to(dtype))
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(out.float().cpu(), ref, rtol=tol, atol=tol)
    sc, b = torch.rand(8), torch.randn(8)
    torch.testing.assert_close(torch.ops.asl.scale_bias_relu(x.cuda(), sc.cuda(), b.cuda()).cpu(),
                               torch.ops.asl.scale_bias_relu(x, sc, b), rtol=1e-5, atol=1e-5)
    wc, bc, sb2 = torch.randn(6, 8, generator=g), torch.randn(6, generator=g), torch.randn(8, generator=g)
    ref = torch.ops.asl.conv1x1(x, wc, bc, sc, sb2, True)
    out = torch.ops.asl.conv1x1(x.cuda().to(dtype), wc.cuda().to(dtype), bc.cuda().to(dtype), sc.cuda().to(dtype),
                                sb2.cuda().to(dtype), True)
    torch.testing.assert_close(out.float().cpu(), ref, rtol=tol, atol=tol)
    model = _trained_like(create_model("asnet20_16x1"))
    xi = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(inference_form(model).cuda()(xi.cuda()).cpu(), model(xi), rtol=1e-3, atol=1e-3)


def test_cli_forms_are_the_inference_forms():
    # the CLI spells its --form choices out (importing asl_cli.inference there would load torch for --help)
    from asl_cli.cli import Form

    assert tuple(f.value for f in Form) == FORMS
