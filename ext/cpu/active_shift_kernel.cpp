// CPU kernels of the active shift operator. Work is split over (n, c) planes; within a plane the
// shift is constant, so every output row blends two input rows with fixed weights and the
// interior of a row is a branch-free loop the compiler vectorizes (AVX2: 512-bit loads at the
// one-element offset split every cache line and measured slower). channels_last has kernels of its
// own with the channels innermost; only its input gradient at stride > 1 walks the planes with
// their strides.
#include "plane_sampling.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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
    for_each_output_plane(yp, out, shifts, [&](int64_t n, int64_t c, const ChannelShift<acc_t>& s, Plane<scalar_t> dst) {
      sample_plane<scalar_t, acc_t>(plane(xp, input, n, c), dst, stride[0], stride[1], s.dr - padding[0],
                                    s.dc - padding[1], acc_t(1) - s.fr, s.fr, acc_t(1) - s.fc, s.fc);
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
    for_each_output_plane(op, gx, shifts, [&](int64_t n, int64_t c, const ChannelShift<acc_t>& s, Plane<scalar_t> dst) {
      if (s1) {
        // Transposed sampling at stride 1 is sampling at the mirrored shift.
        sample_plane<scalar_t, acc_t>(plane(gp, grad, n, c), dst, 1, 1, padding[0] - s.dr - 1,
                                      padding[1] - s.dc - 1, s.fr, acc_t(1) - s.fr, s.fc,
                                      acc_t(1) - s.fc);
      } else {
        grad_input_plane<scalar_t, acc_t>(plane(gp, grad, n, c), dst, s, stride, padding);
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
      for_each_plane(N, C, g.Ho * g.Wo, [&](int64_t n, int64_t c) {
        const auto& s = shifts[c];
        double* out2 = &partial[2 * (n * C + c)];
        if (!s.finite) {
          out2[0] = out2[1] = std::numeric_limits<double>::quiet_NaN();
          return;
        }
        grad_shift_plane<scalar_t, acc_t>(plane(gp, grad, n, c), plane(xp, input, n, c), s, stride, padding, out2);
      });
    });
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < 2 * C; ++k) tp[k] += partial[n * 2 * C + k];
  return total.to(shift.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(asl, CPU, m) {
  m.impl("active_shift", &active_shift_cpu);
  m.impl("active_shift_grad_input", &active_shift_grad_input_cpu);
  m.impl("active_shift_grad_shift", &active_shift_grad_shift_cpu);
}

}  // namespace asl
