// Building the whole-model plan (model_plan.h): buffers and ops, each checked against its buffers' shapes.
#include "model_plan.h"
#include "plan_kernels.h"

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

namespace native {

using namespace plan;

int64_t ModelPlan::buffer(int64_t channels, int64_t height, int64_t width) {
  return add_buffer(channels, height, width, false);
}

int64_t ModelPlan::rows_buffer(int64_t channels, int64_t height, int64_t width) {
  return add_buffer(channels, height, width, true);
}

// A map of zero-padded planes (or of rows: position-major) and after it the per-channel sums of each thread's
// share of the map, written with the share (pooling needs no pass).
int64_t ModelPlan::add_buffer(int64_t channels, int64_t height, int64_t width, bool rows) {
  TORCH_CHECK(channels > 0 && height > 0 && width > 0, rows ? "rows buffer" : "buffer", ": sizes must be positive");
  Geometry g;
  g.c = channels;
  g.h = height;
  g.w = width;
  g.wp = width + 2;
  g.rows = rows;
  g.offset = total_;
  if (rows) {
    total_ += round_up((height + 2) * g.wp * channels + L, L);
  } else {
    g.plane = round_up((height + 2) * g.wp + L, L);
    total_ += round_up(channels * g.plane, L);
  }
  g.sums = total_;
  total_ += round_up(channels * kMaxTeam, L);
  geometry_.push_back(g);
  return static_cast<int64_t>(geometry_.size()) - 1;
}

// Append the op of kind `kind` whose parameters were just pushed (`count` of that kind so far); its op index.
int64_t ModelPlan::push_op(int64_t kind, size_t count) {
  ops_.push_back({kind, static_cast<int64_t>(count) - 1});
  return static_cast<int64_t>(ops_.size()) - 1;
}

const ModelPlan::Geometry& ModelPlan::geometry(int64_t id) const {
  TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(geometry_.size()), "no buffer ", id);
  return geometry_[id];
}

int64_t ModelPlan::gather(int64_t in, int64_t out) {
  const auto& gi = geometry(in);
  const auto& go = geometry(out);
  TORCH_CHECK(go.c == 9 * gi.c && go.h == (gi.h - 1) / 2 + 1 && go.w == (gi.w - 1) / 2 + 1,
              "gather: the output buffer must hold the 9 taps of every input channel at stride 2");
  gathers_.push_back({in, out});
  return push_op(kGather, gathers_.size());
}

int64_t ModelPlan::gather_window(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad) {
  const auto& gi = geometry(in);
  const auto& go = geometry(out);
  TORCH_CHECK(k >= 1 && stride >= 1 && pad >= 0 && pad < k, "gather window: k >= 1, stride >= 1, 0 <= pad < k");
  TORCH_CHECK(!gi.rows && !go.rows && go.c == k * k * gi.c && go.h == (gi.h + 2 * pad - k) / stride + 1 &&
                  go.w == (gi.w + 2 * pad - k) / stride + 1 && gi.h + 2 * pad >= k && gi.w + 2 * pad >= k,
              "gather window: the output buffer must hold the k x k taps of every input channel at the stride");
  windows_.push_back({in, out, k, stride, pad});
  return push_op(kWindow, windows_.size());
}

int64_t ModelPlan::max_pool(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad) {
  const auto& gi = geometry(in);
  const auto& go = geometry(out);
  TORCH_CHECK(k >= 1 && stride >= 1 && pad >= 0 && 2 * pad <= k, "max pool: k >= 1, stride >= 1, 0 <= pad <= k / 2");
  TORCH_CHECK(!gi.rows && !go.rows && go.c == gi.c && go.h == (gi.h + 2 * pad - k) / stride + 1 &&
                  go.w == (gi.w + 2 * pad - k) / stride + 1 && gi.h + 2 * pad >= k && gi.w + 2 * pad >= k,
              "max pool: the output must be the input map pooled at the stride");
  windows_.push_back({in, out, k, stride, pad});
  return push_op(kMaxPool, windows_.size());
}

// Multiplications per output vector a block executes: each entry times the channels using it.
int64_t ModelPlan::products(const Block& b) {
  if (b.cob == 1) return b.seg[1] - b.seg[0];
  int64_t n = 0;
  for (int m = 1; m < 16; ++m) n += __builtin_popcount(m) * (b.seg[m + 1] - b.seg[m]);
  return n;
}

// Entries of `weight` ([K, C_out, C_in, kh, kw]) for the given mode, grouped into output-channel blocks.
void ModelPlan::add_conv(Conv conv, const at::Tensor& weight, int64_t mode) {
  const auto& gi = geometry(conv.in);
  const auto& go = geometry(conv.out);
  const int64_t k = weight.size(0), cout = weight.size(1), cin = weight.size(2), kh = weight.size(3),
                kw = weight.size(4);
  TORCH_CHECK(go.c == cout, "conv: the output buffer has ", go.c, " channels, the weight ", cout);
  check_residual(conv.res, go, "conv");
  // (input channel, tap) -> offset of the entry relative to the output position.
  std::vector<int32_t> entry_off;
  if (mode == kConv3x3) {
    TORCH_CHECK(kh == 3 && kw == 3 && gi.c == cin && gi.h == go.h && gi.w == go.w, "conv3x3: shape mismatch");
    for (int64_t ci = 0; ci < cin; ++ci)
      for (int64_t ky = 0; ky < 3; ++ky)
        for (int64_t kx = 0; kx < 3; ++kx) entry_off.push_back(ci * gi.plane + (ky - 1) * gi.wp + (kx - 1));
  } else if (mode == kConv1x1) {
    TORCH_CHECK(kh == 1 && kw == 1 && gi.c == cin && gi.h == go.h && gi.w == go.w, "conv1x1: shape mismatch");
    conv.np = round_up(go.h * go.w, L);
    conv.packed = go.h * go.w <= kPackedPositions && cin * conv.np * 4 <= kPackedBytes;
  } else if (mode == kTaps3x3) {
    TORCH_CHECK(kh == 3 && kw == 3 && gi.c == 9 * cin && gi.h == go.h && gi.w == go.w, "taps3x3: shape mismatch");
  } else if (mode == kTapsCentre) {
    TORCH_CHECK(kh == 1 && kw == 1 && gi.c == 9 * cin && gi.h == go.h && gi.w == go.w, "taps centre: shape mismatch");
  } else {
    TORCH_CHECK(false, "conv: unknown mode ", mode);
  }
  if (mode != kConv3x3) {  // every entry reads one input plane at the output position
    const int64_t cob = cout % 4 != 0 ? 1 : 4;
    // The input planes it reads: every one, or the centre tap's.
    conv.plane0 = mode == kTapsCentre ? 4 * cin : 0;
    conv.planes = mode == kTapsCentre ? cin : gi.c;
    if (!conv.packed && (go.h * go.w > kPackedPositions || conv.planes * gi.plane * 4 > kChunkInputBytes)) {
      const int64_t tile = tile_height(static_cast<int>(cob));
      conv.chunk = std::max<int64_t>(1, kChunkBytes / (conv.planes * L * 4 * tile)) * tile;
      if (conv.chunk >= vectors(go)) conv.chunk = 0;  // one chunk: the copy would buy nothing
      max_chunk_ = std::max(max_chunk_, conv.planes * conv.chunk * L);
    }
    const int64_t stride = conv.packed ? conv.np : conv.chunk > 0 ? conv.chunk * L : gi.plane;
    const int64_t centre = conv.chunk > 0 ? 0 : 4 * cin;  // a chunk packs the centre planes alone
    for (int64_t ci = 0; ci < cin; ++ci) {
      if (mode == kConv1x1) {
        entry_off.push_back(ci * stride);
      } else if (mode == kTapsCentre) {
        entry_off.push_back((centre + ci) * stride);
      } else {
        for (int64_t t = 0; t < 9; ++t) entry_off.push_back((t * cin + ci) * stride);
      }
    }
  }
  const int64_t taps = kh * kw, ne = cin * taps;
  TORCH_CHECK(static_cast<int64_t>(entry_off.size()) == ne, "conv: entry count");
  const auto wk = weight.reshape({k, cout, ne}).contiguous();  // entry e = ci * taps + tap, as entry_off
  const float* pw = wk.data_ptr<float>();
  auto nonzero = [&](int64_t co, int64_t e) {
    for (int64_t j = 0; j < k; ++j)
      if (pw[(j * cout + co) * ne + e] != 0.f) return true;
    return false;
  };
  // Blocks of 4 output channels (1 where C_out is not a multiple of 4). A block keeps the entries some of its
  // channels use, sorted by the subset that uses them (stable: a dense block keeps the entry order), so a
  // pruned layer (SD-Conv) loads each input vector once per block and multiplies only its nonzero weights.
  // A dense packed conv has few vectors per channel: its blocks are wider (16 channels for one or two
  // vectors, else 8), so a tile still holds enough accumulators to keep the FMA units busy.
  bool dense = true;
  for (int64_t co = 0; co < cout && dense; ++co)
    for (int64_t e = 0; e < ne && dense; ++e) dense = nonzero(co, e);
  int64_t cob = cout % 4 != 0 ? 1 : 4;
  if (conv.packed && dense) {
    const int64_t nv = conv.np / L;
    if (nv <= 2 && cout % 16 == 0) {
      cob = 16;
    } else if (cout % 8 == 0) {
      cob = 8;
    }
  }
  std::vector<std::vector<float>> bank(k);
  for (int64_t co0 = 0; co0 < cout; co0 += cob) {
    Block b{co0, cob, static_cast<int64_t>(conv.off.size()), 0, static_cast<int64_t>(bank[0].size()), {}};
    std::vector<std::pair<int, int64_t>> used;  // (channel subset, entry)
    for (int64_t e = 0; e < ne; ++e) {
      int subset = 0;
      for (int64_t c = 0; c < cob; ++c) subset |= nonzero(co0 + c, e) ? 1 << c : 0;
      if (subset != 0) used.emplace_back(cob == 4 ? subset : 0, e);
    }
    std::stable_sort(used.begin(), used.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    for (const auto& [subset, e] : used) {
      conv.off.push_back(entry_off[e]);
      conv.entry.push_back(static_cast<int32_t>(e));
      for (int64_t j = 0; j < k; ++j)
        for (int64_t c = 0; c < cob; ++c) bank[j].push_back(pw[(j * cout + co0 + c) * ne + e]);
      ++b.ne;
      for (int m = subset + 1; m < 17; ++m) b.seg[m] = static_cast<int32_t>(b.ne);
    }
    conv.blocks.push_back(b);
  }
  conv.ew = static_cast<int64_t>(bank[0].size());
  conv.cout = cout;
  conv.cin = cin;
  conv.k = k;
  conv.taps = taps;
  conv.dense_entries = cout * ne;
  for (int64_t j = 0; j < k; ++j) conv.w.insert(conv.w.end(), bank[j].begin(), bank[j].end());
  conv.pad = pad_mask(go);
  if (conv.packed) {
    conv.layout = packed_layout(go);
    max_packed_ = std::max(max_packed_, cin * conv.np);
    conv.slot = packed_convs_++ % 2;
  }
  // Work prefix (entries x channels) for balancing blocks across threads.
  conv.work.assign(1, 0);
  for (const auto& b : conv.blocks) conv.work.push_back(conv.work.back() + std::max<int64_t>(1, b.ne + products(b)));
  max_ew_ = std::max(max_ew_, conv.ew);
  max_cout_ = std::max(max_cout_, cout);
  convs_.push_back(std::move(conv));
  push_op(kConv, convs_.size());
}


int64_t ModelPlan::fixed_conv(int64_t in, int64_t out, int64_t res, int64_t act, int64_t mode, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias) {
  check_float_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 4, "static conv: weight must be [C_out, C_in, kh, kw]");
  Conv conv;
  conv.in = in;
  conv.out = out;
  conv.res = res;
  conv.act = act;
  conv.bias = (bias.has_value() && bias->defined()) ? floats(*bias, "bias") : std::vector<float>(weight.size(0), 0.f);
  TORCH_CHECK(static_cast<int64_t>(conv.bias.size()) == weight.size(0), "static conv: bias must be [C_out]");
  add_conv(std::move(conv), weight.unsqueeze(0), mode);
  return static_cast<int64_t>(ops_.size()) - 1;
}

// The routing of an op with K kernels of C_out x C_in x taps: fc1 [hidden, C of route], the heads' rows
// stacked in fc2, each head's size checked against its role.
ModelPlan::Routing ModelPlan::make_routing(int64_t route, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                                           const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                                           const std::vector<Head>& heads, int64_t k, int64_t cin, int64_t cout,
                                           int64_t taps) {
  Routing r;
  r.route = route;
  r.fc1 = floats(fc1_weight, "fc1 weight");
  r.fc1_bias = floats(fc1_bias, "fc1 bias");
  r.fc2 = floats(fc2_weight, "fc2 weight");
  r.fc2_bias = floats(fc2_bias, "fc2 bias");
  r.hidden = fc1_weight.size(0);
  r.heads = heads;
  const auto& gr = geometry(route);
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.size(1) == gr.c && fc1_bias.numel() == r.hidden,
              "dynamic conv: fc1 must be [hidden, C_in of the routed buffer]");
  TORCH_CHECK(!heads.empty(), "dynamic conv: no routing head");
  const int64_t expected[4] = {k, taps, cin, cout};
  for (const auto& [role, size, activation, inv_t] : heads) {
    TORCH_CHECK(role >= kKernelHead && role <= kFilterHead && r.at[role] < 0, "dynamic conv: head roles 0..3, once each");
    TORCH_CHECK(size == expected[role], "dynamic conv: head of role ", role, " has ", size, " outputs, expected ",
                expected[role]);
    TORCH_CHECK(activation >= kLinear && activation <= kSoftmax, "activation code must be 0, 1 or 2");
    TORCH_CHECK(inv_t > 0, "1 / temperature must be > 0");
    r.at[role] = r.outputs;
    r.outputs += size;
  }
  TORCH_CHECK(r.at[kKernelHead] >= 0 || k == 1, "dynamic conv: K > 1 kernels need a kernel head");
  TORCH_CHECK(fc2_weight.dim() == 2 && fc2_weight.size(0) == r.outputs && fc2_weight.size(1) == r.hidden &&
                  fc2_bias.numel() == r.outputs, "dynamic conv: fc2 must be [outputs of all heads, hidden]");
  max_hidden_ = std::max(max_hidden_, r.hidden);
  max_att_ = std::max(max_att_, r.outputs + 1);
  max_route_ = std::max(max_route_, gr.c);
  return r;
}

int64_t ModelPlan::dynamic_conv(int64_t in, int64_t route, int64_t out, int64_t res, int64_t act, int64_t mode,
                                const at::Tensor& kernels, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& fc1_weight, const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                                const at::Tensor& fc2_bias, const std::vector<Head>& heads) {
  check_float_cpu(kernels, "kernels");
  TORCH_CHECK(kernels.dim() == 5, "dynamic conv: kernels must be [K, C_out, C_in, kh, kw]");
  const int64_t k = kernels.size(0), cout = kernels.size(1);
  Conv conv;
  conv.in = in;
  conv.out = out;
  conv.res = res;
  conv.act = act;
  conv.routing = make_routing(route, fc1_weight, fc1_bias, fc2_weight, fc2_bias, heads, k, kernels.size(2), cout,
                              kernels.size(3) * kernels.size(4));
  const bool has_bias = bias.has_value() && bias->defined();
  conv.bias_mixed = !has_bias || bias->dim() == 2;
  conv.bias = has_bias ? floats(*bias, "bias") : std::vector<float>(k * cout, 0.f);
  TORCH_CHECK(static_cast<int64_t>(conv.bias.size()) == (conv.bias_mixed ? k * cout : cout),
              "dynamic conv: bias must be [K, C_out] or [C_out]");
  add_conv(std::move(conv), kernels, mode);
  return static_cast<int64_t>(ops_.size()) - 1;
}

int64_t ModelPlan::depthwise_conv(int64_t in, int64_t route, int64_t out, int64_t res, int64_t act, int64_t stride,
                                  const at::Tensor& kernels, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& fc1_weight,
                                  const c10::optional<at::Tensor>& fc1_bias,
                                  const c10::optional<at::Tensor>& fc2_weight,
                                  const c10::optional<at::Tensor>& fc2_bias, const std::vector<Head>& heads) {
  check_float_cpu(kernels, "kernels");
  const auto& gi = geometry(in);
  const auto& go = geometry(out);
  TORCH_CHECK(kernels.dim() == 5 && kernels.size(1) == go.c && kernels.size(2) == 1 && kernels.size(3) == 3 &&
                  kernels.size(4) == 3, "depthwise conv: kernels must be [K, C, 1, 3, 3]");
  TORCH_CHECK(stride == 1 || stride == 2, "depthwise conv: stride 1 or 2");
  TORCH_CHECK(gi.c == go.c && !gi.rows && go.h == (gi.h - 1) / stride + 1 && go.w == (gi.w - 1) / stride + 1,
              "depthwise conv: the output must be the input map at the stride");
  check_residual(res, go, "depthwise conv");
  Depthwise d;
  d.in = in;
  d.out = out;
  d.res = res;
  d.act = act;
  d.stride = stride;
  d.c = go.c;
  d.k = kernels.size(0);
  d.w = floats(kernels, "kernels");
  if (route >= 0) {
    TORCH_CHECK(fc1_weight.has_value() && fc1_bias.has_value() && fc2_weight.has_value() && fc2_bias.has_value(),
                "depthwise conv: a routed conv needs fc1 and fc2");
    d.routing = make_routing(route, *fc1_weight, *fc1_bias, *fc2_weight, *fc2_bias, heads, d.k, go.c, go.c, 9);
  } else {
    TORCH_CHECK(d.k == 1, "depthwise conv: K > 1 kernels need a routing");
  }
  const bool has_bias = bias.has_value() && bias->defined();
  d.bias_mixed = has_bias && bias->dim() == 2;
  d.bias = has_bias ? floats(*bias, "bias") : std::vector<float>(go.c, 0.f);
  TORCH_CHECK(static_cast<int64_t>(d.bias.size()) == (d.bias_mixed ? d.k * go.c : go.c),
              "depthwise conv: bias must be [K, C] or [C]");
  d.pad = pad_mask(go);
  max_ew_ = std::max(max_ew_, 9 * go.c);
  max_cout_ = std::max(max_cout_, go.c);
  depthwise_.push_back(std::move(d));
  return push_op(kDepthwise, depthwise_.size());
}

void ModelPlan::check_residual(int64_t res, const Geometry& go, const char* what) const {
  if (res < 0) return;
  const auto& gr = geometry(res);
  TORCH_CHECK(gr.rows == go.rows && gr.c == go.c && gr.h == go.h && gr.w == go.w, what,
              ": the residual must have the output's shape and layout");
}

// The pad mask of an output geometry over every position a share's last vector can reach: 1 at the map's
// positions, 0 at the pads and past the map.
// Where the lanes of each packed vector go in the padded planes of geometry go: one segment per map row a
// vector touches.
plan::PackedLayout ModelPlan::packed_layout(const Geometry& go) {
  plan::PackedLayout layout;
  layout.positions = go.h * go.w;
  const int64_t np = round_up(layout.positions, L);
  for (int64_t i = 0; i < layout.positions; ++i)
    layout.padded.push_back(static_cast<int32_t>((i / go.w + 1) * go.wp + i % go.w + 1));
  layout.seg_first.push_back(0);
  for (int64_t j = 0; j < np / L; ++j) {
    for (int64_t i = j * L; i < std::min<int64_t>((j + 1) * L, layout.positions);) {
      const int64_t row_end = std::min<int64_t>({(i / go.w + 1) * go.w, (j + 1) * L, layout.positions});
      uint32_t lanes = 0;
      for (int64_t q = i; q < row_end; ++q) lanes |= 1u << (q - j * L);
      layout.seg_shift.push_back(static_cast<int32_t>(layout.padded[i] - (i - j * L)));
      layout.seg_lanes.push_back(lanes);
      i = row_end;
    }
    layout.seg_first.push_back(static_cast<int32_t>(layout.seg_shift.size()));
  }
  if (L == 16 && layout.positions % L == 0)
    layout.chunk = go.w % L == 0 ? L : go.w == 8 || go.w == 4 ? static_cast<int>(go.w) : 0;
  return layout;
}

std::vector<float> ModelPlan::pad_mask(const Geometry& go) const {
  const int64_t first = go.wp + 1, last = go.h * go.wp + go.w + 1;
  std::vector<float> pad(first + (vectors(go) + 1) * L, 0.f);
  for (int64_t y = 1; y <= go.h; ++y) std::fill_n(pad.begin() + y * go.wp + 1, go.w, 1.f);
  TORCH_CHECK(last <= static_cast<int64_t>(pad.size()), "pad mask");
  return pad;
}

void ModelPlan::head(int64_t in, const at::Tensor& weight, const at::Tensor& bias) {
  const auto& g = geometry(in);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == g.c && bias.numel() == weight.size(0),
              "head: weight must be [classes, C] and bias [classes]");
  TORCH_CHECK(outputs_.empty(), "head: the plan returns output maps already");
  head_in_ = in;
  head_w_ = floats(weight, "head weight");
  head_b_ = floats(bias, "head bias");
  classes_ = weight.size(0);
}

void ModelPlan::outputs(const std::vector<int64_t>& buffers) {
  TORCH_CHECK(head_in_ < 0, "outputs: the plan has a head already");
  TORCH_CHECK(!buffers.empty(), "outputs: no buffer");
  for (const int64_t id : buffers) geometry(id);
  outputs_ = buffers;
}

std::vector<int64_t> ModelPlan::kept_entries() const {
  std::vector<int64_t> out;
  for (const auto& c : convs_) {
    int64_t executed = 0;
    for (const auto& b : c.blocks) executed += products(b);
    out.push_back(executed);
    out.push_back(c.dense_entries);
  }
  return out;
}

}  // namespace native
