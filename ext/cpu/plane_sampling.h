// Plane sampling for the CPU kernels: strided views of one (n, c) plane, the ranges where both
// taps of an axis lie inside, and the row and plane blends that the active shift's forward pass,
// its input gradient and the fused inference operators all build on. Everything has internal
// linkage (an unnamed namespace), so each kernel file compiles only the parts it uses.
#pragma once

#include "../active_shift.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace asl {
namespace {

inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return std::min(std::max(v, lo), hi); }

// Output positions [lo, hi) along one axis whose two taps, i*stride + off and i*stride + off + 1,
// both lie inside a source axis of src_len (hi = lo when there are none); out_len bounds them.
struct Range {
  int64_t lo, hi;
};
inline Range both_taps_inside(int64_t off, int64_t stride, int64_t src_len, int64_t out_len) {
  const int64_t lo = clamp64(-floor_div(off, stride), 0, out_len);
  return {lo, clamp64(floor_div(src_len - 2 - off, stride) + 1, lo, out_len)};
}

// Strided 2-D view of one (n, c) plane.
template <typename T>
struct Plane {
  T* p;
  int64_t H, W, sH, sW;
  T* row(int64_t r) const { return (r >= 0 && r < H) ? p + r * sH : nullptr; }
};

template <typename T, typename acc_t>
inline acc_t tap(const T* row, int64_t c, int64_t W, int64_t sW) {
  return (row != nullptr && c >= 0 && c < W) ? static_cast<acc_t>(row[c * sW]) : acc_t(0);
}

// One output value from source rows a and b (nullptr when outside) at columns c and c + 1.
template <typename T, typename acc_t>
inline acc_t blend_taps(const T* a, const T* b, int64_t c, int64_t W, int64_t sW, acc_t wr0, acc_t wr1, acc_t wc0,
                        acc_t wc1) {
  acc_t v = acc_t(0);
  if (a) v += wr0 * (wc0 * tap<T, acc_t>(a, c, W, sW) + wc1 * tap<T, acc_t>(a, c + 1, W, sW));
  if (b) v += wr1 * (wc0 * tap<T, acc_t>(b, c, W, sW) + wc1 * tap<T, acc_t>(b, c + 1, W, sW));
  return v;
}

// Contiguous interior loops: the hot path of NCHW tensors with unit column stride. They are
// compiled twice, for AVX2+FMA and for the baseline, and picked at load time by the CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ASL_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ASL_MULTIVERSION
#endif

template <typename T, typename acc_t>
ASL_MULTIVERSION void blend2_unit(T* __restrict__ o, const T* __restrict__ a, const T* __restrict__ b, int64_t n,
                 acc_t w00, acc_t w01, acc_t w10, acc_t w11) {
  for (int64_t i = 0; i < n; ++i) {
    o[i] = static_cast<T>(w00 * static_cast<acc_t>(a[i]) + w01 * static_cast<acc_t>(a[i + 1]) +
                          w10 * static_cast<acc_t>(b[i]) + w11 * static_cast<acc_t>(b[i + 1]));
  }
}

template <typename T, typename acc_t>
ASL_MULTIVERSION void blend1_unit(T* __restrict__ o, const T* __restrict__ a, int64_t n, acc_t w0, acc_t w1) {
  for (int64_t i = 0; i < n; ++i) {
    o[i] = static_cast<T>(w0 * static_cast<acc_t>(a[i]) + w1 * static_cast<acc_t>(a[i + 1]));
  }
}

// Horizontal blend of one input row into h, then the vertical blend of each next row with the
// previous one: every input row is read and blended horizontally once instead of twice.
template <typename T, typename acc_t>
ASL_MULTIVERSION void hblend_unit(acc_t* __restrict h, const T* __restrict x, int64_t n, acc_t c0, acc_t c1) {
  for (int64_t i = 0; i < n; ++i) h[i] = c0 * static_cast<acc_t>(x[i]) + c1 * static_cast<acc_t>(x[i + 1]);
}

template <typename T, typename acc_t>
ASL_MULTIVERSION void vblend_row_unit(T* __restrict o, acc_t* __restrict h, const T* __restrict x, int64_t n,
                                      acc_t c0, acc_t c1, acc_t r0, acc_t r1) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t hb = c0 * static_cast<acc_t>(x[i]) + c1 * static_cast<acc_t>(x[i + 1]);
    o[i] = static_cast<T>(r0 * h[i] + r1 * hb);
    h[i] = hb;
  }
}

// The columns outside [q_lo, q_hi) of the rows [p_lo, p_hi) whose two row taps are inside, at
// stride 1 with unit column strides: their column taps are fixed per column, so they are
// resolved once (index and inside/outside) instead of bounds-checked at every row.
template <typename T, typename acc_t>
void flat_edge_columns(Plane<const T> src, Plane<T> out, int64_t p_lo, int64_t p_hi, int64_t q_lo,
                       int64_t q_hi, int64_t off_r, int64_t off_c, acc_t wr0, acc_t wr1, acc_t wc0,
                       acc_t wc1) {
  struct Col {
    int64_t q, c0, c1;
    bool in0, in1;
  };
  thread_local std::vector<Col> cols;  // reused: no allocation per plane
  cols.clear();
  auto add = [&](int64_t q) {
    const int64_t c = q + off_c;
    const bool in0 = c >= 0 && c < src.W, in1 = c + 1 >= 0 && c + 1 < src.W;
    cols.push_back(Col{q, in0 ? c : 0, in1 ? c + 1 : 0, in0, in1});
  };
  for (int64_t q = 0; q < q_lo; ++q) add(q);
  for (int64_t q = q_hi; q < out.W; ++q) add(q);
  for (int64_t p = p_lo; p < p_hi; ++p) {
    const T* a = src.p + (p + off_r) * src.sH;
    const T* b = a + src.sH;
    T* o = out.p + p * out.sH;
    for (const Col& col : cols) {
      const acc_t a0 = col.in0 ? static_cast<acc_t>(a[col.c0]) : acc_t(0);
      const acc_t a1 = col.in1 ? static_cast<acc_t>(a[col.c1]) : acc_t(0);
      const acc_t b0 = col.in0 ? static_cast<acc_t>(b[col.c0]) : acc_t(0);
      const acc_t b1 = col.in1 ? static_cast<acc_t>(b[col.c1]) : acc_t(0);
      o[col.q] = static_cast<T>(wr0 * (wc0 * a0 + wc1 * a1) + wr1 * (wc0 * b0 + wc1 * b1));
    }
  }
}

// One output row o (out_W values, stride o_sW) from source rows a and b (nullptr when outside) at
// columns q*s_c + off_c and + 1; `in` holds the columns whose two taps are inside, blended by
// the vectorized loops when the strides are unit.
template <typename T, typename acc_t>
void sample_row(T* o, int64_t o_sW, int64_t out_W, const T* a, const T* b, Plane<const T> src, int64_t s_c,
                int64_t off_c, Range in, bool unit, acc_t wr0, acc_t wr1, acc_t wc0, acc_t wc1) {
  auto edge = [&](int64_t q) {
    o[q * o_sW] = static_cast<T>(blend_taps<T, acc_t>(a, b, q * s_c + off_c, src.W, src.sW, wr0, wr1, wc0, wc1));
  };
  for (int64_t q = 0; q < in.lo; ++q) edge(q);
  for (int64_t q = in.hi; q < out_W; ++q) edge(q);
  const int64_t n = in.hi - in.lo;
  if (n <= 0) return;
  const int64_t c0 = in.lo * s_c + off_c;
  if (unit && a && b) {
    blend2_unit<T, acc_t>(o + in.lo, a + c0, b + c0, n, wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1);
  } else if (unit && (a || b)) {
    const acc_t w = a ? wr0 : wr1;
    blend1_unit<T, acc_t>(o + in.lo, (a ? a : b) + c0, n, w * wc0, w * wc1);
  } else if (!a && !b) {
    for (int64_t q = in.lo; q < in.hi; ++q) o[q * o_sW] = T(0);
  } else {
    for (int64_t q = in.lo; q < in.hi; ++q) edge(q);
  }
}

// out[p, q] = sum over k, l in {0, 1} of wr_k * wc_l * src[p*s_r + off_r + k, q*s_c + off_c + l],
// with zeros outside src. The forward pass is this with the layer's stride; the input gradient
// at stride 1 is this too, applied to grad_output with mirrored offsets and weights.
template <typename T, typename acc_t>
void sample_plane(Plane<const T> src, Plane<T> out, int64_t s_r, int64_t s_c, int64_t off_r,
                  int64_t off_c, acc_t wr0, acc_t wr1, acc_t wc0, acc_t wc1) {
  // Columns whose two taps are both inside src.
  const Range cols = both_taps_inside(off_c, s_c, src.W, out.W);
  const int64_t q_lo = cols.lo, q_hi = cols.hi;
  const bool unit = s_c == 1 && src.sW == 1 && out.sW == 1;
  // Rows whose two taps are both inside src.
  const Range rows = both_taps_inside(off_r, s_r, src.H, out.H);
  const int64_t p_lo = rows.lo, p_hi = rows.hi;
  // Stride 1 with unit column strides (NCHW): the interior rows are blended row after row,
  // each input row blended horizontally once (see vblend_row_unit).
  const bool flat = unit && s_r == 1 && p_hi > p_lo && q_hi > q_lo;
  if (flat) {
    const int64_t n = q_hi - q_lo;
    thread_local std::vector<acc_t> h;  // reused: no allocation per plane
    h.resize(static_cast<size_t>(n));
    const T* row = src.p + (p_lo + off_r) * src.sH + q_lo + off_c;
    hblend_unit<T, acc_t>(h.data(), row, n, wc0, wc1);
    for (int64_t p = p_lo; p < p_hi; ++p) {
      row += src.sH;
      vblend_row_unit<T, acc_t>(out.p + p * out.sH + q_lo, h.data(), row, n, wc0, wc1, wr0, wr1);
    }
    flat_edge_columns<T, acc_t>(src, out, p_lo, p_hi, q_lo, q_hi, off_r, off_c, wr0, wr1, wc0, wc1);
  }
  for (int64_t p = 0; p < out.H; ++p) {
    if (flat && p >= p_lo && p < p_hi) continue;  // done above
    const int64_t r = p * s_r + off_r;
    sample_row<T, acc_t>(out.p + p * out.sH, out.sW, out.W, src.row(r), src.row(r + 1), src, s_c, off_c, cols, unit,
                         wr0, wr1, wc0, wc1);
  }
}

inline void check_cpu_dtype(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
              ": on CPU the input must be float32 or float64, got ", input.scalar_type(),
              " (float16 and bfloat16 are supported on CUDA)");
}

template <typename T>
Plane<T> plane(T* base, const at::Tensor& t, int64_t n, int64_t c) {
  return Plane<T>{base + n * t.stride(0) + c * t.stride(1), t.size(2), t.size(3), t.stride(2),
                  t.stride(3)};
}

template <typename acc_t>
std::vector<ChannelShift<acc_t>> channel_shifts(const at::Tensor& shift, double limit) {
  const at::Tensor s = shift.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = s.data_ptr<acc_t>();
  std::vector<ChannelShift<acc_t>> out(s.size(0));
  for (int64_t c = 0; c < s.size(0); ++c) {
    out[c] = ChannelShift<acc_t>::make(p[2 * c], p[2 * c + 1], static_cast<acc_t>(limit));
  }
  return out;
}

template <typename T>
void fill_nan(Plane<T> pl) {
  for (int64_t r = 0; r < pl.H; ++r)
    for (int64_t c = 0; c < pl.W; ++c) pl.p[r * pl.sH + c * pl.sW] = std::numeric_limits<T>::quiet_NaN();
}

// Calls fn(n, c) for each of the N x C planes of plane_elems elements, in parallel tasks of about
// 32k elements.
template <typename Fn>
void for_each_plane(int64_t N, int64_t C, int64_t plane_elems, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane_elems));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i / C, i % C);
  });
}

}  // namespace
}  // namespace asl
