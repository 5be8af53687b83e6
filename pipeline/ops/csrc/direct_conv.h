// Per-sample direct 3x3 convolutions with per-sample (dynamic) kernels, shared by the dynamic conv's
// inference plan and its training kernels (dynamic_conv.cpp, dynamic_conv_grad.cpp).
#pragma once

#include "row_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace native {
namespace direct {

// dst = sum_j coef[j] * bank[j] for a [k, n] bank, restricted to the columns [lo, hi) of each row of width
// ld (n = rows * ld): one vector of dst at a time, summed in a register. A running sum in dst (load, add,
// store per bank row) measured 3x slower, its stores falsely aliasing the loads of the next bank row (rows
// of 3x3 kernels are often a multiple of 4 KB apart). Serial (callers split columns or samples across
// threads): split as one more parallel loop over two threads, a 64 -> 64 3x3 mix measured 11 us on one and
// 45 us on two.
inline void mix_columns(const float* coef, int64_t k, const float* bank, int64_t n, int64_t ld, int64_t lo,
                        int64_t hi, float* dst) {
  constexpr int L = kWideLanes;
  using V = Simd<L>::V;
  using U = Simd<L>::U;
  for (int64_t row = 0; row < n; row += ld) {
    int64_t i = row + lo;
    for (; i + L <= row + hi; i += L) {
      V acc = coef[0] * *reinterpret_cast<const U*>(bank + i);
      for (int64_t j = 1; j < k; ++j) acc += coef[j] * *reinterpret_cast<const U*>(bank + j * n + i);
      *reinterpret_cast<U*>(dst + i) = acc;
    }
    for (; i < row + hi; ++i) {
      float acc = coef[0] * bank[i];
      for (int64_t j = 1; j < k; ++j) acc += coef[j] * bank[j * n + i];
      dst[i] = acc;
    }
  }
}

// A growable float buffer aligned to a 64-byte cache line, kept between calls (thread_local at its users):
// a 16-lane load from a std::vector's 16-byte-aligned data splits across two lines, which made a mixed
// kernel measurably slower to convolve with than the same kernel in an (aligned) tensor. Contents are not
// initialised and not kept when it grows.
class Buffer {
 public:
  float* get(int64_t size) {
    if (size > capacity_) {
      const int64_t bytes = (std::max<int64_t>(size, 1) * 4 + 63) / 64 * 64;
      storage_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      TORCH_CHECK(storage_ != nullptr, "out of memory for a ", bytes, "-byte buffer");
      capacity_ = size;
    }
    return storage_.get();
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> storage_;
  int64_t capacity_ = 0;
};

// t itself if NCHW- or channels_last-contiguous (the two layouts the direct conv reads), else a contiguous copy.
inline at::Tensor rows_layout(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ? t : t.contiguous();
}

// Positions [lo, hi) of a [C, H*W] (NCHW) sample as rows of a [H * W, C] buffer.
inline void transpose_positions(const float* src, int64_t c, int64_t hw, int64_t lo, int64_t hi, float* dst) {
  constexpr int64_t kTile = 16;
  for (int64_t p0 = lo; p0 < hi; p0 += kTile)
    for (int64_t c0 = 0; c0 < c; c0 += kTile)
      for (int64_t j = c0; j < std::min(c, c0 + kTile); ++j)
        for (int64_t p = p0; p < std::min(hi, p0 + kTile); ++p) dst[p * c + j] = src[j * hw + p];
}

// 3x3 conv (stride 1, padding 1) of every sample of x with its own [(ky, kx, c_in), c_out] kernel matrix
// and bias, as direct row GEMMs (row_gemm.h). kernel_of(n, lo, hi, matrix, bias) returns the (matrix,
// bias) pointers of sample n valid at least for the output columns [lo, hi): its own, or the buffers it was
// given after filling those columns (a dynamic kernel; `dynamic` says whether it needs buffers). Output
// [B, C_out, H, W] in channels_last memory format.
//
// With at least as many samples as threads, one sample per thread at a time: its rows (transposed from
// NCHW into a per-thread buffer) and its kernel stay in that core's L2, where a transpose of the whole batch
// and one grouped conv stream both through memory. With fewer, all threads share each sample: each
// transposes a share of the positions, then fills and applies its share of the output columns of the
// kernel, which so never moves between cores (splitting rows instead, each thread needs the whole kernel).
template <typename KernelOf>
at::Tensor conv3x3_samples(const at::Tensor& x, int64_t co, bool dynamic, KernelOf kernel_of) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w;
  const bool rows_given = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(rows_given || x.is_contiguous(), "input must be contiguous (NCHW or channels_last)");
  // [B, C_out, H, W] in channels_last memory (rows of C_out floats), not a permuted view of an NHWC tensor:
  // autograd forbids in-place ops (an inplace ReLU) on a view a custom Function returned.
  auto out = at::empty({b, co, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  std::vector<float> zero(c, 0.f);
  const float* zp = zero.data();
  // Per-thread kernel buffers kept between calls: allocating and zeroing them measured a tenth of the
  // dynamic conv's overhead at batch 1.
  thread_local Buffer matrix, bias;
  // The kernel of sample n for columns [lo, hi) (mixed into this thread's buffers if dynamic).
  auto kernel = [&](int64_t n, int64_t lo, int64_t hi) {
    return dynamic ? kernel_of(n, lo, hi, matrix.get(9 * c * co), bias.get(co)) : kernel_of(n, lo, hi, nullptr, nullptr);
  };
  auto conv = [&](int64_t n, const float* img, int64_t lo, int64_t hi, std::pair<const float*, const float*> k) {
    row_gemm_columns(hw, 9, c, k.first, co, k.second, lo, hi,
                     [&](int64_t o, const float** ptrs) {
                       window_rows(o, h, w, h, w, 1, zp,
                                   [&](int64_t, int64_t y, int64_t xx) { return img + (y * w + xx) * c; }, ptrs);
                     },
                     StoreRows{dst + n * hw * co, co, -kInf, kInf});
  };
  const int threads = at::get_num_threads();
  auto per_sample = [&](int64_t lo, int64_t hi) {
    thread_local Buffer rows;
    for (int64_t n = lo; n < hi; ++n) {
      const float* img = src + n * hw * c;
      if (!rows_given) {
        float* buffer = rows.get(hw * c);
        transpose_positions(img, c, hw, 0, hw, buffer);
        img = buffer;
      }
      conv(n, img, 0, co, kernel(n, 0, co));
    }
  };
  if (b >= threads || at::in_parallel_region()) {
    at::parallel_for(0, b, 1, per_sample);
  } else if (co < 32) {  // too few columns to share: the row blocks of each sample split across threads
    per_sample(0, b);
  } else {
    thread_local Buffer shared_rows;  // the calling thread's; the team fills and reads it
    float* rows = rows_given ? nullptr : shared_rows.get(hw * c);
    for (int64_t n = 0; n < b; ++n) {
      const float* img = rows_given ? src + n * hw * c : rows;
#pragma omp parallel num_threads(threads)
      {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        // Shares in whole 16-column chunks (the last takes the remainder).
        const int64_t chunks = co / 16;
        const int64_t lo = chunks * t / nt * 16, hi = t + 1 == nt ? co : chunks * (t + 1) / nt * 16;
        if (!rows_given) transpose_positions(src + n * hw * c, c, hw, hw * t / nt, hw * (t + 1) / nt, rows);
        // Mixed before the barrier: a thread done with its rows need not wait to start on its kernel.
        const auto k = lo < hi ? kernel(n, lo, hi) : std::pair<const float*, const float*>{nullptr, nullptr};
#pragma omp barrier
        if (lo < hi) conv(n, img, lo, hi, k);
      }
    }
  }
  return out;
}

}  // namespace direct
}  // namespace native
