// CUDA kernels of the active shift operator: one thread per element, threads ordered like the
// tensor's memory (NCHW or channels_last) so that writes are coalesced. Half and bfloat16
// inputs are computed in float32; the shift gradient is a two-stage, fixed-order reduction.
#include "../active_shift.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

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
    const acc_t fr = s.fr, fc = s.fc;
    y[idx] = static_cast<scalar_t>((acc_t(1) - fr) * ((acc_t(1) - fc) * t.v00 + fc * t.v01) +
                                   fr * ((acc_t(1) - fc) * t.v10 + fc * t.v11));
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
    da += gv * ((acc_t(1) - s.fr) * (t.v01 - t.v00) + s.fr * (t.v11 - t.v10));
    db += gv * ((acc_t(1) - s.fc) * (t.v10 - t.v00) + s.fc * (t.v11 - t.v01));
  }
  block_sum2(da, db);
  if (threadIdx.x == 0) {
    const acc_t bad = s.finite ? acc_t(0) : static_cast<acc_t>(NAN);
    partial[(c * slices + blockIdx.y) * 2] = da + bad;
    partial[(c * slices + blockIdx.y) * 2 + 1] = db + bad;
  }
}

// Stage 2: one block per channel sums its partials in a fixed order.
template <typename acc_t>
__global__ void grad_shift_final_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out,
                                        int64_t slices) {
  const int64_t c = blockIdx.x;
  acc_t a = 0, b = 0;
  for (int64_t i = threadIdx.x; i < slices; i += blockDim.x) {
    a += partial[(c * slices + i) * 2];
    b += partial[(c * slices + i) * 2 + 1];
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    out[2 * c] = a;
    out[2 * c + 1] = b;
  }
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
        partial.const_data_ptr<acc_t>(), total.data_ptr<acc_t>(), slices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return total.to(shift.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(asl, CUDA, m) {
  m.impl("active_shift", &active_shift_cuda);
  m.impl("active_shift_grad_input", &active_shift_grad_input_cuda);
  m.impl("active_shift_grad_shift", &active_shift_grad_shift_cuda);
}

}  // namespace asl
