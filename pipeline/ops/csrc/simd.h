// SIMD values, lane sums and the dynamic convs' coefficient activations: plain C++ (no ATen), shared by every
// kernel of the extension.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace native {
namespace direct {

// SIMD values of L floats (GCC / Clang vector extension): V in registers, U for unaligned loads and stores.
// Eight lanes everywhere; sixteen where the compiler targets AVX-512 (one zmm register, twice the FMAs of
// a ymm one per instruction).
template <int L>
struct Simd;
template <>
struct Simd<8> {
  typedef float V __attribute__((vector_size(32)));
  typedef float U __attribute__((vector_size(32), aligned(4)));
};
#if defined(__AVX512F__)
template <>
struct Simd<16> {
  typedef float V __attribute__((vector_size(64)));
  typedef float U __attribute__((vector_size(64), aligned(4)));
};
constexpr int kWideLanes = 16;
#else
constexpr int kWideLanes = 8;
#endif
using Vec8 = Simd<8>::V;
using Lanes8 = Simd<8>::U;

// Sum of the lanes of a wide vector as a tree (a running scalar sum is a chain of L dependent adds).
inline float lane_sum(Simd<kWideLanes>::V v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512&>(v));
#else
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(reinterpret_cast<__m256&>(v)),
                         _mm256_extractf128_ps(reinterpret_cast<__m256&>(v), 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
#endif
}

}  // namespace direct

// Coefficient activations of the dynamic convs (pipeline.ops.dynamic_conv.ACTIVATIONS, in that order):
// linear, sigmoid(z * inv_t), softmax(z * inv_t). DyNet / CondConv / DY-Conv pass inv_t = 1 / T to the
// softmax only; ODConv's sigmoid attentions take the temperature too (Li et al., ICLR 2022, Sec. 3.2).
constexpr int64_t kLinear = 0;
constexpr int64_t kSigmoid = 1;
constexpr int64_t kSoftmax = 2;

// out = W in + b for a row-major [n_out, n_in] weight, optionally followed by ReLU: the routing branches' linear
// layers (a dynamic conv's fc1 and fc2). Summed in input order: one dependent add per input, so a routing of a
// few hundred channels costs tens of microseconds; the single-op DynamicConvPlan keeps this order (the
// pipeline's recorded evaluations ran it), the whole-model plan sums in lanes (linear_lanes).
inline void linear(const float* w, const float* b, int64_t n_out, int64_t n_in, const float* in, float* out,
                   bool relu) {
  for (int64_t j = 0; j < n_out; ++j) {
    const float* row = w + j * n_in;
    float acc = b[j];
    for (int64_t c = 0; c < n_in; ++c) acc += row[c] * in[c];
    out[j] = relu ? std::max(acc, 0.f) : acc;
  }
}

// The same function with each row's products summed in kWideLanes-lane partial sums, in two independent chains
// (a tree at the end): about the input count / 32 dependent steps per output instead of the input count.
inline void linear_lanes(const float* w, const float* b, int64_t n_out, int64_t n_in, const float* in, float* out,
                         bool relu) {
  constexpr int L = direct::kWideLanes;
  using V = direct::Simd<L>::V;
  using U = direct::Simd<L>::U;
  for (int64_t j = 0; j < n_out; ++j) {
    const float* row = w + j * n_in;
    V acc[2] = {};
    int64_t c = 0;
    for (; c + 2 * L <= n_in; c += 2 * L)
      for (int k = 0; k < 2; ++k)
        acc[k] += *reinterpret_cast<const U*>(row + c + k * L) * *reinterpret_cast<const U*>(in + c + k * L);
    for (; c + L <= n_in; c += L) acc[0] += *reinterpret_cast<const U*>(row + c) * *reinterpret_cast<const U*>(in + c);
    float total = b[j] + direct::lane_sum(acc[0] + acc[1]);
    for (; c < n_in; ++c) total += row[c] * in[c];
    out[j] = relu ? std::max(total, 0.f) : total;
  }
}

inline void activate(float* a, int64_t n, int64_t activation, float inv_t) {
  if (activation == kSigmoid) {
    for (int64_t j = 0; j < n; ++j) a[j] = 1.f / (1.f + std::exp(-(a[j] * inv_t)));
  } else if (activation == kSoftmax) {
    float top = a[0] * inv_t;
    for (int64_t j = 1; j < n; ++j) top = std::max(top, a[j] * inv_t);
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) total += (a[j] = std::exp(a[j] * inv_t - top));
    for (int64_t j = 0; j < n; ++j) a[j] /= total;
  }
}

}  // namespace native
