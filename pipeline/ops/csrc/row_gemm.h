// Direct small convolutions on channels-last rows (see row_gemm), shared by the compiled plans.
#pragma once

#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace native {
namespace direct {

// Rows of a small convolution as a GEMM over gathered input rows, without an im2col buffer:
//   out(r) = bias + sum_{t < taps} sum_{c < cin} src_t(r)[c] * W[t * cin + c, :]
// for r < n, where `rows_of(r, ptrs)` fills ptrs[0..taps) with the cin-float input rows output row r reads
// (a zero row for padding). W is [taps * cin, cols] (row stride ldw). Output columns are handled in chunks
// of CO (a compile-time width, so the R x CO accumulators live in registers); `store(r, col0, acc, width)`
// consumes each finished chunk. MKL GEMMs at these sizes (tens to hundreds of rows, 16-64 columns)
// measured several times slower, call overhead included.
constexpr int64_t kMaxTaps = 9;
// How many weight rows ahead row_gemm_block fetches the weights.
constexpr int64_t kPrefetchRows = 8;

// Register-block heights (output rows per block) of the 64 / 32 / 16-column chunks of row_gemm and of the
// weight gradient (dynamic_conv_grad.cpp): 24 of 32 zmm registers as accumulators with 16 lanes, 32 of 32
// ymm with 8 (AVX-512VL).
constexpr int kRows64 = kWideLanes == 16 ? 6 : 4;
constexpr int kRows32 = kWideLanes == 16 ? 12 : 4;
constexpr int kRows16 = kWideLanes == 16 ? 12 : 6;

// R rows x CO columns of the output; R x CO / L accumulators, so R is chosen per CO to fill (not spill) the
// register file. Loops over the rows of [lo, hi) in blocks of R.
template <int L, int CO, int R, typename RowsOf, typename Store>
void row_gemm_block(int64_t lo, int64_t hi, int64_t taps, int64_t cin, const float* w, int64_t ldw,
                    const float* bias, int64_t col0, const float* zero, RowsOf& rows_of, Store& store) {
  // Explicit vectors along the output columns: left to itself the compiler vectorises across the input
  // channels with gather loads of the kernel, which measured 10x slower.
  static_assert(CO % L == 0, "CO must be a multiple of the lane count");
  using V = typename Simd<L>::V;
  using U = typename Simd<L>::U;
  constexpr int NV = CO / L;
  const float* src[R][kMaxTaps];
  alignas(64) float out[CO];
  for (int64_t r0 = lo; r0 < hi; r0 += R) {
    const int64_t rn = std::min<int64_t>(R, hi - r0);
    for (int r = 0; r < R; ++r) {
      if (r < rn) {
        rows_of(r0 + r, src[r]);
      } else {
        for (int64_t t = 0; t < taps; ++t) src[r][t] = zero;
      }
    }
    V acc[R][NV];
    for (int v = 0; v < NV; ++v) {
      const V b = *reinterpret_cast<const U*>(bias + col0 + L * v);
      for (int r = 0; r < R; ++r) acc[r][v] = b;
    }
    for (int64_t t = 0; t < taps; ++t) {
      const float* wt = w + t * cin * ldw + col0;
      for (int64_t c = 0; c < cin; ++c) {
        const float* wc = wt + c * ldw;
        V wv[NV];
        for (int v = 0; v < NV; ++v) {
          wv[v] = *reinterpret_cast<const U*>(wc + L * v);
          // Weight rows are ldw apart: fetch ahead (a small map's rows use each weight a few times only).
          __builtin_prefetch(wc + kPrefetchRows * ldw + L * v);
        }
        for (int r = 0; r < R; ++r) {
          const float x = src[r][t][c];
          for (int v = 0; v < NV; ++v) acc[r][v] += x * wv[v];
        }
      }
    }
    for (int64_t r = 0; r < rn; ++r) {
      for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(out + L * v) = acc[r][v];
      store(r0 + r, col0, out, static_cast<int64_t>(CO));
    }
  }
}

// All n rows of one column chunk, split across threads in blocks of R rows.
template <int L, int CO, int R, typename RowsOf, typename Store>
void row_gemm_chunk(int64_t n, int64_t taps, int64_t cin, const float* w, int64_t ldw, const float* bias,
                    int64_t col0, const float* zero, RowsOf& rows_of, Store& store) {
  const int64_t blocks = (n + R - 1) / R;
  const int64_t work = std::max<int64_t>(1, taps * cin * (CO / L) * R);  // vector FMAs per block
  at::parallel_for(0, blocks, std::max<int64_t>(1, 4096 / work), [&](int64_t lo, int64_t hi) {
    row_gemm_block<L, CO, R>(lo * R, std::min(n, hi * R), taps, cin, w, ldw, bias, col0, zero, rows_of, store);
  });
}

// The last < 8 columns, one at a time.
template <typename RowsOf, typename Store>
void row_gemm_column(int64_t n, int64_t taps, int64_t cin, const float* w, int64_t ldw, const float* bias,
                     int64_t col, RowsOf rows_of, Store store) {
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(taps * cin, 1)), [&](int64_t lo, int64_t hi) {
    const float* src[kMaxTaps];
    for (int64_t r = lo; r < hi; ++r) {
      rows_of(r, src);
      float acc = bias[col];
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t c = 0; c < cin; ++c) acc += src[t][c] * w[(t * cin + c) * ldw + col];
      store(r, col, &acc, 1);
    }
  });
}

// out = rows x W + bias for rows [0, n) and columns [col_lo, col_hi), in chunks of 64 / 32 / 16 / 8 columns
// and single remainder columns. `w` is [taps * cin, ldw] (row-major); store gets absolute column indices.
// Parallel over row blocks unless called inside a parallel region (then serial: the dynamic conv runs
// one sample or one column share per thread).
template <typename RowsOf, typename Store>
void row_gemm_columns(int64_t n, int64_t taps, int64_t cin, const float* w, int64_t ldw, const float* b,
                      int64_t col_lo, int64_t col_hi, RowsOf rows_of, Store store) {
  TORCH_CHECK(taps >= 1 && taps <= kMaxTaps, "row_gemm: at most 9 taps");
  std::vector<float> zero(cin, 0.f);
  const float* z = zero.data();
  int64_t col0 = col_lo;
  constexpr int L = kWideLanes;
  for (; col0 + 64 <= col_hi; col0 += 64) row_gemm_chunk<L, 64, kRows64>(n, taps, cin, w, ldw, b, col0, z, rows_of, store);
  for (; col0 + 32 <= col_hi; col0 += 32) row_gemm_chunk<L, 32, kRows32>(n, taps, cin, w, ldw, b, col0, z, rows_of, store);
  for (; col0 + 16 <= col_hi; col0 += 16) row_gemm_chunk<L, 16, kRows16>(n, taps, cin, w, ldw, b, col0, z, rows_of, store);
  for (; col0 + 8 <= col_hi; col0 += 8) row_gemm_chunk<8, 8, 8>(n, taps, cin, w, ldw, b, col0, z, rows_of, store);
  for (; col0 < col_hi; ++col0) row_gemm_column(n, taps, cin, w, ldw, b, col0, rows_of, store);
}

// All `cols` columns of a [taps * cin, cols] weight.
template <typename RowsOf, typename Store>
void row_gemm(int64_t n, int64_t taps, int64_t cin, const float* w, int64_t cols, const float* b, RowsOf rows_of,
              Store store) {
  row_gemm_columns(n, taps, cin, w, cols, b, 0, cols, rows_of, store);
}

template <typename RowsOf, typename Store>
void row_gemm(int64_t n, int64_t taps, int64_t cin, const at::Tensor& weight, const at::Tensor& bias, RowsOf rows_of,
              Store store) {
  row_gemm(n, taps, cin, weight.data_ptr<float>(), weight.size(1), bias.data_ptr<float>(), rows_of, store);
}

// The 9 rows a 3x3 window (padding 1, stride s) centred at output position o reads: `row(n, y, x)` inside the
// input, `zero` outside.
template <typename Row>
inline void window_rows(int64_t o, int64_t ho, int64_t wo, int64_t hi, int64_t wi, int64_t s, const float* zero,
                        Row row, const float** ptrs) {
  const int64_t n = o / (ho * wo), rem = o - n * ho * wo, oy = rem / wo, ox = rem - oy * wo;
  for (int64_t ky = 0; ky < 3; ++ky) {
    const int64_t iy = oy * s + ky - 1;
    for (int64_t kx = 0; kx < 3; ++kx) {
      const int64_t ix = ox * s + kx - 1;
      ptrs[ky * 3 + kx] = (iy < 0 || iy >= hi || ix < 0 || ix >= wi) ? zero : row(n, iy, ix);
    }
  }
}

// Store functors: write a chunk of columns into row r of a [n, cols] buffer, optionally clamped.
struct StoreRows {
  float* out;
  int64_t cols;
  float lo, hi;
  void operator()(int64_t r, int64_t col0, const float* acc, int64_t width) const {
    float* dst = out + r * cols + col0;
    for (int64_t j = 0; j < width; ++j) dst[j] = std::min(std::max(acc[j], lo), hi);
  }
};

// Add a chunk into row idx[r] of a [*, cols] buffer (the scatter-add of the residual branch).
struct AddRows {
  float* out;
  int64_t cols;
  const int64_t* idx;
  void operator()(int64_t r, int64_t col0, const float* acc, int64_t width) const {
    float* dst = out + idx[r] * cols + col0;
    for (int64_t j = 0; j < width; ++j) dst[j] += acc[j];
  }
};

constexpr float kInf = std::numeric_limits<float>::infinity();

}  // namespace direct
}  // namespace native
