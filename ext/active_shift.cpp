// The active shift's argument checks and call geometry, shared by every device's kernels, and its
// backward pass for devices without a one-pass kernel (the two gradient operators in turn).
#include "active_shift.h"

#include <ATen/core/dispatch/Dispatcher.h>
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
}  // namespace

TORCH_LIBRARY_IMPL(asl, CompositeExplicitAutograd, m) {
  m.impl("active_shift_backward", &active_shift_backward_composite);
}

}  // namespace asl
