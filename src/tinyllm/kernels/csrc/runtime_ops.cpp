// tinyllm runtime ops (CPU, float32): the small per-layer steps of a decode forward fused into
// one call each, so a decode step is not dominated by the dispatch cost of many tiny ops.
//   rms_norm:               y = w * x / sqrt(mean(x^2) + eps), per row (rows may be strided, y may
//                           be x itself)
//   rope_:                  rotate-half RoPE applied in place to q [T, H, D] and k [T, KVH, D]
//   kv_write:               store keys or values [T, KVH, D] at their slots of a float32, float16
//                           or int8 pool (int8: symmetric per slot and head, as quantize_kv)
//   paged_decode_attention: one query token per sequence against its cached keys and values,
//                           read through its slot table from the paged pool (grouped-query heads;
//                           a float32, float16 or int8 pool)
// Every op that returns a tensor takes an optional `out` to write into instead (the runtime's
// preallocated workspace), and scratch memory is per thread and grows only: a steady-state
// decode step allocates nothing.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TINYLLM_AVX2 1
#endif

// `out` when given (checked: float32, contiguous, the expected shape), else a new tensor
torch::Tensor output(const std::optional<torch::Tensor>& out, at::IntArrayRef sizes,
                     const torch::TensorOptions& options) {
  if (!out.has_value()) return torch::empty(sizes, options);
  TORCH_CHECK(out->dtype() == torch::kFloat32 && out->is_contiguous() && out->sizes() == sizes,
              "out must be a contiguous float32 tensor of shape ", sizes, ", got ", out->sizes());
  return *out;
}

// Per-thread scratch that only grows (slot: which buffer; a caller and the parallel workers it
// starts use different slots)
float* scratch_f32(int64_t n, int slot) {
  thread_local std::vector<float> bufs[4];
  auto& b = bufs[slot];
  if (int64_t(b.size()) < n) b.resize(n);
  return b.data();
}
int8_t* scratch_i8(int64_t n, int slot) {
  thread_local std::vector<int8_t> bufs[2];
  auto& b = bufs[slot];
  if (int64_t(b.size()) < n) b.resize(n);
  return b.data();
}

// rows of a [R, D] or [T, H, D] tensor whose last dim is contiguous (and heads packed): the
// pointer of row r
struct Rows {
  float* base;
  int64_t R, D, H, s0, s1;
  Rows(torch::Tensor& x) : base(x.data_ptr<float>()), D(x.size(-1)) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.stride(-1) == 1 && (x.dim() == 2 || x.dim() == 3),
                "rms_norm: float32 [R, D] or [T, H, D] with contiguous rows");
    H = x.dim() == 3 ? x.size(1) : 1;
    s1 = x.dim() == 3 ? x.stride(1) : 0;
    s0 = x.stride(0);
    R = x.size(0) * H;
  }
  float* row(int64_t r) const { return base + (r / H) * s0 + (r % H) * s1; }
};

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps,
                       std::optional<torch::Tensor> out) {
  torch::Tensor y = out.has_value() ? *out : torch::empty(x.sizes(), x.options());
  TORCH_CHECK(y.sizes() == x.sizes(), "rms_norm: out must have x's shape");
  Rows xr(x), yr(y);
  const int64_t D = xr.D;
  TORCH_CHECK(w.numel() == D && w.is_contiguous() && w.dtype() == torch::kFloat32, "bad weight");
  const float* W = w.data_ptr<float>();
  for (int64_t r = 0; r < xr.R; ++r) {
    const float* xv = xr.row(r);
    float* yv = yr.row(r);
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) ss += xv[i] * xv[i];
    const float inv = 1.f / std::sqrt(ss / float(D) + float(eps));
    for (int64_t i = 0; i < D; ++i) yv[i] = W[i] * (xv[i] * inv);
  }
  return y;
}

// int8 codes of one row as quantize_kv makes them: round(x / (amax / 127)), ties to even. Not
// fast-math: x / s must not become x * (1 / s), or a code could differ from PyTorch's.
__attribute__((optimize("no-fast-math"))) static float quantize_row(const float* x, int8_t* q,
                                                                     int64_t D) {
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float s = amax / 127.0f, div = s > 0.f ? s : 1.f;
  for (int64_t d = 0; d < D; ++d)
    q[d] = int8_t(std::min(127.f, std::max(-127.f, std::nearbyint(x[d] / div))));
  return s;
}

void kv_write(torch::Tensor pool, torch::Tensor scales, torch::Tensor slots, torch::Tensor x) {
  // x [T, KVH, D] float32, heads and dims contiguous (rows may be strided); pool [S, KVH, D]
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 3 && x.stride(2) == 1 &&
              x.stride(1) == x.size(2) && pool.is_contiguous() && pool.dim() == 3 &&
              pool.size(1) == x.size(1) && pool.size(2) == x.size(2) &&
              slots.dtype() == torch::kInt64 && slots.numel() == x.size(0), "kv_write: bad args");
  const int64_t T = x.size(0), KVH = x.size(1), D = x.size(2), S = pool.size(0);
  const float* X = x.data_ptr<float>();
  const int64_t* SL = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(SL[t] >= 0 && SL[t] < S, "kv_write: bad slot");
  const int64_t n = KVH * D;
  if (pool.dtype() == torch::kInt8) {
    TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.is_contiguous() &&
                scales.numel() == S * KVH, "kv_write: an int8 pool needs scales [S, KVH]");
    int8_t* P = pool.data_ptr<int8_t>();
    float* SC = scales.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < KVH; ++h)
        SC[SL[t] * KVH + h] = quantize_row(X + t * x.stride(0) + h * D, P + SL[t] * n + h * D, D);
  } else if (pool.dtype() == torch::kFloat16) {
    at::Half* P = pool.data_ptr<at::Half>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < n; ++i) P[SL[t] * n + i] = at::Half(X[t * x.stride(0) + i]);
  } else {
    TORCH_CHECK(pool.dtype() == torch::kFloat32, "kv_write: pool must be float32, float16 or int8");
    float* P = pool.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      std::copy(X + t * x.stride(0), X + t * x.stride(0) + n, P + SL[t] * n);
  }
}

static void rope_rows(float* x, const float* cos, const float* sin, int64_t T, int64_t H,
                      int64_t D, int64_t row_stride) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float *c = cos + t * D, *s = sin + t * D;
    for (int64_t h = 0; h < H; ++h) {
      float* v = x + t * row_stride + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

void rope_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  // q [T, H, D], k [T, KVH, D]: heads and dims contiguous, rows may be strided (views of a
  // fused projection's output)
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == D && k.stride(2) == 1 && k.stride(1) == D &&
              cos.is_contiguous() && sin.is_contiguous(), "rope_: bad layout");
  const float *C = cos.data_ptr<float>(), *S = sin.data_ptr<float>();
  rope_rows(q.data_ptr<float>(), C, S, T, q.size(1), D, q.stride(0));
  rope_rows(k.data_ptr<float>(), C, S, T, k.size(1), D, k.stride(0));
}

// dot(q, k) and o += w * v over D values; k and v are float32 or float16 (the KV cache dtype)
static inline float dot_row(const float* q, const float* k, int64_t D) {
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) acc += q[d] * k[d];
  return acc;
}
static inline void axpy_row(float w, const float* v, float* o, int64_t D) {
  for (int64_t d = 0; d < D; ++d) o[d] += w * v[d];
}
static inline float dot_row(const float* q, const at::Half* k, int64_t D) {
#ifdef __AVX512F__
  if (D % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d),
                            _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(k + d))), acc);
    return _mm512_reduce_add_ps(acc);
  }
#elif defined(TINYLLM_AVX2)
  if (D % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d),
                            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(k + d))), acc);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    float sum = 0.f;
    for (int i = 0; i < 8; ++i) sum += lanes[i];
    return sum;
  }
#endif
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) acc += q[d] * float(k[d]);
  return acc;
}
static inline void axpy_row(float w, const at::Half* v, float* o, int64_t D) {
#ifdef __AVX512F__
  if (D % 16 == 0) {
    const __m512 wv = _mm512_set1_ps(w);
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 vv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(v + d)));
      _mm512_storeu_ps(o + d, _mm512_fmadd_ps(wv, vv, _mm512_loadu_ps(o + d)));
    }
    return;
  }
#elif defined(TINYLLM_AVX2)
  if (D % 8 == 0) {
    const __m256 wv = _mm256_set1_ps(w);
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(v + d)));
      _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, vv, _mm256_loadu_ps(o + d)));
    }
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) o[d] += w * float(v[d]);
}

// int8 keys and values (an int8 pool; their per-head scale is applied by the caller)
static inline float dot_row(const float* q, const int8_t* k, int64_t D) {
#ifdef __AVX512F__
  if (D % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d),
                            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                _mm_loadu_si128((const __m128i*)(k + d)))), acc);
    return _mm512_reduce_add_ps(acc);
  }
#elif defined(TINYLLM_AVX2)
  if (D % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                _mm_loadl_epi64((const __m128i*)(k + d)))), acc);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    float sum = 0.f;
    for (int i = 0; i < 8; ++i) sum += lanes[i];
    return sum;
  }
#endif
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) acc += q[d] * float(k[d]);
  return acc;
}
static inline void axpy_row(float w, const int8_t* v, float* o, int64_t D) {
#ifdef __AVX512F__
  if (D % 16 == 0) {
    const __m512 wv = _mm512_set1_ps(w);
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 vv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(v + d))));
      _mm512_storeu_ps(o + d, _mm512_fmadd_ps(wv, vv, _mm512_loadu_ps(o + d)));
    }
    return;
  }
#elif defined(TINYLLM_AVX2)
  if (D % 8 == 0) {
    const __m256 wv = _mm256_set1_ps(w);
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 vv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(v + d))));
      _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, vv, _mm256_loadu_ps(o + d)));
    }
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) o[d] += w * float(v[d]);
}

// KS, VS: an int8 pool's per-(slot, KV head) scales; nullptr for float pools
template <typename KV>
static void decode_attention(const float* Q, int64_t QS, const KV* K, const KV* V,
                             const int64_t* C, int64_t CS, const int64_t* LEN,
                             const int64_t* ST, float* O, int64_t B, int64_t H, int64_t KVH,
                             int64_t D, int64_t Lmax, float scale,
                             const float* KS = nullptr, const float* VS = nullptr) {
  const int64_t rep = H / KVH;
  // one work item per (sequence, KV head): each cached key and value row is read once and used
  // by every query head of its group
  at::parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
    float* p = scratch_f32(rep * Lmax, 3);  // this worker's scores
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KVH, kvh = i % KVH;
      const int64_t* slots = C + b * CS;
      const int64_t lo = ST[b], hi = LEN[b];
      const float* qb = Q + b * QS + kvh * rep * D;  // rep query heads, contiguous
      for (int64_t l = lo; l < hi; ++l) {
        const KV* kv = K + (slots[l] * KVH + kvh) * D;
        const float ks = KS ? KS[slots[l] * KVH + kvh] * scale : scale;
        for (int64_t r = 0; r < rep; ++r) p[r * Lmax + l] = dot_row(qb + r * D, kv, D) * ks;
      }
      for (int64_t r = 0; r < rep; ++r) {
        float* pr = p + r * Lmax;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t l = lo; l < hi; ++l) mx = std::max(mx, pr[l]);
        for (int64_t l = lo; l < hi; ++l) {
          pr[l] = std::exp(pr[l] - mx);
          sum += pr[l];
        }
        for (int64_t l = lo; l < hi; ++l) pr[l] /= sum;
        float* o = O + (b * H + kvh * rep + r) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      }
      for (int64_t l = lo; l < hi; ++l) {
        const KV* vv = V + (slots[l] * KVH + kvh) * D;
        const float vs = VS ? VS[slots[l] * KVH + kvh] : 1.f;
        for (int64_t r = 0; r < rep; ++r)
          axpy_row(p[r * Lmax + l] * vs, vv, O + (b * H + kvh * rep + r) * D, D);
      }
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor kpool, torch::Tensor vpool,
                                     torch::Tensor ctx, torch::Tensor lengths,
                                     torch::Tensor starts, double scale, torch::Tensor kscale,
                                     torch::Tensor vscale, std::optional<torch::Tensor> o) {
  // q [B, H, D] float32 (rows may be strided); pools [S, KVH, D] float32, float16 or int8 (then kscale/vscale
  // [S, KVH] float32, else empty); ctx [B, Lmax] slots; keys starts[b]..lengths[b]-1 are visible
  // q's rows may be strided (a view of a fused projection's output), its heads packed
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3 && q.stride(2) == 1 &&
              q.stride(1) == q.size(2), "q: float32 [B, H, D], heads and dims contiguous");
  TORCH_CHECK(kpool.is_contiguous() && vpool.is_contiguous(), "contiguous pools");
  TORCH_CHECK(ctx.dtype() == torch::kInt64 && ctx.dim() == 2 && ctx.stride(1) == 1 &&
              lengths.is_contiguous() && starts.is_contiguous(),
              "ctx: int64 [B, Lmax], rows may be strided; lengths, starts contiguous");
  TORCH_CHECK(kpool.dtype() == vpool.dtype(), "K and V pools must share a dtype");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = kpool.size(1);
  auto out = output(o, q.sizes(), q.options());
  const int64_t *C = ctx.data_ptr<int64_t>(), *LEN = lengths.data_ptr<int64_t>(),
                *ST = starts.data_ptr<int64_t>();
  if (kpool.dtype() == torch::kInt8) {
    TORCH_CHECK(kscale.numel() == kpool.size(0) * KVH && vscale.numel() == kscale.numel() &&
                kscale.is_contiguous() && vscale.is_contiguous() &&
                kscale.dtype() == torch::kFloat32, "an int8 pool needs float32 scales [S, KVH]");
    decode_attention(q.data_ptr<float>(), q.stride(0), kpool.data_ptr<int8_t>(), vpool.data_ptr<int8_t>(),
                     C, ctx.stride(0), LEN, ST, out.data_ptr<float>(), B, H, KVH, D, ctx.size(1), float(scale),
                     kscale.data_ptr<float>(), vscale.data_ptr<float>());
  } else if (kpool.dtype() == torch::kFloat16) {
    decode_attention(q.data_ptr<float>(), q.stride(0), kpool.data_ptr<at::Half>(), vpool.data_ptr<at::Half>(),
                     C, ctx.stride(0), LEN, ST, out.data_ptr<float>(), B, H, KVH, D, ctx.size(1), float(scale));
  } else {
    decode_attention(q.data_ptr<float>(), q.stride(0), kpool.data_ptr<float>(), vpool.data_ptr<float>(), C,
                     ctx.stride(0), LEN, ST, out.data_ptr<float>(), B, H, KVH, D, ctx.size(1),
                     float(scale));
  }
  return out;
}

torch::Tensor q4_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale,
                      torch::Tensor zero, int64_t group, std::optional<torch::Tensor> out);
torch::Tensor q4_gemv_i8(torch::Tensor x, torch::Tensor codes, torch::Tensor scale,
                         torch::Tensor zero, int64_t group, std::optional<torch::Tensor> out);

// One decoder block of a decode step, the same kernels and ATen ops in the same order as the
// Python block (LeanRuntime._block), so the same floats; one call instead of a dozen from
// Python per layer. x [T, hidden] is updated in place.
//   lin:   codes, scale, zero of the fused q/k/v, o, gate/up and down linears (q4 layout)
//   norms: attn, mlp, q, k, post-attention, post-MLP weights (an empty tensor: none)
//   kv:    the layer's K and V pools and their scales (empty for float pools)
//   bufs:  workspace outputs: h [T, hidden], qkv, attn [T, heads * hd], proj [T, hidden],
//          gate_up [T, 2F], act [T, F]
//   act:   0 silu, 1 gelu (tanh approximation), 2 gelu
void decode_block(torch::Tensor x, std::vector<torch::Tensor> lin, std::vector<int64_t> groups,
                  bool i8, std::vector<torch::Tensor> norms, double eps, int64_t heads,
                  int64_t kv_heads, int64_t act, torch::Tensor cos, torch::Tensor sin,
                  std::vector<torch::Tensor> kv, torch::Tensor slots, torch::Tensor ctx,
                  torch::Tensor lengths, torch::Tensor starts, double scale,
                  std::vector<torch::Tensor> bufs) {
  TORCH_CHECK(lin.size() == 12 && groups.size() == 4 && norms.size() == 6 && kv.size() == 4 &&
              bufs.size() == 6, "decode_block: bad argument lists");
  auto gemv = [&](int j, const torch::Tensor& in, const torch::Tensor& out) {
    auto f = i8 ? q4_gemv_i8 : q4_gemv;
    return f(in, lin[3 * j], lin[3 * j + 1], lin[3 * j + 2], groups[j], out);
  };
  const int64_t T = x.size(0), hd = cos.size(1);
  auto h = rms_norm(x, norms[0], eps, bufs[0]);
  auto qkv = gemv(0, h, bufs[1]);
  auto q = qkv.narrow(1, 0, heads * hd).view({T, heads, hd});
  auto k = qkv.narrow(1, heads * hd, kv_heads * hd).view({T, kv_heads, hd});
  auto v = qkv.narrow(1, (heads + kv_heads) * hd, kv_heads * hd).view({T, kv_heads, hd});
  if (norms[2].numel()) {
    rms_norm(q, norms[2], eps, q);
    rms_norm(k, norms[3], eps, k);
  }
  rope_(q, k, cos, sin);
  kv_write(kv[0], kv[2], slots, k);
  kv_write(kv[1], kv[3], slots, v);
  paged_decode_attention(q, kv[0], kv[1], ctx, lengths, starts, scale, kv[2], kv[3],
                         bufs[2].view({T, heads, hd}));
  auto o = gemv(1, bufs[2], bufs[3]);
  if (norms[4].numel()) rms_norm(o, norms[4], eps, o);
  x.add_(o);
  rms_norm(x, norms[1], eps, h);
  auto gu = gemv(2, h, bufs[4]);
  const int64_t F = gu.size(1) / 2;
  auto gate = gu.narrow(1, 0, F), up = gu.narrow(1, F, F);
  if (act == 0) at::silu_(gate);
  else at::gelu_(gate, act == 1 ? "tanh" : "none");
  at::mul_out(bufs[5], gate, up);
  auto d = gemv(3, bufs[5], bufs[3]);
  if (norms[5].numel()) rms_norm(d, norms[5], eps, d);
  x.add_(d);
}
