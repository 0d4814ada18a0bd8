// Fused LSQ fake quantization on CPU (float32, contiguous): one pass forward, one pass backward.
//
// The arithmetic is exactly the unfused torch formula of kdlsq_pl/quant/lsq.py, element by element and in the
// same order, so results are bit-identical (IEEE division and multiplication, round-half-to-even via rint in the
// default rounding mode, no FMA contraction: built with -ffp-contract=off; -fno-trapping-math only lets the
// compiler vectorize the selects, it changes no result):
//   forward   r = v / s;  out = clamp(rint(r), -Q_N, Q_P) * s
//   backward  below/above from r ("unrounded") or rint(r) ("rounded");
//             grad_v  = (below || above) ? 0 : g            (STE; only when ste_clip)
//             grad_s_elem = ((inside ? rint(r) - r : below ? -Q_N : Q_P) * g) * grad_scale
// The sum of grad_s_elem over the elements sharing a step size stays in torch (sum_to_size), so its order is
// torch's. The step size is per tensor (s has 1 element) or per row (s has v.size(0) elements, v 2-D).
// Source: Esser et al. 2020, "Learned Step Size Quantization", Eq. (1)-(3).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/contiguous.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kGrain = 1 << 15;

// The per-element arithmetic, shared by the plain LSQ loops and the dropout + LSQ loops below (inlined into each
// loop, so every loop stays one vectorized pass).
// forward: clamp(rint(v / s), lo, hi) * s
__attribute__((always_inline)) inline float fake_quant(float v, float s, float lo, float hi) {
  float q = __builtin_rintf(v / s);
  q = q < lo ? lo : (q > hi ? hi : q);  // NaN passes through, as torch.clamp
  return q * s;
}

// backward at r = v / s for the incoming gradient g: whether v lies outside the range (the STE's zero), and in
// gs (when kGradS) the step size's gradient: (rint(r) - r inside, lo below, hi above) times g, times grad_scale when kScale.
template <bool kRounded, bool kGradS, bool kScale>
__attribute__((always_inline)) inline bool lsq_grad(float r, float g, float lo, float hi, float grad_scale, float& gs) {
  const float rr = __builtin_rintf(r);
  const bool below = kRounded ? (rr < lo) : (r <= lo);
  const bool above = kRounded ? (rr > hi) : (r >= hi);
  if (kGradS) {
    const float ds = above ? hi : (below ? lo : rr - r);
    float t = ds * g;
    if (kScale) t = t * grad_scale;
    gs = t;
  }
  return below || above;
}

// One row (or the whole tensor) with a single step size. The backward loop is templated on every flag, so each
// instantiation is branch-free and vectorizes (a runtime flag inside the loop kept GCC from vectorizing it).
// target_clones: an AVX-512 (x86-64-v4), an AVX2 and a baseline copy, picked at load time by the CPU, so the same build runs on any
// x86-64.
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void fwd_span(const float* __restrict v, float* __restrict out, int64_t n, float s, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) out[i] = fake_quant(v[i], s, lo, hi);
}

template <bool kRounded, bool kGradV, bool kGradS, bool kScale>
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void bwd_loop(const float* __restrict v, const float* __restrict g, float* __restrict gv, float* __restrict gs_elem,
              int64_t n, float s, float lo, float hi, float grad_scale) {
  for (int64_t i = 0; i < n; ++i) {
    float gs = 0.0f;
    const bool clipped = lsq_grad<kRounded, kGradS, kScale>(v[i] / s, g[i], lo, hi, grad_scale, gs);
    if (kGradV) gv[i] = clipped ? 0.0f : g[i];
    if (kGradS) gs_elem[i] = gs;
  }
}

using BwdLoop = void (*)(const float*, const float*, float*, float*, int64_t, float, float, float, float);

template <bool kRounded, bool kGradV>
BwdLoop pick_bwd_gs(bool grad_s, bool scale) {
  if (!grad_s) return &bwd_loop<kRounded, kGradV, false, false>;
  return scale ? &bwd_loop<kRounded, kGradV, true, true> : &bwd_loop<kRounded, kGradV, true, false>;
}

// The instantiation of bwd_loop for these flags.
BwdLoop pick_bwd(bool rounded, bool grad_v, bool grad_s, bool scale) {
  if (rounded) return grad_v ? pick_bwd_gs<true, true>(grad_s, scale) : pick_bwd_gs<true, false>(grad_s, scale);
  return grad_v ? pick_bwd_gs<false, true>(grad_s, scale) : pick_bwd_gs<false, false>(grad_s, scale);
}

// v as the kernel reads it: per tensor, any dense layout (e.g. the transposed Q/K/V views), walked in memory
// order; per row, row-major contiguous.
at::Tensor prepare(const at::Tensor& v, const at::Tensor& s) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat, "kdlsq lsq kernel: v must be a float32 CPU tensor");
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat, "kdlsq lsq kernel: s must be a float32 CPU tensor");
  TORCH_CHECK(s.numel() == 1 || (v.dim() == 2 && s.numel() == v.size(0)),
              "kdlsq lsq kernel: s must have 1 element or one per row of a 2-D v; got ", s.numel(), " for v of shape ",
              v.sizes());
  if (s.numel() == 1 && v.is_non_overlapping_and_dense()) return v;
  return v.contiguous();
}

// Calls fn(begin, end, step) over spans that share one step size.
template <typename F>
void for_spans(const at::Tensor& v, const at::Tensor& s, F fn) {
  const at::Tensor sc = s.contiguous();
  const float* sp = sc.data_ptr<float>();
  if (s.numel() == 1) {
    at::parallel_for(0, v.numel(), kGrain, [&](int64_t b, int64_t e) { fn(b, e, sp[0]); });
  } else {
    const int64_t cols = v.size(1);
    at::parallel_for(0, v.size(0), std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) fn(row * cols, (row + 1) * cols, sp[row]);
    });
  }
}

// out = clamp(rint(v / s), -Q_N, Q_P) * s
at::Tensor lsq_forward(const at::Tensor& v_in, const at::Tensor& s, int64_t q_n, int64_t q_p) {
  const at::Tensor v = prepare(v_in, s);
  at::Tensor out = at::empty_like(v);
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lo = -static_cast<float>(q_n), hi = static_cast<float>(q_p);
  for_spans(v, s, [&](int64_t b, int64_t e, float step) { fwd_span(vp + b, op + b, e - b, step, lo, hi); });
  return out;
}

// (grad_v, grad_s_elem): either may be an empty tensor when not asked for.
std::tuple<at::Tensor, at::Tensor> lsq_backward(const at::Tensor& grad_in, const at::Tensor& v_in,
                                                const at::Tensor& s, int64_t q_n, int64_t q_p, bool rounded_test,
                                                double grad_scale, bool need_grad_v, bool need_grad_s) {
  const at::Tensor v = prepare(v_in, s);
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat && grad_in.sizes() == v.sizes(),
              "kdlsq lsq kernel: grad_out must be float32 of the input's shape");
  // the gradient is read in v's memory order, so it needs v's strides
  const at::Tensor grad_out = grad_in.strides() == v.strides() ? grad_in : at::empty_like(v).copy_(grad_in);
  at::Tensor gv = need_grad_v ? at::empty_like(v) : at::Tensor();
  at::Tensor gs = need_grad_s ? at::empty_like(v) : at::Tensor();
  const float* vp = v.data_ptr<float>();
  const float* g = grad_out.data_ptr<float>();
  float* gvp = need_grad_v ? gv.data_ptr<float>() : nullptr;
  float* gsp = need_grad_s ? gs.data_ptr<float>() : nullptr;
  const float lo = -static_cast<float>(q_n), hi = static_cast<float>(q_p);
  const float scale = static_cast<float>(grad_scale);
  const BwdLoop loop = pick_bwd(rounded_test, need_grad_v, need_grad_s, grad_scale != 1.0);
  for_spans(v, s, [&](int64_t b, int64_t e, float step) {
    loop(vp + b, g + b, gvp ? gvp + b : nullptr, gsp ? gsp + b : nullptr, e - b, step, lo, hi, scale);
  });
  return {gv, gs};
}


// ---- attention probabilities: dropout, then LSQ, without keeping the dropped tensor or the float noise --------
// F.dropout on CPU (ATen _dropout_impl) draws noise = bernoulli(1 - p), divides it by (1 - p) and returns P * noise,
// and autograd keeps that float noise; the quantizer then keeps the dropped tensor and P @ V its fake-quantized copy:
// three float tensors of [B, H, T, T] per layer beside softmax's P. These kernels take the draw b (0 or 1, drawn by
// torch, so the random stream is torch's) and q = float(1 - p): n = b / q (the IEEE division torch makes), v = P * n,
// then LSQ's forward on v, and keep = (b != 0) as one byte. The backward rebuilds n as keep ? 1.0f / q : 0.0f (the
// value b / q takes for b = 1 and b = 0) and v = P * n, so v, the recomputed output and both gradients are
// bit-identical to dropout + fake_quantize + their autograd (tests/test_kernels.py).
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void drop_fwd_span(const float* __restrict p, const float* __restrict b, float* __restrict out, bool* __restrict keep,
                   int64_t n, float q, float s, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = fake_quant(p[i] * (b[i] / q), s, lo, hi);
    keep[i] = b[i] != 0.0f;
  }
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void drop_recompute_span(const float* __restrict p, const bool* __restrict keep, float* __restrict out, int64_t n,
                         float c, float s, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) out[i] = fake_quant(p[i] * (keep[i] ? c : 0.0f), s, lo, hi);
}

// d/dP through the quantizer (STE mask when kSte) and dropout's multiply (grad * noise), and d/ds per element.
template <bool kRounded, bool kSte, bool kGradS, bool kScale>
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void drop_bwd_loop(const float* __restrict p, const bool* __restrict keep, const float* __restrict g, float* __restrict gp,
                   float* __restrict gs_elem, int64_t n, float c, float s, float lo, float hi, float grad_scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float nz = keep[i] ? c : 0.0f;
    float gs = 0.0f;
    const bool clipped = lsq_grad<kRounded, kGradS, kScale>((p[i] * nz) / s, g[i], lo, hi, grad_scale, gs);
    gp[i] = (kSte && clipped ? 0.0f : g[i]) * nz;
    if (kGradS) gs_elem[i] = gs;
  }
}

using DropBwdLoop = void (*)(const float*, const bool*, const float*, float*, float*, int64_t, float, float, float, float,
                             float);

template <bool kRounded, bool kSte>
DropBwdLoop pick_drop_bwd_gs(bool grad_s, bool scale) {
  if (!grad_s) return &drop_bwd_loop<kRounded, kSte, false, false>;
  return scale ? &drop_bwd_loop<kRounded, kSte, true, true> : &drop_bwd_loop<kRounded, kSte, true, false>;
}

DropBwdLoop pick_drop_bwd(bool rounded, bool ste, bool grad_s, bool scale) {
  if (rounded) return ste ? pick_drop_bwd_gs<true, true>(grad_s, scale) : pick_drop_bwd_gs<true, false>(grad_s, scale);
  return ste ? pick_drop_bwd_gs<false, true>(grad_s, scale) : pick_drop_bwd_gs<false, false>(grad_s, scale);
}

void check_drop(const at::Tensor& p, const at::Tensor& other, const at::Tensor& s, at::ScalarType other_type) {
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_contiguous(),
              "kdlsq dropout-lsq kernel: probabilities must be a contiguous float32 CPU tensor");
  TORCH_CHECK(other.scalar_type() == other_type && other.is_contiguous() && other.sizes() == p.sizes(),
              "kdlsq dropout-lsq kernel: the draw / keep mask must be contiguous, of the probabilities' shape and dtype ",
              other_type);
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1, "kdlsq dropout-lsq kernel: one float32 step size");
}

// (fake-quantized dropout(P), keep mask as bool)
std::tuple<at::Tensor, at::Tensor> dropout_lsq_forward(const at::Tensor& p, const at::Tensor& b, double keep_prob,
                                                       const at::Tensor& s, int64_t q_n, int64_t q_p) {
  check_drop(p, b, s, at::kFloat);
  at::Tensor out = at::empty_like(p);
  at::Tensor keep = at::empty_like(p, p.options().dtype(at::kBool));
  const float *pp = p.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  bool* kp = keep.data_ptr<bool>();
  const float q = static_cast<float>(keep_prob), step = s.item<float>();
  const float lo = -static_cast<float>(q_n), hi = static_cast<float>(q_p);
  at::parallel_for(0, p.numel(), kGrain, [&](int64_t i, int64_t e) {
    drop_fwd_span(pp + i, bp + i, op + i, kp + i, e - i, q, step, lo, hi);
  });
  return {out, keep};
}

// the forward's first output again, from P and the keep mask
at::Tensor dropout_lsq_recompute(const at::Tensor& p, const at::Tensor& keep, double keep_prob, const at::Tensor& s,
                                 int64_t q_n, int64_t q_p) {
  check_drop(p, keep, s, at::kBool);
  at::Tensor out = at::empty_like(p);
  const float* pp = p.data_ptr<float>();
  const bool* kp = keep.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float c = 1.0f / static_cast<float>(keep_prob), step = s.item<float>();
  const float lo = -static_cast<float>(q_n), hi = static_cast<float>(q_p);
  at::parallel_for(0, p.numel(), kGrain, [&](int64_t i, int64_t e) {
    drop_recompute_span(pp + i, kp + i, op + i, e - i, c, step, lo, hi);
  });
  return out;
}

// (d/dP, d/ds per element or an empty tensor when not asked for); grad_out: contiguous, of P's shape
std::tuple<at::Tensor, at::Tensor> dropout_lsq_backward(const at::Tensor& grad_out, const at::Tensor& p,
                                                        const at::Tensor& keep, double keep_prob, const at::Tensor& s,
                                                        int64_t q_n, int64_t q_p, bool rounded_test, bool ste_clip,
                                                        double grad_scale, bool need_grad_s) {
  check_drop(p, keep, s, at::kBool);
  check_drop(p, grad_out, s, at::kFloat);
  at::Tensor gp = at::empty_like(p);
  at::Tensor gs = need_grad_s ? at::empty_like(p) : at::Tensor();
  const float *pp = p.data_ptr<float>(), *g = grad_out.data_ptr<float>();
  const bool* kp = keep.data_ptr<bool>();
  float* gpp = gp.data_ptr<float>();
  float* gsp = need_grad_s ? gs.data_ptr<float>() : nullptr;
  const float c = 1.0f / static_cast<float>(keep_prob), step = s.item<float>();
  const float lo = -static_cast<float>(q_n), hi = static_cast<float>(q_p), scale = static_cast<float>(grad_scale);
  const DropBwdLoop loop = pick_drop_bwd(rounded_test, ste_clip, need_grad_s, grad_scale != 1.0);
  at::parallel_for(0, p.numel(), kGrain, [&](int64_t i, int64_t e) {
    loop(pp + i, kp + i, g + i, gpp + i, gsp ? gsp + i : nullptr, e - i, c, step, lo, hi, scale);
  });
  return {gp, gs};
}

}  // namespace

TORCH_LIBRARY(kdlsq, m) {
  m.def("lsq_forward(Tensor v, Tensor s, int q_n, int q_p) -> Tensor");
  m.def("lsq_backward(Tensor grad_out, Tensor v, Tensor s, int q_n, int q_p, bool rounded_test, "
        "float grad_scale, bool need_grad_v, bool need_grad_s) -> (Tensor, Tensor)");
  m.def("dropout_lsq_forward(Tensor p, Tensor b, float keep_prob, Tensor s, int q_n, int q_p) -> (Tensor, Tensor)");
  m.def("dropout_lsq_recompute(Tensor p, Tensor keep, float keep_prob, Tensor s, int q_n, int q_p) -> Tensor");
  m.def("dropout_lsq_backward(Tensor grad_out, Tensor p, Tensor keep, float keep_prob, Tensor s, int q_n, int q_p, "
        "bool rounded_test, bool ste_clip, float grad_scale, bool need_grad_s) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdlsq, CPU, m) {
  m.impl("lsq_forward", &lsq_forward);
  m.impl("lsq_backward", &lsq_backward);
  m.impl("dropout_lsq_forward", &dropout_lsq_forward);
  m.impl("dropout_lsq_recompute", &dropout_lsq_recompute);
  m.impl("dropout_lsq_backward", &dropout_lsq_backward);
}
