// Gradients of the dynamic 3x3 conv (dynamic_conv3x3) for training, one sample per thread.
//
// For y_n = conv(x_n, W_n) + b_n with W_n = sum_k a_nk W_k and b_n = sum_k a_nk b_k (DyNet, arXiv
// 2004.10694; CondConv, Eq. 2; DY-Conv, Eq. 1), given gy:
//   grad x_n  = conv(gy_n, flip(W_n)^T)                   (the direct conv with the mixed, flipped kernel)
//   G_n       = sum_p x_n(p + offset_t) gy_n(p)^T         (the per-sample weight gradient, [9 C_in, C_out])
//   grad a_nk = <G_n, W_k> + <sum_p gy_n(p), b_k>
//   grad W_k  = sum_n a_nk G_n,   grad b_k = sum_n a_nk sum_p gy_n(p).
// As a grouped conv (the PyTorch path) the batch's per-sample kernels and their gradients are
// B x C_out x C_in x 9 floats written to and read back from memory several times per step; here each
// thread keeps one sample's kernel and G_n in its cache and folds G_n into its own partial grad W at once.

#include "direct_conv.h"
#include "native.h"
#include "row_gemm.h"

#include <algorithm>
#include <vector>

namespace native {
namespace {

using direct::Simd;

// Columns [col0, col0 + CO) of one sample's weight gradient G = sum_p x(p + offset_t)[c] g(p)[col] for the 9
// taps t, x rows [H * W, C_in], g rows [H * W, C_out], G [9 * C_in, C_out] (row t * C_in + c). Register
// block: R input channels x CO columns, accumulated over the output positions whose tap lies inside.
template <int L, int CO, int R>
void weight_grad_chunk(const float* x, const float* g, int64_t h, int64_t w, int64_t ci, int64_t co, int64_t col0,
                       float* grad) {
  using V = typename Simd<L>::V;
  using U = typename Simd<L>::U;
  constexpr int NV = CO / L;
  for (int64_t t = 0; t < 9; ++t) {
    const int64_t dy = t / 3 - 1, dx = t % 3 - 1;
    const int64_t y0 = std::max<int64_t>(0, -dy), y1 = std::min(h, h - dy);
    const int64_t x0 = std::max<int64_t>(0, -dx), x1 = std::min(w, w - dx);
    for (int64_t c0 = 0; c0 < ci; c0 += R) {
      const int64_t rn = std::min<int64_t>(R, ci - c0);
      int64_t channel[R];  // rows past the last channel repeat channel c0; their sums are dropped
      for (int r = 0; r < R; ++r) channel[r] = c0 + (r < rn ? r : 0);
      V acc[R][NV];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = V{};
      for (int64_t y = y0; y < y1; ++y) {
        const float* gline = g + y * w * co + col0;
        const float* xrow = x + ((y + dy) * w + dx) * ci;
        for (int64_t xx = x0; xx < x1; ++xx) {
          V gv[NV];
          for (int v = 0; v < NV; ++v) gv[v] = *reinterpret_cast<const U*>(gline + xx * co + L * v);
          const float* xp = xrow + xx * ci;
          for (int r = 0; r < R; ++r) {
            const float xs = xp[channel[r]];
            for (int v = 0; v < NV; ++v) acc[r][v] += xs * gv[v];
          }
        }
      }
      for (int64_t r = 0; r < rn; ++r)
        for (int v = 0; v < NV; ++v)
          *reinterpret_cast<U*>(grad + (t * ci + c0 + r) * co + col0 + L * v) = acc[r][v];
    }
  }
}

// One remaining column.
void weight_grad_column(const float* x, const float* g, int64_t h, int64_t w, int64_t ci, int64_t co, int64_t col,
                        float* grad) {
  for (int64_t t = 0; t < 9; ++t) {
    const int64_t dy = t / 3 - 1, dx = t % 3 - 1;
    for (int64_t c = 0; c < ci; ++c) {
      float acc = 0.f;
      for (int64_t y = std::max<int64_t>(0, -dy); y < std::min(h, h - dy); ++y)
        for (int64_t xx = std::max<int64_t>(0, -dx); xx < std::min(w, w - dx); ++xx)
          acc += x[((y + dy) * w + xx + dx) * ci + c] * g[(y * w + xx) * co + col];
      grad[(t * ci + c) * co + col] = acc;
    }
  }
}

void weight_grad(const float* x, const float* g, int64_t h, int64_t w, int64_t ci, int64_t co, float* grad) {
  using direct::kRows16, direct::kRows32, direct::kRows64;
  constexpr int L = direct::kWideLanes;
  int64_t col0 = 0;
  for (; col0 + 64 <= co; col0 += 64) weight_grad_chunk<L, 64, kRows64>(x, g, h, w, ci, co, col0, grad);
  for (; col0 + 32 <= co; col0 += 32) weight_grad_chunk<L, 32, kRows32>(x, g, h, w, ci, co, col0, grad);
  for (; col0 + 16 <= co; col0 += 16) weight_grad_chunk<L, 16, kRows16>(x, g, h, w, ci, co, col0, grad);
  for (; col0 + 8 <= co; col0 += 8) weight_grad_chunk<8, 8, 8>(x, g, h, w, ci, co, col0, grad);
  for (; col0 < co; ++col0) weight_grad_column(x, g, h, w, ci, co, col0, grad);
}

// sum_i a[i] b[i] in 16 (or 8) lanes, then across the lanes.
float dot(const float* a, const float* b, int64_t n) {
  constexpr int L = direct::kWideLanes;
  using V = Simd<L>::V;
  using U = Simd<L>::U;
  V acc = V{};
  int64_t i = 0;
  for (; i + L <= n; i += L) acc += *reinterpret_cast<const U*>(a + i) * *reinterpret_cast<const U*>(b + i);
  float total = 0.f;
  for (int j = 0; j < L; ++j) total += acc[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// y += alpha x
void axpy(float alpha, const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Rows [H * W, C] of sample s: the tensor's own memory if channels_last, else a transposed copy in `buffer`.
const float* sample_rows(const at::Tensor& t, int64_t s, direct::Buffer& buffer) {
  const int64_t c = t.size(1), hw = t.size(2) * t.size(3);
  const float* src = t.data_ptr<float>() + s * c * hw;
  if (!t.is_contiguous()) return src;  // channels_last
  float* rows = buffer.get(hw * c);
  direct::transpose_positions(src, c, hw, 0, hw, rows);
  return rows;
}

}  // namespace

std::vector<at::Tensor> dynamic_conv3x3_backward(const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& a,
                                                 const at::Tensor& bank, const c10::optional<at::Tensor>& bias_bank,
                                                 std::vector<bool> needs) {
  for (const auto* t : {&gy_in, &x_in, &a, &bank}) check_float_cpu(*t, "dynamic_conv3x3_backward argument");
  TORCH_CHECK(needs.size() == 4, "needs: one flag per input (x, a, bank, bias bank)");
  const int64_t b = x_in.size(0), ci = x_in.size(1), h = x_in.size(2), w = x_in.size(3), hw = h * w;
  const int64_t k = bank.size(0), n = bank.size(1), co = n / (9 * ci);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == b && a.size(1) == k && a.is_contiguous() && bank.is_contiguous() &&
                  n == 9 * ci * co && gy_in.dim() == 4 && gy_in.size(0) == b && gy_in.size(1) == co &&
                  gy_in.size(2) == h && gy_in.size(3) == w,
              "dynamic_conv3x3_backward: shapes do not match dynamic_conv3x3's");
  const bool has_bias = bias_bank.has_value() && bias_bank->defined();
  const float* bias = has_bias ? bias_bank->data_ptr<float>() : nullptr;
  const bool need_x = needs[0], need_a = needs[1], need_bank = needs[2], need_bias = needs[3] && has_bias;
  const bool need_g = need_a || need_bank || need_bias;
  const auto x = direct::rows_layout(x_in), gy = direct::rows_layout(gy_in);
  const auto opts = x.options();

  at::Tensor gx, ga, gbank, gbias, bank_t, partial, partial_bias;
  if (need_x) {
    gx = at::empty({b, h, w, ci}, opts);
    // The flipped, transposed kernels: grad x = conv(gy, W') with W'[(ky, kx, c_out), c_in] = W[(2-ky, 2-kx, c_in), c_out].
    bank_t = bank.view({k, 3, 3, ci, co}).flip({1, 2}).transpose(3, 4).contiguous().view({k, n});
  }
  if (need_a) ga = at::zeros({b, k}, opts);
  const int64_t threads = at::get_num_threads();
  if (need_bank) partial = at::zeros({threads, k, n}, opts);
  if (need_bias) partial_bias = at::zeros({threads, k, co}, opts);
  const float* pa = a.data_ptr<float>();
  std::vector<float> zero_bias(ci, 0.f), zero_row(co, 0.f);

  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    thread_local direct::Buffer xbuf, gbuf, kernel_buffer, grad_buffer, gsum_buffer;
    const int64_t tid = at::get_thread_num();
    for (int64_t s = lo; s < hi; ++s) {
      const float* as = pa + s * k;
      const float* grows = sample_rows(gy, s, gbuf);
      if (need_x) {
        float* kernel = kernel_buffer.get(n);
        direct::mix_columns(as, k, bank_t.data_ptr<float>(), n, ci, 0, ci, kernel);
        direct::row_gemm(hw, 9, co, kernel, ci, zero_bias.data(),
                         [&](int64_t o, const float** ptrs) {
                           direct::window_rows(o, h, w, h, w, 1, zero_row.data(),
                                               [&](int64_t, int64_t y, int64_t xx) { return grows + (y * w + xx) * co; },
                                               ptrs);
                         },
                         direct::StoreRows{gx.data_ptr<float>() + s * hw * ci, ci, -direct::kInf, direct::kInf});
      }
      if (!need_g) continue;
      const float* xrows = sample_rows(x, s, xbuf);
      float* grad = grad_buffer.get(n);
      weight_grad(xrows, grows, h, w, ci, co, grad);
      float* gsum = gsum_buffer.get(co);
      if (has_bias) {
        std::fill_n(gsum, co, 0.f);
        for (int64_t p = 0; p < hw; ++p) axpy(1.f, grows + p * co, co, gsum);
      }
      for (int64_t j = 0; j < k; ++j) {
        if (need_a) {
          float g = dot(grad, bank.data_ptr<float>() + j * n, n);
          if (has_bias) g += dot(gsum, bias + j * co, co);
          ga.data_ptr<float>()[s * k + j] = g;
        }
        if (need_bank) axpy(as[j], grad, n, partial.data_ptr<float>() + (tid * k + j) * n);
        if (need_bias) axpy(as[j], gsum, co, partial_bias.data_ptr<float>() + (tid * k + j) * co);
      }
    }
  });
  if (need_bank) gbank = partial.sum(0);
  if (need_bias) gbias = partial_bias.sum(0);
  return {need_x ? gx.permute({0, 3, 1, 2}) : gx, ga, gbank, gbias};
}

}  // namespace native
