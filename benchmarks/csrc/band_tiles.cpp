// A hand-written band-attention forward for benchmarks/band_kernel_floor.py: the interior
// blocks of band.band_plan (block i: queries r0 + i·c … + c - 1, key strip start + i·c …
// + L - 1, local query j attends strip keys j … j + W), one (block, head) tile at a time:
//   S = scale · Q Kᵀ        (c × L)   MKL sgemm, the BLAS that PyTorch's CPU build links
//   P = exp(S - rowmax)     exact softmax over the band only (no online rescaling: the whole
//                           strip is one tile), zeros outside it
//   O = P V / rowsum        (c × D)   MKL sgemm, written straight into the output rows
// It is a measuring instrument, not a surgeon kernel: it asks whether the fused SDPA kernel
// leaves speed on the table for this shape. mode 1 runs the two GEMMs only (the floor of any
// kernel built on these GEMMs with this tiling).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

// The Fortran BLAS entry point: exported by libtorch_cpu (MKL), column-major, 32-bit ints.
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*,
                       const int*);

static inline void gemm_col_major(char ta, char tb, int m, int n, int k, float alpha, const float* a,
                                  int lda, const float* b, int ldb, float* c, int ldc) {
  const float beta = 0.0f;
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// exp(x) for x <= 0: 2^k · p(r), r = x - k·ln2 in [-ln2/2, ln2/2] (Cephes expf polynomial);
// branch-free, so gcc vectorises the loop that calls it. Relative error ~1e-7.
static inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return p * two_k;
}

// q, k, v, out: (H, n, D) float32 views with contiguous last dim (any head / row strides).
void band_interior(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                   int64_t r0, int64_t blocks, int64_t c, int64_t start, int64_t L, int64_t W,
                   double scale, int64_t mode) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "band_interior: float32 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && out.stride(2) == 1,
              "band_interior: the head dimension must be contiguous");
  TORCH_CHECK(W + c <= L, "band_interior: the strip is shorter than the band");
  const int64_t H = q.size(0), D = q.size(2);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, blocks * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(c * L);  // (c, L) row-major
    std::vector<float> inv_sum(c);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % H, i = t / H;
      const float* Q = qp + h * q.stride(0) + (r0 + i * c) * q.stride(1);
      const float* K = kp + h * k.stride(0) + (start + i * c) * k.stride(1);
      const float* V = vp + h * v.stride(0) + (start + i * c) * v.stride(1);
      float* O = op + h * out.stride(0) + (r0 + i * c) * out.stride(1);
      // row-major S (c × L) is column-major Sᵀ (L × c) = K (L × D) · Qᵀ (D × c)
      gemm_col_major('T', 'N', L, c, D, static_cast<float>(scale), K, k.stride(1), Q, q.stride(1),
                     scores.data(), L);
      for (int64_t j = 0; j < c; ++j) {
        float* row = scores.data() + j * L;
        if (mode == 1) {
          inv_sum[j] = 1.0f;
          continue;
        }
        const int64_t a = j, z = j + W + 1;  // the band of local query j: strip keys [a, z)
        float mx = row[a];
        for (int64_t x = a + 1; x < z; ++x) mx = row[x] > mx ? row[x] : mx;
        float sum = 0.0f;
        for (int64_t x = a; x < z; ++x) {
          const float e = exp_nonpositive(row[x] - mx);
          row[x] = e;
          sum += e;
        }
        std::memset(row, 0, a * sizeof(float));
        std::memset(row + z, 0, (L - z) * sizeof(float));
        inv_sum[j] = 1.0f / sum;
      }
      // row-major O (c × D) is column-major Oᵀ (D × c) = Vᵀ (D × L) · Pᵀ (L × c)
      gemm_col_major('N', 'N', D, c, L, 1.0f, V, v.stride(1), scores.data(), L, O, out.stride(1));
      for (int64_t j = 0; j < c; ++j) {
        float* o = O + j * out.stride(1);
        for (int64_t x = 0; x < D; ++x) o[x] *= inv_sum[j];
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("band_interior", &band_interior, "interior band blocks, one (block, head) tile at a time");
}
