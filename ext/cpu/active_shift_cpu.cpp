// CPU kernels of the active shift operator. Work is split over (n, c) planes; within a plane the
// shift is constant, so every output row blends two input rows with fixed weights and the
// interior of a row is a branch-free loop the compiler vectorizes (AVX2: 512-bit loads at the
// one-element offset split every cache line and measured slower). channels_last has kernels of its
// own with the channels innermost; only its input gradient at stride > 1 walks the planes with
// their strides.
#include "../active_shift.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <string>
#include <limits>
#include <type_traits>
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
  std::vector<Col> cols;
  cols.reserve(static_cast<size_t>(q_lo + out.W - q_hi));
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
    std::vector<acc_t> h(static_cast<size_t>(n));
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

// Input gradient for any stride, as a gather (each input pixel collects the output pixels whose
// taps touch it), so no two threads ever write the same element.
template <typename T, typename acc_t>
void grad_input_plane(Plane<const T> g, Plane<T> gx, const ChannelShift<acc_t>& s,
                      at::IntArrayRef stride, at::IntArrayRef padding) {
  struct Taps {
    int64_t idx[2];
    acc_t w[2];
  };
  auto taps = [](int64_t x, int64_t st, int64_t pad, int64_t d, acc_t f, int64_t n) {
    Taps t;
    for (int k = 0; k < 2; ++k) {
      const int64_t num = x + pad - d - k;
      const bool ok = num >= 0 && num % st == 0 && num / st < n;
      t.idx[k] = ok ? num / st : -1;
      t.w[k] = ok ? (k == 0 ? acc_t(1) - f : f) : acc_t(0);
    }
    return t;
  };
  std::vector<Taps> cols(gx.W);
  for (int64_t c = 0; c < gx.W; ++c) cols[c] = taps(c, stride[1], padding[1], s.dc, s.fc, g.W);
  for (int64_t r = 0; r < gx.H; ++r) {
    const Taps rt = taps(r, stride[0], padding[0], s.dr, s.fr, g.H);
    T* o = gx.p + r * gx.sH;
    for (int64_t c = 0; c < gx.W; ++c) {
      const Taps& ct = cols[c];
      acc_t v = acc_t(0);
      for (int k = 0; k < 2; ++k) {
        if (rt.idx[k] < 0) continue;
        const T* grow = g.p + rt.idx[k] * g.sH;
        acc_t h = acc_t(0);
        for (int l = 0; l < 2; ++l) {
          if (ct.idx[l] >= 0) h += ct.w[l] * static_cast<acc_t>(grow[ct.idx[l] * g.sW]);
        }
        v += rt.w[k] * h;
      }
      o[c * gx.sW] = static_cast<T>(v);
    }
  }
}

// Row sums of grad_output * d(out)/d(alpha) and d(out)/d(beta) where all four taps are inside.
template <typename T, typename acc_t>
ASL_MULTIVERSION void shift_grad_unit(const T* __restrict__ g, const T* __restrict__ a,
                                      const T* __restrict__ b, int64_t n, acc_t fr, acc_t fc,
                                      acc_t* ra, acc_t* rb) {
  acc_t sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v00 = static_cast<acc_t>(a[i]), v01 = static_cast<acc_t>(a[i + 1]);
    const acc_t v10 = static_cast<acc_t>(b[i]), v11 = static_cast<acc_t>(b[i + 1]);
    const acc_t gv = static_cast<acc_t>(g[i]);
    sa += gv * d_alpha(v00, v01, v10, v11, fr);
    sb += gv * d_beta(v00, v01, v10, v11, fc);
  }
  *ra += sa;
  *rb += sb;
}

// Sum over one plane of grad_output times d(output)/d(alpha) and d(output)/d(beta).
template <typename T, typename acc_t>
void grad_shift_plane(Plane<const T> g, Plane<const T> x, const ChannelShift<acc_t>& s,
                      at::IntArrayRef stride, at::IntArrayRef padding, double* out2) {
  const acc_t fr = s.fr, fc = s.fc;
  const int64_t sw = stride[1], off_c = s.dc - padding[1];
  const Range cols = both_taps_inside(off_c, sw, x.W, g.W);
  const int64_t q_lo = cols.lo, q_hi = cols.hi;
  const bool unit = sw == 1 && x.sW == 1 && g.sW == 1;
  double da = 0, db = 0;
  for (int64_t p = 0; p < g.H; ++p) {
    const int64_t r = p * stride[0] - padding[0] + s.dr;
    const T* a = x.row(r);
    const T* b = x.row(r + 1);
    if (!a && !b) continue;
    const T* grow = g.p + p * g.sH;
    acc_t ra = 0, rb = 0;  // row sums in opmath, plane sums in double
    auto generic = [&](int64_t q) {
      const int64_t c = q * sw + off_c;
      const acc_t v00 = tap<T, acc_t>(a, c, x.W, x.sW), v01 = tap<T, acc_t>(a, c + 1, x.W, x.sW);
      const acc_t v10 = tap<T, acc_t>(b, c, x.W, x.sW), v11 = tap<T, acc_t>(b, c + 1, x.W, x.sW);
      const acc_t gv = static_cast<acc_t>(grow[q * g.sW]);
      ra += gv * d_alpha(v00, v01, v10, v11, fr);
      rb += gv * d_beta(v00, v01, v10, v11, fc);
    };
    for (int64_t q = 0; q < q_lo; ++q) generic(q);
    if (unit && a && b && q_hi > q_lo) {
      const int64_t c0 = q_lo + off_c;
      shift_grad_unit<T, acc_t>(grow + q_lo, a + c0, b + c0, q_hi - q_lo, fr, fc, &ra, &rb);
    } else {
      for (int64_t q = q_lo; q < q_hi; ++q) generic(q);
    }
    for (int64_t q = q_hi; q < g.W; ++q) generic(q);
    da += ra;
    db += rb;
  }
  out2[0] = da;
  out2[1] = db;
}

void check_cpu_dtype(const at::Tensor& input, const char* op) {
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

int64_t grain(int64_t plane_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane_elems)); }

// All channels of one channels_last output pixel whose four taps are inside: one gather of four
// values per channel at the channel's fixed offset (vectorized with AVX2 gathers where available).
template <typename T, typename acc_t, typename off_t>
ASL_MULTIVERSION void cl_pixel_unit(T* __restrict o, const T* __restrict xq, const off_t* __restrict off,
                                    const acc_t* __restrict w00, const acc_t* __restrict w01,
                                    const acc_t* __restrict w10, const acc_t* __restrict w11, int64_t C,
                                    int64_t WC) {
  for (int64_t c = 0; c < C; ++c) {
    const T* px = xq + off[c];
    o[c] = static_cast<T>(w00[c] * static_cast<acc_t>(px[0]) + w01[c] * static_cast<acc_t>(px[C]) +
                          w10[c] * static_cast<acc_t>(px[WC]) + w11[c] * static_cast<acc_t>(px[WC + C]));
  }
}

// One channel's taps for sample_channels_last: rows p*s_r + off_r (+1), columns q*s_c + off_c (+1).
template <typename acc_t>
struct ClChannel {
  int64_t off_r, off_c;
  acc_t wr0, wr1, wc0, wc1;
  bool finite;
};

// The forward pass's taps for every channel (the shift gradient reads the same taps).
template <typename acc_t>
std::vector<ClChannel<acc_t>> forward_taps(const std::vector<ChannelShift<acc_t>>& shifts, const Geometry& g) {
  std::vector<ClChannel<acc_t>> ch(shifts.size());
  for (size_t c = 0; c < shifts.size(); ++c) {
    const auto& s = shifts[c];
    ch[c] = {s.dr - g.ph, s.dc - g.pw, acc_t(1) - s.fr, s.fr, acc_t(1) - s.fc, s.fc, s.finite};
  }
  return ch;
}

// The output rows and columns where every channel's four taps are inside the source.
struct Region {
  Range rows, cols;
  bool contains_row(int64_t p) const { return p >= rows.lo && p < rows.hi && cols.lo < cols.hi; }
};

template <typename acc_t>
Region cl_interior(const std::vector<ClChannel<acc_t>>& ch, int64_t Hs, int64_t Ws, int64_t Ho, int64_t Wo,
                   int64_t s_r, int64_t s_c) {
  Region reg{{0, Ho}, {0, Wo}};
  for (const auto& t : ch) {
    const Range r = both_taps_inside(t.off_r, s_r, Hs, Ho), c = both_taps_inside(t.off_c, s_c, Ws, Wo);
    reg.rows = {std::max(reg.rows.lo, r.lo), std::min(reg.rows.hi, r.hi)};
    reg.cols = {std::max(reg.cols.lo, c.lo), std::min(reg.cols.hi, c.hi)};
  }
  return reg;
}

// Element offsets, for output row p, of every channel's first tap relative to the lowest of them
// (returned): 32-bit offsets suffice whenever one image holds fewer than 2^30 elements.
template <typename acc_t, typename off_t>
int64_t cl_row_offsets(const std::vector<ClChannel<acc_t>>& ch, int64_t p, int64_t s_r, int64_t Ws,
                       std::vector<off_t>& off) {
  const int64_t C = static_cast<int64_t>(ch.size());
  auto first_tap = [&](int64_t c) { return ((p * s_r + ch[c].off_r) * Ws + ch[c].off_c) * C + c; };
  int64_t base = first_tap(0);
  for (int64_t c = 1; c < C; ++c) base = std::min(base, first_tap(c));
  for (int64_t c = 0; c < C; ++c) off[c] = static_cast<off_t>(first_tap(c) - base);
  return base;
}

// The channels_last counterpart of sample_plane: one output row (n, p) at a time with the
// channels innermost, so the taps of neighbouring pixels stay in cache. Each channel's taps sit at
// a fixed offset from the output pixel, so inside the region where every channel's four taps are
// in the image the inner loop over channels has no bounds checks; the border goes through the
// checked path. Used by the forward pass and, at stride 1, by the input gradient.
template <typename T, typename acc_t>
void sample_channels_last(const T* x, T* y, int64_t N, int64_t C, int64_t Hs, int64_t Ws, int64_t Ho,
                          int64_t Wo, int64_t s_r, int64_t s_c, const std::vector<ClChannel<acc_t>>& ch) {
  std::vector<acc_t> w00(C), w01(C), w10(C), w11(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto& t = ch[c];
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();  // NaN weights give NaN outputs
    w00[c] = t.finite ? t.wr0 * t.wc0 : nan;
    w01[c] = t.finite ? t.wr0 * t.wc1 : nan;
    w10[c] = t.finite ? t.wr1 * t.wc0 : nan;
    w11[c] = t.finite ? t.wr1 * t.wc1 : nan;
  }
  const Region inner = cl_interior(ch, Hs, Ws, Ho, Wo, s_r, s_c);
  const Range cols = inner.cols;
  const int64_t WC = Ws * C;
  const bool small = Hs * WC < (int64_t{1} << 30);
  at::parallel_for(0, N * Ho, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, Wo * C)), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> off64(small ? 0 : C);
    std::vector<int32_t> off32(small ? C : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / Ho, p = i % Ho;
      const T* xn = x + n * Hs * WC;
      T* o_row = y + i * Wo * C;
      auto checked = [&](int64_t q) {
        for (int64_t c = 0; c < C; ++c) {
          const auto& t = ch[c];
          if (!t.finite) {
            o_row[q * C + c] = std::numeric_limits<T>::quiet_NaN();
            continue;
          }
          const int64_t r = p * s_r + t.off_r, col = q * s_c + t.off_c;
          acc_t v = acc_t(0);
          for (int k = 0; k < 2; ++k) {
            if (r + k < 0 || r + k >= Hs) continue;
            for (int l = 0; l < 2; ++l) {
              if (col + l < 0 || col + l >= Ws) continue;
              const acc_t w = k == 0 ? (l == 0 ? w00[c] : w01[c]) : (l == 0 ? w10[c] : w11[c]);
              v += w * static_cast<acc_t>(xn[((r + k) * Ws + col + l) * C + c]);
            }
          }
          o_row[q * C + c] = static_cast<T>(v);
        }
      };
      if (!inner.contains_row(p)) {
        for (int64_t q = 0; q < Wo; ++q) checked(q);
        continue;
      }
      for (int64_t q = 0; q < cols.lo; ++q) checked(q);
      for (int64_t q = cols.hi; q < Wo; ++q) checked(q);
      auto interior = [&](auto& off) {
        const int64_t base = cl_row_offsets(ch, p, s_r, Ws, off);
        for (int64_t q = cols.lo; q < cols.hi; ++q)
          cl_pixel_unit<T, acc_t>(o_row + q * C, xn + base + q * s_c * C, off.data(), w00.data(), w01.data(),
                                  w10.data(), w11.data(), C, WC);
      };
      if (small) interior(off32);
      else interior(off64);
    }
  });
}

at::Tensor active_shift_cpu(const at::Tensor& input_, const at::Tensor& shift, at::IntArrayRef stride,
                            at::IntArrayRef padding) {
  const Geometry g = prepare(input_, shift, stride, padding, "active_shift");
  check_cpu_dtype(input_, "active_shift");
  const at::Tensor input = input_.contiguous(g.format());
  const int64_t N = g.N, C = g.C;
  at::Tensor out = at::empty({N, C, g.Ho, g.Wo}, input.options().memory_format(g.format()));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "active_shift_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto shifts = channel_shifts<acc_t>(shift, g.limit);
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    if (g.channels_last) {
      sample_channels_last<scalar_t, acc_t>(xp, yp, N, C, g.H, g.W, g.Ho, g.Wo, g.sh, g.sw, forward_taps(shifts, g));
      return;
    }
    at::parallel_for(0, N * C, grain(g.Ho * g.Wo), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / C, c = i % C;
        const auto& s = shifts[c];
        auto dst = plane(yp, out, n, c);
        if (!s.finite) {
          fill_nan(dst);
          continue;
        }
        sample_plane<scalar_t, acc_t>(plane(xp, input, n, c), dst, stride[0], stride[1],
                                      s.dr - padding[0], s.dc - padding[1], acc_t(1) - s.fr, s.fr,
                                      acc_t(1) - s.fc, s.fc);
      }
    });
  });
  return out;
}

at::Tensor active_shift_grad_input_cpu(const at::Tensor& grad_, const at::Tensor& input_,
                                       const at::Tensor& shift, at::IntArrayRef stride,
                                       at::IntArrayRef padding) {
  const Geometry g = prepare(input_, shift, stride, padding, "active_shift_grad_input", &grad_);
  check_cpu_dtype(input_, "active_shift_grad_input");
  const int64_t N = g.N, C = g.C;
  const at::Tensor grad = grad_.to(input_.scalar_type()).contiguous(g.format());
  at::Tensor gx = at::empty(input_.sizes(), input_.options().memory_format(g.format()));
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(input_.scalar_type(), "active_shift_grad_input_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto shifts = channel_shifts<acc_t>(shift, g.limit);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = gx.data_ptr<scalar_t>();
    const bool s1 = stride[0] == 1 && stride[1] == 1;
    if (g.channels_last && s1) {
      // Transposed sampling at stride 1 is sampling at the mirrored shift (as for NCHW below).
      std::vector<ClChannel<acc_t>> ch(C);
      for (int64_t c = 0; c < C; ++c) {
        const auto& s = shifts[c];
        ch[c] = {g.ph - s.dr - 1, g.pw - s.dc - 1, s.fr, acc_t(1) - s.fr, s.fc, acc_t(1) - s.fc, s.finite};
      }
      sample_channels_last<scalar_t, acc_t>(gp, op, N, C, g.Ho, g.Wo, g.H, g.W, 1, 1, ch);
      return;
    }
    at::parallel_for(0, N * C, grain(g.H * g.W), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / C, c = i % C;
        const auto& s = shifts[c];
        auto dst = plane(op, gx, n, c);
        if (!s.finite) {
          fill_nan(dst);
        } else if (s1) {
          // Transposed sampling at stride 1 is sampling at the mirrored shift.
          sample_plane<scalar_t, acc_t>(plane(gp, grad, n, c), dst, 1, 1, padding[0] - s.dr - 1,
                                        padding[1] - s.dc - 1, s.fr, acc_t(1) - s.fr, s.fc,
                                        acc_t(1) - s.fc);
        } else {
          grad_input_plane<scalar_t, acc_t>(plane(gp, grad, n, c), dst, s, stride, padding);
        }
      }
    });
  });
  return gx;
}

// channels_last shift gradient: per output row (n, p), per-channel sums over the row with the
// channels innermost (same tap offsets and unchecked interior as sample_channels_last), written
// to row_sums[(n * Ho + p) * C + c] and added up in a fixed order by the caller.
template <typename T, typename acc_t>
void grad_shift_channels_last(const T* go, const T* x, const Geometry& g,
                              const std::vector<ChannelShift<acc_t>>& shifts, std::vector<double>& row_sums) {
  const int64_t C = g.C, H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo, WC = W * C;
  const auto ch = forward_taps(shifts, g);  // per channel: fr = wr1, fc = wc1
  const Region inner = cl_interior(ch, H, W, Ho, Wo, g.sh, g.sw);
  const Range cols = inner.cols;
  at::parallel_for(0, g.N * Ho, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, Wo * C)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ra(C), rb(C);
    std::vector<int64_t> off(C);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / Ho, p = i % Ho;
      const T* xn = x + n * H * WC;
      const T* grow = go + i * Wo * C;
      std::fill(ra.begin(), ra.end(), acc_t(0));
      std::fill(rb.begin(), rb.end(), acc_t(0));
      auto accumulate = [&](int64_t c, acc_t gv, acc_t v00, acc_t v01, acc_t v10, acc_t v11) {
        const acc_t fr = ch[c].wr1, fc = ch[c].wc1;
        ra[c] += gv * d_alpha(v00, v01, v10, v11, fr);
        rb[c] += gv * d_beta(v00, v01, v10, v11, fc);
      };
      auto checked = [&](int64_t q) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t r = p * g.sh + ch[c].off_r, col = q * g.sw + ch[c].off_c;
          auto at_ = [&](int64_t rr, int64_t cc) {
            return (rr >= 0 && rr < H && cc >= 0 && cc < W) ? static_cast<acc_t>(xn[(rr * W + cc) * C + c]) : acc_t(0);
          };
          accumulate(c, static_cast<acc_t>(grow[q * C + c]), at_(r, col), at_(r, col + 1), at_(r + 1, col), at_(r + 1, col + 1));
        }
      };
      if (!inner.contains_row(p)) {
        for (int64_t q = 0; q < Wo; ++q) checked(q);
      } else {
        const int64_t base = cl_row_offsets(ch, p, g.sh, W, off);
        for (int64_t q = 0; q < cols.lo; ++q) checked(q);
        for (int64_t q = cols.hi; q < Wo; ++q) checked(q);
        for (int64_t q = cols.lo; q < cols.hi; ++q) {
          const T* xq = xn + base + q * g.sw * C;
          const T* gq = grow + q * C;
          for (int64_t c = 0; c < C; ++c) {
            const T* px = xq + off[c];
            accumulate(c, static_cast<acc_t>(gq[c]), static_cast<acc_t>(px[0]), static_cast<acc_t>(px[C]),
                       static_cast<acc_t>(px[WC]), static_cast<acc_t>(px[WC + C]));
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const bool ok = ch[c].finite;
        row_sums[(i * C + c) * 2] = ok ? static_cast<double>(ra[c]) : std::numeric_limits<double>::quiet_NaN();
        row_sums[(i * C + c) * 2 + 1] = ok ? static_cast<double>(rb[c]) : std::numeric_limits<double>::quiet_NaN();
      }
    }
  });
}

at::Tensor active_shift_grad_shift_cpu(const at::Tensor& grad_, const at::Tensor& input_,
                                       const at::Tensor& shift, at::IntArrayRef stride,
                                       at::IntArrayRef padding) {
  const Geometry g = prepare(input_, shift, stride, padding, "active_shift_grad_shift", &grad_);
  check_cpu_dtype(input_, "active_shift_grad_shift");
  const at::Tensor input = input_.contiguous(g.format());
  const int64_t N = g.N, C = g.C;
  const at::Tensor grad = grad_.to(input.scalar_type()).contiguous(g.format());
  at::Tensor total = at::zeros({C, 2}, shift.options().dtype(at::kDouble));
  double* tp = total.data_ptr<double>();
  if (g.channels_last && grad.numel() > 0) {
    // Per-row partial sums, added in a fixed order: deterministic for any number of threads.
    std::vector<double> rows(static_cast<size_t>(N * g.Ho * C * 2), 0.0);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "active_shift_grad_shift_cpu_cl", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      grad_shift_channels_last<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), g,
                                                channel_shifts<acc_t>(shift, g.limit), rows);
    });
    for (int64_t i = 0; i < N * g.Ho; ++i)
      for (int64_t k = 0; k < 2 * C; ++k) tp[k] += rows[i * 2 * C + k];
    return total.to(shift.scalar_type());
  }
  // Per-plane partial sums, then a fixed-order sum over the batch: deterministic for any
  // number of threads.
  std::vector<double> partial(static_cast<size_t>(N * C * 2), 0.0);
  if (grad.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "active_shift_grad_shift_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto shifts = channel_shifts<acc_t>(shift, g.limit);
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* xp = input.const_data_ptr<scalar_t>();
      at::parallel_for(0, N * C, grain(g.Ho * g.Wo), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t n = i / C, c = i % C;
          const auto& s = shifts[c];
          if (!s.finite) {
            partial[2 * i] = partial[2 * i + 1] = std::numeric_limits<double>::quiet_NaN();
            continue;
          }
          grad_shift_plane<scalar_t, acc_t>(plane(gp, grad, n, c), plane(xp, input, n, c), s, stride,
                                            padding, &partial[2 * i]);
        }
      });
    });
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < 2 * C; ++k) tp[k] += partial[n * 2 * C + k];
  return total.to(shift.scalar_type());
}

}  // namespace

// This thread's scratch buffer of at least n elements, 64-byte aligned, kept between calls so that
// the fused operators allocate nothing per call. One caller at a time per thread (not reentrant).
template <typename T>
T* thread_scratch(int64_t n) {
  thread_local std::vector<T> storage;
  storage.resize(static_cast<size_t>(n) + 64 / sizeof(T));
  const auto misalign = reinterpret_cast<uintptr_t>(storage.data()) % 64;
  return storage.data() + (misalign == 0 ? 0 : (64 - misalign) / sizeof(T));
}

// Rows of one channel's shifted tile at stride 1: out row p blends source rows p + off_r and
// p + off_r + 1 (zeros outside) at columns q + off_c and q + off_c + 1; `in` holds the columns
// whose two taps are inside. A lean version of sample_plane for short tiles (no allocations).
template <typename T, typename acc_t>
void shift_rows_unit(Plane<const T> src, Plane<T> out, int64_t off_r, int64_t off_c, Range in, acc_t wr0,
                     acc_t wr1, acc_t wc0, acc_t wc1) {
  // Rows whose two source rows are inside, when output and source rows have the same length
  // (stride 1, no column padding): one blend over the whole run of rows as a flat array (long
  // vector loops instead of one short loop per row); the columns where a tap wraps into the next
  // or previous row are recomputed below with the other edge columns.
  Range flat{0, 0};
  if (out.W == src.W && src.sH == src.W && out.sH == out.W) {
    flat = both_taps_inside(off_r, 1, src.H, out.H);
    if (flat.hi > flat.lo) {
      const int64_t W = out.W, base = (flat.lo + off_r) * W + off_c;  // source index of out[flat.lo, 0]'s first tap
      const int64_t begin = std::max<int64_t>(0, -base);                              // no read before the plane
      const int64_t end = std::min<int64_t>((flat.hi - flat.lo) * W, src.H * W - W - 1 - base);  // nor after it
      if (end > begin) {
        blend2_unit<T, acc_t>(out.p + flat.lo * W + begin, src.p + base + begin, src.p + base + begin + W, end - begin,
                              wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1);
      }
    }
  }
  for (int64_t p = 0; p < out.H; ++p) {
    if (p >= flat.lo && p < flat.hi) {
      // Fix the columns whose taps wrapped into a neighbouring row. Elements the flat run left
      // out at its two ends (reads that would leave the plane) are among them: they lie in the
      // first row left of in.lo or in the last row from in.hi on.
      const T* a = src.p + (p + off_r) * src.sH;
      const T* b = a + src.sH;
      T* o = out.p + p * out.sH;
      auto fix = [&](int64_t q) { o[q] = static_cast<T>(blend_taps<T, acc_t>(a, b, q + off_c, src.W, 1, wr0, wr1, wc0, wc1)); };
      for (int64_t q = 0; q < in.lo; ++q) fix(q);
      for (int64_t q = in.hi; q < out.W; ++q) fix(q);
      continue;
    }
    sample_row<T, acc_t>(out.p + p * out.sH, 1, out.W, src.row(p + off_r), src.row(p + off_r + 1), src, 1, off_c, in, true,
                         wr0, wr1, wc0, wc1);
  }
}

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

// One panel of n <= 32 pixels times every block of output channels (Co in all). The first block
// pulls g.prefetch's rows (the next panel's input) into cache.
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

// o (+)= w * t over P pixels (t's rows of stride ldt): 32-pixel panels (the last one masked), each
// multiplied by every block of output channels while it sits in L1.
void gemm_avx512(float* o, int64_t ldo, const float* w, int64_t ldw, const float* t, int64_t ldt, int64_t Co,
                 int64_t K, int64_t P, bool accumulate) {
  for (int64_t j = 0; j < P; j += 32) {
    const GemmPanel g{w, ldw, t + j, ldt, o + j, ldo, K, 0, 0, accumulate ? o + j : nullptr, ldo, nullptr, false, nullptr, 0};
    gemm_panel_avx512(g, Co, std::min<int64_t>(32, P - j));
  }
}

// Copies n (<= 32) pixels of K channel rows (x[k * ldx + i]) into a dense K x 32 panel, as
// relu(x * scale[k] + bias[k]) when scale is given; lanes past n are zero.
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

// Per panel of n <= 32 output pixels from flat index j (output rows of W pixels): for each row offset
// e in [rlo, rhi], bit i of rows[e - rlo] says whether input row (j + i) / W + e is one of the H rows;
// likewise cols[] for columns (j + i) % W + e against W. Shared by every channel of the panel.
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

// The shifted panel (C x 32, lanes past the panel's pixels zero) of every channel of one image x
// (planes of HW floats, rows of W), output pixels j.. of the panel: four masked loads per 16 pixels
// and channel; a channel with a non-finite shift gives NaN. Taps whose mask is off are never read.
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

// Whether gemm_avx512 serves float products: an AVX-512 CPU, unless ASL_CPU_GEMM=blas asks for
// the BLAS path (which every other machine takes).
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

// Whether a product with this dtype runs on gemm_avx512 (which takes the weight transposed).
bool own_gemm(at::ScalarType t) { return t == at::kFloat && use_gemm_avx512(); }

// A 1x1 convolution's weight (C_out, C) or (C_out, C, 1, 1) as the dense transposed matrix
// (C x C_out) every product here takes: free when the caller passes a transposed view (as the
// inference form does), a copy otherwise.
at::Tensor gemm_weight(const at::Tensor& weight, int64_t Co, int64_t C) { return weight.reshape({Co, C}).t().contiguous(); }

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

// Calls fn(panel, n, j, cnt, more) for every 32-pixel panel (pixels j .. j + cnt - 1) of each of
// the N images of P pixels, in parallel tasks of about 2^17 multiply-adds (C x Co per pixel);
// `panel` is the thread's C x 32 scratch, `more` whether the task's next panel follows in the
// same image (worth prefetching).
template <typename Fn>
void for_each_panel(int64_t N, int64_t P, int64_t C, int64_t Co, const Fn& fn) {
  const int64_t panels = (P + 31) / 32;
  const int64_t panels_per_task = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, 32 * C * Co));
  at::parallel_for(0, N * panels, panels_per_task, [&](int64_t begin, int64_t end) {
    float* panel = thread_scratch<float>(C * 32);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / panels, j = (i % panels) * 32;
      fn(panel, n, j, std::min<int64_t>(32, P - j), i + 1 < end && j + 32 < P);
    }
  });
}

// shift_conv1x1 for float32 on AVX-512 CPUs at stride 1 with output rows as long as input rows (no
// column padding): per image, each 32-pixel panel is shifted straight from the input into a dense
// C x 32 panel that stays in L1 and multiplied by every block of output channels, the residual and
// bias added in the product; nothing but the output is written.
void shift_conv1x1_panels(const Geometry& g, const float* xp, const at::Tensor& shift, const float* wp, const float* bp,
                          const float* rp, int64_t Co, float* yp) {
  const int64_t C = g.C, H = g.H, W = g.W, HW = H * W, HWo = g.Ho * g.Wo;
  const auto shifts = channel_shifts<float>(shift, g.limit);
  // Tap row (column) offsets, clamped to the range beyond which every tap is outside, and the
  // range the panels' mask tables cover.
  std::vector<PanelShift> ch(C);
  std::vector<int64_t> er(2 * C), ec(2 * C);
  int64_t rlo = H, rhi = -g.Ho, clo = W, chi = -g.Wo;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t r = shifts[c].dr - g.ph, q = shifts[c].dc - g.pw;
    for (int64_t k = 0; k < 2; ++k) {
      er[2 * c + k] = clamp64(r + k, -g.Ho, H);
      ec[2 * c + k] = clamp64(q + k, -g.Wo, W);
    }
    rlo = std::min(rlo, er[2 * c]), rhi = std::max(rhi, er[2 * c + 1]);
    clo = std::min(clo, ec[2 * c]), chi = std::max(chi, ec[2 * c + 1]);
  }
  for (int64_t c = 0; c < C; ++c) {
    const auto& s = shifts[c];
    const auto idx = [](int64_t e, int64_t lo) { return static_cast<int32_t>(e - lo); };
    ch[c] = {(s.dr - g.ph) * W + (s.dc - g.pw), idx(er[2 * c], rlo), idx(er[2 * c + 1], rlo), idx(ec[2 * c], clo),
             idx(ec[2 * c + 1], clo), (1 - s.fr) * (1 - s.fc), (1 - s.fr) * s.fc, s.fr * (1 - s.fc), s.fr * s.fc,
             s.finite};
  }
  const int64_t nrows = std::max<int64_t>(0, rhi - rlo + 1), ncols = std::max<int64_t>(0, chi - clo + 1);
  for_each_panel(g.N, HWo, C, Co, [&](float* panel, int64_t n, int64_t j, int64_t cnt, bool) {
    uint32_t* rows = thread_scratch<uint32_t>(nrows + ncols);  // the panel's mask tables
    uint32_t* cols = rows + nrows;
    panel_masks(rows, rlo, rhi, cols, clo, chi, j, cnt, H, W);
    shift_pack_panel_avx512(panel, xp + n * C * HW, HW, W, j, cnt, ch.data(), C, rows, cols);
    const float* add = rp != nullptr ? rp + n * Co * HWo + j : nullptr;
    gemm_panel_avx512({wp, Co, panel, 32, yp + n * Co * HWo + j, HWo, C, 0, 0, add, HWo, bp, false, nullptr, 0}, Co, cnt);
  });
}

// out[n, :, tile] = weight @ shift(input)[n, :, tile] + bias + residual, one tile of whole output
// rows at a time: the tile is shifted into a buffer that stays in cache and multiplied at once
// (tile_gemm, into the output's strided view), so the shifted tensor is never written out. Float32
// at stride 1 without column padding on AVX-512 takes shift_conv1x1_panels instead.
at::Tensor shift_conv1x1_cpu(const at::Tensor& input_, const at::Tensor& shift, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                             at::IntArrayRef stride, at::IntArrayRef padding) {
  const Geometry g = prepare(input_, shift, stride, padding, "shift_conv1x1");
  check_cpu_dtype(input_, "shift_conv1x1");
  const int64_t Co = check_conv1x1(g, input_, weight, bias, residual);
  const at::Tensor input = input_.contiguous();
  const at::Tensor w = gemm_weight(weight, Co, g.C);
  const int64_t N = g.N, C = g.C, Ho = g.Ho, Wo = g.Wo, HWo = Ho * Wo;
  at::Tensor out = at::empty({N, Co, Ho, Wo}, input.options());
  if (out.numel() == 0) return out;
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (own_gemm(input.scalar_type()) && g.sh == 1 && g.sw == 1 && Wo == g.W) {
    shift_conv1x1_panels(g, input.const_data_ptr<float>(), shift, w.const_data_ptr<float>(),
                         b.defined() ? b.const_data_ptr<float>() : nullptr,
                         res.defined() ? res.const_data_ptr<float>() : nullptr, Co, out.data_ptr<float>());
    return out;
  }
  // rows per tile: the shifted tile (C x rows*Wo) within about 128 KiB
  const int64_t budget = std::max<int64_t>(1, (128 * 1024) / static_cast<int64_t>(input.element_size() * C));
  const int64_t rows = std::clamp<int64_t>(budget / std::max<int64_t>(Wo, 1), 1, Ho);
  const int64_t tiles = (Ho + rows - 1) / rows;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "shift_conv1x1_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto shifts = channel_shifts<acc_t>(shift, g.limit);
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    // Stride 1 (most layers): each channel's columns whose two taps are inside are found once.
    const bool lean = g.sh == 1 && g.sw == 1;
    std::vector<Range> cols(lean ? C : 0);
    for (int64_t c = 0; lean && c < C; ++c) cols[c] = both_taps_inside(shifts[c].dc - g.pw, 1, g.W, Wo);
    at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
      scalar_t* buf = thread_scratch<scalar_t>(C * rows * Wo);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / tiles, r0 = (i % tiles) * rows, nr = std::min(rows, Ho - r0), P = nr * Wo;
        for (int64_t c = 0; c < C; ++c) {
          const auto& s = shifts[c];
          Plane<scalar_t> dst{buf + c * P, nr, Wo, Wo, 1};
          if (!s.finite) {
            fill_nan(dst);
          } else if (lean) {
            shift_rows_unit<scalar_t, acc_t>(plane(xp, input, n, c), dst, r0 + s.dr - g.ph, s.dc - g.pw, cols[c],
                                             acc_t(1) - s.fr, s.fr, acc_t(1) - s.fc, s.fc);
          } else {
            sample_plane<scalar_t, acc_t>(plane(xp, input, n, c), dst, g.sh, g.sw, s.dr - g.ph + r0 * g.sh,
                                          s.dc - g.pw, acc_t(1) - s.fr, s.fr, acc_t(1) - s.fc, s.fc);
          }
        }
        scalar_t* o = yp + n * Co * HWo + r0 * Wo;
        for (int64_t co = 0; (bp || rp) && co < Co; ++co) {  // the addend: bias and residual
          scalar_t* orow = o + co * HWo;
          const scalar_t bv = bp ? bp[co] : scalar_t(0);
          if (rp) {
            const scalar_t* rrow = rp + (n * Co + co) * HWo + r0 * Wo;
            for (int64_t p = 0; p < P; ++p) orow[p] = rrow[p] + bv;
          } else {
            std::fill(orow, orow + P, bv);
          }
        }
        tile_gemm<scalar_t>(o, HWo, wp, buf, Co, C, P, bp || rp, input.options());
      }
    });
  });
  return out;
}

// conv1x1 for float32 on AVX-512 CPUs: per image, 32-pixel panels of the input are copied (through
// the input transform, when there is one) into a dense panel that stays in L1 and multiplied by
// every block of output channels, bias and ReLU applied before the store; nothing but the output
// is written. Everything else goes through the ATen composite.
at::Tensor conv1x1_cpu(const at::Tensor& input_, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_bias, bool relu) {
  const int64_t Co = check_pointwise(input_, weight, bias, in_scale, in_bias);
  if (!own_gemm(input_.scalar_type()) || input_.size(1) == 0)
    return conv1x1_composite(input_, weight, bias, in_scale, in_bias, relu);
  const at::Tensor input = input_.contiguous();
  const int64_t N = input.size(0), C = input.size(1), HW = input.size(2) * input.size(3);
  const at::Tensor w = gemm_weight(weight, Co, C);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor sc = in_scale.has_value() ? in_scale->contiguous() : at::Tensor();
  const at::Tensor sb = in_bias.has_value() ? in_bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({N, Co, input.size(2), input.size(3)}, input.options());
  if (out.numel() == 0) return out;
  const float* xp = input.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const float* sp = sc.defined() ? sc.const_data_ptr<float>() : nullptr;
  const float* tp = sb.defined() ? sb.const_data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  for_each_panel(N, HW, C, Co, [&](float* panel, int64_t n, int64_t j, int64_t cnt, bool more) {
    const float* x = xp + n * C * HW + j;
    pack_panel_avx512(panel, x, HW, C, cnt, sp, tp);
    // while the first block of channels is multiplied, the next panel's input comes into cache
    const float* next = more ? x + 32 : nullptr;
    gemm_panel_avx512({wp, Co, panel, 32, yp + n * Co * HW + j, HW, C, 0, 0, nullptr, 0, bp, relu, next, HW}, Co, cnt);
  });
  return out;
}

// relu(x * scale[c] + bias[c]) for an NCHW tensor: an evaluation-mode BatchNorm with its ReLU in
// one pass (per plane a contiguous loop the compiler vectorizes).
template <typename T>
ASL_MULTIVERSION void scale_bias_relu_unit(T* __restrict o, const T* __restrict x, int64_t n, T s, T b) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i] * s + b;
    o[i] = v > T(0) ? v : T(0);
  }
}

at::Tensor scale_bias_relu_cpu(const at::Tensor& input_, const at::Tensor& scale, const at::Tensor& bias) {
  check_scale_bias(input_, scale, bias);
  const int64_t N = input_.size(0), C = input_.size(1), HW = input_.size(2) * input_.size(3);
  check_cpu_dtype(input_, "scale_bias_relu");
  const at::Tensor input = input_.contiguous();
  at::Tensor out = at::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "scale_bias_relu_cpu", [&] {
    const at::Tensor s = scale.to(input.scalar_type()).contiguous(), b = bias.to(input.scalar_type()).contiguous();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scale_bias_relu_unit<scalar_t>(op + i * HW, xp + i * HW, HW, sp[i % C], bp[i % C]);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(asl, CPU, m) {
  m.impl("shift_conv1x1", &shift_conv1x1_cpu);
  m.impl("scale_bias_relu", &scale_bias_relu_cpu);
  m.impl("conv1x1", &conv1x1_cpu);
  m.impl("active_shift", &active_shift_cpu);
  m.impl("active_shift_grad_input", &active_shift_grad_input_cpu);
  m.impl("active_shift_grad_shift", &active_shift_grad_shift_cpu);
}

}  // namespace asl
