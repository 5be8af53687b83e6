// Inference of a dynamic convolution (DyNet / CondConv / DY-Conv) in one call.
//
// y = conv(x, sum_k a_k(x) W_k) + sum_k a_k(x) b_k with a(x) = act(fc2(relu(fc1(GAP(x))))),
// (Zhang et al., DyNet, arXiv 2004.10694; Yang et al., CondConv, Eq. 2; Chen et al., DY-Conv,
// Eqs. 1 and 5): the function of DynamicConv2d's no-grad path (pipeline/ops/dynamic_conv.py). The
// pooling, the routing MLP, the coefficient activation and the kernel aggregation run as plain loops
// over float32 data, so a call costs one Python round trip and one convolution call: at batch 1 the
// operator calls of a Python implementation cost as much as the convolution of a small map.

#include "native.h"
#include "direct_conv.h"
#include "row_gemm.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace native {
namespace {


// sum of x[0..n) in 8 lanes: a scalar float sum is one dependent add per element (the compiler may not
// reorder it), 4 to 8 times slower on the pooled map.
float sum(const float* x, int64_t n) {
  direct::Vec8 acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += *reinterpret_cast<const direct::Lanes8*>(x + i);
  float total = 0.f;
  for (int j = 0; j < 8; ++j) total += acc[j];
  for (; i < n; ++i) total += x[i];
  return total;
}

// out = W in + b (simd.h) for a [n_out, n_in] weight tensor.
void linear(const at::Tensor& weight, const at::Tensor& bias, const float* in, float* out, bool relu) {
  native::linear(weight.data_ptr<float>(), bias.data_ptr<float>(), weight.size(0), weight.size(1), in, out, relu);
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

at::Tensor dynamic_conv3x3(const at::Tensor& input, const at::Tensor& a, const at::Tensor& bank,
                           const c10::optional<at::Tensor>& bias_bank) {
  check_float_cpu(input, "input");
  check_float_cpu(a, "coefficients");
  check_float_cpu(bank, "bank");
  const int64_t b = input.size(0), c = input.size(1), k = bank.size(0);
  TORCH_CHECK(input.dim() == 4 && a.dim() == 2 && a.size(0) == b && a.size(1) == k && a.is_contiguous(),
              "dynamic_conv3x3: expected input [B, C, H, W] and contiguous coefficients [B, K]");
  TORCH_CHECK(bank.dim() == 2 && bank.is_contiguous() && bank.size(1) % (9 * c) == 0,
              "dynamic_conv3x3: expected a contiguous kernel bank [K, 9 * C * C_out]");
  const int64_t co = bank.size(1) / (9 * c);
  const float* bias = nullptr;
  if (bias_bank.has_value() && bias_bank->defined()) {
    check_float_cpu(*bias_bank, "bias bank");
    TORCH_CHECK(bias_bank->is_contiguous() && bias_bank->numel() == k * co, "dynamic_conv3x3: bias bank must be [K, C_out]");
    bias = bias_bank->data_ptr<float>();
  }
  const auto x = direct::rows_layout(input);
  const float* pa = a.data_ptr<float>();
  const float* pb = bank.data_ptr<float>();
  const int64_t n = bank.size(1);
  // Each sample's kernel mixed straight into the direct conv's matrix layout, on the thread that uses it.
  return direct::conv3x3_samples(x, co, true, [&](int64_t s, int64_t lo, int64_t hi, float* matrix, float* sample_bias) {
    direct::mix_columns(pa + s * k, k, pb, n, co, lo, hi, matrix);
    if (bias != nullptr) {
      direct::mix_columns(pa + s * k, k, bias, co, co, lo, hi, sample_bias);
    } else {
      std::fill_n(sample_bias, co, 0.f);
    }
    return std::make_pair(static_cast<const float*>(matrix), static_cast<const float*>(sample_bias));
  });
}

at::Tensor conv3x3_direct(const at::Tensor& input, const at::Tensor& matrix, const c10::optional<at::Tensor>& bias) {
  check_float_cpu(input, "input");
  check_float_cpu(matrix, "matrix");
  TORCH_CHECK(input.dim() == 4 && matrix.dim() == 2 && matrix.size(0) == 9 * input.size(1) && matrix.is_contiguous(),
              "conv3x3_direct: expected input [B, C, H, W] and a contiguous kernel matrix [9 * C, C_out]");
  const int64_t co = matrix.size(1);
  const auto b = bias.has_value() && bias->defined() ? bias->contiguous() : at::zeros({co}, matrix.options());
  const auto x = direct::rows_layout(input);
  const float* m = matrix.data_ptr<float>();
  const float* bb = b.data_ptr<float>();
  return direct::conv3x3_samples(x, co, false,
                         [&](int64_t, int64_t, int64_t, float*, float*) { return std::make_pair(m, bb); });
}

void DynamicConvPlan::coefficients(const float* pooled, float* a) const {
  std::vector<float> hidden(hidden_);
  linear(fc1_, fc1_bias_, pooled, hidden.data(), true);
  linear(fc2_, fc2_bias_, hidden.data(), a, false);
  activate(a, k_, activation_, activation_ == kSoftmax ? inv_temperature_ : 1.f);
}

// Global average pool of one sample: [C, H*W] (NCHW) or [H*W, C] (channels_last) floats.
void pool_sample(const float* img, int64_t c, int64_t hw, bool channels_last, float* pooled) {
  const float scale = 1.0f / static_cast<float>(hw);
  if (!channels_last) {
    for (int64_t j = 0; j < c; ++j) pooled[j] = sum(img + j * hw, hw) * scale;
  } else {
    std::fill_n(pooled, c, 0.f);
    for (int64_t p = 0; p < hw; ++p)
      for (int64_t j = 0; j < c; ++j) pooled[j] += img[p * c + j];
    for (int64_t j = 0; j < c; ++j) pooled[j] *= scale;
  }
}

at::Tensor DynamicConvPlan::mixing(const at::Tensor& x) const {
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "input must be contiguous (NCHW or channels_last)");
  const int64_t b = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  auto a = at::empty({b, k_}, x.options());
  const float* src = x.data_ptr<float>();
  float* pa = a.data_ptr<float>();
  const bool channels_last = !x.is_contiguous();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> pooled(c);
    for (int64_t n = lo; n < hi; ++n) {
      pool_sample(src + n * c * hw, c, hw, channels_last, pooled.data());
      coefficients(pooled.data(), pa + n * k_);
    }
  });
  return a;
}

at::Tensor DynamicConvPlan::aggregate(const at::Tensor& a) const {
  check_float_cpu(a, "coefficients");
  TORCH_CHECK(a.dim() == 2 && a.size(1) == k_ && a.is_contiguous(), "coefficients must be a contiguous [B, K] matrix");
  if (a.size(0) > 1) return at::mm(a, bank_);
  const int64_t n = bank_.size(1);
  auto weight = at::empty({1, n}, bank_.options());
  direct::mix_columns(a.data_ptr<float>(), k_, bank_.data_ptr<float>(), n, n, 0, n, weight.data_ptr<float>());
  return weight;
}


at::Tensor DynamicConvPlan::forward(const at::Tensor& input) const {
  check_float_cpu(input, "input");
  TORCH_CHECK(input.dim() == 4 && input.size(1) == in_channels_, "input must be [B, ", in_channels_, ", H, W]");
  const auto x = direct::rows_layout(input);
  const int64_t b = x.size(0), co = shape_[0];
  const auto a = mixing(x);
  if (direct_) return dynamic_conv3x3(x, a, bank_direct_, bias_);
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
