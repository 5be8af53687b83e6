// The whole-model plan's interface (see the comment below for its design).
#pragma once

#include "native.h"
#include "plan_kernels.h"

#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

// Whole-model inference plan: a network of 3x3 / 1x1 and depthwise 3x3 convolutions (static, or dynamic kernel
// mixtures as in DyNet / CondConv / DY-Conv, SD-Conv and ODConv), residual additions, ReLU / ReLU6, global
// average pooling and a linear head, run as one call with every activation in preallocated buffers and no Python
// between layers.
//
// Code: plan_kernels.h (SIMD kernels, no ATen), plan_build.cpp (building the ops), plan_rows.cpp (DynConv's
// rows ops), plan_exec.cpp (executor, threads).
//
// Layout. Every activation is a stack of zero-padded planes: channel c of an H x W map is (H + 2) x (W + 2)
// floats at c * plane (plane a multiple of 16 floats, with slack after each plane), the map at rows and
// columns 1..H, 1..W. A 3x3 conv with stride 1 and padding 1 is then, for every position p of the padded
// plane, out[co][p] = bias[co] + sum_e w[e][co] * in[p + off[e]] with off[e] = ci * plane + (ky - 1) * (W + 2)
// + (kx - 1): one "entry" per (input channel, tap). The positions from the first to the last interior one
// are contiguous, so the conv runs over them in SIMD vectors of 16 positions (wasting the two pad columns
// of each row, which are zeroed after each channel is stored). A stride-2 conv first gathers its nine taps
// into planes of the output's geometry (`gather`) and is then a sum over entries at offset (tap, ci) * plane;
// its 1x1 stride-2 shortcut reads the centre tap.
//
// Register tiles. Output channels in blocks of COB = 4 sharing one entry list, positions in tiles of P
// vectors: COB x P accumulators, P loads and up to COB broadcasts per entry. A block's list holds only the
// entries some of its channels use, grouped by which of them do, and each group multiplies into those
// channels only: a layer with pruned weights (SD-Conv's kernels: a weight is zero when it is zero in all K
// kernels) executes its nonzero MACs only, while each input vector is still loaded once per block (per
// channel lists, COB = 1, load once per MAC; most of those loads straddle two cache lines, which made them
// about half as fast per MAC). C_out not a multiple of 4 runs COB = 1.
//
// Dynamic convs: attentions act_h(fc2_h(relu(fc1(GAP(x))))) per sample (one squeeze, one or more heads), then
// each block's weights mixed, w = sum_k a_k W_k (and the bias), and scaled by ODConv's spatial, input-channel
// and filter attentions where it has them (Li et al., ICLR 2022, Eq. 3: exact, since each multiplies the
// mixed kernel along one of its axes), right before the block is convolved (DyNet, Zhang et al., arXiv
// 2004.10694; CondConv, Yang et al., NeurIPS 2019, Eq. 2; DY-Conv, Chen et al., CVPR 2020, Eqs. 1, 5;
// SD-Conv, He et al., WACV 2023, W(x) = sum_k a_k (W_k * M_k) with the masks baked into W_k).
//
// DynConv's sparse blocks (Verelst & Tuytelaars, CVPR 2020) run position by position instead: their masks
// are scattered (a 16-position vector of the padded plane holds an active position for 0.7-1.0 of the
// vectors at half the positions active), so their maps are kept as rows (position-major, the channels of one
// padded position contiguous, `rows` buffers) and each gated conv runs the direct row GEMM (row_gemm.h)
// over the list of active positions only: conv1 at the dilated mask, conv2 at the mask (its output added to
// the shortcut, relu(shortcut) passed at the other positions), the shortcut and the mask unit everywhere; in
// the gated inverted residual the 1x1 expansion at the dilated mask, the depthwise 3x3 (per channel, a vector
// of channels at a time) and the 1x1 projection at the mask, the input passing elsewhere; in the gated
// bottleneck conv1 at the dilated mask (strided: at the input positions conv2's windows read, the gate's
// expanded mask on the input grid), conv2 and conv3 at the mask.
//
// Threads. With at least as many samples per call as threads each thread runs whole samples in its own
// workspace. With fewer, the threads share each layer (a large map by positions: a contiguous range of its
// vectors, or of a sparse block's position list, for every output channel, so the rows a thread writes are
// mostly those it reads next, in its own core's caches; a small map by output channels) and meet at a barrier
// between layers; or one thread runs the samples alone. Which of the two is faster depends on the model (a
// pruned model's layers are too short to amortize the barriers), so the first such call times both and the
// plan keeps the faster. Pooling sums each thread's share as it is stored (sparse blocks: each thread sums
// its rows). The operators describe themselves to the Python builder (pipeline/ops/plan/), which maps a model onto
// these ops; the model's own forward stays the reference the plan is tested against. A plan ends in a head (a
// whole model: logits) or returns output maps (`outputs`: a block planned alone, as a DynConv sparse block outside
// a whole-model plan runs, with its mask and dilated mask).

namespace native {

// A whole network as one compiled call: buffers of zero-padded planes (or rows), then ops in order (convs
// with optional residual and activation, depthwise convs, stride-2 tap gathers, k x k window gathers, max
// pooling, DynConv's rows ops), then
// global average pooling and a linear head. Buffer 0 is the input. Built op by op from Python
// (pipeline/ops/plan/builder.py).
class ModelPlan : public SourceWatch {
 public:
  // Conv modes: 3x3 stride 1 padding 1 on a buffer of the output's size; 1x1 stride 1; 3x3 stride 2 on a
  // gathered tap buffer; 1x1 stride 2 on the centre tap of a gathered tap buffer.
  static constexpr int64_t kConv3x3 = 0;
  static constexpr int64_t kConv1x1 = 1;
  static constexpr int64_t kTaps3x3 = 2;
  static constexpr int64_t kTapsCentre = 3;
  // Roles of a routing head's outputs: ODConv's kernel (a_w; DyNet's coefficients), spatial (a_s, one per
  // tap), input-channel (a_c) and filter (a_f) attentions.
  static constexpr int64_t kKernelHead = 0;
  static constexpr int64_t kSpatialHead = 1;
  static constexpr int64_t kChannelHead = 2;
  static constexpr int64_t kFilterHead = 3;
  // A routing head: (role, outputs, activation code, 1 / temperature applied before the activation).
  using Head = std::tuple<int64_t, int64_t, int64_t, double>;

  ModelPlan(int64_t channels, int64_t height, int64_t width);
  ~ModelPlan();
  int64_t buffer(int64_t channels, int64_t height, int64_t width);
  // The nine taps of a 3x3, stride-2, padding-1 window of every channel of `in`, as planes (tap, c) of `out`.
  int64_t gather(int64_t in, int64_t out);
  // The k x k taps (stride, zero padding pad) of every channel of `in`, as planes (tap, c) of `out`: a conv the
  // plane kernels do not run directly (the 7 x 7, stride-2 stem of ImageNet ResNets) is then a 1x1 conv on them.
  int64_t gather_window(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad);
  // out = the maximum of each channel over its k x k windows (stride, padding pad: padded positions never win).
  int64_t max_pool(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad);
  // out = act(conv(in) + bias [+ res]); weight [C_out, C_in, kh, kw]; act a plan::kAct* code.
  int64_t fixed_conv(int64_t in, int64_t out, int64_t res, int64_t act, int64_t mode, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias);
  // The same with the kernels [K, C_out, C_in, kh, kw] mixed per sample by the heads of
  // relu(fc1(GAP(route))) (fc2 stacks the heads' rows in order; without a kernel head K must be 1), the
  // bias [K, C_out] mixed like the kernels or [C_out] added as it is (after the filter attention).
  int64_t dynamic_conv(int64_t in, int64_t route, int64_t out, int64_t res, int64_t act, int64_t mode,
                       const at::Tensor& kernels, const c10::optional<at::Tensor>& bias, const at::Tensor& fc1_weight,
                       const at::Tensor& fc1_bias, const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                       const std::vector<Head>& heads);
  // Depthwise 3x3 conv (padding 1, stride 1 or 2) of `in` (stride 2 picks each tap's even columns from the
  // input rows in registers: no gathered tap planes). kernels
  // [K, C, 1, 3, 3] (K = 1 and no fc: a static conv), bias [K, C] or [C]; heads as dynamic_conv (route < 0:
  // static).
  int64_t depthwise_conv(int64_t in, int64_t route, int64_t out, int64_t res, int64_t act, int64_t stride,
                         const at::Tensor& kernels, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& fc1_weight, const c10::optional<at::Tensor>& fc1_bias,
                         const c10::optional<at::Tensor>& fc2_weight, const c10::optional<at::Tensor>& fc2_bias,
                         const std::vector<Head>& heads);
  void head(int64_t in, const at::Tensor& weight, const at::Tensor& bias);
  // Instead of a head: the buffers whose maps forward_maps returns (a block or a layer planned on its own, e.g.
  // a DynConv block's output with its mask and dilated mask).
  void outputs(const std::vector<int64_t>& buffers);
  // A buffer of rows (position-major) for DynConv's sparse blocks, and the op copying a plane buffer into one.
  int64_t rows_buffer(int64_t channels, int64_t height, int64_t width);
  int64_t to_rows(int64_t in, int64_t out);
  // The mask unit on a rows buffer (logits of a 3x3 conv with `stride` + fc(GAP) + biases, mask = logits >= 0,
  // its 3x3 dilation) and the lists of active positions of each and of the inactive ones of the mask; with an
  // `expanded` plane of the input's size (>= 0), also the input positions a 3x3 conv with `stride` reads for the
  // mask (DynConv's ExpandMask: where a strided bottleneck's conv1 runs) and their list.
  int64_t rows_gate(int64_t in, int64_t mask, int64_t dilated, int64_t expanded, int64_t stride,
                    const at::Tensor& conv_weight, const at::Tensor& conv_bias, const at::Tensor& fc_weight,
                    const at::Tensor& fc_bias);
  // out = act(conv(in) + bias [+ res]) on rows buffers (3x3 padding 1 or 1x1, stride 1 or 2) at every
  // position, or (gate >= 0) at the positions of the gate's dilated mask (which 0), of its mask with act(res)
  // at its other positions (which 1), or of its expanded mask on the input grid (which 2).
  int64_t rows_conv(int64_t in, int64_t out, int64_t res, int64_t act, int64_t stride, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, int64_t gate, int64_t which);
  // out = act(depthwise3x3(in) + bias) on rows (stride 1, padding 1), weight [C, 1, 3, 3], at every position
  // or (gate >= 0) at the gate's dilated mask (which 0) or mask (which 1); the other positions are not written.
  int64_t rows_depthwise(int64_t in, int64_t out, int64_t act, const at::Tensor& weight, const at::Tensor& bias,
                         int64_t gate, int64_t which);
  // The op copying a rows buffer into planes (with their per-channel sums, for pooling and routing).
  int64_t to_planes(int64_t in, int64_t out);
  // Logits [B, classes] of a float32 input [B, C, H, W].
  at::Tensor forward(const at::Tensor& input);
  // The output maps [B, C, H, W] (a rows buffer's in channels_last memory format) of a float32 input.
  std::vector<at::Tensor> forward_maps(const at::Tensor& input);
  // How a batch smaller than the thread count runs: 0 (default) times both ways on the first such call per
  // (threads, batch) and keeps the faster, 1 one thread, 2 the threads sharing each image.
  void set_team_policy(int64_t policy);
  // Threads sharing an image chosen for (threads, batch < threads); 0 before the first such call.
  int64_t team(int64_t threads, int64_t batch) const;
  // Per conv: ((output channel, entry) products its blocks execute per position, dense pairs), flattened.
  std::vector<int64_t> kept_entries() const;
  // Per-op times, for finding the slow layer: while on, each call runs one thread per image (or, with team
  // policy 2, all threads sharing each image) and adds each op's seconds on thread 0's clock; profile() gives
  // (op kind, index among its kind, seconds) in op order (benchmarks/bench_plan_ops.py).
  void set_profiling(bool on);
  std::vector<std::tuple<int64_t, int64_t, double>> profile() const;

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
  // Per-sample attentions: route < 0 for a static op.
  struct Routing {
    int64_t route = -1, hidden = 0, outputs = 0;
    std::vector<float> fc1, fc1_bias, fc2, fc2_bias;
    std::vector<Head> heads;
    int64_t at[4] = {-1, -1, -1, -1};  // offset of each role's outputs (kKernelHead ..), -1 if absent
  };
  struct Conv {
    int64_t in = -1, out = -1, res = -1, act = 0;
    Routing routing;
    bool bias_mixed = true;  // bias [K, C_out] mixed by the kernel attention, else [C_out]
    int64_t cin = 0, cout = 0, k = 1, ew = 0, taps = 9, dense_entries = 0;
    std::vector<Block> blocks;
    std::vector<int32_t> off, entry;  // per block entry: its input offset and its index ci * taps + tap
    std::vector<float> w, bias, pad;
    std::vector<int64_t> work;
    // A 1x1 conv on a small map reads its input packed without pads ([C_in][np], np = h * w rounded up to L):
    // the pads of small planes would be a third to a half of its vectors (kPackedPositions).
    bool packed = false;
    int64_t np = 0;
    // Threads sharing an image split by output channels pack the input together into one of two shared
    // buffers after the workspace's maps (packed convs alternate, so one still being read is never packed
    // over: the next packed conv's barrier lies between), each thread the channels it wrote itself.
    int64_t slot = 0;
    plan::PackedLayout layout;
    // A 1x1 or gathered-tap conv on a map larger than kPackedPositions (or whose input planes take more than
    // kChunkInputBytes) runs its share in chunks of `chunk`
    // vectors, each packed first into the thread's scratch ([input plane][chunk * L], pads included) and run by
    // every output block before the next: the input of a tile is one stream, not one per input plane, and is
    // read from L1 / L2 by every block; `off` then holds plane * chunk * L.
    int64_t chunk = 0;
    int64_t plane0 = 0, planes = 0;  // the input planes a chunk packs (a centre-tap conv: only the centre's)
  };
  struct Depthwise {
    int64_t in = -1, out = -1, res = -1, act = 0, stride = 1, c = 0, k = 1;
    Routing routing;
    bool bias_mixed = true;
    std::vector<float> w, bias, pad;  // w [K][C][9], bias [K][C] or [C]
  };
  struct Gather {
    int64_t in, out;
  };
  struct Window {  // gather_window and max_pool
    int64_t in, out, k, stride, pad;
  };
  struct RowsGate {
    int64_t in = -1, mask = -1, dilated = -1, expanded = -1, stride = 1, positions = 0, lists = 0, across = 0;
    std::vector<float> w, fc;
    float bias = 0.f;
  };
  struct RowsConv {
    int64_t in = -1, out = -1, res = -1, act = 0, stride = 1, taps = 9, gate = -1, which = 0;
    bool depthwise = false;  // matrix [9][C] of per-channel taps instead of [(tap, c_in)][c_out]
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
  static constexpr int64_t kDepthwise = 2;
  static constexpr int64_t kToRows = 3;
  static constexpr int64_t kRowsGate = 4;
  static constexpr int64_t kRowsConv = 5;
  static constexpr int64_t kToPlanes = 6;
  static constexpr int64_t kWindow = 7;
  static constexpr int64_t kMaxPool = 8;

  const Geometry& geometry(int64_t id) const;
  int64_t add_buffer(int64_t channels, int64_t height, int64_t width, bool rows);
  int64_t push_op(int64_t kind, size_t count);
  void add_conv(Conv conv, const at::Tensor& weight, int64_t mode);
  Routing make_routing(int64_t route, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                       const at::Tensor& fc2_weight, const at::Tensor& fc2_bias, const std::vector<Head>& heads,
                       int64_t k, int64_t cin, int64_t cout, int64_t taps);
  std::vector<float> pad_mask(const Geometry& go) const;
  static plan::PackedLayout packed_layout(const Geometry& go);
  // Check that buffer res (< 0: none) can be added to an output of geometry go, in the same layout.
  void check_residual(int64_t res, const Geometry& go, const char* what) const;
  // A routed op's attentions for this sample: a (the kernel attention, or a single 1) and ODConv's spatial,
  // input-channel and filter attentions (nullptr where absent).
  struct Attention {
    const float *a, *spatial, *channel, *filter;
  };
  Attention attend(const Routing& r, const float* base, float* att, float* scratch, int64_t parts) const;
  void route(const Routing& r, const float* base, float* att, float* scratch, int64_t parts) const;
  void run_conv(const Conv& c, float* base, float* scratch, int64_t t, int64_t nt) const;
  void run_depthwise(const Depthwise& d, float* base, float* scratch, int64_t t, int64_t nt) const;
  void run_gather(const Gather& op, float* base, int64_t t, int64_t nt) const;
  void run_window(const Window& op, float* base, int64_t t, int64_t nt) const;
  void run_max_pool(const Window& op, float* base, int64_t t, int64_t nt) const;
  void run_to_rows(const Gather& op, float* base, int64_t t, int64_t nt) const;
  void rows_gate_mask(const RowsGate& g, float* base, int64_t t, int64_t nt) const;
  void rows_gate_lists(const RowsGate& g, float* base) const;
  void rows_gate_expand(const RowsGate& g, float* base) const;
  void run_rows_conv(const RowsConv& c, float* base, int64_t t, int64_t nt) const;
  void run_rows_depthwise(const RowsConv& c, float* base, int64_t t, int64_t nt) const;
  void run_to_planes(const Gather& op, float* base, int64_t t, int64_t nt) const;
  // The position list of a gated rows op in the workspace (count, first) for `which`; every position if ungated.
  std::pair<const int32_t*, int64_t> positions(const RowsConv& c, const float* base) const;
  void rows_sums(int64_t id, float* base, int64_t y0, int64_t y1, int64_t part) const;
  void pool(int64_t id, const float* base, int64_t parts, float* pooled) const;

  static constexpr int kMaxTeam = 8;  // threads sharing one image (more would only wait on each other)
  // The full tiles (plan::tile_height vectors) per thread a layer needs to be shared by positions rather than
  // by channels.
  static constexpr int64_t kSplitTiles = 1;
  // A 1x1 conv on a map of at most kPackedPositions positions whose packed input takes at most kPackedBytes runs
  // packed (Conv::packed): C_in x positions floats copied (by the threads sharing an image together, each its
  // share of the channels), little beside the conv's C_out x C_in x positions MACs, and spares the pad columns
  // and the select that zeroes them (at 32 x 32 with 24 input channels: 165 -> 138 us in the model). A larger
  // copy would push the planes it was read from out of the core's L2 (144 input channels at 32 x 32: 113 -> 210
  // us in the model); larger maps have few pads anyway.
  static constexpr int64_t kPackedPositions = 1024;
  static constexpr int64_t kChunkBytes = 160 << 10;  // a chunk's packed input (at least one register tile)
  static constexpr int64_t kChunkInputBytes = 1 << 20;  // ... for a smaller map with more input than this
  static constexpr int64_t kPackedBytes = 256 << 10;
  static int64_t vectors(const Geometry& g);
  static int64_t products(const Block& b);
  // Where a batch's results go: logits (one sink) or the output maps, sample n at ptr[k] + n * per_sample[k].
  struct Sinks {
    std::vector<float*> ptr;
    std::vector<int64_t> per_sample;
  };
  void check_input(const at::Tensor& input) const;
  void run_batch(const at::Tensor& x, const Sinks& sinks);
  void run_sample(const float* x, const Sinks& sinks, int64_t n, float* base, float* scratch, int64_t t,
                  int64_t nt) const;
  // Copy the map of buffer id (interior positions) to dst: [C, H, W] for planes, [H, W, C] for rows.
  void store_map(int64_t id, const float* base, float* dst) const;

  std::vector<Geometry> geometry_;
  std::vector<Conv> convs_;
  std::vector<Depthwise> depthwise_;
  std::vector<Gather> gathers_;
  std::vector<Window> windows_;
  std::vector<RowsGate> rows_gates_;
  std::vector<RowsConv> rows_convs_;
  std::vector<Op> ops_;
  int64_t total_ = 0, head_in_ = -1, classes_ = 0;
  std::vector<int64_t> outputs_;
  int64_t max_ew_ = 0, max_cout_ = 0, max_hidden_ = 0, max_att_ = 1, max_route_ = 0, max_packed_ = 0, packed_convs_ = 0,
          max_chunk_ = 0;
  std::vector<float> head_w_, head_b_;
  int64_t team_policy_ = 0;
  bool profiling_ = false;
  mutable std::vector<double> op_seconds_;
  std::map<std::pair<int64_t, int64_t>, int64_t> teams_;  // (threads, batch) -> threads per image
  std::vector<std::unique_ptr<Workspace>> work_, scratch_;
  mutable std::mutex mutex_;
};

}  // namespace native
