// Compiled CPU inference kernels of the pipeline's operators (float32). Each plan is built once from a
// module's parameters (pipeline/ops/native.py keeps it until a parameter changes) and computes the same
// function as the module's eval-mode forward; the Python modules remain the reference and the path for
// other devices and dtypes.
#pragma once

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

class DynamicConvPlan {
 public:
  DynamicConvPlan(at::Tensor fc1_weight, at::Tensor fc1_bias, at::Tensor fc2_weight, at::Tensor fc2_bias,
                  at::Tensor kernels, c10::optional<at::Tensor> bias, int64_t activation, double temperature,
                  std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                  int64_t groups);
  at::Tensor forward(const at::Tensor& x) const;
  // Remember the tensors the plan was built from (false for inference tensors, which have no version
  // counter); current() is false once one of them was changed in place or got new storage, checked here
  // because the same checks in Python cost a visible share of a small layer.
  bool watch(const std::vector<c10::optional<at::Tensor>>& sources);
  bool current() const;
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
  std::vector<at::Tensor> watched_;
  std::vector<int64_t> versions_;
  std::vector<const void*> storage_;
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

// A whole network as one compiled call (model_plan.cpp): buffers of zero-padded planes, then ops in order
// (convs with optional residual and ReLU, stride-2 tap gathers), then global average pooling and a linear
// head. Buffer 0 is the input. Built op by op from Python (pipeline/model_plan.py).
class ModelPlan {
 public:
  // Conv modes: 3x3 stride 1 padding 1 on a buffer of the output's size; 1x1 stride 1; 3x3 stride 2 on a
  // gathered tap buffer; 1x1 stride 2 on the centre tap of a gathered tap buffer.
  static constexpr int64_t kConv3x3 = 0;
  static constexpr int64_t kConv1x1 = 1;
  static constexpr int64_t kTaps3x3 = 2;
  static constexpr int64_t kTapsCentre = 3;

  ModelPlan(int64_t channels, int64_t height, int64_t width);
  ~ModelPlan();
  int64_t buffer(int64_t channels, int64_t height, int64_t width);
  // The nine taps of a 3x3, stride-2, padding-1 window of every channel of `in`, as planes (tap, c) of `out`.
  int64_t gather(int64_t in, int64_t out);
  // out = [relu](conv(in) + bias [+ res]); weight [C_out, C_in, kh, kw].
  int64_t fixed_conv(int64_t in, int64_t out, int64_t res, bool relu, int64_t mode, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias);
  // The same with the kernels [K, C_out, C_in, kh, kw] and bias [K, C_out] mixed per sample by
  // act(fc2(relu(fc1(GAP(route))))) (activation codes as DynamicConvPlan).
  int64_t dynamic_conv(int64_t in, int64_t route, int64_t out, int64_t res, bool relu, int64_t mode,
                       const at::Tensor& kernels, const c10::optional<at::Tensor>& bias, const at::Tensor& fc1_weight,
                       const at::Tensor& fc1_bias, const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                       int64_t activation, double temperature);
  void head(int64_t in, const at::Tensor& weight, const at::Tensor& bias);
  // A buffer of rows (position-major) for DynConv's sparse blocks, and the op copying a plane buffer into one.
  int64_t rows_buffer(int64_t channels, int64_t height, int64_t width);
  int64_t to_rows(int64_t in, int64_t out);
  // The mask unit on a rows buffer (logits of a 3x3 conv with `stride` + fc(GAP) + biases, mask = logits >= 0,
  // its 3x3 dilation) and the lists of active positions of each and of the inactive ones of the mask.
  int64_t rows_gate(int64_t in, int64_t mask, int64_t dilated, int64_t stride, const at::Tensor& conv_weight,
                    const at::Tensor& conv_bias, const at::Tensor& fc_weight, const at::Tensor& fc_bias);
  // out = [relu](conv(in) + bias [+ res]) on rows buffers (3x3 padding 1 or 1x1, stride 1 or 2) at every
  // position, or (gate >= 0) at the positions of the gate's dilated mask (which 0) or of its mask with
  // [relu](res) at its other positions (which 1).
  int64_t rows_conv(int64_t in, int64_t out, int64_t res, bool relu, int64_t stride, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, int64_t gate, int64_t which);
  // Logits [B, classes] of a float32 input [B, C, H, W].
  at::Tensor forward(const at::Tensor& input);
  // How a batch smaller than the thread count runs: 0 (default) times both ways on the first such call per
  // (threads, batch) and keeps the faster, 1 one thread, 2 the threads sharing each image.
  void set_team_policy(int64_t policy);
  // Threads sharing an image chosen for (threads, batch < threads); 0 before the first such call.
  int64_t team(int64_t threads, int64_t batch) const;
  // Per conv: ((output channel, entry) products its blocks execute per position, dense pairs), flattened.
  std::vector<int64_t> kept_entries() const;
  bool watch(const std::vector<at::Tensor>& sources);
  bool current() const;

 private:
  struct Geometry {
    int64_t c = 0, h = 0, w = 0, wp = 0, plane = 0, offset = 0, sums = 0;  // offsets into the workspace
    bool rows = false;
  };
  struct Block {
    int64_t co0, cob, e0, ne, w0;
    // Entry ranges relative to e0: for COB 4, seg[m] .. seg[m + 1] are the entries used by exactly the
    // channels of bitmask m (seg[16] = ne); for COB 1, seg[0] .. seg[1].
    int32_t seg[17];
  };
  struct Conv {
    int64_t in = -1, route = -1, out = -1, res = -1;
    bool relu = false;
    int64_t cin = 0, cout = 0, k = 1, ew = 0, hidden = 0, activation = 0, dense_entries = 0;
    float inv_temperature = 1.f;
    std::vector<Block> blocks;
    std::vector<int32_t> off;
    std::vector<float> w, bias, fc1, fc1_bias, fc2, fc2_bias, pad;
    std::vector<int64_t> work;
  };
  struct Gather {
    int64_t in, out;
  };
  struct RowsGate {
    int64_t in = -1, mask = -1, dilated = -1, stride = 1, positions = 0, lists = 0, across = 0;
    std::vector<float> w, fc;
    float bias = 0.f;
  };
  struct RowsConv {
    int64_t in = -1, out = -1, res = -1, stride = 1, taps = 9, gate = -1, which = 0;
    bool relu = false;
    std::vector<float> matrix, bias;
    std::vector<int32_t> all;  // every interior position of the output
  };
  struct Op {
    int64_t kind, index;
    bool wait = true;  // meet the other threads first (false: reads nothing the previous op writes)
  };
  struct Workspace;
  static constexpr int64_t kConv = 0;
  static constexpr int64_t kGather = 1;
  static constexpr int64_t kToRows = 3;
  static constexpr int64_t kRowsGate = 4;
  static constexpr int64_t kRowsConv = 5;

  const Geometry& geometry(int64_t id) const;
  int64_t add_buffer(int64_t channels, int64_t height, int64_t width, bool rows);
  int64_t push_op(int64_t kind, size_t count);
  void add_conv(Conv conv, const at::Tensor& weight, int64_t mode);
  void route(const Conv& c, const float* base, float* a, float* scratch, int64_t parts) const;
  void run_conv(const Conv& c, float* base, float* scratch, int64_t t, int64_t nt) const;
  void run_gather(const Gather& op, float* base, int64_t t, int64_t nt) const;
  void run_to_rows(const Gather& op, float* base, int64_t t, int64_t nt) const;
  void rows_gate_mask(const RowsGate& g, float* base, int64_t t, int64_t nt) const;
  void rows_gate_lists(const RowsGate& g, float* base) const;
  void run_rows_conv(const RowsConv& c, float* base, int64_t t, int64_t nt) const;
  void rows_sums(int64_t id, float* base, int64_t y0, int64_t y1, int64_t part) const;
  void pool(int64_t id, const float* base, int64_t parts, float* pooled) const;
  static constexpr int kMaxTeam = 8;  // threads sharing one image (more would only wait on each other)
  // Register tile heights (16-position vectors) by output-channel block size, and the full tiles per thread a
  // layer needs to be shared by positions rather than by channels.
  static constexpr int kTile[5] = {0, 12, 0, 0, 6};
  static constexpr int64_t kSplitTiles = 1;
  static int64_t vectors(const Geometry& g);
  static int64_t products(const Block& b);
  void run_sample(const float* x, float* logits, float* base, float* scratch, int64_t t, int64_t nt) const;

  std::vector<Geometry> geometry_;
  std::vector<Conv> convs_;
  std::vector<Gather> gathers_;
  std::vector<RowsGate> rows_gates_;
  std::vector<RowsConv> rows_convs_;
  std::vector<Op> ops_;
  int64_t total_ = 0, head_in_ = -1, classes_ = 0;
  int64_t max_ew_ = 0, max_cout_ = 0, max_hidden_ = 0, max_k_ = 1, max_route_ = 0;
  std::vector<float> head_w_, head_b_;
  int64_t team_policy_ = 0;
  std::map<std::pair<int64_t, int64_t>, int64_t> teams_;  // (threads, batch) -> threads per image
  std::vector<std::unique_ptr<Workspace>> work_, scratch_;
  mutable std::mutex mutex_;
  std::vector<at::Tensor> watched_;
  std::vector<int64_t> versions_;
  std::vector<const void*> storage_;
};

}  // namespace native
