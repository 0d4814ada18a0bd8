// Fused attention-score MSE on CPU (float32): the KDLSQ attention loss term of one layer in one pass forward
// (the sum stays in torch) and one pass backward, in place of about fifteen elementwise passes of the unfused
// torch formula (kdlsq_pl/distill/losses.py, attention_score_mse). Source: TinyBERT / KDLSQ released code,
// att_loss += MSE(student_scores, teacher_scores) with entries <= threshold (the additive padding mask) set to 0.
//
// Element by element, in the order the unfused torch ops evaluate it (bit-identical: built with -fno-trapping-math,
// which lets the selects vectorize, and -ffp-contract=off; the tests compare with torch.equal):
//   s' = s <= thr ? 0 : s;  t' = t <= thr ? 0 : t;  d = s' - t'
//   forward   e = d * d                     (unmasked: torch then takes e.mean(), as F.mse_loss)
//             e = (d * d) * p               (masked, p = 1 where query and key are real tokens, else 0;
//                                            torch then takes e.sum() / D)
//             m = s <= thr ? 0 : d          (kept for the backward in place of both score tensors)
//   backward  ds = (alpha * m) * g          (unmasked: mse_loss_backward, alpha = 2 / N)
//             ds = (a * p) * (2 * m)        (masked: a = g / D, through mul and pow(2))
// The backward equals the torch formula's bit for bit except that an entry at or below the threshold gets the sign
// of (alpha * 0) * g rather than +0 (the same value: torch.equal holds).
// s, t: [B, H, T, T]; p: [B, T, T], shared by the H heads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int64_t kGrain = 1 << 15;

// Masked and unmasked variants are separate loops: a loop that may or may not read p does not vectorize.
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void fwd_plain(const float* s, const float* t, float* e, float* m, int64_t n, float thr) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = (s[i] <= thr ? 0.0f : s[i]) - (t[i] <= thr ? 0.0f : t[i]);
    e[i] = d * d;
    m[i] = s[i] <= thr ? 0.0f : d;
  }
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void fwd_masked(const float* s, const float* t, const float* p, float* e, float* m, int64_t n, float thr) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = (s[i] <= thr ? 0.0f : s[i]) - (t[i] <= thr ? 0.0f : t[i]);
    e[i] = (d * d) * p[i];
    m[i] = s[i] <= thr ? 0.0f : d;
  }
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void bwd_plain(const float* m, float* ds, int64_t n, float coef, float g) {
  for (int64_t i = 0; i < n; ++i) ds[i] = (coef * m[i]) * g;
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void bwd_masked(const float* m, const float* p, float* ds, int64_t n, float coef) {
  for (int64_t i = 0; i < n; ++i) ds[i] = (coef * p[i]) * (2.0f * m[i]);
}

void check(const at::Tensor& s, const at::Tensor& t, const at::Tensor& p) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 4,
              "kdlsq attention mse kernel: student scores must be a contiguous float32 CPU [B, H, T, T] tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == s.sizes(),
              "kdlsq attention mse kernel: teacher scores must be contiguous float32 of the student's shape");
  if (p.defined()) {
    TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous() && p.dim() == 3 && p.size(0) == s.size(0) &&
                    p.size(1) == s.size(2) && p.size(2) == s.size(3),
                "kdlsq attention mse kernel: pair mask must be contiguous float32 [B, T, T]");
  }
}

// Calls fn(begin, end, p_begin) over spans of one (batch row, head): the pair mask repeats for every head.
template <typename F>
void for_heads(const at::Tensor& s, const at::Tensor& p, F fn) {
  const int64_t heads = s.size(1), plane = s.size(2) * s.size(3), n = s.numel();
  const float* pp = p.defined() ? p.data_ptr<float>() : nullptr;
  if (!pp) {
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { fn(b, e, nullptr); });
    return;
  }
  at::parallel_for(0, s.size(0) * heads, std::max<int64_t>(1, kGrain / std::max<int64_t>(plane, 1)), [&](int64_t b, int64_t e) {
    for (int64_t bh = b; bh < e; ++bh) fn(bh * plane, (bh + 1) * plane, pp + (bh / heads) * plane);
  });
}

// (e, m): the elementwise squares (summed by torch) and the masked difference the backward reads
std::tuple<at::Tensor, at::Tensor> attention_mse_forward(const at::Tensor& s, const at::Tensor& t,
                                                         const c10::optional<at::Tensor>& pairs, double threshold) {
  const at::Tensor p = pairs.has_value() ? *pairs : at::Tensor();
  check(s, t, p);
  at::Tensor e = at::empty_like(s), m = at::empty_like(s);
  const float *sp = s.data_ptr<float>(), *tp = t.data_ptr<float>();
  float *ep = e.data_ptr<float>(), *mp = m.data_ptr<float>();
  const float thr = static_cast<float>(threshold);
  for_heads(s, p, [&](int64_t b, int64_t end, const float* pb) {
    if (pb) fwd_masked(sp + b, tp + b, pb, ep + b, mp + b, end - b, thr);
    else fwd_plain(sp + b, tp + b, ep + b, mp + b, end - b, thr);
  });
  return {e, m};
}

at::Tensor attention_mse_backward(const at::Tensor& m, const c10::optional<at::Tensor>& pairs, double coef, double grad) {
  const at::Tensor p = pairs.has_value() ? *pairs : at::Tensor();
  check(m, m, p);
  at::Tensor ds = at::empty_like(m);
  const float* mp = m.data_ptr<float>();
  float* dp = ds.data_ptr<float>();
  const float c = static_cast<float>(coef), g = static_cast<float>(grad);
  for_heads(m, p, [&](int64_t b, int64_t end, const float* pb) {
    if (pb) bwd_masked(mp + b, pb, dp + b, end - b, c);
    else bwd_plain(mp + b, dp + b, end - b, c, g);
  });
  return ds;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdlsq, m) {
  m.def("attention_mse_forward(Tensor s, Tensor t, Tensor? pairs, float threshold) -> (Tensor, Tensor)");
  m.def("attention_mse_backward(Tensor m, Tensor? pairs, float coef, float grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdlsq, CPU, m) {
  m.impl("attention_mse_forward", &attention_mse_forward);
  m.impl("attention_mse_backward", &attention_mse_backward);
}
