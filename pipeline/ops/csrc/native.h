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

// How a gated block's forward ran (SparseBasicBlock.last_path): no active position, gather / scatter,
// or the folded convs over the whole map with the mask multiplied in.
constexpr int64_t kPathShortcut = 0;
constexpr int64_t kPathSparse = 1;
constexpr int64_t kPathDense = 2;

// DynConv mask unit in eval mode: the 3x3 conv taps as a [9, C] matrix, the pooled linear weight, the sum
// of both biases.
struct GatePlan {
  GatePlan(const at::Tensor& conv_weight, const at::Tensor& conv_bias, const at::Tensor& fc_weight,
           const at::Tensor& fc_bias, int64_t stride);
  at::Tensor taps, fc;
  float bias = 0.f;
  int64_t stride = 1, channels = 0;
};

// The masks of one forward at the output resolution: bool [B, 1, H', W'] mask and dilated mask, the flat
// positions of each, and the 1-based rank of every dilated position in idx_d (0 elsewhere).
struct Masks {
  at::Tensor mask, dilated;
  std::vector<int64_t> idx_m, idx_d, rank;
  int64_t b = 0, h = 0, w = 0;
};

// The mask of the mask unit (or of `given`, nonzero = active) for channels-last input rows.
Masks make_masks(const at::Tensor& rows, int64_t b, int64_t h, int64_t w, const GatePlan* gate,
                 const c10::optional<at::Tensor>& given, int64_t stride);
// Fill masks.dilated, idx_d and rank from the mask positions.
void dilate(Masks& masks);

// Returned by the block plans: output (channels_last), mask, dilated mask (undefined on the dense path),
// path code.
using BlockResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t>;

// GatedBasicBlock with BNs folded: conv1 (3x3, stride s) at the dilated mask, conv2 (3x3) at the mask,
// identity or 1x1-projection shortcut, ReLU after the sum.
class BasicBlockPlan {
 public:
  BasicBlockPlan(const at::Tensor& gate_conv_w, const at::Tensor& gate_conv_b, const at::Tensor& gate_fc_w,
                 const at::Tensor& gate_fc_b, int64_t stride, const at::Tensor& w1, const at::Tensor& b1,
                 const at::Tensor& w2, const at::Tensor& b2, const c10::optional<at::Tensor>& ws,
                 const c10::optional<at::Tensor>& bs);
  BlockResult forward(const at::Tensor& x, const c10::optional<at::Tensor>& mask, double dense_above) const;

 private:
  GatePlan gate_;
  int64_t stride_, in_channels_ = 0, out_channels_ = 0;
  at::Tensor w1_, b1_, w2_, b2_, ws_, bs_, m1_, m2_, ms_;
};

// GatedInvertedResidual (stride 1) with BNs folded: 1x1 expansion at the dilated mask, depthwise 3x3 and
// 1x1 projection at the mask, identity shortcut; ReLU6 activations.
class InvertedResidualPlan {
 public:
  InvertedResidualPlan(const at::Tensor& gate_conv_w, const at::Tensor& gate_conv_b, const at::Tensor& gate_fc_w,
                       const at::Tensor& gate_fc_b, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                       const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3);
  BlockResult forward(const at::Tensor& x, const c10::optional<at::Tensor>& mask, double dense_above) const;

 private:
  GatePlan gate_;
  int64_t channels_ = 0, hidden_ = 0;
  at::Tensor w1_, b1_, w2_, b2_, w3_, b3_, m1_, taps_, m3_;
};

}  // namespace native

#include "model_plan.h"
