// CPU kernels of the fused inference operators: shift_conv1x1 (the active shift, then a 1x1
// convolution, without writing the shifted tensor), conv1x1 (with a pre-activation BatchNorm-ReLU
// applied in cache) and scale_bias_relu (an evaluation-mode BatchNorm and its ReLU in one pass).
#include "gemm_avx512.h"
#include "plane_sampling.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace asl {
namespace {

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
    for_each_plane(N, C, HW, [&](int64_t n, int64_t c) {
      const int64_t i = n * C + c;
      scale_bias_relu_unit<scalar_t>(op + i * HW, xp + i * HW, HW, sp[c], bp[c]);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(asl, CPU, m) {
  m.impl("shift_conv1x1", &shift_conv1x1_cpu);
  m.impl("scale_bias_relu", &scale_bias_relu_cpu);
  m.impl("conv1x1", &conv1x1_cpu);
}

}  // namespace asl
