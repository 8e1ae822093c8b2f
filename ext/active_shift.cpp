// Operator schemas (declared once) and the argument checks shared by all devices.
#include "active_shift.h"

#include <Python.h>
#include <torch/library.h>

namespace asl {

void check_args(const at::Tensor& input, const at::Tensor& shift, at::IntArrayRef stride,
                at::IntArrayRef padding, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got ", input.dim(),
              "-D with shape ", input.sizes());
  TORCH_CHECK(shift.dim() == 2 && shift.size(0) == input.size(1) && shift.size(1) == 2, op,
              ": shift must have shape (C, 2) = (", input.size(1), ", 2) for an input with ",
              input.size(1), " channels, got ", shift.sizes());
  TORCH_CHECK(input.device() == shift.device(), op,
              ": input and shift must be on the same device, got input on ", input.device(),
              " and shift on ", shift.device());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK(at::isFloatingType(shift.scalar_type()), op,
              ": shift must be a floating-point tensor, got ", shift.scalar_type());
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
              ": stride must be two integers >= 1, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two integers >= 0, got ", padding);
}

bool use_channels_last(const at::Tensor& input) {
  return !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
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
}

// An importable module with no Python functions: importing it registers the operators.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
