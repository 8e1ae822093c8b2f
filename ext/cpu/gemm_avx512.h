// The CPU's matrix products for the 1x1 convolutions of the fused inference operators: a
// register-blocked AVX-512 kernel on 32-pixel panels (gemm_avx512.cpp), the BLAS torch links, and
// ATen's addmm where neither applies.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace asl {

// The BLAS that torch links (Fortran interface; weak, so a build without it still loads and uses
// addmm instead). Column-major: C(m x n) = A(m x k) B(k x n) + beta C.
extern "C" {
__attribute__((weak)) void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                                  const float*, const int*, const float*, const int*, const float*, float*, const int*);
__attribute__((weak)) void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
                                  const double*, const int*, const double*, const int*, const double*, double*,
                                  const int*);
}

// One panel's product for gemm_micro_avx512 (see below).
struct GemmPanel {
  const float* w;
  int64_t ldw;
  const float* t;
  int64_t ldt;
  float* o;
  int64_t ldo;
  int64_t K;
  uint16_t m0, m1;            // the panel's valid pixels in its two 16-lane halves (AVX-512 masks)
  const float* addend;        // rows (stride lda) the product is added to (nullable; may be o itself)
  int64_t lda;
  const float* bias;          // added per output channel before the store (nullable)
  bool relu;                  // then max(., 0)
  const float* prefetch;      // rows (stride ldp) to pull into cache while multiplying (nullable)
  int64_t ldp;
};

// The active shift of one channel for shift_pack_panel_avx512 (stride 1, output rows as long as
// input rows): output pixel p (flat index in its plane) blends input pixels p + off, p + off + 1,
// p + off + W and p + off + W + 1, each where its row and its column lie inside the input.
struct PanelShift {
  int64_t off;              // flat offset of the top-left tap
  int32_t r0, r1, c0, c1;   // the two tap rows' and two tap columns' entries in the panel's mask tables
  float w00, w01, w10, w11;
  bool finite;
};

#if defined(__x86_64__) && defined(__GNUC__)
#define ASL_AVX512 __attribute__((target("avx512f")))
#else
#define ASL_AVX512
#endif

// Whether gemm_avx512 serves float products: an AVX-512 CPU, unless ASL_CPU_GEMM=blas asks for
// the BLAS path (which every other machine takes).
bool use_gemm_avx512();

// o (+)= w * t over P pixels (t's rows of stride ldt): 32-pixel panels (the last one masked), each
// multiplied by every block of output channels while it sits in L1.
void gemm_avx512(float* o, int64_t ldo, const float* w, int64_t ldw, const float* t, int64_t ldt, int64_t Co,
                 int64_t K, int64_t P, bool accumulate);

// One panel of n <= 32 pixels times every block of output channels (Co in all). The first block
// pulls g.prefetch's rows (the next panel's input) into cache.
void gemm_panel_avx512(GemmPanel g, int64_t Co, int64_t n);

// Copies n (<= 32) pixels of K channel rows (x[k * ldx + i]) into a dense K x 32 panel, as
// relu(x * scale[k] + bias[k]) when scale is given; lanes past n are zero.
ASL_AVX512 void pack_panel_avx512(float* __restrict panel, const float* __restrict x, int64_t ldx, int64_t K,
                                  int64_t n, const float* scale, const float* bias);

// Per panel of n <= 32 output pixels from flat index j (output rows of W pixels): for each row offset
// e in [rlo, rhi], bit i of rows[e - rlo] says whether input row (j + i) / W + e is one of the H rows;
// likewise cols[] for columns (j + i) % W + e against W. Shared by every channel of the panel.
void panel_masks(uint32_t* rows, int64_t rlo, int64_t rhi, uint32_t* cols, int64_t clo, int64_t chi, int64_t j,
                 int64_t n, int64_t H, int64_t W);

// The shifted panel (C x 32, lanes past the panel's pixels zero) of every channel of one image x
// (planes of HW floats, rows of W), output pixels j.. of the panel: four masked loads per 16 pixels
// and channel; a channel with a non-finite shift gives NaN. Taps whose mask is off are never read.
ASL_AVX512 void shift_pack_panel_avx512(float* __restrict panel, const float* x, int64_t HW, int64_t W, int64_t j,
                                        int64_t n, const PanelShift* ch, int64_t C, const uint32_t* rows,
                                        const uint32_t* cols);

// Whether a product with this dtype runs on gemm_avx512 (which takes the weight transposed).
inline bool own_gemm(at::ScalarType t) { return t == at::kFloat && use_gemm_avx512(); }

// A 1x1 convolution's weight (C_out, C) or (C_out, C, 1, 1) as the dense transposed matrix
// (C x C_out) every product here takes: free when the caller passes a transposed view (as the
// inference form does), a copy otherwise.
inline at::Tensor gemm_weight(const at::Tensor& weight, int64_t Co, int64_t C) { return weight.reshape({Co, C}).t().contiguous(); }

// o[co * ldo + p] = (accumulate ? o[co * ldo + p] : 0) + sum_c wt[c * Co + co] * t[c * P + p], wt
// from gemm_weight (BLAS reads it as the transpose of a column-major C_out x C matrix).
template <typename T>
void tile_gemm(T* o, int64_t ldo, const T* wt, const T* t, int64_t Co, int64_t C, int64_t P, bool accumulate,
               const at::TensorOptions& opts) {
  const int m = static_cast<int>(P), n = static_cast<int>(Co), k = static_cast<int>(C);
  const int lda = static_cast<int>(P), ldb = static_cast<int>(Co), ldc = static_cast<int>(ldo);
  const T one = T(1), beta = accumulate ? T(1) : T(0);
  const char nt = 'N', tr = 'T';
  if constexpr (std::is_same_v<T, float>) {
    if (own_gemm(at::kFloat)) return gemm_avx512(o, ldo, wt, Co, t, P, Co, C, P, accumulate);
    if (sgemm_ != nullptr) return sgemm_(&nt, &tr, &m, &n, &k, &one, t, &lda, wt, &ldb, &beta, o, &ldc);
  } else if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ != nullptr) return dgemm_(&nt, &tr, &m, &n, &k, &one, t, &lda, wt, &ldb, &beta, o, &ldc);
  }
  at::Tensor dst = at::from_blob(o, {Co, P}, {ldo, 1}, opts);
  if (!accumulate) dst.zero_();
  dst.addmm_(at::from_blob(const_cast<T*>(wt), {C, Co}, opts).t(), at::from_blob(const_cast<T*>(t), {C, P}, opts));
}

}  // namespace asl
