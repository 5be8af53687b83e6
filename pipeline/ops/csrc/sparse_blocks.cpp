// Gather / scatter inference of DynConv gated residual blocks (Verelst & Tuytelaars, "Dynamic
// Convolutions: Exploiting Spatial Sparsity for Faster Inference", CVPR 2020), float32 on the CPU.
//
// The same function as SparseBasicBlock / SparseInvertedResidual (pipeline/ops/sparse_exec.py), whose
// docstrings give the equations; here every step is one loop or one GEMM call:
//   - mask unit (eval): logits = conv3x3(x) + fc(mean(x)) + biases, m = [logits >= 0]; the conv part is
//     one GEMM of the input rows with the 9 taps ([B*H*W, C] x [C, 9]) and a 9-term sum per output;
//   - dilated mask d = union of the 3x3 windows of m; position lists of m and d, and the rank of each
//     position of d in the list (0 for "not computed", which reads a zero row);
//   - convs at the positions of d / m: gathered neighbourhoods times the BN-folded kernel matrices
//     (MKL GEMMs), depthwise taps as a vectorised loop, activations in place;
//   - the residual branch is added into the shortcut rows at the mask positions.
// Inputs and outputs are [B, C, H, W] tensors; the output is in channels_last memory format.

#include "native.h"
#include "row_gemm.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace native {
namespace {

using direct::AddRows;
using direct::kInf;
using direct::row_gemm;
using direct::StoreRows;
using direct::window_rows;

// Rows of a [B, C, H, W] tensor as a channels-last [B*H*W, C] float buffer (no copy if already so).
at::Tensor as_rows(const at::Tensor& x) { return x.contiguous(at::MemoryFormat::ChannelsLast); }

// [B*H*W, C] rows as a [B, C, H, W] tensor in channels_last memory format (a view).
at::Tensor as_nchw(const at::Tensor& rows, int64_t b, int64_t h, int64_t w) {
  return rows.view({b, h, w, rows.size(1)}).permute({0, 3, 1, 2});
}

// Grain (rows per task) so that a task moves at least ~16 KB: smaller jobs run on the calling thread.
int64_t grain(int64_t row_floats) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(row_floats, 1)); }

void relu_rows(float* p, int64_t n) {
  at::parallel_for(0, n, 16384, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) p[i] = std::max(p[i], 0.f);
  });
}



}  // namespace

// ------------------------------------------------------------------------------------------ masks

GatePlan::GatePlan(const at::Tensor& conv_weight, const at::Tensor& conv_bias, const at::Tensor& fc_weight,
                   const at::Tensor& fc_bias, int64_t stride)
    : stride(stride) {
  check_float_cpu(conv_weight, "mask unit conv weight");
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(0) == 1 && conv_weight.size(2) == 3 &&
                  conv_weight.size(3) == 3,
              "mask unit conv weight must be [1, C, 3, 3]");
  channels = conv_weight.size(1);
  taps = conv_weight.detach()[0].reshape({channels, 9}).t().contiguous();  // [9, C]: row ky * 3 + kx
  fc = fc_weight.reshape({channels}).contiguous();
  bias = conv_bias.item<float>() + fc_bias.item<float>();
}

Masks make_masks(const at::Tensor& rows, int64_t b, int64_t h, int64_t w, const GatePlan* gate,
                 const c10::optional<at::Tensor>& given, int64_t stride) {
  Masks out;
  const int64_t ho = (h - 1) / stride + 1, wo = (w - 1) / stride + 1;
  out.b = b;
  out.h = ho;
  out.w = wo;
  out.mask = at::empty({b, 1, ho, wo}, rows.options().dtype(at::kBool));
  bool* m = out.mask.data_ptr<bool>();
  const int64_t total = b * ho * wo;
  if (given.has_value() && given->defined()) {
    const auto g = given->to(at::kFloat).contiguous();
    const float* src = g.data_ptr<float>();
    for (int64_t i = 0; i < total; ++i) m[i] = src[i] != 0.f;
  } else {
    const int64_t c = gate->channels;
    const float* x = rows.data_ptr<float>();
    // Per-image threshold: logits >= 0 <=> conv part >= -(fc . mean(x) + biases).
    std::vector<float> thr(b);
    const float* fc = gate->fc.data_ptr<float>();
    std::vector<float> sums(c);
    for (int64_t n = 0; n < b; ++n) {
      float* __restrict__ sum = sums.data();
      std::fill(sums.begin(), sums.end(), 0.f);
      const float* __restrict__ img = x + n * h * w * c;
      for (int64_t p = 0; p < h * w; ++p)
        for (int64_t j = 0; j < c; ++j) sum[j] += img[p * c + j];
      float dot = 0.f;
      for (int64_t j = 0; j < c; ++j) dot += fc[j] * (sum[j] / static_cast<float>(h * w));
      thr[n] = -(dot + gate->bias);
    }
    // Per output: the 9 window rows times the 9 taps, accumulated in 8-lane vectors over the channels.
    const float* taps = gate->taps.data_ptr<float>();  // [9, C]
    const int64_t vec_c = c - c % 8;
    at::parallel_for(0, total, 512, [&](int64_t lo, int64_t hi) {
      for (int64_t o = lo; o < hi; ++o) {
        const int64_t n = o / (ho * wo), rem = o - n * ho * wo, oy = rem / wo, ox = rem - oy * wo;
        direct::Vec8 acc = {};
        float tail = 0.f;
        for (int64_t ky = 0; ky < 3; ++ky) {
          const int64_t iy = oy * stride + ky - 1;
          if (iy < 0 || iy >= h) continue;
          for (int64_t kx = 0; kx < 3; ++kx) {
            const int64_t ix = ox * stride + kx - 1;
            if (ix < 0 || ix >= w) continue;
            const float* src = x + ((n * h + iy) * w + ix) * c;
            const float* tap = taps + (ky * 3 + kx) * c;
            for (int64_t j = 0; j < vec_c; j += 8)
              acc += *reinterpret_cast<const direct::Lanes8*>(src + j) * *reinterpret_cast<const direct::Lanes8*>(tap + j);
            for (int64_t j = vec_c; j < c; ++j) tail += src[j] * tap[j];
          }
        }
        float sum = tail;
        for (int l = 0; l < 8; ++l) sum += acc[l];
        m[o] = sum >= thr[n];
      }
    });
  }
  for (int64_t i = 0; i < total; ++i)
    if (m[i]) out.idx_m.push_back(i);
  return out;
}

void dilate(Masks& masks) {
  const int64_t b = masks.b, h = masks.h, w = masks.w, total = b * h * w;
  const bool* m = masks.mask.data_ptr<bool>();
  masks.dilated = at::zeros({b, 1, h, w}, masks.mask.options());
  bool* d = masks.dilated.data_ptr<bool>();
  for (const int64_t o : masks.idx_m) {
    const int64_t n = o / (h * w), y = (o / w) % h, x = o % w;
    for (int64_t yy = std::max<int64_t>(y - 1, 0); yy <= std::min(y + 1, h - 1); ++yy)
      for (int64_t xx = std::max<int64_t>(x - 1, 0); xx <= std::min(x + 1, w - 1); ++xx) d[(n * h + yy) * w + xx] = true;
  }
  (void)m;
  masks.rank.assign(total, 0);
  masks.idx_d.clear();
  for (int64_t i = 0; i < total; ++i)
    if (d[i]) {
      masks.idx_d.push_back(i);
      masks.rank[i] = static_cast<int64_t>(masks.idx_d.size());  // 1-based: row 0 is the zero row
    }
}

// ------------------------------------------------------------------------------------------ basic block

BasicBlockPlan::BasicBlockPlan(const at::Tensor& gate_conv_w, const at::Tensor& gate_conv_b,
                               const at::Tensor& gate_fc_w, const at::Tensor& gate_fc_b, int64_t stride,
                               const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                               const c10::optional<at::Tensor>& ws, const c10::optional<at::Tensor>& bs)
    : gate_(gate_conv_w, gate_conv_b, gate_fc_w, gate_fc_b, stride), stride_(stride) {
  for (const auto* t : {&w1, &b1, &w2, &b2}) check_float_cpu(*t, "basic block parameter");
  out_channels_ = w1.size(0);
  in_channels_ = w1.size(1);
  w1_ = w1.contiguous(at::MemoryFormat::ChannelsLast);
  w2_ = w2.contiguous(at::MemoryFormat::ChannelsLast);
  b1_ = b1.contiguous();
  b2_ = b2.contiguous();
  // [9 * C_in, C_out] matrices of (ky, kx, c_in) rows: what a gathered neighbourhood row meets.
  m1_ = w1.permute({2, 3, 1, 0}).reshape({9 * in_channels_, out_channels_}).contiguous();
  m2_ = w2.permute({2, 3, 1, 0}).reshape({9 * out_channels_, out_channels_}).contiguous();
  if (ws.has_value() && ws->defined()) {
    ws_ = ws->contiguous();
    bs_ = bs->contiguous();
    ms_ = ws->reshape({out_channels_, in_channels_}).t().contiguous();  // [C_in, C_out]
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> BasicBlockPlan::forward(
    const at::Tensor& input, const c10::optional<at::Tensor>& mask, double dense_above) const {
  check_float_cpu(input, "input");
  TORCH_CHECK(input.dim() == 4 && input.size(1) == in_channels_, "input must be [B, ", in_channels_, ", H, W]");
  const auto x = as_rows(input);
  const int64_t b = x.size(0), c = in_channels_, h = x.size(2), w = x.size(3), co = out_channels_;
  Masks masks = make_masks(x, b, h, w, &gate_, mask, stride_);
  const int64_t ho = masks.h, wo = masks.w, total = b * ho * wo;
  const int64_t nm = static_cast<int64_t>(masks.idx_m.size());
  const float* xr = x.data_ptr<float>();

  if (nm > dense_above * static_cast<double>(total)) {  // little to skip: folded convs, mask multiplied in
    auto h1 = at::conv2d(x, w1_, b1_, {stride_, stride_}, {1, 1}).relu_();
    auto r = at::conv2d(h1, w2_, b2_, {1, 1}, {1, 1});
    auto shortcut = ws_.defined() ? at::conv2d(x, ws_, bs_, {stride_, stride_}) : x;
    auto out = nm == total ? r.add_(shortcut) : at::addcmul(shortcut, r, masks.mask.to(at::kFloat));
    return {out.relu_(), masks.mask, at::Tensor(), kPathDense};
  }

  // Shortcut rows [B*Ho*Wo, C_out]: a copy of the input, or the folded 1x1 projection at stride s.
  auto out = at::empty({total, co}, x.options());
  float* outp = out.data_ptr<float>();
  std::vector<float> zero(std::max(c, co), 0.f);
  if (ws_.defined()) {
    row_gemm(total, 1, c, ms_, bs_,
             [&](int64_t o, const float** ptrs) {
               const int64_t n = o / (ho * wo), oy = (o / wo) % ho, ox = o % wo;
               ptrs[0] = xr + ((n * h + oy * stride_) * w + ox * stride_) * c;
             },
             StoreRows{outp, co, -kInf, kInf});
  } else {
    std::memcpy(outp, xr, sizeof(float) * total * co);
  }
  if (nm == 0) {
    relu_rows(outp, total * co);
    return {as_nchw(out, b, ho, wo), masks.mask, masks.mask, kPathShortcut};
  }

  dilate(masks);
  const int64_t nd = static_cast<int64_t>(masks.idx_d.size());
  // conv1 (3x3, stride s) at the dilated positions on the input neighbourhoods, ReLU; row 0 of `hidden` is
  // zeros, what conv2 reads outside d.
  auto hidden = at::empty({nd + 1, co}, x.options());
  float* hp = hidden.data_ptr<float>();
  std::memset(hp, 0, sizeof(float) * co);
  const int64_t* idx_d = masks.idx_d.data();
  const float* zp = zero.data();
  const int64_t s = stride_;
  row_gemm(nd, 9, c, m1_, b1_,
           [&](int64_t r, const float** ptrs) {
             window_rows(idx_d[r], ho, wo, h, w, s, zp,
                         [&](int64_t n, int64_t y, int64_t xx) { return xr + ((n * h + y) * w + xx) * c; }, ptrs);
           },
           StoreRows{hp + co, co, 0.f, kInf});
  // conv2 (3x3) at the mask positions on those features, added into the shortcut rows.
  const int64_t* rank = masks.rank.data();
  const int64_t* idx_m = masks.idx_m.data();
  row_gemm(nm, 9, co, m2_, b2_,
           [&](int64_t r, const float** ptrs) {
             window_rows(idx_m[r], ho, wo, ho, wo, 1, zp,
                         [&](int64_t n, int64_t y, int64_t xx) { return hp + rank[(n * ho + y) * wo + xx] * co; },
                         ptrs);
           },
           AddRows{outp, co, idx_m});
  relu_rows(outp, total * co);
  return {as_nchw(out, b, ho, wo), masks.mask, masks.dilated, kPathSparse};
}

// ------------------------------------------------------------------------------------------ inverted residual

InvertedResidualPlan::InvertedResidualPlan(const at::Tensor& gate_conv_w, const at::Tensor& gate_conv_b,
                                           const at::Tensor& gate_fc_w, const at::Tensor& gate_fc_b,
                                           const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                           const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3)
    : gate_(gate_conv_w, gate_conv_b, gate_fc_w, gate_fc_b, 1) {
  for (const auto* t : {&w1, &b1, &w2, &b2, &w3, &b3}) check_float_cpu(*t, "inverted residual parameter");
  hidden_ = w1.size(0);
  channels_ = w1.size(1);
  w1_ = w1.contiguous();
  w2_ = w2.contiguous();
  w3_ = w3.contiguous();
  b1_ = b1.contiguous();
  b2_ = b2.contiguous();
  b3_ = b3.contiguous();
  m1_ = w1.reshape({hidden_, channels_}).t().contiguous();  // [C, hidden]
  taps_ = w2.reshape({hidden_, 9}).t().contiguous();         // [9, hidden]
  m3_ = w3.reshape({channels_, hidden_}).t().contiguous();  // [hidden, C]
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> InvertedResidualPlan::forward(
    const at::Tensor& input, const c10::optional<at::Tensor>& mask, double dense_above) const {
  check_float_cpu(input, "input");
  TORCH_CHECK(input.dim() == 4 && input.size(1) == channels_, "input must be [B, ", channels_, ", H, W]");
  const auto x = as_rows(input);
  const int64_t b = x.size(0), c = channels_, h = x.size(2), w = x.size(3), hid = hidden_, total = b * h * w;
  Masks masks = make_masks(x, b, h, w, &gate_, mask, 1);
  const int64_t nm = static_cast<int64_t>(masks.idx_m.size());
  const float* xr = x.data_ptr<float>();

  if (nm > dense_above * static_cast<double>(total)) {
    auto e = at::conv2d(x, w1_, b1_).clamp_(0.0, 6.0);
    e = at::conv2d(e, w2_, b2_, {1, 1}, {1, 1}, {1, 1}, hid).clamp_(0.0, 6.0);
    auto r = at::conv2d(e, w3_, b3_);
    auto out = nm == total ? r.add_(x) : at::addcmul(x, r, masks.mask.to(at::kFloat));
    return {out, masks.mask, at::Tensor(), kPathDense};
  }
  auto out = at::empty({total, c}, x.options());
  float* outp = out.data_ptr<float>();
  std::memcpy(outp, xr, sizeof(float) * total * c);
  if (nm == 0) return {as_nchw(out, b, h, w), masks.mask, masks.mask, kPathShortcut};

  dilate(masks);
  const int64_t nd = static_cast<int64_t>(masks.idx_d.size());
  // 1x1 expansion at the dilated positions, ReLU6; row 0 of `expanded` is zeros (read outside d).
  const int64_t* idx_d = masks.idx_d.data();
  auto expanded = at::empty({nd + 1, hid}, x.options());
  float* ep = expanded.data_ptr<float>();
  std::memset(ep, 0, sizeof(float) * hid);
  row_gemm(nd, 1, c, m1_, b1_, [&](int64_t r, const float** ptrs) { ptrs[0] = xr + idx_d[r] * c; },
           StoreRows{ep + hid, hid, 0.f, 6.f});
  // Depthwise 3x3 at the mask positions (taps of the expanded rows, zero row outside d), ReLU6.
  auto dw = at::empty({nm, hid}, x.options());
  float* dwp = dw.data_ptr<float>();
  const float* taps = taps_.data_ptr<float>();
  const float* bias2 = b2_.data_ptr<float>();
  const int64_t* rank = masks.rank.data();
  const int64_t* idx_m = masks.idx_m.data();
  at::parallel_for(0, nm, grain(9 * hid), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t o = idx_m[i];
      const int64_t n = o / (h * w), y = (o / w) % h, xx = o % w;
      float* acc = dwp + i * hid;
      std::memcpy(acc, bias2, sizeof(float) * hid);
      for (int64_t ky = 0; ky < 3; ++ky) {
        const int64_t yy = y + ky - 1;
        if (yy < 0 || yy >= h) continue;
        for (int64_t kx = 0; kx < 3; ++kx) {
          const int64_t xs = xx + kx - 1;
          if (xs < 0 || xs >= w) continue;
          const float* src = ep + rank[(n * h + yy) * w + xs] * hid;
          const float* tap = taps + (ky * 3 + kx) * hid;
          for (int64_t j = 0; j < hid; ++j) acc[j] += tap[j] * src[j];
        }
      }
      for (int64_t j = 0; j < hid; ++j) acc[j] = std::min(std::max(acc[j], 0.f), 6.f);
    }
  });
  // 1x1 projection, added into the identity rows at the mask positions.
  row_gemm(nm, 1, hid, m3_, b3_, [&](int64_t r, const float** ptrs) { ptrs[0] = dwp + r * hid; },
           AddRows{outp, c, idx_m});
  return {as_nchw(out, b, h, w), masks.mask, masks.dilated, kPathSparse};
}

}  // namespace native
