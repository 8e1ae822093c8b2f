"""Layers: the active shift (`ActiveShift2d`, paper Table 4's variants), the fused
BatchNorm-ReLU, a residual block's last convolution with its addition, and the original
training rule for learned shifts."""
from .norm_act import BatchNormReLU2d, bn_relu_conv_skip, bn_relu_shift, bn_relu_skip, fuse_bn_relu
from .residual import ResidualConv2d
from .optim import install_shift_grad_normalization, normalize_shift_grad_, param_groups
from .shift import SHIFT_MODES, ActiveShift2d, grouped_shift, shift_layers

__all__ = ["ActiveShift2d", "SHIFT_MODES", "grouped_shift", "shift_layers", "normalize_shift_grad_",
           "install_shift_grad_normalization", "param_groups", "BatchNormReLU2d", "bn_relu_conv_skip", "bn_relu_shift", "bn_relu_skip", "fuse_bn_relu",
           "ResidualConv2d"]
