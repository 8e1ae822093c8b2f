// CUDA kernels of the active shift operator. General kernels: one thread per element, threads
// ordered like the tensor's memory (NCHW or channels_last) so that writes are coalesced. Fast
// paths: NCHW stride 1 with 16-byte chunks per thread, and channels_last kernels of their own
// (forward: a block per output row; backward at stride 1: one pass writing grad_input and the
// shift gradient's partial sums). Half and bfloat16 inputs are computed in float32; every shift
// gradient is a two-stage, fixed-order (deterministic) reduction.
#include "../active_shift.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <initializer_list>
#include <type_traits>

namespace asl {
namespace {

constexpr int kThreads = 256;

// Sizes in the kernels' index type: 32-bit whenever the tensors allow (64-bit integer division
// is several times slower on GPUs), 64-bit otherwise.
template <typename index_t>
struct Geom {
  index_t N, C, H, W, Ho, Wo, sh, sw, ph, pw;
  explicit Geom(const Geometry& g)
      : N(g.N), C(g.C), H(g.H), W(g.W), Ho(g.Ho), Wo(g.Wo), sh(g.sh), sw(g.sw), ph(g.ph), pw(g.pw) {}
};

// Element offset of (n, c, r, col) in a dense NCHW or channels_last tensor of spatial size HxW.
template <bool CL, typename index_t>
__device__ __forceinline__ index_t offset(index_t n, index_t c, index_t r, index_t col, index_t C,
                                          index_t H, index_t W) {
  return CL ? ((n * H + r) * W + col) * C + c : ((n * C + c) * H + r) * W + col;
}

// Splits a linear index in memory order into (n, c, r, col).
template <bool CL, typename index_t>
__device__ __forceinline__ void split(index_t idx, index_t C, index_t H, index_t W, index_t& n,
                                      index_t& c, index_t& r, index_t& col) {
  if (CL) {
    c = idx % C;
    idx /= C;
    col = idx % W;
    idx /= W;
    r = idx % H;
    n = idx / H;
  } else {
    col = idx % W;
    idx /= W;
    r = idx % H;
    idx /= H;
    c = idx % C;
    n = idx / C;
  }
}

template <typename scalar_t, typename acc_t, bool CL, typename index_t>
struct Taps4 {
  acc_t v00, v01, v10, v11;
  __device__ __forceinline__ Taps4(const scalar_t* __restrict__ x, index_t n, index_t c, index_t r,
                                   index_t col, const Geom<index_t>& g) {
    const bool r0 = r >= 0 && r < g.H, r1 = r + 1 >= 0 && r + 1 < g.H;
    const bool c0 = col >= 0 && col < g.W, c1 = col + 1 >= 0 && col + 1 < g.W;
    v00 = (r0 && c0) ? static_cast<acc_t>(x[offset<CL, index_t>(n, c, r, col, g.C, g.H, g.W)]) : acc_t(0);
    v01 = (r0 && c1) ? static_cast<acc_t>(x[offset<CL, index_t>(n, c, r, col + 1, g.C, g.H, g.W)]) : acc_t(0);
    v10 = (r1 && c0) ? static_cast<acc_t>(x[offset<CL, index_t>(n, c, r + 1, col, g.C, g.H, g.W)]) : acc_t(0);
    v11 = (r1 && c1) ? static_cast<acc_t>(x[offset<CL, index_t>(n, c, r + 1, col + 1, g.C, g.H, g.W)]) : acc_t(0);
  }
};

template <typename scalar_t, typename acc_t, bool CL, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ shift,
                               scalar_t* __restrict__ y, index_t total, Geom<index_t> g, acc_t limit) {
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t n, c, p, q;
    split<CL, index_t>(idx, g.C, g.Ho, g.Wo, n, c, p, q);
    const auto s = ChannelShift<acc_t>::make(shift[2 * c], shift[2 * c + 1], limit);
    if (!s.finite) {
      y[idx] = static_cast<scalar_t>(static_cast<acc_t>(NAN));
      continue;
    }
    const Taps4<scalar_t, acc_t, CL, index_t> t(x, n, c, p * g.sh - g.ph + static_cast<index_t>(s.dr), q * g.sw - g.pw + static_cast<index_t>(s.dc), g);
    y[idx] = static_cast<scalar_t>(bilinear(t.v00, t.v01, t.v10, t.v11, s.fr, s.fc));
  }
}

// Output index along one axis that reads input index x through tap k, or -1.
template <typename index_t>
__device__ __forceinline__ index_t source_of(index_t x, index_t k, index_t stride, index_t pad,
                                             index_t d, index_t n_out) {
  const index_t num = x + pad - d - k;
  if (num < 0 || num % stride != 0) return -1;
  const index_t i = num / stride;
  return i < n_out ? i : -1;
}

// Input gradient as a gather over the (at most 2x2) output pixels whose taps touch each input
// pixel: no atomics, no races.
template <typename scalar_t, typename acc_t, bool CL, typename index_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ go, const acc_t* __restrict__ shift,
                                  scalar_t* __restrict__ gx, index_t total, Geom<index_t> g, acc_t limit) {
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t n, c, r, col;
    split<CL, index_t>(idx, g.C, g.H, g.W, n, c, r, col);
    const auto s = ChannelShift<acc_t>::make(shift[2 * c], shift[2 * c + 1], limit);
    if (!s.finite) {
      gx[idx] = static_cast<scalar_t>(static_cast<acc_t>(NAN));
      continue;
    }
    acc_t v = acc_t(0);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const index_t p = source_of<index_t>(r, k, g.sh, g.ph, static_cast<index_t>(s.dr), g.Ho);
      if (p < 0) continue;
      const acc_t wr = k == 0 ? acc_t(1) - s.fr : s.fr;
      acc_t h = acc_t(0);
#pragma unroll
      for (int l = 0; l < 2; ++l) {
        const index_t q = source_of<index_t>(col, l, g.sw, g.pw, static_cast<index_t>(s.dc), g.Wo);
        if (q < 0) continue;
        const acc_t wc = l == 0 ? acc_t(1) - s.fc : s.fc;
        h += wc * static_cast<acc_t>(go[offset<CL, index_t>(n, c, p, q, g.C, g.Ho, g.Wo)]);
      }
      v += wr * h;
    }
    gx[idx] = static_cast<scalar_t>(v);
  }
}

// Fixed-shape tree reduction of two values over a block; thread 0 gets the sums.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t sa[kThreads], sb[kThreads];
  sa[threadIdx.x] = a;
  sb[threadIdx.x] = b;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      sa[threadIdx.x] += sa[threadIdx.x + w];
      sb[threadIdx.x] += sb[threadIdx.x + w];
    }
    __syncthreads();
  }
  a = sa[0];
  b = sb[0];
}

// Stage 1: block (c, b) sums grad_output * d(output)/d(shift) over the b-th slice of channel
// c's N*Ho*Wo output pixels into partial[c, b].
template <typename scalar_t, typename acc_t, bool CL, typename index_t>
__global__ void grad_shift_partial_kernel(const scalar_t* __restrict__ go,
                                          const scalar_t* __restrict__ x,
                                          const acc_t* __restrict__ shift,
                                          acc_t* __restrict__ partial, Geom<index_t> g, index_t chunk,
                                          acc_t limit) {
  const index_t c = blockIdx.x;
  const index_t slices = gridDim.y;
  const index_t M = g.N * g.Ho * g.Wo;
  const index_t begin = blockIdx.y * chunk;
  const index_t end = begin + chunk < M ? begin + chunk : M;
  const auto s = ChannelShift<acc_t>::make(shift[2 * c], shift[2 * c + 1], limit);
  acc_t da = 0, db = 0;
  for (index_t m = begin + threadIdx.x; m < end; m += blockDim.x) {
    const index_t q = m % g.Wo, p = (m / g.Wo) % g.Ho, n = m / (g.Wo * g.Ho);
    const Taps4<scalar_t, acc_t, CL, index_t> t(x, n, c, p * g.sh - g.ph + static_cast<index_t>(s.dr), q * g.sw - g.pw + static_cast<index_t>(s.dc), g);
    const acc_t gv = static_cast<acc_t>(go[offset<CL, index_t>(n, c, p, q, g.C, g.Ho, g.Wo)]);
    da += gv * d_alpha(t.v00, t.v01, t.v10, t.v11, s.fr);
    db += gv * d_beta(t.v00, t.v01, t.v10, t.v11, s.fc);
  }
  block_sum2(da, db);
  if (threadIdx.x == 0) {
    const acc_t bad = s.finite ? acc_t(0) : static_cast<acc_t>(NAN);
    partial[(c * slices + blockIdx.y) * 2] = da + bad;
    partial[(c * slices + blockIdx.y) * 2 + 1] = db + bad;
  }
}

// Stage 2: one block per channel sums its `count` partial pairs, the i-th at
// partial[(c * stride_c + i * stride_i) * 2], in a fixed order.
template <typename acc_t>
__global__ void grad_shift_final_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out,
                                        int64_t count, int64_t stride_c, int64_t stride_i) {
  const int64_t c = blockIdx.x;
  acc_t a = 0, b = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    a += partial[(c * stride_c + i * stride_i) * 2];
    b += partial[(c * stride_c + i * stride_i) * 2 + 1];
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    out[2 * c] = a;
    out[2 * c + 1] = b;
  }
}


// ---------------------------------------------------------------------------------------------
// Fast path: NCHW, stride 1, rows made of whole 16-byte chunks (W and W_out multiples of G
// elements, 16-byte aligned data). A block owns one (n, c) plane or a strip of its rows and
// decodes the channel's shift once; each thread produces G consecutive outputs from two aligned
// 16-byte chunks per input row (the shift's sub-chunk offset is the same for the whole block, so
// the taps are picked by a compile-time offset), and stores them with one 16-byte store. No
// per-element division is left: threads walk their (row, chunk) pairs incrementally.
// ---------------------------------------------------------------------------------------------
template <typename T, int G>
struct alignas(sizeof(T) * G) Chunk {
  T v[G];
};

// Chunk k of a row of nk chunks, or zeros when the row or the chunk lies outside the tensor.
template <int G, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ base, int64_t row_offset, int k, int nk,
                                           bool row_ok, acc_t* out) {
  if (row_ok && k >= 0 && k < nk) {
    const Chunk<scalar_t, G> c = reinterpret_cast<const Chunk<scalar_t, G>*>(base + row_offset)[k];
#pragma unroll
    for (int i = 0; i < G; ++i) out[i] = static_cast<acc_t>(c.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) out[i] = acc_t(0);
  }
}

// Two rows (a, b) of 2G consecutive values; output i blends a[O+i], a[O+i+1], b[O+i], b[O+i+1]
// with row weights (wa, wb) and column weights (wl, wr).
template <int G, int O, typename acc_t>
__device__ __forceinline__ void blend(const acc_t* a, const acc_t* b, acc_t wa, acc_t wb, acc_t wl, acc_t wr, acc_t* out) {
#pragma unroll
  for (int i = 0; i < G; ++i)
    out[i] = wa * (wl * a[O + i] + wr * a[O + i + 1]) + wb * (wl * b[O + i] + wr * b[O + i + 1]);
}

// Calls f(std::integral_constant<int, o>{}) for a block-uniform o in [0, G).
template <int G, typename F>
__device__ __forceinline__ void with_offset(int o, F&& f) {
  switch (o) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: if constexpr (G > 1) f(std::integral_constant<int, 1 % G>{}); break;
    case 2: if constexpr (G > 2) f(std::integral_constant<int, 2 % G>{}); break;
    case 3: if constexpr (G > 3) f(std::integral_constant<int, 3 % G>{}); break;
    case 4: if constexpr (G > 4) f(std::integral_constant<int, 4 % G>{}); break;
    case 5: if constexpr (G > 5) f(std::integral_constant<int, 5 % G>{}); break;
    case 6: if constexpr (G > 6) f(std::integral_constant<int, 6 % G>{}); break;
    default: if constexpr (G > 7) f(std::integral_constant<int, 7 % G>{}); break;
  }
}

// The launch geometry of the fast path (plain ints: every plane fits 32-bit offsets).
struct PlaneGeom {
  int C, H, W, Ho, Wo, ph, pw;
  int rows;    // rows per block (output rows forward, input rows backward)
  int strips;  // blocks per plane
};

// Walks the (row, chunk) pairs [row_begin, row_end) x [0, nk) assigned to this thread.
template <typename F>
__device__ __forceinline__ void for_row_chunks(int row_begin, int row_end, int nk, F&& f) {
  int row = row_begin + static_cast<int>(threadIdx.x) / nk;
  int k = static_cast<int>(threadIdx.x) % nk;
  const int drow = static_cast<int>(blockDim.x) / nk, dk = static_cast<int>(blockDim.x) % nk;
  while (row < row_end) {
    f(row, k);
    row += drow;
    k += dk;
    if (k >= nk) {
      k -= nk;
      ++row;
    }
  }
}

template <typename scalar_t, typename acc_t, int G>
__global__ void __launch_bounds__(kThreads) forward_vec_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ shift,
                                                              scalar_t* __restrict__ y, PlaneGeom g, acc_t limit) {
  const int64_t plane = blockIdx.x / g.strips;  // once per block
  const int strip = static_cast<int>(blockIdx.x - plane * g.strips);
  const int c = static_cast<int>(plane % g.C);
  const auto s = ChannelShift<acc_t>::make(shift[2 * c], shift[2 * c + 1], limit);
  const int dr = static_cast<int>(s.dr), dc = static_cast<int>(s.dc);
  const int nk_in = g.W / G, nk_out = g.Wo / G;
  // outputs q0 .. q0+G-1 (q0 = k*G) read input columns q0 - pw + dc ... + G: chunks k + kd, k + kd + 1
  const int base = dc - g.pw;
  const int kd = static_cast<int>(floor_div(base, G)), o = base - kd * G;
  const scalar_t* xp = x + plane * g.H * g.W;
  Chunk<scalar_t, G>* yp = reinterpret_cast<Chunk<scalar_t, G>*>(y + plane * g.Ho * g.Wo);
  const acc_t fr = s.fr, fc = s.fc;
  const int p0 = strip * g.rows, p1 = min(p0 + g.rows, g.Ho);
  for_row_chunks(p0, p1, nk_out, [&](int p, int k) {
    Chunk<scalar_t, G> out;
    if (!s.finite) {
#pragma unroll
      for (int i = 0; i < G; ++i) out.v[i] = static_cast<scalar_t>(static_cast<acc_t>(NAN));
    } else {
      const int r = p - g.ph + dr;
      const bool ok0 = r >= 0 && r < g.H, ok1 = r + 1 >= 0 && r + 1 < g.H;
      acc_t a[2 * G], b[2 * G], v[G];
      load_chunk<G>(xp, static_cast<int64_t>(r) * g.W, k + kd, nk_in, ok0, a);
      load_chunk<G>(xp, static_cast<int64_t>(r) * g.W, k + kd + 1, nk_in, ok0, a + G);
      load_chunk<G>(xp, static_cast<int64_t>(r + 1) * g.W, k + kd, nk_in, ok1, b);
      load_chunk<G>(xp, static_cast<int64_t>(r + 1) * g.W, k + kd + 1, nk_in, ok1, b + G);
      with_offset<G>(o, [&](auto O) { blend<G, decltype(O)::value>(a, b, acc_t(1) - fr, fr, acc_t(1) - fc, fc, v); });
#pragma unroll
      for (int i = 0; i < G; ++i) out.v[i] = static_cast<scalar_t>(v[i]);
    }
    yp[static_cast<int64_t>(p) * nk_out + k] = out;
  });
}

// Deterministic sum of two values over the block (any multiple of 32 threads up to kThreads):
// warp shuffles, then the warps' sums in order. Thread 0 gets the result.
template <typename acc_t>
__device__ __forceinline__ void block_sum2_any(acc_t& a, acc_t& b) {
  __shared__ acc_t wa[kThreads / 32], wb[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    wa[warp] = a;
    wb[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x) / 32; ++w) {
      a += wa[w];
      b += wb[w];
    }
  }
}

// Input gradient and the shift gradient's per-block partial sums in one pass over grad_output
// and input. Input pixel (r, col) receives grad_output at rows r' = r + ph - dr and r' - 1 and
// columns c' = col + pw - dc and c' - 1 (A, B: rows; l: the left column):
//   grad_input = (1-fr)((1-fc) A + fc Al) + fr((1-fc) B + fc Bl)
//   d alpha   += x ((1-fr)(Al - A) + fr(Bl - B))
//   d beta    += x ((1-fc)(B - A) + fc(Bl - Al))
// which is the forward's derivative regrouped by input pixel (terms whose tap lies outside the
// image have x = 0 and vanish either way).
template <typename scalar_t, typename acc_t, int G>
__global__ void __launch_bounds__(kThreads) backward_vec_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                                               const acc_t* __restrict__ shift, scalar_t* __restrict__ gx,
                                                               acc_t* __restrict__ partial, PlaneGeom g, acc_t limit) {
  const int64_t plane = blockIdx.x / g.strips;
  const int strip = static_cast<int>(blockIdx.x - plane * g.strips);
  const int c = static_cast<int>(plane % g.C);
  const auto s = ChannelShift<acc_t>::make(shift[2 * c], shift[2 * c + 1], limit);
  const int dr = static_cast<int>(s.dr), dc = static_cast<int>(s.dc);
  const int nk_in = g.W / G, nk_out = g.Wo / G;
  // inputs col0 .. col0+G-1 (col0 = k*G) read grad_output columns col0 + pw - dc - 1 ... + G
  const int base = g.pw - dc - 1;
  const int kd = static_cast<int>(floor_div(base, G)), o = base - kd * G;
  const scalar_t* gp = go + plane * g.Ho * g.Wo;
  const Chunk<scalar_t, G>* xp = reinterpret_cast<const Chunk<scalar_t, G>*>(x + plane * g.H * g.W);
  Chunk<scalar_t, G>* gxp = reinterpret_cast<Chunk<scalar_t, G>*>(gx + plane * g.H * g.W);
  const acc_t fr = s.fr, fc = s.fc;
  acc_t da = 0, db = 0;
  const int r0 = strip * g.rows, r1 = min(r0 + g.rows, g.H);
  for_row_chunks(r0, r1, nk_in, [&](int r, int k) {
    const int rp = r + g.ph - dr;
    acc_t a[2 * G], b[2 * G], v[G];
    load_chunk<G>(gp, static_cast<int64_t>(rp) * g.Wo, k + kd, nk_out, rp >= 0 && rp < g.Ho, a);
    load_chunk<G>(gp, static_cast<int64_t>(rp) * g.Wo, k + kd + 1, nk_out, rp >= 0 && rp < g.Ho, a + G);
    load_chunk<G>(gp, static_cast<int64_t>(rp - 1) * g.Wo, k + kd, nk_out, rp >= 1 && rp - 1 < g.Ho, b);
    load_chunk<G>(gp, static_cast<int64_t>(rp - 1) * g.Wo, k + kd + 1, nk_out, rp >= 1 && rp - 1 < g.Ho, b + G);
    const Chunk<scalar_t, G> xc = xp[static_cast<int64_t>(r) * nk_in + k];
    with_offset<G>(o, [&](auto O) {
      constexpr int OO = decltype(O)::value;
      blend<G, OO>(a, b, acc_t(1) - fr, fr, fc, acc_t(1) - fc, v);
#pragma unroll
      for (int i = 0; i < G; ++i) {
        const acc_t xv = static_cast<acc_t>(xc.v[i]);
        const acc_t Al = a[OO + i], A = a[OO + i + 1], Bl = b[OO + i], B = b[OO + i + 1];
        da += xv * d_alpha(A, Al, B, Bl, fr);  // input-centric: the taps are grad_output's
        db += xv * d_beta(A, Al, B, Bl, fc);
      }
    });
    Chunk<scalar_t, G> out;
#pragma unroll
    for (int i = 0; i < G; ++i)
      out.v[i] = static_cast<scalar_t>(s.finite ? v[i] : static_cast<acc_t>(NAN));
    gxp[static_cast<int64_t>(r) * nk_in + k] = out;
  });
  block_sum2_any(da, db);
  if (threadIdx.x == 0) {
    const acc_t bad = s.finite ? acc_t(0) : static_cast<acc_t>(NAN);
    partial[2 * blockIdx.x] = da + bad;
    partial[2 * blockIdx.x + 1] = db + bad;
  }
}

// Sums the fast path's partials of channel c over (n, strip) in a fixed order.
template <typename acc_t>
__global__ void backward_vec_final_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int64_t N,
                                          int64_t C, int64_t strips) {
  const int64_t c = blockIdx.x;
  const int64_t per_channel = N * strips;
  acc_t a = 0, b = 0;
  for (int64_t i = threadIdx.x; i < per_channel; i += blockDim.x) {
    const int64_t n = i / strips, st = i - n * strips;
    const int64_t blk = (n * C + c) * strips + st;
    a += partial[2 * blk];
    b += partial[2 * blk + 1];
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    out[2 * c] = a;
    out[2 * c + 1] = b;
  }
}

// Chunk width in elements: 16 bytes, or 8 bytes for rows that are not a whole number of
// 16-byte chunks (28 bfloat16 values, say).
template <typename scalar_t>
constexpr int chunk_elems() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// Calls f(std::integral_constant<int, G>{}) with the 16-byte, then the 8-byte chunk width until
// it returns true; false if neither fits.
template <typename scalar_t, typename F>
bool with_chunk_width(F&& f) {
  return f(std::integral_constant<int, chunk_elems<scalar_t>()>{}) ||
         f(std::integral_constant<int, chunk_elems<scalar_t>() / 2>{});
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether the fast path serves this call, and its launch geometry. `rows_of` is H_out for the
// forward (blocks own output rows) and H for the backward (blocks own input rows).
bool plane_geometry(const Geometry& g, int G, int elem_bytes, bool backward, std::initializer_list<const void*> ptrs,
                    PlaneGeom& pg, int& threads, int64_t& blocks) {
  if (g.channels_last || g.sh != 1 || g.sw != 1 || g.W % G != 0 || g.Wo % G != 0) return false;
  if (g.H * g.W >= (int64_t{1} << 30) || g.Ho * g.Wo >= (int64_t{1} << 30)) return false;
  for (const void* p : ptrs)
    if (!aligned(p, G * elem_bytes)) return false;
  const int64_t rows = backward ? g.H : g.Ho;
  const int64_t nk = (backward ? g.W : g.Wo) / G;
  // about four chunks per thread, whole rows per block
  const int64_t rows_per_block = std::max<int64_t>(1, std::min<int64_t>(rows, (4 * kThreads) / nk));
  pg = PlaneGeom{static_cast<int>(g.C), static_cast<int>(g.H), static_cast<int>(g.W), static_cast<int>(g.Ho),
                 static_cast<int>(g.Wo), static_cast<int>(g.ph), static_cast<int>(g.pw),
                 static_cast<int>(rows_per_block), static_cast<int>((rows + rows_per_block - 1) / rows_per_block)};
  const int64_t work = rows_per_block * nk;
  threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (work + 31) / 32 * 32)));
  blocks = g.N * g.C * pg.strips;
  return blocks > 0 && blocks < (int64_t{1} << 31);
}

// Calls launch(int32_t{}) when every element index (plus a grid-stride step) stays below 2^31,
// launch(int64_t{}) otherwise; launch picks its kernels' index type from its argument's type.
template <typename F>
void with_index_type(const Geometry& g, F&& launch) {
  const int64_t in = g.N * g.C * g.H * g.W, out = g.N * g.C * g.Ho * g.Wo;
  if (std::max(in, out) < (int64_t{1} << 31) - (int64_t{1} << 26)) launch(int32_t{});
  else launch(int64_t{});
}

int blocks_for(int64_t total) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, sms * 32)));
}

// channels_last forward: a block per output row (n, p) decodes every channel's shift once into
// shared memory; its threads then walk the row's pixels (y) and channels (x, innermost in memory,
// so writes are coalesced) with no per-element division.
template <typename acc_t>
struct DecodedShift {
  int dr, dc;
  acc_t fr, fc;  // fr is NaN for a channel with a non-finite shift
};

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) forward_cl_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ shift,
                                                              scalar_t* __restrict__ y, Geom<index_t> g, acc_t limit) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto* sh = reinterpret_cast<DecodedShift<acc_t>*>(smem_raw);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
  for (index_t c = tid; c < g.C; c += nthreads) {
    const auto d = ChannelShift<acc_t>::make(shift[2 * c], shift[2 * c + 1], limit);
    sh[c] = DecodedShift<acc_t>{static_cast<int>(d.dr), static_cast<int>(d.dc),
                                d.finite ? d.fr : static_cast<acc_t>(NAN), d.fc};
  }
  __syncthreads();
  for (index_t row = blockIdx.x; row < g.N * g.Ho; row += gridDim.x) {
    const index_t n = row / g.Ho, p = row - n * g.Ho;
    const scalar_t* xn = x + static_cast<int64_t>(n) * g.H * g.W * g.C;
    scalar_t* yrow = y + static_cast<int64_t>(row) * g.Wo * g.C;
    for (index_t q = threadIdx.y; q < g.Wo; q += blockDim.y) {
      for (index_t c = threadIdx.x; c < g.C; c += blockDim.x) {
        const DecodedShift<acc_t> d = sh[c];
        acc_t v;
        if (d.fr != d.fr) {
          v = static_cast<acc_t>(NAN);
        } else {
          const index_t r = p * g.sh - g.ph + d.dr, col = q * g.sw - g.pw + d.dc;
          const bool r0 = r >= 0 && r < g.H, r1 = r + 1 >= 0 && r + 1 < g.H;
          const bool c0 = col >= 0 && col < g.W, c1 = col + 1 >= 0 && col + 1 < g.W;
          // 64-bit: a tap far outside the image may lie beyond the 32-bit range (never dereferenced)
          const scalar_t* px = xn + (static_cast<int64_t>(r) * g.W + col) * g.C + c;
          const acc_t v00 = (r0 && c0) ? static_cast<acc_t>(px[0]) : acc_t(0);
          const acc_t v01 = (r0 && c1) ? static_cast<acc_t>(px[g.C]) : acc_t(0);
          const acc_t v10 = (r1 && c0) ? static_cast<acc_t>(px[g.W * g.C]) : acc_t(0);
          const acc_t v11 = (r1 && c1) ? static_cast<acc_t>(px[(g.W + 1) * g.C]) : acc_t(0);
          v = bilinear(v00, v01, v10, v11, d.fr, d.fc);
        }
        yrow[q * g.C + c] = static_cast<scalar_t>(v);
      }
    }
  }
}

// channels_last backward at stride 1: one pass over grad_output and input writing grad_input and
// per-block partial sums of the shift gradient (the input-centric form of backward_vec_kernel).
// A block owns `rows` input rows of one image and 32 consecutive channels: lane x is the channel
// (so every load of x and store of grad_input is one contiguous 32-channel run), y walks the
// columns. Each thread decodes its channel's shift once and accumulates its channel's two sums;
// the block adds them over y in a fixed order into partial[(n * strips + strip) * C + c].
constexpr int kClRows = 4;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) backward_cl_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                                               const acc_t* __restrict__ shift, scalar_t* __restrict__ gx,
                                                               acc_t* __restrict__ partial, Geom<int64_t> g, int strips,
                                                               acc_t limit) {
  __shared__ acc_t sa[kThreads], sb[kThreads];
  const int64_t n = blockIdx.x / strips;
  const int strip = static_cast<int>(blockIdx.x - n * strips);
  const int64_t c = static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x;
  const bool active = c < g.C;
  acc_t da = 0, db = 0;
  bool finite = true;
  if (active) {
    const auto s = ChannelShift<acc_t>::make(shift[2 * c], shift[2 * c + 1], limit);
    finite = s.finite;
    const int64_t dr = s.dr, dc = s.dc;
    const acc_t fr = s.fr, fc = s.fc;
    const int64_t r_end = min(static_cast<int64_t>(strip + 1) * kClRows, g.H);
    for (int64_t r = static_cast<int64_t>(strip) * kClRows; r < r_end; ++r) {
      const int64_t rp = r + g.ph - dr;  // grad_output rows rp (A) and rp - 1 (B)
      const bool a_in = rp >= 0 && rp < g.Ho, b_in = rp >= 1 && rp - 1 < g.Ho;
      const scalar_t* xrow = x + ((n * g.H + r) * g.W) * g.C + c;
      scalar_t* gxrow = gx + ((n * g.H + r) * g.W) * g.C + c;
      // 64-bit: rows or columns far outside are never dereferenced but their offsets are formed
      const scalar_t* arow = go + ((n * g.Ho + rp) * g.Wo) * g.C + c;
      const scalar_t* brow = arow - g.Wo * g.C;
      for (int64_t col = threadIdx.y; col < g.W; col += blockDim.y) {
        const int64_t cp = col + g.pw - dc;  // grad_output columns cp and cp - 1 (l)
        const bool c0 = cp >= 0 && cp < g.Wo, c1 = cp >= 1 && cp - 1 < g.Wo;
        const acc_t A = (a_in && c0) ? static_cast<acc_t>(arow[cp * g.C]) : acc_t(0);
        const acc_t Al = (a_in && c1) ? static_cast<acc_t>(arow[(cp - 1) * g.C]) : acc_t(0);
        const acc_t B = (b_in && c0) ? static_cast<acc_t>(brow[cp * g.C]) : acc_t(0);
        const acc_t Bl = (b_in && c1) ? static_cast<acc_t>(brow[(cp - 1) * g.C]) : acc_t(0);
        const acc_t v = bilinear(A, Al, B, Bl, fr, fc);
        const acc_t xv = static_cast<acc_t>(xrow[col * g.C]);
        da += xv * d_alpha(A, Al, B, Bl, fr);
        db += xv * d_beta(A, Al, B, Bl, fc);
        gxrow[col * g.C] = static_cast<scalar_t>(finite ? v : static_cast<acc_t>(NAN));
      }
    }
  }
  // fixed-order sum over y for each lane (channel)
  const int tid = threadIdx.y * 32 + threadIdx.x;
  sa[tid] = da;
  sb[tid] = db;
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
      da += sa[y * 32 + threadIdx.x];
      db += sb[y * 32 + threadIdx.x];
    }
    const acc_t bad = finite ? acc_t(0) : static_cast<acc_t>(NAN);
    acc_t* out = partial + (static_cast<int64_t>(blockIdx.x) * g.C + c) * 2;
    out[0] = da + bad;
    out[1] = db + bad;
  }
}

at::Tensor opmath_shift(const at::Tensor& shift, at::ScalarType input_type) {
  return shift.to(at::toOpMathType(input_type)).contiguous();
}

at::Tensor active_shift_cuda(const at::Tensor& input_, const at::Tensor& shift,
                             at::IntArrayRef stride, at::IntArrayRef padding) {
  const Geometry g = prepare(input_, shift, stride, padding, "active_shift");
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(g.format());
  at::Tensor out = at::empty({g.N, g.C, g.Ho, g.Wo}, input.options().memory_format(g.format()));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const at::Tensor s = opmath_shift(shift, input.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "active_shift_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool fast = with_chunk_width<scalar_t>([&](auto width) {
      constexpr int G = decltype(width)::value;
      PlaneGeom pg;
      int threads;
      int64_t blocks;
      if (!plane_geometry(g, G, sizeof(scalar_t), false, {input.const_data_ptr(), out.const_data_ptr()}, pg, threads, blocks))
        return false;
      forward_vec_kernel<scalar_t, acc_t, G><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), out.data_ptr<scalar_t>(), pg,
          static_cast<acc_t>(g.limit));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    });
    if (fast) return;
    const size_t smem = static_cast<size_t>(g.C) * sizeof(DecodedShift<acc_t>);
    if (g.channels_last && smem <= 48 * 1024) {
      auto launch_cl = [&](auto index_tag) {
        using index_t = decltype(index_tag);
        const int tx = g.C >= 32 ? 32 : static_cast<int>(g.C);
        const dim3 block(tx, kThreads / tx);
        const int64_t rows = g.N * g.Ho;
        const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, sms * 16)));
        forward_cl_kernel<scalar_t, acc_t, index_t><<<grid, block, smem, stream>>>(
            input.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), out.data_ptr<scalar_t>(), Geom<index_t>(g),
            static_cast<acc_t>(g.limit));
      };
      with_index_type(g, launch_cl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    auto launch = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      auto kernel = g.channels_last ? forward_kernel<scalar_t, acc_t, true, index_t>
                                    : forward_kernel<scalar_t, acc_t, false, index_t>;
      kernel<<<blocks_for(total), kThreads, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
          static_cast<index_t>(total), Geom<index_t>(g), static_cast<acc_t>(g.limit));
    };
    with_index_type(g, launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor active_shift_grad_input_cuda(const at::Tensor& grad_, const at::Tensor& input_,
                                        const at::Tensor& shift, at::IntArrayRef stride,
                                        at::IntArrayRef padding) {
  const Geometry g = prepare(input_, shift, stride, padding, "active_shift_grad_input", &grad_);
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor grad = grad_.to(input_.scalar_type()).contiguous(g.format());
  at::Tensor gx = at::empty(input_.sizes(), input_.options().memory_format(g.format()));
  const int64_t total = gx.numel();
  if (total == 0) return gx;
  const at::Tensor s = opmath_shift(shift, input_.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_.scalar_type(), "active_shift_grad_input_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      auto kernel = g.channels_last ? grad_input_kernel<scalar_t, acc_t, true, index_t>
                                    : grad_input_kernel<scalar_t, acc_t, false, index_t>;
      kernel<<<blocks_for(total), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), gx.data_ptr<scalar_t>(),
          static_cast<index_t>(total), Geom<index_t>(g), static_cast<acc_t>(g.limit));
    };
    with_index_type(g, launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

at::Tensor active_shift_grad_shift_cuda(const at::Tensor& grad_, const at::Tensor& input_,
                                        const at::Tensor& shift, at::IntArrayRef stride,
                                        at::IntArrayRef padding) {
  const Geometry g = prepare(input_, shift, stride, padding, "active_shift_grad_shift", &grad_);
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(g.format());
  const at::Tensor grad = grad_.to(input.scalar_type()).contiguous(g.format());
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const int64_t M = g.N * g.Ho * g.Wo;
  if (M == 0 || g.C == 0) return at::zeros_like(shift);
  // The slicing depends on the shape alone, so the summation order is reproducible.
  const int64_t slices = std::min<int64_t>(256, std::max<int64_t>(1, (M + 4095) / 4096));
  const int64_t chunk = (M + slices - 1) / slices;
  at::Tensor partial = at::empty({g.C, slices, 2}, input.options().dtype(acc_type));
  at::Tensor total = at::empty({g.C, 2}, input.options().dtype(acc_type));
  const at::Tensor s = opmath_shift(shift, input.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "active_shift_grad_shift_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(slices));
    auto launch = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      auto kernel = g.channels_last ? grad_shift_partial_kernel<scalar_t, acc_t, true, index_t>
                                    : grad_shift_partial_kernel<scalar_t, acc_t, false, index_t>;
      kernel<<<grid, kThreads, 0, stream>>>(grad.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                            s.const_data_ptr<acc_t>(), partial.data_ptr<acc_t>(), Geom<index_t>(g),
                                            static_cast<index_t>(chunk), static_cast<acc_t>(g.limit));
    };
    with_index_type(g, launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_shift_final_kernel<acc_t><<<static_cast<unsigned>(g.C), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), total.data_ptr<acc_t>(), slices, slices, 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return total.to(shift.scalar_type());
}

// Both gradients at once: the fused one-pass kernel where the fast path applies, else the two
// general kernels.
std::tuple<at::Tensor, at::Tensor> active_shift_backward_cuda(const at::Tensor& grad_, const at::Tensor& input_,
                                                              const at::Tensor& shift, at::IntArrayRef stride,
                                                              at::IntArrayRef padding) {
  const Geometry g = prepare(input_, shift, stride, padding, "active_shift_backward", &grad_);
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(g.format());
  const at::Tensor grad = grad_.to(input.scalar_type()).contiguous(g.format());
  // Where the fused kernel does not apply: the two general kernels, on the tensors already made
  // dense above (so they copy nothing again).
  auto separately = [&]() -> std::tuple<at::Tensor, at::Tensor> {
    return {active_shift_grad_input_cuda(grad, input, shift, stride, padding),
            active_shift_grad_shift_cuda(grad, input, shift, stride, padding)};
  };
  if (input.numel() == 0 || grad.numel() == 0) return separately();
  at::Tensor gx = at::empty(input.sizes(), input.options().memory_format(g.format()));
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const at::Tensor s = opmath_shift(shift, input.scalar_type());
  auto stream = at::cuda::getCurrentCUDAStream();
  bool done = false;
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "active_shift_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (g.channels_last && g.sh == 1 && g.sw == 1) {
      const int strips = static_cast<int>((g.H + kClRows - 1) / kClRows);
      const int64_t blocks = g.N * strips;
      const int64_t groups = (g.C + 31) / 32;
      if (blocks >= (int64_t{1} << 31) || groups >= 65536) return;  // the general kernels
      at::Tensor partial = at::empty({blocks, g.C, 2}, input.options().dtype(acc_type));
      total = at::empty({g.C, 2}, input.options().dtype(acc_type));
      backward_cl_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(groups)), dim3(32, kThreads / 32), 0,
                                            stream>>>(
          grad.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), gx.data_ptr<scalar_t>(),
          partial.data_ptr<acc_t>(), Geom<int64_t>(g), strips, static_cast<acc_t>(g.limit));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_shift_final_kernel<acc_t><<<static_cast<unsigned>(g.C), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), total.data_ptr<acc_t>(), blocks, 1, g.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      done = true;
      return;
    }
    done = with_chunk_width<scalar_t>([&](auto width) {
      constexpr int G = decltype(width)::value;
      PlaneGeom pg;
      int threads;
      int64_t blocks;
      if (!plane_geometry(g, G, sizeof(scalar_t), true, {input.const_data_ptr(), grad.const_data_ptr(), gx.const_data_ptr()},
                          pg, threads, blocks))
        return false;
      at::Tensor partial = at::empty({blocks, 2}, input.options().dtype(acc_type));
      total = at::empty({g.C, 2}, input.options().dtype(acc_type));
      backward_vec_kernel<scalar_t, acc_t, G><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(),
          gx.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), pg, static_cast<acc_t>(g.limit));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_vec_final_kernel<acc_t><<<static_cast<unsigned>(g.C), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), total.data_ptr<acc_t>(), g.N, g.C, pg.strips);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    });
  });
  if (!done) return separately();
  return {gx, total.to(shift.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(asl, CUDA, m) {
  m.impl("active_shift", &active_shift_cuda);
  m.impl("active_shift_grad_input", &active_shift_grad_input_cuda);
  m.impl("active_shift_grad_shift", &active_shift_grad_shift_cuda);
  m.impl("active_shift_backward", &active_shift_backward_cuda);
}

}  // namespace asl
