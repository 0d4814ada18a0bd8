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

// One row (or the whole tensor) with a single step size. The backward loop is templated on every flag, so each
// instantiation is branch-free and vectorizes (a runtime flag inside the loop kept GCC from vectorizing it).
// target_clones: an AVX-512 (x86-64-v4), an AVX2 and a baseline copy, picked at load time by the CPU, so the same build runs on any
// x86-64.
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void fwd_span(const float* __restrict v, float* __restrict out, int64_t n, float s, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) {
    const float r = v[i] / s;
    float q = __builtin_rintf(r);
    q = q < lo ? lo : (q > hi ? hi : q);  // NaN passes through, as torch.clamp
    out[i] = q * s;
  }
}

template <bool kRounded, bool kGradV, bool kGradS, bool kScale>
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void bwd_loop(const float* __restrict v, const float* __restrict g, float* __restrict gv, float* __restrict gs_elem,
              int64_t n, float s, float lo, float hi, float grad_scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float r = v[i] / s;
    const float rr = __builtin_rintf(r);
    const bool below = kRounded ? (rr < lo) : (r <= lo);
    const bool above = kRounded ? (rr > hi) : (r >= hi);
    if (kGradV) gv[i] = (below || above) ? 0.0f : g[i];
    if (kGradS) {
      const float ds = above ? hi : (below ? lo : rr - r);
      float t = ds * g[i];
      if (kScale) t = t * grad_scale;
      gs_elem[i] = t;
    }
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

}  // namespace

TORCH_LIBRARY(kdlsq, m) {
  m.def("lsq_forward(Tensor v, Tensor s, int q_n, int q_p) -> Tensor");
  m.def("lsq_backward(Tensor grad_out, Tensor v, Tensor s, int q_n, int q_p, bool rounded_test, "
        "float grad_scale, bool need_grad_v, bool need_grad_s) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdlsq, CPU, m) {
  m.impl("lsq_forward", &lsq_forward);
  m.impl("lsq_backward", &lsq_backward);
}
