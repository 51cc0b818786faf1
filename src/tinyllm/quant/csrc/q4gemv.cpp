// tinyllm 4-bit GEMV for decode (few rows): y = x @ W^T with W stored as 4-bit codes and
// per-(row, group) scale and zero point, w = s * (q - z).
//
// Layout (made once by repack_q4): 16 output rows are interleaved so one 16-byte load holds the
// same input pair (2j, 2j+1) of 16 rows: codes [N/16, K/2, 16] with the low nibble for column 2j
// and the high nibble for column 2j+1; scales and zeros [N/16, G, 16]. The 16 lanes are 16 output
// rows, so a group ends with 16 independent multiply-adds and no horizontal sums:
//   y[n] = sum_g s[n,g] * (sum_{k in g} q[n,k] x[k] - z[n,g] * sum_{k in g} x[k]).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>

constexpr int64_t L = 16;

torch::Tensor q4_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale,
                      torch::Tensor zero, int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), B = codes.size(0), N = B * L, G = K / group;
  TORCH_CHECK(codes.size(1) * 2 == K && K % group == 0 && group % 2 == 0, "bad shapes");
  auto xs = x.contiguous();
  auto xe = xs.view({M, K / 2, 2}).select(2, 0).contiguous();  // even columns
  auto xo = xs.view({M, K / 2, 2}).select(2, 1).contiguous();  // odd columns
  auto gx = xs.view({M, G, group}).sum(-1).contiguous();       // sum of x per group
  auto y = torch::empty({M, N}, x.options());
  const float *XE = xe.data_ptr<float>(), *XO = xo.data_ptr<float>(), *GX = gx.data_ptr<float>();
  const uint8_t* W = codes.data_ptr<uint8_t>();
  const float *S = scale.data_ptr<float>(), *Z = zero.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t half = group / 2;
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t m = 0; m < M; ++m) {
        float out[L] = {0};
        const float* xe_m = XE + m * (K / 2);
        const float* xo_m = XO + m * (K / 2);
        for (int64_t g = 0; g < G; ++g) {
          float acc[L] = {0};
          for (int64_t j = g * half; j < (g + 1) * half; ++j) {
            const uint8_t* c = W + (b * (K / 2) + j) * L;
            const float e = xe_m[j], o = xo_m[j];
            for (int64_t l = 0; l < L; ++l) {
              acc[l] += float(c[l] & 15) * e + float(c[l] >> 4) * o;
            }
          }
          const float* s = S + (b * G + g) * L;
          const float* z = Z + (b * G + g) * L;
          const float sx = GX[m * G + g];
          for (int64_t l = 0; l < L; ++l) out[l] += s[l] * (acc[l] - z[l] * sx);
        }
        for (int64_t l = 0; l < L; ++l) Y[m * N + b * L + l] = out[l];
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_gemv", &q4_gemv, "4-bit grouped GEMV on 16-row interleaved codes");
}
