// CPU kernels of the active shift operator. Work is split over (n, c) planes; within a plane the
// shift is constant, so every output row blends two input rows with fixed weights in a
// branch-free loop the compiler vectorizes (AVX2: 512-bit loads at the one-element offset split
// every cache line and measured slower). Each plane is first copied (NCHW) or transposed
// (channels_last) into a scratch plane with zero borders, so that rows need no edge cases (see
// Padded). The backward kernel computes both gradients in one pass.
#include "plane_sampling.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace asl {
namespace {

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
  thread_local std::vector<Taps> cols;  // reused: no allocation per plane (CIFAR's planes are 64 pixels)
  cols.resize(static_cast<size_t>(gx.W));
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

// The same at a column stride sw > 1 (taps a[i * sw] and a[i * sw + 1]).
template <typename T, typename acc_t>
ASL_MULTIVERSION void shift_grad_strided(const T* __restrict__ g, const T* __restrict__ a, const T* __restrict__ b,
                                         int64_t n, int64_t sw, acc_t fr, acc_t fc, acc_t* ra, acc_t* rb) {
  acc_t sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v00 = static_cast<acc_t>(a[i * sw]), v01 = static_cast<acc_t>(a[i * sw + 1]);
    const acc_t v10 = static_cast<acc_t>(b[i * sw]), v11 = static_cast<acc_t>(b[i * sw + 1]);
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
  // Stride 1 over whole contiguous planes of one width: the rows whose taps are all inside are
  // summed as one flat run (long vector loops rather than one short loop per row), from the first
  // row's first inside column to the last row's last; the columns in between whose taps wrapped
  // into a neighbouring row are then taken out again, and every row's edge columns are added below.
  const Range rows = both_taps_inside(s.dr - padding[0], 1, x.H, g.H);
  const bool flat = unit && stride[0] == 1 && g.W == x.W && g.sH == g.W && x.sH == x.W && rows.hi > rows.lo &&
                    q_hi > q_lo;
  if (flat) {
    const int64_t W = g.W, xoff = (s.dr - padding[0]) * W + off_c;  // x's flat index of g's element e: e + xoff
    const int64_t first = rows.lo * W + q_lo, last = (rows.hi - 1) * W + q_hi;
    for (int64_t e = first; e < last; e += 256) {  // chunks summed in double
      acc_t ra = 0, rb = 0;
      const T* a = x.p + e + xoff;
      shift_grad_unit<T, acc_t>(g.p + e, a, a + W, std::min<int64_t>(256, last - e), fr, fc, &ra, &rb);
      da += ra;
      db += rb;
    }
    auto wrapped = [&](int64_t e) {  // the flat run's term at element e (taps read across a row end)
      const T* a = x.p + e + xoff;
      const acc_t gv = static_cast<acc_t>(g.p[e]);
      const acc_t v00 = static_cast<acc_t>(a[0]), v01 = static_cast<acc_t>(a[1]);
      const acc_t v10 = static_cast<acc_t>(a[W]), v11 = static_cast<acc_t>(a[W + 1]);
      da -= static_cast<double>(gv * d_alpha(v00, v01, v10, v11, fr));
      db -= static_cast<double>(gv * d_beta(v00, v01, v10, v11, fc));
    };
    for (int64_t p = rows.lo; p < rows.hi; ++p) {
      if (p + 1 < rows.hi)
        for (int64_t q = q_hi; q < W; ++q) wrapped(p * W + q);
      if (p > rows.lo)
        for (int64_t q = 0; q < q_lo; ++q) wrapped(p * W + q);
    }
  }
  for (int64_t p = 0; p < g.H; ++p) {
    const int64_t r = p * stride[0] - padding[0] + s.dr;
    const T* a = x.row(r);
    const T* b = x.row(r + 1);
    if (!a && !b) continue;
    const T* grow = g.p + p * g.sH;
    const bool in_flat = flat && p >= rows.lo && p < rows.hi;
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
    if (in_flat) {
      // the inside columns are in the flat run
    } else if (unit && a && b && q_hi > q_lo) {
      const int64_t c0 = q_lo + off_c;
      shift_grad_unit<T, acc_t>(grow + q_lo, a + c0, b + c0, q_hi - q_lo, fr, fc, &ra, &rb);
    } else if (x.sW == 1 && g.sW == 1 && a && b && q_hi > q_lo) {
      const int64_t c0 = q_lo * sw + off_c;
      shift_grad_strided<T, acc_t>(grow + q_lo, a + c0, b + c0, q_hi - q_lo, sw, fr, fc, &ra, &rb);
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

// One output plane of the forward pass.
template <typename T, typename acc_t>
void forward_plane(Plane<const T> x, Plane<T> y, const ChannelShift<acc_t>& s, at::IntArrayRef stride,
                   at::IntArrayRef padding) {
  if (!s.finite) return fill_nan(y);
  sample_plane<T, acc_t>(x, y, stride[0], stride[1], s.dr - padding[0], s.dc - padding[1], acc_t(1) - s.fr, s.fr,
                         acc_t(1) - s.fc, s.fc);
}

// o[2i] = w0 g[i], o[2i + 1] = w1 g[i]: a row of the input gradient at column stride 2.
template <typename T, typename acc_t>
ASL_MULTIVERSION void interleave_unit(T* __restrict o, const T* __restrict g, int64_t n, acc_t w0, acc_t w1) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(g[i]);
    o[2 * i] = static_cast<T>(w0 * v);
    o[2 * i + 1] = static_cast<T>(w1 * v);
  }
}

// Input gradient when both strides are >= 2: the taps of different outputs never share an input
// element (rows p*s + off and p*s + off + 1 are distinct for distinct p), so every input element
// takes at most one term, from output p = floor((r - off) / s) when r - off - p*s is 0 or 1. Each
// element is written once; at column stride 2 the interior of a row is one vectorized loop.
template <typename T, typename acc_t>
void strided_input_grad_plane(Plane<const T> g, Plane<T> gx, const ChannelShift<acc_t>& s, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  const int64_t off_r = s.dr - padding[0], off_c = s.dc - padding[1], sr = stride[0], sc = stride[1];
  const acc_t wr[2] = {acc_t(1) - s.fr, s.fr}, wc[2] = {acc_t(1) - s.fc, s.fc};
  const Range cols = both_taps_inside(off_c, sc, gx.W, g.W);
  const bool interleave = sc == 2 && gx.sW == 1 && g.sW == 1 && cols.hi > cols.lo;
  const int64_t c_lo = interleave ? cols.lo * 2 + off_c : gx.W, c_hi = interleave ? cols.hi * 2 + off_c : gx.W;
  for (int64_t r = 0; r < gx.H; ++r) {
    T* o = gx.p + r * gx.sH;
    const int64_t p = floor_div(r - off_r, sr), k = r - off_r - p * sr;
    if (k > 1 || p < 0 || p >= g.H) {
      for (int64_t c = 0; c < gx.W; ++c) o[c * gx.sW] = T(0);
      continue;
    }
    const T* grow = g.p + p * g.sH;
    auto one = [&](int64_t c) {
      const int64_t q = floor_div(c - off_c, sc), l = c - off_c - q * sc;
      const bool in = l <= 1 && q >= 0 && q < g.W;
      o[c * gx.sW] = in ? static_cast<T>(wr[k] * wc[l] * static_cast<acc_t>(grow[q * g.sW])) : T(0);
    };
    for (int64_t c = 0; c < c_lo; ++c) one(c);
    if (interleave) interleave_unit<T, acc_t>(o + c_lo, grow + cols.lo, cols.hi - cols.lo, wr[k] * wc[0], wr[k] * wc[1]);
    for (int64_t c = c_hi; c < gx.W; ++c) one(c);
  }
}

// One plane of the input gradient.
template <typename T, typename acc_t>
void input_grad_plane(Plane<const T> g, Plane<T> gx, const ChannelShift<acc_t>& s, at::IntArrayRef stride,
                      at::IntArrayRef padding) {
  if (!s.finite) return fill_nan(gx);
  if (stride[0] >= 2 && stride[1] >= 2) return strided_input_grad_plane<T, acc_t>(g, gx, s, stride, padding);
  if (stride[0] == 1 && stride[1] == 1) {
    // Transposed sampling at stride 1 is sampling at the mirrored shift.
    sample_plane<T, acc_t>(g, gx, 1, 1, padding[0] - s.dr - 1, padding[1] - s.dc - 1, s.fr, acc_t(1) - s.fr, s.fc,
                           acc_t(1) - s.fc);
  } else {
    grad_input_plane<T, acc_t>(g, gx, s, stride, padding);
  }
}

// One plane's share of the shift gradient (NaN for a channel with a non-finite shift).
template <typename T, typename acc_t>
void shift_grad_plane(Plane<const T> g, Plane<const T> x, const ChannelShift<acc_t>& s, at::IntArrayRef stride,
                      at::IntArrayRef padding, double* out2) {
  if (!s.finite) {
    out2[0] = out2[1] = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  grad_shift_plane<T, acc_t>(g, x, s, stride, padding, out2);
}

// channels_last images go through the plane kernels too: each image is transposed to (C, H, W)
// planes in a per-thread buffer (tens of KiB for CIFAR-sized layers, so it stays in cache), the
// planes are processed as for NCHW, and results are transposed back. In a profile of asnet20_16x1's
// training step this took the shift's forward and backward from 31 and 89 ms a step (per-channel
// gathers at per-channel offsets, the alternative) to 21 and 56 ms. Zero-bordered scratch planes
// (and the shift gradient's flat runs) then took them from 20 and 41 to 13 and 28 ms a step (one
// thread; each op timed inside the step, in a faster phase of the same machine).

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

// The distance between planes in a buffer of P-pixel planes: P plus 16 elements, so that the
// rows of an 8 x 8 block are not a multiple of 4 KiB apart (4 KiB aliasing: loads that look like
// they depend on earlier stores to an address 4 KiB away wait for them).
inline int64_t ld(int64_t P) { return P + 16; }

// Plane c of a buffer of planes of H x W.
template <typename T>
Plane<T> buffer_plane(T* base, int64_t c, int64_t H, int64_t W) {
  return Plane<T>{base + c * ld(H * W), H, W, W, 1};
}

// Zero-bordered planes. Each plane is copied (NCHW) or transposed (channels_last) into a scratch
// plane whose borders are zeros wide enough for every tap of every channel whose shift reaches at
// most kMaxReach pixels outside; those channels are then blended by branch-free loops over whole
// rows with no edge cases (one call per plane: on CIFAR's 8 x 8 and 16 x 16 planes the per-plane
// and per-edge work of the bounds-checked kernels cost more than the blending). Channels that
// reach further (or are not finite) take the bounds-checked kernels on the same scratch plane,
// so both memory formats give the same result bit for bit.
constexpr int64_t kMaxReach = 8;

// How far the taps i * stride + off + {0, 1}, i in [0, out_len), fall below 0 and beyond src_len.
inline std::pair<int64_t, int64_t> reach(int64_t off, int64_t stride, int64_t src_len, int64_t out_len) {
  return {std::max<int64_t>(0, -off), std::max<int64_t>(0, (out_len - 1) * stride + off + 2 - src_len)};
}

// Scratch planes of H x W with borders, one every `ld` elements, and the channels they serve.
struct Padded {
  int64_t H = 0, W = 0, top = 0, left = 0, rows = 0, Wp = 0, ld = 0;  // rows, Wp: with the borders
  std::vector<char> ok;  // per channel: every tap lies inside the borders
  // Widens the right border to a row pitch of Wp (never narrower) and sets the plane distance.
  void set_pitch(int64_t pitch) {
    Wp = std::max(Wp, pitch);
    ld = rows * Wp + 16;  // + 16: see ld()
    if (ld % 1024 == 0) ld += 16;
  }
  int64_t origin(int64_t c) const { return c * ld + top * Wp + left; }  // plane c's element (0, 0)
  template <typename T>
  Plane<const T> view(const T* origin) const {
    return Plane<const T>{origin, H, W, Wp, 1};
  }
};

// Borders for sampling source planes of H x W at stride (s_r, s_c) into outputs of Ho x Wo, with
// channel c's taps starting at offset(c) = {row, column}; plan=false: no borders, no channel served.
template <typename acc_t, typename OffsetFn>
Padded plan_padding(const std::vector<ChannelShift<acc_t>>& shifts, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                    int64_t s_r, int64_t s_c, const OffsetFn& offset, bool plan = true) {
  Padded L;
  L.H = H;
  L.W = W;
  L.ok.assign(shifts.size(), 0);
  int64_t bottom = 0, right = 0;
  for (size_t c = 0; plan && c < shifts.size(); ++c) {
    if (!shifts[c].finite) continue;
    const auto [off_r, off_c] = offset(shifts[c]);
    const auto [t, b] = reach(off_r, s_r, H, Ho);
    const auto [l, r] = reach(off_c, s_c, W, Wo);
    if (std::max({t, b, l, r}) > kMaxReach) continue;
    L.ok[c] = 1;
    L.top = std::max(L.top, t);
    bottom = std::max(bottom, b);
    L.left = std::max(L.left, l);
    right = std::max(right, r);
  }
  L.rows = L.top + H + bottom;
  L.set_pitch(L.left + W + right);
  return L;
}

// out[p, q] = wr0 (wc0 a[q s_c] + wc1 a[q s_c + 1]) + wr1 (wc0 b[q s_c] + wc1 b[q s_c + 1]) with
// a = src + p s_r sH and b = a + sH, for a source whose taps are all in memory (zero borders).
// At stride 1 each source row is blended horizontally once (h holds the previous row's blend).
template <typename T, typename acc_t>
ASL_MULTIVERSION void blend_padded(const T* __restrict src, int64_t sH, T* __restrict out, int64_t oH, int64_t Ho,
                                   int64_t Wo, int64_t s_r, int64_t s_c, acc_t wr0, acc_t wr1, acc_t wc0, acc_t wc1,
                                   acc_t* __restrict h) {
  if (s_r == 1 && s_c == 1) {
    for (int64_t q = 0; q < Wo; ++q) h[q] = wc0 * static_cast<acc_t>(src[q]) + wc1 * static_cast<acc_t>(src[q + 1]);
    for (int64_t p = 0; p < Ho; ++p) {
      const T* b = src + (p + 1) * sH;
      T* o = out + p * oH;
      for (int64_t q = 0; q < Wo; ++q) {
        const acc_t hb = wc0 * static_cast<acc_t>(b[q]) + wc1 * static_cast<acc_t>(b[q + 1]);
        o[q] = static_cast<T>(wr0 * h[q] + wr1 * hb);
        h[q] = hb;
      }
    }
    return;
  }
  auto row = [&](const T* a, const T* b, T* o, auto sc) __attribute__((always_inline)) {
    for (int64_t q = 0; q < Wo; ++q) {
      const int64_t i = q * sc;
      o[q] = static_cast<T>(wr0 * (wc0 * static_cast<acc_t>(a[i]) + wc1 * static_cast<acc_t>(a[i + 1])) +
                            wr1 * (wc0 * static_cast<acc_t>(b[i]) + wc1 * static_cast<acc_t>(b[i + 1])));
    }
  };
  for (int64_t p = 0; p < Ho; ++p) {
    const T* a = src + p * s_r * sH;
    if (s_c == 1) row(a, a + sH, out + p * oH, std::integral_constant<int64_t, 1>());
    else if (s_c == 2) row(a, a + sH, out + p * oH, std::integral_constant<int64_t, 2>());
    else row(a, a + sH, out + p * oH, s_c);
  }
}

// grad_shift_plane for a source whose taps are all in memory: x points at the taps of output
// (0, 0). Row sums in opmath, the plane's sum in double.
template <typename T, typename acc_t>
ASL_MULTIVERSION void shift_grad_padded(const T* __restrict g, int64_t gH, int64_t Ho, int64_t Wo,
                                        const T* __restrict x, int64_t sH, int64_t s_r, int64_t s_c, acc_t fr,
                                        acc_t fc, double* out2) {
  double da = 0, db = 0;
  if (s_r == 1 && s_c == 1 && gH == sH) {
    // One flat run over the rows at their common pitch (long vector loops instead of one short
    // loop per row): grad_output's border columns are zeros, so the terms between rows vanish.
    const int64_t n = (Ho - 1) * sH + Wo;
    for (int64_t e0 = 0; e0 < n; e0 += 256) {  // chunks summed in opmath, then in double
      const int64_t m = std::min<int64_t>(256, n - e0);
      acc_t sa = 0, sb = 0;
      shift_grad_unit(g + e0, x + e0, x + e0 + sH, m, fr, fc, &sa, &sb);
      da += sa;
      db += sb;
    }
    out2[0] = da;
    out2[1] = db;
    return;
  }
  auto row = [&](const T* gr, const T* a, const T* b, auto sc) __attribute__((always_inline)) {
    acc_t sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
    for (int64_t q = 0; q < Wo; ++q) {
      const int64_t i = q * sc;
      const acc_t v00 = static_cast<acc_t>(a[i]), v01 = static_cast<acc_t>(a[i + 1]);
      const acc_t v10 = static_cast<acc_t>(b[i]), v11 = static_cast<acc_t>(b[i + 1]);
      const acc_t gv = static_cast<acc_t>(gr[q]);
      sa += gv * d_alpha(v00, v01, v10, v11, fr);
      sb += gv * d_beta(v00, v01, v10, v11, fc);
    }
    da += sa;
    db += sb;
  };
  for (int64_t p = 0; p < Ho; ++p) {
    const T* a = x + p * s_r * sH;
    if (s_c == 1) row(g + p * gH, a, a + sH, std::integral_constant<int64_t, 1>());
    else if (s_c == 2) row(g + p * gH, a, a + sH, std::integral_constant<int64_t, 2>());
    else row(g + p * gH, a, a + sH, s_c);
  }
  out2[0] = da;
  out2[1] = db;
}

// Fills the interiors of scratch planes: one NCHW plane (rows of W), or one channels_last image
// (H x W pixels of C channels) transposed row by row into its C planes.
template <typename T>
void copy_into(const T* src, T* origin, const Padded& L) {
  for (int64_t r = 0; r < L.H; ++r) std::copy(src + r * L.W, src + (r + 1) * L.W, origin + r * L.Wp);
}
template <typename T>
void transpose_into(const T* src, int64_t C, T* base, const Padded& L) {
  for (int64_t r = 0; r < L.H; ++r) transpose<T>(src + r * L.W * C, L.W, C, C, base + L.origin(0) + r * L.Wp, L.ld);
}

// Calls fn(n, buffers) for every image n, in parallel over images; `buffers` holds one zeroed
// scratch array per entry of `sizes`, kept for the task's images (borders stay zero: only the
// interiors are ever written).
template <typename T, size_t K, typename Fn>
void for_each_image(int64_t N, const std::array<int64_t, K>& sizes, const Fn& fn) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::array<std::vector<T>, K> store;
    std::array<T*, K> buffers;
    for (size_t k = 0; k < K; ++k) {
      store[k].resize(static_cast<size_t>(sizes[k]));
      buffers[k] = store[k].data();
    }
    for (int64_t n = begin; n < end; ++n) fn(n, buffers);
  });
}

// The same for every (n, c) plane, in tasks of about 32k output elements.
template <typename T, size_t K, typename Fn>
void for_each_plane_buffered(int64_t N, int64_t C, int64_t plane_elems, const std::array<int64_t, K>& sizes,
                             const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane_elems));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    std::array<std::vector<T>, K> store;
    std::array<T*, K> buffers;
    for (size_t k = 0; k < K; ++k) {
      store[k].resize(static_cast<size_t>(sizes[k]));
      buffers[k] = store[k].data();
    }
    for (int64_t i = begin; i < end; ++i) fn(i / C, i % C, buffers);
  });
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
    using acc_t = at::opmath_type<T>;
    static_assert(std::is_same_v<T, acc_t>, "scratch rows are held in T buffers");
    const auto shifts = channel_shifts<acc_t>(shift, g.limit);
    const Padded X = plan_padding(shifts, g.H, g.W, g.Ho, g.Wo, g.sh, g.sw, [&](const ChannelShift<acc_t>& s) {
      return std::pair<int64_t, int64_t>{s.dr - g.ph, s.dc - g.pw};
    });
    const T* xp = input.const_data_ptr<T>();
    T* yp = out.data_ptr<T>();
    // Channel c of one image, from its scratch plane (element (0, 0) at xo) into y.
    auto channel = [&](int64_t c, const T* xo, Plane<T> y, acc_t* h) {
      const ChannelShift<acc_t>& s = shifts[c];
      if (!X.ok[c]) return forward_plane<T, acc_t>(X.view(xo), y, s, stride, padding);
      blend_padded<T, acc_t>(xo + (s.dr - g.ph) * X.Wp + (s.dc - g.pw), X.Wp, y.p, y.sH, g.Ho, g.Wo, g.sh, g.sw,
                             acc_t(1) - s.fr, s.fr, acc_t(1) - s.fc, s.fc, h);
    };
    if (!g.channels_last) {
      for_each_plane_buffered<T>(N, C, Po, std::array<int64_t, 2>{X.ld, g.Wo}, [&](int64_t n, int64_t c, const auto& buf) {
        T* xo = buf[0] + X.origin(0);
        copy_into(xp + (n * C + c) * P, xo, X);
        channel(c, xo, plane(yp, out, n, c), buf[1]);
      });
      return;
    }
    for_each_image<T>(N, std::array<int64_t, 3>{C * X.ld, C * ld(Po), g.Wo}, [&](int64_t n, const auto& buf) {
      transpose_into(xp + n * C * P, C, buf[0], X);
      for (int64_t c = 0; c < C; ++c) channel(c, buf[0] + X.origin(c), buffer_plane(buf[1], c, g.Ho, g.Wo), buf[2]);
      transpose<T>(buf[1], C, Po, ld(Po), yp + n * C * Po, C);
    });
  });
  return out;
}

// Both gradients, or one of them (the other comes back undefined), in one pass over grad_output
// and input: each plane's input gradient and shift-gradient sums are computed while the plane is
// in cache. The shift gradient is summed per (image, channel) and then over images in a fixed
// order, so it does not depend on the number of threads or on the memory format.
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
  std::vector<double> partial(want_shift ? static_cast<size_t>(N * C * 2) : 0, 0.0);
  if (grad.numel() > 0 && input.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "active_shift_backward_cpu", [&] {
      using T = scalar_t;
      using acc_t = at::opmath_type<T>;
      static_assert(std::is_same_v<T, acc_t>, "scratch rows are held in T buffers");
      const auto shifts = channel_shifts<acc_t>(shift, g.limit);
      // input's planes, for the shift gradient: sampled as in the forward pass
      Padded X = plan_padding(shifts, g.H, g.W, g.Ho, g.Wo, g.sh, g.sw, [&](const ChannelShift<acc_t>& s) {
        return std::pair<int64_t, int64_t>{s.dr - g.ph, s.dc - g.pw};
      }, want_shift);
      // grad_output's planes: at stride 1 the input gradient samples them at the mirrored shift.
      // Planned for the shift gradient alone too: its flat runs' sums depend on the row pitch, and
      // the same pitch gives active_shift_grad_shift the bits of active_shift_backward.
      const bool unit = g.sh == 1 && g.sw == 1;
      Padded G = plan_padding(shifts, g.Ho, g.Wo, g.H, g.W, 1, 1, [&](const ChannelShift<acc_t>& s) {
        return std::pair<int64_t, int64_t>{g.ph - s.dr - 1, g.pw - s.dc - 1};
      }, unit);
      if (want_shift && unit) {  // one row pitch for both: the shift gradient's flat runs
        G.set_pitch(X.Wp);
        X.set_pitch(G.Wp);
      }
      const T* gp = grad.const_data_ptr<T>();
      const T* xp = input.const_data_ptr<T>();
      T* op_ = want_input ? gx.data_ptr<T>() : nullptr;
      // Channel c of image n, from the scratch planes of grad_output (go) and input (xo).
      auto channel = [&](int64_t n, int64_t c, const T* go, const T* xo, Plane<T> gxc, acc_t* h) {
        const ChannelShift<acc_t>& s = shifts[c];
        if (want_input && G.ok[c]) {
          blend_padded<T, acc_t>(go + (g.ph - s.dr - 1) * G.Wp + (g.pw - s.dc - 1), G.Wp, gxc.p, gxc.sH, g.H, g.W, 1,
                                 1, s.fr, acc_t(1) - s.fr, s.fc, acc_t(1) - s.fc, h);
        } else if (want_input) {
          input_grad_plane<T, acc_t>(G.view(go), gxc, s, stride, padding);
        }
        if (!want_shift) return;
        double* out2 = &partial[2 * (n * C + c)];
        if (X.ok[c]) {
          shift_grad_padded<T, acc_t>(go, G.Wp, g.Ho, g.Wo, xo + (s.dr - g.ph) * X.Wp + (s.dc - g.pw), X.Wp, g.sh,
                                      g.sw, s.fr, s.fc, out2);
        } else {
          shift_grad_plane<T, acc_t>(G.view(go), X.view(xo), s, stride, padding, out2);
        }
      };
      const int64_t hsize = std::max(g.W, g.Wo);
      if (!g.channels_last) {
        const std::array<int64_t, 3> sizes{G.ld, want_shift ? X.ld : 0, hsize};
        for_each_plane_buffered<T>(N, C, Po, sizes, [&](int64_t n, int64_t c, const auto& buf) {
          T* go = buf[0] + G.origin(0);
          copy_into(gp + (n * C + c) * Po, go, G);
          T* xo = want_shift ? buf[1] + X.origin(0) : nullptr;
          if (want_shift) copy_into(xp + (n * C + c) * P, xo, X);
          channel(n, c, go, xo, want_input ? plane(op_, gx, n, c) : Plane<T>{}, buf[2]);
        });
        return;
      }
      const std::array<int64_t, 4> sizes{C * G.ld, want_shift ? C * X.ld : 0, want_input ? C * ld(P) : 0, hsize};
      for_each_image<T>(N, sizes, [&](int64_t n, const auto& buf) {
        transpose_into(gp + n * C * Po, C, buf[0], G);
        if (want_shift) transpose_into(xp + n * C * P, C, buf[1], X);
        for (int64_t c = 0; c < C; ++c) {
          channel(n, c, buf[0] + G.origin(c), want_shift ? buf[1] + X.origin(c) : nullptr,
                  want_input ? buffer_plane(buf[2], c, g.H, g.W) : Plane<T>{}, buf[3]);
        }
        if (want_input) transpose<T>(buf[2], C, P, ld(P), op_ + n * C * P, C);
      });
    });
  } else if (want_input) {
    gx.zero_();
  }
  at::Tensor gs;
  if (want_shift) {
    at::Tensor total = at::zeros({C, 2}, shift.options().dtype(at::kDouble));
    double* tp = total.data_ptr<double>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < 2 * C; ++k) tp[k] += partial[n * 2 * C + k];
    gs = total.to(shift.scalar_type());
  }
  return {gx, gs};
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

}  // namespace

TORCH_LIBRARY_IMPL(asl, CPU, m) {
  m.impl("active_shift", &active_shift_cpu);
  m.impl("active_shift_grad_input", &active_shift_grad_input_cpu);
  m.impl("active_shift_grad_shift", &active_shift_grad_shift_cpu);
  m.impl("active_shift_backward", &active_shift_backward_cpu);
}

}  // namespace asl
