// The parts of the CPU BatchNorm-ReLU kernels (batch_norm_kernel.cpp) that the fused
// BatchNorm-ReLU-shift kernels (active_shift_kernel.cpp) share: the checks, the batch's
// statistics, relu's per-channel coefficients and the backward's second pass.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace asl {
namespace bn {

// Whether the channels_last AVX-512 loops run: a CPU with AVX-512 (F, DQ, VL, BW), unless
// ASL_CPU_SIMD=avx2|scalar turns them off, as for the active shift, to test the other loops.
bool avx512_rows();
// Throws for what batch_norm_relu rejects (named as `op`).
void check_training(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const char* op);
// Throws unless mean and invstd are (C) in input's accumulation dtype, on its device.
void check_stats(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd, const char* op);
// The batch's (mean, invstd) per channel of input (contiguous in its memory format), in the
// accumulation dtype; the sums are in a fixed order, whatever the number of threads.
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input, double eps);
// relu(x a + b)'s coefficients as one (2C) tensor in the accumulation dtype: a = weight invstd,
// then b = bias - mean a.
at::Tensor affine(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd);
// relu(input a + b) per channel, ab as from affine: batch_norm_relu's output (input contiguous in
// its memory format, the result in the same).
at::Tensor relu_affine(const at::Tensor& input, const at::Tensor& ab);
// The backward's first pass over `pixels` channels_last pixels of C: out[c] += sum gy and
// out[C + c] += sum gy (x - mean), gy = g where x a + b > 0 (ab = (a, b)); summed as
// batch_norm_relu_backward sums them, in blocks of pixels in T, then in double.
void grad_sums(const float* g, const float* x, int64_t pixels, int64_t C, const float* ab, const float* mean,
               double* out);
void grad_sums(const double* g, const double* x, int64_t pixels, int64_t C, const double* ab, const double* mean,
               double* out);
// The backward's second pass as per-channel coefficients, gx = k gy + (x - mean) q + r0 with
// kqr = (k, q, r0) (3C, accumulation dtype), and (grad_weight, grad_bias), from its sums (below).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_coefficients(const at::Tensor& input, const at::Tensor& weight,
                                                                 const at::Tensor& mean, const at::Tensor& invstd,
                                                                 const std::vector<double>& sums);
// That pass over `rows` channels_last rows of C: gy = g where x a + b > 0 (ab = (a, b)); add,
// where given (rows of C), is added to gx as it is written.
void input_grad_rows(const float* g, const float* x, float* gx, int64_t rows, int64_t C, const float* ab,
                     const float* mean, const float* kqr, const float* add = nullptr);
void input_grad_rows(const double* g, const double* x, double* gx, int64_t rows, int64_t C, const double* ab,
                     const double* mean, const double* kqr, const double* add = nullptr);
// (grad_input, grad_weight, grad_bias) from grad_output and the backward's per-channel sums
// (sum gy, then sum gy (x - mean); gy = grad_output where relu's argument is positive). grad and
// input contiguous in input's memory format; residual, where defined (the same, in input's
// dtype), is added to grad_input as it is written. in_place: grad_input is written over grad (a
// buffer the caller owns and no longer needs), whose cache lines the pass has just read.
std::tuple<at::Tensor, at::Tensor, at::Tensor> input_grad_from_sums(const at::Tensor& grad, const at::Tensor& input,
                                                                    const at::Tensor& weight, const at::Tensor& bias,
                                                                    const at::Tensor& mean, const at::Tensor& invstd,
                                                                    const std::vector<double>& sums,
                                                                    const at::Tensor& residual = at::Tensor(),
                                                                    bool in_place = false);
// batch_norm_relu_backward, arguments already checked (residual: grad_residual or undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& input,
                                                        const at::Tensor& weight, const at::Tensor& bias,
                                                        const at::Tensor& mean, const at::Tensor& invstd,
                                                        const at::Tensor& residual = at::Tensor());

}  // namespace bn
}  // namespace asl
