// CPU kernels of the active shift operator. Work is split over (n, c) planes; within a plane the
// shift is constant, so every output row blends two input rows with fixed weights and the
// interior of a row is a branch-free loop the compiler vectorizes (AVX2: 512-bit loads at the
// one-element offset split every cache line and measured slower). channels_last images are
// transposed to planes in cache and back (see transpose). The backward kernel computes both
// gradients in one pass.
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

// Input gradient when both strides are >= 2: the taps of different outputs never share an input
// element (rows p*s + off and p*s + off + 1 are distinct for distinct p), so every input element
// gets at most one term and the gradient is a plain scatter into a zeroed plane.
template <typename T, typename acc_t>
void scatter_input_grad_plane(Plane<const T> g, Plane<T> gx, const ChannelShift<acc_t>& s, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  for (int64_t r = 0; r < gx.H; ++r)
    for (int64_t c = 0; c < gx.W; ++c) gx.p[r * gx.sH + c * gx.sW] = T(0);
  const int64_t off_r = s.dr - padding[0], off_c = s.dc - padding[1], sr = stride[0], sc = stride[1];
  const acc_t wr[2] = {acc_t(1) - s.fr, s.fr}, wc[2] = {acc_t(1) - s.fc, s.fc};
  const Range cols = both_taps_inside(off_c, sc, gx.W, g.W);
  for (int64_t p = 0; p < g.H; ++p) {
    const T* grow = g.p + p * g.sH;
    for (int k = 0; k < 2; ++k) {
      T* o = gx.row(p * sr + off_r + k);
      if (!o) continue;
      const acc_t w0 = wr[k] * wc[0], w1 = wr[k] * wc[1];
      auto one = [&](int64_t q) {
        const int64_t c = q * sc + off_c;
        const acc_t v = static_cast<acc_t>(grow[q * g.sW]);
        if (c >= 0 && c < gx.W) o[c * gx.sW] = static_cast<T>(w0 * v);
        if (c + 1 >= 0 && c + 1 < gx.W) o[(c + 1) * gx.sW] = static_cast<T>(w1 * v);
      };
      for (int64_t q = 0; q < cols.lo; ++q) one(q);
      for (int64_t q = cols.lo; q < cols.hi; ++q) {  // both columns inside
        const int64_t c = q * sc + off_c;
        const acc_t v = static_cast<acc_t>(grow[q * g.sW]);
        o[c * gx.sW] = static_cast<T>(w0 * v);
        o[(c + 1) * gx.sW] = static_cast<T>(w1 * v);
      }
      for (int64_t q = cols.hi; q < g.W; ++q) one(q);
    }
  }
}

// One plane of the input gradient.
template <typename T, typename acc_t>
void input_grad_plane(Plane<const T> g, Plane<T> gx, const ChannelShift<acc_t>& s, at::IntArrayRef stride,
                      at::IntArrayRef padding) {
  if (!s.finite) return fill_nan(gx);
  if (stride[0] >= 2 && stride[1] >= 2) return scatter_input_grad_plane<T, acc_t>(g, gx, s, stride, padding);
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
// gathers at per-channel offsets, the alternative) to 21 and 56 ms.

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

// Calls fn(n, buffers) for every image n, in parallel over images; `buffers` holds one
// (C, H, W)-sized scratch array per entry of `sizes`, kept for the task's images.
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
    const auto shifts = channel_shifts<acc_t>(shift, g.limit);
    const T* xp = input.const_data_ptr<T>();
    T* yp = out.data_ptr<T>();
    if (!g.channels_last) {
      for_each_plane(N, C, Po, [&](int64_t n, int64_t c) {
        forward_plane<T, acc_t>(plane(xp, input, n, c), plane(yp, out, n, c), shifts[c], stride, padding);
      });
      return;
    }
    for_each_image<T>(N, std::array<int64_t, 2>{C * ld(P), C * ld(Po)}, [&](int64_t n, const std::array<T*, 2>& buf) {
      transpose<T>(xp + n * C * P, P, C, C, buf[0], ld(P));
      for (int64_t c = 0; c < C; ++c) {
        forward_plane<T, acc_t>(buffer_plane<const T>(buf[0], c, g.H, g.W), buffer_plane(buf[1], c, g.Ho, g.Wo),
                                shifts[c], stride, padding);
      }
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
      const auto shifts = channel_shifts<acc_t>(shift, g.limit);
      const T* gp = grad.const_data_ptr<T>();
      const T* xp = input.const_data_ptr<T>();
      T* op_ = want_input ? gx.data_ptr<T>() : nullptr;
      if (!g.channels_last) {
        for_each_plane(N, C, Po, [&](int64_t n, int64_t c) {
          if (want_input) input_grad_plane<T, acc_t>(plane(gp, grad, n, c), plane(op_, gx, n, c), shifts[c], stride, padding);
          if (want_shift)
            shift_grad_plane<T, acc_t>(plane(gp, grad, n, c), plane(xp, input, n, c), shifts[c], stride, padding,
                                       &partial[2 * (n * C + c)]);
        });
        return;
      }
      const std::array<int64_t, 3> sizes{C * ld(Po), want_shift ? C * ld(P) : 0, want_input ? C * ld(P) : 0};
      for_each_image<T>(N, sizes, [&](int64_t n, const std::array<T*, 3>& buf) {
        transpose<T>(gp + n * C * Po, Po, C, C, buf[0], ld(Po));
        if (want_shift) transpose<T>(xp + n * C * P, P, C, C, buf[1], ld(P));
        for (int64_t c = 0; c < C; ++c) {
          const Plane<const T> gc = buffer_plane<const T>(buf[0], c, g.Ho, g.Wo);
          if (want_input) input_grad_plane<T, acc_t>(gc, buffer_plane(buf[2], c, g.H, g.W), shifts[c], stride, padding);
          if (want_shift)
            shift_grad_plane<T, acc_t>(gc, buffer_plane<const T>(buf[1], c, g.H, g.W), shifts[c], stride, padding,
                                       &partial[2 * (n * C + c)]);
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
