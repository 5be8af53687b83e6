// Compiled CPU inference kernels of the pipeline's operators (float32). Each plan is built once from a
// module's parameters (pipeline/ops/native.py keeps it until a parameter changes) and computes the same
// function as the module's eval-mode forward; the Python modules remain the reference and the path for
// other devices and dtypes.
#pragma once

#include "simd.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace native {

inline void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat, name,
              " must be a float32 CPU tensor");
}

// The tensors a plan was built from (false for inference tensors, which have no version counter);
// current() is false once one of them was changed in place or got new storage. Checked here because the
// same checks in Python cost a visible share of a small layer.
class SourceWatch {
 public:
  bool watch(const std::vector<c10::optional<at::Tensor>>& sources) {
    watched_.clear();
    versions_.clear();
    storage_.clear();
    for (const auto& t : sources) {
      if (!t.has_value() || !t->defined()) continue;
      if (t->is_inference()) return false;
      watched_.push_back(*t);
      versions_.push_back(t->_version());
      storage_.push_back(t->data_ptr());
    }
    return true;
  }
  bool current() const {
    for (size_t i = 0; i < watched_.size(); ++i)
      if (watched_[i]._version() != versions_[i] || watched_[i].data_ptr() != storage_[i]) return false;
    return true;
  }

 private:
  std::vector<at::Tensor> watched_;
  std::vector<int64_t> versions_;
  std::vector<const void*> storage_;
};

// A tensor's floats, copied (contiguous).
inline std::vector<float> floats(const at::Tensor& t, const char* name) {
  check_float_cpu(t, name);
  const auto c = t.contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

class DynamicConvPlan : public SourceWatch {
 public:
  DynamicConvPlan(at::Tensor fc1_weight, at::Tensor fc1_bias, at::Tensor fc2_weight, at::Tensor fc2_bias,
                  at::Tensor kernels, c10::optional<at::Tensor> bias, int64_t activation, double temperature,
                  std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                  int64_t groups);
  at::Tensor forward(const at::Tensor& x) const;
  // Mixing coefficients a(x), [B, K].
  at::Tensor mixing(const at::Tensor& x) const;
  // Aggregated kernels sum_k a_k W_k, [B, C_out * C_in / groups * kh * kw], of coefficients a [B, K].
  at::Tensor aggregate(const at::Tensor& a) const;

 private:
  void coefficients(const float* pooled, float* a) const;

  int64_t activation_;
  float inv_temperature_;
  std::vector<int64_t> stride_, padding_, dilation_, shape_;
  int64_t groups_, k_ = 0, in_channels_ = 0, hidden_ = 0;
  bool direct_ = false;  // 3x3 / stride 1 / padding 1 / ungrouped: runs the direct conv per sample
  at::Tensor fc1_, fc1_bias_, fc2_, fc2_bias_, bank_, bias_, bank_direct_;
};

// 3x3 conv, stride 1, padding 1, as direct row GEMMs on channels-last rows (row_gemm.h), the one
// DynamicConvPlan runs per sample, with one static kernel given as its [(ky, kx, c_in), c_out] matrix
// (pipeline.ops.native.conv3x3_matrix): the static conv the dynamic one is benchmarked against. Output
// [B, C_out, H, W] in channels_last memory format.
at::Tensor conv3x3_direct(const at::Tensor& x, const at::Tensor& matrix, const c10::optional<at::Tensor>& bias);

// Dynamic 3x3 conv (stride 1, padding 1, ungrouped) with given coefficients a [B, K]: sample n convolved with
// sum_k a[n, k] bank[k] (the bank is [K, 9 * C_in * C_out] in [(ky, kx, c_in), c_out] matrix layout) plus
// sum_k a[n, k] bias_bank[k]. Output [B, C_out, H, W] in channels_last memory format. The forward of both the
// inference plan and the training op (pipeline/ops/dynamic_conv.py).
at::Tensor dynamic_conv3x3(const at::Tensor& x, const at::Tensor& a, const at::Tensor& bank,
                           const c10::optional<at::Tensor>& bias_bank);
// Its gradients for the output gradient gy: (grad x [channels_last], grad a, grad bank, grad bias bank), each
// undefined unless asked for by `needs` (x, a, bank, bias bank).
std::vector<at::Tensor> dynamic_conv3x3_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& a,
                                                 const at::Tensor& bank, const c10::optional<at::Tensor>& bias_bank,
                                                 std::vector<bool> needs);

}  // namespace native

#include "model_plan.h"
