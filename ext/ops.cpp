// The operators' schemas, declared once for every device, and the Python module whose import
// registers them. Kernels: active_shift.cpp and fused_ops.cpp (device-independent parts),
// cpu/*_kernel.cpp and cuda/*_kernel.cu (one file per operator family and device).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(asl, m) {
  m.def("active_shift(Tensor input, Tensor shift, int[2] stride, int[2] padding) -> Tensor");
  m.def(
      "active_shift_grad_input(Tensor grad_output, Tensor input, Tensor shift, int[2] stride, "
      "int[2] padding) -> Tensor");
  m.def(
      "active_shift_grad_shift(Tensor grad_output, Tensor input, Tensor shift, int[2] stride, "
      "int[2] padding) -> Tensor");
  // Both gradients in one call (one pass over grad_output and input where a device has a fused
  // kernel; elsewhere the two operators above).
  m.def(
      "active_shift_backward(Tensor grad_output, Tensor input, Tensor shift, int[2] stride, "
      "int[2] padding) -> (Tensor, Tensor)");
  // Inference: active shift, then a 1x1 convolution (+ bias, + residual), without writing the
  // shifted tensor (the CPU kernel shifts a cache-sized tile and multiplies it at once).
  m.def(
      "shift_conv1x1(Tensor input, Tensor shift, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding) -> Tensor");
  // Inference: relu(input * scale + bias) per channel (a BatchNorm and its ReLU) in one pass.
  m.def("scale_bias_relu(Tensor input, Tensor scale, Tensor bias) -> Tensor");
  // Inference: a 1x1 convolution (stride 1) with an optional per-channel relu(input * in_scale +
  // in_bias) applied to its input (a pre-activation BatchNorm and its ReLU), bias and ReLU: on the
  // CPU each 32-pixel panel of the input is transformed in cache and multiplied at once.
  m.def("conv1x1(Tensor input, Tensor weight, Tensor? bias, Tensor? in_scale, Tensor? in_bias, bool relu) -> Tensor");
  // Training: relu(batch_norm(input)) with the batch's statistics; returns (output, mean, invstd)
  // per channel (running statistics are the caller's). Its backward gives (grad_input,
  // grad_weight, grad_bias), recomputing the ReLU's mask from the input; grad_residual, a
  // gradient reaching the input by another path (a residual connection), is added to grad_input
  // as it is written.
  m.def("batch_norm_relu(Tensor input, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_relu_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor invstd, Tensor? grad_residual=None) -> (Tensor, Tensor, Tensor)");
  // Training: conv2d(relu(batch_norm(input)), conv_weight) for a 1x1 conv_weight (C_out, C, 1, 1)
  // without bias, stride 1, with the batch's statistics, without writing relu(batch_norm(input));
  // returns (output, mean, invstd). Its backward gives (grad_input, grad_weight, grad_bias,
  // grad_conv_weight), recomputing relu(batch_norm(input)); grad_residual as for batch_norm_relu.
  m.def(
      "batch_norm_relu_conv1x1(Tensor input, Tensor weight, Tensor bias, float eps, Tensor conv_weight) -> (Tensor, "
      "Tensor, Tensor)");
  m.def(
      "batch_norm_relu_conv1x1_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor invstd, Tensor conv_weight, Tensor? grad_residual=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Training: active_shift(relu(batch_norm(input))) with the batch's statistics, without writing
  // relu(batch_norm(input)); returns (output, mean, invstd). Its backward gives (grad_input,
  // grad_weight, grad_bias, grad_shift), recomputing relu(batch_norm(input)) from the input;
  // shift_grad=False skips the shift gradient (fixed shifts), returned undefined (None).
  m.def(
      "batch_norm_relu_shift(Tensor input, Tensor weight, Tensor bias, float eps, Tensor shift, int[2] stride, "
      "int[2] padding) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_relu_shift_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor invstd, Tensor shift, int[2] stride, int[2] padding, bool shift_grad=True) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
}

// An importable module with no Python functions: importing it registers the operators.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
