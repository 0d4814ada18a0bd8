// Fused integer passes of the integer engine (kdlsq_pl/integer/engine.py), bit-identical to the torch reference
// operators of kdlsq_pl/integer/ops.py (the tests compare them with torch.equal). Integer arithmetic only
// (int64, arithmetic shifts, floor divisions); each op is one pass where the reference makes five to twenty.
// Source: Kim et al., I-BERT (ICML 2021), Algorithms 1-4; METHODS.md section 3.
//
//   requant            out = clamp(shift_round((x + bias[c]) * m[c], e[c]), lo, hi), int8 or int64 out
//   requant_split      requant of int32 rows to int8, their column blocks into separate tensors (one q/k/v product)
//   softmax_requant    I-BERT's i-softmax of one row of int32 scores (keys masked by a [B, T] mask), then the
//                      probability quantizer's requantization, int8 out
//   attention          per (example, group of heads) q k^T and p v on int8 codes by oneDNN's matmul primitive with
//                      softmax_requant's rows between them, the context requantized onto the output Linear's input
//                      grid, int8 out
//   gelu_requant       requant to the GELU scale, i-GELU, requant onto the next Linear's input grid, int8 out
//   residual_layernorm clamp(requant(a + bias) + requant(h)) then the integer LayerNorm, int32 out (|out| < 2^20),
//                      and optionally the int8 codes of that output on the grids of the Linears that read it
//   embedding          the integer embedding sum (word + position + token type rows, clamped), int32 out
//   tanh               the pooler's tanh as 2 sigmoid(2x) - 1, the sigmoid a two-way i-softmax, int64 out
//   PackedS8           a Linear's int8 weights packed once for oneDNN's matmul primitive; mm(x8) -> int32 x8 @ w
// oneDNN is the libdnnl.so.3 of the PyPI wheel onednn-cpu-gomp (oneDNN 3.2, GNU OpenMP: torch's libgomp, found by
// soname), compiled against the oneDNN 3.x C++ header torch ships (oneDNN keeps its C ABI within a major version);
// the products are exact (int32 accumulation of int8 x int8), the same integers as torch._int_mm.
// Each op writes into ``out`` when one is given (contiguous, the exact shape and dtype; not aliasing an input),
// else into a new tensor. The hot rows have two forms giving the same integers: loops the compiler vectorizes (the
// target_clones copies), and hand-written AVX-512 rows where the CPU has AVX-512 and the operands of a product
// provably fit 32 bits, so that each 64-bit product is one vpmuldq / vpmuludq instead of vpmullq (three micro-ops
// on Intel), and as few micro-ops as the integers allow (512-bit integer work issues on two ports); set_simd(false)
// keeps the first form only (the tests run both).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dnnl.hpp"

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

inline int64_t shift_round(int64_t v, int64_t e) {
  return e > 0 ? (v + (int64_t(1) << (e - 1))) >> e : v << (-e);
}

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0, Python's // for either sign of a
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Division by a divisor fixed for many dividends, without a division instruction (a 64-bit idiv costs 40-90 cycles):
// q0 = (n * R) >> 64 with R = floor((2^64 - 1) / d) is q or q - 1 for every n < 2^63, so one compare corrects it.
// Exact: equal to n / d for every unsigned n < 2^63 (tests compare the kernels with torch's // on real batches).
struct Reciprocal {
  uint64_t d, R;
  explicit Reciprocal(uint64_t divisor) : d(divisor), R(~uint64_t(0) / divisor) {}
  inline uint64_t div(uint64_t n) const {  // n < 2^63
    uint64_t q = uint64_t((unsigned __int128)n * R >> 64);
    return q + (n - q * d >= d);
  }
  inline int64_t floor_div(int64_t a) const {  // Python's a // d for either sign of a, |a| < 2^62
    return a >= 0 ? int64_t(div(uint64_t(a))) : -int64_t(div(uint64_t(-a) + d - 1));
  }
};

// Whether the hand-vectorized AVX-512 rows may run (where the CPU has AVX-512); off: the compiler-vectorized rows
// only (the tests compare both; kdlsq::set_simd).
std::atomic<bool> g_simd{true};
inline bool simd_allowed() { return g_simd.load(std::memory_order_relaxed); }

#if defined(__x86_64__)
#define KDLSQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
}

// The lanes of the 8-wide block at j that lie inside a row of C.
KDLSQ_AVX512 inline __mmask8 tail8(int64_t C, int64_t j) {
  return C - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (C - j)) - 1);
}

// ((x + bias) m + half) >> rs << ls for the 8 int32 x at j (per channel m < 2^31, bmh = Dyadic::folded_half), int64
// lanes; one vpmuldq for the product. Lanes outside ``tail`` read 0. ls may be null: every left shift is 0 (the usual
// case, a multiplier that needs a right shift), and the row skips it: 512-bit shifts and multiplies share one port.
KDLSQ_AVX512 inline __m512i requant8(const int32_t* x, const int64_t* bmh, const int64_t* m, const int64_t* rs, const int64_t* ls,
                                     int64_t j, __mmask8 tail) {
  const __m512i x8 = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(tail, x + j));
  const __m512i v = _mm512_add_epi64(_mm512_mul_epi32(x8, _mm512_maskz_loadu_epi64(tail, m + j)), _mm512_maskz_loadu_epi64(tail, bmh + j));
  const __m512i r = _mm512_srav_epi64(v, _mm512_maskz_loadu_epi64(tail, rs + j));
  return ls == nullptr ? r : _mm512_sllv_epi64(r, _mm512_maskz_loadu_epi64(tail, ls + j));
}

// v << s, skipped where s is 0 (a per-call constant: the branch is always taken the same way).
KDLSQ_AVX512 inline __m512i shl_if(__m512i v, int64_t s) {
  return s == 0 ? v : _mm512_sll_epi64(v, _mm_cvtsi64_si128(s));
}

// v clamped to [lo, hi] as 8 int8 codes, for -128 <= lo and hi <= 127 (every caller checks it): a bound at -128 or 127
// is the saturating conversion's own, so its compare is skipped (512-bit integer work issues on two ports only).
// vlo, vhi: lo and hi broadcast (hoisted out of the caller's loop); the branches are per-call constants.
KDLSQ_AVX512 inline __m128i to_codes(__m512i v, __m512i vlo, __m512i vhi, int64_t lo, int64_t hi) {
  if (lo > -128) v = _mm512_max_epi64(v, vlo);
  if (hi < 127) v = _mm512_min_epi64(v, vhi);
  return _mm512_cvtsepi64_epi8(v);
}
#endif

inline int64_t bit_length(int64_t v) {  // v >= 0; Python's int.bit_length
  return v == 0 ? 0 : 64 - __builtin_clzll(uint64_t(v));
}

// Branch-free dyadic requantization: shift_round(v * m, e) == ((v * m + half) >> rs) << ls with half = 2^(e-1),
// rs = e for e > 0 and half = rs = 0, ls = -e otherwise (precomputed per channel), so the loops vectorize
// (AVX-512 has 64-bit multiplies and variable arithmetic shifts; the clones pick it at load time).
struct Dyadic {
  std::vector<int64_t> m, half, rs, ls;
  bool per_c;
  // channels > 0: a single (m, e) is repeated to that many channels, so the loops index every array by channel.
  Dyadic(const at::Tensor& mt, const at::Tensor& et, int64_t channels = 0)
      : Dyadic(mt.data_ptr<int64_t>(), et.data_ptr<int64_t>(), mt.numel(), channels) {}
  Dyadic(const int64_t* mp, const int64_t* ep, int64_t n, int64_t channels) {
    per_c = n > 1;
    const int64_t count = n == 1 && channels > 0 ? channels : n;
    for (auto* v : {&m, &half, &rs, &ls}) v->reserve(size_t(count));
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = n == 1 ? 0 : j;
      m.push_back(mp[i]);
      half.push_back(ep[i] > 0 ? (int64_t(1) << (ep[i] - 1)) : 0);
      rs.push_back(std::max<int64_t>(ep[i], 0));
      ls.push_back(std::max<int64_t>(-ep[i], 0));
    }
  }
  // The left shifts, or null where every one is 0 (requant8 then skips them).
  const int64_t* ls_or_null() const {
    for (int64_t v : ls)
      if (v != 0) return ls.data();
    return nullptr;
  }
  // Every multiplier below 2^31 (and not negative): a * m is then one signed 32 x 32 -> 64-bit product for int32 a.
  bool m_fits_31() const {
    for (int64_t v : m)
      if (v < 0 || v >= (int64_t(1) << 31)) return false;
    return true;
  }
  // bias[c] * m[c] + half[c] per channel (bias may be null), in wrapping int64: (a + bias) m + half is a m plus this,
  // the same int64 sum, so the AVX-512 rows multiply only a.
  std::vector<int64_t> folded_half(const int64_t* bias) const {
    std::vector<int64_t> out(m.size());
    for (size_t c = 0; c < m.size(); ++c) out[c] = int64_t(uint64_t(bias ? bias[c] : 0) * uint64_t(m[c]) + uint64_t(half[c]));
    return out;
  }
};

#define KDLSQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))

template <typename In, typename Out>
KDLSQ_CLONES void requant_row_c(const In* __restrict x, const int64_t* __restrict bias, const int64_t* __restrict m,
                                const int64_t* __restrict half, const int64_t* __restrict rs, const int64_t* __restrict ls,
                                Out* __restrict out, int64_t C, int64_t lo, int64_t hi) {
  for (int64_t c = 0; c < C; ++c) {
    int64_t v = int64_t(x[c]) + (bias ? bias[c] : 0);
    v = ((v * m[c] + half[c]) >> rs[c]) << ls[c];
    out[c] = Out(v < lo ? lo : (v > hi ? hi : v));
  }
}

template <typename In, typename Out>
KDLSQ_CLONES void requant_row_s(const In* __restrict x, const int64_t* __restrict bias, int64_t m, int64_t half, int64_t rs,
                                int64_t ls, Out* __restrict out, int64_t C, int64_t lo, int64_t hi) {
  for (int64_t c = 0; c < C; ++c) {
    int64_t v = int64_t(x[c]) + (bias ? bias[c] : 0);
    v = ((v * m + half) >> rs) << ls;
    out[c] = Out(v < lo ? lo : (v > hi ? hi : v));
  }
}

// I-BERT's i-exp of one row (Algorithm 2): x = max(s - max, n_clamp x0), z = x / x0, p = x - z x0,
// e = (((p + b)^2 + c) << widen) >> z; masked keys give 0. Returns the row's sum. Branch-free, so it vectorizes.
KDLSQ_CLONES int64_t exp_row(const int32_t* __restrict row, const bool* __restrict vis, int64_t* __restrict ex, int64_t T,
                             int64_t mx, int64_t floor_x, int64_t d0, uint64_t R, int64_t b_int, int64_t c_int, int64_t widen) {
  int64_t total = 0;
  for (int64_t j = 0; j < T; ++j) {
    const int64_t diff = int64_t(row[j]) - mx;
    const int64_t x = diff > floor_x ? diff : floor_x;
    const uint64_t n = uint64_t(-x);
    uint64_t z = (n * R) >> 32;
    z += (n - z * uint64_t(d0)) >= uint64_t(d0);
    const int64_t p = x + int64_t(z) * d0;
    const int64_t keep = -int64_t(vis[j]);  // all ones, or 0 for a masked key
    const int64_t v = ((((p + b_int) * (p + b_int) + c_int) << widen) >> int64_t(z)) & keep;
    ex[j] = v;
    total += v;
  }
  return total;
}

KDLSQ_CLONES void normalise_row(const int64_t* __restrict ex, int8_t* __restrict o, int64_t T, int64_t down, int64_t factor,
                                int64_t out_shift, int64_t m, int64_t half, int64_t rs, int64_t ls, int64_t lo, int64_t hi) {
  for (int64_t j = 0; j < T; ++j) {
    const int64_t prob = ((ex[j] >> down) * factor) >> out_shift;
    const int64_t v = ((prob * m + half) >> rs) << ls;
    o[j] = int8_t(v < lo ? lo : (v > hi ? hi : v));
  }
}

// The largest score over a row's visible keys, or masked_value where none is visible (the reference's max after
// masked keys become masked_value). In int32 lanes (16 per AVX-512 vector): the int64 form did not vectorize.
KDLSQ_CLONES int64_t row_max(const int32_t* __restrict row, const bool* __restrict vis, int64_t T, int64_t masked_value) {
  int32_t mx = std::numeric_limits<int32_t>::min();
  int32_t any = 0;
  for (int64_t j = 0; j < T; ++j) {
    const int32_t keep = -int32_t(vis[j]);  // all ones, or 0 for a masked key
    const int32_t x = (row[j] & keep) | (std::numeric_limits<int32_t>::min() & ~keep);
    mx = mx > x ? mx : x;
    any |= keep;
  }
  return any ? int64_t(mx) : masked_value;
}

int64_t isqrt_newton(int64_t n) {  // kdlsq_pl.integer.ops.int_sqrt, element by element
  if (n == 0) return 0;
  int64_t x = int64_t(1) << ((bit_length(n) + 1) >> 1);
  while (true) {
    const int64_t y = (x + n / std::max<int64_t>(x, 1)) >> 1;
    if (y >= x) return x;
    x = y;
  }
}

// The op's output: ``out`` when given (the engine's reused workspace: a buffer written again each call stays in
// cache, where a fresh allocation costs a trip to memory), else a new tensor. ``out`` must match exactly.
at::Tensor output(const std::optional<at::Tensor>& out, at::IntArrayRef sizes, const at::TensorOptions& options, const char* op) {
  if (!out.has_value() || !out->defined()) return at::empty(sizes, options);
  TORCH_CHECK(out->sizes() == sizes && out->scalar_type() == options.dtype().toScalarType() && out->is_contiguous(),
              op, ": out must be a contiguous ", options.dtype().name(), " tensor of shape ", sizes, "; got ", out->sizes(), " ",
              out->scalar_type());
  return *out;
}

#if defined(__x86_64__)
// requant_row_c for int32 in and int8 out in AVX-512: (x + bias) m + half as x m (vpmuldq: x int32, 0 <= m < 2^31)
// plus bias m + half folded per channel (bmh), the same int64 sum; then the shifts and the clamp (to_codes).
KDLSQ_AVX512 void requant_row_avx512(const int32_t* x, const int64_t* bmh, const int64_t* m, const int64_t* rs, const int64_t* ls,
                                     int8_t* out, int64_t C, int64_t lo, int64_t hi) {
  const __m512i vlo = _mm512_set1_epi64(lo), vhi = _mm512_set1_epi64(hi);
  for (int64_t j = 0; j < C; j += 8) {
    const __mmask8 tail = tail8(C, j);
    _mm_mask_storeu_epi8(out + j, tail, to_codes(requant8(x, bmh, m, rs, ls, j, tail), vlo, vhi, lo, hi));
  }
}
#endif

// Requantization of int32 rows [N, C] to int8 codes with per-channel (bias, m, e) (a Dyadic of C channels): the AVX-512
// rows where the CPU has them and every m is below 2^31, else the compiler-vectorized rows; the same integers. The
// columns go to outs.size() contiguous [N, C / outs.size()] blocks in turn (one: the whole [N, C] rows).
void requant_rows_int8(const int32_t* x, const int64_t* bias, const Dyadic& dy, const std::vector<int8_t*>& outs, int64_t N,
                       int64_t C, int64_t lo, int64_t hi) {
  const int64_t k = int64_t(outs.size()), Cb = C / k, grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
#if defined(__x86_64__)
  if (simd_allowed() && has_avx512() && dy.m_fits_31() && lo >= -128 && hi <= 127) {
    const std::vector<int64_t> bmh = dy.folded_half(bias);
    const int64_t* ls = dy.ls_or_null();
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0, c = 0; j < k; ++j, c += Cb)
          requant_row_avx512(x + r * C + c, bmh.data() + c, dy.m.data() + c, dy.rs.data() + c, ls ? ls + c : nullptr,
                             outs[j] + r * Cb, Cb, lo, hi);
    });
    return;
  }
#endif
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0, c = 0; j < k; ++j, c += Cb)
        requant_row_c(x + r * C + c, bias ? bias + c : nullptr, dy.m.data() + c, dy.half.data() + c, dy.rs.data() + c,
                      dy.ls.data() + c, outs[j] + r * Cb, Cb, lo, hi);
  });
}

// x: [N, C] int64 or int32 (contiguous); bias: [C] int64 or undefined; m, e: [C] or [1] int64.
at::Tensor requant(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& m, const at::Tensor& e,
                   int64_t lo, int64_t hi, bool int8_out, const std::optional<at::Tensor>& out_opt) {
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kLong || x.scalar_type() == at::kInt), "requant: contiguous int64/int32 x");
  TORCH_CHECK(lo <= hi, "int_requant: lo = ", lo, " > hi = ", hi);
  const int64_t C = x.size(-1), N = x.numel() / std::max<int64_t>(C, 1);
  at::Tensor out = output(out_opt, x.sizes(), x.options().dtype(int8_out ? at::kChar : at::kLong), "int_requant");
  const Dyadic d(m, e);
  const int64_t* bp = bias.has_value() && bias->defined() ? bias->data_ptr<int64_t>() : nullptr;
  auto run = [&](auto* xp, auto* op) {
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t r = b0; r < b1; ++r) {
        if (d.per_c)
          requant_row_c(xp + r * C, bp, d.m.data(), d.half.data(), d.rs.data(), d.ls.data(), op + r * C, C, lo, hi);
        else
          requant_row_s(xp + r * C, bp, d.m[0], d.half[0], d.rs[0], d.ls[0], op + r * C, C, lo, hi);
      }
    });
  };
  const bool is64 = x.scalar_type() == at::kLong;
  if (is64 && int8_out) run(x.data_ptr<int64_t>(), out.data_ptr<int8_t>());
  else if (is64) run(x.data_ptr<int64_t>(), out.data_ptr<int64_t>());
  else if (int8_out) requant_rows_int8(x.data_ptr<int32_t>(), bp, Dyadic(m, e, C), {out.data_ptr<int8_t>()}, N, C, lo, hi);
  else run(x.data_ptr<int32_t>(), out.data_ptr<int64_t>());
  return out;
}

// tanh by I-BERT's sigmoid: 2 softmax([x, 0])[0] - 2^out_bits for each int64 x (the scale of x halved: the caller's
// constants are i-softmax's for 2 s), on the scale 2^-out_bits, the same integers as ops.IntSoftmax on the pair
// (max over the pair, exp by z ln2 + p and the polynomial, I-BERT's one-division normalisation). x: any shape,
// contiguous int64; returns int64 of that shape.
at::Tensor tanh_pair(const at::Tensor& x, int64_t x0, int64_t b_int, int64_t c_int, int64_t widen, int64_t out_bits,
                     int64_t n_clamp, int64_t sum_bits, int64_t num_bits) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kLong, "int_tanh: contiguous int64 x");
  TORCH_CHECK(x0 < 0 && widen >= 0 && widen < 63 && out_bits >= 0 && out_bits <= num_bits && num_bits < 63 && sum_bits >= 0,
              "int_tanh: x0 = ", x0, ", widen = ", widen, ", out_bits = ", out_bits, ", num_bits = ", num_bits, ", sum_bits = ",
              sum_bits, "; allowed: x0 < 0, 0 <= widen < 63, 0 <= out_bits <= num_bits < 63, sum_bits >= 0");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t* xp = x.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t floor_x = n_clamp * x0;
  auto i_exp = [&](int64_t diff) {  // diff <= 0
    const int64_t v = std::max(diff, floor_x), z = v / x0, p = v - z * x0;  // z >= 0: truncation is floor
    return (((p + b_int) * (p + b_int) + c_int) << widen) >> z;
  };
  for (int64_t j = 0; j < x.numel(); ++j) {
    const int64_t mx = std::max<int64_t>(xp[j], 0), e0 = i_exp(xp[j] - mx), e1 = i_exp(-mx);
    const int64_t total = std::max<int64_t>(e0 + e1, 1), down = std::max<int64_t>(bit_length(total) - sum_bits, 0);
    const int64_t factor = (int64_t(1) << num_bits) / (total >> down);
    o[j] = 2 * (((e0 >> down) * factor) >> (num_bits - out_bits)) - (int64_t(1) << out_bits);
  }
  return out;
}

// int_requant of int32 x [N, k C] onto int8 codes, the k column blocks of C into the k contiguous outs [N, C]: one
// product of k Linears side by side (the query, key and value) onto each one's codes.
void requant_split(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& m, const at::Tensor& e,
                   int64_t lo, int64_t hi, at::TensorList outs) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kInt && x.dim() == 2, "int_requant_split: contiguous int32 x [N, C]");
  TORCH_CHECK(lo <= hi, "int_requant_split: lo = ", lo, " > hi = ", hi);
  const int64_t N = x.size(0), C = x.size(1), k = int64_t(outs.size());
  TORCH_CHECK(k >= 1 && C % k == 0, "int_requant_split: ", C, " columns do not split into ", k, " blocks");
  std::vector<int8_t*> ptrs;
  for (const at::Tensor& o : outs) {
    TORCH_CHECK(o.is_contiguous() && o.scalar_type() == at::kChar && o.dim() == 2 && o.size(0) == N && o.size(1) == C / k,
                "int_requant_split: each out must be a contiguous int8 tensor of shape [", N, ", ", C / k, "]");
    ptrs.push_back(o.data_ptr<int8_t>());
  }
  const int64_t* bp = bias.has_value() && bias->defined() ? bias->data_ptr<int64_t>() : nullptr;
  requant_rows_int8(x.data_ptr<int32_t>(), bp, Dyadic(m, e, C), ptrs, N, C, lo, hi);
}

#if defined(__x86_64__)

// exp_row in AVX-512 (8 int64 lanes), the same integers: its three products have 32-bit operands (n = -x < 2^32 and
// R < 2^32; z <= n_clamp and d0 < 2^32; 0 <= p + b_int < 2^32, checked by the caller), so each is one unsigned
// 32 x 32 -> 64-bit multiply (vpmuludq) where the compiler's loop used the 64-bit vpmullq (three micro-ops on Intel).
// p = x + z d0 is minus the division's remainder n - z d0, which the quotient's correction computes anyway.
KDLSQ_AVX512 int64_t exp_row_avx512(const int32_t* row, const bool* vis, int64_t* ex, int64_t T, int64_t mx, int64_t floor_x,
                                    int64_t d0, uint64_t R, int64_t b_int, int64_t c_int, int64_t widen) {
  const __m512i vmx = _mm512_set1_epi64(mx), vnfloor = _mm512_set1_epi64(-floor_x), vd0 = _mm512_set1_epi64(d0),
                vR = _mm512_set1_epi64(int64_t(R)), vb = _mm512_set1_epi64(b_int), vc = _mm512_set1_epi64(c_int),
                one = _mm512_set1_epi64(1), zero = _mm512_setzero_si512();
  const __m128i vwiden = _mm_cvtsi64_si128(widen);
  __m512i acc = zero;
  for (int64_t j = 0; j < T; j += 8) {
    const __mmask8 tail = tail8(T, j);
    const __m512i sc = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(tail, row + j));
    const __m512i n = _mm512_min_epi64(_mm512_sub_epi64(vmx, sc), vnfloor);  // -x, x = max(s - mx, floor_x)
    __m512i z = _mm512_srli_epi64(_mm512_mul_epu32(n, vR), 32);
    __m512i r = _mm512_sub_epi64(n, _mm512_mul_epu32(z, vd0));  // n - z d0, in [0, 2 d0)
    const __mmask8 short_by_one = _mm512_cmpge_epu64_mask(r, vd0);
    z = _mm512_mask_add_epi64(z, short_by_one, z, one);
    r = _mm512_mask_sub_epi64(r, short_by_one, r, vd0);
    const __m512i t = _mm512_sub_epi64(vb, r);  // p + b_int, with p = x + z d0 = -r
    const __m128i vb8 = _mm_maskz_loadu_epi8(tail, vis + j);
    const __mmask8 keep = __mmask8(_mm_test_epi8_mask(vb8, vb8)) & tail;
    __m512i e = _mm512_maskz_add_epi64(keep, _mm512_mul_epu32(t, t), vc);  // 0 for a masked key (0 << widen >> z is 0)
    e = _mm512_srav_epi64(_mm512_sll_epi64(e, vwiden), z);
    _mm512_mask_storeu_epi64(ex + j, tail, e);
    acc = _mm512_add_epi64(acc, e);
  }
  return _mm512_reduce_add_epi64(acc);
}

// normalise_row in AVX-512: (ex >> down) < 2^32, factor < 2^32 and prob < 2^31 (checked by the caller), so both
// products are single vpmuludq; the same integers. The code is never negative (prob, m, half >= 0), so a lo <= 0
// cannot bind and to_codes skips it.
KDLSQ_AVX512 void normalise_row_avx512(const int64_t* ex, int8_t* o, int64_t T, int64_t down, int64_t factor, int64_t out_shift,
                                       int64_t m, int64_t half, int64_t rs, int64_t ls, int64_t lo, int64_t hi) {
  const __m128i vdown = _mm_cvtsi64_si128(down), vout = _mm_cvtsi64_si128(out_shift), vrs = _mm_cvtsi64_si128(rs);
  const __m512i vf = _mm512_set1_epi64(factor), vm = _mm512_set1_epi64(m), vhalf = _mm512_set1_epi64(half),
                vlo = _mm512_set1_epi64(lo), vhi = _mm512_set1_epi64(hi);
  for (int64_t j = 0; j < T; j += 8) {
    const __mmask8 tail = tail8(T, j);
    const __m512i e = _mm512_sra_epi64(_mm512_maskz_loadu_epi64(tail, ex + j), vdown);
    const __m512i prob = _mm512_sra_epi64(_mm512_mul_epu32(e, vf), vout);
    const __m512i v = shl_if(_mm512_sra_epi64(_mm512_add_epi64(_mm512_mul_epu32(prob, vm), vhalf), vrs), ls);
    _mm_mask_storeu_epi8(o + j, tail, to_codes(v, vlo, vhi, lo > 0 ? lo : -128, hi));
  }
}
#endif

// The i-softmax and the probability quantizer's requantization of one row of int32 scores at a time (the constants of
// softmax_requant), through the AVX-512 rows where the CPU has them and the row's bounds allow single 32-bit
// products, else the compiler-vectorized rows; both give the same integers.
struct SoftmaxRows {
  int64_t b_int, c_int, widen, out_bits, sum_bits, num_bits, m, half, rs, ls, lo, hi, d0, floor_x, masked_value;
  uint64_t R;
  int64_t e_bits;
  bool simd;
  SoftmaxRows(int64_t x0, int64_t b_int_, int64_t c_int_, int64_t widen_, int64_t out_bits_, int64_t n_clamp, int64_t sum_bits_,
              int64_t num_bits_, int64_t m_, int64_t e, int64_t lo_, int64_t hi_, const char* op)
      : b_int(b_int_), c_int(c_int_), widen(widen_), out_bits(out_bits_), sum_bits(sum_bits_), num_bits(num_bits_), m(m_),
        half(e > 0 ? (int64_t(1) << (e - 1)) : 0), rs(std::max<int64_t>(e, 0)), ls(std::max<int64_t>(-e, 0)), lo(lo_), hi(hi_),
        d0(-x0), floor_x(n_clamp * x0), masked_value(std::numeric_limits<int64_t>::min() / 4) {
    // z = x / x0 (both <= 0 / < 0, so truncation is floor) as a 32-bit reciprocal multiply: with n = -x <= n_clamp * |x0|
    // < 2^32 and R = floor(2^32 / |x0|), (n * R) >> 32 is z or z - 1 and one compare corrects it (exact, no division).
    TORCH_CHECK(d0 > 0 && -n_clamp * x0 < (int64_t(1) << 32), op, ": x0 out of range");
    R = (uint64_t(1) << 32) / uint64_t(d0);
#if defined(__x86_64__)
    // the exp values are non-negative and below 2^e_bits (c_int >= 0; e_bits from the polynomial's largest value at
    // p = 0 and the widening), so a row of T of them sums without wrapping where e_bits + bit_length(T) <= 62 (row())
    const __int128 y_max = __int128(b_int) * b_int + c_int;
    e_bits = 0;
    for (__int128 v = y_max; v > 0; v >>= 1) ++e_bits;
    e_bits += widen;
    simd = simd_allowed() && has_avx512() && d0 >= 2 && b_int + x0 >= 0 && b_int < (int64_t(1) << 32) && c_int >= 0 &&
           widen >= 0 && sum_bits <= 32 && m >= 0 && m < (int64_t(1) << 32) && out_bits < 64 && lo >= -128 && hi <= 127;
#else
    simd = false;
#endif
  }

  void row(const int32_t* scores, const bool* vis, int64_t* ex, int8_t* o, int64_t T) const {
    const int64_t mx = row_max(scores, vis, T, masked_value);
    const bool fast = simd && mx != masked_value && e_bits + bit_length(T) <= 62;
    int64_t total;
#if defined(__x86_64__)
    if (fast) total = exp_row_avx512(scores, vis, ex, T, mx, floor_x, d0, R, b_int, c_int, widen);
    else
#endif
      total = exp_row(scores, vis, ex, T, mx, floor_x, d0, R, b_int, c_int, widen);
    total = std::max<int64_t>(total, 1);
    const int64_t down = std::max<int64_t>(bit_length(total) - sum_bits, 0);
    const int64_t factor = (int64_t(1) << num_bits) / (total >> down);  // one division per row (I-BERT)
    const int64_t out_shift = num_bits - out_bits;
#if defined(__x86_64__)
    // (ex >> down) < 2^sum_bits <= 2^32; the probability is below 2^(sum_bits + bits(factor) - out_shift)
    if (fast && factor < (int64_t(1) << 32) && sum_bits + bit_length(factor) - out_shift <= 31) {
      normalise_row_avx512(ex, o, T, down, factor, out_shift, m, half, rs, ls, lo, hi);
      return;
    }
#endif
    normalise_row(ex, o, T, down, factor, out_shift, m, half, rs, ls, lo, hi);
  }
};

// scores: [B, H, T, Tk] int32 contiguous; mask: [B, Tk] bool (true = attend).
at::Tensor softmax_requant(const at::Tensor& scores, const at::Tensor& mask, int64_t x0, int64_t b_int, int64_t c_int,
                           int64_t widen, int64_t out_bits, int64_t n_clamp, int64_t sum_bits, int64_t num_bits, int64_t m, int64_t e, int64_t lo,
                           int64_t hi, const std::optional<at::Tensor>& out_opt) {
  TORCH_CHECK(scores.is_contiguous() && scores.scalar_type() == at::kInt && scores.dim() == 4, "softmax_requant: [B,H,T,T] int32");
  TORCH_CHECK(mask.is_contiguous() && mask.scalar_type() == at::kBool, "softmax_requant: bool mask [B, T]");
  TORCH_CHECK(lo <= hi, "int_softmax_requant: lo = ", lo, " > hi = ", hi);
  const int64_t B = scores.size(0), Tk = scores.size(3), rows = scores.numel() / Tk;
  const int64_t rows_per_b = rows / B;
  at::Tensor out = output(out_opt, scores.sizes(), scores.options().dtype(at::kChar), "int_softmax_requant");
  const int32_t* s = scores.data_ptr<int32_t>();
  const bool* mk = mask.data_ptr<bool>();
  int8_t* o = out.data_ptr<int8_t>();
  const SoftmaxRows sm(x0, b_int, c_int, widen, out_bits, n_clamp, sum_bits, num_bits, m, e, lo, hi, "softmax_requant");
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(Tk, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> ex(Tk);
    for (int64_t r = r0; r < r1; ++r) sm.row(s + r * Tk, mk + (r / rows_per_b) * Tk, ex.data(), o + r * Tk, Tk);
  });
  return out;
}

KDLSQ_CLONES void gelu_row(const int32_t* __restrict a, const int64_t* __restrict bias, const int64_t* __restrict m,
                           const int64_t* __restrict half, const int64_t* __restrict rs, const int64_t* __restrict ls,
                           int64_t g_clamp, int64_t b_int, int64_t c_int, int64_t shift, int64_t one, int64_t nm, int64_t nhalf,
                           int64_t nrs, int64_t nls, int64_t lo, int64_t hi, int8_t* __restrict o, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    int64_t q = (((int64_t(a[c]) + bias[c]) * m[c] + half[c]) >> rs[c]) << ls[c];
    q = q < -g_clamp ? -g_clamp : (q > g_clamp ? g_clamp : q);
    const int64_t aq = q < 0 ? -q : q;
    const int64_t clipped = aq < -b_int ? aq : -b_int;
    const int64_t sg = int64_t(q > 0) - int64_t(q < 0);
    const int64_t y = (sg * ((clipped + b_int) * (clipped + b_int) + c_int)) >> shift;
    const int64_t g = -q * (y + one);
    const int64_t v = ((g * nm + nhalf) >> nrs) << nls;
    o[c] = int8_t(v < lo ? lo : (v > hi ? hi : v));
  }
}

#if defined(__x86_64__)
// gelu_row in AVX-512 (8 int64 lanes), the same integers: (a + bias) m + half as a (int32) times m < 2^31 by vpmuldq
// plus bias m + half folded per channel (bmh; the same int64 sum, wrapping alike); |q| <= g_clamp < 2^31 and |t| <=
// |b_int| < 2^31, so t^2 and q (y + one) (|y + one| < 2^31, checked by the caller) are single vpmuldq; g (up to 62 bits)
// times nm by vpmullq (the low 64 bits: the scalar int64 product, wrapping alike). Fewest micro-ops, since 512-bit
// integer work runs on two ports only: the sign of q only where it matters (g = 0 at q = 0), the clamp by to_codes.
KDLSQ_AVX512 void gelu_row_avx512(const int32_t* a, const int64_t* bmh, const int64_t* m, const int64_t* rs, const int64_t* ls,
                                  int64_t g_clamp, int64_t b_int, int64_t c_int, int64_t shift, int64_t one, int64_t nm,
                                  int64_t nhalf, int64_t nrs, int64_t nls, int64_t lo, int64_t hi, int8_t* o, int64_t C) {
  const __m512i vgl = _mm512_set1_epi64(-g_clamp), vgh = _mm512_set1_epi64(g_clamp), vnb = _mm512_set1_epi64(-b_int),
                vb = _mm512_set1_epi64(b_int), vc = _mm512_set1_epi64(c_int), vnone = _mm512_set1_epi64(-one),
                vnm = _mm512_set1_epi64(nm), vnh = _mm512_set1_epi64(nhalf), vlo = _mm512_set1_epi64(lo),
                vhi = _mm512_set1_epi64(hi), zero = _mm512_setzero_si512();
  const __m128i vshift = _mm_cvtsi64_si128(shift), vnrs = _mm_cvtsi64_si128(nrs);
  for (int64_t j = 0; j < C; j += 8) {
    const __mmask8 tail = tail8(C, j);
    const __m512i q = _mm512_min_epi64(_mm512_max_epi64(requant8(a, bmh, m, rs, ls, j, tail), vgl), vgh);
    const __m512i t = _mm512_add_epi64(_mm512_min_epi64(_mm512_abs_epi64(q), vnb), vb);
    const __m512i u = _mm512_add_epi64(_mm512_mul_epi32(t, t), vc);
    // sgn(q) (t^2 + c_int) as u negated where q < 0: at q = 0 the product g below is 0 whatever y is
    const __m512i su = _mm512_mask_sub_epi64(u, _mm512_cmplt_epi64_mask(q, zero), zero, u);
    const __m512i g = _mm512_mul_epi32(q, _mm512_sub_epi64(vnone, _mm512_sra_epi64(su, vshift)));  // -q (y + one)
    const __m512i v = shl_if(_mm512_sra_epi64(_mm512_add_epi64(_mm512_mullo_epi64(g, vnm), vnh), vnrs), nls);
    _mm_mask_storeu_epi8(o + j, tail, to_codes(v, vlo, vhi, lo, hi));
  }
}
#endif

// acc: [N, C] int32 (the Linear's int32 products); bias [C]; (gm, ge) [C]: onto the GELU scale, clamped to +-g_clamp;
// i-GELU constants; (nm, ne) scalar: onto the next Linear's input grid, clamped to [lo, hi]; int8 out.
at::Tensor gelu_requant(const at::Tensor& acc, const at::Tensor& bias, const at::Tensor& gm, const at::Tensor& ge, int64_t g_clamp,
                        int64_t b_int, int64_t c_int, int64_t shift, int64_t one, int64_t nm, int64_t ne, int64_t lo, int64_t hi,
                        const std::optional<at::Tensor>& out_opt) {
  TORCH_CHECK(acc.is_contiguous() && acc.scalar_type() == at::kInt, "gelu_requant: contiguous int32 acc");
  TORCH_CHECK(lo <= hi && g_clamp >= 0, "int_gelu_requant: lo = ", lo, ", hi = ", hi, ", g_clamp = ", g_clamp,
              "; allowed: lo <= hi, g_clamp >= 0");
  const int64_t C = acc.size(-1), N = acc.numel() / C;
  at::Tensor out = output(out_opt, acc.sizes(), acc.options().dtype(at::kChar), "int_gelu_requant");
  const Dyadic d(gm, ge, C);
  const int64_t nhalf = ne > 0 ? (int64_t(1) << (ne - 1)) : 0, nrs = std::max<int64_t>(ne, 0), nls = std::max<int64_t>(-ne, 0);
  const int32_t* a = acc.data_ptr<int32_t>();
  const int64_t* bp = bias.data_ptr<int64_t>();
  int8_t* o = out.data_ptr<int8_t>();
#if defined(__x86_64__)
  {
    const int64_t lim = int64_t(1) << 31;
    // |t^2 + c_int| for t^2 in [0, b_int^2] is largest at an end: max(|c_int|, |b_int^2 + c_int|)
    const __int128 c_abs = c_int < 0 ? -__int128(c_int) : __int128(c_int), top = __int128(b_int) * b_int + c_int;
    const __int128 y_bound = (std::max<__int128>(c_abs, top < 0 ? -top : top) >> shift) + (one < 0 ? -__int128(one) : __int128(one)) + 1;
    bool ok = simd_allowed() && has_avx512() && g_clamp >= 0 && g_clamp < lim && b_int <= 0 && -b_int < lim && y_bound < lim &&
              nm >= 0 && nm < lim && shift >= 0 && shift < 64 && lo >= -128 && hi <= 127 && d.m_fits_31();
    if (ok) {
      const std::vector<int64_t> bmh = d.folded_half(bp);
      const int64_t* ls = d.ls_or_null();
      at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          gelu_row_avx512(a + r * C, bmh.data(), d.m.data(), d.rs.data(), ls, g_clamp, b_int, c_int, shift, one, nm, nhalf,
                          nrs, nls, lo, hi, o + r * C, C);
      });
      return out;
    }
  }
#endif
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      gelu_row(a + r * C, bp, d.m.data(), d.half.data(), d.rs.data(), d.ls.data(), g_clamp, b_int, c_int, shift, one,
               nm, nhalf, nrs, nls, lo, hi, o + r * C, C);
  });
  return out;
}

template <typename H>
KDLSQ_CLONES void residual_row(const int32_t* __restrict a, const int64_t* __restrict bias, const int64_t* __restrict m,
                               const int64_t* __restrict half, const int64_t* __restrict rs, const int64_t* __restrict ls,
                               const H* __restrict h, int64_t hm, int64_t hhalf, int64_t hrs, int64_t hls, int64_t clamp,
                               int64_t* __restrict res, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const int64_t v = ((((int64_t(a[c]) + bias[c]) * m[c] + half[c]) >> rs[c]) << ls[c]) + (((int64_t(h[c]) * hm + hhalf) >> hrs) << hls);
    res[c] = v < -clamp ? -clamp : (v > clamp ? clamp : v);
  }
}

// y_hat = floor((y << norm_bits) / d) in place, for |y| < 2^25, norm_bits <= 14, d >= 1, without a division
// instruction and vectorizable (64-bit products only): a = |y| = q1 d + r1 with q1 = (a R1) >> 38, R1 = floor(2^38 / d)
// (a R1 < 2^63; short by at most 1, corrected by one compare), then (r1 << norm_bits) = q2 d + r2 the same way with
// R2 = floor(2^40 / d) (the operand is below d 2^14 < 2^39, so the estimate is short by at most 1). The quotient is
// (q1 << norm_bits) + q2; a negative y takes -(q + (r2 != 0)), Python's floor division.
KDLSQ_CLONES void normalise_ln_row(int64_t* __restrict y, int64_t d, int64_t norm_bits, int64_t C) {
  const uint64_t ud = uint64_t(d), R1 = (uint64_t(1) << 38) / ud, R2 = (uint64_t(1) << 40) / ud;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t v = y[c];
    const uint64_t a = uint64_t(v < 0 ? -v : v);
    uint64_t q1 = (a * R1) >> 38;
    q1 += (a - q1 * ud) >= ud;
    const uint64_t n2 = (a - q1 * ud) << norm_bits;
    uint64_t q2 = (n2 * R2) >> 40;
    q2 += (n2 - q2 * ud) >= ud;
    const int64_t q = int64_t((q1 << norm_bits) + q2);
    const int64_t rem = int64_t(n2 - q2 * ud);
    y[c] = v >= 0 ? q : -(q + (rem != 0));
  }
}

// Subtracts the row's rounded mean in place; returns the sum of squares.
KDLSQ_CLONES int64_t center_row(int64_t* __restrict res, int64_t C) {
  int64_t total = 0;
  for (int64_t c = 0; c < C; ++c) total += res[c];
  const int64_t mean = floor_div(2 * total + C, 2 * C);
  int64_t sq = 0;
  for (int64_t c = 0; c < C; ++c) {
    res[c] -= mean;
    sq += res[c] * res[c];
  }
  return sq;
}

KDLSQ_CLONES void layernorm_out_row(const int64_t* __restrict y_hat, const int64_t* __restrict gamma, const int64_t* __restrict beta,
                                   int64_t lm, int64_t le, int32_t* __restrict o, int64_t C) {
  const int64_t half = le > 0 ? (int64_t(1) << (le - 1)) : 0, rs = std::max<int64_t>(le, 0), ls = std::max<int64_t>(-le, 0);
  for (int64_t c = 0; c < C; ++c) o[c] = int32_t((((y_hat[c] * gamma[c] * lm + half) >> rs) << ls) + beta[c]);  // shift_round
}

// One int8 code output of the LayerNorm kernel: its dyadic (m, half, rs, ls), clamp and tensor.
struct CodeGrid {
  int64_t m, half, rs, ls, lo, hi;
  int8_t* out;
};

#if defined(__x86_64__)
// The LayerNorm kernel's rows in AVX-512 (8 int64 lanes; the engine's case: an int32 h), the same integers as
// residual_row / center_row / normalise_ln_row / layernorm_out_row / requant_row_s. Every product but the division's
// becomes one signed 32 x 32 -> 64-bit vpmuldq, exact because both operands fit 32 bits: a (int32) times m < 2^31, with
// bias * m + half folded per channel beforehand (the same int64 sum, wrapping alike); h (int32) times hm < 2^31;
// (y - mean)^2 with |y - mean| < 2^25; y_hat gamma (below 2^31, checked by the caller) times lm < 2^31; the output
// (int32) times each code grid's m < 2^31. The floor division y 2^norm_bits / d is one 52-bit multiply where the CPU
// has AVX-512 IFMA (normalise_ln_ifma), else normalise_ln_row's two reciprocal steps (compiler-vectorized).
KDLSQ_AVX512 int64_t residual_row_avx512(const int32_t* a, const int64_t* bmh, const int64_t* m, const int64_t* rs,
                                         const int64_t* ls, const int32_t* h, int64_t hm, int64_t hhalf, int64_t hrs, int64_t hls,
                                         int64_t clamp, int64_t* res, int64_t C) {
  const __m512i vhm = _mm512_set1_epi64(hm), vhh = _mm512_set1_epi64(hhalf), vlo = _mm512_set1_epi64(-clamp),
                vhi = _mm512_set1_epi64(clamp);
  const __m128i vhrs = _mm_cvtsi64_si128(hrs);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t j = 0; j < C; j += 8) {
    const __mmask8 tail = tail8(C, j);
    const __m512i v = requant8(a, bmh, m, rs, ls, j, tail);
    const __m512i h8 = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(tail, h + j));
    const __m512i w = shl_if(_mm512_sra_epi64(_mm512_add_epi64(_mm512_mul_epi32(h8, vhm), vhh), vhrs), hls);
    __m512i r = _mm512_min_epi64(_mm512_max_epi64(_mm512_add_epi64(v, w), vlo), vhi);
    if (tail != 0xFF) r = _mm512_maskz_mov_epi64(tail, r);  // lanes past the row: 0, out of the sum
    _mm512_mask_storeu_epi64(res + j, tail, r);
    acc = _mm512_add_epi64(acc, r);
  }
  return _mm512_reduce_add_epi64(acc);
}

KDLSQ_AVX512 int64_t center_row_avx512(int64_t* res, int64_t mean, int64_t C) {  // res -= mean; returns sum(res^2)
  const __m512i vmean = _mm512_set1_epi64(mean);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t j = 0; j < C; j += 8) {
    const __mmask8 tail = tail8(C, j);
    __m512i y = _mm512_sub_epi64(_mm512_maskz_loadu_epi64(tail, res + j), vmean);
    if (tail != 0xFF) y = _mm512_maskz_mov_epi64(tail, y);
    _mm512_mask_storeu_epi64(res + j, tail, y);
    acc = _mm512_add_epi64(acc, _mm512_mul_epi32(y, y));
  }
  return _mm512_reduce_add_epi64(acc);
}

#define KDLSQ_AVX512_IFMA __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512ifma")))

bool has_avx512_ifma() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512ifma");
  return ok;
}

// The same division by one 52-bit multiply (vpmadd52huq, AVX-512 IFMA): for 2 <= d < 2^32 and n < 2^50,
// floor(n / d) = floor(n M / 2^(51 + k)) with k = bit_length(d) - 1 and M = floor(2^(51 + k) / d) + 1 < 2^52 (M d =
// 2^(51 + k) + e with 0 < e <= d, so the estimate exceeds n / d by n e / (d 2^(51 + k)) < 1 / d: below the next
// integer). vpmadd52huq gives floor(n M / 2^52), and a shift by k - 1 the rest. A negative y takes -ceil(a / d) =
// -floor((a + d - 1) / d) with a = |y| << norm_bits < 2^39 (|y| < 2^25, norm_bits <= 14), Python's floor division.
KDLSQ_AVX512_IFMA void normalise_ln_ifma(int64_t* y, int64_t d, int64_t norm_bits, int64_t C) {
  const int64_t k = bit_length(d) - 1;
  const __m512i vM = _mm512_set1_epi64(int64_t(((unsigned __int128)1 << (51 + k)) / uint64_t(d) + 1)),
                vd1 = _mm512_set1_epi64(d - 1), zero = _mm512_setzero_si512();
  const __m128i vnb = _mm_cvtsi64_si128(norm_bits), vk = _mm_cvtsi64_si128(k - 1);
  for (int64_t j = 0; j < C; j += 8) {
    const __mmask8 tail = tail8(C, j);
    const __m512i v = _mm512_maskz_loadu_epi64(tail, y + j);
    const __mmask8 neg = _mm512_cmplt_epi64_mask(v, zero);
    __m512i n = _mm512_sll_epi64(_mm512_abs_epi64(v), vnb);
    n = _mm512_mask_add_epi64(n, neg, n, vd1);
    const __m512i q = _mm512_srl_epi64(_mm512_madd52hi_epu64(zero, n, vM), vk);
    _mm512_mask_storeu_epi64(y + j, tail, _mm512_mask_sub_epi64(q, neg, zero, q));
  }
}

// The LayerNorm's output from y_hat: round(y_hat gamma lm / 2^le) + beta into o (int32), and its int8 codes on each
// code grid (-128 <= lo, hi <= 127, checked by the caller).
KDLSQ_AVX512 void layernorm_out_avx512(const int64_t* y_hat, const int64_t* gamma, const int64_t* beta, int64_t lm, int64_t le,
                                       int32_t* o, const CodeGrid* grids, int64_t n_grids, int64_t off, int64_t C) {
  const __m512i vlm = _mm512_set1_epi64(lm), vhalf = _mm512_set1_epi64(le > 0 ? (int64_t(1) << (le - 1)) : 0);
  const __m128i vrs = _mm_cvtsi64_si128(std::max<int64_t>(le, 0));
  const int64_t ls = std::max<int64_t>(-le, 0);
  for (int64_t j = 0; j < C; j += 8) {
    const __mmask8 tail = tail8(C, j);
    const __m512i yg = _mm512_mul_epi32(_mm512_maskz_loadu_epi64(tail, y_hat + j), _mm512_maskz_loadu_epi64(tail, gamma + j));
    const __m512i out = shl_if(_mm512_sra_epi64(_mm512_add_epi64(_mm512_mul_epi32(yg, vlm), vhalf), vrs), ls);
    const __m256i o32 = _mm512_cvtepi64_epi32(_mm512_add_epi64(out, _mm512_maskz_loadu_epi64(tail, beta + j)));
    _mm256_mask_storeu_epi32(o + j, tail, o32);
    const __m512i o64 = _mm512_cvtepi32_epi64(o32);
    for (int64_t g = 0; g < n_grids; ++g) {
      const CodeGrid& cg = grids[g];
      __m512i c = _mm512_add_epi64(_mm512_mul_epi32(o64, _mm512_set1_epi64(cg.m)), _mm512_set1_epi64(cg.half));
      c = shl_if(_mm512_sra_epi64(c, _mm_cvtsi64_si128(cg.rs)), cg.ls);
      const __m128i codes = to_codes(c, _mm512_set1_epi64(cg.lo), _mm512_set1_epi64(cg.hi), cg.lo, cg.hi);
      _mm_mask_storeu_epi8(cg.out + off + j, tail, codes);  // the codes' row at element offset off
    }
  }
}
#endif

// a: [N, C] int32 products of the Linear before the residual, with bias [C] and (am, ae) [C] onto the residual scale;
// h: [N, C] int64 or int32 residual input with scalar (hm, he); clamp; then LayerNorm with gamma_int, beta_int [C], NORM_BITS
// and scalar (lm, le) onto the output scale. int32 out (the engine's LayerNorm outputs have 20 bits).
at::Tensor residual_layernorm(const at::Tensor& a, const at::Tensor& bias, const at::Tensor& am, const at::Tensor& ae,
                              const at::Tensor& h, int64_t hm, int64_t he, int64_t res_clamp, const at::Tensor& gamma,
                              const at::Tensor& beta, int64_t norm_bits, int64_t lm, int64_t le, const std::optional<at::Tensor>& out_opt,
                              at::IntArrayRef code_rq, at::TensorList codes) {
  TORCH_CHECK(a.is_contiguous() && a.scalar_type() == at::kInt && h.is_contiguous() && (h.scalar_type() == at::kLong || h.scalar_type() == at::kInt),
              "residual_layernorm: contiguous int32 a and int64/int32 h");
  const int64_t C = a.size(-1), N = a.numel() / C;
  at::Tensor out = output(out_opt, h.sizes(), h.options().dtype(at::kInt), "int_residual_layernorm");  // |out| < 2^LN_OUT_BITS (engine.py: 20)
  const int32_t* ap = a.data_ptr<int32_t>();
  const bool h64 = h.scalar_type() == at::kLong;
  const int64_t* hp64 = h64 ? h.data_ptr<int64_t>() : nullptr;
  const int32_t* hp32 = h64 ? nullptr : h.data_ptr<int32_t>();
  const int64_t* bp = bias.data_ptr<int64_t>();
  const int64_t *gp = gamma.data_ptr<int64_t>(), *btp = beta.data_ptr<int64_t>();
  // bounds of normalise_ln_row: |y - mean| < 2^25 after the clamp, norm_bits <= 14
  TORCH_CHECK(res_clamp >= 0 && res_clamp <= (int64_t(1) << 24) && norm_bits >= 0 && norm_bits <= 14,
              "residual_layernorm: res_clamp = ", res_clamp, " and norm_bits = ", norm_bits, "; allowed: 0 <= res_clamp <= 2^24, 0 <= norm_bits <= 14");
  const Dyadic d(am, ae, C);
  const int64_t hhalf = he > 0 ? (int64_t(1) << (he - 1)) : 0, hrs = std::max<int64_t>(he, 0), hls = std::max<int64_t>(-he, 0);
  int32_t* o = out.data_ptr<int32_t>();
  // the output's int8 codes on the grids of the Linears that read it: (m, e, lo, hi) per tensor of ``codes``
  const int64_t n_codes = int64_t(codes.size());
  TORCH_CHECK(int64_t(code_rq.size()) == 4 * n_codes, "residual_layernorm: 4 requantization constants per code tensor");
  std::vector<CodeGrid> grids;
  for (int64_t j = 0; j < n_codes; ++j) {
    TORCH_CHECK(codes[j].is_contiguous() && codes[j].scalar_type() == at::kChar && codes[j].numel() == N * C,
                "residual_layernorm: each code tensor must be a contiguous int8 tensor of ", N * C, " elements");
    TORCH_CHECK(code_rq[4 * j + 2] <= code_rq[4 * j + 3], "residual_layernorm: code grid ", j, " has lo > hi");
    const int64_t e = code_rq[4 * j + 1];
    grids.push_back({code_rq[4 * j], e > 0 ? (int64_t(1) << (e - 1)) : 0, std::max<int64_t>(e, 0), std::max<int64_t>(-e, 0),
                     code_rq[4 * j + 2], code_rq[4 * j + 3], codes[j].data_ptr<int8_t>()});
  }
  // the codes of output row r, by the compiler-vectorized rows
  auto code_rows = [&](int64_t r) {
    for (const CodeGrid& g : grids)
      requant_row_s(o + r * C, static_cast<const int64_t*>(nullptr), g.m, g.half, g.rs, g.ls, g.out + r * C, C, g.lo, g.hi);
  };
  // The AVX-512 rows (an int32 h; every multiplier below 2^31; y_hat gamma below 2^31: |y_hat| <= (2 sqrt(C) + 1)
  // 2^norm_bits because |y - mean| <= sqrt(C) (d + 1) and d >= 1)
  bool simd = false;
  std::vector<int64_t> bmh;
  const int64_t* a_ls = nullptr;
#if defined(__x86_64__)
  {
    const int64_t lim = int64_t(1) << 31;
    int64_t g_max = 0;
    for (int64_t c = 0; c < C; ++c) g_max = std::max<int64_t>(g_max, gp[c] < 0 ? -gp[c] : gp[c]);
    simd = simd_allowed() && has_avx512() && !h64 && hm >= 0 && hm < lim && lm >= 0 && lm < lim && g_max < lim &&
           (2 * isqrt_newton(C) + 3) * (int64_t(1) << norm_bits) * std::max<int64_t>(g_max, 1) < lim && d.m_fits_31();
    for (const CodeGrid& g : grids) simd = simd && g.m >= 0 && g.m < lim && g.lo >= -128 && g.hi <= 127;
    if (simd) bmh = d.folded_half(bp);
    a_ls = d.ls_or_null();
  }
#endif
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> res(C);
    for (int64_t r = r0; r < r1; ++r) {
#if defined(__x86_64__)
      if (simd) {
        const int64_t total = residual_row_avx512(ap + r * C, bmh.data(), d.m.data(), d.rs.data(), a_ls, hp32 + r * C, hm,
                                                  hhalf, hrs, hls, res_clamp, res.data(), C);
        const int64_t sq = center_row_avx512(res.data(), floor_div(2 * total + C, 2 * C), C);
        const int64_t sd = std::max<int64_t>(isqrt_newton(sq / C), 1);
        if (sd >= 2 && has_avx512_ifma())
          normalise_ln_ifma(res.data(), sd, norm_bits, C);
        else
          normalise_ln_row(res.data(), sd, norm_bits, C);
        layernorm_out_avx512(res.data(), gp, btp, lm, le, o + r * C, grids.data(), n_codes, r * C, C);
        continue;
      }
#endif
      if (h64)
        residual_row(ap + r * C, bp, d.m.data(), d.half.data(), d.rs.data(), d.ls.data(), hp64 + r * C, hm, hhalf, hrs, hls,
                     res_clamp, res.data(), C);
      else
        residual_row(ap + r * C, bp, d.m.data(), d.half.data(), d.rs.data(), d.ls.data(), hp32 + r * C, hm, hhalf, hrs, hls,
                     res_clamp, res.data(), C);
      const int64_t sq = center_row(res.data(), C);
      normalise_ln_row(res.data(), std::max<int64_t>(isqrt_newton(sq / C), 1), norm_bits, C);
      layernorm_out_row(res.data(), gp, btp, lm, le, o + r * C, C);
      code_rows(r);
    }
  });
  return out;
}

// oneDNN's matmul primitive for the attention products, batched over a group of heads of one example: scores
// [1, n, T, T] = q [1, n, T, d] (in place in the [B*T, D] codes: strides T*D, d, D, 1) x k^T [1, n, d, T] (the task's
// transposed copy), and context [1, n, T, d] (the task's [T, n*d] tile: strides T*n*d, d, n*d, 1) = p [1, n, T, T] x
// v [1, n, T, d] (in place, like q). The 4-D form with a leading 1 is what selects oneDNN's brgemm kernels (AMX or
// VNNI) for these strides; 3-D or per-head 2-D forms with a transposed key get its slower gemm:jit. Built once per
// (T, n, D) and thread count, then shared by every thread (execute is thread-safe; each thread brings its own
// scratchpad and stream).
struct HeadProducts {
  dnnl::reorder kt;  // the group's keys [T, n*d] (row stride D) -> [n, d, T]
  dnnl::matmul qk, pv;
  size_t scratch;
};

// Most primitives a cache keeps (each holds its JIT code): past that it starts over. Entries are shared pointers, so
// a call still running with one that is dropped keeps it alive.
constexpr size_t MAX_PRIMITIVES = 256;

std::shared_ptr<const HeadProducts> head_products(int64_t T, int64_t n, int64_t d, int64_t D) {
  static std::mutex mu;
  static std::map<std::array<int64_t, 5>, std::shared_ptr<const HeadProducts>> cache;
  std::lock_guard<std::mutex> g(mu);
  // a primitive keeps the thread count it was built for: at one thread the tasks run outside a parallel region, and a
  // primitive built for two would open one of its own
  const std::array<int64_t, 5> key{T, n, d, D, int64_t(at::get_num_threads())};
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  using dims = memory::dims;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const memory::desc q_md({1, n, T, d}, dt::s8, dims{T * D, d, D, 1}), kt_md({1, n, d, T}, dt::s8, tag::abcd),
      s_md({1, n, T, T}, dt::s32, tag::abcd), p_md({1, n, T, T}, dt::s8, tag::abcd), v_md({1, n, T, d}, dt::s8, dims{T * D, d, D, 1}),
      c_md({1, n, T, d}, dt::s32, dims{T * n * d, d, n * d, 1});
  const auto kt = dnnl::reorder::primitive_desc(cpu_engine(), memory::desc({1, n, d, T}, dt::s8, dims{T * D, d, 1, D}), cpu_engine(),
                                                kt_md);
  const auto qk = dnnl::matmul::primitive_desc(cpu_engine(), q_md, kt_md, s_md, attr);
  const auto pv = dnnl::matmul::primitive_desc(cpu_engine(), p_md, v_md, c_md, attr);
  const size_t scratch = std::max(qk.scratchpad_desc().get_size(), pv.scratchpad_desc().get_size());
  if (cache.size() >= MAX_PRIMITIVES) cache.clear();
  return cache[key] = std::make_shared<const HeadProducts>(HeadProducts{dnnl::reorder(kt), dnnl::matmul(qk), dnnl::matmul(pv), scratch});
}

dnnl::stream& thread_stream() {  // the calling thread's oneDNN stream
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

// Runs one oneDNN primitive on the calling thread's stream with the calling thread's scratchpad. Inside an
// at::parallel_for task (an OpenMP parallel region) oneDNN does not open a nested team: it runs on this thread.
void execute(const dnnl::matmul& mm, const memory::desc& a_md, const void* a, const memory::desc& w_md, const void* w,
             const memory::desc& c_md, void* c, size_t scratch_bytes) {
  thread_local std::vector<char> scratch;
  if (scratch.size() < scratch_bytes) scratch.resize(scratch_bytes);
  dnnl::stream& stream = thread_stream();
  memory am(a_md, cpu_engine(), const_cast<void*>(a)), wm(w_md, cpu_engine(), const_cast<void*>(w)), cm(c_md, cpu_engine(), c),
      sm(memory::desc({int64_t(scratch_bytes)}, dt::u8, tag::a), cpu_engine(), scratch.data());
  mm.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, cm}, {DNNL_ARG_SCRATCHPAD, sm}});
  stream.wait();
}

// The rows the weights' packed layout is chosen for (batch 8 x length 128); other row counts reuse that layout.
constexpr int64_t REF_ROWS = 1024;

// A Linear's int8 weights [K, N] (in, out) packed once for oneDNN's matmul, and one primitive per row count M and
// thread count (built on first use, then cached: a oneDNN primitive keeps the thread count it was built for).
// mm(x8 [M, K] int8, out [M, N] int32) writes x8 @ w; a row count for which oneDNN offers only its reference kernel
// with this layout runs torch._int_mm on the plain weights instead.
struct PackedS8 : torch::CustomClassHolder {
  at::Tensor w_t;  // [K, N] int8, row-major (kept for the fallback)
  int64_t K, N;
  memory::desc packed_md;
  memory packed;
  std::string impl;
  std::mutex mu;
  struct Prim { dnnl::matmul mm; size_t scratch; bool ok; };
  std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const Prim>> by_rows;  // (M, threads) -> primitive

  explicit PackedS8(at::Tensor w) : w_t(w.contiguous()) {
    TORCH_CHECK(w_t.dim() == 2 && w_t.scalar_type() == at::kChar && w_t.device().is_cpu(),
                "PackedS8: weights must be a 2-D int8 CPU tensor [in, out]; got ", w_t.dim(), "-D ", w_t.scalar_type());
    K = w_t.size(0); N = w_t.size(1);
    TORCH_CHECK(K > 0 && N > 0, "PackedS8: empty weights [", K, ", ", N, "]");
    auto& eng = cpu_engine();
    memory::desc a_md({REF_ROWS, K}, dt::s8, tag::ab), w_any({K, N}, dt::s8, tag::any), c_md({REF_ROWS, N}, dt::s32, tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    auto pd = dnnl::matmul::primitive_desc(eng, a_md, w_any, c_md, attr);
    packed_md = pd.weights_desc();
    impl = pd.impl_info_str();
    memory plain({{K, N}, dt::s8, tag::ab}, eng, w_t.data_ptr());
    packed = memory(packed_md, eng);
    dnnl::stream s(eng);
    dnnl::reorder(plain, packed).execute(s, plain, packed);
    s.wait();
  }

  std::shared_ptr<const Prim> prim(int64_t M) {
    std::lock_guard<std::mutex> g(mu);
    const std::pair<int64_t, int64_t> key{M, at::get_num_threads()};
    auto it = by_rows.find(key);
    if (it != by_rows.end()) return it->second;
    memory::desc a_md({M, K}, dt::s8, tag::ab), c_md({M, N}, dt::s32, tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    Prim p{dnnl::matmul(), 0, false};
    try {
      auto pd = dnnl::matmul::primitive_desc(cpu_engine(), a_md, packed_md, c_md, attr);
      std::string name = pd.impl_info_str();
      if (name.find("ref") == std::string::npos) {
        p = Prim{dnnl::matmul(pd), pd.scratchpad_desc().get_size(), true};
      }
    } catch (const dnnl::error&) {
    }
    if (by_rows.size() >= MAX_PRIMITIVES) by_rows.clear();
    return by_rows[key] = std::make_shared<const Prim>(std::move(p));
  }

  at::Tensor mm(at::Tensor x8, std::optional<at::Tensor> out_opt) {
    TORCH_CHECK(x8.dim() == 2 && x8.scalar_type() == at::kChar && x8.size(1) == K,
                "PackedS8.mm: input must be int8 [M, ", K, "]; got ", x8.scalar_type(), " ", x8.sizes());
    x8 = x8.contiguous();
    const int64_t M = x8.size(0);
    at::Tensor out = out_opt.has_value() ? *out_opt : at::empty({M, N}, x8.options().dtype(at::kInt));
    TORCH_CHECK(out.scalar_type() == at::kInt && out.is_contiguous() && out.size(0) == M && out.size(1) == N,
                "PackedS8.mm: out must be contiguous int32 [", M, ", ", N, "]; got ", out.scalar_type(), " ", out.sizes());
    if (M == 0) return out;
    const std::shared_ptr<const Prim> p = prim(M);
    if (!p->ok) return at::_int_mm_out(out, x8, w_t);
    execute(p->mm, {{M, K}, dt::s8, tag::ab}, x8.data_ptr(), packed_md, packed.get_data_handle(), {{M, N}, dt::s32, tag::ab},
            out.data_ptr(), p->scratch);
    return out;
  }
};

// One task per (example, group of heads), with the group's tiles in cache: its keys transposed to [n, d, T], the
// scores q k^T and the context p v by oneDNN's matmul primitive batched over the group (head_products), the i-softmax
// and the probability quantizer's requantization between them, and the context requantized onto the output Linear's
// input grid, straight into its place in ``out``. Heads are grouped so that there are at least as many tasks as
// threads (one group of all heads at batch >= threads). q8, k8, v8: [B*T, D] int8 codes of the query, key and value
// (heads side by side); mask [B, T] bool; sm: the 12 constants of softmax_requant; (om, oe, olo, ohi) the output
// Linear's input requantization. int8 out [B*T, D].
at::Tensor attention(const at::Tensor& q8, const at::Tensor& k8, const at::Tensor& v8, const at::Tensor& mask, int64_t B,
                     int64_t heads, at::IntArrayRef sm, int64_t om, int64_t oe, int64_t olo, int64_t ohi,
                     const std::optional<at::Tensor>& out_opt) {
  for (const at::Tensor* t : {&q8, &k8, &v8})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kChar && t->dim() == 2 && t->sizes() == q8.sizes(),
                "int_attention: q, k, v codes must be contiguous int8 [B*T, D] of one shape");
  TORCH_CHECK(mask.is_contiguous() && mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B &&
              mask.size(0) * mask.size(1) == q8.size(0), "int_attention: mask must be a contiguous bool [B, T]");
  TORCH_CHECK(sm.size() == 12, "int_attention: 12 softmax constants");
  TORCH_CHECK(heads > 0 && B > 0, "int_attention: heads = ", heads, " and B = ", B, "; allowed: both >= 1");
  const int64_t N = q8.size(0), D = q8.size(1), T = N / B, d = D / heads;
  TORCH_CHECK(D % heads == 0, "int_attention: D = ", D, " is not a multiple of heads = ", heads);
  TORCH_CHECK(olo <= ohi && sm[10] <= sm[11], "int_attention: a clamp with lo > hi");
  at::Tensor out = output(out_opt, q8.sizes(), q8.options(), "int_attention");
  if (N == 0) return out;
  const SoftmaxRows smx(sm[0], sm[1], sm[2], sm[3], sm[4], sm[5], sm[6], sm[7], sm[8], sm[9], sm[10], sm[11], "int_attention");
  // the context's requantization, per tensor, as channel rows for the AVX-512 row (no bias: bias m + half is half)
  const Dyadic o_rows(&om, &oe, 1, D);
#if defined(__x86_64__)
  const int64_t* o_ls = o_rows.ls_or_null();
  const bool o_simd = simd_allowed() && has_avx512() && o_rows.m_fits_31() && olo >= -128 && ohi <= 127;
#endif
  const int64_t groups = std::min<int64_t>(heads, (at::get_num_threads() + B - 1) / B), per = (heads + groups - 1) / groups;
  const int64_t n_groups = (heads + per - 1) / per;  // the last group may hold fewer heads
  const std::shared_ptr<const HeadProducts> prods[2] = {head_products(T, per, d, D),
                                                        heads % per ? head_products(T, heads % per, d, D) : nullptr};
  const int8_t *qp = q8.data_ptr<int8_t>(), *kp = k8.data_ptr<int8_t>(), *vp = v8.data_ptr<int8_t>();
  const bool* mk = mask.data_ptr<bool>();
  int8_t* o = out.data_ptr<int8_t>();
  at::parallel_for(0, B * n_groups, 1, [&](int64_t t0, int64_t t1) {
    // per-thread tiles, kept between calls (a fresh zeroed 1 MB each call costs a pass over memory)
    thread_local std::vector<int32_t> S, Cx;
    thread_local std::vector<int8_t> P, Kt;
    thread_local std::vector<int64_t> ex;
    for (auto* v : {&S, &Cx}) v->resize(std::max<size_t>(v->size(), size_t(per * T * std::max(T, d))));
    for (auto* v : {&P, &Kt}) v->resize(std::max<size_t>(v->size(), size_t(per * T * std::max(T, d))));
    ex.resize(std::max<size_t>(ex.size(), size_t(T)));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / n_groups, g = task % n_groups, h0 = g * per, n = std::min(per, heads - h0), c0 = h0 * d;
      const HeadProducts& hp = n == per ? *prods[0] : *prods[1];
      using dims = memory::dims;
      {  // the group's keys transposed by oneDNN's reorder (on this thread, like the products)
        memory from({{1, n, d, T}, dt::s8, dims{T * D, d, 1, D}}, cpu_engine(), const_cast<int8_t*>(kp + b * T * D + c0)),
            to({{1, n, d, T}, dt::s8, tag::abcd}, cpu_engine(), Kt.data());
        hp.kt.execute(thread_stream(), from, to);
        thread_stream().wait();
      }
      execute(hp.qk, memory::desc({1, n, T, d}, dt::s8, dims{T * D, d, D, 1}), qp + b * T * D + c0,
              memory::desc({1, n, d, T}, dt::s8, tag::abcd), Kt.data(), memory::desc({1, n, T, T}, dt::s32, tag::abcd), S.data(),
              hp.scratch);
      const bool* vis = mk + b * T;
      for (int64_t r = 0; r < n * T; ++r) smx.row(S.data() + r * T, vis, ex.data(), P.data() + r * T, T);
      execute(hp.pv, memory::desc({1, n, T, T}, dt::s8, tag::abcd), P.data(), memory::desc({1, n, T, d}, dt::s8, dims{T * D, d, D, 1}),
              vp + b * T * D + c0, memory::desc({1, n, T, d}, dt::s32, dims{T * n * d, d, n * d, 1}), Cx.data(), hp.scratch);
      // the output Linear's input grid is per tensor: each of the tile's rows requantizes straight into its place
      for (int64_t t = 0; t < T; ++t) {
        const int32_t* row = Cx.data() + t * n * d;
        int8_t* dst = o + (b * T + t) * D + c0;
#if defined(__x86_64__)
        if (o_simd) {
          requant_row_avx512(row, o_rows.half.data(), o_rows.m.data(), o_rows.rs.data(), o_ls, dst, n * d, olo, ohi);
          continue;
        }
#endif
        requant_row_s(row, static_cast<const int64_t*>(nullptr), om, o_rows.half[0], o_rows.rs[0], o_rows.ls[0], dst, n * d, olo,
                      ohi);
      }
    }
  });
  return out;
}

// The integer embedding sum: out[b T + t, c] = clamp(word[ids[b, t], c] + position[t, c] + token_type[tt[b, t], c], -clamp,
// clamp) as int32 [B*T, D] (clamp < 2^31), the same integers as the engine's torch path. ids, tt: [B, T] int64; the
// word rows from ``word`` [V, D] (int32 or int64), or at 4 bits or fewer as word_lut[row or 0, word_codes[id, c]]
// (word_codes [V, D] uint8, word_lut [V or 1, L] int64); position [P >= T, D], token_type [n, D] int64.
template <typename W>
void embedding_rows(const int64_t* ids, const int64_t* tt, const W* word, const uint8_t* codes, const int64_t* lut, int64_t lut_rows,
                    int64_t L, const int64_t* pos, const int64_t* tok, int64_t T, int64_t D, int64_t clamp, int32_t* o, int64_t r0,
                    int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t id = ids[r], t = r % T;
    const int64_t *p = pos + t * D, *k = tok + tt[r] * D;
    int32_t* out = o + r * D;
    if (codes != nullptr) {
      const uint8_t* cr = codes + id * D;
      const int64_t* lr = lut + (lut_rows == 1 ? 0 : id) * L;
      for (int64_t c = 0; c < D; ++c) out[c] = int32_t(std::min(std::max(lr[cr[c]] + p[c] + k[c], -clamp), clamp));
    } else {
      const W* wr = word + id * D;
      for (int64_t c = 0; c < D; ++c) out[c] = int32_t(std::min(std::max(int64_t(wr[c]) + p[c] + k[c], -clamp), clamp));
    }
  }
}

at::Tensor embedding(const at::Tensor& ids, const at::Tensor& tt, const std::optional<at::Tensor>& word_codes,
                     const std::optional<at::Tensor>& word_lut, const std::optional<at::Tensor>& word, const at::Tensor& position,
                     const at::Tensor& token_type, int64_t clamp, const std::optional<at::Tensor>& out_opt) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.is_contiguous() && tt.sizes() == ids.sizes() &&
              tt.scalar_type() == at::kLong && tt.is_contiguous(), "int_embedding: ids and token types must be contiguous int64 [B, T]");
  const bool lut = word_codes.has_value() && word_codes->defined();
  TORCH_CHECK(lut == (word_lut.has_value() && word_lut->defined()) && lut != (word.has_value() && word->defined()),
              "int_embedding: give word_codes with word_lut, or word");
  const at::Tensor& table = lut ? *word_codes : *word;
  const int64_t B = ids.size(0), T = ids.size(1), V = table.size(0), D = table.size(1);
  for (const at::Tensor* t : {&table, &position, &token_type})
    TORCH_CHECK(t->dim() == 2 && t->size(1) == D && t->is_contiguous(), "int_embedding: tables must be contiguous [rows, ", D, "]");
  TORCH_CHECK(position.scalar_type() == at::kLong && token_type.scalar_type() == at::kLong, "int_embedding: int64 position and token type tables");
  TORCH_CHECK(T <= position.size(0), "int_embedding: sequence length ", T, " > ", position.size(0), " positions");
  TORCH_CHECK(clamp >= 0 && clamp < (int64_t(1) << 31), "int_embedding: clamp = ", clamp, "; allowed: 0 <= clamp < 2^31");
  if (ids.numel() > 0) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < V, "int_embedding: token id ", lo < 0 ? lo : hi, " out of range; allowed: 0..", V - 1);
    const int64_t tlo = tt.min().item<int64_t>(), thi = tt.max().item<int64_t>();
    TORCH_CHECK(tlo >= 0 && thi < token_type.size(0), "int_embedding: token type ", tlo < 0 ? tlo : thi, " out of range; allowed: 0..",
                token_type.size(0) - 1);
  }
  if (lut) {
    TORCH_CHECK(word_codes->scalar_type() == at::kByte && word_lut->scalar_type() == at::kLong && word_lut->dim() == 2 &&
                word_lut->is_contiguous() && (word_lut->size(0) == 1 || word_lut->size(0) == V),
                "int_embedding: word codes must be uint8 [V, D] with an int64 [1 or V, L] lut");
  } else {
    TORCH_CHECK(word->scalar_type() == at::kInt || word->scalar_type() == at::kLong, "int_embedding: word table must be int32 or int64");
  }
  at::Tensor out = output(out_opt, {B * T, D}, ids.options().dtype(at::kInt), "int_embedding");
  const int64_t *ip = ids.data_ptr<int64_t>(), *tp = tt.data_ptr<int64_t>(), *pp = position.data_ptr<int64_t>(),
                *kp = token_type.data_ptr<int64_t>();
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, B * T, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    if (lut) {
      embedding_rows<int64_t>(ip, tp, nullptr, word_codes->data_ptr<uint8_t>(), word_lut->data_ptr<int64_t>(), word_lut->size(0),
                              word_lut->size(1), pp, kp, T, D, clamp, o, r0, r1);
    } else if (word->scalar_type() == at::kInt) {
      embedding_rows<int32_t>(ip, tp, word->data_ptr<int32_t>(), nullptr, nullptr, 0, 0, pp, kp, T, D, clamp, o, r0, r1);
    } else {
      embedding_rows<int64_t>(ip, tp, word->data_ptr<int64_t>(), nullptr, nullptr, 0, 0, pp, kp, T, D, clamp, o, r0, r1);
    }
  });
  return out;
}

bool set_simd(bool on) {  // returns the previous setting
  return g_simd.exchange(on);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdlsq, m) {
  m.class_<PackedS8>("PackedS8")
      .def(torch::init<at::Tensor>())
      .def("mm", &PackedS8::mm)
      .def("impl", [](const c10::intrusive_ptr<PackedS8>& self) { return self->impl; })
      .def("nbytes", [](const c10::intrusive_ptr<PackedS8>& self) { return int64_t(self->packed_md.get_size()); });
  m.def("set_simd(bool on) -> bool", &set_simd);
  m.def("int_embedding(Tensor ids, Tensor tt, Tensor? word_codes, Tensor? word_lut, Tensor? word, Tensor position, "
        "Tensor token_type, int clamp, Tensor(a!)? out=None) -> Tensor");
  m.def("int_requant(Tensor x, Tensor? bias, Tensor m, Tensor e, int lo, int hi, bool int8_out, Tensor(a!)? out=None) -> Tensor");
  m.def("int_requant_split(Tensor x, Tensor? bias, Tensor m, Tensor e, int lo, int hi, Tensor(a!)[] outs) -> ()");
  m.def("int_softmax_requant(Tensor scores, Tensor mask, int x0, int b_int, int c_int, int widen, int out_bits, int n_clamp, "
        "int sum_bits, int num_bits, int m, int e, int lo, int hi, Tensor(a!)? out=None) -> Tensor");
  m.def("int_attention(Tensor q8, Tensor k8, Tensor v8, Tensor mask, int B, int heads, int[] sm, int om, int oe, int olo, "
        "int ohi, Tensor(a!)? out=None) -> Tensor");
  m.def("int_tanh(Tensor x, int x0, int b_int, int c_int, int widen, int out_bits, int n_clamp, int sum_bits, int num_bits) -> Tensor");
  m.def("int_gelu_requant(Tensor acc, Tensor bias, Tensor gm, Tensor ge, int g_clamp, int b_int, int c_int, int shift, int one, "
        "int nm, int ne, int lo, int hi, Tensor(a!)? out=None) -> Tensor");
  m.def("int_residual_layernorm(Tensor a, Tensor bias, Tensor am, Tensor ae, Tensor h, int hm, int he, int res_clamp, "
        "Tensor gamma, Tensor beta, int norm_bits, int lm, int le, Tensor(a!)? out, int[] code_rq, Tensor(b!)[] codes) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdlsq, CPU, m) {
  m.impl("int_requant", &requant);
  m.impl("int_requant_split", &requant_split);
  m.impl("int_softmax_requant", &softmax_requant);
  m.impl("int_attention", &attention);
  m.impl("int_embedding", &embedding);
  m.impl("int_gelu_requant", &gelu_requant);
  m.impl("int_tanh", &tanh_pair);
  m.impl("int_residual_layernorm", &residual_layernorm);
}
