// Operator schemas (declared once) and the argument checks shared by all devices.
#include "active_shift.h"

#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/conv2d.h>
#include <torch/library.h>

namespace asl {

void check_args(const at::Tensor& input, const at::Tensor& shift, at::IntArrayRef stride,
                at::IntArrayRef padding, const char* op) {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got ", input.dim(),
              "-D with shape ", input.sizes());
  TORCH_CHECK_VALUE(shift.dim() == 2 && shift.size(0) == input.size(1) && shift.size(1) == 2, op,
              ": shift must have shape (C, 2) = (", input.size(1), ", 2) for an input with ",
              input.size(1), " channels, got ", shift.sizes());
  TORCH_CHECK_VALUE(input.device() == shift.device(), op,
              ": input and shift must be on the same device, got input on ", input.device(),
              " and shift on ", shift.device());
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), op,
              ": input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(shift.scalar_type()), op,
              ": shift must be a floating-point tensor, got ", shift.scalar_type());
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
              ": stride must be two integers >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two integers >= 0, got ", padding);
}

bool use_channels_last(const at::Tensor& input) {
  return !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
}

Geometry prepare(const at::Tensor& input, const at::Tensor& shift, at::IntArrayRef stride,
                 at::IntArrayRef padding, const char* op, const at::Tensor* grad) {
  check_args(input, shift, stride, padding, op);
  Geometry g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.Ho = out_size(g.H, g.sh, g.ph);
  g.Wo = out_size(g.W, g.sw, g.pw);
  g.channels_last = use_channels_last(input);
  g.limit = shift_limit(g.H, g.W, g.Ho, g.Wo, stride, padding);
  if (grad != nullptr) {
    const std::vector<int64_t> expected{g.N, g.C, g.Ho, g.Wo};
    TORCH_CHECK_VALUE(grad->sizes() == at::IntArrayRef(expected), op, ": grad_output must have shape ",
                at::IntArrayRef(expected), ", got ", grad->sizes());
    TORCH_CHECK_VALUE(grad->device() == input.device(), op, ": grad_output is on ", grad->device(),
                " but input is on ", input.device());
  }
  return g;
}

// A per-channel vector of n values on the input's device and dtype.
static void check_vector(const at::Tensor& input, const at::Tensor& t, const char* op, const char* name, int64_t n) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n && t.device() == input.device(), op, ": ", name, " must be (", n,
                    ") on ", input.device(), ", got ", t.sizes(), " on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
                   " differs from input dtype ", input.scalar_type());
}

// A 1x1 convolution's weight ((Co, C) or (Co, C, 1, 1)) and optional bias (Co) against an input of
// C channels, its device and dtype; returns Co.
static int64_t check_weight(const at::Tensor& input, int64_t C, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK_VALUE((weight.dim() == 2 || (weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1)) &&
                        weight.size(1) == C,
                    op, ": weight must be (C_out, ", C, ") or (C_out, ", C, ", 1, 1), got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
                   " differs from input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == input.device(), op, ": weight is on ", weight.device(), " but input is on ",
                    input.device());
  const int64_t Co = weight.size(0);
  if (bias.has_value()) check_vector(input, *bias, op, "bias", Co);
  return Co;
}

int64_t check_conv1x1(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  const char* op = "shift_conv1x1";
  const int64_t Co = check_weight(input, g.C, weight, bias, op);
  if (residual.has_value()) {
    const std::vector<int64_t> expected{g.N, Co, g.Ho, g.Wo};
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(expected) && residual->device() == input.device(), op,
                      ": residual must have shape ", at::IntArrayRef(expected), " on ", input.device(), ", got ",
                      residual->sizes(), " on ", residual->device());
    TORCH_CHECK_TYPE(residual->scalar_type() == input.scalar_type(), op, ": residual dtype ",
                     residual->scalar_type(), " differs from input dtype ", input.scalar_type());
  }
  return Co;
}

void check_scale_bias(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& bias) {
  TORCH_CHECK_VALUE(input.dim() == 4, "scale_bias_relu: input must be 4-D (N, C, H, W), got ", input.sizes());
  TORCH_CHECK_VALUE(scale.numel() == input.size(1) && bias.numel() == input.size(1), "scale_bias_relu: scale and bias need ",
                    input.size(1), " values, got ", scale.numel(), " and ", bias.numel());
}

int64_t check_pointwise(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_bias) {
  const char* op = "conv1x1";
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got ", input.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), op, ": input must be a floating-point tensor, got ",
                   input.scalar_type());
  const int64_t C = input.size(1);
  const int64_t Co = check_weight(input, C, weight, bias, op);
  TORCH_CHECK_VALUE(in_scale.has_value() == in_bias.has_value(), op, ": in_scale and in_bias go together");
  if (in_scale.has_value()) {
    check_vector(input, *in_scale, op, "in_scale", C);
    check_vector(input, *in_bias, op, "in_bias", C);
  }
  return Co;
}

at::Tensor conv1x1_composite(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_bias,
                             bool relu) {
  const int64_t Co = check_pointwise(input, weight, bias, in_scale, in_bias);
  const int64_t C = input.size(1);
  at::Tensor t = input;
  if (in_scale.has_value()) {
    const std::vector<int64_t> shape{1, C, 1, 1};
    t = input.mul(in_scale->reshape(shape)).add_(in_bias->reshape(shape)).relu_();
  }
  at::Tensor out = at::conv2d(t, weight.reshape({Co, C, 1, 1}), bias);
  return relu ? out.relu_() : out;
}

}  // namespace asl

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
}

namespace {
std::tuple<at::Tensor, at::Tensor> active_shift_backward_composite(const at::Tensor& grad, const at::Tensor& input,
                                                                   const at::Tensor& shift, at::IntArrayRef stride,
                                                                   at::IntArrayRef padding) {
  static auto gi = c10::Dispatcher::singleton().findSchemaOrThrow("asl::active_shift_grad_input", "").typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef)>();
  static auto gs = c10::Dispatcher::singleton().findSchemaOrThrow("asl::active_shift_grad_shift", "").typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef)>();
  return {gi.call(grad, input, shift, stride, padding), gs.call(grad, input, shift, stride, padding)};
}
// Elsewhere (CUDA): the active shift, then cuDNN's convolution.
at::Tensor shift_conv1x1_composite(const at::Tensor& input, const at::Tensor& shift, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                   at::IntArrayRef stride, at::IntArrayRef padding) {
  const asl::Geometry g = asl::prepare(input, shift, stride, padding, "shift_conv1x1");
  const int64_t Co = asl::check_conv1x1(g, input, weight, bias, residual);
  static auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("asl::active_shift", "").typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef)>();
  at::Tensor out = at::conv2d(fwd.call(input, shift, stride, padding), weight.reshape({Co, g.C, 1, 1}), bias);
  if (residual.has_value()) out.add_(*residual);
  return out;
}

at::Tensor scale_bias_relu_composite(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& bias) {
  asl::check_scale_bias(input, scale, bias);
  const std::vector<int64_t> shape{1, input.size(1), 1, 1};
  return input.mul(scale.reshape(shape).to(input.scalar_type())).add_(bias.reshape(shape).to(input.scalar_type())).relu_();
}
}  // namespace

TORCH_LIBRARY_IMPL(asl, CompositeExplicitAutograd, m) {
  m.impl("active_shift_backward", &active_shift_backward_composite);
  m.impl("shift_conv1x1", &shift_conv1x1_composite);
  m.impl("scale_bias_relu", &scale_bias_relu_composite);
  m.impl("conv1x1", &asl::conv1x1_composite);
}

// An importable module with no Python functions: importing it registers the operators.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
