// Inference of a dynamic convolution (DyNet / CondConv / DY-Conv) in one call.
//
// y = conv(x, sum_k a_k(x) W_k) + sum_k a_k(x) b_k with a(x) = act(fc2(relu(fc1(GAP(x))))),
// (Zhang et al., DyNet, arXiv 2004.10694; Yang et al., CondConv, Eq. 2; Chen et al., DY-Conv,
// Eqs. 1 and 5): the function of DynamicConv2d's no-grad path (pipeline/ops/dynamic_conv.py). The
// pooling, the routing MLP, the coefficient activation and the kernel aggregation run as plain loops
// over float32 data, so a call costs one Python round trip and one convolution call: at batch 1 the
// operator calls of a Python implementation cost as much as the convolution of a small map.

#include "native.h"
#include "row_gemm.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace native {
namespace {

constexpr int64_t kLinear = 0;
constexpr int64_t kSigmoid = 1;
constexpr int64_t kSoftmax = 2;
// Maps of up to 16 x 16 run the direct conv at batch 1; on larger ones the convolution backend was faster
// (benchmarks/bench_dynamic_conv.py, "direct" column).
constexpr int64_t kDirectMaxPositions = 256;

// out = W in + b for a [n_out, n_in] weight, optionally followed by ReLU.
void linear(const at::Tensor& weight, const at::Tensor& bias, const float* in, float* out, bool relu) {
  const int64_t n_out = weight.size(0), n_in = weight.size(1);
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  for (int64_t j = 0; j < n_out; ++j) {
    const float* row = w + j * n_in;
    float acc = b[j];
    for (int64_t c = 0; c < n_in; ++c) acc += row[c] * in[c];
    out[j] = relu ? std::max(acc, 0.f) : acc;
  }
}

// One sample's kernels: the weighted sum of the K rows of `bank`, block by block so the sum stays in L1
// (a GEMM call costs more at this size).
at::Tensor mix_rows(const at::Tensor& a, const at::Tensor& bank) {
  const int64_t n = bank.size(1);
  auto weight = at::empty({1, n}, bank.options());
  const float* coef = a.data_ptr<float>();
  const float* src = bank.data_ptr<float>();
  float* dst = weight.data_ptr<float>();
  const int64_t k = a.size(1);
  // Split across threads from 32 KB of kernels on: the sum is bound by memory bandwidth per core.
  at::parallel_for(0, n, 8192, [&](int64_t lo, int64_t hi) {
    constexpr int64_t kBlock = 1024;
    for (int64_t start = lo; start < hi; start += kBlock) {
      const int64_t stop = std::min(hi, start + kBlock);
      const float c0 = coef[0];
      for (int64_t i = start; i < stop; ++i) dst[i] = c0 * src[i];
      for (int64_t j = 1; j < k; ++j) {
        const float cj = coef[j];
        const float* row = src + j * n;
        for (int64_t i = start; i < stop; ++i) dst[i] += cj * row[i];
      }
    }
  });
  return weight;
}

}  // namespace

DynamicConvPlan::DynamicConvPlan(at::Tensor fc1_weight, at::Tensor fc1_bias, at::Tensor fc2_weight,
                                 at::Tensor fc2_bias, at::Tensor kernels, c10::optional<at::Tensor> bias,
                                 int64_t activation, double temperature, std::vector<int64_t> stride,
                                 std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups)
    : activation_(activation),
      inv_temperature_(static_cast<float>(1.0 / temperature)),
      stride_(std::move(stride)),
      padding_(std::move(padding)),
      dilation_(std::move(dilation)),
      groups_(groups) {
  check_float_cpu(kernels, "kernels");
  TORCH_CHECK(kernels.dim() == 5, "kernels must be [K, C_out, C_in / groups, kh, kw]");
  TORCH_CHECK(activation >= kLinear && activation <= kSoftmax, "activation code must be 0, 1 or 2");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  k_ = kernels.size(0);
  shape_.assign(kernels.sizes().begin() + 1, kernels.sizes().end());
  bank_ = kernels.reshape({k_, -1}).contiguous();
  fc1_ = fc1_weight.contiguous();  // [hidden, C]
  fc1_bias_ = fc1_bias.contiguous();
  fc2_ = fc2_weight.contiguous();  // [K, hidden]
  fc2_bias_ = fc2_bias.contiguous();
  for (const auto* t : {&fc1_, &fc1_bias_, &fc2_, &fc2_bias_}) check_float_cpu(*t, "routing parameter");
  in_channels_ = fc1_.size(1);
  hidden_ = fc1_.size(0);
  TORCH_CHECK(fc2_.size(0) == k_ && fc2_.size(1) == hidden_, "fc2 must be [K, hidden]");
  if (bias.has_value() && bias->defined()) {
    check_float_cpu(*bias, "bias");
    bias_ = bias->contiguous();  // [K, C_out]
  }
  // 3x3, stride 1, padding 1, ungrouped: batch 1 on small maps runs the direct conv on kernels mixed
  // straight into its [(ky, kx, c_in), c_out] matrix layout.
  direct_ = groups_ == 1 && shape_[2] == 3 && shape_[3] == 3 && stride_ == std::vector<int64_t>{1, 1} &&
            padding_ == std::vector<int64_t>{1, 1} && dilation_ == std::vector<int64_t>{1, 1};
  if (direct_) bank_direct_ = kernels.permute({0, 3, 4, 2, 1}).reshape({k_, -1}).contiguous();
}

at::Tensor conv3x3_rows(const at::Tensor& input, const at::Tensor& matrix, const at::Tensor& bias) {
  const auto x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), co = matrix.size(1);
  TORCH_CHECK(matrix.size(0) == 9 * c, "kernel matrix must be [9 * C_in, C_out]");
  auto out = at::empty({b * h * w, co}, x.options());
  const float* xr = x.data_ptr<float>();
  std::vector<float> zero(c, 0.f);
  const float* zp = zero.data();
  direct::row_gemm(b * h * w, 9, c, matrix, bias,
                   [&](int64_t o, const float** ptrs) {
                     direct::window_rows(o, h, w, h, w, 1, zp,
                                         [&](int64_t n, int64_t y, int64_t xx) { return xr + ((n * h + y) * w + xx) * c; },
                                         ptrs);
                   },
                   direct::StoreRows{out.data_ptr<float>(), co, -direct::kInf, direct::kInf});
  return out.view({b, h, w, co}).permute({0, 3, 1, 2});
}

at::Tensor conv3x3_direct(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_float_cpu(input, "input");
  check_float_cpu(weight, "weight");
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(1) == input.size(1),
              "conv3x3_direct: expected input [B, C, H, W] and weight [C_out, C, 3, 3]");
  const auto matrix = weight.permute({2, 3, 1, 0}).reshape({-1, weight.size(0)}).contiguous();
  const auto b = bias.has_value() && bias->defined() ? bias->contiguous() : at::zeros({weight.size(0)}, weight.options());
  return conv3x3_rows(input, matrix, b);
}

void DynamicConvPlan::coefficients(const float* pooled, float* a) const {
  std::vector<float> hidden(hidden_);
  linear(fc1_, fc1_bias_, pooled, hidden.data(), true);
  linear(fc2_, fc2_bias_, hidden.data(), a, false);
  if (activation_ == kSigmoid) {
    for (int64_t k = 0; k < k_; ++k) a[k] = 1.f / (1.f + std::exp(-a[k]));
  } else if (activation_ == kSoftmax) {
    float top = a[0] * inv_temperature_;
    for (int64_t k = 1; k < k_; ++k) top = std::max(top, a[k] * inv_temperature_);
    float total = 0.f;
    for (int64_t k = 0; k < k_; ++k) total += (a[k] = std::exp(a[k] * inv_temperature_ - top));
    for (int64_t k = 0; k < k_; ++k) a[k] /= total;
  }
}

at::Tensor DynamicConvPlan::mixing(const at::Tensor& x) const {
  const int64_t b = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  auto a = at::empty({b, k_}, x.options());
  std::vector<float> pooled(b * c, 0.f);
  const float scale = 1.0f / static_cast<float>(hw);
  const float* src = x.data_ptr<float>();
  if (x.is_contiguous()) {
    for (int64_t i = 0; i < b * c; ++i) {
      const float* row = src + i * hw;
      float acc = 0.f;
      for (int64_t j = 0; j < hw; ++j) acc += row[j];
      pooled[i] = acc * scale;
    }
  } else {  // channels_last: sum the rows of [H*W, C] per image
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "input must be contiguous (NCHW or channels_last)");
    for (int64_t n = 0; n < b; ++n) {
      float* acc = pooled.data() + n * c;
      const float* img = src + n * hw * c;
      for (int64_t p = 0; p < hw; ++p)
        for (int64_t j = 0; j < c; ++j) acc[j] += img[p * c + j];
      for (int64_t j = 0; j < c; ++j) acc[j] *= scale;
    }
  }
  float* pa = a.data_ptr<float>();
  for (int64_t n = 0; n < b; ++n) coefficients(pooled.data() + n * c, pa + n * k_);
  return a;
}

at::Tensor DynamicConvPlan::aggregate(const at::Tensor& a) const {
  check_float_cpu(a, "coefficients");
  TORCH_CHECK(a.dim() == 2 && a.size(1) == k_ && a.is_contiguous(), "coefficients must be a contiguous [B, K] matrix");
  const int64_t n = bank_.size(1);
  at::Tensor weight;
  if (a.size(0) == 1) {
    weight = mix_rows(a, bank_);
  } else {
    weight = at::mm(a, bank_);
  }
  return weight;
}

at::Tensor DynamicConvPlan::forward(const at::Tensor& input) const {
  check_float_cpu(input, "input");
  TORCH_CHECK(input.dim() == 4 && input.size(1) == in_channels_, "input must be [B, ", in_channels_, ", H, W]");
  const auto x = input.is_contiguous() || input.is_contiguous(at::MemoryFormat::ChannelsLast) ? input
                                                                                                : input.contiguous();
  const int64_t b = x.size(0);
  const auto a = mixing(x);
  if (b == 1 && direct_ && x.size(2) * x.size(3) <= kDirectMaxPositions) {
    const auto matrix = mix_rows(a, bank_direct_).view({-1, shape_[0]});
    const auto bias = bias_.defined() ? at::mm(a, bias_).view({-1}) : at::zeros({shape_[0]}, x.options());
    return conv3x3_rows(x, matrix, bias);
  }
  const auto weight = aggregate(a);
  c10::optional<at::Tensor> bias;
  if (bias_.defined()) bias = at::mm(a, bias_).view({-1});
  std::vector<int64_t> shape = shape_;
  if (b == 1) return at::conv2d(x, weight.view(shape), bias, stride_, padding_, dilation_, groups_);
  // Fold the batch into groups: B per-sample convs as one grouped conv.
  shape[0] *= b;
  auto y = at::conv2d(x.contiguous().view({1, b * in_channels_, x.size(2), x.size(3)}), weight.view(shape), bias,
                      stride_, padding_, dilation_, b * groups_);
  return y.view({b, shape_[0], y.size(2), y.size(3)});
}

}  // namespace native
