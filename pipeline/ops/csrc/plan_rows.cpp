// DynConv's sparse blocks in the whole-model plan (model_plan.h): rows buffers, the mask unit with its
// dilation and position lists, and the row-GEMM convs over those lists.
#include "model_plan.h"
#include "plan_kernels.h"
#include "row_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace native {

using namespace plan;

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

int64_t ModelPlan::rows_gate(int64_t in, int64_t mask, int64_t dilated, int64_t expanded, int64_t stride,
                             const at::Tensor& conv_weight, const at::Tensor& conv_bias, const at::Tensor& fc_weight,
                             const at::Tensor& fc_bias) {
  const auto& gi = geometry(in);
  const auto& gm = geometry(mask);
  const auto& gd = geometry(dilated);
  TORCH_CHECK(gi.rows && !gm.rows && !gd.rows && gm.c == 1 && gd.c == 1 && gd.h == gm.h && gd.w == gm.w,
              "rows gate: rows input, one-channel mask planes");
  if (expanded >= 0) {
    const auto& ge = geometry(expanded);
    TORCH_CHECK(!ge.rows && ge.c == 1 && ge.h == gi.h && ge.w == gi.w, "rows gate: an expanded plane of the input's size");
  }
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
  g.expanded = expanded;
  g.stride = stride;
  g.w = floats(conv_weight.permute({0, 2, 3, 1}), "gate conv weight");  // [(ky, kx), C]
  g.bias = floats(conv_bias, "gate conv bias")[0] + floats(fc_bias, "gate fc bias")[0];
  g.fc = floats(fc_weight, "gate fc weight");
  g.positions = gm.h * gm.w;
  g.lists = total_;
  total_ += round_up(16 + 3 * g.positions + (expanded >= 0 ? gi.h * gi.w : 0), L);
  g.across = total_;
  total_ += round_up((gm.h + 2) * gm.wp + 2 * L, L);
  rows_gates_.push_back(std::move(g));
  push_op(kRowsGate, rows_gates_.size());
  return static_cast<int64_t>(rows_gates_.size()) - 1;
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
  if (g.expanded >= 0) rows_gate_expand(g, base);
}

// The expanded mask: input position (iy, ix) is read by the 3x3, stride-s window of output (oy, ox) when
// |s oy - iy| <= 1 and |s ox - ix| <= 1; its plane and list (after the mask's lists).
void ModelPlan::rows_gate_expand(const RowsGate& g, float* base) const {
  const auto& gm = geometry_[g.mask];
  const auto& ge = geometry_[g.expanded];
  const float* m = base + gm.offset;
  float* e = base + ge.offset;
  int32_t* lists = reinterpret_cast<int32_t*>(base + g.lists);
  int32_t* on_e = lists + 16 + 3 * g.positions;
  int32_t ne = 0;
  const int64_t s = g.stride;
  for (int64_t iy = 0; iy < ge.h; ++iy)
    for (int64_t ix = 0; ix < ge.w; ++ix) {
      float v = 0.f;
      for (int64_t y = iy - 1; y <= iy + 1; ++y) {
        if (y < 0 || y % s != 0 || y / s >= gm.h) continue;
        for (int64_t x = ix - 1; x <= ix + 1; ++x)
          if (x >= 0 && x % s == 0 && x / s < gm.w) v = std::max(v, m[(y / s + 1) * gm.wp + x / s + 1]);
      }
      const int64_t p = (iy + 1) * ge.wp + ix + 1;
      e[p] = v;
      if (v > 0.f) on_e[ne++] = static_cast<int32_t>(p);
    }
  lists[3] = ne;
}

int64_t ModelPlan::rows_conv(int64_t in, int64_t out, int64_t res, int64_t act, int64_t stride, const at::Tensor& weight,
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
  check_residual(res, go, "rows conv");
  RowsConv c;
  c.in = in;
  c.out = out;
  c.res = res;
  c.act = act;
  c.stride = stride;
  c.taps = weight.size(2) * weight.size(3);
  c.matrix = floats(weight.permute({2, 3, 1, 0}), "weight");  // [(ky, kx, c_in), c_out]
  c.bias = (bias.has_value() && bias->defined()) ? floats(*bias, "bias") : std::vector<float>(go.c, 0.f);
  TORCH_CHECK(static_cast<int64_t>(c.bias.size()) == go.c, "rows conv: bias must be [C_out]");
  if (gate >= 0) {
    TORCH_CHECK(gate < static_cast<int64_t>(rows_gates_.size()) && which >= 0 && which <= 2, "rows conv: gate");
    const RowsGate& g = rows_gates_[gate];
    if (which == 2) {
      TORCH_CHECK(g.expanded >= 0, "rows conv: the gate has no expanded mask");
      const auto& ge = geometry_[g.expanded];
      TORCH_CHECK(ge.h == go.h && ge.w == go.w, "rows conv: the expanded mask and the output differ in size");
    } else {
      const auto& gm = geometry_[g.mask];
      TORCH_CHECK(gm.h == go.h && gm.w == go.w, "rows conv: the mask and the output differ in size");
    }
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

int64_t ModelPlan::rows_depthwise(int64_t in, int64_t out, int64_t act, const at::Tensor& weight,
                                  const at::Tensor& bias, int64_t gate, int64_t which) {
  const auto& gi = geometry(in);
  const auto& go = geometry(out);
  TORCH_CHECK(gi.rows && go.rows && gi.c == go.c && gi.h == go.h && gi.w == go.w, "rows depthwise: rows buffers of one shape");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == go.c && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3 && bias.numel() == go.c, "rows depthwise: weight [C, 1, 3, 3], bias [C]");
  if (gate >= 0) {
    TORCH_CHECK(gate < static_cast<int64_t>(rows_gates_.size()) && (which == 0 || which == 1), "rows depthwise: gate");
    const auto& gm = geometry_[rows_gates_[gate].mask];
    TORCH_CHECK(gm.h == go.h && gm.w == go.w, "rows depthwise: the mask and the output differ in size");
  }
  RowsConv c;
  c.in = in;
  c.out = out;
  c.act = act;
  c.depthwise = true;
  c.matrix = floats(weight.reshape({go.c, 9}).t(), "weight");  // [9][C]
  c.bias = floats(bias, "bias");
  c.gate = gate;
  c.which = which;
  for (int64_t y = 1; y <= go.h; ++y)
    for (int64_t x = 1; x <= go.w; ++x) c.all.push_back(static_cast<int32_t>(y * go.wp + x));
  rows_convs_.push_back(std::move(c));
  return push_op(kRowsConv, rows_convs_.size());
}

std::pair<const int32_t*, int64_t> ModelPlan::positions(const RowsConv& c, const float* base) const {
  if (c.gate < 0) return {c.all.data(), static_cast<int64_t>(c.all.size())};
  const RowsGate& g = rows_gates_[c.gate];
  const int32_t* lists = reinterpret_cast<const int32_t*>(base + g.lists);
  return c.which == 0 ? std::make_pair(lists + 16, static_cast<int64_t>(lists[0]))
                      : std::make_pair(lists + 16 + g.positions, static_cast<int64_t>(lists[1]));
}

// Depthwise 3x3 on rows: a vector of channels at a time, nine taps of the same channels at the neighbours.
void ModelPlan::run_rows_depthwise(const RowsConv& c, float* base, int64_t t, int64_t nt) const {
  const auto& go = geometry_[c.out];
  const float* in = base + geometry_[c.in].offset;
  float* out = base + go.offset;
  const int64_t ch = go.c, wp = go.wp;
  const auto [list, n] = positions(c, base);
  const int64_t shift[9] = {-wp - 1, -wp, -wp + 1, -1, 0, 1, wp - 1, wp, wp + 1};
  const float* w = c.matrix.data();
  for (int64_t i = n * t / nt; i < n * (t + 1) / nt; ++i) {
    const int64_t p = list[i];
    float* dst = out + p * ch;
    int64_t c0 = 0;
    for (; c0 + L <= ch; c0 += L) {
      V acc = *reinterpret_cast<const U*>(c.bias.data() + c0);
      for (int tap = 0; tap < 9; ++tap)
        acc += *reinterpret_cast<const U*>(w + tap * ch + c0) * *reinterpret_cast<const U*>(in + (p + shift[tap]) * ch + c0);
      *reinterpret_cast<U*>(dst + c0) = activated(acc, c.act);
    }
    for (; c0 < ch; ++c0) {
      float acc = c.bias[c0];
      for (int tap = 0; tap < 9; ++tap) acc += w[tap * ch + c0] * in[(p + shift[tap]) * ch + c0];
      dst[c0] = activated(acc, c.act);
    }
  }
}

int64_t ModelPlan::to_planes(int64_t in, int64_t out) {
  const auto& gi = geometry(in);
  const auto& go = geometry(out);
  TORCH_CHECK(gi.rows && !go.rows && gi.c == go.c && gi.h == go.h && gi.w == go.w, "to_planes: shape mismatch");
  gathers_.push_back({in, out});
  return push_op(kToPlanes, gathers_.size());
}

// Rows to planes over this thread's share of the rows, with the per-channel sums of that share.
void ModelPlan::run_to_planes(const Gather& op, float* base, int64_t t, int64_t nt) const {
  const auto& gi = geometry_[op.in];
  const auto& go = geometry_[op.out];
  const float* in = base + gi.offset;
  float* out = base + go.offset;
  const int64_t y0 = go.h * t / nt, y1 = go.h * (t + 1) / nt;
  for (int64_t y = 1 + y0; y < 1 + y1; ++y)
    for (int64_t x = 1; x <= go.w; ++x) {
      const int64_t p = y * go.wp + x;
      for (int64_t c = 0; c < go.c; ++c) out[c * go.plane + p] = in[p * go.c + c];
    }
  rows_sums(op.in, base, y0, y1, t);
  std::copy_n(base + gi.sums + t * gi.c, gi.c, base + go.sums + t * go.c);
}

void ModelPlan::run_rows_conv(const RowsConv& c, float* base, int64_t t, int64_t nt) const {
  if (c.depthwise) {
    run_rows_depthwise(c, base, t, nt);
    return;
  }
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
    } else if (c.which == 2) {
      n = lists[3];
      list = lists + 16 + 3 * g.positions;
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
  const int64_t act = c.act;
  auto store = [&](int64_t r, int64_t col0, const float* acc, int64_t width) {
    const int64_t p = mine[r];
    float* dst = out + p * cout + col0;
    const float* add = res != nullptr ? res + p * cout + col0 : nullptr;
    for (int64_t j = 0; j < width; ++j) {
      float v = acc[j] + (add != nullptr ? add[j] : 0.f);
      dst[j] = activated(v, act);
    }
  };
  if (r1 > r0)
    direct::row_gemm_columns(r1 - r0, taps, cin, c.matrix.data(), cout, c.bias.data(), 0, cout, rows_of, store);
  // The inactive positions of a conv at the mask with a residual: the residual passes (through the activation).
  // Without one they stay unwritten: only ops at the same mask read this output.
  if (res == nullptr) return;
  for (int64_t i = n_idle * t / nt; i < n_idle * (t + 1) / nt; ++i) {
    const int64_t p = idle[i];
    float* dst = out + p * cout;
    const float* add = res + p * cout;
    for (int64_t j = 0; j < cout; ++j) dst[j] = activated(add[j], act);
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

}  // namespace native
