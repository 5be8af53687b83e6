// Direct small convolutions on channels-last rows (see row_gemm), shared by the compiled plans.
#pragma once

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

// Eight floats as one SIMD value (GCC / Clang vector extension); `Lanes8` loads and stores unaligned.
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Lanes8 __attribute__((vector_size(32), aligned(4)));

template <int CO, int R, typename RowsOf, typename Store>
void row_gemm_chunk(int64_t n, int64_t taps, int64_t cin, const float* w, int64_t ldw, const float* bias,
                    int64_t col0, const float* zero, RowsOf rows_of, Store store) {
  // Explicit vectors along the output columns: left to itself the compiler vectorises across the input
  // channels with gather loads of the kernel, which measured 10x slower.
  static_assert(CO % 8 == 0, "CO must be a multiple of 8");
  constexpr int V = CO / 8;
  const int64_t blocks = (n + R - 1) / R;
  const int64_t work = std::max<int64_t>(1, taps * cin * V * R);  // vector FMAs per block
  at::parallel_for(0, blocks, std::max<int64_t>(1, 4096 / work), [&](int64_t lo, int64_t hi) {
    const float* src[R][kMaxTaps];
    alignas(32) float out[CO];
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t r0 = blk * R;
      const int64_t rn = std::min<int64_t>(R, n - r0);
      for (int r = 0; r < R; ++r) {
        if (r < rn) {
          rows_of(r0 + r, src[r]);
        } else {
          for (int64_t t = 0; t < taps; ++t) src[r][t] = zero;
        }
      }
      Vec8 acc[R][V];
      for (int v = 0; v < V; ++v) {
        const Vec8 b = *reinterpret_cast<const Lanes8*>(bias + col0 + 8 * v);
        for (int r = 0; r < R; ++r) acc[r][v] = b;
      }
      for (int64_t t = 0; t < taps; ++t) {
        const float* wt = w + t * cin * ldw + col0;
        for (int64_t c = 0; c < cin; ++c) {
          const float* wc = wt + c * ldw;
          Vec8 wv[V];
          for (int v = 0; v < V; ++v) wv[v] = *reinterpret_cast<const Lanes8*>(wc + 8 * v);
          for (int r = 0; r < R; ++r) {
            const float x = src[r][t][c];
            for (int v = 0; v < V; ++v) acc[r][v] += x * wv[v];
          }
        }
      }
      for (int64_t r = 0; r < rn; ++r) {
        for (int v = 0; v < V; ++v) *reinterpret_cast<Lanes8*>(out + 8 * v) = acc[r][v];
        store(r0 + r, col0, out, static_cast<int64_t>(CO));
      }
    }
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

template <typename RowsOf, typename Store>
void row_gemm(int64_t n, int64_t taps, int64_t cin, const at::Tensor& weight, const at::Tensor& bias, RowsOf rows_of,
              Store store) {
  TORCH_CHECK(taps >= 1 && taps <= kMaxTaps, "row_gemm: at most 9 taps");
  const int64_t cols = weight.size(1);
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  std::vector<float> zero(cin, 0.f);
  int64_t col0 = 0;
  for (; col0 + 64 <= cols; col0 += 64)
    row_gemm_chunk<64, 4>(n, taps, cin, w, cols, b, col0, zero.data(), rows_of, store);
  for (; col0 + 32 <= cols; col0 += 32)
    row_gemm_chunk<32, 4>(n, taps, cin, w, cols, b, col0, zero.data(), rows_of, store);
  for (; col0 + 16 <= cols; col0 += 16)
    row_gemm_chunk<16, 6>(n, taps, cin, w, cols, b, col0, zero.data(), rows_of, store);
  for (; col0 + 8 <= cols; col0 += 8) row_gemm_chunk<8, 8>(n, taps, cin, w, cols, b, col0, zero.data(), rows_of, store);
  for (; col0 < cols; ++col0) row_gemm_column(n, taps, cin, w, cols, b, col0, rows_of, store);
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
