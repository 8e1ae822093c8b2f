// CPU kernels of batch_norm_relu_conv1x1: a pre-activation BatchNorm-ReLU (training, the batch's
// statistics) and the 1x1 convolution that reads it, without writing relu(batch_norm(x)).
//
// In a pre-activation residual block the pair's output is written by the BatchNorm-ReLU, read by
// the convolution, read again by the convolution's weight gradient, and its gradient is written
// by the convolution's input gradient and read twice by the BatchNorm-ReLU backward. At CIFAR
// sizes these passes run at the speed of memory. Here, on channels_last float tensors whose
// channel counts are multiples of 16 (at most 64) on CPUs with AVX-512:
//   forward:  the statistics' pass, then one pass that multiplies relu(x a + b) in registers;
//   backward: one pass that computes the convolution's input gradient a block of rows at a time
//             in cache, where its BatchNorm sums and the weight gradient (from relu(x a + b)
//             recomputed) read it, and keeps it in grad_input's buffer; then one pass over that
//             buffer that writes grad_input. (Keeping it was measured faster than computing it
//             again: 2.8 against 3.1 ms at 128x16x32x32, 1.35 against 1.65 at 128x64x8x8.)
// The sums run over fixed blocks of rows in a fixed order: the same bits at every thread count.
// Every other case (NCHW, float64, other channel counts, other CPUs) is the composition of
// batch_norm_relu's kernels and ATen's convolution.
#include "active_shift.h"
#include "batch_norm_parts.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define ASL_BRC_AVX512 1
#endif

namespace asl {
namespace {

constexpr int64_t kRows = 256;  // the backward's blocks of rows: batch_norm_relu_backward's (bn::grad_sums sums them so)
constexpr int64_t kMaxChannels = 64;

at::MemoryFormat format_of(const at::Tensor& t) {
  return use_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

#ifdef ASL_BRC_AVX512
#define ASL_BRC_TARGET __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma")))

// relu(x a + b) of n rows of 16 NVI channels into dst (rows of the same length): fma, then the
// lanes above 0, as batch_norm_relu computes it.
template <int NVI>
ASL_BRC_TARGET inline void activate(const float* __restrict x, float* __restrict dst, int64_t n, const float* a,
                                    const float* b) {
  constexpr int64_t C = 16 * NVI;
  for (int64_t r = 0; r < n; ++r)
    for (int v = 0; v < NVI; ++v) {
      const __m512 u = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * C + 16 * v), _mm512_loadu_ps(a + 16 * v),
                                       _mm512_loadu_ps(b + 16 * v));
      _mm512_storeu_ps(dst + r * C + 16 * v,
                       _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_GT_OQ), u));
    }
}

// Rows held in registers at a time by the products below: enough independent sums to keep the
// FMA units busy (each fma waits for the last one of its sum), few enough to stay in registers.
template <int NV>
constexpr int block_rows() {
  return NV == 1 ? 12 : NV == 2 ? 6 : 4;
}

// out (rows r of 16 NO channels) = in (rows of K) times m (K rows of 16 NO) for R rows from r,
// each output summing its K products in order with fma.
template <int K, int NO, int R>
ASL_BRC_TARGET inline void rows_times_block(const float* __restrict in, const float* __restrict m,
                                            float* __restrict out) {
  constexpr int64_t O = 16 * NO;
  __m512 acc[R][NO];
  for (int q = 0; q < R; ++q)
    for (int v = 0; v < NO; ++v) acc[q][v] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m512 w[NO];
    for (int v = 0; v < NO; ++v) w[v] = _mm512_loadu_ps(m + k * O + 16 * v);
    for (int q = 0; q < R; ++q) {
      const __m512 s = _mm512_set1_ps(in[q * K + k]);
      for (int v = 0; v < NO; ++v) acc[q][v] = _mm512_fmadd_ps(s, w[v], acc[q][v]);
    }
  }
  for (int q = 0; q < R; ++q)
    for (int v = 0; v < NO; ++v) _mm512_storeu_ps(out + q * O + 16 * v, acc[q][v]);
}

// out (n rows of 16 NO channels) = in (n rows of K) times m (K rows of 16 NO).
template <int K, int NO>
ASL_BRC_TARGET inline void rows_times(const float* __restrict in, const float* __restrict m, float* __restrict out,
                                      int64_t n) {
  constexpr int R = block_rows<NO>();
  constexpr int64_t O = 16 * NO;
  int64_t r = 0;
  for (; r + R <= n; r += R) rows_times_block<K, NO, R>(in + r * K, m, out + r * O);
  for (; r < n; ++r) rows_times_block<K, NO, 1>(in + r * K, m, out + r * O);
}

// gw (CO rows of 16 NVI) = sum over n rows of g[r, co] * act[r, :], rows in order, J output
// rows at a time in registers.
template <int CO, int NVI>
ASL_BRC_TARGET inline void weight_grad(const float* __restrict g, const float* __restrict act, float* __restrict gw,
                                       int64_t n) {
  constexpr int64_t CI = 16 * NVI;
  constexpr int J = NVI == 1 ? 16 : NVI == 2 ? 8 : 4;  // divides CO, a multiple of 16
  for (int co = 0; co < CO; co += J) {
    __m512 acc[J][NVI];
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < NVI; ++v) acc[j][v] = _mm512_setzero_ps();
    for (int64_t r = 0; r < n; ++r) {
      __m512 av[NVI];
      for (int v = 0; v < NVI; ++v) av[v] = _mm512_loadu_ps(act + r * CI + 16 * v);
      for (int j = 0; j < J; ++j) {
        const __m512 s = _mm512_set1_ps(g[r * CO + co + j]);
        for (int v = 0; v < NVI; ++v) acc[j][v] = _mm512_fmadd_ps(s, av[v], acc[j][v]);
      }
    }
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < NVI; ++v) _mm512_storeu_ps(gw + (co + j) * CI + 16 * v, acc[j][v]);
  }
}

// The channels_last float kernels for CI = 16 NVI input and CO = 16 NVO output channels.
template <int NVI, int NVO>
struct Rows {
  static constexpr int CI = 16 * NVI, CO = 16 * NVO;

  // out = relu(x a + b) wt over M rows (wt: CI x CO, the weight transposed).
  ASL_BRC_TARGET static void forward(const float* x, float* out, int64_t M, const float* ab, const float* wt) {
    at::parallel_for(0, (M + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float act[kRows * CI];
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r0 = k * kRows, n = std::min(kRows, M - r0);
        activate<NVI>(x + r0 * CI, act, n, ab, ab + CI);
        rows_times<CI, NVO>(act, wt, out + r0 * CO, n);
      }
    });
  }

  // The backward's first pass: per block of kRows rows, the convolution's input gradient
  // gy = g w (w: CO x CI) in cache, its BatchNorm sums (into sums, 2 CI per block) and the
  // block's weight gradient g^T relu(x a + b) (into gw, CO x CI per block); gy goes to gy_out
  // (rows of CI), over which the last pass (bn::input_grad_from_sums, in place) writes grad_input.
  ASL_BRC_TARGET static void sums(const float* g, const float* x, int64_t M, const float* ab, const float* mean,
                                  const float* w, double* sums, float* gw, float* gy_out) {
    at::parallel_for(0, (M + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float buf[kRows * CI];
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r0 = k * kRows, n = std::min(kRows, M - r0);
        activate<NVI>(x + r0 * CI, buf, n, ab, ab + CI);
        weight_grad<CO, NVI>(g + r0 * CO, buf, gw + k * CO * CI, n);
        float* gy = gy_out + r0 * CI;  // read back by grad_sums while in cache
        rows_times<CO, NVI>(g + r0 * CO, w, gy, n);
        std::fill(sums + k * 2 * CI, sums + (k + 1) * 2 * CI, 0.0);
        bn::grad_sums(gy, x + r0 * CI, n, CI, ab, mean, sums + k * 2 * CI);
      }
    });
  }
};

// Calls body(Rows<NVI, NVO>{}) for the channel counts' vector counts (1 to 4 each).
template <typename Body>
void with_rows(int64_t CI, int64_t CO, const Body& body) {
  auto outer = [&](auto nvi) {
    constexpr int I = decltype(nvi)::value;
    switch (CO / 16) {
      case 1: return body(Rows<I, 1>{});
      case 2: return body(Rows<I, 2>{});
      case 3: return body(Rows<I, 3>{});
      default: return body(Rows<I, 4>{});
    }
  };
  switch (CI / 16) {
    case 1: return outer(std::integral_constant<int, 1>{});
    case 2: return outer(std::integral_constant<int, 2>{});
    case 3: return outer(std::integral_constant<int, 3>{});
    default: return outer(std::integral_constant<int, 4>{});
  }
}
#endif

// Whether these tensors take the kernels above (see the file's comment); ASL_CPU_SIMD=avx2|scalar
// turns them off, as for batch_norm_relu's loops, to test the composition.
bool fused_rows(const at::Tensor& input, int64_t CO) {
#ifdef ASL_BRC_AVX512
  const int64_t CI = input.size(1);
  return bn::avx512_rows() && input.scalar_type() == at::kFloat && use_channels_last(input) && CI % 16 == 0 && CO % 16 == 0 &&
         CI <= kMaxChannels && CO <= kMaxChannels;
#else
  (void)input, (void)CO;
  return false;
#endif
}

void check_conv_weight(const at::Tensor& input, const at::Tensor& conv_weight, const char* op) {
  TORCH_CHECK_VALUE(conv_weight.dim() == 4 && conv_weight.size(1) == input.size(1) && conv_weight.size(2) == 1 &&
                        conv_weight.size(3) == 1 && conv_weight.device() == input.device(),
                    op, ": conv_weight must be (C_out, ", input.size(1), ", 1, 1) on ", input.device(), ", got ",
                    conv_weight.sizes(), " on ", conv_weight.device());
  TORCH_CHECK_TYPE(conv_weight.scalar_type() == input.scalar_type(), op, ": conv_weight dtype ",
                   conv_weight.scalar_type(), " differs from input dtype ", input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_conv1x1_cpu(const at::Tensor& input_,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& bias, double eps,
                                                                           const at::Tensor& conv_weight) {
  const char* op = "batch_norm_relu_conv1x1";
  bn::check_training(input_, weight, bias, op);
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  check_conv_weight(input_, conv_weight, op);
  const auto format = format_of(input_);
  const at::Tensor input = input_.contiguous(format);
  auto [mean, invstd] = bn::batch_stats(input, eps);
  const at::Tensor ab = bn::affine(weight, bias, mean, invstd);
  const int64_t N = input.size(0), CI = input.size(1), CO = conv_weight.size(0);
  if (!fused_rows(input, CO))
    return {at::conv2d(bn::relu_affine(input, ab), conv_weight).contiguous(format), mean, invstd};
  at::Tensor out = at::empty({N, CO, input.size(2), input.size(3)}, input.options().memory_format(format));
#ifdef ASL_BRC_AVX512
  const at::Tensor wt = conv_weight.reshape({CO, CI}).t().contiguous();
  with_rows(CI, CO, [&](auto rows) {
    decltype(rows)::forward(input.const_data_ptr<float>(), out.data_ptr<float>(), input.numel() / CI,
                            ab.const_data_ptr<float>(), wt.const_data_ptr<float>());
  });
#endif
  return {out, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_conv1x1_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& input_, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& grad_residual) {
  const char* op = "batch_norm_relu_conv1x1_backward";
  bn::check_training(input_, weight, bias, op);
  check_conv_weight(input_, conv_weight, op);
  bn::check_stats(input_, mean, invstd, op);
  const int64_t N = input_.size(0), CI = input_.size(1), CO = conv_weight.size(0);
  const std::vector<int64_t> out_shape{N, CO, input_.size(2), input_.size(3)};
  TORCH_CHECK_VALUE(grad_.sizes() == at::IntArrayRef(out_shape) && grad_.device() == input_.device(), op,
                    ": grad_output must be ", at::IntArrayRef(out_shape), " on ", input_.device(), ", got ",
                    grad_.sizes(), " on ", grad_.device());
  at::Tensor residual;
  if (grad_residual.has_value() && grad_residual->defined()) {
    residual = *grad_residual;
    TORCH_CHECK_VALUE(residual.sizes() == input_.sizes() && residual.device() == input_.device(), op,
                      ": grad_residual must have the input's shape ", input_.sizes(), " on ", input_.device(),
                      ", got ", residual.sizes(), " on ", residual.device());
    TORCH_CHECK_TYPE(residual.scalar_type() == input_.scalar_type(), op, ": grad_residual must be ",
                     input_.scalar_type(), " as the input, got ", residual.scalar_type());
  }
  const auto format = format_of(input_);
  const at::Tensor input = input_.contiguous(format);
  const at::Tensor grad = grad_.to(input.scalar_type()).contiguous(format);
  if (residual.defined()) residual = residual.contiguous(format);
  const at::Tensor ab = bn::affine(weight, bias, mean, invstd);
  if (!fused_rows(input, CO)) {
    const at::Tensor pre = bn::relu_affine(input, ab);
    auto [gpre, gcw, unused] = at::convolution_backward(grad, pre, conv_weight, std::nullopt, {1, 1}, {0, 0}, {1, 1},
                                                        false, {0, 0}, 1, {true, true, false});
    auto [gx, gw, gb] = bn::backward(gpre, input, weight, bias, mean, invstd, residual);
    return {gx, gw, gb, gcw};
  }
  at::Tensor gcw = at::empty(conv_weight.sizes(), conv_weight.options().memory_format(conv_weight.suggest_memory_format()));
  at::Tensor gx, gw, gb;
#ifdef ASL_BRC_AVX512
  const int64_t M = input.numel() / CI, blocks = (M + kRows - 1) / kRows;
  const at::Tensor w = conv_weight.reshape({CO, CI}).contiguous(), mean_c = mean.contiguous();
  std::vector<double> partial(static_cast<size_t>(blocks * 2 * CI));
  std::vector<float> partial_w(static_cast<size_t>(blocks * CO * CI));
  const at::Tensor gy = at::empty(input.sizes(), input.options().memory_format(format));  // the convolution's input gradient
  with_rows(CI, CO, [&](auto rows) {
    decltype(rows)::sums(grad.const_data_ptr<float>(), input.const_data_ptr<float>(), M, ab.const_data_ptr<float>(),
                         mean_c.const_data_ptr<float>(), w.const_data_ptr<float>(), partial.data(), partial_w.data(),
                         gy.data_ptr<float>());
  });
  // the blocks' sums in block order, whatever thread computed them
  std::vector<double> sums(static_cast<size_t>(2 * CI), 0.0), wsum(static_cast<size_t>(CO * CI), 0.0);
  for (int64_t k = 0; k < blocks; ++k) {
    for (int64_t c = 0; c < 2 * CI; ++c) sums[c] += partial[k * 2 * CI + c];
    for (int64_t i = 0; i < CO * CI; ++i) wsum[i] += partial_w[k * CO * CI + i];
  }
  float* gcwp = gcw.data_ptr<float>();  // (C_out, C_in, 1, 1): the same order in either memory format
  for (int64_t i = 0; i < CO * CI; ++i) gcwp[i] = static_cast<float>(wsum[i]);
  // the last pass writes grad_input over gy, whose lines it has just read
  std::tie(gx, gw, gb) = bn::input_grad_from_sums(gy, input, weight, bias, mean, invstd, sums, residual, true);
#endif
  return {gx, gw, gb, gcw};
}

}  // namespace

TORCH_LIBRARY_IMPL(asl, CPU, m) {
  m.impl("batch_norm_relu_conv1x1", &batch_norm_relu_conv1x1_cpu);
  m.impl("batch_norm_relu_conv1x1_backward", &batch_norm_relu_conv1x1_backward_cpu);
}

}  // namespace asl
