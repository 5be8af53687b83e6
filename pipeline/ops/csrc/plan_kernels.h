// The plane kernels of the whole-model plan (model_plan.cpp describes the layout): register-tiled convs over
// entry lists, kernel mixing, depthwise convs, plane sums. Plain C++ on SIMD vectors, no ATen.
#pragma once

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <utility>

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
template <int COB, int P>
inline void conv_tile(const float* in, const int32_t* off, const float* w, const int32_t* seg, const float* bias,
                      Epilogue<COB>& ep, const int64_t* pos) {
  V acc[COB][P];
  for (int c = 0; c < COB; ++c)
    for (int j = 0; j < P; ++j) acc[c][j] = V{} + bias[c];
  if constexpr (COB == 4) {
    accumulate_subsets<P>(in, off, w, seg, acc, pos, std::make_integer_sequence<int, 15>{});
  } else {
    accumulate<COB, P, (1 << COB) - 1>(in, off, w, seg[0], seg[1], acc, pos);
  }
  const V zero = V{};
  for (int c = 0; c < COB; ++c) {
    for (int j = 0; j < P; ++j) {
      V v = acc[c][j];
      if (ep.res != nullptr) v += *reinterpret_cast<const U*>(ep.res[c] + pos[j]);
      v = activated(v, ep.act);
      v = *reinterpret_cast<const U*>(ep.pad + pos[j]) > zero ? v : zero;  // a select: NaN-proof
      *reinterpret_cast<U*>(ep.out[c] + pos[j]) = v;
      ep.sums[c] += v;
    }
  }
}

// A tile of r < PMAX vectors: P = r, chosen at run time.
template <int COB, int P>
inline void conv_tail(int64_t r, const float* in, const int32_t* off, const float* w, const int32_t* seg,
                      const float* bias, Epilogue<COB>& ep, const int64_t* pos) {
  if constexpr (P > 0) {
    if (r == P) {
      conv_tile<COB, P>(in, off, w, seg, bias, ep, pos);
    } else {
      conv_tail<COB, P - 1>(r, in, off, w, seg, bias, ep, pos);
    }
  }
}

// The nvec vectors starting at positions first, first + L, ..., in tiles of PMAX; sums[c] gets the sum of
// what channel c stored.
template <int COB, int PMAX>
void conv_block(const float* in, const int32_t* off, const float* w, const int32_t* seg, const float* bias,
                float* const* out, const float* const* res, int64_t act, const float* pad, int64_t first, int64_t nvec,
                float* sums) {
  Epilogue<COB> ep{out, res, act, pad, {}};
  int64_t pos[PMAX];
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

}  // namespace plan
}  // namespace native
