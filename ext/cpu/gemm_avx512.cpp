// The register-blocked AVX-512 product and the panel packing of gemm_avx512.h. Compiled for
// every x86-64 machine (the AVX-512 code is chosen at run time); elsewhere the stubs are never
// called, because use_gemm_avx512() is false.
#include "gemm_avx512.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>

namespace asl {

#if defined(__x86_64__) && defined(__GNUC__)
// A register-blocked single-precision product for AVX-512 machines, used on 32-pixel panels by
// conv1x1 and shift_conv1x1 (and by the latter's tile path on its cache-resident tiles):
//   o[co * ldo + p] = epilogue((addend ? addend[co * lda + p] : 0) + sum_k w[k * ldw + co] * t[k * ldt + p])
// with the weight transposed (K x Co), so that the MR weights of one step are adjacent. MR output
// channels times NV 16-pixel vectors are held in registers; each step of k loads NV vectors of t
// and broadcasts MR weights.
constexpr int kGemmMR = 12;

// One step of k: acc[i][v] += w[i] * t[16 v .. 16 v + 15] (masked lanes read as zero).
template <int MR, int NV>
__attribute__((target("avx512f"), always_inline)) inline void gemm_step(__m512 (&acc)[MR][NV], const float* __restrict w,
                                                                        const float* __restrict t, __mmask16 m0,
                                                                        __mmask16 m1) {
  const __m512 b0 = _mm512_maskz_loadu_ps(m0, t);
  const __m512 b1 = NV == 2 ? _mm512_maskz_loadu_ps(m1, t + 16) : b0;
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    const __m512 a = _mm512_set1_ps(w[i]);
    acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
    if constexpr (NV == 2) acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
  }
}

template <int MR, int NV>
__attribute__((target("avx512f"))) void gemm_micro_avx512(const GemmPanel& g, const float* __restrict w, float* o,
                                                         const float* __restrict bias, const float* add) {
  const __mmask16 m0 = g.m0, m1 = g.m1;
  const float* __restrict t = g.t;
  const int64_t ldw = g.ldw, ldt = g.ldt, ldo = g.ldo, lda = g.lda;
  __m512 acc[MR][NV];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = add != nullptr ? _mm512_maskz_loadu_ps(m0, add + i * lda) : _mm512_setzero_ps();
    if constexpr (NV == 2) acc[i][1] = add != nullptr ? _mm512_maskz_loadu_ps(m1, add + i * lda + 16) : _mm512_setzero_ps();
  }
  // the prefetching loop apart, so that the common one carries nothing but the product
  const int64_t K = g.K, ldp = g.ldp;
  if (const float* pf = g.prefetch; pf != nullptr) {
    for (int64_t k = 0; k < K; ++k, w += ldw) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * ldp), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + k * ldp + 16), _MM_HINT_T0);
      gemm_step<MR, NV>(acc, w, t + k * ldt, m0, m1);
    }
  } else {
    for (int64_t k = 0; k < K; ++k, w += ldw) gemm_step<MR, NV>(acc, w, t + k * ldt, m0, m1);
  }
  if (bias != nullptr || g.relu) {
    const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 b = bias != nullptr ? _mm512_set1_ps(bias[i]) : zero;
      for (int v = 0; v < NV; ++v) {
        acc[i][v] = _mm512_add_ps(acc[i][v], b);
        if (g.relu) acc[i][v] = _mm512_max_ps(acc[i][v], zero);
      }
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(o + i * ldo, m0, acc[i][0]);
    if constexpr (NV == 2) _mm512_mask_storeu_ps(o + i * ldo + 16, m1, acc[i][1]);
  }
}

// The micro-kernel for `rows` (1..kGemmMR) output channels: a compile-time count for each.
template <int NV, int MR = kGemmMR>
void gemm_rows_avx512(int rows, const GemmPanel& g, const float* w, float* o, const float* bias, const float* add) {
  if constexpr (MR > 0) {
    if (rows == MR) return gemm_micro_avx512<MR, NV>(g, w, o, bias, add);
    gemm_rows_avx512<NV, MR - 1>(rows, g, w, o, bias, add);
  }
}

inline __attribute__((always_inline)) __mmask16 lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
}

// The first n (<= 32) lanes of a 32-pixel panel, as the bits of both 16-lane masks.
inline uint32_t lanes32(int64_t n) { return n >= 32 ? ~0u : (1u << n) - 1u; }

void gemm_panel_avx512(GemmPanel g, int64_t Co, int64_t n) {
  g.m0 = lanes(n);
  g.m1 = lanes(std::max<int64_t>(0, n - 16));
  for (int64_t co = 0; co < Co; co += kGemmMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kGemmMR, Co - co));
    const float* b = g.bias != nullptr ? g.bias + co : nullptr;
    const float* a = g.addend != nullptr ? g.addend + co * g.lda : nullptr;
    if (n > 16) gemm_rows_avx512<2>(rows, g, g.w + co, g.o + co * g.ldo, b, a);
    else gemm_rows_avx512<1>(rows, g, g.w + co, g.o + co * g.ldo, b, a);
    g.prefetch = nullptr;
  }
}

void gemm_avx512(float* o, int64_t ldo, const float* w, int64_t ldw, const float* t, int64_t ldt, int64_t Co,
                 int64_t K, int64_t P, bool accumulate) {
  for (int64_t j = 0; j < P; j += 32) {
    const GemmPanel g{w, ldw, t + j, ldt, o + j, ldo, K, 0, 0, accumulate ? o + j : nullptr, ldo, nullptr, false, nullptr, 0};
    gemm_panel_avx512(g, Co, std::min<int64_t>(32, P - j));
  }
}

__attribute__((target("avx512f"))) void pack_panel_avx512(float* __restrict panel, const float* __restrict x, int64_t ldx,
                                                         int64_t K, int64_t n, const float* scale, const float* bias) {
  const __mmask16 m0 = lanes(n), m1 = lanes(std::max<int64_t>(0, n - 16));
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 a = _mm512_maskz_loadu_ps(m0, x + k * ldx), b = _mm512_maskz_loadu_ps(m1, x + k * ldx + 16);
    if (scale != nullptr) {
      const __m512 s = _mm512_set1_ps(scale[k]), c = _mm512_set1_ps(bias[k]);
      a = _mm512_maskz_max_ps(m0, _mm512_fmadd_ps(a, s, c), zero);
      b = _mm512_maskz_max_ps(m1, _mm512_fmadd_ps(b, s, c), zero);
    }
    _mm512_store_ps(panel + k * 32, a);
    _mm512_store_ps(panel + k * 32 + 16, b);
  }
}

// Bit i of out[e - lo] (e in [lo, hi]): whether idx[i] + e lies in [0, len), for the lanes in valid.
__attribute__((target("avx512f"))) void lane_table(uint32_t* out, const int32_t* idx, int64_t lo, int64_t hi,
                                                  int64_t len, uint32_t valid) {
  const __m512i v0 = _mm512_load_si512(idx), v1 = _mm512_load_si512(idx + 16);
  const __m512i bound = _mm512_set1_epi32(static_cast<int32_t>(len));
  for (int64_t e = lo; e <= hi; ++e) {  // unsigned: idx + e < 0 fails as well as idx + e >= len
    const __m512i ev = _mm512_set1_epi32(static_cast<int32_t>(e));
    const uint32_t m = _mm512_cmplt_epu32_mask(_mm512_add_epi32(v0, ev), bound) |
                       (static_cast<uint32_t>(_mm512_cmplt_epu32_mask(_mm512_add_epi32(v1, ev), bound)) << 16);
    out[e - lo] = m & valid;
  }
}

void panel_masks(uint32_t* rows, int64_t rlo, int64_t rhi, uint32_t* cols, int64_t clo, int64_t chi, int64_t j,
                 int64_t n, int64_t H, int64_t W) {
  alignas(64) int32_t r[32], q[32];
  for (int64_t i = 0, rr = j / W, qq = j % W; i < 32; ++i) {
    r[i] = static_cast<int32_t>(rr);
    q[i] = static_cast<int32_t>(qq);
    if (++qq == W) qq = 0, ++rr;
  }
  const uint32_t valid = lanes32(n);
  lane_table(rows, r, rlo, rhi, H, valid);
  lane_table(cols, q, clo, chi, W, valid);
}

__attribute__((target("avx512f"))) void shift_pack_panel_avx512(float* __restrict panel, const float* x, int64_t HW,
                                                               int64_t W, int64_t j, int64_t n,
                                                               const PanelShift* ch, int64_t C,
                                                               const uint32_t* rows, const uint32_t* cols) {
  const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  const uint32_t valid = lanes32(n);
  for (int64_t c = 0; c < C; ++c) {
    const PanelShift& s = ch[c];
    float* dst = panel + c * 32;
    if (!s.finite) {
      _mm512_store_ps(dst, _mm512_maskz_mov_ps(static_cast<__mmask16>(valid), nan));
      _mm512_store_ps(dst + 16, _mm512_maskz_mov_ps(static_cast<__mmask16>(valid >> 16), nan));
      continue;
    }
    const uint32_t ra = rows[s.r0], rb = rows[s.r1], ca = cols[s.c0], cb = cols[s.c1];
    const uint32_t m00 = ra & ca, m01 = ra & cb, m10 = rb & ca, m11 = rb & cb;
    // the address of pixel j's top-left tap (outside the plane when its masks are off: never read)
    const float* b = x + c * HW + (j + s.off);
    const __m512 w00 = _mm512_set1_ps(s.w00), w01 = _mm512_set1_ps(s.w01), w10 = _mm512_set1_ps(s.w10),
                 w11 = _mm512_set1_ps(s.w11);
#pragma GCC unroll 2
    for (int h = 0; h < 32; h += 16) {
      __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>(m00 >> h), b + h), w00);
      v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>(m01 >> h), b + h + 1), w01, v);
      v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>(m10 >> h), b + h + W), w10, v);
      v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>(m11 >> h), b + h + W + 1), w11, v);
      _mm512_store_ps(dst + h, v);
    }
  }
}

bool use_gemm_avx512() {
  static const bool use = [] {
    const char* env = std::getenv("ASL_CPU_GEMM");
    return __builtin_cpu_supports("avx512f") && !(env != nullptr && std::string(env) == "blas");
  }();
  return use;
}
#else
bool use_gemm_avx512() { return false; }
void gemm_avx512(float*, int64_t, const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, bool) {}
void gemm_panel_avx512(GemmPanel, int64_t, int64_t) {}
void pack_panel_avx512(float*, const float*, int64_t, int64_t, int64_t, const float*, const float*) {}
void panel_masks(uint32_t*, int64_t, int64_t, uint32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {}
void shift_pack_panel_avx512(float*, const float*, int64_t, int64_t, int64_t, int64_t, const PanelShift*, int64_t,
                             const uint32_t*, const uint32_t*) {}
#endif

}  // namespace asl
