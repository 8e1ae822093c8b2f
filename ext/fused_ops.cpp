// The fused inference operators (shift_conv1x1, scale_bias_relu, conv1x1): their argument checks
// and their compositions of ATen operators, which serve every device without a kernel of its own
// (CUDA) and the cases the CPU kernels leave to them.
#include "active_shift.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/conv2d.h>
#include <torch/library.h>

namespace asl {

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

namespace {
// Elsewhere (CUDA): the active shift, then cuDNN's convolution.
at::Tensor shift_conv1x1_composite(const at::Tensor& input, const at::Tensor& shift, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                   at::IntArrayRef stride, at::IntArrayRef padding) {
  const Geometry g = prepare(input, shift, stride, padding, "shift_conv1x1");
  const int64_t Co = check_conv1x1(g, input, weight, bias, residual);
  static auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("asl::active_shift", "").typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef)>();
  at::Tensor out = at::conv2d(fwd.call(input, shift, stride, padding), weight.reshape({Co, g.C, 1, 1}), bias);
  if (residual.has_value()) out.add_(*residual);
  return out;
}

at::Tensor scale_bias_relu_composite(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& bias) {
  check_scale_bias(input, scale, bias);
  const std::vector<int64_t> shape{1, input.size(1), 1, 1};
  return input.mul(scale.reshape(shape).to(input.scalar_type())).add_(bias.reshape(shape).to(input.scalar_type())).relu_();
}
}  // namespace

TORCH_LIBRARY_IMPL(asl, CompositeExplicitAutograd, m) {
  m.impl("shift_conv1x1", &shift_conv1x1_composite);
  m.impl("scale_bias_relu", &scale_bias_relu_composite);
  m.impl("conv1x1", &conv1x1_composite);
}

}  // namespace asl
