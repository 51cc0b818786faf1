// tinyllm 4-bit and 8-bit GEMV/small GEMM for decode (few rows): y = x @ W^T with W stored as 4-bit codes and
// per-(row, group) scale and zero point, w = s * (q - z).
//
// Layout (made once by repack_q4): 16 output rows are interleaved so one 16-byte load holds the
// same input pair (2j, 2j+1) of 16 rows: codes [N/16, K/2, 16] with the low nibble for column 2j
// and the high nibble for column 2j+1; scales and zeros float16 [N/16, G, 16] (the record's own
// fp16 scales and integer zero points, so exact). The 16 lanes are 16 output
// rows, so a group ends with 16 independent multiply-adds and no horizontal sums:
//   y[n] = sum_g s[n,g] * (sum_{k in g} q[n,k] x[k] - z[n,g] * sum_{k in g} x[k]).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
// The AVX2 paths need FMA and F16C too (every AVX2 CPU has them; -march=native enables them).
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TINYLLM_AVX2 1
#endif

constexpr int64_t L = 16;

// runtime_ops.cpp: `out` or a new tensor; per-thread grow-only scratch (slots 0-2 here)
torch::Tensor output(const std::optional<torch::Tensor>& out, at::IntArrayRef sizes,
                     const torch::TensorOptions& options);
float* scratch_f32(int64_t n, int slot);
int8_t* scratch_i8(int64_t n, int slot);

// One tile: rows m0..m0+MT of x against the 16 output rows of lane block b. The 4-bit codes of
// each input pair are widened to float once and used for every row of the tile, so a batch of
// decoding sequences reads and converts the weights once per tile instead of once per row.
#ifdef __AVX512F__
template <int MT>
static inline void q4_tile(const float* X, const float* GX, const uint8_t* W, const at::Half* S,
                           const at::Half* Z, float* Y, int64_t b, int64_t m0, int64_t K, int64_t N,
                           int64_t G, int64_t half) {
  // Separate accumulators for even and odd columns, and for U input pairs at a time when the
  // tile is small, so consecutive multiply-adds do not wait on each other's results.
  constexpr int U = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
  const __m512i low = _mm512_set1_epi32(15);
  __m512 out[MT];
  for (int t = 0; t < MT; ++t) out[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 ae[U][MT], ao[U][MT];
    for (int u = 0; u < U; ++u)
      for (int t = 0; t < MT; ++t) ae[u][t] = ao[u][t] = _mm512_setzero_ps();
    const uint8_t* c = W + (b * (K / 2) + g * half) * L;
    const float* xg = X + m0 * K + g * 2 * half;  // row m0, first column of group g
    int64_t j = 0;
    for (; j + U <= half; j += U) {
      for (int u = 0; u < U; ++u) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(c + (j + u) * L)));
        const __m512 we = _mm512_cvtepi32_ps(_mm512_and_si512(q, low));
        const __m512 wo = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
        for (int t = 0; t < MT; ++t) {
          const float* xr = xg + t * K + 2 * (j + u);
          ae[u][t] = _mm512_fmadd_ps(we, _mm512_set1_ps(xr[0]), ae[u][t]);
          ao[u][t] = _mm512_fmadd_ps(wo, _mm512_set1_ps(xr[1]), ao[u][t]);
        }
      }
    }
    for (; j < half; ++j) {
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(c + j * L)));
      const __m512 we = _mm512_cvtepi32_ps(_mm512_and_si512(q, low));
      const __m512 wo = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
      for (int t = 0; t < MT; ++t) {
        const float* xr = xg + t * K + 2 * j;
        ae[0][t] = _mm512_fmadd_ps(we, _mm512_set1_ps(xr[0]), ae[0][t]);
        ao[0][t] = _mm512_fmadd_ps(wo, _mm512_set1_ps(xr[1]), ao[0][t]);
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(S + (b * G + g) * L)));
    const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(Z + (b * G + g) * L)));
    for (int t = 0; t < MT; ++t) {
      __m512 acc = _mm512_add_ps(ae[0][t], ao[0][t]);
      for (int u = 1; u < U; ++u) acc = _mm512_add_ps(acc, _mm512_add_ps(ae[u][t], ao[u][t]));
      const __m512 sx = _mm512_set1_ps(GX[(m0 + t) * G + g]);
      out[t] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, sx, acc), out[t]);
    }
  }
  for (int t = 0; t < MT; ++t) _mm512_storeu_ps(Y + (m0 + t) * N + b * L, out[t]);
}
#elif defined(TINYLLM_AVX2)
// AVX2: the 16 lanes as two 8-float halves (rows 0-7 and 8-15 of the lane block). Even and odd
// columns accumulate into one register per row half (16 registers only: tiles of at most 4 rows).
template <int MT>
static inline void q4_tile(const float* X, const float* GX, const uint8_t* W, const at::Half* S,
                           const at::Half* Z, float* Y, int64_t b, int64_t m0, int64_t K, int64_t N,
                           int64_t G, int64_t half) {
  constexpr int U = MT == 1 ? 4 : (MT == 2 ? 2 : 1);  // 8 independent chains
  const __m256i low = _mm256_set1_epi32(15);
  __m256 out[MT][2];
  for (int t = 0; t < MT; ++t) out[t][0] = out[t][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[U][MT][2];
    for (int u = 0; u < U; ++u)
      for (int t = 0; t < MT; ++t) acc[u][t][0] = acc[u][t][1] = _mm256_setzero_ps();
    const uint8_t* c = W + (b * (K / 2) + g * half) * L;
    const float* xg = X + m0 * K + g * 2 * half;
    auto step = [&](int u, int64_t jj) {
      const __m128i raw = _mm_loadu_si128((const __m128i*)(c + jj * L));
      const __m256i q[2] = {_mm256_cvtepu8_epi32(raw), _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8))};
      for (int h = 0; h < 2; ++h) {
        const __m256 we = _mm256_cvtepi32_ps(_mm256_and_si256(q[h], low));
        const __m256 wo = _mm256_cvtepi32_ps(_mm256_srli_epi32(q[h], 4));
        for (int t = 0; t < MT; ++t) {
          const float* xr = xg + t * K + 2 * jj;
          acc[u][t][h] = _mm256_fmadd_ps(we, _mm256_set1_ps(xr[0]), acc[u][t][h]);
          acc[u][t][h] = _mm256_fmadd_ps(wo, _mm256_set1_ps(xr[1]), acc[u][t][h]);
        }
      }
    };
    int64_t j = 0;
    for (; j + U <= half; j += U)
      for (int u = 0; u < U; ++u) step(u, j + u);
    for (; j < half; ++j) step(0, j);
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(S + (b * G + g) * L + 8 * h)));
      const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(Z + (b * G + g) * L + 8 * h)));
      for (int t = 0; t < MT; ++t) {
        __m256 a = acc[0][t][h];
        for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[u][t][h]);
        const __m256 sx = _mm256_set1_ps(GX[(m0 + t) * G + g]);
        out[t][h] = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, sx, a), out[t][h]);
      }
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(Y + (m0 + t) * N + b * L + 8 * h, out[t][h]);
}
#else
template <int MT>
static inline void q4_tile(const float* X, const float* GX, const uint8_t* W, const at::Half* S,
                           const at::Half* Z, float* Y, int64_t b, int64_t m0, int64_t K, int64_t N,
                           int64_t G, int64_t half) {
  float out[MT][L] = {};
  for (int64_t g = 0; g < G; ++g) {
    float acc[MT][L] = {};
    for (int64_t j = g * half; j < (g + 1) * half; ++j) {
      const uint8_t* c = W + (b * (K / 2) + j) * L;
      float we[L], wo[L];
      for (int64_t l = 0; l < L; ++l) {
        we[l] = float(c[l] & 15);
        wo[l] = float(c[l] >> 4);
      }
      for (int t = 0; t < MT; ++t) {
        const float e = X[(m0 + t) * K + 2 * j], o = X[(m0 + t) * K + 2 * j + 1];
        for (int64_t l = 0; l < L; ++l) acc[t][l] += we[l] * e + wo[l] * o;
      }
    }
    const at::Half* s = S + (b * G + g) * L;
    const at::Half* z = Z + (b * G + g) * L;
    for (int t = 0; t < MT; ++t) {
      const float sx = GX[(m0 + t) * G + g];
      for (int64_t l = 0; l < L; ++l)
        out[t][l] += float(s[l]) * (acc[t][l] - float(z[l]) * sx);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int64_t l = 0; l < L; ++l) Y[(m0 + t) * N + b * L + l] = out[t][l];
}
#endif

torch::Tensor q4_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale,
                      torch::Tensor zero, int64_t group, std::optional<torch::Tensor> out) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), B = codes.size(0), N = B * L, G = K / group;
  TORCH_CHECK(codes.size(1) * 2 == K && K % group == 0 && group % 2 == 0, "bad shapes");
  auto xs = x.contiguous();
  auto y = output(out, {M, N}, x.options());
  const float* X = xs.data_ptr<float>();
  float* gsum = scratch_f32(M * G, 2);  // sum of x over each group: the zero point's share
  std::fill(gsum, gsum + M * G, 0.f);
  for (int64_t i = 0; i < M * K; ++i) gsum[i / group] += X[i];
  const float* GX = gsum;
  const uint8_t* W = codes.data_ptr<uint8_t>();
  const at::Half *S = scale.data_ptr<at::Half>(), *Z = zero.data_ptr<at::Half>();
  float* Y = y.data_ptr<float>();
  const int64_t half = group / 2;
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
#ifndef TINYLLM_AVX2  // AVX2 has 16 vector registers: its widest tile is 4 rows
      for (; m + 8 <= M; m += 8) q4_tile<8>(X, GX, W, S, Z, Y, b, m, K, N, G, half);
#endif
      for (; m + 4 <= M; m += 4) q4_tile<4>(X, GX, W, S, Z, Y, b, m, K, N, G, half);
      for (; m + 2 <= M; m += 2) q4_tile<2>(X, GX, W, S, Z, Y, b, m, K, N, G, half);
      for (; m < M; ++m) q4_tile<1>(X, GX, W, S, Z, Y, b, m, K, N, G, half);
    }
  });
  return y;
}

// The same product with activations quantized to int8 per block of 32 inputs (as llama.cpp's
// Q8_0 blocks) and integer dot products (AVX512-VNNI vpdpbusd: 4-bit codes as u8 x int8
// activations, 64 products per instruction). Not exact: each block of x is rounded to 255 levels
// of its absolute maximum. y[n] = sum_g s * sum_{blocks} sa * (sum q*xi - z * sum xi).
// Needs groups (and K) in multiples of 32; the caller checks `q4_i8_supported()`.
std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(TINYLLM_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

bool q4_i8_supported() {
#if (defined(__AVX512VNNI__) && defined(__AVX512VBMI__)) || defined(TINYLLM_AVX2)
  return true;
#else
  return false;
#endif
}

// Activations rounded to int8 per block of 32 inputs (symmetric, amax -> 127), in plain C++ (the
// AVX2 kernels' input; M x K work, small next to the product): codes of the even and odd columns
// (the nibble order) or of every column, the block scales and the blocks' code sums.
[[maybe_unused]] static void quantize_blocks(const float* X, int64_t M, int64_t K, int8_t* XE, int8_t* XO,
                            int8_t* XQ, float* SA, float* SX) {
  const int64_t KB = K / 32, H2 = K / 2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t blk = 0; blk < KB; ++blk) {
      const float* xb = X + m * K + blk * 32;
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int i = 0; i < 32; ++i) {
        const int8_t q = int8_t(std::nearbyint(xb[i] * inv));
        sum += q;
        if (XQ) XQ[m * K + blk * 32 + i] = q;
        if (XE) (i % 2 ? XO : XE)[m * H2 + blk * 16 + i / 2] = q;
      }
      SA[m * KB + blk] = amax / 127.f;
      SX[m * KB + blk] = float(sum);
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
// 64 bytes laid out [4 columns][16 rows] -> [16 rows][4 columns]: each row's four bytes become
// one dword, the operand order vpdpbusd multiplies in.
alignas(64) static const uint8_t kRowsOf4[64] = {
    0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21,
    37, 53, 6, 22, 38, 54, 7, 23, 39, 55, 8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58,
    11, 27, 43, 59, 12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};

template <int MT>
static inline void q4_i8_tile(const int8_t* XE, const int8_t* XO, const float* SA,
                              const float* SX, const uint8_t* W, const at::Half* S,
                              const at::Half* Z, float* Y, int64_t b, int64_t m0, int64_t K,
                              int64_t N, int64_t G, int64_t group) {
  // 64 bytes = pairs j..j+3 of 16 rows, j-major; kRowsOf4 makes row l's dword = pairs j..j+3
  const __m512i perm = _mm512_load_si512((const void*)kRowsOf4);
  const __m512i nib = _mm512_set1_epi8(15);
  const int64_t KB = K / 32, H2 = K / 2;
  __m512 out[MT];
  for (int t = 0; t < MT; ++t) out[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(Z + (b * G + g) * L)));
    __m512 fg[MT];
    for (int t = 0; t < MT; ++t) fg[t] = _mm512_setzero_ps();
    for (int64_t blk = g * group / 32; blk < (g + 1) * group / 32; ++blk) {
      __m512i lo_acc[MT], hi_acc[MT];
      for (int t = 0; t < MT; ++t) lo_acc[t] = hi_acc[t] = _mm512_setzero_si512();
      for (int64_t j = blk * 16; j < blk * 16 + 16; j += 4) {
        const __m512i raw = _mm512_loadu_si512((const void*)(W + (b * H2 + j) * L));
        const __m512i v = _mm512_permutexvar_epi8(perm, raw);
        const __m512i lo = _mm512_and_si512(v, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        for (int t = 0; t < MT; ++t) {
          const int32_t e = *(const int32_t*)(XE + (m0 + t) * H2 + j);
          const int32_t o = *(const int32_t*)(XO + (m0 + t) * H2 + j);
          lo_acc[t] = _mm512_dpbusd_epi32(lo_acc[t], lo, _mm512_set1_epi32(e));
          hi_acc[t] = _mm512_dpbusd_epi32(hi_acc[t], hi, _mm512_set1_epi32(o));
        }
      }
      for (int t = 0; t < MT; ++t) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[t], hi_acc[t]));
        const __m512 sa = _mm512_set1_ps(SA[(m0 + t) * KB + blk]);
        const __m512 sx = _mm512_set1_ps(SX[(m0 + t) * KB + blk]);
        fg[t] = _mm512_fmadd_ps(sa, _mm512_fnmadd_ps(z, sx, dot), fg[t]);
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(S + (b * G + g) * L)));
    for (int t = 0; t < MT; ++t) out[t] = _mm512_fmadd_ps(s, fg[t], out[t]);
  }
  for (int t = 0; t < MT; ++t) _mm512_storeu_ps(Y + (m0 + t) * N + b * L, out[t]);
}
#endif

#if defined(TINYLLM_AVX2)
// 16 int32 row sums [0-3, 8-11] and [4-7, 12-15] (what unpacklo/hi + madd give) -> rows 0-7, 8-15
static inline void rows_in_order(__m256i a, __m256i b, __m256* lo, __m256* hi) {
  *lo = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(a, b, 0x20));
  *hi = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(a, b, 0x31));
}

// AVX2 (no VNNI): each input pair's 16 codes widened to int16 and interleaved (row r: low nibble,
// high nibble), vpmaddwd against the pair's two int8 activations: one int32 per row and pair.
template <int MT>
static inline void q4_i8_tile(const int8_t* XE, const int8_t* XO, const float* SA,
                              const float* SX, const uint8_t* W, const at::Half* S,
                              const at::Half* Z, float* Y, int64_t b, int64_t m0, int64_t K,
                              int64_t N, int64_t G, int64_t group) {
  const __m256i nib = _mm256_set1_epi16(15);
  const int64_t KB = K / 32, H2 = K / 2;
  __m256 out[MT][2];
  for (int t = 0; t < MT; ++t) out[t][0] = out[t][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 z[2], s[2];
    for (int h = 0; h < 2; ++h) {
      z[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(Z + (b * G + g) * L + 8 * h)));
      s[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(S + (b * G + g) * L + 8 * h)));
    }
    __m256 fg[MT][2];
    for (int t = 0; t < MT; ++t) fg[t][0] = fg[t][1] = _mm256_setzero_ps();
    for (int64_t blk = g * group / 32; blk < (g + 1) * group / 32; ++blk) {
      __m256i acc_a[MT], acc_b[MT];
      for (int t = 0; t < MT; ++t) acc_a[t] = acc_b[t] = _mm256_setzero_si256();
      for (int64_t j = blk * 16; j < blk * 16 + 16; ++j) {
        const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(W + (b * H2 + j) * L)));
        const __m256i lo = _mm256_and_si256(c, nib), hi = _mm256_srli_epi16(c, 4);
        const __m256i pa = _mm256_unpacklo_epi16(lo, hi), pb = _mm256_unpackhi_epi16(lo, hi);
        for (int t = 0; t < MT; ++t) {
          const int16_t e = XE[(m0 + t) * H2 + j], o = XO[(m0 + t) * H2 + j];
          const __m256i xp = _mm256_set1_epi32(int32_t(uint16_t(e)) | (int32_t(o) << 16));
          acc_a[t] = _mm256_add_epi32(acc_a[t], _mm256_madd_epi16(pa, xp));
          acc_b[t] = _mm256_add_epi32(acc_b[t], _mm256_madd_epi16(pb, xp));
        }
      }
      for (int t = 0; t < MT; ++t) {
        __m256 dot[2];
        rows_in_order(acc_a[t], acc_b[t], &dot[0], &dot[1]);
        const __m256 sa = _mm256_set1_ps(SA[(m0 + t) * KB + blk]);
        const __m256 sx = _mm256_set1_ps(SX[(m0 + t) * KB + blk]);
        for (int h = 0; h < 2; ++h)
          fg[t][h] = _mm256_fmadd_ps(sa, _mm256_fnmadd_ps(z[h], sx, dot[h]), fg[t][h]);
      }
    }
    for (int t = 0; t < MT; ++t)
      for (int h = 0; h < 2; ++h) out[t][h] = _mm256_fmadd_ps(s[h], fg[t][h], out[t][h]);
  }
  for (int t = 0; t < MT; ++t)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(Y + (m0 + t) * N + b * L + 8 * h, out[t][h]);
}
#endif

torch::Tensor q4_gemv_i8(torch::Tensor x, torch::Tensor codes, torch::Tensor scale,
                         torch::Tensor zero, int64_t group, std::optional<torch::Tensor> out) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), B = codes.size(0), N = B * L, G = K / group;
  TORCH_CHECK(codes.size(1) * 2 == K && K % group == 0 && group % 32 == 0, "bad shapes");
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
  auto xs = x.contiguous();
  const float* X = xs.data_ptr<float>();
  const int64_t KB = K / 32, H2 = K / 2;
  int8_t *xe = scratch_i8(M * H2, 0), *xo = scratch_i8(M * H2, 1);
  float *sa = scratch_f32(M * KB, 0), *sx = scratch_f32(M * KB, 1);
  // symmetric int8 per block of 32 inputs, split into even and odd columns (the nibble order)
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t blk = 0; blk < KB; ++blk) {
      const float* xb = X + m * K + blk * 32;
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512i qe = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(x0, even, x1), inv));
      const __m512i qo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(x0, odd, x1), inv));
      _mm_storeu_si128((__m128i*)(xe + m * H2 + blk * 16), _mm512_cvtepi32_epi8(qe));
      _mm_storeu_si128((__m128i*)(xo + m * H2 + blk * 16), _mm512_cvtepi32_epi8(qo));
      sa[m * KB + blk] = amax / 127.f;
      sx[m * KB + blk] = float(_mm512_reduce_add_epi32(_mm512_add_epi32(qe, qo)));
    }
  auto y = output(out, {M, N}, x.options());
  const uint8_t* W = codes.data_ptr<uint8_t>();
  const at::Half *S = scale.data_ptr<at::Half>(), *Z = zero.data_ptr<at::Half>();
  float* Y = y.data_ptr<float>();
  const int8_t *XE = xe, *XO = xo;
  const float *SA = sa, *SX = sx;
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) q4_i8_tile<8>(XE, XO, SA, SX, W, S, Z, Y, b, m, K, N, G, group);
      for (; m + 4 <= M; m += 4) q4_i8_tile<4>(XE, XO, SA, SX, W, S, Z, Y, b, m, K, N, G, group);
      for (; m < M; ++m) q4_i8_tile<1>(XE, XO, SA, SX, W, S, Z, Y, b, m, K, N, G, group);
    }
  });
  return y;
#elif defined(TINYLLM_AVX2)
  auto xs = x.contiguous();
  const int64_t KB = K / 32, H2 = K / 2;
  int8_t *xe = scratch_i8(M * H2, 0), *xo = scratch_i8(M * H2, 1);
  float *sa = scratch_f32(M * KB, 0), *sx = scratch_f32(M * KB, 1);
  quantize_blocks(xs.data_ptr<float>(), M, K, xe, xo, nullptr, sa, sx);
  auto y = output(out, {M, N}, x.options());
  const uint8_t* W = codes.data_ptr<uint8_t>();
  const at::Half *S = scale.data_ptr<at::Half>(), *Z = zero.data_ptr<at::Half>();
  float* Y = y.data_ptr<float>();
  const int8_t *XE = xe, *XO = xo;
  const float *SA = sa, *SX = sx;
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) q4_i8_tile<4>(XE, XO, SA, SX, W, S, Z, Y, b, m, K, N, G, group);
      for (; m < M; ++m) q4_i8_tile<1>(XE, XO, SA, SX, W, S, Z, Y, b, m, K, N, G, group);
    }
  });
  return y;
#else
  TORCH_CHECK(false, "q4_gemv_i8 needs AVX512-VNNI or AVX2");
#endif
}

// 8-bit symmetric per-output-row GEMV/GEMM: codes int8 [N/16, K, 16] (16 rows interleaved),
// scale float [N/16, 16]: y[m, n] = s[n] * sum_k q[n, k] x[m, k].
template <int MT>
static inline void q8_tile(const float* X, const int8_t* W, const float* S, float* Y, int64_t b,
                           int64_t m0, int64_t K, int64_t N) {
#ifdef __AVX512F__
  constexpr int U = MT <= 2 ? 4 : 1;  // independent accumulators for small tiles
  __m512 a[U][MT];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < MT; ++t) a[u][t] = _mm512_setzero_ps();
  const int8_t* c = W + b * K * L;
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    for (int u = 0; u < U; ++u) {
      const __m128i raw = _mm_loadu_si128((const __m128i*)(c + (k + u) * L));
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
      for (int t = 0; t < MT; ++t)
        a[u][t] = _mm512_fmadd_ps(w, _mm512_set1_ps(X[(m0 + t) * K + k + u]), a[u][t]);
    }
  }
  for (; k < K; ++k) {
    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c + k * L))));
    for (int t = 0; t < MT; ++t)
      a[0][t] = _mm512_fmadd_ps(w, _mm512_set1_ps(X[(m0 + t) * K + k]), a[0][t]);
  }
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) {
    acc[t] = a[0][t];
    for (int u = 1; u < U; ++u) acc[t] = _mm512_add_ps(acc[t], a[u][t]);
  }
  const __m512 s = _mm512_loadu_ps(S + b * L);
  for (int t = 0; t < MT; ++t) _mm512_storeu_ps(Y + (m0 + t) * N + b * L, _mm512_mul_ps(s, acc[t]));
#elif defined(TINYLLM_AVX2)
  __m256 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  const int8_t* c = W + b * K * L;
  for (int64_t k = 0; k < K; ++k, c += L) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)c);
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)));
    for (int t = 0; t < MT; ++t) {
      const __m256 x = _mm256_set1_ps(X[(m0 + t) * K + k]);
      acc[t][0] = _mm256_fmadd_ps(w0, x, acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(w1, x, acc[t][1]);
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m256 s = _mm256_loadu_ps(S + b * L + 8 * h);
    for (int t = 0; t < MT; ++t)
      _mm256_storeu_ps(Y + (m0 + t) * N + b * L + 8 * h, _mm256_mul_ps(s, acc[t][h]));
  }
#else
  float acc[MT][L] = {};
  const int8_t* c = W + b * K * L;
  for (int64_t k = 0; k < K; ++k, c += L)
    for (int t = 0; t < MT; ++t)
      for (int64_t l = 0; l < L; ++l) acc[t][l] += float(c[l]) * X[(m0 + t) * K + k];
  for (int t = 0; t < MT; ++t)
    for (int64_t l = 0; l < L; ++l) Y[(m0 + t) * N + b * L + l] = S[b * L + l] * acc[t][l];
#endif
}

torch::Tensor q8_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale,
                      std::optional<torch::Tensor> out) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), B = codes.size(0), N = B * L;
  TORCH_CHECK(codes.size(1) == K && codes.size(2) == L, "bad shapes");
  auto xs = x.contiguous();
  auto y = output(out, {M, N}, x.options());
  const float* X = xs.data_ptr<float>();
  const int8_t* W = codes.data_ptr<int8_t>();
  const float* S = scale.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
#ifndef TINYLLM_AVX2
      for (; m + 8 <= M; m += 8) q8_tile<8>(X, W, S, Y, b, m, K, N);
#endif
      for (; m + 4 <= M; m += 4) q8_tile<4>(X, W, S, Y, b, m, K, N);
      for (; m + 2 <= M; m += 2) q8_tile<2>(X, W, S, Y, b, m, K, N);
      for (; m < M; ++m) q8_tile<1>(X, W, S, Y, b, m, K, N);
    }
  });
  return y;
}

// 8-bit per-row weights x int8 activations (per block of 32), integer dot products. vpdpbusd
// multiplies u8 x s8, so the weights are read as u8 (w + 128, one xor) and the activations stay
// signed: sum (w + 128) x = sum w x + 128 sum x, and 128 * sum x is taken off per block.
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
template <int MT>
static inline void q8_i8_tile(const int8_t* XQ, const float* SA, const float* SX,
                              const int8_t* W, const float* S, float* Y, int64_t b, int64_t m0,
                              int64_t K, int64_t N) {
  const __m512i perm = _mm512_load_si512((const void*)kRowsOf4);
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const int64_t KB = K / 32;
  __m512 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < KB; ++blk) {
    __m512i dot[MT];
    for (int t = 0; t < MT; ++t) dot[t] = _mm512_setzero_si512();
    for (int64_t k = blk * 32; k < blk * 32 + 32; k += 4) {
      const __m512i raw = _mm512_loadu_si512((const void*)(W + (b * K + k) * L));
      const __m512i w = _mm512_xor_si512(_mm512_permutexvar_epi8(perm, raw), flip);
      for (int t = 0; t < MT; ++t) {
        const int32_t xq = *(const int32_t*)(XQ + (m0 + t) * K + k);
        dot[t] = _mm512_dpbusd_epi32(dot[t], w, _mm512_set1_epi32(xq));
      }
    }
    for (int t = 0; t < MT; ++t) {
      const __m512 d = _mm512_cvtepi32_ps(dot[t]);
      const __m512 corr = _mm512_set1_ps(128.f * SX[(m0 + t) * KB + blk]);
      acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(SA[(m0 + t) * KB + blk]), _mm512_sub_ps(d, corr),
                               acc[t]);
    }
  }
  const __m512 s = _mm512_loadu_ps(S + b * L);
  for (int t = 0; t < MT; ++t) _mm512_storeu_ps(Y + (m0 + t) * N + b * L, _mm512_mul_ps(s, acc[t]));
}
#endif

#if defined(TINYLLM_AVX2)
// AVX2: inputs k and k+1 of 16 rows widened to int16 and interleaved, vpmaddwd against the two
// int8 activations: one int32 per row and input pair (|w|, |x| <= 127: no overflow in a block).
template <int MT>
static inline void q8_i8_tile(const int8_t* XQ, const float* SA, const float* SX,
                              const int8_t* W, const float* S, float* Y, int64_t b, int64_t m0,
                              int64_t K, int64_t N) {
  const int64_t KB = K / 32;
  __m256 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < KB; ++blk) {
    __m256i da[MT], db[MT];
    for (int t = 0; t < MT; ++t) da[t] = db[t] = _mm256_setzero_si256();
    for (int64_t k = blk * 32; k < blk * 32 + 32; k += 2) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(W + (b * K + k) * L)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(W + (b * K + k + 1) * L)));
      const __m256i pa = _mm256_unpacklo_epi16(w0, w1), pb = _mm256_unpackhi_epi16(w0, w1);
      for (int t = 0; t < MT; ++t) {
        const int16_t x0 = XQ[(m0 + t) * K + k], x1 = XQ[(m0 + t) * K + k + 1];
        const __m256i xp = _mm256_set1_epi32(int32_t(uint16_t(x0)) | (int32_t(x1) << 16));
        da[t] = _mm256_add_epi32(da[t], _mm256_madd_epi16(pa, xp));
        db[t] = _mm256_add_epi32(db[t], _mm256_madd_epi16(pb, xp));
      }
    }
    for (int t = 0; t < MT; ++t) {
      __m256 dot[2];
      rows_in_order(da[t], db[t], &dot[0], &dot[1]);
      const __m256 sa = _mm256_set1_ps(SA[(m0 + t) * KB + blk]);
      for (int h = 0; h < 2; ++h) acc[t][h] = _mm256_fmadd_ps(sa, dot[h], acc[t][h]);
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m256 s = _mm256_loadu_ps(S + b * L + 8 * h);
    for (int t = 0; t < MT; ++t)
      _mm256_storeu_ps(Y + (m0 + t) * N + b * L + 8 * h, _mm256_mul_ps(s, acc[t][h]));
  }
}
#endif

torch::Tensor q8_gemv_i8(torch::Tensor x, torch::Tensor codes, torch::Tensor scale,
                         std::optional<torch::Tensor> out) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), B = codes.size(0), N = B * L;
  TORCH_CHECK(codes.size(1) == K && codes.size(2) == L && K % 32 == 0, "bad shapes");
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
  auto xs = x.contiguous();
  const float* X = xs.data_ptr<float>();
  const int64_t KB = K / 32;
  int8_t* xq = scratch_i8(M * K, 0);
  float *sa = scratch_f32(M * KB, 0), *sx = scratch_f32(M * KB, 1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t blk = 0; blk < KB; ++blk) {
      const float* xb = X + m * K + blk * 32;
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
      _mm_storeu_si128((__m128i*)(xq + m * K + blk * 32), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128((__m128i*)(xq + m * K + blk * 32 + 16), _mm512_cvtepi32_epi8(q1));
      sa[m * KB + blk] = amax / 127.f;
      sx[m * KB + blk] = float(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    }
  auto y = output(out, {M, N}, x.options());
  const int8_t* W = codes.data_ptr<int8_t>();
  const float* S = scale.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int8_t* XQ = xq;
  const float *SA = sa, *SX = sx;
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) q8_i8_tile<8>(XQ, SA, SX, W, S, Y, b, m, K, N);
      for (; m + 4 <= M; m += 4) q8_i8_tile<4>(XQ, SA, SX, W, S, Y, b, m, K, N);
      for (; m < M; ++m) q8_i8_tile<1>(XQ, SA, SX, W, S, Y, b, m, K, N);
    }
  });
  return y;
#elif defined(TINYLLM_AVX2)
  auto xs = x.contiguous();
  const int64_t KB = K / 32;
  int8_t* xq = scratch_i8(M * K, 0);
  float *sa = scratch_f32(M * KB, 0), *sx = scratch_f32(M * KB, 1);
  quantize_blocks(xs.data_ptr<float>(), M, K, nullptr, nullptr, xq, sa, sx);
  auto y = output(out, {M, N}, x.options());
  const int8_t* W = codes.data_ptr<int8_t>();
  const float* S = scale.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int8_t* XQ = xq;
  const float *SA = sa, *SX = sx;
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) q8_i8_tile<4>(XQ, SA, SX, W, S, Y, b, m, K, N);
      for (; m < M; ++m) q8_i8_tile<1>(XQ, SA, SX, W, S, Y, b, m, K, N);
    }
  });
  return y;
#else
  TORCH_CHECK(false, "q8_gemv_i8 needs AVX512-VNNI or AVX2");
#endif
}

// Rows `ids` of an 8-bit per-row weight in the q8 layout, dequantized and times `mult` (a tied
// embedding read from its head's codes): out[i, k] = q[ids[i], k] * s[ids[i]] * mult, in that
// order (as the record's own dequantization; not fast-math, so the same floats)
__attribute__((optimize("no-fast-math"))) torch::Tensor q8_rows(
    torch::Tensor codes, torch::Tensor scale, torch::Tensor ids, double mult,
    std::optional<torch::Tensor> out) {
  const int64_t B = codes.size(0), K = codes.size(1), T = ids.numel();
  TORCH_CHECK(codes.size(2) == L && ids.dtype() == torch::kInt64 && ids.is_contiguous(),
              "q8_rows: bad args");
  auto y = output(out, {T, K}, torch::dtype(torch::kFloat32));
  const int8_t* W = codes.data_ptr<int8_t>();
  const float* S = scale.data_ptr<float>();
  const int64_t* I = ids.data_ptr<int64_t>();
  float* Y = y.data_ptr<float>();
  const float m = float(mult);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(I[t] >= 0 && I[t] < B * L, "q8_rows: id out of range");
    const int64_t b = I[t] / L, l = I[t] % L;
    const float s = S[b * L + l];
    for (int64_t k = 0; k < K; ++k) {
      const float v = float(W[(b * K + k) * L + l]) * s;
      Y[t * K + k] = m == 1.f ? v : v * m;
    }
  }
  return y;
}

// Exact argmax through an int8-activation head. `logits` [M, N] holds q8_gemv_i8's product of x
// [M, K] with an 8-bit per-row head (codes q, row scales s); x-hat, the activations it used, differ
// from x by at most amax_b / 254 in each block b of 32 (amax_b: the block's largest |x|). So with
// l1[b] >= |s_t| * sum_{k in b} |q_tk| for every row t,
//   |approx_t - exact_t| <= B = sum_b l1[b] * amax_b * (1/254 + (K + K/32) * 2^-23),
// the last term covering float rounding of both products. Every t with approx_t < max - 2B then
// has exact_t < exact_{argmax approx}: the exact argmax is among the others, which are recomputed
// exactly (s_t * sum_k q_tk x_k, as q8_gemv) in place. counts[m] gets how many; -1 marks a row left
// as it was because more than `cap` entries were candidates or x was not finite (recompute it
// with q8_gemv). -> the number of such rows.
// Finite by its bits (the file builds with fast-math, under which std::isfinite may fold to true).
static inline bool finite_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return (u & 0x7f800000u) != 0x7f800000u;
}

// One row of q8_argmax_fix -> its count (or -1). The scans over the N logits are plain loops the
// compiler vectorizes (fast-math reductions; x is checked finite first, by its bits, so the
// logits are finite too).
static int64_t argmax_fix_row(const float* xr, const int8_t* W, const float* S, const float* L1,
                              float* y, int64_t K, int64_t N, int64_t cap, double slack) {
  const int64_t KB = K / 32;
  double bound = 0;
  bool finite = true;
  for (int64_t b = 0; b < KB; ++b) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) {
      finite = finite && finite_bits(xr[b * 32 + i]);
      amax = std::max(amax, std::fabs(xr[b * 32 + i]));
    }
    bound += double(L1[b]) * amax * slack;
  }
  if (!finite || !finite_bits(float(bound))) return -1;
  float top = y[0];
  for (int64_t t = 1; t < N; ++t) top = std::max(top, y[t]);
  if (!finite_bits(top)) return -1;
  const float floor = float(double(top) - 2 * bound);
  int64_t n = 0;
  for (int64_t t = 0; t < N; ++t) n += y[t] >= floor ? 1 : 0;
  if (n > cap) return -1;
  for (int64_t t = 0; t < N; ++t) {
    if (y[t] < floor) continue;
    const int8_t* c = W + (t / L) * K * L + t % L;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += float(c[k * L]) * xr[k];
    y[t] = S[t] * acc;
  }
  return n;
}

int64_t q8_argmax_fix(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor l1,
                      torch::Tensor logits, int64_t cap, torch::Tensor counts) {
  const int64_t M = x.size(0), K = x.size(1), B = codes.size(0), N = B * L, KB = K / 32;
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && codes.size(1) == K &&
                  K % 32 == 0 && l1.numel() == KB && logits.size(0) == M &&
                  logits.size(1) == N && logits.stride(1) == 1 && counts.numel() == M &&
                  counts.dtype() == torch::kInt64,
              "q8_argmax_fix: bad args");
  const float *X = x.data_ptr<float>(), *S = scale.data_ptr<float>(), *L1 = l1.data_ptr<float>();
  const int8_t* W = codes.data_ptr<int8_t>();
  int64_t* C = counts.data_ptr<int64_t>();
  float* Y = logits.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  const double slack = 1.0 / 254 + double(K + KB) * std::ldexp(1.0, -23);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      C[m] = argmax_fix_row(X + m * K, W, S, L1, Y + m * stride, K, N, cap, slack);
  });
  int64_t left = 0;
  for (int64_t m = 0; m < M; ++m) left += C[m] < 0;
  return left;
}

// Unpack the 16-row interleaved 4-bit codes to a float32 weight [N, K]: w = s * (q - z). For
// prefill-sized inputs, where one float GEMM beats the GEMV tiles.
torch::Tensor q4_dequant(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                         int64_t group) {
  const int64_t B = codes.size(0), K = codes.size(1) * 2, N = B * L, G = K / group;
  auto w = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const uint8_t* C = codes.data_ptr<uint8_t>();
  const at::Half *S = scale.data_ptr<at::Half>(), *Z = zero.data_ptr<at::Half>();
  float* Wt = w.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t l = 0; l < L; ++l) {
        float* row = Wt + (b * L + l) * K;
        for (int64_t g = 0; g < G; ++g) {
          const float s = float(S[(b * G + g) * L + l]), z = float(Z[(b * G + g) * L + l]);
          for (int64_t j = g * group / 2; j < (g + 1) * group / 2; ++j) {
            const uint8_t c = C[(b * (K / 2) + j) * L + l];
            row[2 * j] = s * (float(c & 15) - z);
            row[2 * j + 1] = s * (float(c >> 4) - z);
          }
        }
      }
  });
  return w;
}

// runtime_ops.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps,
                       std::optional<torch::Tensor> out);
void rope_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin);
void kv_write(torch::Tensor pool, torch::Tensor scales, torch::Tensor slots, torch::Tensor x);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor kpool, torch::Tensor vpool,
                                     torch::Tensor ctx, torch::Tensor lengths,
                                     torch::Tensor starts, double scale, torch::Tensor kscale,
                                     torch::Tensor vscale, std::optional<torch::Tensor> out);
void decode_block(torch::Tensor x, std::vector<torch::Tensor> lin, std::vector<int64_t> groups,
                  bool i8, std::vector<torch::Tensor> norms, double eps, int64_t heads,
                  int64_t kv_heads, int64_t act, torch::Tensor cos, torch::Tensor sin,
                  std::vector<torch::Tensor> kv, torch::Tensor slots, torch::Tensor ctx,
                  torch::Tensor lengths, torch::Tensor starts, double scale,
                  std::vector<torch::Tensor> bufs);

// Every op releases the GIL while it runs, so a server's event loop can serve sockets meanwhile.
// `out=` (optional everywhere it appears): write the result there instead of a new tensor.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  using py::arg;
  const auto out = arg("out") = py::none();
  m.def("rms_norm", &rms_norm, "RMSNorm of each row", arg("x"), arg("w"), arg("eps"), out, nogil);
  m.def("rope_", &rope_, "rotate-half RoPE in place on q and k", nogil);
  m.def("kv_write", &kv_write, "store K or V rows at their pool slots (int8: quantized)", nogil);
  m.def("paged_decode_attention", &paged_decode_attention, "one-token attention, paged KV",
        arg("q"), arg("kpool"), arg("vpool"), arg("ctx"), arg("lengths"), arg("starts"),
        arg("scale"), arg("kscale"), arg("vscale"), out, nogil);
  m.def("q4_gemv", &q4_gemv, "4-bit grouped GEMV on 16-row interleaved codes", arg("x"),
        arg("codes"), arg("scale"), arg("zero"), arg("group"), out, nogil);
  m.def("q8_gemv", &q8_gemv, "8-bit per-row GEMV on 16-row interleaved codes", arg("x"),
        arg("codes"), arg("scale"), out, nogil);
  m.def("q8_argmax_fix", &q8_argmax_fix, "exact argmax candidates of an int8-activation head",
        nogil);
  m.def("q8_rows", &q8_rows, "rows of an 8-bit per-row weight (an embedding lookup)",
        arg("codes"), arg("scale"), arg("ids"), arg("mult"), out, nogil);
  m.def("q4_dequant", &q4_dequant, "16-row interleaved 4-bit codes to a float weight", nogil);
  m.def("q4_gemv_i8", &q4_gemv_i8, "4-bit GEMV with int8 block-quantized activations", arg("x"),
        arg("codes"), arg("scale"), arg("zero"), arg("group"), out, nogil);
  m.def("q8_gemv_i8", &q8_gemv_i8, "8-bit GEMV with int8 block-quantized activations", arg("x"),
        arg("codes"), arg("scale"), out, nogil);
  m.def("decode_block", &decode_block, "one decoder block of a decode step, in place", nogil);
  m.def("q4_i8_supported", &q4_i8_supported, "whether q4_gemv_i8 was compiled in");
  m.def("isa", &isa, "the vector path the kernels were compiled with");
}
