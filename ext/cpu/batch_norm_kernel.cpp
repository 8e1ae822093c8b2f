// CPU kernels of the training-mode BatchNorm-ReLU pair (batch_norm_relu and its backward), for
// NCHW and channels_last tensors. ATen's BatchNorm, ReLU and their two backwards take about eight
// full passes over a layer's activations in a training step, and at CIFAR sizes on the CPU they
// are bound by memory traffic; these take five: forward one pass for the statistics and one that
// writes relu(x * a + b); backward one pass for the two per-channel sums and one that writes the
// input gradient. The ReLU's mask is recomputed from the input in the backward (it reads the input
// anyway), so neither the output nor a mask is kept for it.
#include "batch_norm_parts.h"
#include "plane_sampling.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define ASL_BN_AVX512 1
#endif

namespace asl {
namespace {

constexpr int64_t kBlock = 256;  // rows (channels_last) or elements (NCHW) summed in acc_t, then in double

// relu's argument, computed the same way in the forward and in the backward's mask.
template <typename acc_t>
inline acc_t affine(acc_t x, acc_t a, acc_t b) {
  return x * a + b;
}

// channels_last float rows with C a multiple of 16 on CPUs with AVX-512: the loops below reload
// each channel's coefficients from memory for every vector of values, so they are bound by loads
// (in the backward six of them for one vector of input and one of grad_output); here a block of
// rows runs with the coefficients of up to 64 channels held in registers. Each channel's sums are
// still added row by row in acc_t, and relu's argument is fma(x, a, b) in the forward and in the
// backward's mask alike.
#ifdef ASL_BN_AVX512
#define ASL_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma")))

namespace rows512 {

// Calls body(std::integral_constant<int, nv>(), c0) for channels [c0, c0 + 16 nv) in chunks of
// at most four vectors.
template <typename Body>
inline void by_chunks(int64_t C, const Body& body) {
  for (int64_t c0 = 0; c0 < C; c0 += 64) {
    switch (std::min<int64_t>(4, (C - c0) / 16)) {
      case 4: body(std::integral_constant<int, 4>(), c0); break;
      case 3: body(std::integral_constant<int, 3>(), c0); break;
      case 2: body(std::integral_constant<int, 2>(), c0); break;
      default: body(std::integral_constant<int, 1>(), c0); break;
    }
  }
}

template <int NV>
ASL_TARGET_AVX512 inline void moments(const float* __restrict x, int64_t rows, int64_t C, const float* pivot,
                                      float* s1, float* s2) {
  __m512 p[NV], a1[NV], a2[NV];
  for (int v = 0; v < NV; ++v)
    p[v] = _mm512_loadu_ps(pivot + 16 * v), a1[v] = _mm512_loadu_ps(s1 + 16 * v), a2[v] = _mm512_loadu_ps(s2 + 16 * v);
  for (int64_t r = 0; r < rows; ++r)
    for (int v = 0; v < NV; ++v) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + r * C + 16 * v), p[v]);
      a1[v] = _mm512_add_ps(a1[v], d);
      a2[v] = _mm512_fmadd_ps(d, d, a2[v]);
    }
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s1 + 16 * v, a1[v]), _mm512_storeu_ps(s2 + 16 * v, a2[v]);
}

// The lanes of u above 0 (not a NaN), where relu passes u (or its gradient) on.
ASL_TARGET_AVX512 inline __mmask16 positive(__m512 u) { return _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_GT_OQ); }

template <int NV>
ASL_TARGET_AVX512 inline void forward(const float* __restrict x, float* __restrict y, int64_t rows, int64_t C,
                                      const float* a, const float* b) {
  __m512 va[NV], vb[NV];
  for (int v = 0; v < NV; ++v) va[v] = _mm512_loadu_ps(a + 16 * v), vb[v] = _mm512_loadu_ps(b + 16 * v);
  for (int64_t r = 0; r < rows; ++r)
    for (int v = 0; v < NV; ++v) {
      const __m512 u = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * C + 16 * v), va[v], vb[v]);
      _mm512_storeu_ps(y + r * C + 16 * v, _mm512_maskz_mov_ps(positive(u), u));
    }
}

// grad_output where relu's argument is positive, else 0.
ASL_TARGET_AVX512 inline __m512 masked_grad(__m512 x, __m512 g, __m512 a, __m512 b) {
  return _mm512_maskz_mov_ps(positive(_mm512_fmadd_ps(x, a, b)), g);
}

template <int NV>
ASL_TARGET_AVX512 inline void grad_sums(const float* __restrict g, const float* __restrict x, int64_t rows, int64_t C,
                                        const float* a, const float* b, const float* mean, float* s1, float* s2) {
  __m512 va[NV], vb[NV], vm[NV], a1[NV], a2[NV];
  for (int v = 0; v < NV; ++v) {
    va[v] = _mm512_loadu_ps(a + 16 * v), vb[v] = _mm512_loadu_ps(b + 16 * v), vm[v] = _mm512_loadu_ps(mean + 16 * v);
    a1[v] = _mm512_loadu_ps(s1 + 16 * v), a2[v] = _mm512_loadu_ps(s2 + 16 * v);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int v = 0; v < NV; ++v) {
      const __m512 xv = _mm512_loadu_ps(x + r * C + 16 * v);
      const __m512 gy = masked_grad(xv, _mm512_loadu_ps(g + r * C + 16 * v), va[v], vb[v]);
      a1[v] = _mm512_add_ps(a1[v], gy);
      a2[v] = _mm512_fmadd_ps(gy, _mm512_sub_ps(xv, vm[v]), a2[v]);
    }
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s1 + 16 * v, a1[v]), _mm512_storeu_ps(s2 + 16 * v, a2[v]);
}

// add: nullptr, or a tensor of the same layout added to gx (a gradient reaching the input by
// another path), after gx is rounded as it would be stored.
template <int NV, bool ADD>
ASL_TARGET_AVX512 inline void input_grad(const float* __restrict g, const float* __restrict x, float* __restrict gx,
                                         int64_t rows, int64_t C, const float* a, const float* b, const float* mean,
                                         const float* k, const float* q, const float* r0, const float* __restrict add) {
  __m512 va[NV], vb[NV], vm[NV], vk[NV], vq[NV], vr[NV];
  for (int v = 0; v < NV; ++v) {
    va[v] = _mm512_loadu_ps(a + 16 * v), vb[v] = _mm512_loadu_ps(b + 16 * v), vm[v] = _mm512_loadu_ps(mean + 16 * v);
    vk[v] = _mm512_loadu_ps(k + 16 * v), vq[v] = _mm512_loadu_ps(q + 16 * v), vr[v] = _mm512_loadu_ps(r0 + 16 * v);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int v = 0; v < NV; ++v) {
      const __m512 xv = _mm512_loadu_ps(x + r * C + 16 * v);
      const __m512 gy = masked_grad(xv, _mm512_loadu_ps(g + r * C + 16 * v), va[v], vb[v]);
      __m512 out = _mm512_fmadd_ps(vk[v], gy, _mm512_fmadd_ps(_mm512_sub_ps(xv, vm[v]), vq[v], vr[v]));
      if constexpr (ADD) out = _mm512_add_ps(out, _mm512_loadu_ps(add + r * C + 16 * v));
      _mm512_storeu_ps(gx + r * C + 16 * v, out);
    }
}

}  // namespace rows512
#endif

// Whether channels_last float rows of C channels take the rows512 loops: C a multiple of 16 on a
// CPU with AVX-512 (ASL_CPU_SIMD=avx2|scalar turns them off, as for the active shift, to test
// the other loops).
template <typename T>
bool rows_avx512(int64_t C) {
#ifdef ASL_BN_AVX512
  return std::is_same_v<T, float> && C % 16 == 0 && bn::avx512_rows();
#else
  (void)C;
  return false;
#endif
}

// channels_last: s1[c] += sum(x - pivot[c]), s2[c] += sum((x - pivot[c])^2) over `rows` rows of C.
template <typename T, typename acc_t>
ASL_MULTIVERSION void moments_rows(const T* __restrict x, int64_t rows, int64_t C, const acc_t* __restrict pivot,
                                   acc_t* __restrict s1, acc_t* __restrict s2) {
#ifdef ASL_BN_AVX512
  if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>)
    if (rows_avx512<T>(C))
      return rows512::by_chunks(C, [&](auto nv, int64_t c0) { rows512::moments<decltype(nv)::value>(x + c0, rows, C, pivot + c0, s1 + c0, s2 + c0); });
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(x[r * C + c]) - pivot[c];
      s1[c] += d;
      s2[c] += d * d;
    }
}

// channels_last backward sums: with gy = g where relu's argument is positive (else 0),
// s1[c] += sum(gy), s2[c] += sum(gy * (x - mean[c])).
template <typename T, typename acc_t>
ASL_MULTIVERSION void grad_sums_rows(const T* __restrict g, const T* __restrict x, int64_t rows, int64_t C,
                                     const acc_t* __restrict a, const acc_t* __restrict b,
                                     const acc_t* __restrict mean, acc_t* __restrict s1, acc_t* __restrict s2) {
#ifdef ASL_BN_AVX512
  if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>)
    if (rows_avx512<T>(C))
      return rows512::by_chunks(C, [&](auto nv, int64_t c0) { rows512::grad_sums<decltype(nv)::value>(g + c0, x + c0, rows, C, a + c0, b + c0, mean + c0, s1 + c0, s2 + c0); });
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t xv = static_cast<acc_t>(x[r * C + c]);
      const acc_t gv = static_cast<acc_t>(g[r * C + c]);  // loaded unconditionally: the loop vectorizes
      const acc_t gy = affine(xv, a[c], b[c]) > acc_t(0) ? gv : acc_t(0);
      s1[c] += gy;
      s2[c] += gy * (xv - mean[c]);
    }
}

// y = relu(x * a + b) (forward), or gx = k * gy + (x - mean) * q + r0 (backward), over `rows` rows of C.
template <typename T, typename acc_t>
ASL_MULTIVERSION void forward_rows(const T* __restrict x, T* __restrict y, int64_t rows, int64_t C,
                                   const acc_t* __restrict a, const acc_t* __restrict b) {
#ifdef ASL_BN_AVX512
  if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>)
    if (rows_avx512<T>(C))
      return rows512::by_chunks(C, [&](auto nv, int64_t c0) { rows512::forward<decltype(nv)::value>(x + c0, y + c0, rows, C, a + c0, b + c0); });
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = affine(static_cast<acc_t>(x[r * C + c]), a[c], b[c]);
      y[r * C + c] = static_cast<T>(v > acc_t(0) ? v : acc_t(0));
    }
}

template <typename T, typename acc_t>
ASL_MULTIVERSION void input_grad_rows(const T* __restrict g, const T* __restrict x, T* __restrict gx, int64_t rows,
                                      int64_t C, const acc_t* __restrict a, const acc_t* __restrict b,
                                      const acc_t* __restrict mean, const acc_t* __restrict k,
                                      const acc_t* __restrict q, const acc_t* __restrict r0,
                                      const T* __restrict add = nullptr) {
#ifdef ASL_BN_AVX512
  if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>)
    if (rows_avx512<T>(C))
      return rows512::by_chunks(C, [&](auto nv, int64_t c0) {
        constexpr int NV = decltype(nv)::value;
        if (add != nullptr)
          rows512::input_grad<NV, true>(g + c0, x + c0, gx + c0, rows, C, a + c0, b + c0, mean + c0, k + c0, q + c0, r0 + c0, add + c0);
        else
          rows512::input_grad<NV, false>(g + c0, x + c0, gx + c0, rows, C, a + c0, b + c0, mean + c0, k + c0, q + c0, r0 + c0, nullptr);
      });
#endif
  auto loop = [&](auto with_add) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xv = static_cast<acc_t>(x[r * C + c]);
        const acc_t gv = static_cast<acc_t>(g[r * C + c]);  // loaded unconditionally: the loop vectorizes
        const acc_t gy = affine(xv, a[c], b[c]) > acc_t(0) ? gv : acc_t(0);
        const T out = static_cast<T>(k[c] * gy + ((xv - mean[c]) * q[c] + r0[c]));
        if constexpr (decltype(with_add)::value) gx[r * C + c] = out + add[r * C + c];
        else gx[r * C + c] = out;
      }
  };
  if (add != nullptr) loop(std::true_type{});
  else loop(std::false_type{});
}

// The NCHW forms: one channel's contiguous run of n elements, with scalars per channel. The sums
// go through 8 lane accumulators, which the compiler vectorizes (a single one it may not reorder).
template <typename T, typename acc_t>
ASL_MULTIVERSION void moments_run(const T* __restrict x, int64_t n, acc_t pivot, acc_t* __restrict out) {
  acc_t l1[8] = {}, l2[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) {
      const acc_t d = static_cast<acc_t>(x[i + l]) - pivot;
      l1[l] += d;
      l2[l] += d * d;
    }
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - pivot;
    l1[0] += d;
    l2[0] += d * d;
  }
  for (int l = 0; l < 8; ++l) out[0] += l1[l], out[1] += l2[l];
}

template <typename T, typename acc_t>
ASL_MULTIVERSION void grad_sums_run(const T* __restrict g, const T* __restrict x, int64_t n, acc_t a, acc_t b,
                                    acc_t mean, acc_t* __restrict out) {
  acc_t l1[8] = {}, l2[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) {
      const acc_t xv = static_cast<acc_t>(x[i + l]);
      const acc_t gv = static_cast<acc_t>(g[i + l]);
      const acc_t gy = affine(xv, a, b) > acc_t(0) ? gv : acc_t(0);
      l1[l] += gy;
      l2[l] += gy * (xv - mean);
    }
  for (; i < n; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t gv = static_cast<acc_t>(g[i]);
    const acc_t gy = affine(xv, a, b) > acc_t(0) ? gv : acc_t(0);
    l1[0] += gy;
    l2[0] += gy * (xv - mean);
  }
  for (int l = 0; l < 8; ++l) out[0] += l1[l], out[1] += l2[l];
}

template <typename T, typename acc_t>
ASL_MULTIVERSION void forward_run(const T* __restrict x, T* __restrict y, int64_t n, acc_t a, acc_t b) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = affine(static_cast<acc_t>(x[i]), a, b);
    y[i] = static_cast<T>(v > acc_t(0) ? v : acc_t(0));
  }
}

template <typename T, typename acc_t>
ASL_MULTIVERSION void input_grad_run(const T* __restrict g, const T* __restrict x, T* __restrict gx, int64_t n,
                                     acc_t a, acc_t b, acc_t mean, acc_t k, acc_t q, acc_t r0,
                                     const T* __restrict add = nullptr) {
  auto loop = [&](auto with_add) {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xv = static_cast<acc_t>(x[i]);
      const acc_t gv = static_cast<acc_t>(g[i]);
      const acc_t gy = affine(xv, a, b) > acc_t(0) ? gv : acc_t(0);
      const T out = static_cast<T>(k * gy + ((xv - mean) * q + r0));
      if constexpr (decltype(with_add)::value) gx[i] = out + add[i];
      else gx[i] = out;
    }
  };
  if (add != nullptr) loop(std::true_type{});
  else loop(std::false_type{});
}

// Per-channel (sum of u, sum of v) over the whole tensor, where `rows_fn(r0, rows, s1, s2)` adds a
// block of channels_last rows and `run_fn(n, c, begin, len, out2)` a run of an NCHW plane. Blocks
// are summed in acc_t and then, in a fixed order, in double: the result does not depend on the
// number of threads.
template <typename acc_t, typename RowsFn, typename RunFn>
std::vector<double> channel_sums(int64_t N, int64_t C, int64_t P, bool channels_last, const RowsFn& rows_fn,
                                 const RunFn& run_fn) {
  std::vector<double> total(static_cast<size_t>(2 * C), 0.0);
  if (channels_last) {
    const int64_t M = N * P, blocks = (M + kBlock - 1) / kBlock;
    std::vector<double> partial(static_cast<size_t>(blocks * 2 * C));
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s(static_cast<size_t>(2 * C));
      for (int64_t k = begin; k < end; ++k) {
        std::fill(s.begin(), s.end(), acc_t(0));
        const int64_t r0 = k * kBlock;
        rows_fn(r0, std::min(kBlock, M - r0), s.data(), s.data() + C);
        for (int64_t c = 0; c < 2 * C; ++c) partial[k * 2 * C + c] = static_cast<double>(s[c]);
      }
    });
    for (int64_t k = 0; k < blocks; ++k)
      for (int64_t c = 0; c < 2 * C; ++c) total[c] += partial[k * 2 * C + c];
    return total;
  }
  std::vector<double> partial(static_cast<size_t>(N * C * 2), 0.0);
  at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t j = 0; j < P; j += kBlock) {
        acc_t out[2] = {acc_t(0), acc_t(0)};
        run_fn(i / C, i % C, j, std::min(kBlock, P - j), out);
        s1 += static_cast<double>(out[0]);
        s2 += static_cast<double>(out[1]);
      }
      partial[2 * i] = s1;
      partial[2 * i + 1] = s2;
    }
  });
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      total[c] += partial[2 * (n * C + c)];
      total[C + c] += partial[2 * (n * C + c) + 1];
    }
  return total;
}

// Calls rows_fn(r0, rows) over channels_last row blocks, or run_fn(n, c) over NCHW planes, in parallel.
template <typename RowsFn, typename RunFn>
void elementwise(int64_t N, int64_t C, int64_t P, bool channels_last, const RowsFn& rows_fn, const RunFn& run_fn) {
  if (channels_last) {
    const int64_t M = N * P;
    at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; r += kBlock) rows_fn(r, std::min(kBlock, end - r));
    });
    return;
  }
  at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run_fn(i / C, i % C);
  });
}

at::MemoryFormat format_of(const at::Tensor& input) {
  return use_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace

namespace bn {

bool avx512_rows() {
#ifdef ASL_BN_AVX512
  static const bool cpu = [] {
    __builtin_cpu_init();
    const char* want = std::getenv("ASL_CPU_SIMD");
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           (want == nullptr || std::string(want) == "avx512");
  }();
  return cpu;
#else
  return false;
#endif
}

void check_training(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const char* op) {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got ", input.sizes());
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
                   ": input must be float32 or float64, got ", input.scalar_type());
  const int64_t C = input.size(1);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weight, "weight"}, {bias, "bias"}}) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C && t.device() == input.device(), op, ": ", name, " must be (", C,
                      ") on ", input.device(), ", got ", t.sizes(), " on ", t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
                     " differs from input dtype ", input.scalar_type());
  }
  TORCH_CHECK_VALUE(input.numel() / std::max<int64_t>(C, 1) > 1, op,
                    ": expected more than 1 value per channel when training, got input of shape ", input.sizes());
}

void check_stats(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd, const char* op) {
  const int64_t C = input.size(1);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"}, {invstd, "invstd"}}) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C && t.device() == input.device(), op, ": ", name, " must be (",
                      C, ") on ", input.device(), ", got ", t.sizes(), " on ", t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == acc_type, op, ": ", name, " must be ", acc_type, ", got ", t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input, double eps) {
  const bool cl = use_channels_last(input);
  const int64_t N = input.size(0), C = input.size(1), P = input.size(2) * input.size(3);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor mean = at::empty({C}, input.options().dtype(acc_type)), invstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_stats_cpu", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const T* xp = input.const_data_ptr<T>();
    // Sums of x - pivot (the channel's first value) rather than of x: no cancellation in the
    // variance when a channel's mean is large against its spread.
    std::vector<acc_t> pivot(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) pivot[c] = static_cast<acc_t>(cl ? xp[c] : xp[c * P]);
    const auto sums = channel_sums<acc_t>(
        N, C, P, cl,
        [&](int64_t r0, int64_t rows, acc_t* s1, acc_t* s2) {
          moments_rows<T, acc_t>(xp + r0 * C, rows, C, pivot.data(), s1, s2);
        },
        [&](int64_t n, int64_t c, int64_t j, int64_t len, acc_t* o) {
          moments_run<T, acc_t>(xp + (n * C + c) * P + j, len, pivot[c], o);
        });
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    const double M = static_cast<double>(N * P);
    for (int64_t c = 0; c < C; ++c) {
      const double d = sums[c] / M, var = std::max(0.0, sums[C + c] / M - d * d);
      mp[c] = static_cast<acc_t>(pivot[c] + d);
      ip[c] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    }
  });
  return {mean, invstd};
}

at::Tensor affine(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd) {
  const auto acc_type = mean.scalar_type();
  const int64_t C = mean.size(0);
  at::Tensor ab = at::empty({2 * C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "batch_norm_affine_cpu", [&] {
    using acc_t = scalar_t;
    const at::Tensor w = weight.to(acc_type).contiguous(), bi = bias.to(acc_type).contiguous();
    const at::Tensor m = mean.contiguous(), is = invstd.contiguous();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = bi.const_data_ptr<acc_t>();
    const acc_t* mp = m.const_data_ptr<acc_t>();
    const acc_t* ip = is.const_data_ptr<acc_t>();
    acc_t* a = ab.data_ptr<acc_t>();
    acc_t* b = a + C;
    for (int64_t c = 0; c < C; ++c) {
      a[c] = wp[c] * ip[c];
      b[c] = bp[c] - mp[c] * a[c];
    }
  });
  return ab;
}

at::Tensor relu_affine(const at::Tensor& input, const at::Tensor& ab) {
  const auto format = format_of(input);
  const bool cl = format == at::MemoryFormat::ChannelsLast;
  const int64_t N = input.size(0), C = input.size(1), P = input.size(2) * input.size(3);
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(format));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_relu_apply_cpu", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const T* xp = input.const_data_ptr<T>();
    T* yp = out.data_ptr<T>();
    const acc_t* a = ab.const_data_ptr<acc_t>();
    const acc_t* b = a + C;
    elementwise(
        N, C, P, cl, [&](int64_t r0, int64_t rows) { forward_rows<T, acc_t>(xp + r0 * C, yp + r0 * C, rows, C, a, b); },
        [&](int64_t n, int64_t c) {
          const int64_t i = (n * C + c) * P;
          forward_run<T, acc_t>(xp + i, yp + i, P, a[c], b[c]);
        });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_coefficients(const at::Tensor& input, const at::Tensor& weight,
                                                                 const at::Tensor& mean, const at::Tensor& invstd,
                                                                 const std::vector<double>& sums) {
  const int64_t C = input.size(1);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor kqr = at::empty({3 * C}, mean.options().dtype(acc_type));
  at::Tensor gw = at::empty({C}, weight.options()), gb = at::empty({C}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_relu_grad_coefficients_cpu", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const at::Tensor w = weight.to(acc_type).contiguous(), is_ = invstd.contiguous();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* ip = is_.const_data_ptr<acc_t>();
    acc_t* k = kqr.data_ptr<acc_t>();
    acc_t* q = k + C;
    acc_t* r0 = k + 2 * C;
    T* gwp = gw.data_ptr<T>();
    T* gbp = gb.data_ptr<T>();
    // gx = weight * invstd * (gy - mean(gy) - xhat * mean(gy * xhat)), xhat = (x - mean) * invstd,
    // written as k * gy + (x - mean) * q + r0 with per-channel k, q, r0.
    const double M = static_cast<double>(input.numel() / C);
    for (int64_t c = 0; c < C; ++c) {
      const double kc = static_cast<double>(wp[c]) * ip[c], is = ip[c];
      const double qc = -kc * is * is * sums[C + c] / M;
      k[c] = static_cast<acc_t>(kc);
      q[c] = static_cast<acc_t>(qc);
      r0[c] = static_cast<acc_t>(-kc * sums[c] / M);
      gwp[c] = static_cast<T>(sums[C + c] * is);
      gbp[c] = static_cast<T>(sums[c]);
    }
  });
  return {kqr, gw, gb};
}

template <typename T>
void grad_sums_pixels(const T* g, const T* x, int64_t pixels, int64_t C, const T* ab, const T* mean, double* out) {
  std::vector<T> s(static_cast<size_t>(2 * C));
  for (int64_t p0 = 0; p0 < pixels; p0 += kBlock) {  // as channel_sums: kBlock rows in T, then in double
    std::fill(s.begin(), s.end(), T(0));
    grad_sums_rows<T, T>(g + p0 * C, x + p0 * C, std::min(kBlock, pixels - p0), C, ab, ab + C, mean, s.data(),
                         s.data() + C);
    for (int64_t c = 0; c < 2 * C; ++c) out[c] += static_cast<double>(s[c]);
  }
}

void grad_sums(const float* g, const float* x, int64_t pixels, int64_t C, const float* ab, const float* mean,
               double* out) {
  grad_sums_pixels<float>(g, x, pixels, C, ab, mean, out);
}

void grad_sums(const double* g, const double* x, int64_t pixels, int64_t C, const double* ab, const double* mean,
               double* out) {
  grad_sums_pixels<double>(g, x, pixels, C, ab, mean, out);
}

void input_grad_rows(const float* g, const float* x, float* gx, int64_t rows, int64_t C, const float* ab,
                     const float* mean, const float* kqr, const float* add) {
  ::asl::input_grad_rows<float, float>(g, x, gx, rows, C, ab, ab + C, mean, kqr, kqr + C, kqr + 2 * C, add);
}

void input_grad_rows(const double* g, const double* x, double* gx, int64_t rows, int64_t C, const double* ab,
                     const double* mean, const double* kqr, const double* add) {
  ::asl::input_grad_rows<double, double>(g, x, gx, rows, C, ab, ab + C, mean, kqr, kqr + C, kqr + 2 * C, add);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> input_grad_from_sums(const at::Tensor& grad, const at::Tensor& input,
                                                                    const at::Tensor& weight, const at::Tensor& bias,
                                                                    const at::Tensor& mean, const at::Tensor& invstd,
                                                                    const std::vector<double>& sums,
                                                                    const at::Tensor& residual, bool in_place) {
  const bool cl = use_channels_last(input);
  const int64_t N = input.size(0), C = input.size(1), P = input.size(2) * input.size(3);
  at::Tensor gx = in_place ? grad : at::empty(input.sizes(), input.options().memory_format(format_of(input)));
  auto [kqr, gw, gb] = grad_coefficients(input, weight, mean, invstd, sums);
  const at::Tensor ab = affine(weight, bias, mean, invstd), mean_c = mean.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_relu_input_grad_cpu", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const T* gp = grad.const_data_ptr<T>();
    const T* xp = input.const_data_ptr<T>();
    T* op_ = gx.data_ptr<T>();
    const T* add = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
    const acc_t* mp = mean_c.const_data_ptr<acc_t>();
    const acc_t* a = ab.const_data_ptr<acc_t>();
    const acc_t* b = a + C;
    const acc_t* k = kqr.const_data_ptr<acc_t>();
    const acc_t* q = k + C;
    const acc_t* r0 = k + 2 * C;
    // in place: each run of grad goes through a cache-sized copy first, so that the loops' input
    // and output do not alias
    auto source = [&](int64_t i, int64_t n) -> const T* {
      if (!in_place) return gp + i;
      thread_local std::vector<T> copy;
      copy.assign(gp + i, gp + i + n);
      return copy.data();
    };
    elementwise(
        N, C, P, cl,
        [&](int64_t rr, int64_t rows) {
          ::asl::input_grad_rows<T, acc_t>(source(rr * C, rows * C), xp + rr * C, op_ + rr * C, rows, C, a, b, mp, k,
                                           q, r0, add == nullptr ? nullptr : add + rr * C);
        },
        [&](int64_t n, int64_t c) {
          const int64_t i = (n * C + c) * P;
          input_grad_run<T, acc_t>(source(i, P), xp + i, op_ + i, P, a[c], b[c], mp[c], k[c], q[c], r0[c],
                                   add == nullptr ? nullptr : add + i);
        });
  });
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_, const at::Tensor& input_,
                                                        const at::Tensor& weight, const at::Tensor& bias,
                                                        const at::Tensor& mean, const at::Tensor& invstd,
                                                        const at::Tensor& residual_) {
  const auto format = format_of(input_);
  const at::Tensor input = input_.contiguous(format);
  const at::Tensor grad = grad_.to(input.scalar_type()).contiguous(format);
  const at::Tensor residual = residual_.defined() ? residual_.contiguous(format) : residual_;
  const bool cl = format == at::MemoryFormat::ChannelsLast;
  const int64_t N = input.size(0), C = input.size(1), P = input.size(2) * input.size(3);
  const at::Tensor ab = affine(weight, bias, mean, invstd), mean_c = mean.contiguous();
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_relu_backward_cpu", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const T* gp = grad.const_data_ptr<T>();
    const T* xp = input.const_data_ptr<T>();
    const acc_t* mp = mean_c.const_data_ptr<acc_t>();
    const acc_t* a = ab.const_data_ptr<acc_t>();
    const acc_t* b = a + C;
    sums = channel_sums<acc_t>(
        N, C, P, cl,
        [&](int64_t r0, int64_t rows, acc_t* s1, acc_t* s2) {
          grad_sums_rows<T, acc_t>(gp + r0 * C, xp + r0 * C, rows, C, a, b, mp, s1, s2);
        },
        [&](int64_t n, int64_t c, int64_t j, int64_t len, acc_t* o) {
          const int64_t i = (n * C + c) * P + j;
          grad_sums_run<T, acc_t>(gp + i, xp + i, len, a[c], b[c], mp[c], o);
        });
  });
  return input_grad_from_sums(grad, input, weight, bias, mean, invstd, sums, residual);
}

}  // namespace bn

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cpu(const at::Tensor& input_, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps) {
  const char* op = "batch_norm_relu";
  bn::check_training(input_, weight, bias, op);
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  const at::Tensor input = input_.contiguous(format_of(input_));
  auto [mean, invstd] = bn::batch_stats(input, eps);
  return {bn::relu_affine(input, bn::affine(weight, bias, mean, invstd)), mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& grad_residual) {
  const char* op = "batch_norm_relu_backward";
  bn::check_training(input, weight, bias, op);
  TORCH_CHECK_VALUE(grad.sizes() == input.sizes() && grad.device() == input.device(), op,
                    ": grad_output must have the input's shape ", input.sizes(), " on ", input.device(), ", got ",
                    grad.sizes(), " on ", grad.device());
  bn::check_stats(input, mean, invstd, op);
  at::Tensor residual;
  if (grad_residual.has_value() && grad_residual->defined()) {
    residual = *grad_residual;
    TORCH_CHECK_VALUE(residual.sizes() == input.sizes() && residual.device() == input.device(), op,
                      ": grad_residual must have the input's shape ", input.sizes(), " on ", input.device(), ", got ",
                      residual.sizes(), " on ", residual.device());
    TORCH_CHECK_TYPE(residual.scalar_type() == input.scalar_type(), op, ": grad_residual must be ",
                     input.scalar_type(), " as the input, got ", residual.scalar_type());
  }
  return bn::backward(grad, input, weight, bias, mean, invstd, residual);
}

}  // namespace

TORCH_LIBRARY_IMPL(asl, CPU, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cpu);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cpu);
}

}  // namespace asl
