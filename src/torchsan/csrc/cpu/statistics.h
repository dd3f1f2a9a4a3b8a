// Per-channel biased variance and mean, templated on a row source (see DenseRows), so that the fused subtraction2
// op can compute them from rows it gathers on the fly.
#pragma once

#include "common.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {

// var, mean (C) of x (N, C, P), as torch.var_mean(x, [0, 2], correction=0).
// Each chunk of kPixelChunk values gets an exact two-pass mean and sum of squared deviations (in double); chunks
// are merged in a fixed order with Chan et al.'s pairwise formula: deterministic for any thread count, and free of
// the cancellation of E[x^2] - E[x]^2 when the mean is large against the spread.
template <typename T, typename Rows>
void channel_var_mean_kernel(const Rows& src, T* var, T* mean, int64_t N, int64_t C, int64_t P) {
  const int64_t chunks = (P + kPixelChunk - 1) / kPixelChunk;
  std::vector<double> chunk_mean(N * C * chunks), chunk_m2(N * C * chunks);
  parallel_range(0, N * C * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(kPixelChunk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = (t % chunks) * kPixelChunk, p1 = std::min(P, p0 + kPixelChunk), m = p1 - p0;
      const T* xr = src.row(t / (C * chunks), (t / chunks) % C, p0, m, scratch.data());
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < m; ++p) s += double(xr[p]);
      const double mu = s / double(m);
      double m2 = 0;
#pragma omp simd reduction(+ : m2)
      for (int64_t p = 0; p < m; ++p) {
        const double d = double(xr[p]) - mu;
        m2 += d * d;
      }
      chunk_mean[t] = mu;
      chunk_m2[t] = m2;
    }
  });
  parallel_range(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double count = 0, mu = 0, m2 = 0;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t ch = 0; ch < chunks; ++ch) {
          const int64_t t = (n * C + c) * chunks + ch;
          const double nb = double(std::min(P, (ch + 1) * kPixelChunk) - ch * kPixelChunk), tot = count + nb;
          const double delta = chunk_mean[t] - mu;
          mu += delta * nb / tot;
          m2 += chunk_m2[t] + delta * delta * count * nb / tot;
          count = tot;
        }
      }
      mean[c] = T(mu);
      var[c] = T(m2 / count);
    }
  });
}

}  // namespace cpu
}  // namespace torchsan
