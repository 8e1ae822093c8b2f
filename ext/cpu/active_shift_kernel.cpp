// CPU kernels of the active shift operator: argument handling, the instruction-set dispatch and
// the parallel loops. The kernels themselves are in active_shift_simd.h, compiled here once for
// AVX-512, once for AVX2 and once for one lane; the best the CPU runs is picked at load time
// (ASL_CPU_SIMD=avx512|avx2|scalar picks another, for tests). Work is split over (n, c) planes
// (NCHW) or over blocks of rows of each image (channels_last); the shift gradient is summed per
// plane or block and then over them in a fixed order, so it does not depend on the thread count.
#include "batch_norm_parts.h"
#include "plane_sampling.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define ASL_X86_SIMD 1
#endif

namespace asl {
namespace shift_cpu {

// One channel's taps: tap (a, b) of output (i, j) reads input (i * sh + offr + a, j * sw + offc + b)
// with weight w[2a + b]; fr, fc are the shift's fractional parts (beta, alpha).
template <typename T>
struct ChanTaps {
  int64_t offr, offc;
  T w[4];
  double fr, fc;
  bool finite;
};

// The geometry of one plane's sampling: out (Ho x Wo, rows of Wo) from src (H x W, rows of W), tap
// (0, 0) of output (i, j) at source (i * sr + offr, j * sc + offc).
struct PlaneMap {
  int64_t H, W, Ho, Wo, sr, sc, offr, offc;
  // Planes no wider than a vector are taken several rows per vector (stride 1, one size, W | N).
  template <int N>
  bool multi_row() const {
    return sr == 1 && sc == 1 && H == Ho && W == Wo && W <= N && N % W == 0;
  }
  bool vectorized() const { return sc == 1 || sc == 2; }
};

}  // namespace shift_cpu
}  // namespace asl

#ifdef ASL_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
namespace asl {
namespace shift_cpu {
namespace avx512 {
#define ASL_SIMD 2
#include "active_shift_simd.h"
#undef ASL_SIMD
}  // namespace avx512
}  // namespace shift_cpu
}  // namespace asl
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace asl {
namespace shift_cpu {
namespace avx2 {
#define ASL_SIMD 1
#include "active_shift_simd.h"
#undef ASL_SIMD
}  // namespace avx2
}  // namespace shift_cpu
}  // namespace asl
#pragma GCC pop_options
#endif

namespace asl {
namespace shift_cpu {
namespace scalar {
#define ASL_SIMD 0
#include "active_shift_simd.h"
#undef ASL_SIMD
}  // namespace scalar

namespace {

enum class Simd { scalar = 0, avx2 = 1, avx512 = 2 };

Simd detect_simd() {
  Simd best = Simd::scalar;
#ifdef ASL_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Simd::avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq"))
    best = Simd::avx512;
#endif
  const char* want = std::getenv("ASL_CPU_SIMD");
  if (want != nullptr) {
    const std::string w(want);
    const Simd asked = w == "avx512" ? Simd::avx512 : w == "avx2" ? Simd::avx2 : Simd::scalar;
    if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;  // never more than the CPU has
  }
  return best;
}

Simd simd() {
  static const Simd s = detect_simd();
  return s;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// dst[j * ld + i] = src[i * ls + j] for an 8 x 8 block of floats, in AVX registers.
__attribute__((target("avx"))) inline void transpose8x8_avx(const float* src, int64_t ls, float* dst, int64_t ld) {
  // Rows k and k + 4 share a register (low and high 128-bit halves), so the shuffles below
  // never cross halves.
  __m256 r[8], t[8];
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(src + k * ls)), _mm_loadu_ps(src + (k + 4) * ls), 1);
    r[k + 4] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(src + k * ls + 4)), _mm_loadu_ps(src + (k + 4) * ls + 4), 1);
  }
  for (int h = 0; h < 8; h += 4) {
    t[h] = _mm256_unpacklo_ps(r[h], r[h + 1]);
    t[h + 1] = _mm256_unpackhi_ps(r[h], r[h + 1]);
    t[h + 2] = _mm256_unpacklo_ps(r[h + 2], r[h + 3]);
    t[h + 3] = _mm256_unpackhi_ps(r[h + 2], r[h + 3]);
    _mm256_storeu_ps(dst + (h + 0) * ld, _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0)));
    _mm256_storeu_ps(dst + (h + 1) * ld, _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2)));
    _mm256_storeu_ps(dst + (h + 2) * ld, _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0)));
    _mm256_storeu_ps(dst + (h + 3) * ld, _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2)));
  }
}
__attribute__((target("avx"))) void transpose_avx(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                                                  int64_t ldd) {
  for (int64_t i = 0; i < rows; i += 8)
    for (int64_t j = 0; j < cols; j += 8) transpose8x8_avx(src + i * lds + j, lds, dst + j * ldd + i, ldd);
}
#define ASL_TRANSPOSE_AVX 1
#endif

// dst[j * ldd + i] = src[i * lds + j] (rows x cols): one image from pixels x channels (channels_last) to
// channel planes, or back. Floats in 8 x 8 register blocks where the CPU has AVX and both sides
// are multiples of 8 (every layer of the zoo's CIFAR nets); otherwise in strips that stay in L1.
template <typename T>
void transpose(const T* __restrict src, int64_t rows, int64_t cols, int64_t lds, T* __restrict dst, int64_t ldd) {
#ifdef ASL_TRANSPOSE_AVX
  if constexpr (std::is_same_v<T, float>) {
    static const bool avx = __builtin_cpu_supports("avx");
    if (avx && rows % 8 == 0 && cols % 8 == 0) return transpose_avx(src, rows, cols, lds, dst, ldd);
  }
#endif
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const int64_t ie = std::min(rows, i0 + 16);
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = i0; i < ie; ++i) dst[j * ldd + i] = src[i * lds + j];
  }
}


// The distance between planes in a scratch buffer of P-element planes: P plus 16 elements, so that
// the rows of a transposed 8 x 8 block are not a multiple of 4 KiB apart (4 KiB aliasing).
inline int64_t plane_pitch(int64_t P) { return P + 16; }

// The call's channels as taps (a non-finite shift is sampled as 0 and its channel filled with NaN
// afterwards).
template <typename T>
std::vector<ChanTaps<T>> channel_taps(const at::Tensor& shift, const Geometry& g) {
  const auto shifts = channel_shifts<T>(shift, g.limit);
  std::vector<ChanTaps<T>> out(shifts.size());
  for (size_t c = 0; c < shifts.size(); ++c) {
    const auto& s = shifts[c];
    const T wr0 = T(1) - s.fr, wr1 = s.fr, wc0 = T(1) - s.fc, wc1 = s.fc;
    out[c] = {s.dr - g.ph, s.dc - g.pw, {wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1},
              static_cast<double>(s.fr), static_cast<double>(s.fc), s.finite};
  }
  return out;
}

template <typename T>
bool any_non_finite(const std::vector<ChanTaps<T>>& ch) {
  return std::any_of(ch.begin(), ch.end(), [](const ChanTaps<T>& c) { return !c.finite; });
}

// Fills channel c of an (N, C, H, W) tensor (either format) with NaN.
template <typename T>
void fill_channel_nan(T* p, const Geometry& g, int64_t H, int64_t W, int64_t c) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t e = 0; e < H * W; ++e) p[g.channels_last ? (n * H * W + e) * g.C + c : (n * g.C + c) * H * W + e] = nan;
}

// The kernels of one instruction set, behind one interface.
#define ASL_KERNELS(NS)                                                                                      \
  template <typename T>                                                                                      \
  struct Kernels_##NS {                                                                                      \
    using Plan = NS::PlanePlan<T>;                                                                           \
    using Stencil = NS::Stencil<T>;                                                                          \
    using Lists = std::vector<std::vector<NS::RowTap<T>>>;                                                   \
    static Plan plan(const PlaneMap& m, const T* w) { return Plan(m, w); }                                   \
    static Plan grad_plan(const PlaneMap& m, const T* w) { return NS::input_grad_plan<T>(m, w); }            \
    static Plan grad_plan_like(const Plan& like, const T* w) { return NS::input_grad_plan_like<T>(like, w); } \
    static void forward_plane(const T* x, T* y, const Plan& fw) { NS::forward_plane<T>(x, y, fw); }          \
    static void forward_planes(const T* x, T* y, int64_t P, int64_t Po, const std::vector<Plan>& fw, int64_t b,  \
                               int64_t e) {                                                                  \
      NS::forward_planes<T>(x, y, P, Po, fw, b, e);                                                          \
    }                                                                                                        \
    template <typename Fn>                                                                                   \
    static void backward_planes(const T* g, const T* x, T* gx, int64_t P, int64_t Po, const std::vector<Plan>& fw, \
                                const std::vector<Plan>& gr, int64_t b, int64_t e, bool want_shift, const Fn& f) { \
      NS::backward_planes<T>(g, x, gx, P, Po, fw, gr, b, e, want_shift, f);                                  \
    }                                                                                                        \
    static void input_grad_plane(const T* g, T* gx, const Plan& fw, const Plan& gr) {                        \
      NS::input_grad_plane<T>(g, gx, fw, gr);                                                                \
    }                                                                                                        \
    static void correlations_plane(const T* g, const T* x, const Plan& fw, double* corr) {                   \
      NS::correlations_plane<T>(g, x, fw, corr);                                                             \
    }                                                                                                        \
    static Stencil make_stencil(const std::vector<ChanTaps<T>>& ch, const Geometry& g) {                    \
      return NS::make_stencil<T>(ch, g.H, g.W, g.Ho, g.Wo, g.sh, g.sw);                                      \
    }                                                                                                        \
    static Lists forward_lists(const Stencil& st, const Geometry& g) { return NS::forward_lists<T>(st, g.W, g.C); } \
    static Lists input_grad_lists(const Stencil& st, const Geometry& g) {                                    \
      return NS::input_grad_lists<T>(st, g.Wo, g.C, g.sh, g.sw);                                             \
    }                                                                                                        \
    static void quad_forward_rows(const T* x, T* y, const Stencil& st, const Geometry& g, int64_t i0, int64_t i1, \
                                  const T* zeros, const T* ab = nullptr) {                                   \
      NS::quad_sample_rows<T>(x, y, st.fq, g.H, g.W, g.C, g.Wo, g.sh, g.sw, i0, i1, zeros, ab);              \
    }                                                                                                        \
    static void quad_correlate_rows(const T* go, const T* x, const Stencil& st, const Geometry& g, int64_t i0,  \
                                    int64_t i1, const T* zeros, double* corr, const T* ab = nullptr) {       \
      NS::quad_correlate_rows<T>(go, x, st.fq, g.H, g.W, g.C, g.Wo, g.sh, g.sw, i0, i1, zeros, corr, ab);    \
    }                                                                                                        \
    static void quad_input_grad_rows(const T* go, T* gx, const Stencil& st, const Geometry& g, int64_t r0,     \
                                     int64_t r1, const T* zeros, int64_t gx_row0 = 0) {                      \
      if (g.sh == 2) NS::quad_input_grad_s2_rows<T>(go, gx, st.fq, g.Ho, g.Wo, g.C, g.H, g.W, r0, r1, zeros, gx_row0); \
      else NS::quad_sample_rows<T>(go, gx, st.gq, g.Ho, g.Wo, g.C, g.W, 1, 1, r0, r1, zeros, nullptr, gx_row0); \
    }                                                                                                        \
    static void forward_rows(const T* x, T* y, const Stencil& st, const Lists& l, const Geometry& g, int64_t i0, \
                             int64_t i1) {                                                                   \
      NS::stencil_forward_rows<T>(x, y, st, l, g.H, g.W, g.C, g.Wo, g.sh, g.sw, i0, i1);                     \
    }                                                                                                        \
    static void input_grad_rows(const T* go, T* gx, const Stencil& st, const Lists& l, const Geometry& g,     \
                                int64_t r0, int64_t r1) {                                                    \
      NS::stencil_input_grad_rows<T>(go, gx, st, l, g.W, g.C, g.Ho, g.Wo, g.sh, g.sw, r0, r1);               \
    }                                                                                                        \
    using Box = NS::PadBox;                                                                                  \
    static Box forward_pad(const Stencil& st, const Geometry& g) {                                           \
      return NS::forward_pad<T>(st, g.H, g.W, g.Ho, g.Wo, g.sh, g.sw);                                        \
    }                                                                                                        \
    static Lists forward_lists_pitch(const Stencil& st, int64_t pitch, const Geometry& g) {                  \
      return NS::forward_lists<T>(st, pitch, g.C);                                                           \
    }                                                                                                        \
    static void forward_padded(const T* x, T* y, const Stencil& st, const Lists& l, const Box& b, const Geometry& g, \
                               T* buf, const T* ab = nullptr) {                                              \
      NS::stencil_forward_padded<T>(x, y, st, l, b, g.H, g.W, g.C, g.Ho, g.Wo, g.sh, g.sw, buf, ab);         \
    }                                                                                                        \
    static Box input_grad_pad(const Stencil& st, const Lists& l, const Geometry& g) {                        \
      return NS::input_grad_pad<T>(l, st.nv, g.H, g.W, g.Ho, g.Wo, g.sh, g.sw);                               \
    }                                                                                                        \
    static Lists input_grad_lists_pitch(const Stencil& st, int64_t pitch, const Geometry& g) {               \
      return NS::input_grad_lists<T>(st, pitch, g.C, g.sh, g.sw);                                            \
    }                                                                                                        \
    static void input_grad_padded(const T* go, T* gx, const Stencil& st, const Lists& l, const Box& b,        \
                                  const Geometry& g, T* buf) {                                               \
      NS::stencil_input_grad_padded<T>(go, gx, st, l, b, g.H, g.W, g.C, g.Ho, g.Wo, g.sh, g.sw, buf);         \
    }                                                                                                        \
    static void correlate_padded(const T* go, const T* x, const Stencil& st, const Lists& l, const Box& b,     \
                                 const Geometry& g, T* buf, double* corr) {                                  \
      NS::stencil_correlate_padded<T>(go, g.Wo, x, st, l, b, g.H, g.W, g.C, g.Ho, g.Wo, g.sh, g.sw, buf, corr); \
    }                                                                                                        \
    static void backward_padded(const T* go, const T* x, T* gx, const Stencil& st, const Lists& gl, const Box& gb,    \
                                const Lists& xl, const Box& xb, const Geometry& g, T* gbuf, T* xbuf, double* corr, \
                                const T* ab = nullptr) {                                                     \
      NS::stencil_backward_padded<T>(go, x, gx, st, gl, gb, xl, xb, g.H, g.W, g.C, g.Ho, g.Wo, g.sh, g.sw, gbuf, xbuf, \
                                     corr, ab);                                                              \
    }                                                                                                        \
    static void correlate_rows(const T* go, const T* x, const Stencil& st, const Lists& l, const Geometry& g,  \
                               int64_t i0, int64_t i1, double* corr) {                                       \
      NS::stencil_correlate_rows<T>(go, x, st, l, g.H, g.W, g.C, g.Wo, g.sh, g.sw, i0, i1, corr);            \
    }                                                                                                        \
  };

ASL_KERNELS(scalar)
#ifdef ASL_X86_SIMD
ASL_KERNELS(avx2)
ASL_KERNELS(avx512)
#endif
#undef ASL_KERNELS

// Runs fn.template operator()<Kernels>() with the kernels of the CPU's instruction set.
template <typename T, typename Fn>
auto with_kernels(const Fn& fn) {
#ifdef ASL_X86_SIMD
  switch (simd()) {
    case Simd::avx512:
      return fn(Kernels_avx512<T>{});
    case Simd::avx2:
      return fn(Kernels_avx2<T>{});
    default:
      break;
  }
#endif
  return fn(Kernels_scalar<T>{});
}

template <typename T>
PlaneMap make_map(const Geometry& g, const ChanTaps<T>& c) {
  return PlaneMap{g.H, g.W, g.Ho, g.Wo, g.sh, g.sw, c.offr, c.offc};
}

// Each channel's plan (forward, or input gradient with grad); channels with the same integer
// offsets share one lane table, so a call builds as many tables as it has distinct offsets.
template <typename K, typename T>
std::vector<typename K::Plan> channel_plans(const Geometry& g, const std::vector<ChanTaps<T>>& ch, bool grad) {
  std::vector<typename K::Plan> out(ch.size());
  std::map<std::pair<int64_t, int64_t>, size_t> first;
  for (size_t c = 0; c < ch.size(); ++c) {
    const auto [it, fresh] = first.try_emplace({ch[c].offr, ch[c].offc}, c);
    const auto& like = out[it->second];
    if (fresh) out[c] = grad ? K::grad_plan(make_map<T>(g, ch[c]), ch[c].w) : K::plan(make_map<T>(g, ch[c]), ch[c].w);
    else out[c] = grad ? K::grad_plan_like(like, ch[c].w) : like.with_weights(ch[c].w);
  }
  return out;
}

// The shift gradient from the sums of grad_output times each tap, C[2a + b]:
// d/d alpha = (1 - fr)(C01 - C00) + fr (C11 - C10), d/d beta = (1 - fc)(C10 - C00) + fc (C11 - C01).
template <typename T>
void shift_grad_from_correlations(const double* cc, const ChanTaps<T>& c, double* out2) {
  out2[0] += (1 - c.fr) * (cc[1] - cc[0]) + c.fr * (cc[3] - cc[2]);
  out2[1] += (1 - c.fc) * (cc[2] - cc[0]) + c.fc * (cc[3] - cc[1]);
}

// channels_last images use the stencil while no channel vector needs more taps than this.
constexpr int kStencilTaps = 16;

// channels_last images whose zero-bordered copy takes at most this many bytes go through it (it
// stays in a core's L2 cache while the stencil reads it); larger ones are done row by row with
// their side pixels apart.
constexpr int64_t kPaddedBytes = 256 * 1024;

template <typename T, typename Box>
int64_t padded_elems(const Box& b, int64_t rows, int64_t cols, int64_t C) {
  const int64_t n = (b.top + rows + b.bottom) * (b.left + cols + b.right) * C;
  return n * static_cast<int64_t>(sizeof(T)) <= kPaddedBytes ? n : -1;
}

// Calls fn(n, buf) for every image n in parallel, buf a scratch of elems elements per task that
// starts on a 64-byte boundary: with channels a multiple of a vector, no vector load from it then
// straddles two cache lines (malloc aligns to 16 bytes; aligned, the stencils of 128x16x32x32
// channels_last ran 12-15% faster).
template <typename T, typename Fn>
void for_each_image_with_scratch(int64_t N, int64_t elems, const Fn& fn) {
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<T> buf(static_cast<size_t>(elems) + 64 / sizeof(T));
    const uintptr_t at = reinterpret_cast<uintptr_t>(buf.data());
    T* p = buf.data() + (64 - at % 64) % 64 / sizeof(T);
    for (int64_t n = b; n < e; ++n) fn(n, p);
  });
}

// Rows per parallel unit of a channels_last image.
constexpr int64_t kRowBlock = 8;

int64_t row_blocks(int64_t rows) { return (rows + kRowBlock - 1) / kRowBlock; }

// Calls fn(u, n, i0, i1, last, buf) in parallel for every block of output rows [i0, i1) of every
// image n: unit u = n row_blocks(Ho) + the block's index, last when it is the image's last block,
// buf a scratch of elems elements per task.
template <typename T, typename Fn>
void for_each_row_block_with_scratch(int64_t N, int64_t Ho, int64_t elems, const Fn& fn) {
  const int64_t blocks = row_blocks(Ho);
  at::parallel_for(0, N * blocks, 1, [&](int64_t b, int64_t e) {
    std::vector<T> buf(static_cast<size_t>(elems));
    for (int64_t u = b; u < e; ++u) {
      const int64_t n = u / blocks, blk = u % blocks, i0 = blk * kRowBlock;
      fn(u, n, i0, std::min(Ho, i0 + kRowBlock), blk + 1 == blocks, buf.data());
    }
  });
}

// for_each_row_block_with_scratch without the scratch: fn(u, n, i0, i1, last).
template <typename Fn>
void for_each_row_block(int64_t N, int64_t Ho, const Fn& fn) {
  for_each_row_block_with_scratch<char>(N, Ho, 0, [&](int64_t u, int64_t n, int64_t i0, int64_t i1, bool last, char*) {
    fn(u, n, i0, i1, last);
  });
}

// The input rows [r0, r1) whose gradient the block of output rows [i0, i1) gives: from the
// block's first tap row, the image's last block to the end of the image.
std::pair<int64_t, int64_t> input_rows(const Geometry& g, int64_t i0, int64_t i1, bool last) {
  return {std::min(g.H, i0 * g.sh), last ? g.H : std::min(g.H, i1 * g.sh)};
}

// The sum over units of per-unit sums s[(u, k)], k < 2C, in unit order.
std::vector<double> sum_units(const std::vector<double>& s, int64_t C) {
  std::vector<double> total(static_cast<size_t>(2 * C), 0.0);
  for (size_t u = 0; u < s.size() / static_cast<size_t>(2 * C); ++u)
    for (int64_t k = 0; k < 2 * C; ++k) total[k] += s[u * 2 * C + k];
  return total;
}

at::Tensor active_shift_cpu(const at::Tensor& input_, const at::Tensor& shift, at::IntArrayRef stride,
                            at::IntArrayRef padding) {
  const Geometry g = prepare(input_, shift, stride, padding, "active_shift");
  check_cpu_dtype(input_, "active_shift");
  const at::Tensor input = input_.contiguous(g.format());
  const int64_t N = g.N, C = g.C, P = g.H * g.W, Po = g.Ho * g.Wo;
  at::Tensor out = at::empty({N, C, g.Ho, g.Wo}, input.options().memory_format(g.format()));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "active_shift_cpu", [&] {
    using T = scalar_t;
    const auto ch = channel_taps<T>(shift, g);
    const T* xp = input.const_data_ptr<T>();
    T* yp = out.data_ptr<T>();
    with_kernels<T>([&](auto k) {
      using K = decltype(k);
      const auto st = g.channels_last ? K::make_stencil(ch, g) : typename K::Stencil();
      if (g.channels_last && st.quad_ok && g.sw <= 2) {
        const std::vector<T> zeros(static_cast<size_t>(g.W * C), T(0));
        for_each_row_block(N, g.Ho, [&](int64_t, int64_t n, int64_t i0, int64_t i1, bool) {
          K::quad_forward_rows(xp + n * P * C, yp + n * Po * C, st, g, i0, i1, zeros.data());
        });
        return;
      }
      if (g.channels_last && st.most <= kStencilTaps) {
        const auto box = K::forward_pad(st, g);
        const int64_t elems = padded_elems<T>(box, g.H, g.W, C);
        if (elems > 0) {
          const auto lists = K::forward_lists_pitch(st, box.left + g.W + box.right, g);
          for_each_image_with_scratch<T>(N, elems, [&](int64_t n, T* buf) {
            K::forward_padded(xp + n * P * C, yp + n * Po * C, st, lists, box, g, buf);
          });
          return;
        }
        const auto lists = K::forward_lists(st, g);
        for_each_row_block(N, g.Ho, [&](int64_t, int64_t n, int64_t i0, int64_t i1, bool) {
          K::forward_rows(xp + n * P * C, yp + n * Po * C, st, lists, g, i0, i1);
        });
        return;
      }
      const auto fw = channel_plans<K>(g, ch, false);
      if (!g.channels_last) {
        const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Po));
        at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) { K::forward_planes(xp, yp, P, Po, fw, b, e); });
        return;
      }
      // channels_last with many distinct offsets: each image through planes
      at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
        std::vector<T> xs(static_cast<size_t>(C * plane_pitch(P))), ys(static_cast<size_t>(C * plane_pitch(Po)));
        for (int64_t n = b; n < e; ++n) {
          transpose<T>(xp + n * P * C, P, C, C, xs.data(), plane_pitch(P));
          for (int64_t c = 0; c < C; ++c) K::forward_plane(xs.data() + c * plane_pitch(P), ys.data() + c * plane_pitch(Po), fw[c]);
          transpose<T>(ys.data(), C, Po, plane_pitch(Po), yp + n * Po * C, C);
        }
      });
    });
    if (any_non_finite(ch))
      for (int64_t c = 0; c < C; ++c)
        if (!ch[c].finite) fill_channel_nan<T>(yp, g, g.Ho, g.Wo, c);
  });
  return out;
}

// Each image's shift gradient, partial[(n, c)] = (alpha, beta), from the stencil's correlations
// corr[(n, sum, tap, c)] (`sums` per image): each channel's four taps among the stencil's, summed
// over the image's sums (images outermost: the sums are read in memory order).
template <typename St, typename T>
void stencil_shift_grad(const St& st, const std::vector<ChanTaps<T>>& ch, const std::vector<double>& corr, int64_t N,
                        int64_t sums, int64_t C, std::vector<double>& partial) {
  const int64_t T_ = static_cast<int64_t>(st.taps.size());
  std::vector<int64_t> idx(static_cast<size_t>(4 * C));
  for (int64_t c = 0; c < C; ++c)
    for (int t4 = 0; t4 < 4; ++t4) idx[4 * c + t4] = st.tap_index(ch[c].offr + (t4 >> 1), ch[c].offc + (t4 & 1));
  for (int64_t n = 0; n < N; ++n) {
    const double* cn = corr.data() + n * sums * T_ * C;
    for (int64_t c = 0; c < C; ++c) {
      double cc[4] = {0, 0, 0, 0};
      for (int64_t blk = 0; blk < sums; ++blk)
        for (int t4 = 0; t4 < 4; ++t4)
          if (idx[4 * c + t4] >= 0) cc[t4] += cn[(blk * T_ + idx[4 * c + t4]) * C + c];
      shift_grad_from_correlations(cc, ch[c], &partial[2 * (n * C + c)]);
    }
  }
}

// Each image's shift gradient, as stencil_shift_grad, from the blended rows' correlations
// corr[(n, block, tap, c)] (`blocks` per image, each channel's own four taps).
template <typename T>
void quad_shift_grad(const std::vector<ChanTaps<T>>& ch, const std::vector<double>& corr, int64_t N, int64_t blocks,
                     int64_t C, std::vector<double>& partial) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      double cc[4] = {0, 0, 0, 0};
      for (int64_t blk = 0; blk < blocks; ++blk)
        for (int t = 0; t < 4; ++t) cc[t] += corr[((n * blocks + blk) * 4 + t) * C + c];
      shift_grad_from_correlations(cc, ch[c], &partial[2 * (n * C + c)]);
    }
}

// The shift gradient (C, 2) in shift's dtype from each image's (n, c) -> (alpha, beta), summed over
// the images in order.
at::Tensor shift_grad_total(const std::vector<double>& partial, int64_t C, const at::Tensor& shift) {
  const std::vector<double> total = sum_units(partial, C);
  return at::tensor(total, shift.options().dtype(at::kDouble)).view({C, 2}).to(shift.scalar_type());
}

// Both gradients, or one of them (the other comes back undefined). NCHW: each plane's input
// gradient and shift-gradient correlations while the plane is in cache; channels_last: the same
// per block of rows of an image. The shift gradient is summed per plane or block, then in a fixed
// order, so it does not depend on the number of threads.
std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_, const at::Tensor& input_,
                                                const at::Tensor& shift, at::IntArrayRef stride,
                                                at::IntArrayRef padding, bool want_input, bool want_shift,
                                                const char* op) {
  const Geometry g = prepare(input_, shift, stride, padding, op, &grad_);
  check_cpu_dtype(input_, op);
  const at::Tensor input = input_.contiguous(g.format());
  const at::Tensor grad = grad_.to(input.scalar_type()).contiguous(g.format());
  const int64_t N = g.N, C = g.C, P = g.H * g.W, Po = g.Ho * g.Wo;
  at::Tensor gx;
  if (want_input) gx = at::empty(input.sizes(), input.options().memory_format(g.format()));
  std::vector<double> partial(want_shift ? static_cast<size_t>(N * C * 2) : 0, 0.0);  // (n, c) -> (alpha, beta)
  if (grad.numel() > 0 && input.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "active_shift_backward_cpu", [&] {
      using T = scalar_t;
      const auto ch = channel_taps<T>(shift, g);
      const T* gp = grad.const_data_ptr<T>();
      const T* xp = input.const_data_ptr<T>();
      T* op_ = want_input ? gx.data_ptr<T>() : nullptr;
      with_kernels<T>([&](auto k) {
        using K = decltype(k);
        const auto st = g.channels_last ? K::make_stencil(ch, g) : typename K::Stencil();
        std::vector<typename K::Plan> fw, gr;
        if (!g.channels_last || st.most > kStencilTaps) {
          fw = channel_plans<K>(g, ch, false);
          if (want_input) gr = channel_plans<K>(g, ch, true);
        }
        if (!g.channels_last) {
          const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Po + P));
          at::parallel_for(0, N * C, grain, [&](int64_t b, int64_t e) {
            K::backward_planes(gp, xp, op_, P, Po, fw, gr, b, e, want_shift, [&](int64_t i, int64_t c, const double* corr) {
              shift_grad_from_correlations(corr, ch[c], &partial[2 * i]);
            });
          });
          return;
        }
        // the blended rows at stride 2 take spreads up to 2 (quad_input_grad_s2_rows)
        const bool quad_input =
            want_input && st.quad_ok && g.sh == g.sw && (g.sh == 1 || (g.sh == 2 && st.spread <= 2));
        const bool quad_shift = want_shift && st.quad_ok && g.sw == 1;
        // offsets spread over four values can use more taps than the stencil takes: the blended
        // rows alone, or planes
        if (st.most <= kStencilTaps || ((quad_input || !want_input) && (quad_shift || !want_shift))) {
          // shifts within a pixel or a pixel or so past one: each lane's own taps by blends, for the
          // input gradient at stride 1 (quad_row) and 2 (quad_input_grad_s2_rows) and the
          // correlations at column stride 1, both per block of output rows (the block's
          // grad_output read from cache the second time). At column stride 2 the correlations
          // stay on the stencil, which was faster there (128x32x32x32: 1.24 ms against 1.44
          // blended).
          if (quad_input || quad_shift) {
            const std::vector<T> zeros(static_cast<size_t>(std::max(g.W, g.Wo) * C), T(0));
            const int64_t blocks = row_blocks(g.Ho);
            std::vector<double> sums(quad_shift ? static_cast<size_t>(N * blocks * 4 * C) : 0, 0.0);  // (n, block, tap, c)
            for_each_row_block(N, g.Ho, [&](int64_t u, int64_t n, int64_t i0, int64_t i1, bool last) {
              if (quad_input) {
                const auto [r0, r1] = input_rows(g, i0, i1, last);
                K::quad_input_grad_rows(gp + n * Po * C, op_ + n * P * C, st, g, r0, r1, zeros.data());
              }
              if (quad_shift)
                K::quad_correlate_rows(gp + n * Po * C, xp + n * P * C, st, g, i0, i1, zeros.data(), &sums[u * 4 * C]);
            });
            if (quad_shift) quad_shift_grad(ch, sums, N, blocks, C, partial);
          }
          const bool stencil_input = want_input && !quad_input, stencil_shift = want_shift && !quad_shift;
          if (!stencil_input && !stencil_shift) return;
          const auto lists = stencil_input ? K::input_grad_lists(st, g) : typename K::Lists();
          const int64_t blocks = row_blocks(g.Ho), T_ = static_cast<int64_t>(st.taps.size());
          // the correlations' sums: per image through the padded copies, per block of rows otherwise
          int64_t sums = 1;  // sums per image
          std::vector<double> corr;
          const auto sums_per_image = [&](int64_t k) {
            sums = k;
            corr.assign(static_cast<size_t>(N * sums * T_ * C), 0.0);
          };
          bool rows_input = stencil_input, rows_shift = stencil_shift;
          if (stencil_input && stencil_shift) {
            // both through padded copies, grad_output read once for both: each image's
            // correlations into its sums
            const auto gb = K::input_grad_pad(st, lists, g), xb = K::forward_pad(st, g);
            const int64_t ge = padded_elems<T>(gb, g.Ho, g.Wo, C), xe = padded_elems<T>(xb, g.H, g.W, C);
            if (ge > 0 && xe > 0 && (ge + xe) * static_cast<int64_t>(sizeof(T)) <= kPaddedBytes) {
              const auto gl = K::input_grad_lists_pitch(st, gb.left + g.Wo + gb.right, g);
              const auto xl = K::forward_lists_pitch(st, xb.left + g.W + xb.right, g);
              sums_per_image(1);
              for_each_image_with_scratch<T>(N, ge + xe, [&](int64_t n, T* buf) {
                K::backward_padded(gp + n * Po * C, xp + n * P * C, op_ + n * P * C, st, gl, gb, xl, xb, g, buf, buf + ge,
                                   &corr[n * T_ * C]);
              });
              rows_input = rows_shift = false;
            }
          }
          // Small images: the input gradient of each image through a padded copy of its grad_output.
          if (rows_input) {
            const auto box = K::input_grad_pad(st, lists, g);
            const int64_t elems = padded_elems<T>(box, g.Ho, g.Wo, C);
            if (elems > 0) {
              const auto plists = K::input_grad_lists_pitch(st, box.left + g.Wo + box.right, g);
              for_each_image_with_scratch<T>(N, elems, [&](int64_t n, T* buf) {
                K::input_grad_padded(gp + n * Po * C, op_ + n * P * C, st, plists, box, g, buf);
              });
              rows_input = false;
            }
          }
          // Small images: each image's correlations through a padded copy of its input.
          if (rows_shift) {
            const auto box = K::forward_pad(st, g);
            const int64_t elems = padded_elems<T>(box, g.H, g.W, C);
            if (elems > 0) {
              const auto plists = K::forward_lists_pitch(st, box.left + g.W + box.right, g);
              sums_per_image(1);
              for_each_image_with_scratch<T>(N, elems, [&](int64_t n, T* buf) {
                K::correlate_padded(gp + n * Po * C, xp + n * P * C, st, plists, box, g, buf, &corr[n * T_ * C]);
              });
              rows_shift = false;
            }
          }
          // Blocks of output rows [i0, i1) of larger images: their correlations and the
          // input-gradient rows [i0 * sh, i1 * sh) (the last block to the end of the image).
          const auto flists = rows_shift ? K::forward_lists(st, g) : typename K::Lists();
          if (rows_shift) sums_per_image(blocks);
          for_each_row_block(N, g.Ho, [&](int64_t u, int64_t n, int64_t i0, int64_t i1, bool last) {
            if (rows_input) {
              const auto [r0, r1] = input_rows(g, i0, i1, last);
              K::input_grad_rows(gp + n * Po * C, op_ + n * P * C, st, lists, g, r0, r1);
            }
            if (rows_shift) K::correlate_rows(gp + n * Po * C, xp + n * P * C, st, flists, g, i0, i1, &corr[u * T_ * C]);
          });
          if (stencil_shift) stencil_shift_grad(st, ch, corr, N, sums, C, partial);
          return;
        }
        // many distinct offsets: each image through planes
        at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
          std::vector<T> gs_(static_cast<size_t>(C * plane_pitch(Po))), xs(want_shift ? static_cast<size_t>(C * plane_pitch(P)) : 0),
              gxs(want_input ? static_cast<size_t>(C * plane_pitch(P)) : 0);
          for (int64_t n = b; n < e; ++n) {
            transpose<T>(gp + n * Po * C, Po, C, C, gs_.data(), plane_pitch(Po));
            if (want_shift) transpose<T>(xp + n * P * C, P, C, C, xs.data(), plane_pitch(P));
            for (int64_t c = 0; c < C; ++c) {
              const T* gc = gs_.data() + c * plane_pitch(Po);
              if (want_input) K::input_grad_plane(gc, gxs.data() + c * plane_pitch(P), fw[c], gr[c]);
              if (want_shift) {
                double corr[4];
                K::correlations_plane(gc, xs.data() + c * plane_pitch(P), fw[c], corr);
                shift_grad_from_correlations(corr, ch[c], &partial[2 * (n * C + c)]);
              }
            }
            if (want_input) transpose<T>(gxs.data(), C, P, plane_pitch(P), op_ + n * P * C, C);
          }
        });
      });
      for (int64_t c = 0; c < C; ++c) {
        if (ch[c].finite) continue;
        if (want_input) fill_channel_nan<T>(op_, g, g.H, g.W, c);
        if (want_shift)
          for (int64_t n = 0; n < N; ++n) partial[2 * (n * C + c)] = partial[2 * (n * C + c) + 1] = std::numeric_limits<double>::quiet_NaN();
      }
    });
  } else if (want_input) {
    gx.zero_();
  }
  return {gx, want_shift ? shift_grad_total(partial, C, shift) : at::Tensor()};
}

at::Tensor active_shift_grad_input_cpu(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& shift,
                                       at::IntArrayRef stride, at::IntArrayRef padding) {
  return std::get<0>(backward_cpu(grad, input, shift, stride, padding, true, false, "active_shift_grad_input"));
}

at::Tensor active_shift_grad_shift_cpu(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& shift,
                                       at::IntArrayRef stride, at::IntArrayRef padding) {
  return std::get<1>(backward_cpu(grad, input, shift, stride, padding, false, true, "active_shift_grad_shift"));
}

std::tuple<at::Tensor, at::Tensor> active_shift_backward_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                             const at::Tensor& shift, at::IntArrayRef stride,
                                                             at::IntArrayRef padding) {
  return backward_cpu(grad, input, shift, stride, padding, true, true, "active_shift_backward");
}


// ---------------------------------------------------------------------------------------------
// Training: active_shift(relu(batch_norm(input))), a block's BatchNorm-ReLU and its shift, in one
// operator. channels_last with shifts within a pixel or a pixel or so past one (at most four
// integer offsets per axis in each channel vector, three for the backward at stride 2) at stride 1
// or 2 (both axes alike): the
// forward applies the BatchNorm and its ReLU to each pixel as it reads it (BnRelu in quad_row), so
// relu(batch_norm(input)) is neither written nor read back; the backward recomputes it the same
// way for the correlations, and sums the BatchNorm backward's per-channel sums over the shift's
// input gradient while its rows are in cache, so of the BatchNorm backward only the pass that
// writes grad_input is left. Elsewhere the two operators run in turn (the backward recomputing
// relu(batch_norm(input)) first).
// ---------------------------------------------------------------------------------------------

// How the fused kernels take a call: blended rows (shifts within a pixel or a pixel or so past one;
// the backward at equal strides of 1 or 2), through the padded copies (stencils of cache-sized
// images, the padded copy of the input transformed as it is made), or not at all (the two
// operators in turn).
enum class Fused { none, quad, padded };

template <typename K, typename T>
Fused fused_bn_shift_path(const Geometry& g, const typename K::Stencil& st, const std::vector<ChanTaps<T>>& ch,
                          bool backward) {
  if (!g.channels_last || g.N == 0 || g.H == 0 || g.W == 0 || any_non_finite(ch)) return Fused::none;
  if (st.quad_ok && (backward ? g.sh == g.sw && (g.sh == 1 || (g.sh == 2 && st.spread <= 2)) : g.sw <= 2))
    return Fused::quad;
  if (st.most > kStencilTaps) return Fused::none;
  const int64_t xe = padded_elems<T>(K::forward_pad(st, g), g.H, g.W, g.C);
  if (xe <= 0) return Fused::none;
  if (!backward) return Fused::padded;
  const auto gb = K::input_grad_pad(st, K::input_grad_lists(st, g), g);
  const int64_t ge = padded_elems<T>(gb, g.Ho, g.Wo, g.C);
  return ge > 0 && (ge + xe) * static_cast<int64_t>(sizeof(T)) <= kPaddedBytes ? Fused::padded : Fused::none;
}

// Calls fn(k, st, ch, path) with the kernels of the CPU's instruction set (k, as with_kernels),
// the call's channels as taps (ch), their stencil in channels_last (st) and the fused kernels'
// path for it.
template <typename T, typename Fn>
void with_fused_path(const at::Tensor& shift, const Geometry& g, bool backward, const Fn& fn) {
  const auto ch = channel_taps<T>(shift, g);
  with_kernels<T>([&](auto k) {
    using K = decltype(k);
    const auto st = g.channels_last ? K::make_stencil(ch, g) : typename K::Stencil();
    fn(k, st, ch, fused_bn_shift_path<K, T>(g, st, ch, backward));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_shift_cpu(const at::Tensor& input_, const at::Tensor& weight,
                                                                         const at::Tensor& bias, double eps,
                                                                         const at::Tensor& shift, at::IntArrayRef stride,
                                                                         at::IntArrayRef padding) {
  const char* op = "batch_norm_relu_shift";
  bn::check_training(input_, weight, bias, op);
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  const Geometry g = prepare(input_, shift, stride, padding, op);
  const at::Tensor input = input_.contiguous(g.format());
  auto [mean, invstd] = bn::batch_stats(input, eps);
  const at::Tensor ab = bn::affine(weight, bias, mean, invstd);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_relu_shift_cpu", [&] {
    using T = scalar_t;
    with_fused_path<T>(shift, g, false, [&](auto k, const auto& st, const auto&, Fused path) {
      using K = decltype(k);
      if (path == Fused::none) return;
      const int64_t C = g.C, P = g.H * g.W, Po = g.Ho * g.Wo;
      out = at::empty({g.N, C, g.Ho, g.Wo}, input.options().memory_format(g.format()));
      const T* xp = input.const_data_ptr<T>();
      T* yp = out.data_ptr<T>();
      const T* abp = ab.const_data_ptr<T>();
      if (path == Fused::quad) {
        const std::vector<T> zeros(static_cast<size_t>(g.W * C), T(0));
        for_each_row_block(g.N, g.Ho, [&](int64_t, int64_t n, int64_t i0, int64_t i1, bool) {
          K::quad_forward_rows(xp + n * P * C, yp + n * Po * C, st, g, i0, i1, zeros.data(), abp);
        });
        return;
      }
      const auto box = K::forward_pad(st, g);
      const auto lists = K::forward_lists_pitch(st, box.left + g.W + box.right, g);
      for_each_image_with_scratch<T>(g.N, padded_elems<T>(box, g.H, g.W, C), [&](int64_t n, T* buf) {
        K::forward_padded(xp + n * P * C, yp + n * Po * C, st, lists, box, g, buf, abp);
      });
    });
  });
  if (!out.defined()) out = active_shift_cpu(bn::relu_affine(input, ab), shift, stride, padding);
  return {out, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_shift_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& input_, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& shift, at::IntArrayRef stride,
    at::IntArrayRef padding, bool want_shift) {
  const char* op = "batch_norm_relu_shift_backward";
  bn::check_training(input_, weight, bias, op);
  bn::check_stats(input_, mean, invstd, op);
  const Geometry g = prepare(input_, shift, stride, padding, op, &grad_);
  const at::Tensor input = input_.contiguous(g.format());
  const at::Tensor grad = grad_.to(input.scalar_type()).contiguous(g.format());
  const at::Tensor ab = bn::affine(weight, bias, mean, invstd);
  at::Tensor gx, gw, gb, gs;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "batch_norm_relu_shift_backward_cpu", [&] {
    using T = scalar_t;
    with_fused_path<T>(shift, g, true, [&](auto k, const auto& st, const auto& ch, Fused path) {
      using K = decltype(k);
      if (path == Fused::none) return;
      const int64_t N = g.N, C = g.C, P = g.H * g.W, Po = g.Ho * g.Wo;
      const T* gp = grad.const_data_ptr<T>();
      const T* xp = input.const_data_ptr<T>();
      const T* abp = ab.const_data_ptr<T>();
      const at::Tensor mean_c = mean.contiguous();
      const T* mp = mean_c.const_data_ptr<T>();
      std::vector<double> partial(static_cast<size_t>(N * C * 2), 0.0), bsum;  // bsum: per unit, the BatchNorm sums (2, c)
      if (path == Fused::quad) {
        // Per block of output rows, the correlations (tap, c), then the shift's input gradient
        // for the block's input rows and, while they are in cache, their BatchNorm sums. At stride
        // 1 those rows are written out and the BatchNorm's last pass reads them back; at stride 2,
        // where they are four times grad_output's size, they go to a scratch in cache and the last
        // pass computes them again from grad_output (in asnet20_16x1's training step that was
        // faster at stride 2 and no faster at stride 1).
        const bool recompute = g.sh == 2;
        const int64_t blocks = row_blocks(g.Ho);
        const std::vector<T> zeros(static_cast<size_t>(std::max(g.W, g.Wo) * C), T(0));
        std::vector<double> corr(want_shift ? static_cast<size_t>(N * blocks * 4 * C) : 0, 0.0);
        bsum.assign(static_cast<size_t>(N * blocks * 2 * C), 0.0);
        const int64_t most_rows = std::min(g.H, kRowBlock * g.sh + g.H - std::min(g.H, (g.Ho - 1) * g.sh));
        const int64_t scratch = recompute ? most_rows * g.W * C : 0;
        at::Tensor ga;  // the shift's input gradient, when written out
        if (!recompute) ga = at::empty(input.sizes(), input.options().memory_format(g.format()));
        T* gap = recompute ? nullptr : ga.data_ptr<T>();
        for_each_row_block_with_scratch<T>(N, g.Ho, scratch, [&](int64_t u, int64_t n, int64_t i0, int64_t i1, bool last, T* buf) {
          if (want_shift)
            K::quad_correlate_rows(gp + n * Po * C, xp + n * P * C, st, g, i0, i1, zeros.data(), &corr[u * 4 * C], abp);
          const auto [r0, r1] = input_rows(g, i0, i1, last);
          T* rows = recompute ? buf : gap + (n * P + r0 * g.W) * C;  // input row r0 on
          K::quad_input_grad_rows(gp + n * Po * C, rows, st, g, r0, r1, zeros.data(), r0);
          bn::grad_sums(rows, xp + (n * P + r0 * g.W) * C, (r1 - r0) * g.W, C, abp, mp, &bsum[u * 2 * C]);
        });
        if (want_shift) quad_shift_grad(ch, corr, N, blocks, C, partial);
        if (!recompute) {
          std::tie(gx, gw, gb) =
              bn::input_grad_from_sums(ga, input, weight, bias, mean, invstd, sum_units(bsum, C), {}, true);
        } else {
          at::Tensor kqr;
          std::tie(kqr, gw, gb) = bn::grad_coefficients(input, weight, mean, invstd, sum_units(bsum, C));
          gx = at::empty(input.sizes(), input.options().memory_format(g.format()));
          T* gxp = gx.data_ptr<T>();
          const T* kp = kqr.const_data_ptr<T>();
          for_each_row_block_with_scratch<T>(N, g.Ho, scratch, [&](int64_t, int64_t n, int64_t i0, int64_t i1, bool last, T* buf) {
            const auto [r0, r1] = input_rows(g, i0, i1, last);
            K::quad_input_grad_rows(gp + n * Po * C, buf, st, g, r0, r1, zeros.data(), r0);
            bn::input_grad_rows(buf, xp + (n * P + r0 * g.W) * C, gxp + (n * P + r0 * g.W) * C, (r1 - r0) * g.W, C, abp, mp,
                                kp);
          });
        }
      } else {
        // per image through the padded copies (the input's transformed), then its BatchNorm sums
        const at::Tensor ga = at::empty(input.sizes(), input.options().memory_format(g.format()));  // grad of the shift's input
        T* gap = ga.data_ptr<T>();
        const auto lists = K::input_grad_lists(st, g);
        const auto gbox = K::input_grad_pad(st, lists, g), xbox = K::forward_pad(st, g);
        const int64_t ge = padded_elems<T>(gbox, g.Ho, g.Wo, C), xe = padded_elems<T>(xbox, g.H, g.W, C);
        const auto gl = K::input_grad_lists_pitch(st, gbox.left + g.Wo + gbox.right, g);
        const auto xl = want_shift ? K::forward_lists_pitch(st, xbox.left + g.W + xbox.right, g) : typename K::Lists();
        const int64_t T_ = static_cast<int64_t>(st.taps.size());
        std::vector<double> corr(want_shift ? static_cast<size_t>(N * T_ * C) : 0, 0.0);
        bsum.assign(static_cast<size_t>(N * 2 * C), 0.0);
        for_each_image_with_scratch<T>(N, want_shift ? ge + xe : ge, [&](int64_t n, T* buf) {
          if (want_shift)
            K::backward_padded(gp + n * Po * C, xp + n * P * C, gap + n * P * C, st, gl, gbox, xl, xbox, g, buf, buf + ge,
                               &corr[n * T_ * C], abp);
          else  // the shift's input gradient needs grad_output alone
            K::input_grad_padded(gp + n * Po * C, gap + n * P * C, st, gl, gbox, g, buf);
          bn::grad_sums(gap + n * P * C, xp + n * P * C, P, C, abp, mp, &bsum[n * 2 * C]);
        });
        if (want_shift) stencil_shift_grad(st, ch, corr, N, 1, C, partial);
        std::tie(gx, gw, gb) =
            bn::input_grad_from_sums(ga, input, weight, bias, mean, invstd, sum_units(bsum, C), {}, true);
      }
      if (want_shift) gs = shift_grad_total(partial, C, shift);
    });
  });
  if (!gx.defined()) {
    auto [gi, gsh] = backward_cpu(grad, bn::relu_affine(input, ab), shift, stride, padding, true, want_shift, op);
    std::tie(gx, gw, gb) = bn::backward(gi, input, weight, bias, mean, invstd);
    gs = gsh;
  }
  return {gx, gw, gb, gs};
}

}  // namespace

TORCH_LIBRARY_IMPL(asl, CPU, m) {
  m.impl("active_shift", &active_shift_cpu);
  m.impl("active_shift_grad_input", &active_shift_grad_input_cpu);
  m.impl("active_shift_grad_shift", &active_shift_grad_shift_cpu);
  m.impl("active_shift_backward", &active_shift_backward_cpu);
  m.impl("batch_norm_relu_shift", &batch_norm_relu_shift_cpu);
  m.impl("batch_norm_relu_shift_backward", &batch_norm_relu_shift_backward_cpu);
}

}  // namespace shift_cpu
}  // namespace asl
