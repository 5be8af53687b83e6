// Running the whole-model plan (model_plan.h): the per-sample executor, its thread team, the plane ops.
#include "model_plan.h"
#include "plan_kernels.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

namespace native {

using namespace plan;

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

// The attentions of routing r for the sample in `base` into att (its heads' outputs in order); scratch holds
// the pooled input and the hidden layer.
void ModelPlan::route(const Routing& r, const float* base, float* att, float* scratch, int64_t parts) const {
  const auto& g = geometry_[r.route];
  float* pooled = scratch;
  float* hidden = scratch + max_route_;
  pool(r.route, base, parts, pooled);
  linear_lanes(r.fc1.data(), r.fc1_bias.data(), r.hidden, g.c, pooled, hidden, true);
  linear_lanes(r.fc2.data(), r.fc2_bias.data(), r.outputs, r.hidden, hidden, att, false);
  for (const auto& [role, size, activation, inv_t] : r.heads)
    activate(att + r.at[role], size, activation, static_cast<float>(inv_t));
}

ModelPlan::Attention ModelPlan::attend(const Routing& r, const float* base, float* att, float* scratch,
                                       int64_t parts) const {
  route(r, base, att, scratch, parts);
  att[r.outputs] = 1.f;
  auto head = [&](int64_t role) { return r.at[role] >= 0 ? att + r.at[role] : nullptr; };
  return {r.at[kKernelHead] >= 0 ? att + r.at[kKernelHead] : att + r.outputs, head(kSpatialHead),
          head(kChannelHead), head(kFilterHead)};
}

namespace {

// One output-channel block of a conv over n vectors from position p0, with the epilogue EP<cob> built from
// (out, res, act, where), where is the pad mask (Epilogue) or the packed layout (PackedEpilogue).
template <template <int> class EP, class Where>
void run_block(int64_t cob, const float* in, const int32_t* off, const float* w, const int32_t* seg, const float* bias,
               float* const* out, const float* const* res, int64_t act, Where where, int64_t p0, int64_t n,
               float* sums) {
  auto go = [&](auto tag) {
    constexpr int kCob = decltype(tag)::value;
    EP<kCob> ep{out, res, act, where, {}};
    conv_block<kCob, tile_height(kCob)>(in, off, w, seg, bias, ep, p0, n, sums);
  };
  switch (cob) {
    case 16: go(std::integral_constant<int, 16>{}); break;
    case 8: go(std::integral_constant<int, 8>{}); break;
    case 4: go(std::integral_constant<int, 4>{}); break;
    default: go(std::integral_constant<int, 1>{}); break;
  }
}

}  // namespace

void ModelPlan::run_conv(const Conv& c, float* base, float* scratch, int64_t t, int64_t nt) const {
  const auto& gi = geometry_[c.in];
  const auto& go = geometry_[c.out];
  const float* in = base + gi.offset;
  float* out = base + go.offset;
  const float* res = c.res >= 0 ? base + geometry_[c.res].offset : nullptr;
  const bool dynamic = c.routing.route >= 0;
  float* att = scratch;                                // the heads' outputs, then a 1 for a missing kernel head
  float* routing = att + round_up(max_att_, L);        // pooled and hidden
  float* mixed = routing + round_up(max_route_ + max_hidden_, L);
  float* mixed_bias = mixed + round_up(max_ew_, L);
  float* packed = mixed_bias + round_up(max_cout_, L);  // a packed conv's input, [C_in][np]
  const auto [a, spatial, channel, filter] =
      dynamic ? attend(c.routing, base, att, routing, nt) : Attention{att, nullptr, nullptr, nullptr};
  // This thread's share. A large map by positions: a contiguous range of its vectors for every output
  // channel (the rows a thread writes are mostly those it reads next, in its core's caches). A small one (and
  // a packed conv) by output channels (blocks balanced by entry count): split by positions, its few vectors
  // would leave each thread only short register tiles.
  const int64_t first = c.packed ? 0 : go.wp + 1, nvec = c.packed ? c.np / L : vectors(go);
  const bool by_positions = nt > 1 && !c.packed &&
                            nvec >= nt * kSplitTiles * (c.blocks.empty() ? 1 : tile_height(static_cast<int>(c.blocks[0].cob)));
  if (c.packed) {  // C_in x h x w floats: little beside the conv's MACs
    const int64_t c0 = gi.c * t / nt, c1 = gi.c * (t + 1) / nt;
    if (nt > 1) packed = base + total_ + L + c.slot * round_up(max_packed_, L);
    for (int64_t ci = c0; ci < c1; ++ci) {
      float* dst = packed + ci * c.np;
      for (int64_t y = 0; y < gi.h; ++y) plan::copy_floats(dst + y * gi.w, in + ci * gi.plane + (y + 1) * gi.wp + 1, gi.w);
      std::fill(dst + gi.h * gi.w, dst + c.np, 0.f);
    }
    if (nt > 1) {
#pragma omp barrier
    }
    in = packed;
  }
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
  // Block b's weights and bias for this sample: as built, or (a dynamic conv) mixed and scaled into `mixed`
  // (at the block's own offset if `own`, else at its start: the block runs before the next is mixed).
  auto weights = [&](const Block& b, bool own) -> std::pair<const float*, const float*> {
    if (!dynamic) return {c.w.data() + b.w0, c.bias.data() + b.co0};
    float* wb = mixed + (own ? b.w0 : 0);
    float* bb = mixed_bias + (own ? b.co0 : 0);
    mix(a, c.k, c.w.data() + b.w0, c.ew, b.ne * b.cob, wb);
    if (spatial != nullptr || channel != nullptr || filter != nullptr) {  // ODConv: a_s a_c per entry, a_f per channel
      const int32_t* entry = c.entry.data() + b.e0;
      float fs[16];
      for (int64_t co = 0; co < b.cob; ++co) fs[co] = filter != nullptr ? filter[b.co0 + co] : 1.f;
      for (int64_t i = 0; i < b.ne; ++i) {
        const int64_t e = entry[i];
        const float s = (spatial != nullptr ? spatial[e % c.taps] : 1.f) * (channel != nullptr ? channel[e / c.taps] : 1.f);
        for (int64_t co = 0; co < b.cob; ++co) wb[i * b.cob + co] *= s * fs[co];
      }
    }
    for (int64_t co = 0; co < b.cob; ++co) {
      float acc = 0.f;
      if (c.bias_mixed) {
        for (int64_t j = 0; j < c.k; ++j) acc += a[j] * c.bias[j * c.cout + b.co0 + co];
      } else {
        acc = c.bias[b.co0 + co];
      }
      bb[co] = acc;
    }
    return {wb, bb};
  };
  // Block b over vectors [va, vb) of the map, reading `src` at entry offsets; parts[co] gets the sums of what it
  // stored.
  auto run = [&](const Block& b, const float* src, const float* w, const float* bias, int64_t va, int64_t vb,
                 float* parts) {
    float* outs[16];
    const float* ress[16];
    for (int64_t co = 0; co < b.cob; ++co) {
      outs[co] = out + (b.co0 + co) * go.plane;
      ress[co] = res != nullptr ? res + (b.co0 + co) * go.plane : nullptr;
    }
    const int32_t* off = c.off.data() + b.e0;
    const float* const* r = res != nullptr ? ress : nullptr;
    if (vb > va) {
      const int64_t p0 = first + va * L, n = vb - va;
      if (c.packed) {
        run_block<PackedEpilogue>(b.cob, src, off, w, b.seg, bias, outs, r, c.act, &c.layout, p0, n, parts);
      } else {
        run_block<Epilogue>(b.cob, src, off, w, b.seg, bias, outs, r, c.act, c.pad.data(), p0, n, parts);
      }
    }
  };
  auto store_sums = [&](const Block& b, const float* parts) {
    for (int64_t co = 0; co < b.cob; ++co) {
      const float part = parts[co];
      if (by_positions) {
        sums[t * go.c + b.co0 + co] = part;
      } else {  // the whole channel is this thread's: its sum in the first share, the others zero
        for (int64_t j = 0; j < nt; ++j) sums[j * go.c + b.co0 + co] = j == 0 ? part : 0.f;
      }
    }
  };
  if (c.chunk == 0) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Block& b = c.blocks[bi];
      const auto [w, bias] = weights(b, false);
      float parts[16] = {};
      run(b, in, w, bias, v0, v1, parts);
      store_sums(b, parts);
    }
    return;
  }
  // Chunked (Conv::chunk): pack the chunk's vectors of every input plane, then run every block over them. `src`
  // is placed so that src + off[e] + p reads position p of the chunk.
  std::vector<std::pair<const float*, const float*>> wb;
  for (int64_t bi = b0; bi < b1; ++bi) wb.push_back(weights(c.blocks[bi], true));
  std::vector<float> totals(16 * (b1 - b0), 0.f);
  const int64_t width = c.chunk * L;
  for (int64_t va = v0; va < v1; va += c.chunk) {
    const int64_t vb = std::min(v1, va + c.chunk), p0 = first + va * L;
    for (int64_t q = 0; q < c.planes; ++q)
      plan::copy_floats(packed + q * width, in + (c.plane0 + q) * gi.plane + p0, (vb - va) * L);
    const float* src = packed - p0;
    for (int64_t bi = b0; bi < b1; ++bi) {
      float parts[16] = {};
      run(c.blocks[bi], src, wb[bi - b0].first, wb[bi - b0].second, va, vb, parts);
      for (int j = 0; j < 16; ++j) totals[16 * (bi - b0) + j] += parts[j];
    }
  }
  for (int64_t bi = b0; bi < b1; ++bi) store_sums(c.blocks[bi], totals.data() + 16 * (bi - b0));
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

// This thread's output rows of every (tap, channel) plane; taps outside the input are zero.
void ModelPlan::run_window(const Window& op, float* base, int64_t t, int64_t nt) const {
  const auto& gi = geometry_[op.in];
  const auto& go = geometry_[op.out];
  const float* in = base + gi.offset;
  float* out = base + go.offset;
  const int64_t cin = gi.c, k = op.k, s = op.stride, pad = op.pad;
  for (int64_t q = 0; q < go.c; ++q) {
    const int64_t tap = q / cin, ci = q % cin, ky = tap / k, kx = tap % k;
    // Output columns ox0 .. ox1 - 1 read inside the input row: 0 <= ox * s + kx - pad < w.
    const int64_t ox0 = std::min<int64_t>(go.w, std::max<int64_t>(0, (pad - kx + s - 1) / s));
    const int64_t ox1 = std::max<int64_t>(ox0, std::min<int64_t>(go.w, (gi.w - 1 + pad - kx) / s + 1));
    for (int64_t oy = go.h * t / nt; oy < go.h * (t + 1) / nt; ++oy) {
      float* o = out + q * go.plane + (oy + 1) * go.wp + 1;
      const int64_t iy = oy * s + ky - pad;
      if (iy < 0 || iy >= gi.h) {
        std::fill_n(o, go.w, 0.f);
        continue;
      }
      const float* row = in + ci * gi.plane + (iy + 1) * gi.wp + 1 + kx - pad;
      std::fill_n(o, ox0, 0.f);
      for (int64_t ox = ox0; ox < ox1; ++ox) o[ox] = row[ox * s];
      std::fill_n(o + ox1, go.w - ox1, 0.f);
    }
  }
}

// This thread's output rows of every channel, with their per-channel sums (pooling and routing read them).
void ModelPlan::run_max_pool(const Window& op, float* base, int64_t t, int64_t nt) const {
  const auto& gi = geometry_[op.in];
  const auto& go = geometry_[op.out];
  const int64_t k = op.k, s = op.stride, pad = op.pad;
  const int64_t y0 = go.h * t / nt, y1 = go.h * (t + 1) / nt;
  std::vector<float> row_max(gi.w);
  for (int64_t c = 0; c < go.c; ++c) {
    const float* src = base + gi.offset + c * gi.plane;
    float* dst = base + go.offset + c * go.plane;
    float part = 0.f;
    for (int64_t oy = y0; oy < y1; ++oy) {
      // The column-wise maximum over the window's input rows, then the maximum over each window's columns.
      const int64_t iy0 = std::max<int64_t>(0, oy * s - pad), iy1 = std::min<int64_t>(gi.h, oy * s - pad + k);
      const float* r = src + (iy0 + 1) * gi.wp + 1;
      std::copy_n(r, gi.w, row_max.data());
      for (int64_t iy = iy0 + 1; iy < iy1; ++iy) {
        r = src + (iy + 1) * gi.wp + 1;
        for (int64_t x = 0; x < gi.w; ++x) row_max[x] = std::max(row_max[x], r[x]);
      }
      float* o = dst + (oy + 1) * go.wp + 1;
      for (int64_t ox = 0; ox < go.w; ++ox) {
        const int64_t ix0 = std::max<int64_t>(0, ox * s - pad), ix1 = std::min<int64_t>(gi.w, ox * s - pad + k);
        float m = row_max[ix0];
        for (int64_t ix = ix0 + 1; ix < ix1; ++ix) m = std::max(m, row_max[ix]);
        o[ox] = m;
        part += m;
      }
    }
    base[go.sums + t * go.c + c] = part;
  }
}

// Depthwise 3x3: each thread a share of the channels (whole planes), its weights mixed and scaled per sample
// where the op is routed (DyNet: sum_k a_k W_k; ODConv: times a_s per tap and a_c per channel).
void ModelPlan::run_depthwise(const Depthwise& d, float* base, float* scratch, int64_t t, int64_t nt) const {
  const auto& gi = geometry_[d.in];
  const auto& go = geometry_[d.out];
  const float* in = base + gi.offset;
  float* out = base + go.offset;
  const float* res = d.res >= 0 ? base + geometry_[d.res].offset : nullptr;
  float* att = scratch;
  float* routing = att + round_up(max_att_, L);
  const auto [a, spatial, channel, filter] = d.routing.route >= 0 ? attend(d.routing, base, att, routing, nt)
                                                                  : Attention{nullptr, nullptr, nullptr, nullptr};
  const int64_t first = go.wp + 1, nvec = vectors(go);
  const int64_t c0 = d.c * t / nt, c1 = d.c * (t + 1) / nt;
  float* sums = base + go.sums;
  const int64_t offsets[9] = {-go.wp - 1, -go.wp, -go.wp + 1, -1, 0, 1, go.wp - 1, go.wp, go.wp + 1};
  // A routed op mixes this thread's channels' kernels (and biases) at once, in vectors.
  float* mixed = routing + round_up(max_route_ + max_hidden_, L);
  float* mixed_bias = mixed + round_up(max_ew_, L);
  if (a != nullptr) {
    mix(a, d.k, d.w.data() + c0 * 9, d.c * 9, (c1 - c0) * 9, mixed);
    if (d.bias_mixed) mix(a, d.k, d.bias.data() + c0, d.c, c1 - c0, mixed_bias);
  }
  for (int64_t c = c0; c < c1; ++c) {
    float w[9];
    float bias;
    if (a != nullptr) {
      const float s = (channel != nullptr ? channel[c] : 1.f) * (filter != nullptr ? filter[c] : 1.f);
      for (int tap = 0; tap < 9; ++tap) w[tap] = mixed[(c - c0) * 9 + tap] * (spatial != nullptr ? spatial[tap] * s : s);
      bias = d.bias_mixed ? mixed_bias[c - c0] : d.bias[c];
    } else {
      std::copy_n(d.w.data() + c * 9, 9, w);
      bias = d.bias[c];
    }
    const float* r = res != nullptr ? res + c * go.plane : nullptr;
    float part;
    if (d.stride == 2) {
      part = plan::depthwise_plane_s2(in + c * gi.plane, gi.wp, w, bias, out + c * go.plane, go.wp, go.h, go.w, r, d.act);
    } else {
      const float* planes[9];
      for (int tap = 0; tap < 9; ++tap) planes[tap] = in + c * gi.plane + offsets[tap];
      part = plan::depthwise_plane(planes, w, bias, out + c * go.plane, r, d.act, d.pad.data(), first, nvec);
    }
    for (int64_t j = 0; j < nt; ++j) sums[j * go.c + c] = j == 0 ? part : 0.f;
  }
}

void ModelPlan::run_sample(const float* x, const Sinks& sinks, int64_t n, float* base, float* scratch, int64_t t,
                           int64_t nt) const {
  const auto& g0 = geometry_[0];
  for (int64_t c = 0; c < g0.c; ++c) {  // this thread's rows of every channel, and their sum
    float* plane = base + g0.offset + c * g0.plane;
    const int64_t y0 = g0.h * t / nt, y1 = g0.h * (t + 1) / nt;
    for (int64_t y = y0; y < y1; ++y) std::memcpy(plane + (y + 1) * g0.wp + 1, x + (c * g0.h + y) * g0.w, g0.w * 4);
    base[g0.sums + t * g0.c + c] = plane_sum(plane + (y0 + 1) * g0.wp, (y1 - y0) * g0.wp);
  }
  const bool timed = profiling_ && t == 0;  // thread 0's clock: an op ends when the slowest thread's share does
  auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < ops_.size(); ++i) {
    const auto& op = ops_[i];
    if (timed) {
      const auto now = std::chrono::steady_clock::now();
      if (i > 0) op_seconds_[i - 1] += std::chrono::duration<double>(now - start).count();
      start = now;
    }
    if (nt > 1 && op.wait) {
#pragma omp barrier
    }
    if (op.kind == kConv) {
      run_conv(convs_[op.index], base, scratch, t, nt);
    } else if (op.kind == kDepthwise) {
      run_depthwise(depthwise_[op.index], base, scratch, t, nt);
    } else if (op.kind == kGather) {
      run_gather(gathers_[op.index], base, t, nt);
    } else if (op.kind == kWindow) {
      run_window(windows_[op.index], base, t, nt);
    } else if (op.kind == kMaxPool) {
      run_max_pool(windows_[op.index], base, t, nt);
    } else if (op.kind == kToRows) {
      run_to_rows(gathers_[op.index], base, t, nt);
    } else if (op.kind == kToPlanes) {
      run_to_planes(gathers_[op.index], base, t, nt);
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
  if (timed && !ops_.empty())
    op_seconds_.back() += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (nt > 1) {
#pragma omp barrier
  }
  if (t == 0 && head_in_ >= 0) {
    const auto& g = geometry_[head_in_];
    if (g.rows) rows_sums(head_in_, base, 0, g.h, 0);
    float* pooled = scratch;
    pool(head_in_, base, g.rows ? 1 : nt, pooled);
    float* logits = sinks.ptr[0] + n * sinks.per_sample[0];
    for (int64_t j = 0; j < classes_; ++j) {
      float acc = head_b_[j];
      for (int64_t c = 0; c < g.c; ++c) acc += head_w_[j * g.c + c] * pooled[c];
      logits[j] = acc;
    }
  } else if (t == 0) {
    for (size_t k = 0; k < outputs_.size(); ++k) store_map(outputs_[k], base, sinks.ptr[k] + n * sinks.per_sample[k]);
  }
  if (nt > 1) {
#pragma omp barrier  // the workspace is reused by the next sample
  }
}

void ModelPlan::store_map(int64_t id, const float* base, float* dst) const {
  const auto& g = geometry_[id];
  const float* src = base + g.offset;
  if (g.rows) {
    for (int64_t y = 0; y < g.h; ++y) std::memcpy(dst + y * g.w * g.c, src + ((y + 1) * g.wp + 1) * g.c, g.w * g.c * 4);
    return;
  }
  for (int64_t c = 0; c < g.c; ++c)
    for (int64_t y = 0; y < g.h; ++y) std::memcpy(dst + (c * g.h + y) * g.w, src + c * g.plane + (y + 1) * g.wp + 1, g.w * 4);
}

void ModelPlan::check_input(const at::Tensor& input) const {
  check_float_cpu(input, "input");
  const auto& g0 = geometry_[0];
  TORCH_CHECK(input.dim() == 4 && input.size(1) == g0.c && input.size(2) == g0.h && input.size(3) == g0.w,
              "plan input must be [B, ", g0.c, ", ", g0.h, ", ", g0.w, "], got ", input.sizes());
}

at::Tensor ModelPlan::forward(const at::Tensor& input) {
  TORCH_CHECK(head_in_ >= 0, "plan has no head (its results are output maps: forward_maps)");
  check_input(input);
  auto out = at::empty({input.size(0), classes_}, input.options());
  run_batch(input, Sinks{{out.data_ptr<float>()}, {classes_}});
  return out;
}

std::vector<at::Tensor> ModelPlan::forward_maps(const at::Tensor& input) {
  TORCH_CHECK(!outputs_.empty(), "plan has no output maps (its result is a head: forward)");
  check_input(input);
  std::vector<at::Tensor> maps;
  Sinks sinks;
  for (const int64_t id : outputs_) {
    const auto& g = geometry_[id];
    const auto map = g.rows ? at::empty({input.size(0), g.h, g.w, g.c}, input.options()).permute({0, 3, 1, 2})
                            : at::empty({input.size(0), g.c, g.h, g.w}, input.options());
    sinks.ptr.push_back(map.data_ptr<float>());
    sinks.per_sample.push_back(g.c * g.h * g.w);
    maps.push_back(map);
  }
  run_batch(input, sinks);
  return maps;
}

void ModelPlan::run_batch(const at::Tensor& input, const Sinks& sinks) {
  const auto& g0 = geometry_[0];
  const auto x = input.contiguous();
  const int64_t b = x.size(0);
  const float* px = x.data_ptr<float>();
  const int64_t per_image = g0.c * g0.h * g0.w;
  const int64_t pooled = head_in_ >= 0 ? geometry_[head_in_].c : 0;
  const int64_t scratch_size = round_up(max_att_, L) + round_up(max_route_ + max_hidden_, L) + round_up(max_ew_, L) +
                               round_up(max_cout_, L) +
                               std::max({round_up(pooled, L), round_up(max_packed_, L), round_up(max_chunk_, L)}) + L;
  const int nt = std::max(1, at::get_num_threads());
  std::lock_guard<std::mutex> guard(mutex_);  // the workspaces are the plan's
  while (static_cast<int64_t>(work_.size()) < nt) work_.push_back(std::make_unique<Workspace>());
  while (static_cast<int64_t>(scratch_.size()) < nt) scratch_.push_back(std::make_unique<Workspace>());
  for (int i = 0; i < nt; ++i) {
    work_[i]->get(total_ + L + 2 * round_up(max_packed_, L));  // the maps, then the shared packed inputs
    scratch_[i]->get(scratch_size);
  }
  auto run = [&](int team) {  // the batch, `team` threads sharing each image
    if (team > 1) {
#pragma omp parallel num_threads(team)
      {
        const int64_t tid = omp_get_thread_num(), size = omp_get_num_threads();
        for (int64_t n = 0; n < b; ++n)
          run_sample(px + n * per_image, sinks, n, work_[0]->data.get(), scratch_[tid]->data.get(), tid, size);
      }
    } else {
      for (int64_t n = 0; n < b; ++n)
        run_sample(px + n * per_image, sinks, n, work_[0]->data.get(), scratch_[0]->data.get(), 0, 1);
    }
  };
  if (profiling_) {  // timed op by op: one thread, or every thread sharing each image if the policy says so
    run(team_policy_ == 2 ? std::min<int>(nt, kMaxTeam) : 1);
  } else if (b >= nt && nt > 1) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t n = 0; n < b; ++n) {
      const int tid = omp_get_thread_num();
      run_sample(px + n * per_image, sinks, n, work_[tid]->data.get(), scratch_[tid]->data.get(), 0, 1);
    }
  } else if (nt > 1) {
    // A small image's layers are too short to share well (barriers, maps moving between cores), so the
    // first call per (threads, batch) times both ways in turns and keeps the faster one.
    const int shared = std::min<int>(nt, kMaxTeam);
    int64_t& team = teams_[{nt, b}];
    if (team_policy_ != 0) {
      team = team_policy_ == 1 ? 1 : shared;
    } else if (team == 0) {
      // Warm both ways up first (the team's threads start, the workspaces fault in): a fresh process timed
      // cold picked the slower way for SD-Conv's pruned ResNet (0.20 ms shared vs 0.13 ms alone).
      constexpr int kWarmup = 3, kRounds = 15;
      for (int r = 0; r < kWarmup; ++r) {
        run(shared);
        run(1);
      }
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
}

void ModelPlan::set_profiling(bool on) {
  std::lock_guard<std::mutex> guard(mutex_);
  if (on) op_seconds_.assign(ops_.size(), 0.0);  // switched off, the times stay for profile()
  profiling_ = on;
}

std::vector<std::tuple<int64_t, int64_t, double>> ModelPlan::profile() const {
  std::lock_guard<std::mutex> guard(mutex_);
  std::vector<std::tuple<int64_t, int64_t, double>> out;
  for (size_t i = 0; i < ops_.size(); ++i)
    out.emplace_back(ops_[i].kind, ops_[i].index, i < op_seconds_.size() ? op_seconds_[i] : 0.0);
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

}  // namespace native
