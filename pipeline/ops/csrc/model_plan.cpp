// Whole-model inference plan: a network of 3x3 / 1x1 convolutions (static, or dynamic kernel mixtures as in
// DyNet / CondConv / DY-Conv and SD-Conv), residual additions, ReLUs, global average pooling and a linear
// head, run as one call with every activation in preallocated buffers and no Python between layers.
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
// Dynamic convs: a(x) = act(fc2(relu(fc1(GAP(x))))) per sample, then each block's weights mixed,
// w = sum_k a_k W_k (and the bias), right before the block is convolved (DyNet, Zhang et al., arXiv
// 2004.10694; CondConv, Yang et al., NeurIPS 2019, Eq. 2; DY-Conv, Chen et al., CVPR 2020, Eqs. 1, 5;
// SD-Conv, He et al., WACV 2023, W(x) = sum_k a_k (W_k * M_k) with the masks baked into W_k).
//
// DynConv's sparse blocks (Verelst & Tuytelaars, CVPR 2020) run position by position instead: their masks
// are scattered (a 16-position vector of the padded plane holds an active position for 0.7-1.0 of the
// vectors at half the positions active), so their maps are kept as rows (position-major, the channels of one
// padded position contiguous, `rows` buffers) and each gated conv runs the direct row GEMM (row_gemm.h)
// over the list of active positions only: conv1 at the dilated mask, conv2 at the mask (its output added to
// the shortcut, relu(shortcut) passed at the other positions), the shortcut and the mask unit everywhere.
//
// Threads. With at least as many samples per call as threads each thread runs whole samples in its own
// workspace. With fewer, the threads share each layer (a large map by positions: a contiguous range of its
// vectors, or of a sparse block's position list, for every output channel, so the rows a thread writes are
// mostly those it reads next, in its own core's caches; a small map by output channels) and meet at a barrier
// between layers; or one thread runs the samples alone. Which of the two is faster depends on the model (a
// pruned model's layers are too short to amortize the barriers), so the first such call times both and the
// plan keeps the faster. Pooling sums each thread's share as it is stored (sparse blocks: each thread sums
// its rows). The Python builder (pipeline/model_plan.py) maps a model onto these ops; the
// model's own forward stays the reference the plan is tested against.

#include "native.h"
#include "row_gemm.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace native {
namespace {

constexpr int L = direct::kWideLanes;
using V = direct::Simd<L>::V;
using U = direct::Simd<L>::U;

constexpr int64_t kLinear = 0;
constexpr int64_t kSigmoid = 1;
constexpr int64_t kSoftmax = 2;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Sum of the lanes of v as a tree (a running scalar sum is a chain of L dependent adds).
inline float lane_sum(V v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512&>(v));
#else
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(reinterpret_cast<__m256&>(v)),
                         _mm256_extractf128_ps(reinterpret_cast<__m256&>(v), 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
#endif
}

// Where a tile's outputs go: COB output planes, optional residual planes, ReLU or not, the pad mask of the
// output geometry (1 at the map's positions, 0 at the pads and past the map: the stores leave the pads zero,
// so no second pass clears them) and per-channel running sums of what was stored (for pooling).
template <int COB>
struct Epilogue {
  float* const* out;
  const float* const* res;
  bool relu;
  const float* pad;
  V sums[COB];
};

// Add the entries [e0, e1) to a tile's accumulators: P loads per entry, one FMA per vector for each output
// channel c of the block with bit c set in M (the channels whose weight for these entries is nonzero).
template <int COB, int P, int M>
[[gnu::always_inline]] inline void accumulate(const float* in, const int32_t* off, const float* w, int64_t e0,
                                              int64_t e1, V (&acc)[COB][P], const int64_t* pos) {
  for (int64_t e = e0; e < e1; ++e) {
    const float* src = in + off[e];
    V x[P];
    for (int j = 0; j < P; ++j) x[j] = *reinterpret_cast<const U*>(src + pos[j]);
    const float* we = w + e * COB;
    for (int c = 0; c < COB; ++c) {
      if ((M >> c) & 1) {
        const float wc = we[c];
        for (int j = 0; j < P; ++j) acc[c][j] += wc * x[j];
      }
    }
  }
}

template <int P, int... M>
[[gnu::always_inline]] inline void accumulate_subsets(const float* in, const int32_t* off, const float* w,
                                                      const int32_t* seg, V (&acc)[4][P], const int64_t* pos,
                                                      std::integer_sequence<int, M...>) {
  (accumulate<4, P, M + 1>(in, off, w, seg[M + 1], seg[M + 2], acc, pos), ...);
}

// Accumulate one tile of P vectors (starting at positions pos[0..P)) for COB output channels and store it:
// [+ residual] [ReLU], zero where the pad mask is. A 4-channel block's entries are sorted by the subset of its
// channels that use them (entries seg[m] .. seg[m + 1] are used by the channels of bitmask m), so each input
// vector is loaded once for the block and multiplied only where a weight is nonzero; a 1-channel block's
// entries are seg[0] .. seg[1].
template <int COB, int P>
inline void conv_tile(const float* in, const int32_t* off, const float* w, const int32_t* seg, const float* bias,
                      Epilogue<COB>& ep, const int64_t* pos) {
  V acc[COB][P];
  for (int c = 0; c < COB; ++c)
    for (int j = 0; j < P; ++j) acc[c][j] = V{} + bias[c];
  if constexpr (COB == 4) {
    accumulate_subsets<P>(in, off, w, seg, acc, pos, std::make_integer_sequence<int, 15>{});
  } else {
    accumulate<COB, P, (1 << COB) - 1>(in, off, w, seg[0], seg[1], acc, pos);
  }
  const V zero = V{};
  for (int c = 0; c < COB; ++c) {
    for (int j = 0; j < P; ++j) {
      V v = acc[c][j];
      if (ep.res != nullptr) v += *reinterpret_cast<const U*>(ep.res[c] + pos[j]);
      if (ep.relu) v = v > zero ? v : zero;
      v = *reinterpret_cast<const U*>(ep.pad + pos[j]) > zero ? v : zero;  // a select: NaN-proof
      *reinterpret_cast<U*>(ep.out[c] + pos[j]) = v;
      ep.sums[c] += v;
    }
  }
}

// A tile of r < PMAX vectors: P = r, chosen at run time.
template <int COB, int P>
inline void conv_tail(int64_t r, const float* in, const int32_t* off, const float* w, const int32_t* seg,
                      const float* bias, Epilogue<COB>& ep, const int64_t* pos) {
  if constexpr (P > 0) {
    if (r == P) {
      conv_tile<COB, P>(in, off, w, seg, bias, ep, pos);
    } else {
      conv_tail<COB, P - 1>(r, in, off, w, seg, bias, ep, pos);
    }
  }
}

// The nvec vectors starting at positions first, first + L, ..., in tiles of PMAX; sums[c] gets the sum of
// what channel c stored.
template <int COB, int PMAX>
void conv_block(const float* in, const int32_t* off, const float* w, const int32_t* seg, const float* bias,
                float* const* out, const float* const* res, bool relu, const float* pad, int64_t first, int64_t nvec,
                float* sums) {
  Epilogue<COB> ep{out, res, relu, pad, {}};
  int64_t pos[PMAX];
  for (int64_t v = 0; v < nvec; v += PMAX) {
    const int64_t n = std::min<int64_t>(PMAX, nvec - v);
    for (int64_t j = 0; j < n; ++j) pos[j] = first + L * (v + j);
    if (n == PMAX) {
      conv_tile<COB, PMAX>(in, off, w, seg, bias, ep, pos);
    } else {
      conv_tail<COB, PMAX - 1>(n, in, off, w, seg, bias, ep, pos);
    }
  }
  for (int c = 0; c < COB; ++c) sums[c] = lane_sum(ep.sums[c]);
}

// dst[i] = sum_j a[j] * bank[j * stride + i] for i < n, one vector of dst at a time.
void mix(const float* a, int64_t k, const float* bank, int64_t stride, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V acc = a[0] * *reinterpret_cast<const U*>(bank + i);
    for (int64_t j = 1; j < k; ++j) acc += a[j] * *reinterpret_cast<const U*>(bank + j * stride + i);
    *reinterpret_cast<U*>(dst + i) = acc;
  }
  for (; i < n; ++i) {
    float acc = a[0] * bank[i];
    for (int64_t j = 1; j < k; ++j) acc += a[j] * bank[j * stride + i];
    dst[i] = acc;
  }
}

float plane_sum(const float* x, int64_t n) {
  V acc = V{};
  int64_t i = 0;
  for (; i + L <= n; i += L) acc += *reinterpret_cast<const U*>(x + i);
  float total = lane_sum(acc);
  for (; i < n; ++i) total += x[i];
  return total;
}

}  // namespace

// Zero-initialised, 64-byte aligned floats.
struct ModelPlan::Workspace {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data;
  int64_t size = 0;
  float* get(int64_t n) {
    if (n > size) {
      const int64_t bytes = round_up(std::max<int64_t>(n, 1) * 4, 64);
      data.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      TORCH_CHECK(data != nullptr, "out of memory for a ", bytes, "-byte plan workspace");
      std::memset(data.get(), 0, bytes);
      size = n;
    }
    return data.get();
  }
};

ModelPlan::ModelPlan(int64_t channels, int64_t height, int64_t width) { buffer(channels, height, width); }

ModelPlan::~ModelPlan() = default;

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
  if (conv.res >= 0) {
    const auto& gr = geometry(conv.res);
    TORCH_CHECK(gr.c == go.c && gr.h == go.h && gr.w == go.w, "conv: the residual must have the output's shape");
  }
  // (input channel, tap) -> offset of the entry relative to the output position.
  std::vector<int32_t> entry_off;
  if (mode == kConv3x3) {
    TORCH_CHECK(kh == 3 && kw == 3 && gi.c == cin && gi.h == go.h && gi.w == go.w, "conv3x3: shape mismatch");
    for (int64_t ci = 0; ci < cin; ++ci)
      for (int64_t ky = 0; ky < 3; ++ky)
        for (int64_t kx = 0; kx < 3; ++kx) entry_off.push_back(ci * gi.plane + (ky - 1) * gi.wp + (kx - 1));
  } else if (mode == kConv1x1) {
    TORCH_CHECK(kh == 1 && kw == 1 && gi.c == cin && gi.h == go.h && gi.w == go.w, "conv1x1: shape mismatch");
    for (int64_t ci = 0; ci < cin; ++ci) entry_off.push_back(ci * gi.plane);
  } else if (mode == kTaps3x3) {
    TORCH_CHECK(kh == 3 && kw == 3 && gi.c == 9 * cin && gi.h == go.h && gi.w == go.w, "taps3x3: shape mismatch");
    for (int64_t ci = 0; ci < cin; ++ci)
      for (int64_t t = 0; t < 9; ++t) entry_off.push_back((t * cin + ci) * gi.plane);
  } else if (mode == kTapsCentre) {
    TORCH_CHECK(kh == 1 && kw == 1 && gi.c == 9 * cin && gi.h == go.h && gi.w == go.w, "taps centre: shape mismatch");
    for (int64_t ci = 0; ci < cin; ++ci) entry_off.push_back((4 * cin + ci) * gi.plane);
  } else {
    TORCH_CHECK(false, "conv: unknown mode ", mode);
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
  const int64_t cob = cout % 4 != 0 ? 1 : 4;
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
  conv.dense_entries = cout * ne;
  for (int64_t j = 0; j < k; ++j) conv.w.insert(conv.w.end(), bank[j].begin(), bank[j].end());
  // The output geometry's pad mask over every position a share's last vector can reach.
  const int64_t first = go.wp + 1, last = go.h * go.wp + go.w + 1;
  conv.pad.assign(first + (vectors(go) + 1) * L, 0.f);
  for (int64_t y = 1; y <= go.h; ++y) std::fill_n(conv.pad.begin() + y * go.wp + 1, go.w, 1.f);
  TORCH_CHECK(last <= static_cast<int64_t>(conv.pad.size()), "pad mask");
  // Work prefix (entries x channels) for balancing blocks across threads.
  conv.work.assign(1, 0);
  for (const auto& b : conv.blocks) conv.work.push_back(conv.work.back() + std::max<int64_t>(1, b.ne + products(b)));
  max_ew_ = std::max(max_ew_, conv.ew);
  max_cout_ = std::max(max_cout_, cout);
  convs_.push_back(std::move(conv));
  push_op(kConv, convs_.size());
}

namespace {
std::vector<float> floats(const at::Tensor& t, const char* name) {
  check_float_cpu(t, name);
  const auto c = t.contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}
}  // namespace

int64_t ModelPlan::fixed_conv(int64_t in, int64_t out, int64_t res, bool relu, int64_t mode, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias) {
  check_float_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 4, "static conv: weight must be [C_out, C_in, kh, kw]");
  Conv conv;
  conv.in = in;
  conv.out = out;
  conv.res = res;
  conv.relu = relu;
  conv.bias = (bias.has_value() && bias->defined()) ? floats(*bias, "bias") : std::vector<float>(weight.size(0), 0.f);
  TORCH_CHECK(static_cast<int64_t>(conv.bias.size()) == weight.size(0), "static conv: bias must be [C_out]");
  add_conv(std::move(conv), weight.unsqueeze(0), mode);
  return static_cast<int64_t>(ops_.size()) - 1;
}

int64_t ModelPlan::dynamic_conv(int64_t in, int64_t route, int64_t out, int64_t res, bool relu, int64_t mode,
                                const at::Tensor& kernels, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& fc1_weight, const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                                const at::Tensor& fc2_bias, int64_t activation, double temperature) {
  check_float_cpu(kernels, "kernels");
  TORCH_CHECK(kernels.dim() == 5, "dynamic conv: kernels must be [K, C_out, C_in, kh, kw]");
  TORCH_CHECK(activation >= kLinear && activation <= kSoftmax, "activation code must be 0, 1 or 2");
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  const int64_t k = kernels.size(0), cout = kernels.size(1);
  Conv conv;
  conv.in = in;
  conv.route = route;
  conv.out = out;
  conv.res = res;
  conv.relu = relu;
  conv.activation = activation;
  conv.inv_temperature = static_cast<float>(1.0 / temperature);
  conv.bias = (bias.has_value() && bias->defined()) ? floats(*bias, "bias") : std::vector<float>(k * cout, 0.f);
  TORCH_CHECK(static_cast<int64_t>(conv.bias.size()) == k * cout, "dynamic conv: bias must be [K, C_out]");
  conv.fc1 = floats(fc1_weight, "fc1 weight");
  conv.fc1_bias = floats(fc1_bias, "fc1 bias");
  conv.fc2 = floats(fc2_weight, "fc2 weight");
  conv.fc2_bias = floats(fc2_bias, "fc2 bias");
  conv.hidden = fc1_weight.size(0);
  const auto& gr = geometry(route);
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.size(1) == gr.c && fc1_bias.numel() == conv.hidden,
              "dynamic conv: fc1 must be [hidden, C_in of the routed buffer]");
  TORCH_CHECK(fc2_weight.dim() == 2 && fc2_weight.size(0) == k && fc2_weight.size(1) == conv.hidden &&
                  fc2_bias.numel() == k, "dynamic conv: fc2 must be [K, hidden]");
  max_hidden_ = std::max(max_hidden_, conv.hidden);
  max_k_ = std::max(max_k_, k);
  max_route_ = std::max(max_route_, gr.c);
  add_conv(std::move(conv), kernels, mode);
  return static_cast<int64_t>(ops_.size()) - 1;
}

void ModelPlan::head(int64_t in, const at::Tensor& weight, const at::Tensor& bias) {
  const auto& g = geometry(in);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == g.c && bias.numel() == weight.size(0),
              "head: weight must be [classes, C] and bias [classes]");
  head_in_ = in;
  head_w_ = floats(weight, "head weight");
  head_b_ = floats(bias, "head bias");
  classes_ = weight.size(0);
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

// Global average pool of a buffer from the per-thread sums of `parts` shares.
void ModelPlan::pool(int64_t id, const float* base, int64_t parts, float* pooled) const {
  const auto& g = geometry_[id];
  const float inv = 1.f / static_cast<float>(g.h * g.w);
  for (int64_t c = 0; c < g.c; ++c) {
    float total = 0.f;
    for (int64_t j = 0; j < parts; ++j) total += base[g.sums + j * g.c + c];
    pooled[c] = total * inv;
  }
}

// Mixing coefficients of conv c for the sample in `base` into a (K floats); scratch holds pooled and hidden.
void ModelPlan::route(const Conv& c, const float* base, float* a, float* scratch, int64_t parts) const {
  const auto& g = geometry_[c.route];
  float* pooled = scratch;
  float* hidden = scratch + max_route_;
  pool(c.route, base, parts, pooled);
  for (int64_t j = 0; j < c.hidden; ++j) {
    float acc = c.fc1_bias[j];
    for (int64_t ci = 0; ci < g.c; ++ci) acc += c.fc1[j * g.c + ci] * pooled[ci];
    hidden[j] = std::max(acc, 0.f);
  }
  for (int64_t j = 0; j < c.k; ++j) {
    float acc = c.fc2_bias[j];
    for (int64_t h = 0; h < c.hidden; ++h) acc += c.fc2[j * c.hidden + h] * hidden[h];
    a[j] = acc;
  }
  if (c.activation == kSigmoid) {
    for (int64_t j = 0; j < c.k; ++j) a[j] = 1.f / (1.f + std::exp(-a[j]));
  } else if (c.activation == kSoftmax) {
    float top = a[0] * c.inv_temperature;
    for (int64_t j = 1; j < c.k; ++j) top = std::max(top, a[j] * c.inv_temperature);
    float total = 0.f;
    for (int64_t j = 0; j < c.k; ++j) total += (a[j] = std::exp(a[j] * c.inv_temperature - top));
    for (int64_t j = 0; j < c.k; ++j) a[j] /= total;
  }
}

void ModelPlan::run_conv(const Conv& c, float* base, float* scratch, int64_t t, int64_t nt) const {
  const auto& gi = geometry_[c.in];
  const auto& go = geometry_[c.out];
  const float* in = base + gi.offset;
  float* out = base + go.offset;
  const float* res = c.res >= 0 ? base + geometry_[c.res].offset : nullptr;
  const bool dynamic = c.route >= 0;
  float* a = scratch;                        // [K]
  float* routing = a + round_up(max_k_, L);  // pooled and hidden
  float* mixed = routing + round_up(max_route_ + max_hidden_, L);
  float* mixed_bias = mixed + round_up(max_ew_, L);
  if (dynamic) route(c, base, a, routing, nt);
  // This thread's share. A large map by positions: a contiguous range of its vectors for every output
  // channel (the rows a thread writes are mostly those it reads next, in its core's caches). A small one by
  // output channels (blocks balanced by entry count): split by positions, its few vectors would leave each
  // thread only short register tiles.
  const int64_t first = go.wp + 1, nvec = vectors(go);
  const bool by_positions = nt > 1 && nvec >= nt * kSplitTiles * (c.blocks.empty() ? 1 : kTile[c.blocks[0].cob]);
  int64_t v0 = 0, v1 = nvec, b0 = 0, b1 = static_cast<int64_t>(c.blocks.size());
  if (by_positions) {
    v0 = nvec * t / nt;
    v1 = nvec * (t + 1) / nt;
  } else if (nt > 1) {
    const int64_t total = c.work.back();
    b0 = std::lower_bound(c.work.begin(), c.work.end(), total * t / nt) - c.work.begin();
    b1 = t + 1 == nt ? b1 : std::lower_bound(c.work.begin(), c.work.end(), total * (t + 1) / nt) - c.work.begin();
    b0 = std::min(b0, b1);
  }
  float* sums = base + go.sums;
  for (int64_t bi = b0; bi < b1; ++bi) {
    const Block& b = c.blocks[bi];
    const float* w;
    const float* bias;
    if (dynamic) {
      mix(a, c.k, c.w.data() + b.w0, c.ew, b.ne * b.cob, mixed);
      for (int64_t co = 0; co < b.cob; ++co) {
        float acc = 0.f;
        for (int64_t j = 0; j < c.k; ++j) acc += a[j] * c.bias[j * c.cout + b.co0 + co];
        mixed_bias[co] = acc;
      }
      w = mixed;
      bias = mixed_bias;
    } else {
      w = c.w.data() + b.w0;
      bias = c.bias.data() + b.co0;
    }
    float* outs[4];
    const float* ress[4];
    for (int64_t co = 0; co < b.cob; ++co) {
      outs[co] = out + (b.co0 + co) * go.plane;
      ress[co] = res != nullptr ? res + (b.co0 + co) * go.plane : nullptr;
    }
    const int32_t* off = c.off.data() + b.e0;
    const float* const* r = res != nullptr ? ress : nullptr;
    float parts[4] = {0.f, 0.f, 0.f, 0.f};
    if (v1 > v0) {
      const float* pad = c.pad.data();
      if (b.cob == 4) {
        conv_block<4, kTile[4]>(in, off, w, b.seg, bias, outs, r, c.relu, pad, first + v0 * L, v1 - v0, parts);
      } else {
        conv_block<1, kTile[1]>(in, off, w, b.seg, bias, outs, r, c.relu, pad, first + v0 * L, v1 - v0, parts);
      }
    }
    for (int64_t co = 0; co < b.cob; ++co) {
      const float part = parts[co];
      if (by_positions) {
        sums[t * go.c + b.co0 + co] = part;
      } else {  // the whole channel is this thread's: its sum in the first share, the others zero
        for (int64_t j = 0; j < nt; ++j) sums[j * go.c + b.co0 + co] = j == 0 ? part : 0.f;
      }
    }
  }
}

int64_t ModelPlan::vectors(const Geometry& g) {
  const int64_t first = g.wp + 1, last = g.h * g.wp + g.w + 1;
  return (last - first + L - 1) / L;
}

void ModelPlan::run_gather(const Gather& op, float* base, int64_t t, int64_t nt) const {
  const auto& gi = geometry_[op.in];
  const auto& go = geometry_[op.out];
  const float* in = base + gi.offset;
  float* out = base + go.offset;
  const int64_t planes = go.c, cin = gi.c;
  for (int64_t q = 0; q < planes; ++q) {  // this thread's output rows of every tap plane
    const int64_t tap = q / cin, ci = q % cin, ky = tap / 3, kx = tap % 3;
    const float* src = in + ci * gi.plane;
    float* dst = out + q * go.plane;
    for (int64_t oy = go.h * t / nt; oy < go.h * (t + 1) / nt; ++oy) {
      const float* row = src + (2 * oy + ky) * gi.wp + kx;
      float* o = dst + (oy + 1) * go.wp + 1;
#if defined(__AVX512F__)
      // 16 outputs from 32 inputs by one two-source permute; the loads may run past the row (into the next
      // rows or the plane's slack, all inside the workspace), the stores are masked to the row.
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      for (int64_t ox = 0; ox < go.w; ox += 16) {
        const __m512 v = _mm512_permutex2var_ps(_mm512_loadu_ps(row + 2 * ox), even, _mm512_loadu_ps(row + 2 * ox + 16));
        const int64_t n = std::min<int64_t>(16, go.w - ox);
        _mm512_mask_storeu_ps(o + ox, static_cast<__mmask16>((1u << n) - 1u), v);
      }
#else
      for (int64_t ox = 0; ox < go.w; ++ox) o[ox] = row[2 * ox];
#endif
    }
  }
}

// ---- DynConv's sparse blocks on rows buffers ----

int64_t ModelPlan::to_rows(int64_t in, int64_t out) {
  const auto& gi = geometry(in);
  const auto& go = geometry(out);
  TORCH_CHECK(!gi.rows && go.rows && gi.c == go.c && gi.h == go.h && gi.w == go.w, "to_rows: shape mismatch");
  gathers_.push_back({in, out});
  return push_op(kToRows, gathers_.size());
}

void ModelPlan::run_to_rows(const Gather& op, float* base, int64_t t, int64_t nt) const {
  const auto& gi = geometry_[op.in];
  const auto& go = geometry_[op.out];
  const float* in = base + gi.offset;
  float* out = base + go.offset;
  for (int64_t y = 1 + go.h * t / nt; y < 1 + go.h * (t + 1) / nt; ++y)
    for (int64_t x = 1; x <= go.w; ++x) {
      const int64_t p = y * go.wp + x;
      for (int64_t c = 0; c < go.c; ++c) out[p * go.c + c] = in[c * gi.plane + p];
    }
}

int64_t ModelPlan::rows_gate(int64_t in, int64_t mask, int64_t dilated, int64_t stride, const at::Tensor& conv_weight,
                             const at::Tensor& conv_bias, const at::Tensor& fc_weight, const at::Tensor& fc_bias) {
  const auto& gi = geometry(in);
  const auto& gm = geometry(mask);
  const auto& gd = geometry(dilated);
  TORCH_CHECK(gi.rows && !gm.rows && !gd.rows && gm.c == 1 && gd.c == 1 && gd.h == gm.h && gd.w == gm.w,
              "rows gate: rows input, one-channel mask planes");
  TORCH_CHECK(stride == 1 || stride == 2, "rows gate: stride 1 or 2");
  TORCH_CHECK(gm.h == (gi.h - 1) / stride + 1 && gm.w == (gi.w - 1) / stride + 1, "rows gate: mask size");
  check_float_cpu(conv_weight, "gate conv weight");
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(0) == 1 && conv_weight.size(1) == gi.c &&
                  conv_weight.size(2) == 3 && conv_weight.size(3) == 3 && conv_bias.numel() == 1,
              "gate: conv weight must be [1, C, 3, 3] with one bias");
  TORCH_CHECK(fc_weight.numel() == gi.c && fc_bias.numel() == 1, "gate: fc must be [1, C] with one bias");
  RowsGate g;
  g.in = in;
  g.mask = mask;
  g.dilated = dilated;
  g.stride = stride;
  g.w = floats(conv_weight.permute({0, 2, 3, 1}), "gate conv weight");  // [(ky, kx), C]
  g.bias = floats(conv_bias, "gate conv bias")[0] + floats(fc_bias, "gate fc bias")[0];
  g.fc = floats(fc_weight, "gate fc weight");
  g.positions = gm.h * gm.w;
  g.lists = total_;
  total_ += round_up(16 + 3 * g.positions, L);
  g.across = total_;
  total_ += round_up((gm.h + 2) * gm.wp + 2 * L, L);
  rows_gates_.push_back(std::move(g));
  push_op(kRowsGate, rows_gates_.size());
  return static_cast<int64_t>(rows_gates_.size()) - 1;
}

// Padded positions of the input rows a window tap reads for output position p (padded) of a stride-s conv.
inline int64_t window_origin(int64_t p, int64_t wpo, int64_t wpi, int64_t stride) {
  if (stride == 1) return p - wpo - 1;  // (y - 1, x - 1): the tap (0, 0)
  const int64_t oy = p / wpo - 1, ox = p % wpo - 1;
  return 2 * oy * wpi + 2 * ox;  // padded (2 oy, 2 ox)
}

// The mask unit's logits at this thread's share of the output rows, thresholded into the mask plane.
void ModelPlan::rows_gate_mask(const RowsGate& g, float* base, int64_t t, int64_t nt) const {
  const auto& gi = geometry_[g.in];
  const auto& gm = geometry_[g.mask];
  const float* in = base + gi.offset;
  const int64_t c = gi.c;
  const float inv = 1.f / static_cast<float>(gi.h * gi.w);
  float bias = g.bias;
  for (int64_t ci = 0; ci < c; ++ci) {
    float total = 0.f;
    for (int64_t j = 0; j < nt; ++j) total += base[gi.sums + j * c + ci];
    bias += g.fc[ci] * (total * inv);
  }
  float* m = base + gm.offset;
  // Four positions at a time: each weight vector is loaded once for all four.
  constexpr int Q = 4;
  for (int64_t y = 1 + gm.h * t / nt; y < 1 + gm.h * (t + 1) / nt; ++y)
    for (int64_t x0 = 1; x0 <= gm.w; x0 += Q) {
      const int64_t q = std::min<int64_t>(Q, gm.w + 1 - x0);
      const float* origin[Q];
      for (int64_t j = 0; j < Q; ++j)
        origin[j] = in + window_origin(y * gm.wp + x0 + std::min(j, q - 1), gm.wp, gi.wp, g.stride) * c;
      V acc[Q] = {};  // one vector over the channels for all nine taps, reduced once
      float tail[Q] = {};
      for (int64_t ky = 0; ky < 3; ++ky)
        for (int64_t kx = 0; kx < 3; ++kx) {
          const int64_t shift = (ky * gi.wp + kx) * c;
          const float* w = g.w.data() + (ky * 3 + kx) * c;
          int64_t ci = 0;
          for (; ci + L <= c; ci += L) {
            const V wv = *reinterpret_cast<const U*>(w + ci);
            for (int64_t j = 0; j < Q; ++j) acc[j] += *reinterpret_cast<const U*>(origin[j] + shift + ci) * wv;
          }
          for (; ci < c; ++ci)
            for (int64_t j = 0; j < Q; ++j) tail[j] += origin[j][shift + ci] * w[ci];
        }
      for (int64_t j = 0; j < q; ++j) m[y * gm.wp + x0 + j] = bias + tail[j] + lane_sum(acc[j]) >= 0.f ? 1.f : 0.f;
    }
}

// The dilated mask and the position lists (one thread, after every share of the mask is written). The 3x3
// dilation is separable (a max along rows, then along columns); the lists are compacted 16 positions at a time.
void ModelPlan::rows_gate_lists(const RowsGate& g, float* base) const {
  const auto& gm = geometry_[g.mask];
  const float* m = base + gm.offset;
  float* d = base + geometry_[g.dilated].offset;
  float* across = base + g.across;  // the row-wise max, rows 0 .. h + 1
  int32_t* lists = reinterpret_cast<int32_t*>(base + g.lists);
  int32_t* on_d = lists + 16;
  int32_t* on_m = on_d + g.positions;
  int32_t* off_m = on_m + g.positions;
  int32_t nd = 0, nm = 0, ni = 0;
  const int64_t wp = gm.wp;
#if defined(__AVX512F__)
  // The row-wise max at rows 0 .. h + 1 (pads included: m is zero at its pads, so they add nothing).
  for (int64_t p = 1; p < (gm.h + 1) * wp + wp - 1; p += L) {
    const __m512 v = _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(m + p - 1), _mm512_loadu_ps(m + p)),
                                   _mm512_loadu_ps(m + p + 1));
    _mm512_storeu_ps(across + p, v);
  }
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t y = 1; y <= gm.h; ++y)
    for (int64_t x = 1; x <= gm.w; x += L) {
      const int64_t p = y * wp + x;
      const __mmask16 row = static_cast<__mmask16>(gm.w + 1 - x >= L ? 0xFFFF : (1u << (gm.w + 1 - x)) - 1);
      const __m512 v = _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(across + p - wp), _mm512_loadu_ps(across + p)),
                                     _mm512_loadu_ps(across + p + wp));
      _mm512_mask_storeu_ps(d + p, row, v);
      const __m512i index = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(p)));
      const __mmask16 dilated = _mm512_mask_cmp_ps_mask(row, v, zero, _CMP_GT_OQ);
      const __mmask16 active = _mm512_mask_cmp_ps_mask(row, _mm512_loadu_ps(m + p), zero, _CMP_GT_OQ);
      const __mmask16 idle = static_cast<__mmask16>(row & ~active);
      _mm512_mask_compressstoreu_epi32(on_d + nd, dilated, index);
      _mm512_mask_compressstoreu_epi32(on_m + nm, active, index);
      _mm512_mask_compressstoreu_epi32(off_m + ni, idle, index);
      nd += _mm_popcnt_u32(dilated);
      nm += _mm_popcnt_u32(active);
      ni += _mm_popcnt_u32(idle);
    }
#else
  for (int64_t y = 1; y <= gm.h; ++y)
    for (int64_t x = 1; x <= gm.w; ++x) {
      const int64_t p = y * wp + x;
      float v = 0.f;
      for (int64_t dy = -1; dy <= 1; ++dy)
        for (int64_t dx = -1; dx <= 1; ++dx) v = std::max(v, m[p + dy * wp + dx]);  // pads are zero
      d[p] = v;
      if (v > 0.f) on_d[nd++] = static_cast<int32_t>(p);
      if (m[p] > 0.f) {
        on_m[nm++] = static_cast<int32_t>(p);
      } else {
        off_m[ni++] = static_cast<int32_t>(p);
      }
    }
#endif
  lists[0] = nd;
  lists[1] = nm;
  lists[2] = ni;
}

int64_t ModelPlan::rows_conv(int64_t in, int64_t out, int64_t res, bool relu, int64_t stride, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, int64_t gate, int64_t which) {
  const auto& gi = geometry(in);
  const auto& go = geometry(out);
  check_float_cpu(weight, "weight");
  TORCH_CHECK(gi.rows && go.rows, "rows conv: rows buffers");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == go.c && weight.size(1) == gi.c &&
                  ((weight.size(2) == 3 && weight.size(3) == 3) || (weight.size(2) == 1 && weight.size(3) == 1)),
              "rows conv: weight must be [C_out, C_in, 3, 3] or [C_out, C_in, 1, 1]");
  TORCH_CHECK((stride == 1 || stride == 2) && go.h == (gi.h - 1) / stride + 1 && go.w == (gi.w - 1) / stride + 1,
              "rows conv: output size");
  if (res >= 0) {
    const auto& gr = geometry(res);
    TORCH_CHECK(gr.rows && gr.c == go.c && gr.h == go.h && gr.w == go.w, "rows conv: residual shape");
  }
  RowsConv c;
  c.in = in;
  c.out = out;
  c.res = res;
  c.relu = relu;
  c.stride = stride;
  c.taps = weight.size(2) * weight.size(3);
  c.matrix = floats(weight.permute({2, 3, 1, 0}), "weight");  // [(ky, kx, c_in), c_out]
  c.bias = (bias.has_value() && bias->defined()) ? floats(*bias, "bias") : std::vector<float>(go.c, 0.f);
  TORCH_CHECK(static_cast<int64_t>(c.bias.size()) == go.c, "rows conv: bias must be [C_out]");
  if (gate >= 0) {
    TORCH_CHECK(gate < static_cast<int64_t>(rows_gates_.size()) && (which == 0 || which == 1), "rows conv: gate");
    const auto& gm = geometry_[rows_gates_[gate].mask];
    TORCH_CHECK(gm.h == go.h && gm.w == go.w, "rows conv: the mask and the output differ in size");
  }
  c.gate = gate;
  c.which = which;
  for (int64_t y = 1; y <= go.h; ++y)
    for (int64_t x = 1; x <= go.w; ++x) c.all.push_back(static_cast<int32_t>(y * go.wp + x));
  // An ungated conv right after the mask unit of its own input (a block's shortcut) reads nothing the unit
  // writes: it starts while one thread still builds the position lists.
  const bool overlaps = gate < 0 && !ops_.empty() && ops_.back().kind == kRowsGate &&
                        rows_gates_[ops_.back().index].in == in;
  rows_convs_.push_back(std::move(c));
  const int64_t op = push_op(kRowsConv, rows_convs_.size());
  ops_.back().wait = !overlaps;
  return op;
}

void ModelPlan::run_rows_conv(const RowsConv& c, float* base, int64_t t, int64_t nt) const {
  const auto& gi = geometry_[c.in];
  const auto& go = geometry_[c.out];
  const float* in = base + gi.offset;
  float* out = base + go.offset;
  const float* res = c.res >= 0 ? base + geometry_[c.res].offset : nullptr;
  const int64_t cin = gi.c, cout = go.c;
  const int32_t* list = c.all.data();
  int64_t n = static_cast<int64_t>(c.all.size());
  const int32_t* idle = nullptr;
  int64_t n_idle = 0;
  if (c.gate >= 0) {
    const RowsGate& g = rows_gates_[c.gate];
    const int32_t* lists = reinterpret_cast<const int32_t*>(base + g.lists);
    if (c.which == 0) {
      n = lists[0];
      list = lists + 16;
    } else {
      n = lists[1];
      list = lists + 16 + g.positions;
      n_idle = lists[2];
      idle = lists + 16 + 2 * g.positions;
    }
  }
  // This thread's share of the positions.
  const int64_t r0 = n * t / nt, r1 = n * (t + 1) / nt;
  const int32_t* mine = list + r0;
  const int64_t wpo = go.wp, wpi = gi.wp, stride = c.stride, taps = c.taps;
  auto rows_of = [&](int64_t r, const float** ptrs) {
    const int64_t p = mine[r];
    if (taps == 1) {
      ptrs[0] = in + (window_origin(p, wpo, wpi, stride) + wpi + 1) * cin;  // the centre tap
      return;
    }
    const float* origin = in + window_origin(p, wpo, wpi, stride) * cin;
    for (int64_t ky = 0; ky < 3; ++ky)
      for (int64_t kx = 0; kx < 3; ++kx) ptrs[ky * 3 + kx] = origin + (ky * wpi + kx) * cin;
  };
  const bool relu = c.relu;
  auto store = [&](int64_t r, int64_t col0, const float* acc, int64_t width) {
    const int64_t p = mine[r];
    float* dst = out + p * cout + col0;
    const float* add = res != nullptr ? res + p * cout + col0 : nullptr;
    for (int64_t j = 0; j < width; ++j) {
      float v = acc[j] + (add != nullptr ? add[j] : 0.f);
      dst[j] = relu ? std::max(v, 0.f) : v;
    }
  };
  if (r1 > r0)
    direct::row_gemm_columns(r1 - r0, taps, cin, c.matrix.data(), cout, c.bias.data(), 0, cout, rows_of, store);
  // conv2's inactive positions: the shortcut passes (through the ReLU).
  for (int64_t i = n_idle * t / nt; i < n_idle * (t + 1) / nt; ++i) {
    const int64_t p = idle[i];
    float* dst = out + p * cout;
    const float* add = res + p * cout;
    for (int64_t j = 0; j < cout; ++j) dst[j] = relu ? std::max(add[j], 0.f) : add[j];
  }
}

// Per-channel sums of rows y0 .. y1 - 1 of a rows buffer, into share `part` of its sums slot.
void ModelPlan::rows_sums(int64_t id, float* base, int64_t y0, int64_t y1, int64_t part) const {
  const auto& g = geometry_[id];
  const float* src = base + g.offset;
  float* sums = base + g.sums + part * g.c;
  int64_t c0 = 0;
  for (; c0 + L <= g.c; c0 += L) {  // a vector of channels, four positions in independent chains
    V acc[4] = {};
    for (int64_t y = y0; y < y1; ++y) {
      const float* row = src + ((y + 1) * g.wp + 1) * g.c + c0;
      int64_t x = 0;
      for (; x + 4 <= g.w; x += 4)
        for (int j = 0; j < 4; ++j) acc[j] += *reinterpret_cast<const U*>(row + (x + j) * g.c);
      for (; x < g.w; ++x) acc[0] += *reinterpret_cast<const U*>(row + x * g.c);
    }
    *reinterpret_cast<U*>(sums + c0) = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
  for (; c0 < g.c; ++c0) {
    float total = 0.f;
    for (int64_t y = y0; y < y1; ++y) {
      const float* row = src + ((y + 1) * g.wp + 1) * g.c + c0;
      for (int64_t x = 0; x < g.w; ++x) total += row[x * g.c];
    }
    sums[c0] = total;
  }
}

void ModelPlan::run_sample(const float* x, float* logits, float* base, float* scratch, int64_t t, int64_t nt) const {
  const auto& g0 = geometry_[0];
  for (int64_t c = 0; c < g0.c; ++c) {  // this thread's rows of every channel, and their sum
    float* plane = base + g0.offset + c * g0.plane;
    const int64_t y0 = g0.h * t / nt, y1 = g0.h * (t + 1) / nt;
    for (int64_t y = y0; y < y1; ++y) std::memcpy(plane + (y + 1) * g0.wp + 1, x + (c * g0.h + y) * g0.w, g0.w * 4);
    base[g0.sums + t * g0.c + c] = plane_sum(plane + (y0 + 1) * g0.wp, (y1 - y0) * g0.wp);
  }
  for (const auto& op : ops_) {
    if (nt > 1 && op.wait) {
#pragma omp barrier
    }
    if (op.kind == kConv) {
      run_conv(convs_[op.index], base, scratch, t, nt);
    } else if (op.kind == kGather) {
      run_gather(gathers_[op.index], base, t, nt);
    } else if (op.kind == kToRows) {
      run_to_rows(gathers_[op.index], base, t, nt);
    } else if (op.kind == kRowsConv) {
      run_rows_conv(rows_convs_[op.index], base, t, nt);
    } else {  // the mask unit on rows: pooled input and logits (shared by rows), lists (one thread)
      const RowsGate& g = rows_gates_[op.index];
      const int64_t h = geometry_[g.in].h;
      rows_sums(g.in, base, h * t / nt, h * (t + 1) / nt, t);
      if (nt > 1) {
#pragma omp barrier
      }
      rows_gate_mask(g, base, t, nt);
      if (nt > 1) {
#pragma omp barrier
      }
      if (t == 0) rows_gate_lists(g, base);
    }
  }
  if (nt > 1) {
#pragma omp barrier
  }
  if (t == 0) {
    const auto& g = geometry_[head_in_];
    if (g.rows) rows_sums(head_in_, base, 0, g.h, 0);
    float* pooled = scratch;
    pool(head_in_, base, g.rows ? 1 : nt, pooled);
    for (int64_t j = 0; j < classes_; ++j) {
      float acc = head_b_[j];
      for (int64_t c = 0; c < g.c; ++c) acc += head_w_[j * g.c + c] * pooled[c];
      logits[j] = acc;
    }
  }
  if (nt > 1) {
#pragma omp barrier  // the workspace is reused by the next sample
  }
}

at::Tensor ModelPlan::forward(const at::Tensor& input) {
  check_float_cpu(input, "input");
  TORCH_CHECK(head_in_ >= 0, "plan has no head");
  const auto& g0 = geometry_[0];
  TORCH_CHECK(input.dim() == 4 && input.size(1) == g0.c && input.size(2) == g0.h && input.size(3) == g0.w,
              "plan input must be [B, ", g0.c, ", ", g0.h, ", ", g0.w, "], got ", input.sizes());
  const auto x = input.contiguous();
  const int64_t b = x.size(0);
  auto out = at::empty({b, classes_}, x.options());
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t per_image = g0.c * g0.h * g0.w;
  const int64_t scratch_size =
      round_up(max_k_, L) + round_up(max_route_ + max_hidden_, L) + round_up(max_ew_, L) + round_up(max_cout_, L) +
      round_up(geometry_[head_in_].c, L) + L;
  const int nt = std::max(1, at::get_num_threads());
  std::lock_guard<std::mutex> guard(mutex_);  // the workspaces are the plan's
  while (static_cast<int64_t>(work_.size()) < nt) work_.push_back(std::make_unique<Workspace>());
  while (static_cast<int64_t>(scratch_.size()) < nt) scratch_.push_back(std::make_unique<Workspace>());
  for (int i = 0; i < nt; ++i) {
    work_[i]->get(total_ + L);
    scratch_[i]->get(scratch_size);
  }
  auto run = [&](int team) {  // the batch, `team` threads sharing each image
    if (team > 1) {
#pragma omp parallel num_threads(team)
      {
        const int64_t tid = omp_get_thread_num(), size = omp_get_num_threads();
        for (int64_t n = 0; n < b; ++n)
          run_sample(px + n * per_image, po + n * classes_, work_[0]->data.get(), scratch_[tid]->data.get(), tid,
                     size);
      }
    } else {
      for (int64_t n = 0; n < b; ++n)
        run_sample(px + n * per_image, po + n * classes_, work_[0]->data.get(), scratch_[0]->data.get(), 0, 1);
    }
  };
  if (b >= nt && nt > 1) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t n = 0; n < b; ++n) {
      const int tid = omp_get_thread_num();
      run_sample(px + n * per_image, po + n * classes_, work_[tid]->data.get(), scratch_[tid]->data.get(), 0, 1);
    }
  } else if (nt > 1) {
    // A small image's layers are too short to share well (barriers, maps moving between cores), so the
    // first call per (threads, batch) times both ways in turns and keeps the faster one.
    const int shared = std::min<int>(nt, kMaxTeam);
    int64_t& team = teams_[{nt, b}];
    if (team_policy_ != 0) {
      team = team_policy_ == 1 ? 1 : shared;
    } else if (team == 0) {
      constexpr int kRounds = 9;
      double seconds[2][kRounds];
      for (int r = 0; r < kRounds; ++r)
        for (int way = 0; way < 2; ++way) {
          const auto start = std::chrono::steady_clock::now();
          run(way == 0 ? shared : 1);
          seconds[way][r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        }
      for (auto& s : seconds) std::nth_element(s, s + kRounds / 2, s + kRounds);
      team = seconds[0][kRounds / 2] <= seconds[1][kRounds / 2] ? shared : 1;
    }
    run(static_cast<int>(team));
  } else {
    run(1);
  }
  return out;
}

void ModelPlan::set_team_policy(int64_t policy) {
  TORCH_CHECK(policy >= 0 && policy <= 2, "team policy must be 0 (measure), 1 (one thread) or 2 (shared)");
  std::lock_guard<std::mutex> guard(mutex_);
  team_policy_ = policy;
  teams_.clear();
}

int64_t ModelPlan::team(int64_t threads, int64_t batch) const {
  std::lock_guard<std::mutex> guard(mutex_);
  const auto it = teams_.find({threads, batch});
  return it == teams_.end() ? 0 : it->second;
}

bool ModelPlan::watch(const std::vector<at::Tensor>& sources) {
  watched_.clear();
  versions_.clear();
  storage_.clear();
  for (const auto& t : sources) {
    if (t.is_inference()) return false;
    watched_.push_back(t);
    versions_.push_back(t._version());
    storage_.push_back(t.data_ptr());
  }
  return true;
}

bool ModelPlan::current() const {
  for (size_t i = 0; i < watched_.size(); ++i)
    if (watched_[i]._version() != versions_[i] || watched_[i].data_ptr() != storage_[i]) return false;
  return true;
}

}  // namespace native
