// tinyllm runtime ops (CPU, float32): the small per-layer steps of a decode forward fused into
// one call each, so a decode step is not dominated by the dispatch cost of many tiny ops.
//   rms_norm:               y = w * x / sqrt(mean(x^2) + eps), per row
//   rope_:                  rotate-half RoPE applied in place to q [T, H, D] and k [T, KVH, D]
//   paged_decode_attention: one query token per sequence against its cached keys and values,
//                           read through its slot table from the paged pool (grouped-query heads)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: [T, H] f32");
  const int64_t T = x.size(0), H = x.size(1);
  auto y = torch::empty_like(x);
  const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = X + t * H;
    float ss = 0.f;
    for (int64_t i = 0; i < H; ++i) ss += xr[i] * xr[i];
    const float r = 1.f / std::sqrt(ss / float(H) + float(eps));
    for (int64_t i = 0; i < H; ++i) Y[t * H + i] = W[i] * (xr[i] * r);
  }
  return y;
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

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor kpool, torch::Tensor vpool,
                                     torch::Tensor ctx, torch::Tensor lengths,
                                     torch::Tensor starts, double scale) {
  // q [B, H, D]; pools [S, KVH, D]; ctx [B, Lmax] slots; keys start..length-1 are visible
  TORCH_CHECK(q.is_contiguous() && kpool.is_contiguous() && vpool.is_contiguous(), "contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = kpool.size(1);
  const int64_t Lmax = ctx.size(1), rep = H / KVH;
  auto out = torch::empty_like(q);
  const float *Q = q.data_ptr<float>(), *K = kpool.data_ptr<float>(), *V = vpool.data_ptr<float>();
  const int64_t *C = ctx.data_ptr<int64_t>(), *LEN = lengths.data_ptr<int64_t>(),
                *ST = starts.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(Lmax);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, kvh = h / rep;
      const float* qv = Q + i * D;
      const int64_t* slots = C + b * Lmax;
      const int64_t lo = ST[b], hi = LEN[b];
      float mx = -INFINITY;
      for (int64_t l = lo; l < hi; ++l) {
        const float* kv = K + (slots[l] * KVH + kvh) * D;
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += qv[d] * kv[d];
        p[l] = dot * float(scale);
        mx = std::max(mx, p[l]);
      }
      float sum = 0.f;
      for (int64_t l = lo; l < hi; ++l) {
        p[l] = std::exp(p[l] - mx);
        sum += p[l];
      }
      float* o = O + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t l = lo; l < hi; ++l) {
        const float* vv = V + (slots[l] * KVH + kvh) * D;
        const float w = p[l] / sum;
        for (int64_t d = 0; d < D; ++d) o[d] += w * vv[d];
      }
    }
  });
  return out;
}
