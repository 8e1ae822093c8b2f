"""The `asl` operator library: the compiled kernels when the extension loads, the schemas and
pure-PyTorch kernels where it does not (or lacks a device), and the report of which serves what.

The schemas are declared once by the compiled library (ext/ops.cpp, TORCH_LIBRARY); the copies
below serve only when it cannot be loaded, and a test checks that they are identical. Either way
the rest of the package sees the same operators.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .checks import check_args, check_conv1x1, check_pointwise, check_scale_bias
from .reference import reference_forward, reference_grad

OPS = ("active_shift", "active_shift_grad_input", "active_shift_grad_shift")
_ARGS = "Tensor input, Tensor shift, int[2] stride, int[2] padding"
FALLBACK_SCHEMAS = {
    "active_shift": f"active_shift({_ARGS}) -> Tensor",
    "active_shift_grad_input": f"active_shift_grad_input(Tensor grad_output, {_ARGS}) -> Tensor",
    "active_shift_grad_shift": f"active_shift_grad_shift(Tensor grad_output, {_ARGS}) -> Tensor",
    "active_shift_backward": f"active_shift_backward(Tensor grad_output, {_ARGS}) -> (Tensor, Tensor)",
    "shift_conv1x1": ("shift_conv1x1(Tensor input, Tensor shift, Tensor weight, Tensor? bias, Tensor? residual, "
                      "int[2] stride, int[2] padding) -> Tensor"),
    "scale_bias_relu": "scale_bias_relu(Tensor input, Tensor scale, Tensor bias) -> Tensor",
    "conv1x1": "conv1x1(Tensor input, Tensor weight, Tensor? bias, Tensor? in_scale, Tensor? in_bias, bool relu) -> Tensor",
    "batch_norm_relu": "batch_norm_relu(Tensor input, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)",
    "batch_norm_relu_backward": ("batch_norm_relu_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor bias, "
                                 "Tensor mean, Tensor invstd, Tensor? grad_residual=None) -> (Tensor, Tensor, Tensor)"),
    "batch_norm_relu_conv1x1": ("batch_norm_relu_conv1x1(Tensor input, Tensor weight, Tensor bias, float eps, "
                                "Tensor conv_weight) -> (Tensor, Tensor, Tensor)"),
    "batch_norm_relu_conv1x1_backward": ("batch_norm_relu_conv1x1_backward(Tensor grad_output, Tensor input, "
                                         "Tensor weight, Tensor bias, Tensor mean, Tensor invstd, Tensor conv_weight, "
                                         "Tensor? grad_residual=None) -> (Tensor, Tensor, Tensor, Tensor)"),
    "batch_norm_relu_shift": ("batch_norm_relu_shift(Tensor input, Tensor weight, Tensor bias, float eps, Tensor shift, "
                              "int[2] stride, int[2] padding) -> (Tensor, Tensor, Tensor)"),
    "batch_norm_relu_shift_backward": ("batch_norm_relu_shift_backward(Tensor grad_output, Tensor input, Tensor weight, "
                                       "Tensor bias, Tensor mean, Tensor invstd, Tensor shift, int[2] stride, "
                                       "int[2] padding, bool shift_grad=True) -> (Tensor, Tensor, Tensor, Tensor)"),
}

EXTENSION_ERROR: Exception | None = None
if os.environ.get("ASL_DISABLE_EXTENSION") == "1":
    EXTENSION_ERROR = ImportError("disabled by ASL_DISABLE_EXTENSION=1")
else:
    try:
        from .. import _C  # noqa: F401  (loading it registers the compiled kernels)
    except Exception as e:  # ImportError, or OSError for a library it cannot find
        EXTENSION_ERROR = e


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"asl::{op}", key)
    except RuntimeError:
        return False


# Without the extension: declare the schemas, and the compositions the C++ side would register.
_DEF_LIB = None
if not hasattr(torch.ops.asl, "active_shift"):
    _DEF_LIB = torch.library.Library("asl", "DEF")
    for _schema in FALLBACK_SCHEMAS.values():
        _DEF_LIB.define(_schema)

    def _backward_composite(grad, input, shift, stride, padding):
        return (torch.ops.asl.active_shift_grad_input(grad, input, shift, stride, padding),
                torch.ops.asl.active_shift_grad_shift(grad, input, shift, stride, padding))

    def _shift_conv1x1_composite(input, shift, weight, bias, residual, stride, padding):
        check_conv1x1(input, shift, weight, bias, residual, stride, padding)
        out = F.conv2d(torch.ops.asl.active_shift(input, shift, stride, padding), weight.reshape(weight.shape[0], -1, 1, 1), bias)
        return out + residual if residual is not None else out

    def _scale_bias_relu_composite(input, scale, bias):
        check_scale_bias(input, scale, bias)
        return torch.relu(input * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1))

    def _conv1x1_composite(input, weight, bias, in_scale, in_bias, relu):
        check_pointwise(input, weight, bias, in_scale, in_bias)
        if in_scale is not None:
            input = torch.relu(input * in_scale.reshape(1, -1, 1, 1) + in_bias.reshape(1, -1, 1, 1))
        out = F.conv2d(input, weight.reshape(weight.shape[0], -1, 1, 1), bias)
        return torch.relu(out) if relu else out

    for _op, _fn in (("active_shift_backward", _backward_composite), ("shift_conv1x1", _shift_conv1x1_composite),
                     ("scale_bias_relu", _scale_bias_relu_composite), ("conv1x1", _conv1x1_composite)):
        _DEF_LIB.impl(_op, _fn, "CompositeExplicitAutograd")


def _ref_forward(input, shift, stride, padding):
    check_args("active_shift", input, shift, stride, padding)
    return reference_forward(input, shift, stride, padding)


def _ref_grad_input(grad, input, shift, stride, padding):
    check_args("active_shift_grad_input", input, shift, stride, padding, grad)
    return reference_grad(grad, input, shift, stride, padding, "input")


def _ref_grad_shift(grad, input, shift, stride, padding):
    check_args("active_shift_grad_shift", input, shift, stride, padding, grad)
    return reference_grad(grad, input, shift, stride, padding, "shift")


# A device whose compiled kernels are missing runs the reference.
_FALLBACK_LIB = torch.library.Library("asl", "IMPL")
_BACKEND: dict[str, str] = {}
for _key, _compiled in (("CPU", "compiled C++"), ("CUDA", "compiled CUDA")):
    if all(_has_kernel(op, _key) for op in OPS):
        _BACKEND[_key.lower()] = _compiled
    else:
        for _op, _fn in zip(OPS, (_ref_forward, _ref_grad_input, _ref_grad_shift)):
            _FALLBACK_LIB.impl(_op, _fn, _key)
        _BACKEND[_key.lower()] = "pure-PyTorch reference"

if EXTENSION_ERROR is not None:
    warnings.warn(
        f"asl: the compiled extension could not be loaded ({EXTENSION_ERROR}); using the slow pure-PyTorch "
        "reference. Reinstall with `pip install --no-build-isolation -e .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )
elif torch.cuda.is_available() and _BACKEND["cuda"] != "compiled CUDA":
    warnings.warn(
        "asl: a GPU is visible but the extension was built without CUDA kernels; CUDA tensors use the "
        "slow pure-PyTorch reference. Rebuild with nvcc on PATH (or FORCE_CUDA=1).",
        RuntimeWarning,
        stacklevel=2,
    )


def backends() -> dict[str, str]:
    """Which implementation serves CPU and CUDA tensors, plus the reason a build is missing."""
    report = dict(_BACKEND)
    if EXTENSION_ERROR is not None:
        report["extension_error"] = str(EXTENSION_ERROR)
    return report
