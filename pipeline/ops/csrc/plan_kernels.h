// The plane kernels of the whole-model plan (model_plan.cpp describes the layout): register-tiled convs over
// entry lists, kernel mixing, depthwise convs, plane sums. Plain C++ on SIMD vectors, no ATen.
#pragma once

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace native {
namespace plan {

constexpr int L = direct::kWideLanes;
using V = direct::Simd<L>::V;
using U = direct::Simd<L>::U;
using direct::lane_sum;

// Activations applied where a conv stores its output.
constexpr int64_t kActNone = 0;
constexpr int64_t kActRelu = 1;
constexpr int64_t kActRelu6 = 2;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// How far ahead of the entry in use a conv fetches its weights (floats: 4 KiB).
constexpr int64_t kPrefetchFloats = 1024;

// Register tile height (vectors of L positions) by output-channel block size: COB x P accumulators and P input
// vectors fit the 32 vector registers.
constexpr int tile_height(int cob) { return cob == 1 ? 12 : cob == 4 ? 6 : cob == 8 ? 3 : 1; }

[[gnu::always_inline]] inline V activated(V v, int64_t act) {
  const V zero = V{};
  if (act != kActNone) v = v > zero ? v : zero;
  if (act == kActRelu6) {
    const V six = zero + 6.f;
    v = v < six ? v : six;
  }
  return v;
}

inline float activated(float v, int64_t act) {
  if (act != kActNone) v = std::max(v, 0.f);
  return act == kActRelu6 ? std::min(v, 6.f) : v;
}

// so no second pass clears them) and per-channel running sums of what was stored (for pooling).
template <int COB>
struct Epilogue {
  float* const* out;
  const float* const* res;
  int64_t act;  // kActNone, kActRelu, kActRelu6
  const float* pad;
  V sums[COB];

  // Output channel c's vector at position p: [+ residual] [activation], zero at the pads, stored and summed.
  [[gnu::always_inline]] void store(int c, int64_t p, V v) {
    const V zero = V{};
    if (res != nullptr) v += *reinterpret_cast<const U*>(res[c] + p);
    v = activated(v, act);
    v = *reinterpret_cast<const U*>(pad + p) > zero ? v : zero;  // a select: NaN-proof
    *reinterpret_cast<U*>(out[c] + p) = v;
    sums[c] += v;
  }

  // A whole tile, channel by channel (each channel's vectors are contiguous: stored in a row, they left the
  // CIFAR ResNet 2 % faster than position by position with the pad mask shared across channels).
  template <int P>
  [[gnu::always_inline]] void store_tile(V (&acc)[COB][P], const int64_t* pos) {
    for (int c = 0; c < COB; ++c)
      for (int j = 0; j < P; ++j) store(c, pos[j], acc[c][j]);
  }
};

// dst[0 .. n) = src[0 .. n) in the widest plain loads and stores that fit (a packed conv's rows are often 4 or
// 8 floats: a memcpy call each cost more than the copy).
inline void copy_floats(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + L <= n; i += L) *reinterpret_cast<U*>(dst + i) = *reinterpret_cast<const U*>(src + i);
  if (L > 8 && i + 8 <= n) {
    _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
    i += 8;
  }
  if (i + 4 <= n) {
    _mm_storeu_ps(dst + i, _mm_loadu_ps(src + i));
    i += 4;
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// A packed 1x1 conv's output (PackedLayout): vector j of the packed positions p = j * L .. holds the map's
// positions in row-major order without pads; its lanes go to the padded planes row by row.
struct PackedLayout {
  int64_t positions = 0;           // h * w (the packed buffer holds them rounded up to L)
  std::vector<int32_t> padded;     // per packed position: its position in the padded plane
  std::vector<int32_t> seg_first;  // per vector j: its row segments seg_first[j] .. seg_first[j + 1]
  std::vector<int32_t> seg_shift;  // per segment: padded position of lane 0 if the row went on (lane i -> shift + i)
  std::vector<uint32_t> seg_lanes; // per segment: the lanes of its row (bit i = lane i)
  // Every vector split alike into whole chunks of this many lanes, each a piece of one row (16: a vector
  // within a row; 8 or 4: two or four rows of a map that narrow); 0: segments as they come (masked stores).
  int chunk = 0;
};

#if defined(__AVX512F__)
// Lanes 8i .. 8i + 7 of v, and a vector from two such halves (AVX-512F only: no DQ needed).
template <int I>
[[gnu::always_inline]] inline __m256 half(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), I));
}
[[gnu::always_inline]] inline __m512 halves(__m256 lo, __m256 hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}
#endif

template <int COB>
struct PackedEpilogue {
  float* const* out;
  const float* const* res;
  int64_t act;
  const PackedLayout* layout;
  V sums[COB];

  [[gnu::always_inline]] void store(int c, int64_t p, V v) {
    const int64_t j = p / L, s0 = layout->seg_first[j], s1 = layout->seg_first[j + 1];
    const int32_t* shift = layout->seg_shift.data();
    const uint32_t* lanes = layout->seg_lanes.data();
#if defined(__AVX512F__)
    __m512 x = reinterpret_cast<__m512&>(v);
    if (res != nullptr) {
      __m512 r = _mm512_setzero_ps();
      for (int64_t s = s0; s < s1; ++s) r = _mm512_mask_loadu_ps(r, static_cast<__mmask16>(lanes[s]), res[c] + shift[s]);
      x = _mm512_add_ps(x, r);
    }
    V a = activated(reinterpret_cast<V&>(x), act);
    __mmask16 valid = 0;
    for (int64_t s = s0; s < s1; ++s) {
      _mm512_mask_storeu_ps(out[c] + shift[s], static_cast<__mmask16>(lanes[s]), reinterpret_cast<__m512&>(a));
      valid |= static_cast<__mmask16>(lanes[s]);
    }
    const __m512 kept = _mm512_maskz_mov_ps(valid, reinterpret_cast<__m512&>(a));  // lanes past h * w: not summed
    sums[c] += reinterpret_cast<const V&>(kept);
#else
    alignas(64) float lane[L];
    *reinterpret_cast<U*>(lane) = v;
    V kept = V{};
    for (int64_t i = 0; i < L && p + i < layout->positions; ++i) {
      const int64_t q = layout->padded[p + i];
      float x = lane[i] + (res != nullptr ? res[c][q] : 0.f);
      out[c][q] = x = activated(x, act);
      kept[i] = x;
    }
    sums[c] += kept;
#endif
  }

  // A whole tile: where each vector's chunks go is looked up once for the block's channels, and whole chunks
  // are written with plain stores (a masked store costs several plain ones on some cores).
  template <int P>
  [[gnu::always_inline]] void store_tile(V (&acc)[COB][P], const int64_t* pos) {
#if defined(__AVX512F__)
    const int chunk = layout->chunk;
    if (chunk != 0) {
      const int32_t* first = layout->seg_first.data();
      const int32_t* shift = layout->seg_shift.data();
      for (int j = 0; j < P; ++j) {
        const int32_t* sh = shift + first[pos[j] / L];
        int64_t q[4];  // padded position of lanes 0, chunk, 2 chunk, ...
        for (int k = 0; k < L / chunk; ++k) q[k] = sh[k] + k * chunk;
        for (int c = 0; c < COB; ++c) {
          __m512 x = reinterpret_cast<const __m512&>(acc[c][j]);
          const float* r = res != nullptr ? res[c] : nullptr;
          float* o = out[c];
          if (chunk == 16) {
            if (r != nullptr) x = _mm512_add_ps(x, _mm512_loadu_ps(r + q[0]));
            const V a = activated(reinterpret_cast<const V&>(x), act);
            _mm512_storeu_ps(o + q[0], reinterpret_cast<const __m512&>(a));
            sums[c] += a;
          } else if (chunk == 8) {
            if (r != nullptr) x = _mm512_add_ps(x, halves(_mm256_loadu_ps(r + q[0]), _mm256_loadu_ps(r + q[1])));
            const V a = activated(reinterpret_cast<const V&>(x), act);
            const __m512 y = reinterpret_cast<const __m512&>(a);
            _mm256_storeu_ps(o + q[0], half<0>(y));
            _mm256_storeu_ps(o + q[1], half<1>(y));
            sums[c] += a;
          } else {
            if (r != nullptr) {
              __m512 y = _mm512_castps128_ps512(_mm_loadu_ps(r + q[0]));
              y = _mm512_insertf32x4(y, _mm_loadu_ps(r + q[1]), 1);
              y = _mm512_insertf32x4(y, _mm_loadu_ps(r + q[2]), 2);
              x = _mm512_add_ps(x, _mm512_insertf32x4(y, _mm_loadu_ps(r + q[3]), 3));
            }
            const V a = activated(reinterpret_cast<const V&>(x), act);
            const __m512 y = reinterpret_cast<const __m512&>(a);
            _mm_storeu_ps(o + q[0], _mm512_castps512_ps128(y));
            _mm_storeu_ps(o + q[1], _mm512_extractf32x4_ps(y, 1));
            _mm_storeu_ps(o + q[2], _mm512_extractf32x4_ps(y, 2));
            _mm_storeu_ps(o + q[3], _mm512_extractf32x4_ps(y, 3));
            sums[c] += a;
          }
        }
      }
      return;
    }
#endif
    for (int c = 0; c < COB; ++c)
      for (int j = 0; j < P; ++j) store(c, pos[j], acc[c][j]);
  }
};


// Add the entries [e0, e1) to a tile's accumulators: P loads per entry, one FMA per vector for each output
// channel c of the block with bit c set in M (the channels whose weight for these entries is nonzero).
template <int COB, int P, int M>
[[gnu::always_inline]] inline void accumulate(const float* in, const int32_t* off, const float* w, int64_t e0,
                                              int64_t e1, V (&acc)[COB][P], const int64_t* pos) {
  for (int64_t e = e0; e < e1; ++e) {
    const float* src = in + off[e];
    V x[P];
    for (int j = 0; j < P; ++j) x[j] = *reinterpret_cast<const U*>(src + pos[j]);
    const float* we = w + e * COB;
    // The weights stream through once per image (at batch 1 a small map uses each only h * w times): fetch
    // them ahead, the hardware prefetchers alone left the 4 x 4 layers waiting on memory (2 x slower).
    __builtin_prefetch(we + kPrefetchFloats);
    for (int c = 0; c < COB; ++c) {
      if ((M >> c) & 1) {
        const float wc = we[c];
        for (int j = 0; j < P; ++j) acc[c][j] += wc * x[j];
      }
    }
  }
}

template <int P, int... M>
[[gnu::always_inline]] inline void accumulate_subsets(const float* in, const int32_t* off, const float* w,
                                                      const int32_t* seg, V (&acc)[4][P], const int64_t* pos,
                                                      std::integer_sequence<int, M...>) {
  (accumulate<4, P, M + 1>(in, off, w, seg[M + 1], seg[M + 2], acc, pos), ...);
}

// Accumulate one tile of P vectors (starting at positions pos[0..P)) for COB output channels and store it:
// [+ residual] [activation], zero where the pad mask is. A 4-channel block's entries are sorted by the subset of its
// channels that use them (entries seg[m] .. seg[m + 1] are used by the channels of bitmask m), so each input
// vector is loaded once for the block and multiplied only where a weight is nonzero; a 1-channel block's
// entries are seg[0] .. seg[1].
template <int COB, int P, class EP>
inline void conv_tile(const float* in, const int32_t* off, const float* w, const int32_t* seg, const float* bias,
                      EP& ep, const int64_t* pos) {
  V acc[COB][P];
  for (int c = 0; c < COB; ++c)
    for (int j = 0; j < P; ++j) acc[c][j] = V{} + bias[c];
  if constexpr (COB == 4) {
    accumulate_subsets<P>(in, off, w, seg, acc, pos, std::make_integer_sequence<int, 15>{});
  } else {
    accumulate<COB, P, (1 << COB) - 1>(in, off, w, seg[0], seg[1], acc, pos);
  }
  ep.template store_tile<P>(acc, pos);
}

// A tile of r < PMAX vectors: P = r, chosen at run time.
template <int COB, int P, class EP>
inline void conv_tail(int64_t r, const float* in, const int32_t* off, const float* w, const int32_t* seg,
                      const float* bias, EP& ep, const int64_t* pos) {
  if constexpr (P > 0) {
    if (r == P) {
      conv_tile<COB, P>(in, off, w, seg, bias, ep, pos);
    } else {
      conv_tail<COB, P - 1>(r, in, off, w, seg, bias, ep, pos);
    }
  }
}

// The nvec vectors starting at positions first, first + L, ..., in tiles of PMAX, stored through the epilogue ep;
// sums[c] gets the sum of what channel c stored.
template <int COB, int PMAX, class EP>
void conv_block(const float* in, const int32_t* off, const float* w, const int32_t* seg, const float* bias, EP& ep,
                int64_t first, int64_t nvec, float* sums) {
  int64_t pos[PMAX];
  for (int c = 0; c < COB; ++c) ep.sums[c] = V{};
  for (int64_t v = 0; v < nvec; v += PMAX) {
    const int64_t n = std::min<int64_t>(PMAX, nvec - v);
    for (int64_t j = 0; j < n; ++j) pos[j] = first + L * (v + j);
    if (n == PMAX) {
      conv_tile<COB, PMAX>(in, off, w, seg, bias, ep, pos);
    } else {
      conv_tail<COB, PMAX - 1>(n, in, off, w, seg, bias, ep, pos);
    }
  }
  for (int c = 0; c < COB; ++c) sums[c] = lane_sum(ep.sums[c]);
}

// dst[i] = sum_j a[j] * bank[j * stride + i] for i < n, one vector of dst at a time.
inline void mix(const float* a, int64_t k, const float* bank, int64_t stride, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V acc = a[0] * *reinterpret_cast<const U*>(bank + i);
    for (int64_t j = 1; j < k; ++j) acc += a[j] * *reinterpret_cast<const U*>(bank + j * stride + i);
    *reinterpret_cast<U*>(dst + i) = acc;
  }
  for (; i < n; ++i) {
    float acc = a[0] * bank[i];
    for (int64_t j = 1; j < k; ++j) acc += a[j] * bank[j * stride + i];
    dst[i] = acc;
  }
}

inline float plane_sum(const float* x, int64_t n) {
  V acc = V{};
  int64_t i = 0;
  for (; i + L <= n; i += L) acc += *reinterpret_cast<const U*>(x + i);
  float total = lane_sum(acc);
  for (; i < n; ++i) total += x[i];
  return total;
}

// Padded position of the (0, 0) tap of the 3x3 window of output position p (padded, row width wpo) of a
// stride-s conv on an input of row width wpi.
inline int64_t window_origin(int64_t p, int64_t wpo, int64_t wpi, int64_t stride) {
  if (stride == 1) return p - wpo - 1;  // (y - 1, x - 1)
  const int64_t oy = p / wpo - 1, ox = p % wpo - 1;
  return 2 * oy * wpi + 2 * ox;  // padded (2 oy, 2 ox)
}

// Depthwise 3x3 conv of one channel over nvec vectors of positions from `first`: out[p] = act(bias +
// sum_t w[t] * in_t[p] [+ res[p]]), zero where the pad mask is, where in_t is the input plane shifted by
// off[t] (stride 1) or tap plane t (stride 2, gathered). Returns the sum of what it stored.
inline float depthwise_plane(const float* const* in, const float* w, float bias, float* out, const float* res,
                             int64_t act, const float* pad, int64_t first, int64_t nvec) {
  constexpr int P = 4;
  V sums = V{};
  const V zero = V{};
  int64_t v = 0;
  auto one = [&](int64_t p) {
    V acc = zero + bias;
    for (int t = 0; t < 9; ++t) acc += w[t] * *reinterpret_cast<const U*>(in[t] + p);
    if (res != nullptr) acc += *reinterpret_cast<const U*>(res + p);
    acc = activated(acc, act);
    acc = *reinterpret_cast<const U*>(pad + p) > zero ? acc : zero;
    *reinterpret_cast<U*>(out + p) = acc;
    sums += acc;
  };
  for (; v + P <= nvec; v += P) {
    V acc[P];
    for (int j = 0; j < P; ++j) acc[j] = zero + bias;
    for (int t = 0; t < 9; ++t) {
      const float wt = w[t];
      for (int j = 0; j < P; ++j) acc[j] += wt * *reinterpret_cast<const U*>(in[t] + first + (v + j) * L);
    }
    for (int j = 0; j < P; ++j) {
      const int64_t p = first + (v + j) * L;
      V a = acc[j];
      if (res != nullptr) a += *reinterpret_cast<const U*>(res + p);
      a = activated(a, act);
      a = *reinterpret_cast<const U*>(pad + p) > zero ? a : zero;
      *reinterpret_cast<U*>(out + p) = a;
      sums += a;
    }
  }
  for (; v < nvec; ++v) one(first + v * L);
  return lane_sum(sums);
}

// Depthwise 3x3 conv, stride 2, padding 1, of one channel: out[oy][ox] = act(bias + sum_t w[t] *
// in[2 oy + ky][2 ox + kx] [+ res]) with in, out and res padded planes (row widths wpi, wpo); each tap's
// even columns are picked from the input row in registers (no gathered tap planes). Writes the interior only
// (the pads stay zero). Returns the sum of what it stored.
inline float depthwise_plane_s2(const float* in, int64_t wpi, const float* w, float bias, float* out, int64_t wpo,
                                int64_t ho, int64_t wo, const float* res, int64_t act) {
  float total = 0.f;
#if defined(__AVX512F__)
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  V sums = V{};
  for (int64_t oy = 0; oy < ho; ++oy) {
    const float* rows = in + 2 * oy * wpi;  // padded input rows 2 oy .. 2 oy + 2
    float* o = out + (oy + 1) * wpo + 1;
    const float* r = res != nullptr ? res + (oy + 1) * wpo + 1 : nullptr;
    for (int64_t ox = 0; ox < wo; ox += L) {
      const int64_t n = std::min<int64_t>(L, wo - ox), span = 2 * n - 1;  // inputs a tap's n outputs read
      const __mmask16 lo = static_cast<__mmask16>(span >= 16 ? 0xFFFF : (1u << span) - 1);
      const __mmask16 hi = static_cast<__mmask16>(span > 16 ? (1u << (span - 16)) - 1 : 0);
      const __mmask16 lanes = static_cast<__mmask16>(n == 16 ? 0xFFFF : (1u << n) - 1);
      __m512 acc = _mm512_set1_ps(bias);
      for (int64_t ky = 0; ky < 3; ++ky)
        for (int64_t kx = 0; kx < 3; ++kx) {
          const float* src = rows + ky * wpi + 2 * ox + kx;
          const __m512 v = _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(lo, src), even,
                                                  _mm512_maskz_loadu_ps(hi, src + 16));
          acc = _mm512_fmadd_ps(_mm512_set1_ps(w[ky * 3 + kx]), v, acc);
        }
      if (r != nullptr) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(lanes, r + ox));
      V a = activated(reinterpret_cast<V&>(acc), act);
      const __m512 kept = _mm512_maskz_mov_ps(lanes, reinterpret_cast<__m512&>(a));
      _mm512_mask_storeu_ps(o + ox, lanes, kept);
      sums += reinterpret_cast<const V&>(kept);
    }
  }
  total = lane_sum(sums);
#else
  for (int64_t oy = 0; oy < ho; ++oy)
    for (int64_t ox = 0; ox < wo; ++ox) {
      float acc = bias;
      for (int64_t ky = 0; ky < 3; ++ky)
        for (int64_t kx = 0; kx < 3; ++kx) acc += w[ky * 3 + kx] * in[(2 * oy + ky) * wpi + 2 * ox + kx];
      const int64_t q = (oy + 1) * wpo + 1 + ox;
      if (res != nullptr) acc += res[q];
      out[q] = acc = activated(acc, act);
      total += acc;
    }
#endif
  return total;
}

}  // namespace plan
}  // namespace native
