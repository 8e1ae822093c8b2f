// Shared definitions of the active shift operator: shape rules, argument checks and the
// per-channel sampling parameters used by every device's kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace asl {

// Floor division that is correct for negative numerators.
C10_HOST_DEVICE inline int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// Output extent of one spatial axis: (size + 2 * pad - 1) // stride + 1, and 0 for an empty axis.
inline int64_t out_size(int64_t size, int64_t stride, int64_t pad) {
  return size == 0 ? 0 : floor_div(size + 2 * pad - 1, stride) + 1;
}

// One channel's shift split into the integer and fractional parts of the sampling position.
// Shifts so large that every tap falls outside the image are clamped (the result is zero either
// way), which keeps the integer part representable. A non-finite shift marks the channel so
// that kernels can write NaN for it.
template <typename opmath_t>
struct ChannelShift {
  int64_t dr, dc;     // floor(beta), floor(alpha)
  opmath_t fr, fc;    // beta - floor(beta), alpha - floor(alpha)
  bool finite;

  C10_HOST_DEVICE static ChannelShift make(opmath_t alpha, opmath_t beta, opmath_t limit) {
    ChannelShift s;
    s.finite = isfinite_(alpha) && isfinite_(beta);
    if (!s.finite) {
      alpha = 0;
      beta = 0;
    }
    alpha = alpha < -limit ? -limit : (alpha > limit ? limit : alpha);
    beta = beta < -limit ? -limit : (beta > limit ? limit : beta);
    opmath_t fa = ::floor(alpha), fb = ::floor(beta);
    s.dc = static_cast<int64_t>(fa);
    s.dr = static_cast<int64_t>(fb);
    s.fc = alpha - fa;
    s.fr = beta - fb;
    return s;
  }

 private:
  C10_HOST_DEVICE static bool isfinite_(opmath_t v) {
    return v == v && v - v == v - v;  // false for NaN and +-inf; works in host and device code
  }
};

// The bilinear blend of the four taps v00 (row r, col c), v01 (r, c+1), v10 (r+1, c) and v11
// (r+1, c+1) at fractions (fr, fc), and its derivatives with respect to alpha and beta (the shift
// gradient's terms; at an integer position the one-sided right difference, as in the authors'
// code). One definition for every kernel of every device.
template <typename T>
C10_HOST_DEVICE inline T bilinear(T v00, T v01, T v10, T v11, T fr, T fc) {
  return (T(1) - fr) * ((T(1) - fc) * v00 + fc * v01) + fr * ((T(1) - fc) * v10 + fc * v11);
}
template <typename T>
C10_HOST_DEVICE inline T d_alpha(T v00, T v01, T v10, T v11, T fr) {
  return (T(1) - fr) * (v01 - v00) + fr * (v11 - v10);
}
template <typename T>
C10_HOST_DEVICE inline T d_beta(T v00, T v01, T v10, T v11, T fc) {
  return (T(1) - fc) * (v10 - v00) + fc * (v11 - v01);
}

// Any |shift| beyond this puts all four taps outside the image for every output position.
inline double shift_limit(int64_t H, int64_t W, int64_t Ho, int64_t Wo, at::IntArrayRef stride,
                          at::IntArrayRef padding) {
  int64_t a = H + Ho * stride[0] + padding[0];
  int64_t b = W + Wo * stride[1] + padding[1];
  return static_cast<double>((a > b ? a : b) + 4);
}

// Validates the operator's arguments; shared by the forward and backward entry points.
void check_args(const at::Tensor& input, const at::Tensor& shift, at::IntArrayRef stride,
                at::IntArrayRef padding, const char* op);

// Output memory format follows the input: channels_last stays channels_last.
bool use_channels_last(const at::Tensor& input);

// Sizes, stride, padding and memory format of one call (plain data, passed to device kernels).
struct Geometry {
  int64_t N, C, H, W, Ho, Wo;
  int64_t sh, sw, ph, pw;
  bool channels_last;
  double limit;  // |shift| beyond which every tap is outside (see shift_limit)

  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

// Checks the arguments (and grad_output's shape and device, when given) and returns the call's
// geometry. Every entry point of every device starts here.
Geometry prepare(const at::Tensor& input, const at::Tensor& shift, at::IntArrayRef stride,
                 at::IntArrayRef padding, const char* op, const at::Tensor* grad = nullptr);

// shift_conv1x1: checks the 1x1 weight ((Co, C) or (Co, C, 1, 1)), the optional bias (Co) and
// residual (N, Co, Ho, Wo) against the shift's geometry; returns Co.
int64_t check_conv1x1(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual);

// scale_bias_relu: a 4-D input and one scale and one bias per channel.
void check_scale_bias(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& bias);

// conv1x1: a 4-D input, a (Co, C) or (Co, C, 1, 1) weight, an optional bias (Co) and an optional
// input transform relu(input * in_scale + in_bias) (both C values, or neither); returns Co.
int64_t check_pointwise(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_bias);

// conv1x1 from ATen operators (every device; the CPU kernel's path for what it does not serve).
at::Tensor conv1x1_composite(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_bias,
                             bool relu);

}  // namespace asl
