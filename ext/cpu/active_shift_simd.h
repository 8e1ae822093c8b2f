// The CPU kernels of the active shift, written once over a vector type Vec<T> and compiled once
// per instruction set: active_shift_kernel.cpp includes this file in a namespace of its own under
// `#pragma GCC target` for AVX-512 (ASL_SIMD 2) and AVX2 (1), and plainly for one lane (0).
//
// Every output is a sum of four taps, W00 x00 + W01 x01 + W10 x10 + W11 x11, evaluated in that
// order (a product, then three fused multiply-adds); the input gradient sums its taps in the
// reverse order. Both memory formats follow these orders exactly, so their results agree bit for
// bit. Taps outside the image are never read: vector loads at the borders are masked.
//
// NCHW: each (n, c) plane is blended row by row straight from the input (planes narrower than a
// vector are taken several rows per vector; at stride 2, AVX-512 takes planes of up to 64 floats
// whole, each tap of the output one permute); the shift gradient sums grad_output times each tap
// (four correlations) while the plane is in cache. channels_last, shifts within a pixel or a
// pixel or so past one (four integer offsets per axis in a channel vector): each
// lane blends its own four taps from the pixels around it (see quad_row; at stride 2 the input
// gradient takes each lane's one tap, see quad_input_grad_s2_rows). Otherwise each output
// pixel's C channels are a weighted sum over the few distinct pixel offsets the channels' taps use (a sparse
// depthwise stencil, weights zero for channels that do not use an offset), so no transpose is
// needed; when the channels' offsets are too many for that to pay, images are transposed to
// planes and the NCHW kernels run on them.
#ifndef ASL_SIMD
#error "include active_shift_simd.h from active_shift_kernel.cpp with ASL_SIMD set"
#endif

// The row kernels call lambdas per pixel through a few layers of templates; GCC left the
// per-pixel lambda out of line once those layers grew (128x16x32x32 channels_last forward: 1.07
// -> 1.59 copies), so the row kernels inline everything they call.
#ifndef ASL_FLATTEN
#if defined(__GNUC__)
#define ASL_FLATTEN __attribute__((flatten))
#else
#define ASL_FLATTEN
#endif
#endif

// ---------------------------------------------------------------------------------------------
// Vec<T>: N lanes of T; masks are the low N bits of a uint32_t
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Vec;

#if ASL_SIMD == 2
template <>
struct Vec<float> {
  static constexpr int N = 16;
  using reg = __m512;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float v) { return _mm512_set1_ps(v); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg loadz(uint32_t m, const float* p) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p); }
  static reg loadm(uint32_t m, const float* p) { return loadz(m, p); }
  static reg loadand(uint32_t m, const float* p) { return loadz(m, p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg blend(uint32_t m, reg a, reg b) { return _mm512_mask_blend_ps(static_cast<__mmask16>(m), a, b); }
  static void store(uint32_t m, float* p, reg v) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>(m), v); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  // g where u > 0, else 0 (a NaN u gives 0)
  static reg where_positive(reg u, reg g) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(u, zero(), _CMP_GT_OQ), g); }
  static reg orbits(reg a, reg b) { return _mm512_or_ps(a, b); }
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    even = _mm512_permutex2var_ps(lo, ie, hi);
    odd = _mm512_permutex2var_ps(lo, io, hi);
  }
  static reg dup_halfz(uint32_t m, const float* p) {  // [p0 p0 p1 p1 ...] from N / 2 values
    const __m256 h = _mm256_maskz_loadu_ps(static_cast<__mmask8>(m), p);
    const __m512i idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    return _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(h));
  }
};
template <>
struct Vec<double> {
  static constexpr int N = 8;
  using reg = __m512d;
  static reg zero() { return _mm512_setzero_pd(); }
  static reg set1(double v) { return _mm512_set1_pd(v); }
  static reg load(const double* p) { return _mm512_loadu_pd(p); }
  static reg loadz(uint32_t m, const double* p) { return _mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p); }
  static reg loadm(uint32_t m, const double* p) { return loadz(m, p); }
  static reg loadand(uint32_t m, const double* p) { return loadz(m, p); }
  static void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
  static reg blend(uint32_t m, reg a, reg b) { return _mm512_mask_blend_pd(static_cast<__mmask8>(m), a, b); }
  static void store(uint32_t m, double* p, reg v) { _mm512_mask_storeu_pd(p, static_cast<__mmask8>(m), v); }
  static reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static reg where_positive(reg u, reg g) { return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(u, zero(), _CMP_GT_OQ), g); }
  static reg orbits(reg a, reg b) { return _mm512_or_pd(a, b); }
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    even = _mm512_permutex2var_pd(lo, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), hi);
    odd = _mm512_permutex2var_pd(lo, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), hi);
  }
  static reg dup_halfz(uint32_t m, const double* p) {
    const __m256d h = _mm256_maskz_loadu_pd(static_cast<__mmask8>(m), p);
    return _mm512_permutexvar_pd(_mm512_setr_epi64(0, 0, 1, 1, 2, 2, 3, 3), _mm512_castpd256_pd512(h));
  }
};
#elif ASL_SIMD == 1
// AVX2 has no mask registers: a masked load or store takes its lanes as a vector, read from a
// table (one load) rather than built from the bits (three instructions), and loads whose mask
// is full, the interior of every plane, are plain loads.
struct LaneTable {
  alignas(32) int32_t f[256][8];
  alignas(32) int64_t d[16][4];
  constexpr LaneTable() : f(), d() {
    for (int m = 0; m < 256; ++m)
      for (int l = 0; l < 8; ++l) f[m][l] = ((m >> l) & 1) ? -1 : 0;
    for (int m = 0; m < 16; ++m)
      for (int l = 0; l < 4; ++l) d[m][l] = ((m >> l) & 1) ? -1 : 0;
  }
};
inline constexpr LaneTable kLanes{};
inline __m256i lanes32(uint32_t m) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(kLanes.f[m & 0xFFu])); }
inline __m256i lanes64(uint32_t m) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(kLanes.d[m & 0xFu])); }
template <>
struct Vec<float> {
  static constexpr int N = 8;
  using reg = __m256;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg loadz(uint32_t m, const float* p) { return m == 0xFFu ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes32(m)); }
  static reg loadm(uint32_t m, const float* p) { return _mm256_maskload_ps(p, lanes32(m)); }  // no branch
  // all N lanes at p must be readable: a plain load, the lanes outside m then zeroed (faster)
  static reg loadand(uint32_t m, const float* p) { return _mm256_and_ps(_mm256_loadu_ps(p), _mm256_castsi256_ps(lanes32(m))); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg blend(uint32_t m, reg a, reg b) { return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(lanes32(m))); }
  static void store(uint32_t m, float* p, reg v) { _mm256_maskstore_ps(p, lanes32(m), v); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg where_positive(reg u, reg g) { return _mm256_and_ps(g, _mm256_cmp_ps(u, zero(), _CMP_GT_OQ)); }
  static reg orbits(reg a, reg b) { return _mm256_or_ps(a, b); }
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xD8));
    odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD)), 0xD8));
  }
  static reg dup_halfz(uint32_t m, const float* p) {
    const __m128 h = _mm_maskload_ps(p, _mm256_castsi256_si128(lanes32(m)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(h), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  }
};
template <>
struct Vec<double> {
  static constexpr int N = 4;
  using reg = __m256d;
  static reg zero() { return _mm256_setzero_pd(); }
  static reg set1(double v) { return _mm256_set1_pd(v); }
  static reg load(const double* p) { return _mm256_loadu_pd(p); }
  static reg loadz(uint32_t m, const double* p) { return m == 0xFu ? _mm256_loadu_pd(p) : _mm256_maskload_pd(p, lanes64(m)); }
  static reg loadm(uint32_t m, const double* p) { return _mm256_maskload_pd(p, lanes64(m)); }
  static reg loadand(uint32_t m, const double* p) { return _mm256_and_pd(_mm256_loadu_pd(p), _mm256_castsi256_pd(lanes64(m))); }
  static void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
  static reg blend(uint32_t m, reg a, reg b) { return _mm256_blendv_pd(a, b, _mm256_castsi256_pd(lanes64(m))); }
  static void store(uint32_t m, double* p, reg v) { _mm256_maskstore_pd(p, lanes64(m), v); }
  static reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static reg where_positive(reg u, reg g) { return _mm256_and_pd(g, _mm256_cmp_pd(u, zero(), _CMP_GT_OQ)); }
  static reg orbits(reg a, reg b) { return _mm256_or_pd(a, b); }
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    even = _mm256_permute4x64_pd(_mm256_unpacklo_pd(lo, hi), 0xD8);
    odd = _mm256_permute4x64_pd(_mm256_unpackhi_pd(lo, hi), 0xD8);
  }
  static reg dup_halfz(uint32_t m, const double* p) {
    const __m128d h = _mm_maskload_pd(p, _mm256_castsi256_si128(lanes64(m)));
    return _mm256_permute4x64_pd(_mm256_castpd128_pd256(h), 0x50);
  }
};
#else
template <typename T>
struct Vec {  // one lane: the kernels' scalar form
  static constexpr int N = 1;
  using reg = T;
  static reg zero() { return T(0); }
  static reg set1(T v) { return v; }
  static reg load(const T* p) { return *p; }
  static reg loadz(uint32_t m, const T* p) { return (m & 1u) ? *p : T(0); }
  static reg loadm(uint32_t m, const T* p) { return loadz(m, p); }
  static reg loadand(uint32_t m, const T* p) { return loadz(m, p); }
  static void store(T* p, reg v) { *p = v; }
  static reg blend(uint32_t m, reg a, reg b) { return (m & 1u) ? b : a; }
  static void store(uint32_t m, T* p, reg v) {
    if (m & 1u) *p = v;
  }
  static reg mul(reg a, reg b) { return a * b; }
  static reg fma(reg a, reg b, reg c) { return std::fma(a, b, c); }
  static reg where_positive(reg u, reg g) { return u > T(0) ? g : T(0); }
  static reg orbits(reg a, reg b) { return a + b; }  // one lane: a sum keeps a NaN as well
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    even = lo;
    odd = hi;
  }
};
#endif

// Lanes [lo, hi) of N, as a mask.
template <int N>
inline uint32_t lane_range(int64_t lo, int64_t hi) {
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, N);
  if (hi <= lo) return 0u;
  return static_cast<uint32_t>(((uint64_t{1} << (hi - lo)) - 1) << lo);
}
template <int N>
constexpr uint32_t all_lanes() {
  return static_cast<uint32_t>((uint64_t{1} << N) - 1);
}

// Sum of a vector's lanes in double, in a fixed order: the two halves' lanes pairwise, then a
// tree (a few instructions; a sum in lane order is a chain of N dependent additions, and the
// correlations of a small plane waited on four of them).
template <typename T>
inline double lane_sum(typename Vec<T>::reg v) {
#if ASL_SIMD == 2
  if constexpr (std::is_same_v<T, float>) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  } else {
    return _mm512_reduce_add_pd(v);
  }
#elif ASL_SIMD == 1
  __m256d s;
  if constexpr (std::is_same_v<T, float>) {
    s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  } else {
    s = v;
  }
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#else
  return static_cast<double>(v);
#endif
}

// ---------------------------------------------------------------------------------------------
// NCHW planes
// ---------------------------------------------------------------------------------------------
// How one channel's planes load their taps, worked out once per call: per output vector, the
// masks of its four loads (lanes outside the source or beyond the output are masked off).
//  - rows: vector k of every output row covers columns k N ...; column stride 1: the taps c and
//    c + 1 are two loads from c0[k] and c0[k] + 1 (masks m[2k], m[2k + 1]); stride 2: both are in
//    the 2N values from c0[k] (even and odd elements), loaded as two halves. The row taps' rows
//    are checked per row.
//  - multi (planes no wider than a vector, see PlaneMap::multi_row): several whole rows per
//    vector; vector k (flat outputs k N ...) loads from k N + offr W + offc (+1, +W, +W+1) with
//    masks m[4k .. 4k + 3].
// Planes that fit in four AVX-512 vectors of floats whose outputs fit in one, at stride 2 (8 x 8 ->
// 4 x 4): each tap of the whole output is one permute across the four vectors, where the row
// loops would make every output row a quarter-filled vector with four masked loads.
template <typename T>
constexpr bool whole_plane_type() {
#if ASL_SIMD == 2
  return std::is_same_v<T, float>;
#else
  return false;
#endif
}
template <typename T>
bool whole_plane(const PlaneMap& m) {
  return whole_plane_type<T>() && m.sr == 2 && m.sc == 2 && m.H * m.W > 0 && m.H * m.W <= 64 && m.Ho * m.Wo <= 16;
}

template <typename T>
struct PlanePlan {
  static constexpr int N = Vec<T>::N;
  // The load and store masks depend on the integer offsets only: channels that share them share
  // one table (see with_weights), so a call builds a table per distinct offset, not per channel.
  struct Lanes {
    std::vector<int64_t> c0;
    std::vector<uint32_t> m, out;
    std::vector<T> zeros;  // rows: read in place of a source row outside the plane (built once,
                           // not looked up per plane in thread-local storage)
    // rows: the vectors [full_lo, full_hi) load and store whole; multi: their loads lie inside
    // the plane
    int64_t full_lo = 0, full_hi = 0;
    // whole (see whole_plane): tap k of output lane o is input element fidx[16 k + o] (lanes in
    // fm[k]); input element 16 j + l takes the term of output gidx[16 j + l] by tap gtap[16 j + l]
    // (lanes in gm[j]; at stride 2 an input takes at most one term)
    std::vector<int32_t> fidx, gidx, gtap;
    uint32_t fm[4] = {}, gm[4] = {};
  };
  PlaneMap map;
  T w[4];
  bool multi = false, whole = false;
  std::shared_ptr<const Lanes> lanes;

  PlanePlan() = default;
  PlanePlan(const PlaneMap& pm, const T* wts) : map(pm) {
    std::copy(wts, wts + 4, w);
    multi = pm.multi_row<N>();
    whole = whole_plane<T>(pm);
    auto l = std::make_shared<Lanes>();
    lanes = l;
    if (whole) {
      l->fidx.assign(4 * 16, 0);
      l->gidx.assign(4 * 16, 0);
      l->gtap.assign(4 * 16, 0);
      for (int k = 0; k < 4; ++k)
        for (int64_t i = 0; i < pm.Ho; ++i)
          for (int64_t j = 0; j < pm.Wo; ++j) {
            const int64_t r = i * 2 + pm.offr + (k >> 1), c = j * 2 + pm.offc + (k & 1), o = i * pm.Wo + j;
            if (r < 0 || r >= pm.H || c < 0 || c >= pm.W) continue;
            const int64_t e = r * pm.W + c;
            l->fidx[16 * k + o] = static_cast<int32_t>(e);
            l->fm[k] |= 1u << o;
            l->gidx[e] = static_cast<int32_t>(o);
            l->gtap[e] = k;
            l->gm[e / 16] |= 1u << (e % 16);
          }
      return;
    }
    std::vector<int64_t>& c0 = l->c0;
    std::vector<uint32_t>& m = l->m;
    std::vector<uint32_t>& out = l->out;
    if (multi) {
      const int64_t W = pm.W, P = pm.H * W, nvec = (P + N - 1) / N;
      const uint32_t row0 = lane_range<N>(-pm.offc, W - pm.offc) & lane_range<N>(0, W);
      const uint32_t row1 = lane_range<N>(-pm.offc - 1, W - pm.offc - 1) & lane_range<N>(0, W);
      m.resize(4 * nvec);
      out.resize(nvec);
      for (int64_t k = 0; k < nvec; ++k) {
        uint32_t rm0 = 0, rm1 = 0, c0m = 0, c1m = 0;
        for (int64_t rr = 0; rr < N / W && k * (N / W) + rr < pm.H; ++rr) {
          const int64_t i = k * (N / W) + rr, r = i + pm.offr;
          const uint32_t bits = lane_range<N>(rr * W, (rr + 1) * W);
          if (r >= 0 && r < pm.H) rm0 |= bits;
          if (r + 1 >= 0 && r + 1 < pm.H) rm1 |= bits;
          c0m |= row0 << (rr * W);
          c1m |= row1 << (rr * W);
        }
        m[4 * k] = rm0 & c0m;
        m[4 * k + 1] = rm0 & c1m;
        m[4 * k + 2] = rm1 & c0m;
        m[4 * k + 3] = rm1 & c1m;
        out[k] = lane_range<N>(0, P - k * N);
      }
      // the vectors whose four loads lie inside the plane: read whole, masked afterwards
      const int64_t shift = pm.offr * W + pm.offc;
      int64_t lo = 0;
      while (lo < nvec && lo * N + shift < 0) ++lo;
      int64_t hi = lo;
      while (hi < nvec && hi * N + shift + W + 1 + N <= P) ++hi;
      l->full_lo = lo;
      l->full_hi = hi;
      return;
    }
    const int64_t nvec = (pm.Wo + N - 1) / N;
    l->zeros.assign(static_cast<size_t>(pm.W + 2 * N + 2), T(0));
    c0.resize(nvec);
    m.resize(2 * nvec);
    out.resize(nvec);
    for (int64_t k = 0; k < nvec; ++k) {
      const int64_t q0 = k * N;
      out[k] = lane_range<N>(0, pm.Wo - q0);
      if (pm.sc == 1) {
        c0[k] = q0 + pm.offc;
        m[2 * k] = lane_range<N>(-c0[k], pm.W - c0[k]) & out[k];
        m[2 * k + 1] = lane_range<N>(-c0[k] - 1, pm.W - c0[k] - 1) & out[k];
      } else {
        c0[k] = 2 * q0 + pm.offc;
        m[2 * k] = lane_range<N>(-c0[k], pm.W - c0[k]);
        m[2 * k + 1] = lane_range<N>(-c0[k] - N, pm.W - c0[k] - N);
      }
    }
    // The masks are lane ranges cut by the row's two ends, so the vectors with every lane of
    // every load and of the store inside are one run.
    constexpr uint32_t full = all_lanes<N>();
    auto whole = [&](int64_t k) { return m[2 * k] == full && m[2 * k + 1] == full && out[k] == full; };
    int64_t lo = 0;
    while (lo < nvec && !whole(lo)) ++lo;
    int64_t hi = lo;
    while (hi < nvec && whole(hi)) ++hi;
    l->full_lo = lo;
    l->full_hi = hi;
  }
  // The same offsets with other weights (another channel), sharing the tables.
  PlanePlan with_weights(const T* wts) const {
    PlanePlan p = *this;
    std::copy(wts, wts + 4, p.w);
    return p;
  }
  int64_t vectors() const { return lanes ? static_cast<int64_t>(lanes->out.size()) : 0; }
};

// The four taps of one output vector: x0, x1 from the upper source row, x2, x3 from the lower.
template <typename T>
struct Taps {
  typename Vec<T>::reg x0, x1, x2, x3;
};

// The two column taps at row + c0 (column stride SC) with their load masks.
template <typename T, int SC>
inline void column_taps(const T* row, uint32_t m0, uint32_t m1, typename Vec<T>::reg& t0, typename Vec<T>::reg& t1) {
  using V = Vec<T>;
  if constexpr (SC == 1) {
    t0 = V::loadm(m0, row);
    t1 = V::loadm(m1, row + 1);
  } else {
    V::deinterleave(V::loadm(m0, row), V::loadm(m1, row + V::N), t0, t1);
  }
}

// Calls fn(e, om, taps) for every output vector of a plane: e its first output element, om its
// lanes. A source row outside the plane is read as a row of zeros, and the vectors inside both
// ends of the rows ([full_lo, full_hi)) load and store whole, so the loop over them has no
// branch. fn is taken and returned by value: its state is the loop's own (registers), which
// the stores it makes cannot alias, and the plan's arrays are read through restrict locals for
// the same reason.
template <typename T, int SC, typename Fn>
inline Fn for_each_vector_rows(const T* src, const PlanePlan<T>& p, Fn fn) {
  using V = Vec<T>;
  constexpr int N = V::N;
  const int64_t H = p.map.H, W = p.map.W, Ho = p.map.Ho, Wo = p.map.Wo, sr = p.map.sr, offr = p.map.offr;
  const int64_t nvec = p.vectors(), k_lo = p.lanes->full_lo, k_hi = p.lanes->full_hi;
  const int64_t* __restrict c0 = p.lanes->c0.data();
  const uint32_t* __restrict mk = p.lanes->m.data();
  const uint32_t* __restrict om = p.lanes->out.data();
  const T* zeros = p.lanes->zeros.data();
  for (int64_t i = 0; i < Ho; ++i) {
    const int64_t r = i * sr + offr;
    const T* a = r >= 0 && r < H ? src + r * W : zeros;
    const T* b = r + 1 >= 0 && r + 1 < H ? src + (r + 1) * W : zeros;
    const int64_t e0 = i * Wo;
    auto masked = [&](int64_t k) {
      Taps<T> x;
      column_taps<T, SC>(a + c0[k], mk[2 * k], mk[2 * k + 1], x.x0, x.x1);
      column_taps<T, SC>(b + c0[k], mk[2 * k], mk[2 * k + 1], x.x2, x.x3);
      fn(e0 + k * N, om[k], x);
    };
    for (int64_t k = 0; k < k_lo; ++k) masked(k);
    for (int64_t k = k_lo; k < k_hi; ++k) {
      Taps<T> x;
      if constexpr (SC == 1) {
        x = {V::load(a + c0[k]), V::load(a + c0[k] + 1), V::load(b + c0[k]), V::load(b + c0[k] + 1)};
      } else {
        V::deinterleave(V::load(a + c0[k]), V::load(a + c0[k] + N), x.x0, x.x1);
        V::deinterleave(V::load(b + c0[k]), V::load(b + c0[k] + N), x.x2, x.x3);
      }
      fn(e0 + k * N, all_lanes<N>(), x);
    }
    for (int64_t k = k_hi; k < nvec; ++k) masked(k);
  }
  return fn;
}

template <typename T, typename Fn>
inline Fn for_each_vector(const T* src, const PlanePlan<T>& p, Fn fn) {
  using V = Vec<T>;
  constexpr int N = V::N;
  if (p.multi) {
    const int64_t W = p.map.W, shift = p.map.offr * W + p.map.offc, nvec = p.vectors();
    const uint32_t* __restrict mk = p.lanes->m.data();
    const uint32_t* __restrict om = p.lanes->out.data();
    auto vec = [&](int64_t k, auto load) {
      const T* base = src + k * N + shift;
      const uint32_t* m = mk + 4 * k;
      fn(k * N, om[k], Taps<T>{load(m[0], base), load(m[1], base + 1), load(m[2], base + W), load(m[3], base + W + 1)});
    };
    const auto masked = [](uint32_t m, const T* q) { return V::loadm(m, q); };
    const auto inside = [](uint32_t m, const T* q) { return V::loadand(m, q); };
    const int64_t lo = p.lanes->full_lo, hi = p.lanes->full_hi;
    for (int64_t k = 0; k < lo; ++k) vec(k, masked);
    for (int64_t k = lo; k < hi; ++k) vec(k, inside);
    for (int64_t k = hi; k < nvec; ++k) vec(k, masked);
    return fn;
  }
  if (p.map.sc == 1) return for_each_vector_rows<T, 1>(src, p, fn);
  return for_each_vector_rows<T, 2>(src, p, fn);
}

template <typename T>
inline typename Vec<T>::reg blend4(const typename Vec<T>::reg* w, const Taps<T>& x) {
  using V = Vec<T>;
  typename V::reg acc = V::mul(w[0], x.x0);
  acc = V::fma(w[1], x.x1, acc);
  acc = V::fma(w[2], x.x2, acc);
  return V::fma(w[3], x.x3, acc);
}

template <typename T>
inline void store_vector(T* p, uint32_t m, typename Vec<T>::reg v) {
  if (m == all_lanes<Vec<T>::N>()) Vec<T>::store(p, v);
  else Vec<T>::store(m, p, v);
}

// out[i, j] = w0 s[r, c] + w1 s[r, c + 1] + w2 s[r + 1, c] + w3 s[r + 1, c + 1] with
// (r, c) = (i * sr + offr, j * sc + offc), zeros outside src. The forward pass, and at stride 1
// the input gradient (grad_output sampled at the mirrored offsets with the weights reversed).
template <typename T>
void sample_plane(const T* src, T* out, const PlanePlan<T>& p) {
  using V = Vec<T>;
  using reg = typename V::reg;
  struct Blend {
    reg w0, w1, w2, w3;
    T* out;
    int64_t last_full;
    void operator()(int64_t e, uint32_t om, const Taps<T>& x) {
      const reg w[4] = {w0, w1, w2, w3};
      const reg v = blend4<T>(w, x);
      if (om == all_lanes<V::N>() || e <= last_full) V::store(out + e, v);
      else store_vector<T>(out + e, om, v);
    }
  };
  // A vector short of the row's end is stored whole while it stays inside the plane: the lanes
  // past the row belong to outputs stored later (AVX2's masked stores are slow).
  for_each_vector<T>(src, p, Blend{V::set1(p.w[0]), V::set1(p.w[1]), V::set1(p.w[2]), V::set1(p.w[3]), out,
                                   p.map.Ho * p.map.Wo - V::N});
}

// The four correlations sum over (i, j) of g[i, j] * s[tap (a, b) of (i, j)] of one plane, for
// the shift gradient. Vector sums go to double every 512 outputs or so, in a fixed order.
template <typename T>
void correlate_plane(const T* g, const T* src, const PlanePlan<T>& p, double* corr) {
  using V = Vec<T>;
  using reg = typename V::reg;
  constexpr int N = V::N;
  struct Correlate {
    const T* g;
    double* corr;
    reg a0, a1, a2, a3;
    int64_t since;
    void operator()(int64_t e, uint32_t om, const Taps<T>& x) {
      const reg gv = om == all_lanes<N>() ? V::load(g + e) : V::loadz(om, g + e);
      a0 = V::fma(gv, x.x0, a0);
      a1 = V::fma(gv, x.x1, a1);
      a2 = V::fma(gv, x.x2, a2);
      a3 = V::fma(gv, x.x3, a3);
      if (++since * N >= 512) flush();
    }
    void flush() {
      corr[0] += lane_sum<T>(a0);
      corr[1] += lane_sum<T>(a1);
      corr[2] += lane_sum<T>(a2);
      corr[3] += lane_sum<T>(a3);
      a0 = a1 = a2 = a3 = V::zero();
      since = 0;
    }
  };
  for_each_vector<T>(src, p, Correlate{g, corr, V::zero(), V::zero(), V::zero(), V::zero(), 0}).flush();
}

// Input gradient at strides (2, 2): every input element takes at most one term, from the output
// whose tap it is: gx[r, q] = W[a][b] g[(r - offr - a) / 2, (q - offc - b) / 2] with a, b the
// parities of r - offr and q - offc. Rows alternate between W[a][0] and W[a][1] per element.
template <typename T>
void upsample2_plane(const T* g, T* gx, const PlaneMap& m, const T* wts) {
  using V = Vec<T>;
  constexpr int N = V::N;
  // m maps the forward pass: H x W is the input (gx), Ho x Wo the output (g)
  for (int64_t r = 0; r < m.H; ++r) {
    T* o = gx + r * m.W;
    const int64_t t = r - m.offr, a = t & 1, i = (t - a) / 2;
    if (i < 0 || i >= m.Ho) {
      std::fill(o, o + m.W, T(0));
      continue;
    }
    const T* grow = g + i * m.Wo;
    const T wa0 = wts[2 * a], wa1 = wts[2 * a + 1];
    const int64_t qs = m.offc & 1;  // first column whose q - offc is even
    if (qs == 1 && m.W > 0) {
      const int64_t j = (-m.offc - 1) / 2;  // q = 0, b = 1 (exact: -offc - 1 is even)
      o[0] = (j >= 0 && j < m.Wo) ? wa1 * grow[j] : T(0);
    }
    if constexpr (N >= 2) {
      alignas(64) T pat[N];
      for (int l = 0; l < N; ++l) pat[l] = (l & 1) ? wa1 : wa0;
      const typename V::reg wp = V::load(pat);
      for (int64_t q0 = qs; q0 < m.W; q0 += N) {
        const int64_t j0 = (q0 - m.offc) / 2;
        const typename V::reg d = V::dup_halfz(lane_range<N / 2>(-j0, m.Wo - j0), grow + j0);
        // whole while inside the plane: lanes past the row are stored again with the next row
        if ((r * m.W + q0 + N) <= m.H * m.W) V::store(o + q0, V::mul(wp, d));
        else V::store(lane_range<N>(0, m.W - q0), o + q0, V::mul(wp, d));
      }
    } else {
      for (int64_t q = qs; q < m.W; ++q) {
        const int64_t u = q - m.offc, b = u & 1, j = (u - b) / 2;
        o[q] = (j >= 0 && j < m.Wo) ? (b ? wa1 : wa0) * grow[j] : T(0);
      }
    }
  }
}

// Input gradient at any strides, element by element (taps in reverse order, as everywhere).
template <typename T>
void transposed_plane_scalar(const T* g, T* gx, const PlaneMap& m, const T* wts) {
  for (int64_t r = 0; r < m.H; ++r) {
    for (int64_t q = 0; q < m.W; ++q) {
      T acc = T(0);
      bool first = true;
      for (int k = 3; k >= 0; --k) {
        const int64_t a = k >> 1, b = k & 1;
        const int64_t u = r - m.offr - a, v = q - m.offc - b;
        if (u < 0 || v < 0 || u % m.sr || v % m.sc) continue;
        const int64_t i = u / m.sr, j = v / m.sc;
        if (i >= m.Ho || j >= m.Wo) continue;
        acc = first ? wts[k] * g[i * m.Wo + j] : std::fma(wts[k], g[i * m.Wo + j], acc);
        first = false;
      }
      gx[r * m.W + q] = acc;
    }
  }
}

// The forward pass at column strides other than 1 and 2, element by element.
template <typename T>
void sample_plane_scalar(const T* src, T* out, const PlaneMap& m, const T* wts) {
  for (int64_t i = 0; i < m.Ho; ++i) {
    for (int64_t j = 0; j < m.Wo; ++j) {
      T x[4];
      for (int k = 0; k < 4; ++k) {
        const int64_t r = i * m.sr + m.offr + (k >> 1), c = j * m.sc + m.offc + (k & 1);
        x[k] = (r >= 0 && r < m.H && c >= 0 && c < m.W) ? src[r * m.W + c] : T(0);
      }
      T acc = wts[0] * x[0];
      for (int k = 1; k < 4; ++k) acc = std::fma(wts[k], x[k], acc);
      out[i * m.Wo + j] = acc;
    }
  }
}

template <typename T>
void correlate_plane_scalar(const T* g, const T* src, const PlaneMap& m, double* corr) {
  for (int64_t i = 0; i < m.Ho; ++i) {
    for (int64_t j = 0; j < m.Wo; ++j) {
      const double gv = static_cast<double>(g[i * m.Wo + j]);
      for (int k = 0; k < 4; ++k) {
        const int64_t r = i * m.sr + m.offr + (k >> 1), c = j * m.sc + m.offc + (k & 1);
        if (r >= 0 && r < m.H && c >= 0 && c < m.W) corr[k] += gv * static_cast<double>(src[r * m.W + c]);
      }
    }
  }
}

#if ASL_SIMD == 2
// Whole planes (see whole_plane), AVX-512 floats.
struct WholePlane {
  __m512 x[4];  // the plane, zeros past its end
  // tap k of every output: lanes outside the source zero
  __m512 tap(const PlanePlan<float>::Lanes& l, int k) const {
    const __m512i idx = _mm512_loadu_si512(l.fidx.data() + 16 * k);
    const __mmask16 m = static_cast<__mmask16>(l.fm[k]);
    const __mmask16 hi = _mm512_mask_cmpge_epi32_mask(m, idx, _mm512_set1_epi32(32));
    const __m512 a = _mm512_maskz_permutex2var_ps(m, x[0], idx, x[1]);
    const __m512 b = _mm512_maskz_permutex2var_ps(m, x[2], idx, x[3]);
    return _mm512_mask_blend_ps(hi, a, b);
  }
  WholePlane(const float* src, int64_t P) {
    for (int v = 0; v < 4; ++v)
      x[v] = 16 * v < P ? Vec<float>::loadz(lane_range<16>(0, P - 16 * v), src + 16 * v) : _mm512_setzero_ps();
  }
};

inline void whole_forward(const float* src, float* out, const PlanePlan<float>& p) {
  const PlanePlan<float>::Lanes& l = *p.lanes;
  const WholePlane x(src, p.map.H * p.map.W);
  __m512 acc = _mm512_mul_ps(_mm512_set1_ps(p.w[0]), x.tap(l, 0));
  for (int k = 1; k < 4; ++k) acc = _mm512_fmadd_ps(_mm512_set1_ps(p.w[k]), x.tap(l, k), acc);
  Vec<float>::store(lane_range<16>(0, p.map.Ho * p.map.Wo), out, acc);
}

// Each input element's one term at stride 2: its tap's weight times its output's gradient.
inline void whole_input_grad(const float* g, float* gx, const PlanePlan<float>& p) {
  const PlanePlan<float>::Lanes& l = *p.lanes;
  const int64_t P = p.map.H * p.map.W;
  const __m512 gv = Vec<float>::loadz(lane_range<16>(0, p.map.Ho * p.map.Wo), g);
  const __m512 wv = _mm512_maskz_loadu_ps(0xF, p.w);
  for (int v = 0; 16 * v < P; ++v) {
    const __m512 t = _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(l.gm[v]), _mm512_loadu_si512(l.gidx.data() + 16 * v), gv);
    const __m512 w = _mm512_permutexvar_ps(_mm512_loadu_si512(l.gtap.data() + 16 * v), wv);
    Vec<float>::store(lane_range<16>(0, P - 16 * v), gx + 16 * v, _mm512_mul_ps(w, t));
  }
}

// corr[k] = the sum over the outputs of g times tap k, each product rounded to float, summed in
// double by lane_sum.
inline void whole_correlations(const float* g, const float* src, const PlanePlan<float>& p, double* corr) {
  const PlanePlan<float>::Lanes& l = *p.lanes;
  const WholePlane x(src, p.map.H * p.map.W);
  const __m512 gv = Vec<float>::loadz(lane_range<16>(0, p.map.Ho * p.map.Wo), g);
  for (int k = 0; k < 4; ++k) corr[k] += lane_sum<float>(_mm512_mul_ps(gv, x.tap(l, k)));
}
#endif

// One channel's forward plane, input-gradient plane and shift-gradient correlations, with the
// plans of the forward sampling (fw) and, at stride 1, of the input gradient's (gr).
template <typename T>
void forward_plane(const T* x, T* y, const PlanePlan<T>& fw) {
#if ASL_SIMD == 2
  if constexpr (whole_plane_type<T>())
    if (fw.whole) return whole_forward(x, y, fw);
#endif
  if (fw.map.vectorized()) sample_plane<T>(x, y, fw);
  else sample_plane_scalar<T>(x, y, fw.map, fw.w);
}

// The planes [b, e) of an NCHW tensor (plane i of channel i % C, C = fw.size()), in one loop here
// so that the per-plane kernels inline into it, and the channel counted rather than divided for:
// at 8 x 8 planes a call and a division per plane were a tenth of the forward's time.
template <typename T>
void forward_planes(const T* x, T* y, int64_t P, int64_t Po, const std::vector<PlanePlan<T>>& fw, int64_t b, int64_t e) {
  const int64_t C = static_cast<int64_t>(fw.size());
  for (int64_t i = b, c = b % C; i < e; ++i, c = c + 1 == C ? 0 : c + 1) forward_plane<T>(x + i * P, y + i * Po, fw[c]);
}

// The backward of the planes [b, e): each one's input gradient (when gx is given, with the plans
// gr) and, when want_shift, its four correlations, passed to on_corr(i, c, corr).
template <typename T, typename Fn>
void backward_planes(const T* g, const T* x, T* gx, int64_t P, int64_t Po, const std::vector<PlanePlan<T>>& fw,
                     const std::vector<PlanePlan<T>>& gr, int64_t b, int64_t e, bool want_shift, const Fn& on_corr) {
  const int64_t C = static_cast<int64_t>(fw.size());
  for (int64_t i = b, c = b % C; i < e; ++i, c = c + 1 == C ? 0 : c + 1) {
    if (gx != nullptr) input_grad_plane<T>(g + i * Po, gx + i * P, fw[c], gr[c]);
    if (want_shift) {
      double corr[4];
      correlations_plane<T>(g + i * Po, x + i * P, fw[c], corr);
      on_corr(i, c, corr);
    }
  }
}

// The input gradient's plan: at stride 1 the forward sampling of grad_output at the mirrored
// offsets with the weights reversed (taps in reverse order).
template <typename T>
PlanePlan<T> input_grad_plan(const PlaneMap& m, const T* w) {
  if (m.sr != 1 || m.sc != 1) return PlanePlan<T>();
  const T rev[4] = {w[3], w[2], w[1], w[0]};
  return PlanePlan<T>(PlaneMap{m.Ho, m.Wo, m.H, m.W, 1, 1, -m.offr - 1, -m.offc - 1}, rev);
}

// The input gradient's plan of a channel whose offsets are those of `like`'s channel.
template <typename T>
PlanePlan<T> input_grad_plan_like(const PlanePlan<T>& like, const T* w) {
  const T rev[4] = {w[3], w[2], w[1], w[0]};
  return like.with_weights(rev);
}

template <typename T>
void input_grad_plane(const T* g, T* gx, const PlanePlan<T>& fw, const PlanePlan<T>& gr) {
  const PlaneMap& m = fw.map;
  if (m.sr == 1 && m.sc == 1) return sample_plane<T>(g, gx, gr);
#if ASL_SIMD == 2
  if constexpr (whole_plane_type<T>())
    if (fw.whole) return whole_input_grad(g, gx, fw);
#endif
  if (m.sr == 2 && m.sc == 2 && Vec<T>::N >= 2) return upsample2_plane<T>(g, gx, m, fw.w);
  transposed_plane_scalar<T>(g, gx, m, fw.w);
}

template <typename T>
void correlations_plane(const T* g, const T* x, const PlanePlan<T>& fw, double* corr) {
  corr[0] = corr[1] = corr[2] = corr[3] = 0;
#if ASL_SIMD == 2
  if constexpr (whole_plane_type<T>())
    if (fw.whole) return whole_correlations(g, x, fw, corr);
#endif
  if (fw.map.vectorized()) correlate_plane<T>(g, x, fw, corr);
  else correlate_plane_scalar<T>(g, x, fw.map, corr);
}

// ---------------------------------------------------------------------------------------------
// channels_last: the sparse stencil over the channels' distinct tap offsets
// ---------------------------------------------------------------------------------------------
// One tap offset (ra, cb) that some channels use, and per channel vector v its weights (zero for
// the channels that do not use it) and the mask of those that do.
template <typename T>
struct Stencil {
  static constexpr int N = Vec<T>::N;
  struct Tap {
    int64_t ra, cb;
  };
  std::vector<Tap> taps;  // ascending (ra, cb)
  int64_t nv = 0;         // channel vectors
  std::vector<T> w;       // [tap][nv * N]
  std::vector<uint32_t> m;  // [tap][nv]
  std::vector<int> per_vector;  // taps used by each channel vector
  int most = 0;  // the most taps any channel vector uses
  // When every channel vector's channels take at most four adjacent integer offsets per axis
  // (shifts within a pixel, and those training has carried a pixel or so past one) and the
  // channels fill whole vectors, each lane picks its own four taps by blends (see quad_row): per
  // vector, the smallest offsets, the lanes one or more past them (rm, cm), two or more (rm2,
  // cm2) and three (rm3, cm3), each set within the one before, and the weights
  // w[(v 4 + k) N + lane] of tap k; fq samples the forward pass, gq the stride-1 input gradient
  // (grad_output at the mirrored offsets, the weights reversed). spread: the most any vector's
  // offsets reach past its smallest (the stride-2 input gradient takes up to 2).
  struct Quad {
    int64_t r0, c0;
    uint32_t rm, cm, rm2, cm2, rm3, cm3;
  };
  struct QuadSet {
    std::vector<Quad> q;
    std::vector<T> w;
  };
  QuadSet fq, gq;
  bool quad_ok = false;
  int spread = 0;

  const T* weights(size_t t, int64_t v) const { return w.data() + (t * nv + v) * N; }
  uint32_t mask(size_t t, int64_t v) const { return m[t * nv + v]; }
  // The index of tap (ra, cb), or -1 when no output reaches it.
  int64_t tap_index(int64_t ra, int64_t cb) const {
    const auto it = std::lower_bound(taps.begin(), taps.end(), Tap{ra, cb}, [](const Tap& a, const Tap& b) {
      return a.ra < b.ra || (a.ra == b.ra && a.cb < b.cb);
    });
    return it != taps.end() && it->ra == ra && it->cb == cb ? static_cast<int64_t>(it - taps.begin()) : -1;
  }
};

// The Stencil's quads (forward, or mirrored for the input gradient); false when some channel
// vector's offsets are not within four adjacent values per axis. spread: the most any reaches.
template <typename T>
bool make_quads(const std::vector<ChanTaps<T>>& ch, bool mirrored, typename Stencil<T>::QuadSet& out, int& spread) {
  constexpr int N = Vec<T>::N;
  const int64_t nv = static_cast<int64_t>(ch.size()) / N;
  const auto offr = [&](int64_t c) { return mirrored ? -ch[c].offr - 1 : ch[c].offr; };
  const auto offc = [&](int64_t c) { return mirrored ? -ch[c].offc - 1 : ch[c].offc; };
  out.q.assign(nv, {0, 0, 0u, 0u, 0u, 0u, 0u, 0u});
  out.w.assign(nv * 4 * N, T(0));
  for (int64_t v = 0; v < nv; ++v) {
    auto& q = out.q[v];
    q.r0 = q.c0 = std::numeric_limits<int64_t>::max();
    for (int64_t c = v * N; c < (v + 1) * N; ++c) {
      q.r0 = std::min(q.r0, offr(c));
      q.c0 = std::min(q.c0, offc(c));
    }
    for (int64_t c = v * N; c < (v + 1) * N; ++c) {
      const int64_t dr = offr(c) - q.r0, dc = offc(c) - q.c0;
      if (dr > 3 || dc > 3) return false;
      spread = static_cast<int>(std::max<int64_t>({spread, dr, dc}));
      for (int k = 0; k < 4; ++k) out.w[(v * 4 + k) * N + c % N] = ch[c].w[mirrored ? 3 - k : k];
      q.rm |= static_cast<uint32_t>(dr >= 1) << (c % N);
      q.cm |= static_cast<uint32_t>(dc >= 1) << (c % N);
      q.rm2 |= static_cast<uint32_t>(dr >= 2) << (c % N);
      q.cm2 |= static_cast<uint32_t>(dc >= 2) << (c % N);
      q.rm3 |= static_cast<uint32_t>(dr >= 3) << (c % N);
      q.cm3 |= static_cast<uint32_t>(dc >= 3) << (c % N);
    }
  }
  return true;
}

// Taps of channel c at (offr + a, offc + b) with weight W[2a + b]; taps no output can reach are
// left out (a channel whose taps are all out reads nothing and gives zeros).
template <typename T>
Stencil<T> make_stencil(const std::vector<ChanTaps<T>>& ch, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t sh,
                        int64_t sw) {
  constexpr int N = Vec<T>::N;
  Stencil<T> st;
  const int64_t C = static_cast<int64_t>(ch.size());
  st.nv = (C + N - 1) / N;
  auto reachable = [&](int64_t ra, int64_t cb) {
    return ra + (Ho - 1) * sh >= 0 && ra < H && cb + (Wo - 1) * sw >= 0 && cb < W;
  };
  std::vector<std::pair<int64_t, int64_t>> offs;
  for (const auto& c : ch)
    for (int k = 0; k < 4; ++k) {
      const int64_t ra = c.offr + (k >> 1), cb = c.offc + (k & 1);
      if (reachable(ra, cb)) offs.emplace_back(ra, cb);
    }
  std::sort(offs.begin(), offs.end());
  offs.erase(std::unique(offs.begin(), offs.end()), offs.end());
  st.taps.reserve(offs.size());
  for (const auto& o : offs) st.taps.push_back({o.first, o.second});
  st.w.assign(st.taps.size() * st.nv * N, T(0));
  st.m.assign(st.taps.size() * st.nv, 0u);
  for (int64_t c = 0; c < C; ++c)
    for (int k = 0; k < 4; ++k) {
      const std::pair<int64_t, int64_t> o{ch[c].offr + (k >> 1), ch[c].offc + (k & 1)};
      const auto it = std::lower_bound(offs.begin(), offs.end(), o);
      if (it == offs.end() || *it != o) continue;
      const size_t t = static_cast<size_t>(it - offs.begin());
      st.w[(t * st.nv + c / N) * N + c % N] = ch[c].w[k];
      st.m[t * st.nv + c / N] |= 1u << (c % N);
    }
  st.per_vector.assign(st.nv, 0);
  for (size_t t = 0; t < st.taps.size(); ++t)
    for (int64_t v = 0; v < st.nv; ++v)
      if (st.m[t * st.nv + v]) ++st.per_vector[v];
  for (int n : st.per_vector) st.most = std::max(st.most, n);
  st.quad_ok = C % N == 0 && make_quads<T>(ch, false, st.fq, st.spread) && make_quads<T>(ch, true, st.gq, st.spread);
  return st;
}

// One tap of a row for one channel vector: the element offset it reads at (relative to the row's
// base, for output column 0), its column offset (for the bounds checks of the side columns), its
// row offset, weights, mask and index among the stencil's taps.
template <typename T>
struct RowTap {
  int64_t base, col, row;
  const T* w;
  uint32_t m;
  int64_t tap;
};

constexpr int kMaxStencilTaps = 16;  // channels_last uses the stencil up to this many taps per vector

// Per channel vector v, its taps in order, for the forward pass: tap (ra, cb) of output (i, j)
// reads pixel (i sh + ra, j sw + cb), i.e. base (ra W + cb) C + v N from row i sh's start.
template <typename T>
std::vector<std::vector<RowTap<T>>> forward_lists(const Stencil<T>& st, int64_t W, int64_t C) {
  constexpr int N = Vec<T>::N;
  std::vector<std::vector<RowTap<T>>> out(st.nv);
  for (int64_t v = 0; v < st.nv; ++v)
    for (size_t t = 0; t < st.taps.size(); ++t)
      if (st.mask(t, v))
        out[v].push_back({(st.taps[t].ra * W + st.taps[t].cb) * C + v * N, st.taps[t].cb, st.taps[t].ra,
                          st.weights(t, v), st.mask(t, v), static_cast<int64_t>(t)});
  return out;
}

// Calls fn(std::integral_constant<int, K>()) for K in [0, kMaxStencilTaps]: a tap count known at
// compile time, so that the kernels keep their weights and sums in registers.
template <typename Fn>
inline void with_tap_count(int K, const Fn& fn) {
  switch (K) {
#define ASL_RUN(k) \
  case k:          \
    return fn(std::integral_constant<int, k>());
    ASL_RUN(0) ASL_RUN(1) ASL_RUN(2) ASL_RUN(3) ASL_RUN(4) ASL_RUN(5) ASL_RUN(6) ASL_RUN(7) ASL_RUN(8)
    ASL_RUN(9) ASL_RUN(10) ASL_RUN(11) ASL_RUN(12) ASL_RUN(13) ASL_RUN(14) ASL_RUN(15) ASL_RUN(16)
#undef ASL_RUN
    default:
      TORCH_INTERNAL_ASSERT(false, "active_shift: too many stencil taps");
  }
}

// rows x cols pixels of one channel vector, every tap inside the source (a run of a row between
// its side pixels, or a whole padded image): y[i yrow + j ystep] = sum_k w_k x[i xrow + j xstep +
// base_k], K taps (a compile-time count, so the weights stay in registers). MASKED: each load
// reads only the lanes of the channels that use its tap. Unmasked,
// the lanes of channels that do not use a tap are read too and multiplied by their zero weight
// (exactly nothing unless a value read is inf or NaN; chk then turns NaN, and the caller does the
// block again masked). chk gathers acc * 0 by a bitwise or, which keeps any NaN lane NaN without
// a chain of additions through the loop.
template <typename T, int K, bool MASKED>
inline void stencil_block(const T* x, T* y, const RowTap<T>* rt, int64_t rows, int64_t cols, int64_t xrow, int64_t xstep,
                          int64_t yrow, int64_t ystep, uint32_t store_mask, typename Vec<T>::reg& chk) {
  using V = Vec<T>;
  typename V::reg w[K > 0 ? K : 1];
  int64_t base[K > 0 ? K : 1];
  uint32_t m[K > 0 ? K : 1];
  for (int k = 0; k < K; ++k) {
    w[k] = V::load(rt[k].w);
    base[k] = rt[k].base;
    m[k] = rt[k].m;
  }
  const bool full = store_mask == all_lanes<V::N>();
  const typename V::reg zero = V::zero();
  // channels_last rows of pixels C apart: from 16 float channels on, each vector a pass stores
  // starts a new cache line, which is fetched about 2 KiB ahead so that the stores do not wait
  const int64_t ahead = 2048 / (ystep * static_cast<int64_t>(sizeof(T))) + 1;
  // chk in a register: the reference may alias y (a vector type may alias any), and kept there it
  // would be stored and reloaded at every pixel, a chain through memory
  typename V::reg c = chk;
  for (int64_t i = 0; i < rows; ++i) {
    const T* xr = x + i * xrow;
    T* yr = y + i * yrow;
    for (int64_t j = 0; j < cols; ++j) {
      typename V::reg acc = V::zero();
      for (int k = 0; k < K; ++k) {
        const T* p = xr + base[k] + j * xstep;
        acc = V::fma(w[k], MASKED ? V::loadz(m[k], p) : V::load(p), acc);
      }
      if (!MASKED) c = V::orbits(c, V::mul(acc, zero));
      if (!MASKED) __builtin_prefetch(yr + (j + ahead) * ystep, 1, 3);
      if (full) V::store(yr + j * ystep, acc);
      else V::store(store_mask, yr + j * ystep, acc);
    }
  }
  chk = c;
}

template <typename T, bool MASKED>
inline void stencil_block_k(const T* x, T* y, const RowTap<T>* rt, int K, int64_t rows, int64_t cols, int64_t xrow,
                            int64_t xstep, int64_t yrow, int64_t ystep, uint32_t store_mask, typename Vec<T>::reg& chk) {
  with_tap_count(K, [&](auto k) { stencil_block<T, decltype(k)::value, MASKED>(x, y, rt, rows, cols, xrow, xstep, yrow, ystep, store_mask, chk); });
}

template <typename T>
inline void stencil_block_any(const T* x, T* y, const RowTap<T>* rt, int K, int64_t rows, int64_t cols, int64_t xrow,
                              int64_t xstep, int64_t yrow, int64_t ystep, uint32_t store_mask) {
  typename Vec<T>::reg chk = Vec<T>::zero();
  if (store_mask != all_lanes<Vec<T>::N>()) {  // a channel tail: lanes past the tensor's last channel
    stencil_block_k<T, true>(x, y, rt, K, rows, cols, xrow, xstep, yrow, ystep, store_mask, chk);
    return;
  }
  stencil_block_k<T, false>(x, y, rt, K, rows, cols, xrow, xstep, yrow, ystep, store_mask, chk);
  const double c = lane_sum<T>(chk);
  if (c != c) stencil_block_k<T, true>(x, y, rt, K, rows, cols, xrow, xstep, yrow, ystep, store_mask, chk);
}

// One pixel near the sides: taps whose column col + j falls outside [0, cols) are skipped.
template <typename T>
inline void stencil_pixel(const T* x, T* y, const RowTap<T>* rt, int K, int64_t j, int64_t xstep, int64_t colstep,
                          int64_t cols, uint32_t store_mask) {
  using V = Vec<T>;
  typename V::reg acc = V::zero();
  for (int k = 0; k < K; ++k) {
    const int64_t col = j * colstep + rt[k].col;
    if (col < 0 || col >= cols) continue;
    acc = V::fma(V::load(rt[k].w), V::loadz(rt[k].m, x + rt[k].base + j * xstep), acc);
  }
  V::store(store_mask, y, acc);
}

// Forward, channels_last: output rows [i0, i1) of image x (H x W x C) into y (Ho x Wo x C).
template <typename T>
void stencil_forward_rows(const T* x, T* y, const Stencil<T>& st, const std::vector<std::vector<RowTap<T>>>& lists,
                          int64_t H, int64_t W, int64_t C, int64_t Wo, int64_t sh, int64_t sw, int64_t i0, int64_t i1) {
  constexpr int N = Vec<T>::N;
  RowTap<T> rt[kMaxStencilTaps];
  for (int64_t i = i0; i < i1; ++i) {
    const T* xrow = x + i * sh * W * C;
    for (int64_t v = 0; v < st.nv; ++v) {
      int K = 0;
      int64_t cb_min = 0, cb_max = 0;
      for (const RowTap<T>& t : lists[v]) {
        const int64_t r = i * sh + t.row;
        if (r < 0 || r >= H) continue;
        cb_min = K == 0 ? t.col : std::min(cb_min, t.col);
        cb_max = K == 0 ? t.col : std::max(cb_max, t.col);
        rt[K++] = t;
      }
      // the output columns j whose taps j sw + cb all lie in [0, W)
      int64_t j_lo = 0, j_hi = Wo;
      if (K) {
        j_lo = std::min<int64_t>(Wo, std::max<int64_t>(0, floor_div(-cb_min + sw - 1, sw)));
        j_hi = std::max(j_lo, std::min<int64_t>(Wo, floor_div(W - 1 - cb_max, sw) + 1));
      }
      const uint32_t sm = lane_range<N>(0, C - v * N);
      T* yrow = y + i * Wo * C + v * N;
      for (int64_t j = 0; j < j_lo; ++j) stencil_pixel<T>(xrow, yrow + j * C, rt, K, j, sw * C, sw, W, sm);
      stencil_block_any<T>(xrow + j_lo * sw * C, yrow + j_lo * C, rt, K, 1, j_hi - j_lo, 0, sw * C, 0, C, sm);
      for (int64_t j = j_hi; j < Wo; ++j) stencil_pixel<T>(xrow, yrow + j * C, rt, K, j, sw * C, sw, W, sm);
    }
  }
}

// The input gradient's taps, per (row class r mod sh, column class q mod sw, channel vector v),
// in reverse order. Tap (ra, cb) of output (i, j) reads input (i sh + ra, j sw + cb), so input
// (r, q) of row class rc takes it when ra = rc (mod sh), from output row (r - rc) / sh + row with
// row = -(ra - rc) / sh; and column q = cls + k sw of class cls when cb = cls (mod sw), from
// output column k + col with col = (cls - cb) / sw: base (row Wo + col) C + v N from output row
// (r - rc) / sh's start, + k C.
template <typename T>
std::vector<std::vector<RowTap<T>>> input_grad_lists(const Stencil<T>& st, int64_t Wo, int64_t C, int64_t sh,
                                                     int64_t sw) {
  constexpr int N = Vec<T>::N;
  std::vector<std::vector<RowTap<T>>> out(sh * sw * st.nv);
  for (int64_t rc = 0; rc < sh; ++rc)
    for (int64_t cls = 0; cls < sw; ++cls)
      for (int64_t v = 0; v < st.nv; ++v)
        for (size_t t = st.taps.size(); t-- > 0;) {
          const int64_t ra = st.taps[t].ra, cb = st.taps[t].cb;
          if (!st.mask(t, v) || floor_div(ra - rc, sh) * sh != ra - rc || floor_div(cls - cb, sw) * sw != cls - cb) continue;
          const int64_t row = -floor_div(ra - rc, sh), col = floor_div(cls - cb, sw);
          out[(rc * sw + cls) * st.nv + v].push_back({(row * Wo + col) * C + v * N, col, row, st.weights(t, v), st.mask(t, v),
                                                             static_cast<int64_t>(t)});
        }
  return out;
}

// Input gradient, channels_last: input rows [r0, r1) of gx (H x W x C) from g (Ho x Wo x C).
template <typename T>
void stencil_input_grad_rows(const T* g, T* gx, const Stencil<T>& st, const std::vector<std::vector<RowTap<T>>>& lists,
                             int64_t W, int64_t C, int64_t Ho, int64_t Wo, int64_t sh, int64_t sw, int64_t r0, int64_t r1) {
  using V = Vec<T>;
  constexpr int N = V::N;
  RowTap<T> rt[kMaxStencilTaps];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t rc = ((r % sh) + sh) % sh, ibase = (r - rc) / sh;
    const T* grow = g + ibase * Wo * C;
    for (int64_t v = 0; v < st.nv; ++v) {
      const uint32_t sm = lane_range<N>(0, C - v * N);
      for (int64_t cls = 0; cls < sw; ++cls) {
        T* ocls = gx + (r * W + cls) * C + v * N;
        const int64_t nk = cls < W ? (W - cls + sw - 1) / sw : 0;  // columns of this class
        int K = 0;
        int64_t col_min = 0, col_max = 0;
        for (const RowTap<T>& t : lists[(rc * sw + cls) * st.nv + v]) {
          const int64_t i = ibase + t.row;
          if (i < 0 || i >= Ho) continue;
          col_min = K == 0 ? t.col : std::min(col_min, t.col);
          col_max = K == 0 ? t.col : std::max(col_max, t.col);
          rt[K++] = t;
        }
        if (K == 0) {
          for (int64_t k = 0; k < nk; ++k) V::store(sm, ocls + k * sw * C, V::zero());
          continue;
        }
        // class columns k whose taps' output columns k + col all lie in [0, Wo)
        const int64_t k_lo = std::min(nk, std::max<int64_t>(0, -col_min));
        const int64_t k_hi = std::max(k_lo, std::min(nk, Wo - col_max));
        for (int64_t k = 0; k < k_lo; ++k) stencil_pixel<T>(grow, ocls + k * sw * C, rt, K, k, C, 1, Wo, sm);
        stencil_block_any<T>(grow + k_lo * C, ocls + k_lo * sw * C, rt, K, 1, k_hi - k_lo, 0, C, 0, sw * C, sm);
        for (int64_t k = k_hi; k < nk; ++k) stencil_pixel<T>(grow, ocls + k * sw * C, rt, K, k, C, 1, Wo, sm);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// channels_last images small enough to stay in cache: one zero-bordered copy of the image, then
// every output reads all its taps with plain loads (no side pixels, no per-row tap lists)
// ---------------------------------------------------------------------------------------------
struct PadBox {
  int64_t top = 0, bottom = 0, left = 0, right = 0;
};

// src (rows x cols x C) into buf ((top + rows + bottom) x (left + cols + right) x C), zeros around;
// with ab = (a[C], b[C]) each value x of channel c as relu(fma(x, a[c], b[c])) (BnRelu's value).
template <typename T>
void pad_image(const T* src, int64_t rows, int64_t cols, int64_t C, const PadBox& b, T* buf, const T* ab = nullptr) {
  const int64_t pitch = (b.left + cols + b.right) * C;
  std::fill(buf, buf + b.top * pitch, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    T* d = buf + (b.top + r) * pitch;
    std::fill(d, d + b.left * C, T(0));
    if (ab == nullptr) {
      std::memcpy(d + b.left * C, src + r * cols * C, sizeof(T) * static_cast<size_t>(cols * C));
    } else {
      const T* s = src + r * cols * C;
      T* o = d + b.left * C;
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t c = 0; c < C; ++c) {
          const T u = std::fma(s[j * C + c], ab[c], ab[C + c]);
          o[j * C + c] = u > T(0) ? u : T(0);
        }
    }
    std::fill(d + (b.left + cols) * C, d + pitch, T(0));
  }
  std::fill(buf + (b.top + rows) * pitch, buf + (b.top + rows + b.bottom) * pitch, T(0));
}

// The border the forward taps need: output (i, j) reads (i sh + ra, j sw + cb).
template <typename T>
PadBox forward_pad(const Stencil<T>& st, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t sh, int64_t sw) {
  PadBox b;
  for (const auto& t : st.taps) {
    b.top = std::max(b.top, -t.ra);
    b.bottom = std::max(b.bottom, (Ho - 1) * sh + t.ra - (H - 1));
    b.left = std::max(b.left, -t.cb);
    b.right = std::max(b.right, (Wo - 1) * sw + t.cb - (W - 1));
  }
  return b;
}

// The blended rows' state along one output row of one channel vector (see quad_row): DR, DC
// (0 to 3) are the vector's spreads, how far past r0, c0 its lanes' offsets reach.
template <typename T, int DR, int DC, int SW, typename Tf>
struct QuadCursor {
  static_assert(SW == 1 || SW == 2, "column stride 1 or 2");
  static_assert(DR >= 0 && DR <= 3 && DC >= 0 && DC <= 3, "spreads of at most three");
  using V = Vec<T>;
  using reg = typename V::reg;
  static constexpr int R = DR + 2;  // source rows read
  const T* rows[R];
  bool inside_row[R];
  int64_t C, W, lead, j_lo, j_hi;
  uint32_t rm, cm, rm2, cm2, rm3, cm3;
  Tf tf;
  reg p1[R], p2[R], p3[R];  // per row the last three columns loaded, the last first
  reg x00 = V::zero(), x10 = V::zero();

  QuadCursor(const T* x, const typename Stencil<T>::Quad& q, int64_t H, int64_t W_, int64_t C_, int64_t Wo,
             int64_t sh, int64_t i, const T* zeros, const Tf& tf_)
      : C(C_), W(W_), lead(q.c0 + 1 + DC), rm(q.rm), cm(q.cm), rm2(q.rm2), cm2(q.cm2), rm3(q.rm3), cm3(q.cm3), tf(tf_) {
    // output j's new columns, lead + SW j - (SW - 1) to lead + SW j, lie inside the image for j
    // in [j_lo, j_hi)
    j_lo = std::min<int64_t>(Wo, std::max<int64_t>(0, -floor_div(lead - SW + 1, SW)));
    j_hi = std::max(j_lo, std::min<int64_t>(Wo, floor_div(W - 1 - lead, SW) + 1));
    for (int t = 0; t < R; ++t) {
      const int64_t r = i * sh + q.r0 + t;
      inside_row[t] = r >= 0 && r < H;
      rows[t] = inside_row[t] ? x + r * W * C : zeros;
      p1[t] = p2[t] = p3[t] = V::zero();
    }
    // the columns before the first pixel's: c0 .. lead - 1 at stride 1 (the last gives the
    // first pixel's left taps), c0 .. lead - 2 at stride 2 (whose pixels load their left column)
    for (int64_t k = 0; k < DC + (SW == 1 ? 1 : 0); ++k) column(q.c0 + k, false, x00, x10);
  }
  // the taps of the column of pixels qc: each lane's column picked from qc and the last columns
  // loaded, its rows from those
  inline void column(int64_t qc, bool inside, reg& top, reg& bottom) {
    reg n[R], A[R];
    const bool any = inside || (qc >= 0 && qc < W);
    for (int t = 0; t < R; ++t) n[t] = any ? tf(V::load(rows[t] + qc * C), inside_row[t]) : V::zero();
    for (int t = 0; t < R; ++t) {
      // the column DC past the lane's own: the newest for lanes DC past c0, one older each step less
      if constexpr (DC == 0) A[t] = n[t];
      else if constexpr (DC == 1) A[t] = V::blend(cm, p1[t], n[t]);
      else if constexpr (DC == 2) A[t] = V::blend(cm2, V::blend(cm, p2[t], p1[t]), n[t]);
      else A[t] = V::blend(cm3, V::blend(cm2, V::blend(cm, p3[t], p2[t]), p1[t]), n[t]);
      if constexpr (DC == 3) p3[t] = p2[t];
      if constexpr (DC >= 2) p2[t] = p1[t];
      p1[t] = n[t];
    }
    top = A[0], bottom = A[1];
    if constexpr (DR >= 1) top = V::blend(rm, top, A[1]), bottom = V::blend(rm, bottom, A[2]);
    if constexpr (DR >= 2) top = V::blend(rm2, top, A[2]), bottom = V::blend(rm2, bottom, A[3]);
    if constexpr (DR >= 3) top = V::blend(rm3, top, A[3]), bottom = V::blend(rm3, bottom, A[4]);
  }
  // output pixel j: fn(j, x00, x01, x10, x11)
  template <typename Fn>
  inline void pixel(int64_t j, bool inside, Fn& fn) {
    reg x01, x11;
    // at column stride 2 the left taps are new too (the pixels share no column of taps)
    if (SW == 2) column(lead + 2 * j - 1, inside, x00, x10);
    column(lead + SW * j, inside, x01, x11);
    fn(j, x00, x01, x10, x11);
    x00 = x01, x10 = x11;
  }
};

// channels_last at column stride SW (1 or 2) with a stencil's quads (quad_ok): output row i of one
// channel vector, each lane's own four taps of output pixel j passed to fn(j, x00, x01, x10, x11).
// The taps are picked by blends from the pixels of rows r0..r0 + 1 + DR and columns
// c0..c0 + 1 + DC around the output (r0, c0 the vector's smallest offsets; lanes rm one row or
// more further, rm2 two, and cm, cm2 likewise for columns), and at stride 1 the blends of a
// column are reused by the next pixel: with spreads of 1, three loads and five blends a pixel
// where the stencil makes nine loads and nine multiply-adds (at stride 2 twice the loads and
// blends), and no lane reads another channel's tap (so no non-finite check either). Taps
// outside the image read zeros: rows outside point at `zeros` (W C values), columns outside are
// zero vectors. x is the vector's first channel of the source (H x W x C), source rows i sh + r0
// ... DR, DC may exceed a quad's own spreads (the same taps, more rows or columns read).
template <typename T, int DR, int DC, int SW, typename Fn, typename Tf>
inline void quad_row(const T* x, const typename Stencil<T>::Quad& q, int64_t H, int64_t W, int64_t C, int64_t Wo,
                     int64_t sh, int64_t i, const T* zeros, Fn& fn, const Tf& tf) {
  QuadCursor<T, DR, DC, SW, Tf> k(x, q, H, W, C, Wo, sh, i, zeros, tf);
  for (int64_t j = 0; j < k.j_lo; ++j) k.pixel(j, false, fn);
  for (int64_t j = k.j_lo; j < k.j_hi; ++j) k.pixel(j, true, fn);
  for (int64_t j = k.j_hi; j < Wo; ++j) k.pixel(j, false, fn);
}

// quad_row of two adjacent channel vectors at once (x and zeros at the first one's channels),
// pixel by pixel, so that the row is read and written in runs of two vectors rather than one
// vector in every C channels (forward, 64 channels: 8x64x56x56 1.49 -> 1.39 copies, 1x64x224x224
// 1.63 -> 1.42).
template <typename T, int DR, int DC, int SW, typename Fn0, typename Fn1, typename Tf>
inline void quad_row_pair(const T* x, const typename Stencil<T>::Quad& q0, const typename Stencil<T>::Quad& q1,
                          int64_t H, int64_t W, int64_t C, int64_t Wo, int64_t sh, int64_t i, const T* zeros,
                          Fn0& fn0, Fn1& fn1, const Tf& tf0, const Tf& tf1) {
  constexpr int N = Vec<T>::N;
  QuadCursor<T, DR, DC, SW, Tf> k0(x, q0, H, W, C, Wo, sh, i, zeros, tf0);
  QuadCursor<T, DR, DC, SW, Tf> k1(x + N, q1, H, W, C, Wo, sh, i, zeros + N, tf1);
  const int64_t lo = std::max(k0.j_lo, k1.j_lo), hi = std::max(lo, std::min(k0.j_hi, k1.j_hi));
  for (int64_t j = 0; j < lo; ++j) k0.pixel(j, false, fn0), k1.pixel(j, false, fn1);
  for (int64_t j = lo; j < hi; ++j) k0.pixel(j, true, fn0), k1.pixel(j, true, fn1);
  for (int64_t j = hi; j < Wo; ++j) k0.pixel(j, false, fn0), k1.pixel(j, false, fn1);
}

// Calls body(std::integral_constant<int, S>(), std::integral_constant<int, S>()) with S (0 to 3)
// the larger of a quad's row and column spreads: four forms of each quad loop rather than
// sixteen (a vector that spreads over one axis alone reads one more row or column, as rare as its
// channels' shifts agreeing to the pixel).
template <typename Q, typename Body>
inline void with_quad(const Q& q, const Body& body) {
  if (q.rm3 | q.cm3) body(std::integral_constant<int, 3>(), std::integral_constant<int, 3>());
  else if (q.rm2 | q.cm2) body(std::integral_constant<int, 2>(), std::integral_constant<int, 2>());
  else if (q.rm | q.cm) body(std::integral_constant<int, 1>(), std::integral_constant<int, 1>());
  else body(std::integral_constant<int, 0>(), std::integral_constant<int, 0>());
}

// The pixels a quad row reads, as they are (Plain), or as relu(x a + b) with per-channel a, b
// (BnRelu: a BatchNorm and its ReLU applied on the fly; taps outside the image stay zero).
template <typename T>
struct Plain {
  typename Vec<T>::reg operator()(typename Vec<T>::reg v, bool) const { return v; }
};
template <typename T>
struct BnRelu {
  typename Vec<T>::reg a, b;
  typename Vec<T>::reg operator()(typename Vec<T>::reg v, bool inside) const {
    if (!inside) return v;
    const typename Vec<T>::reg u = Vec<T>::fma(v, a, b);
    return Vec<T>::where_positive(u, u);
  }
};

// quad_row<T, DR, DC, SW> for a quad's spreads and column stride sw (1 or 2).
template <typename T, typename Fn, typename Tf = Plain<T>>
inline void quad_row_any(const T* x, const typename Stencil<T>::Quad& q, int64_t H, int64_t W, int64_t C, int64_t Wo,
                         int64_t sh, int64_t sw, int64_t i, const T* zeros, Fn& fn, const Tf& tf = Tf()) {
  with_quad(q, [&](auto dr, auto dc) {
    constexpr int DR = decltype(dr)::value, DC = decltype(dc)::value;
    if (sw == 2) quad_row<T, DR, DC, 2>(x, q, H, W, C, Wo, sh, i, zeros, fn, tf);
    else quad_row<T, DR, DC, 1>(x, q, H, W, C, Wo, sh, i, zeros, fn, tf);
  });
}

// quad_row_pair for two quads: the spreads either has (the union of their masks) and column
// stride sw.
template <typename T, typename Fn0, typename Fn1, typename Tf>
inline void quad_row_pair_any(const T* x, const typename Stencil<T>::Quad& q0, const typename Stencil<T>::Quad& q1,
                              int64_t H, int64_t W, int64_t C, int64_t Wo, int64_t sh, int64_t sw, int64_t i,
                              const T* zeros, Fn0& fn0, Fn1& fn1, const Tf& tf0, const Tf& tf1) {
  const typename Stencil<T>::Quad u{0,           0,           q0.rm | q1.rm,   q0.cm | q1.cm,
                                    q0.rm2 | q1.rm2, q0.cm2 | q1.cm2, q0.rm3 | q1.rm3, q0.cm3 | q1.cm3};
  with_quad(u, [&](auto dr, auto dc) {
    constexpr int DR = decltype(dr)::value, DC = decltype(dc)::value;
    if (sw == 2) quad_row_pair<T, DR, DC, 2>(x, q0, q1, H, W, C, Wo, sh, i, zeros, fn0, fn1, tf0, tf1);
    else quad_row_pair<T, DR, DC, 1>(x, q0, q1, H, W, C, Wo, sh, i, zeros, fn0, fn1, tf0, tf1);
  });
}

// The transforms of channel vectors v .. v + G - 1: body(tf_v, ...), each Plain, or BnRelu with
// ab = (a[C], b[C]).
template <typename T, int G = 1, typename Body>
inline void with_transform(const T* ab, int64_t C, int64_t v, const Body& body) {
  static_assert(G == 1 || G == 2, "one or two vectors");
  using V = Vec<T>;
  constexpr int N = V::N;
  if (ab == nullptr) {
    if constexpr (G == 1) body(Plain<T>());
    else body(Plain<T>(), Plain<T>());
  } else {
    const auto at = [&](int64_t u) { return BnRelu<T>{V::load(ab + u * N), V::load(ab + C + u * N)}; };
    if constexpr (G == 1) body(at(v));
    else body(at(v), at(v + 1));
  }
}

// Output row i of every channel vector through the blended rows, adjacent vectors in pairs
// (quad_row_pair): fn_of(v) gives vector v's per-pixel functor, done(fn) takes it after the row.
template <typename T, typename Make, typename Done>
inline void quad_rows_of_vectors(const T* x, const typename Stencil<T>::QuadSet& qs, int64_t H, int64_t W, int64_t C,
                                 int64_t Wo, int64_t sh, int64_t sw, int64_t i, const T* zeros, const T* ab,
                                 const Make& fn_of, const Done& done) {
  constexpr int N = Vec<T>::N;
  const int64_t nv = static_cast<int64_t>(qs.q.size());
  int64_t v = 0;
  for (; v + 1 < nv; v += 2) {
    auto f0 = fn_of(v), f1 = fn_of(v + 1);
    with_transform<T, 2>(ab, C, v, [&](const auto& tf0, const auto& tf1) {
      quad_row_pair_any<T>(x + v * N, qs.q[v], qs.q[v + 1], H, W, C, Wo, sh, sw, i, zeros + v * N, f0, f1, tf0, tf1);
    });
    done(f0), done(f1);
  }
  for (; v < nv; ++v) {
    auto f = fn_of(v);
    with_transform<T>(ab, C, v, [&](const auto& tf) {
      quad_row_any<T>(x + v * N, qs.q[v], H, W, C, Wo, sh, sw, i, zeros + v * N, f, tf);
    });
    done(f);
  }
}

// Output rows [i0, i1) of every channel vector: y = W0 x00 + W1 x01 + W2 x10 + W3 x11, NCHW's
// order. Source x (H x W x C), output y (rows of Wo pixels, its first row being row y_row0). The
// forward pass (fq), and at stride 1 the input gradient (gq on grad_output). ab: see BnRelu.
template <typename T>
ASL_FLATTEN void quad_sample_rows(const T* x, T* y, const typename Stencil<T>::QuadSet& qs, int64_t H, int64_t W, int64_t C,
                      int64_t Wo, int64_t sh, int64_t sw, int64_t i0, int64_t i1, const T* zeros,
                      const T* ab = nullptr, int64_t y_row0 = 0) {
  using V = Vec<T>;
  using reg = typename V::reg;
  constexpr int N = V::N;
  const int64_t ahead = 2048 / (C * static_cast<int64_t>(sizeof(T))) + 1;  // see stencil_block
  // row by row, every channel vector of a row before the next row (faster than each vector over
  // a block of rows: 128x64x8x8 1.57 -> 1.34 copies, 224 x 224 1.59 -> 1.46)
  const auto blend_store = [&](int64_t i, int64_t v) {
    const T* wq = qs.w.data() + v * 4 * N;
    T* yr = y + (i - y_row0) * Wo * C + v * N;
    const reg w0 = V::load(wq), w1 = V::load(wq + N), w2 = V::load(wq + 2 * N), w3 = V::load(wq + 3 * N);
    return [=](int64_t j, reg x00, reg x01, reg x10, reg x11) {
      reg acc = V::mul(w0, x00);
      acc = V::fma(w1, x01, acc);
      acc = V::fma(w2, x10, acc);
      acc = V::fma(w3, x11, acc);
      __builtin_prefetch(yr + (j + ahead) * C, 1, 3);
      V::store(yr + j * C, acc);
    };
  };
  for (int64_t i = i0; i < i1; ++i)
    quad_rows_of_vectors<T>(x, qs, H, W, C, Wo, sh, sw, i, zeros, ab, [&](int64_t v) { return blend_store(i, v); },
                            [](const auto&) {});
}

// Shift-gradient correlations of output rows [i0, i1): corr[k C + c] += the sum over the rows'
// pixels of g[., c] times channel c's tap k (a tap outside the image reading zero). Row by row as
// quad_sample_rows, each vector's products summed in float lanes and moved to double every 256
// pixels or so and at the end, so the order depends on the shapes alone.
template <typename T>
ASL_FLATTEN void quad_correlate_rows(const T* g, const T* x, const typename Stencil<T>::QuadSet& qs, int64_t H, int64_t W, int64_t C,
                         int64_t Wo, int64_t sh, int64_t sw, int64_t i0, int64_t i1, const T* zeros, double* corr,
                         const T* ab = nullptr) {
  using V = Vec<T>;
  using reg = typename V::reg;
  constexpr int N = V::N;
  const int64_t nv = static_cast<int64_t>(qs.q.size());
  std::vector<T> sums(static_cast<size_t>(4 * nv * N), T(0));  // (v, k, lane)
  const auto flush = [&] {
    for (int64_t v = 0; v < nv; ++v)
      for (int k = 0; k < 4; ++k) {
        T* s = sums.data() + (4 * v + k) * N;
        double* out = corr + k * C + v * N;
        for (int l = 0; l < N; ++l) out[l] += static_cast<double>(s[l]), s[l] = T(0);
      }
  };
  // vector v's four sums over row i, kept in registers along the row
  struct Sums {
    const T* gr;
    T* sv;
    int64_t C;
    reg a0 = V::load(sv), a1 = V::load(sv + N), a2 = V::load(sv + 2 * N), a3 = V::load(sv + 3 * N);
    void operator()(int64_t j, reg x00, reg x01, reg x10, reg x11) {
      const reg gv = V::load(gr + j * C);
      a0 = V::fma(gv, x00, a0);
      a1 = V::fma(gv, x01, a1);
      a2 = V::fma(gv, x10, a2);
      a3 = V::fma(gv, x11, a3);
    }
    void save() const { V::store(sv, a0), V::store(sv + N, a1), V::store(sv + 2 * N, a2), V::store(sv + 3 * N, a3); }
  };
  const auto sums_of = [&](int64_t i, int64_t v) { return Sums{g + i * Wo * C + v * N, sums.data() + 4 * v * N, C}; };
  int64_t since = 0;
  for (int64_t i = i0; i < i1; ++i) {
    // two vectors at a time as quad_sample_rows (8x64x56x56 1.76 -> 1.42 copies, 224 1.93 -> 1.44)
    quad_rows_of_vectors<T>(x, qs, H, W, C, Wo, sh, sw, i, zeros, ab, [&](int64_t v) { return sums_of(i, v); },
                            [](const Sums& a) { a.save(); });
    since += Wo;
    if (since >= 256) flush(), since = 0;
  }
  if (since) flush();
}

// The input gradient at stride 2 with a stencil's forward quads: input rows [r0, r1) of gx
// (rows of W x C from row gx_row0) from g (Ho x Wo x C). At stride 2 one tap of one output reaches each input pixel of
// a channel: for input (r, c) and offsets (offr, offc), tap a = (r - offr) mod 2 of output row
// (r - offr - a) / 2, and likewise b and the column. So each lane takes one product: the
// grad_output of its own output pixel, picked by blends from at most two rows and two columns,
// times the weight of its tap, which depends on the parities of r - r0 and c - c0 alone (rows
// outside point at `zeros`, Wo C values; columns outside are zero vectors). Quads of spreads up
// to 2 (Stencil::spread), whose lanes' outputs lie within two rows and two columns.
template <typename T>
ASL_FLATTEN void quad_input_grad_s2_rows(const T* g, T* gx, const typename Stencil<T>::QuadSet& fq, int64_t Ho, int64_t Wo,
                             int64_t C, int64_t H, int64_t W, int64_t r0, int64_t r1, const T* zeros,
                             int64_t gx_row0 = 0) {
  using V = Vec<T>;
  using reg = typename V::reg;
  constexpr int N = V::N;
  const int64_t nv = static_cast<int64_t>(fq.q.size());
  // wp[((v 2 + pu) 2 + pv) N + lane]: the weight of the tap that input rows of parity pu
  // (of r - r0) and columns of parity pv (of c - c0) take, tap (a, b) = (pu ^ dr, pv ^ dc) with
  // dr, dc the parities of the lane's offsets past r0, c0 (one past: rm and not rm2)
  std::vector<T> wp(static_cast<size_t>(nv * 4 * N));
  for (int64_t v = 0; v < nv; ++v) {
    const uint32_t odd_r = fq.q[v].rm ^ fq.q[v].rm2, odd_c = fq.q[v].cm ^ fq.q[v].cm2;
    for (int pu = 0; pu < 2; ++pu)
      for (int pv = 0; pv < 2; ++pv)
        for (int l = 0; l < N; ++l) {
          const int a = pu ^ static_cast<int>((odd_r >> l) & 1u), b = pv ^ static_cast<int>((odd_c >> l) & 1u);
          wp[((v * 2 + pu) * 2 + pv) * N + l] = fq.w[(v * 4 + 2 * a + b) * N + l];
        }
  }
  using Wp = std::vector<T>;
  // input row r of channel vector v: its output columns n (lanes cm: n - 1) to input column
  // c0 + 2 n, and n (lanes cm2: n - 1) to c0 + 2 n + 1
  struct Cursor {
    const T* ga;
    const T* gb;
    T* out;
    int64_t C, Wo, W, c0, n_lo, n_hi, in_lo, in_hi;
    uint32_t sel, cm, cm2;
    reg w0, w1, prev;
    Cursor(const T* g, T* gx_row, const typename Stencil<T>::Quad& q, const Wp& wp, int64_t v, int64_t r, int64_t Ho,
           int64_t Wo_, int64_t C_, int64_t W_, const T* zeros)
        : C(C_), Wo(Wo_), W(W_), c0(q.c0), cm(q.cm), cm2(q.cm2) {
      // a lane dr rows past r0 reads output row floor((r - r0 - dr) / 2): with r - r0 = 2 m + pu,
      // row m - 1 for lanes rm when pu = 0 and for lanes rm2 when pu = 1, row m otherwise
      const int64_t u = r - q.r0, m = floor_div(u, 2);
      const int pu = static_cast<int>(u - 2 * m);
      sel = pu == 0 ? q.rm : q.rm2;
      const auto row = [&](int64_t i) { return i >= 0 && i < Ho ? g + i * Wo * C + v * N : zeros + v * N; };
      ga = row(m);
      gb = sel ? row(m - 1) : ga;
      w0 = V::load(wp.data() + ((v * 2 + pu) * 2) * N), w1 = V::load(wp.data() + ((v * 2 + pu) * 2 + 1) * N);
      out = gx_row + v * N;
      n_lo = floor_div(-c0, 2), n_hi = floor_div(W - 1 - c0, 2);
      // pairs n whose output column n and both input columns lie inside
      in_lo = std::max<int64_t>({n_lo, 0, -floor_div(c0, 2)});
      in_hi = std::max(in_lo, std::min<int64_t>({n_hi + 1, Wo, floor_div(W - 2 - c0, 2) + 1}));
      prev = column(n_lo - 1, false);
    }
    // each lane's grad_output at output column n (zero outside)
    reg column(int64_t n, bool inside) const {
      if (!inside && (n < 0 || n >= Wo)) return V::zero();
      const reg a = V::load(ga + n * C);
      return sel ? V::blend(sel, a, V::load(gb + n * C)) : a;
    }
    void pair(int64_t n, bool inside) {
      const reg cur = column(n, inside);
      const int64_t c = c0 + 2 * n;
      if (inside || c >= 0) V::store(out + c * C, V::mul(w0, V::blend(cm, cur, prev)));
      if (inside || c + 1 < W) V::store(out + (c + 1) * C, V::mul(w1, cm2 ? V::blend(cm2, cur, prev) : cur));
      prev = cur;
    }
    void pair_if(int64_t n) {
      if (n >= n_lo && n <= n_hi) pair(n, false);
    }
  };
  // the cursors' pairs together, column by column: the columns inside every cursor's row without
  // checks, the others where each has them
  const auto walk = [](auto&... k) {
    const int64_t lo = std::min({k.n_lo...}), hi = std::max({k.n_hi...});
    const int64_t ilo = std::max({k.in_lo...}), ihi = std::max(ilo, std::min({k.in_hi...}));
    int64_t n = lo;
    for (; n < ilo; ++n) (k.pair_if(n), ...);
    for (; n < ihi; ++n) (k.pair(n, true), ...);
    for (; n <= hi; ++n) (k.pair_if(n), ...);
  };
  for (int64_t r = r0; r < r1; ++r) {
    T* gx_row = gx + (r - gx_row0) * W * C;
    int64_t v = 0;
    // two adjacent vectors together, as quad_row_pair (128x32x32x32 0.89 -> 0.75 copies,
    // 8x64x56x56 0.98 -> 0.84)
    for (; v + 1 < nv; v += 2) {
      Cursor k0(g, gx_row, fq.q[v], wp, v, r, Ho, Wo, C, W, zeros), k1(g, gx_row, fq.q[v + 1], wp, v + 1, r, Ho, Wo, C, W, zeros);
      walk(k0, k1);
    }
    for (; v < nv; ++v) {
      Cursor k(g, gx_row, fq.q[v], wp, v, r, Ho, Wo, C, W, zeros);
      walk(k);
    }
  }
}

// Forward, channels_last, one image through its padded copy buf; lists from forward_lists with the
// padded width.
template <typename T>
void stencil_forward_padded(const T* x, T* y, const Stencil<T>& st, const std::vector<std::vector<RowTap<T>>>& lists,
                            const PadBox& b, int64_t H, int64_t W, int64_t C, int64_t Ho, int64_t Wo, int64_t sh,
                            int64_t sw, T* buf, const T* ab = nullptr) {
  constexpr int N = Vec<T>::N;
  const int64_t Wp = b.left + W + b.right;
  pad_image<T>(x, H, W, C, b, buf, ab);
  const T* origin = buf + (b.top * Wp + b.left) * C;
  for (int64_t v = 0; v < st.nv; ++v)
    stencil_block_any<T>(origin, y + v * N, lists[v].data(), static_cast<int>(lists[v].size()), Ho, Wo, sh * Wp * C, sw * C,
                         Wo * C, C, lane_range<N>(0, C - v * N));
}

// The border grad_output needs for the input gradient's taps (lists from input_grad_lists): input
// (r, q) of class (rc, cls) reads output (ib + row, k + col), ib < ceil((H - rc) / sh),
// k < ceil((W - cls) / sw).
template <typename T>
PadBox input_grad_pad(const std::vector<std::vector<RowTap<T>>>& lists, int64_t nv, int64_t H, int64_t W, int64_t Ho,
                      int64_t Wo, int64_t sh, int64_t sw) {
  PadBox b;
  for (int64_t rc = 0; rc < sh; ++rc)
    for (int64_t cls = 0; cls < sw; ++cls) {
      const int64_t nr = rc < H ? (H - rc + sh - 1) / sh : 0, nk = cls < W ? (W - cls + sw - 1) / sw : 0;
      if (nr == 0 || nk == 0) continue;
      for (int64_t v = 0; v < nv; ++v)
        for (const RowTap<T>& t : lists[(rc * sw + cls) * nv + v]) {
          b.top = std::max(b.top, -t.row);
          b.bottom = std::max(b.bottom, nr - 1 + t.row - (Ho - 1));
          b.left = std::max(b.left, -t.col);
          b.right = std::max(b.right, nk - 1 + t.col - (Wo - 1));
        }
    }
  return b;
}

// Input gradient, channels_last, one image from the padded copy of its grad_output (origin: output
// pixel (0, 0), rows Wp pixels apart); lists from input_grad_lists with the padded width.
template <typename T>
void stencil_input_grad_from_padded(const T* origin, int64_t Wp, T* gx, const Stencil<T>& st,
                                    const std::vector<std::vector<RowTap<T>>>& lists, int64_t H, int64_t W, int64_t C,
                                    int64_t sh, int64_t sw) {
  constexpr int N = Vec<T>::N;
  for (int64_t rc = 0; rc < sh; ++rc)
    for (int64_t cls = 0; cls < sw; ++cls) {
      const int64_t nr = rc < H ? (H - rc + sh - 1) / sh : 0, nk = cls < W ? (W - cls + sw - 1) / sw : 0;
      if (nr == 0 || nk == 0) continue;
      for (int64_t v = 0; v < st.nv; ++v) {
        const auto& taps = lists[(rc * sw + cls) * st.nv + v];
        stencil_block_any<T>(origin, gx + (rc * W + cls) * C + v * N, taps.data(), static_cast<int>(taps.size()), nr, nk,
                             Wp * C, C, sh * W * C, sw * C, lane_range<N>(0, C - v * N));
      }
    }
}

// Input gradient, channels_last, one image through the padded copy buf of its grad_output.
template <typename T>
void stencil_input_grad_padded(const T* g, T* gx, const Stencil<T>& st, const std::vector<std::vector<RowTap<T>>>& lists,
                               const PadBox& b, int64_t H, int64_t W, int64_t C, int64_t Ho, int64_t Wo, int64_t sh,
                               int64_t sw, T* buf) {
  const int64_t Wp = b.left + Wo + b.right;
  pad_image<T>(g, Ho, Wo, C, b, buf);
  stencil_input_grad_from_padded<T>(buf + (b.top * Wp + b.left) * C, Wp, gx, st, lists, H, W, C, sh, sw);
}

// Shift-gradient correlations, channels_last, one image from the padded copy of its input (xo:
// input pixel (0, 0), rows Wp pixels apart; lists from forward_lists with the padded width) and
// its grad_output g (rows gpitch pixels apart): corr[t * C + c] += sum over the image's pixels of
// g[., c] * x[tap t of the pixel, c], a tap outside the image reading zero. The sums go to double
// every 256 or so pixels, in a fixed order.
template <typename T>
void stencil_correlate_from_padded(const T* g, int64_t gpitch, const T* xo, int64_t Wp, const Stencil<T>& st,
                                   const std::vector<std::vector<RowTap<T>>>& lists, int64_t C, int64_t Ho, int64_t Wo,
                                   int64_t sh, int64_t sw, double* corr) {
  using V = Vec<T>;
  using reg = typename V::reg;
  constexpr int N = V::N;
  alignas(64) T tmp[N];
  const int64_t rows_per_flush = std::max<int64_t>(1, 256 / std::max<int64_t>(1, Wo));
  for (int64_t v = 0; v < st.nv; ++v) {
    const uint32_t lm = lane_range<N>(0, C - v * N);
    const auto& list = lists[v];
    const int K = static_cast<int>(list.size());
    double* out[kMaxStencilTaps];  // where tap k's sums go
    for (int k = 0; k < K; ++k) out[k] = corr + list[k].tap * C + v * N;
    const int lanes = static_cast<int>(std::min<int64_t>(N, C - v * N));
    reg acc[kMaxStencilTaps];
    for (int k = 0; k < K; ++k) acc[k] = V::zero();
    for (int64_t i0 = 0; i0 < Ho; i0 += rows_per_flush) {
      const int64_t rows = std::min(rows_per_flush, Ho - i0);
      const T* gv = g + i0 * gpitch * C + v * N;
      const T* xv = xo + i0 * sh * Wp * C;
      if (lm == all_lanes<N>()) correlate_block_k<T, false>(gv, xv, list.data(), K, rows, Wo, sh * Wp * C, sw * C, gpitch * C, C, lm, acc);
      else correlate_block_k<T, true>(gv, xv, list.data(), K, rows, Wo, sh * Wp * C, sw * C, gpitch * C, C, lm, acc);
      for (int k = 0; k < K; ++k) {
        V::store(tmp, acc[k]);
        for (int l = 0; l < lanes; ++l) out[k][l] += static_cast<double>(tmp[l]);
        acc[k] = V::zero();
      }
    }
  }
}

// Shift-gradient correlations, channels_last, one image through the padded copy buf of its input;
// its grad_output g has rows gpitch pixels apart.
template <typename T>
void stencil_correlate_padded(const T* g, int64_t gpitch, const T* x, const Stencil<T>& st,
                              const std::vector<std::vector<RowTap<T>>>& lists, const PadBox& b, int64_t H, int64_t W,
                              int64_t C, int64_t Ho, int64_t Wo, int64_t sh, int64_t sw, T* buf, double* corr,
                              const T* ab = nullptr) {
  const int64_t Wp = b.left + W + b.right;
  pad_image<T>(x, H, W, C, b, buf, ab);
  stencil_correlate_from_padded<T>(g, gpitch, buf + (b.top * Wp + b.left) * C, Wp, st, lists, C, Ho, Wo, sh, sw, corr);
}

// Both gradients of one image, channels_last: its grad_output is read from memory once, into the
// padded copy gbuf (border gb) that both the input gradient and the correlations read; its input
// into xbuf (border xb).
template <typename T>
void stencil_backward_padded(const T* g, const T* x, T* gx, const Stencil<T>& st,
                             const std::vector<std::vector<RowTap<T>>>& glists, const PadBox& gb,
                             const std::vector<std::vector<RowTap<T>>>& xlists, const PadBox& xb, int64_t H, int64_t W,
                             int64_t C, int64_t Ho, int64_t Wo, int64_t sh, int64_t sw, T* gbuf, T* xbuf, double* corr,
                             const T* ab = nullptr) {
  stencil_input_grad_padded<T>(g, gx, st, glists, gb, H, W, C, Ho, Wo, sh, sw, gbuf);
  const int64_t Wg = gb.left + Wo + gb.right;
  stencil_correlate_padded<T>(gbuf + (gb.top * Wg + gb.left) * C, Wg, x, st, xlists, xb, H, W, C, Ho, Wo, sh, sw, xbuf, corr,
                              ab);
}

// Shift-gradient sums over rows x cols pixels of one channel vector, every tap inside the source
// (a run of a row between its side pixels, or a whole padded image): acc[k] += g[i grow + j C] *
// x[i xrow + j xstep + base_k], K taps at once (a compile-time count: accumulators in registers).
// MASKED (a channel tail): only the lanes of existing channels are read.
template <typename T, int K, bool MASKED>
inline void correlate_block(const T* g, const T* x, const RowTap<T>* rt, int64_t rows, int64_t cols, int64_t xrow,
                            int64_t xstep, int64_t grow, int64_t C, uint32_t lm, typename Vec<T>::reg* acc) {
  using V = Vec<T>;
  typename V::reg a[K > 0 ? K : 1];
  int64_t base[K > 0 ? K : 1];
  for (int k = 0; k < K; ++k) {
    a[k] = acc[k];
    base[k] = rt[k].base;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* xr = x + i * xrow;
    const T* gr = g + i * grow;
    for (int64_t j = 0; j < cols; ++j) {
      const typename V::reg gv = MASKED ? V::loadz(lm, gr + j * C) : V::load(gr + j * C);
      for (int k = 0; k < K; ++k) {
        const T* p = xr + base[k] + j * xstep;
        a[k] = V::fma(gv, MASKED ? V::loadz(lm, p) : V::load(p), a[k]);
      }
    }
  }
  for (int k = 0; k < K; ++k) acc[k] = a[k];
}

template <typename T, bool MASKED>
inline void correlate_block_k(const T* g, const T* x, const RowTap<T>* rt, int K, int64_t rows, int64_t cols, int64_t xrow,
                              int64_t xstep, int64_t grow, int64_t C, uint32_t lm, typename Vec<T>::reg* acc) {
  with_tap_count(K, [&](auto k) { correlate_block<T, decltype(k)::value, MASKED>(g, x, rt, rows, cols, xrow, xstep, grow, C, lm, acc); });
}

// Shift-gradient correlations, channels_last: for output rows [i0, i1) and every tap t,
// corr[t * C + c] += sum over the rows' pixels of g[., c] * x[tap t of the pixel, c] (lanes of
// channels that do not use a tap hold sums nobody reads; no load of a lane a channel does not
// use is masked, as nothing reads those sums). Per channel vector, one pass over the pixels with
// every tap's sum in a register; the sums go to double every 256 or so pixels, in a fixed order.
template <typename T>
void stencil_correlate_rows(const T* g, const T* x, const Stencil<T>& st, const std::vector<std::vector<RowTap<T>>>& lists,
                            int64_t H, int64_t W, int64_t C, int64_t Wo, int64_t sh, int64_t sw, int64_t i0, int64_t i1,
                            double* corr) {
  using V = Vec<T>;
  using reg = typename V::reg;
  constexpr int N = V::N;
  alignas(64) T tmp[N];
  RowTap<T> rt[kMaxStencilTaps];
  int tap_of[kMaxStencilTaps];
  const int64_t rows_per_flush = std::max<int64_t>(1, 256 / std::max<int64_t>(1, Wo));
  for (int64_t v = 0; v < st.nv; ++v) {
    const uint32_t lm = lane_range<N>(0, C - v * N);
    const auto& list = lists[v];
    reg acc[kMaxStencilTaps];  // (a std::vector of vector registers would not be aligned for them)
    for (size_t k = 0; k < list.size(); ++k) acc[k] = V::zero();
    auto flush = [&] {
      for (size_t k = 0; k < list.size(); ++k) {
        V::store(tmp, acc[k]);
        double* out = corr + list[k].tap * C + v * N;
        for (int l = 0; l < N && v * N + l < C; ++l) out[l] += static_cast<double>(tmp[l]);
        acc[k] = V::zero();
      }
    };
    for (int64_t i = i0; i < i1; ++i) {
      const T* xrow = x + i * sh * W * C;
      const T* grow = g + i * Wo * C + v * N;
      int K = 0;
      int64_t cb_min = 0, cb_max = 0;
      for (size_t k = 0; k < list.size(); ++k) {
        const RowTap<T>& t = list[k];
        const int64_t r = i * sh + t.row;
        if (r < 0 || r >= H) continue;
        cb_min = K == 0 ? t.col : std::min(cb_min, t.col);
        cb_max = K == 0 ? t.col : std::max(cb_max, t.col);
        tap_of[K] = static_cast<int>(k);
        rt[K++] = t;
      }
      if (K) {
        const int64_t j_lo = std::min<int64_t>(Wo, std::max<int64_t>(0, floor_div(-cb_min + sw - 1, sw)));
        const int64_t j_hi = std::max(j_lo, std::min<int64_t>(Wo, floor_div(W - 1 - cb_max, sw) + 1));
        reg a[kMaxStencilTaps];
        for (int k = 0; k < K; ++k) a[k] = acc[tap_of[k]];
        auto edge = [&](int64_t j) {
          const reg gv = V::loadz(lm, grow + j * C);
          for (int k = 0; k < K; ++k) {
            const int64_t col = j * sw + rt[k].col;
            if (col >= 0 && col < W) a[k] = V::fma(gv, V::loadz(lm, xrow + rt[k].base + j * sw * C), a[k]);
          }
        };
        for (int64_t j = 0; j < j_lo; ++j) edge(j);
        if (lm == all_lanes<N>()) {
          correlate_block_k<T, false>(grow + j_lo * C, xrow + j_lo * sw * C, rt, K, 1, j_hi - j_lo, 0, sw * C, 0, C, lm, a);
        } else {
          for (int64_t j = j_lo; j < j_hi; ++j) edge(j);
        }
        for (int64_t j = j_hi; j < Wo; ++j) edge(j);
        for (int k = 0; k < K; ++k) acc[tap_of[k]] = a[k];
      }
      if ((i - i0 + 1) % rows_per_flush == 0 || i + 1 == i1) flush();
    }
  }
}
