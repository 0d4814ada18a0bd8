// Fused integer passes of the integer engine (kdlsq_pl/integer/engine.py), bit-identical to the torch reference
// operators of kdlsq_pl/integer/ops.py (the tests compare them with torch.equal). Integer arithmetic only
// (int64, arithmetic shifts, floor divisions); each op is one pass where the reference makes five to twenty.
// Source: Kim et al., I-BERT (ICML 2021), Algorithms 1-4; METHODS.md section 3.
//
//   requant            out = clamp(shift_round((x + bias[c]) * m[c], e[c]), lo, hi), int8 or int64 out
//   softmax_requant    I-BERT's i-softmax of one row of int32 scores (keys masked by a [B, T] mask), then the
//                      probability quantizer's requantization, int8 out
//   gelu_requant       requant to the GELU scale, i-GELU, requant onto the next Linear's input grid, int8 out
//   residual_layernorm clamp(requant(a + bias) + requant(h)) then the integer LayerNorm, int64 out
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

inline int64_t shift_round(int64_t v, int64_t e) {
  return e > 0 ? (v + (int64_t(1) << (e - 1))) >> e : v << (-e);
}

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0, Python's // for either sign of a
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

int64_t isqrt_newton(int64_t n) {  // kdlsq_pl.integer.ops.int_sqrt, element by element
  if (n == 0) return 0;
  int64_t bitlen = 0;
  for (int k = 0; k < 63; ++k) bitlen += n >= (int64_t(1) << k);
  int64_t x = int64_t(1) << ((bitlen + 1) >> 1);
  while (true) {
    const int64_t y = (x + n / std::max<int64_t>(x, 1)) >> 1;
    if (y >= x) return x;
    x = y;
  }
}

// x: [N, C] int64 or int32 (contiguous); bias: [C] int64 or undefined; m, e: [C] or [1] int64.
at::Tensor requant(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& m, const at::Tensor& e,
                   int64_t lo, int64_t hi, bool int8_out) {
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kLong || x.scalar_type() == at::kInt), "requant: contiguous int64/int32 x");
  const int64_t C = x.size(-1), N = x.numel() / std::max<int64_t>(C, 1);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(int8_out ? at::kChar : at::kLong));
  const int64_t* mp = m.data_ptr<int64_t>();
  const int64_t* ep = e.data_ptr<int64_t>();
  const bool per_c = m.numel() > 1;
  const int64_t* bp = bias.has_value() && bias->defined() ? bias->data_ptr<int64_t>() : nullptr;
  const bool is64 = x.scalar_type() == at::kLong;
  const int64_t* x64 = is64 ? x.data_ptr<int64_t>() : nullptr;
  const int32_t* x32 = is64 ? nullptr : x.data_ptr<int32_t>();
  int8_t* o8 = int8_out ? out.data_ptr<int8_t>() : nullptr;
  int64_t* o64 = int8_out ? nullptr : out.data_ptr<int64_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t r = b0; r < b1; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = r * C + c;
        int64_t v = is64 ? x64[i] : int64_t(x32[i]);
        if (bp) v += bp[c];
        const int64_t k = per_c ? c : 0;
        v = clamp64(shift_round(v * mp[k], ep[k]), lo, hi);
        if (int8_out) o8[i] = int8_t(v); else o64[i] = v;
      }
    }
  });
  return out;
}

// scores: [B, H, T, Tk] int32 contiguous; mask: [B, Tk] bool (true = attend).
at::Tensor softmax_requant(const at::Tensor& scores, const at::Tensor& mask, int64_t x0, int64_t b_int, int64_t c_int,
                           int64_t widen, int64_t out_bits, int64_t n_clamp, int64_t m, int64_t e, int64_t lo, int64_t hi) {
  TORCH_CHECK(scores.is_contiguous() && scores.scalar_type() == at::kInt && scores.dim() == 4, "softmax_requant: [B,H,T,T] int32");
  TORCH_CHECK(mask.is_contiguous() && mask.scalar_type() == at::kBool, "softmax_requant: bool mask [B, T]");
  const int64_t B = scores.size(0), Tk = scores.size(3), rows = scores.numel() / Tk;
  const int64_t rows_per_b = rows / B;
  at::Tensor out = at::empty(scores.sizes(), scores.options().dtype(at::kChar));
  const int32_t* s = scores.data_ptr<int32_t>();
  const bool* mk = mask.data_ptr<bool>();
  int8_t* o = out.data_ptr<int8_t>();
  const int64_t masked_value = std::numeric_limits<int64_t>::min() / 4;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(Tk, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> ex(Tk);
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t* row = s + r * Tk;
      const bool* vis = mk + (r / rows_per_b) * Tk;
      int64_t mx = std::numeric_limits<int64_t>::min();
      for (int64_t j = 0; j < Tk; ++j) mx = std::max(mx, vis[j] ? int64_t(row[j]) : masked_value);
      int64_t total = 0;
      for (int64_t j = 0; j < Tk; ++j) {
        if (!vis[j]) { ex[j] = 0; continue; }
        int64_t x = std::max(int64_t(row[j]) - mx, n_clamp * x0);
        const int64_t z = x / x0;  // both <= 0 / < 0: truncation is floor
        const int64_t p = x - z * x0;
        const int64_t v = (((p + b_int) * (p + b_int) + c_int) << widen) >> z;
        ex[j] = v;
        total += v;
      }
      total = std::max<int64_t>(total, 1);
      for (int64_t j = 0; j < Tk; ++j) {
        const int64_t prob = (ex[j] << out_bits) / total;
        o[r * Tk + j] = int8_t(clamp64(shift_round(prob * m, e), lo, hi));
      }
    }
  });
  return out;
}

// acc: [N, C] int32 (the Linear's int32 products); bias [C]; (gm, ge) [C]: onto the GELU scale, clamped to +-g_clamp;
// i-GELU constants; (nm, ne) scalar: onto the next Linear's input grid, clamped to [lo, hi]; int8 out.
at::Tensor gelu_requant(const at::Tensor& acc, const at::Tensor& bias, const at::Tensor& gm, const at::Tensor& ge, int64_t g_clamp,
                        int64_t b_int, int64_t c_int, int64_t shift, int64_t one, int64_t nm, int64_t ne, int64_t lo, int64_t hi) {
  TORCH_CHECK(acc.is_contiguous() && acc.scalar_type() == at::kInt, "gelu_requant: contiguous int32 acc");
  const int64_t C = acc.size(-1), N = acc.numel() / C;
  at::Tensor out = at::empty(acc.sizes(), acc.options().dtype(at::kChar));
  const int32_t* a = acc.data_ptr<int32_t>();
  const int64_t* bp = bias.data_ptr<int64_t>();
  const int64_t* mp = gm.data_ptr<int64_t>();
  const int64_t* ep = ge.data_ptr<int64_t>();
  const bool per_c = gm.numel() > 1;
  int8_t* o = out.data_ptr<int8_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = r * C + c, k = per_c ? c : 0;
        const int64_t q = clamp64(shift_round((int64_t(a[i]) + bp[c]) * mp[k], ep[k]), -g_clamp, g_clamp);
        const int64_t aq = q < 0 ? -q : q;
        const int64_t clipped = std::min(aq, -b_int);
        const int64_t sg = (q > 0) - (q < 0);
        const int64_t y = (sg * ((clipped + b_int) * (clipped + b_int) + c_int)) >> shift;
        const int64_t g = -q * (y + one);
        o[i] = int8_t(clamp64(shift_round(g * nm, ne), lo, hi));
      }
    }
  });
  return out;
}

// a: [N, C] int32 products of the Linear before the residual, with bias [C] and (am, ae) [C] onto the residual scale;
// h: [N, C] int64 residual input with scalar (hm, he); clamp; then LayerNorm with gamma_int, beta_int [C], NORM_BITS
// and scalar (lm, le) onto the output scale. int64 out.
at::Tensor residual_layernorm(const at::Tensor& a, const at::Tensor& bias, const at::Tensor& am, const at::Tensor& ae,
                              const at::Tensor& h, int64_t hm, int64_t he, int64_t res_clamp, const at::Tensor& gamma,
                              const at::Tensor& beta, int64_t norm_bits, int64_t lm, int64_t le) {
  TORCH_CHECK(a.is_contiguous() && a.scalar_type() == at::kInt && h.is_contiguous() && h.scalar_type() == at::kLong,
              "residual_layernorm: contiguous int32 a and int64 h");
  const int64_t C = a.size(-1), N = a.numel() / C;
  at::Tensor out = at::empty(h.sizes(), h.options());
  const int32_t* ap = a.data_ptr<int32_t>();
  const int64_t* hp = h.data_ptr<int64_t>();
  const int64_t *bp = bias.data_ptr<int64_t>(), *mp = am.data_ptr<int64_t>(), *ep = ae.data_ptr<int64_t>();
  const int64_t *gp = gamma.data_ptr<int64_t>(), *btp = beta.data_ptr<int64_t>();
  const bool per_c = am.numel() > 1;
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / C), [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> res(C);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t total = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = r * C + c, k = per_c ? c : 0;
        const int64_t v = shift_round((int64_t(ap[i]) + bp[c]) * mp[k], ep[k]) + shift_round(hp[i] * hm, he);
        res[c] = clamp64(v, -res_clamp, res_clamp);
        total += res[c];
      }
      const int64_t mean = floor_div(2 * total + C, 2 * C);
      int64_t sq = 0;
      for (int64_t c = 0; c < C; ++c) { res[c] -= mean; sq += res[c] * res[c]; }
      const int64_t stdv = std::max<int64_t>(isqrt_newton(sq / C), 1);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t y_hat = floor_div(res[c] << norm_bits, stdv);
        o[r * C + c] = shift_round(y_hat * gp[c] * lm, le) + btp[c];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdlsq, m) {
  m.def("int_requant(Tensor x, Tensor? bias, Tensor m, Tensor e, int lo, int hi, bool int8_out) -> Tensor");
  m.def("int_softmax_requant(Tensor scores, Tensor mask, int x0, int b_int, int c_int, int widen, int out_bits, int n_clamp, "
        "int m, int e, int lo, int hi) -> Tensor");
  m.def("int_gelu_requant(Tensor acc, Tensor bias, Tensor gm, Tensor ge, int g_clamp, int b_int, int c_int, int shift, int one, "
        "int nm, int ne, int lo, int hi) -> Tensor");
  m.def("int_residual_layernorm(Tensor a, Tensor bias, Tensor am, Tensor ae, Tensor h, int hm, int he, int res_clamp, "
        "Tensor gamma, Tensor beta, int norm_bits, int lm, int le) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdlsq, CPU, m) {
  m.impl("int_requant", &requant);
  m.impl("int_softmax_requant", &softmax_requant);
  m.impl("int_gelu_requant", &gelu_requant);
  m.impl("int_residual_layernorm", &residual_layernorm);
}
