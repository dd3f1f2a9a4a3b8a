// Fused CPU kernels for the SAN primitives (aggregation, subtraction2, unfold), forward and backward.
//
// Layout: NCHW, contiguous. Each task builds a padded copy of the few input planes it needs (reflect or
// zeros, so the hot loops have no bounds checks), then streams rows with stride-1 inner loops that the
// compiler vectorises. Tasks write disjoint outputs: results do not depend on the number of threads.
// The unfolded (N, C, K, L) value tensor is never allocated by the aggregation.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

struct Geometry {
  int64_t H, W, Ho, Wo, Hp, Wp, k, s, p, d;
  bool reflect;
  Geometry(int64_t H_, int64_t W_, int64_t k_, int64_t s_, int64_t p_, int64_t d_, bool reflect_)
      : H(H_), W(W_), k(k_), s(s_), p(p_), d(d_), reflect(reflect_) {
    const int64_t span = d * (k - 1) + 1;
    Ho = (H + 2 * p - span) / s + 1;
    Wo = (W + 2 * p - span) / s + 1;
    // Only the rows/columns some window touches are needed; keep the full padded extent for simplicity.
    Hp = H + 2 * p;
    Wp = W + 2 * p;
  }
  int64_t L() const { return Ho * Wo; }
  int64_t K() const { return k * k; }
  int64_t plane() const { return Hp * Wp; }
};

// Output rows per block: each tap's weights for a block are one contiguous run of kRowBlock * W_out values,
// which streams far better than one short row per tap, while the block's outputs stay in L1.
constexpr int64_t kRowBlock = 8;

inline int64_t reflect_index(int64_t i, int64_t n) {
  if (i < 0) i = -i;
  if (i >= n) i = 2 * (n - 1) - i;
  return i;
}

// dst (Hp x Wp) <- src (H x W) with padding p.
template <typename T>
void pad_plane(const T* src, T* dst, const Geometry& g) {
  for (int64_t i = 0; i < g.Hp; ++i) {
    T* drow = dst + i * g.Wp;
    int64_t si = i - g.p;
    if (!g.reflect && (si < 0 || si >= g.H)) {
      std::fill(drow, drow + g.Wp, T(0));
      continue;
    }
    const T* srow = src + reflect_index(si, g.H) * g.W;
    for (int64_t j = 0; j < g.p; ++j) {
      drow[j] = g.reflect ? srow[reflect_index(j - g.p, g.W)] : T(0);
      drow[g.p + g.W + j] = g.reflect ? srow[reflect_index(g.W + j, g.W)] : T(0);
    }
    std::memcpy(drow + g.p, srow, sizeof(T) * g.W);
  }
}

// dst (H x W) += the padded gradient src (Hp x Wp), folding padded cells back onto their sources.
template <typename T>
void fold_plane(const T* src, T* dst, const Geometry& g) {
  for (int64_t i = 0; i < g.Hp; ++i) {
    int64_t si = i - g.p;
    if (si < 0 || si >= g.H) {
      if (!g.reflect) continue;
      si = reflect_index(si, g.H);
    }
    const T* srow = src + i * g.Wp;
    T* drow = dst + si * g.W;
    for (int64_t j = 0; j < g.Wp; ++j) {
      int64_t sj = j - g.p;
      if (sj < 0 || sj >= g.W) {
        if (!g.reflect) continue;
        sj = reflect_index(sj, g.W);
      }
      drow[sj] += srow[j];
    }
  }
}

// y[n, c, o] = sum_k w[n, c % Cw, k, o] * x[n, c, nbr_k(o)]
template <typename T>
void aggregation_forward_kernel(const T* x, const T* w, T* y, int64_t N, int64_t C, int64_t Cw, const Geometry& g) {
  const int64_t S = C / Cw, K = g.K(), L = g.L(), HW = g.H * g.W;
  at::parallel_for(0, N * Cw, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xp(S * g.plane());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Cw, cw = t % Cw;
      for (int64_t j = 0; j < S; ++j) {
        const int64_t c = j * Cw + cw;
        pad_plane(x + (n * C + c) * HW, xp.data() + j * g.plane(), g);
        std::fill(y + (n * C + c) * L, y + (n * C + c + 1) * L, T(0));
      }
      const T* wt = w + (n * Cw + cw) * K * L;
      for (int64_t hb = 0; hb < g.Ho; hb += kRowBlock) {
        const int64_t he = std::min(g.Ho, hb + kRowBlock);
        for (int64_t kh = 0; kh < g.k; ++kh) {
          for (int64_t kw = 0; kw < g.k; ++kw) {
            for (int64_t ho = hb; ho < he; ++ho) {
              const T* wrow = wt + (kh * g.k + kw) * L + ho * g.Wo;
              const int64_t off = (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t j = 0; j < S; ++j) {
                const T* xrow = xp.data() + j * g.plane() + off;
                T* yrow = y + (n * C + j * Cw + cw) * L + ho * g.Wo;
                if (g.s == 1) {
#pragma omp simd
                  for (int64_t wo = 0; wo < g.Wo; ++wo) yrow[wo] += wrow[wo] * xrow[wo];
                } else {
                  for (int64_t wo = 0; wo < g.Wo; ++wo) yrow[wo] += wrow[wo] * xrow[wo * g.s];
                }
              }
            }
          }
        }
      }
    }
  });
}

template <typename T>
void aggregation_backward_kernel(const T* gy, const T* x, const T* w, T* gx, T* gw, int64_t N, int64_t C, int64_t Cw,
                                 const Geometry& g) {
  const int64_t S = C / Cw, K = g.K(), L = g.L(), HW = g.H * g.W;
  at::parallel_for(0, N * Cw, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xp(gw ? S * g.plane() : 0), gxp(gx ? S * g.plane() : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Cw, cw = t % Cw;
      if (gw) {
        for (int64_t j = 0; j < S; ++j) pad_plane(x + (n * C + j * Cw + cw) * HW, xp.data() + j * g.plane(), g);
        std::fill(gw + (n * Cw + cw) * K * L, gw + (n * Cw + cw + 1) * K * L, T(0));
      }
      if (gx) std::fill(gxp.begin(), gxp.end(), T(0));
      const T* wt = w + (n * Cw + cw) * K * L;
      T* gwt = gw ? gw + (n * Cw + cw) * K * L : nullptr;
      for (int64_t hb = 0; hb < g.Ho; hb += kRowBlock) {
        const int64_t he = std::min(g.Ho, hb + kRowBlock);
        for (int64_t kh = 0; kh < g.k; ++kh) {
          for (int64_t kw = 0; kw < g.k; ++kw) {
            for (int64_t ho = hb; ho < he; ++ho) {
              const int64_t kofs = (kh * g.k + kw) * L + ho * g.Wo;
              const int64_t off = (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t j = 0; j < S; ++j) {
                const T* gyrow = gy + (n * C + j * Cw + cw) * L + ho * g.Wo;
                if (gw) {
                  const T* xrow = xp.data() + j * g.plane() + off;
                  T* gwrow = gwt + kofs;
                  if (g.s == 1) {
#pragma omp simd
                    for (int64_t wo = 0; wo < g.Wo; ++wo) gwrow[wo] += gyrow[wo] * xrow[wo];
                  } else {
                    for (int64_t wo = 0; wo < g.Wo; ++wo) gwrow[wo] += gyrow[wo] * xrow[wo * g.s];
                  }
                }
                if (gx) {
                  const T* wrow = wt + kofs;
                  T* gxrow = gxp.data() + j * g.plane() + off;
                  if (g.s == 1) {
#pragma omp simd
                    for (int64_t wo = 0; wo < g.Wo; ++wo) gxrow[wo] += wrow[wo] * gyrow[wo];
                  } else {
                    for (int64_t wo = 0; wo < g.Wo; ++wo) gxrow[wo * g.s] += wrow[wo] * gyrow[wo];
                  }
                }
              }
            }
          }
        }
      }
      if (gx) {
        for (int64_t j = 0; j < S; ++j) {
          T* dst = gx + (n * C + j * Cw + cw) * HW;
          std::fill(dst, dst + HW, T(0));
          fold_plane(gxp.data() + j * g.plane(), dst, g);
        }
      }
    }
  });
}

// out[n, c, k, o] = (x1 ? x1[n, c, centre(o)] : 0) - sign * x2[n, c, nbr_k(o)]; unfold is x1 = null, sign = -1.
template <typename T>
void gather_forward_kernel(const T* x1, const T* x2, T* out, T sign, int64_t NC, const Geometry& g) {
  const int64_t K = g.K(), L = g.L(), HW = g.H * g.W, c0 = (g.k / 2) * g.d;
  at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p1(x1 ? g.plane() : 0), p2(g.plane());
    for (int64_t t = begin; t < end; ++t) {
      if (x1) pad_plane(x1 + t * HW, p1.data(), g);
      pad_plane(x2 + t * HW, p2.data(), g);
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          T* ot = out + (t * K + kh * g.k + kw) * L;
          for (int64_t ho = 0; ho < g.Ho; ++ho) {
            T* orow = ot + ho * g.Wo;
            const T* xrow = p2.data() + (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
            const T* crow = x1 ? p1.data() + (ho * g.s + c0) * g.Wp + c0 : nullptr;
            if (crow) {
              for (int64_t wo = 0; wo < g.Wo; ++wo) orow[wo] = crow[wo * g.s] - sign * xrow[wo * g.s];
            } else {
              for (int64_t wo = 0; wo < g.Wo; ++wo) orow[wo] = -sign * xrow[wo * g.s];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void gather_backward_kernel(const T* gout, T* gx1, T* gx2, T sign, int64_t NC, const Geometry& g) {
  const int64_t K = g.K(), L = g.L(), HW = g.H * g.W, c0 = (g.k / 2) * g.d;
  at::parallel_for(0, NC, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p1(gx1 ? g.plane() : 0), p2(gx2 ? g.plane() : 0);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(p1.begin(), p1.end(), T(0));
      std::fill(p2.begin(), p2.end(), T(0));
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          const T* gt = gout + (t * K + kh * g.k + kw) * L;
          for (int64_t ho = 0; ho < g.Ho; ++ho) {
            const T* grow = gt + ho * g.Wo;
            if (gx1) {
              T* crow = p1.data() + (ho * g.s + c0) * g.Wp + c0;
              for (int64_t wo = 0; wo < g.Wo; ++wo) crow[wo * g.s] += grow[wo];
            }
            if (gx2) {
              T* xrow = p2.data() + (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t wo = 0; wo < g.Wo; ++wo) xrow[wo * g.s] -= sign * grow[wo];
            }
          }
        }
      }
      if (gx1) {
        std::fill(gx1 + t * HW, gx1 + (t + 1) * HW, T(0));
        fold_plane(p1.data(), gx1 + t * HW, g);
      }
      if (gx2) {
        std::fill(gx2 + t * HW, gx2 + (t + 1) * HW, T(0));
        fold_plane(p2.data(), gx2 + t * HW, g);
      }
    }
  });
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, " must be float32 or float64");
}

}  // namespace

torch::Tensor aggregation_forward(torch::Tensor x, torch::Tensor w, int64_t k, int64_t s, int64_t p, int64_t d,
                                  bool reflect) {
  check_cpu(x, "x");
  check_cpu(w, "weight");
  x = x.contiguous();
  w = w.contiguous();
  const Geometry g(x.size(2), x.size(3), k, s, p, d, reflect);
  const int64_t N = x.size(0), C = x.size(1), Cw = w.size(1);
  TORCH_CHECK(w.size(0) == N && C % Cw == 0 && w.size(2) == g.K() && w.size(3) == g.L(), "weight shape mismatch");
  auto y = torch::empty({N, C, g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aggregation_forward", [&] {
    aggregation_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, C,
                                         Cw, g);
  });
  return y;
}

std::vector<torch::Tensor> aggregation_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor w, int64_t k,
                                                int64_t s, int64_t p, int64_t d, bool reflect, bool need_x,
                                                bool need_w) {
  check_cpu(gy, "grad");
  gy = gy.contiguous();
  x = x.contiguous();
  w = w.contiguous();
  const Geometry g(x.size(2), x.size(3), k, s, p, d, reflect);
  const int64_t N = x.size(0), C = x.size(1), Cw = w.size(1);
  auto gx = need_x ? torch::empty_like(x) : torch::Tensor();
  auto gw = need_w ? torch::empty_like(w) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aggregation_backward", [&] {
    aggregation_backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                          need_x ? gx.data_ptr<scalar_t>() : nullptr,
                                          need_w ? gw.data_ptr<scalar_t>() : nullptr, N, C, Cw, g);
  });
  return {gx, gw};
}

// subtraction2 (x1 defined) or unfold (x1 undefined): (N, C, H, W) -> (N, C, K, L)
torch::Tensor gather_forward(c10::optional<torch::Tensor> x1, torch::Tensor x2, int64_t k, int64_t s, int64_t p,
                             int64_t d, bool reflect) {
  check_cpu(x2, "x");
  x2 = x2.contiguous();
  torch::Tensor c1;
  if (x1.has_value()) c1 = x1->contiguous();
  const Geometry g(x2.size(2), x2.size(3), k, s, p, d, reflect);
  const int64_t N = x2.size(0), C = x2.size(1);
  auto out = torch::empty({N, C, g.K(), g.L()}, x2.options());
  AT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "gather_forward", [&] {
    const scalar_t sign = c1.defined() ? scalar_t(1) : scalar_t(-1);
    gather_forward_kernel<scalar_t>(c1.defined() ? c1.data_ptr<scalar_t>() : nullptr, x2.data_ptr<scalar_t>(),
                                    out.data_ptr<scalar_t>(), sign, N * C, g);
  });
  return out;
}

std::vector<torch::Tensor> gather_backward(torch::Tensor gout, int64_t H, int64_t W, int64_t k, int64_t s, int64_t p,
                                           int64_t d, bool reflect, bool subtraction, bool need_x1, bool need_x2) {
  check_cpu(gout, "grad");
  gout = gout.contiguous();
  const Geometry g(H, W, k, s, p, d, reflect);
  const int64_t N = gout.size(0), C = gout.size(1);
  auto opts = gout.options();
  auto gx1 = (subtraction && need_x1) ? torch::empty({N, C, H, W}, opts) : torch::Tensor();
  auto gx2 = need_x2 ? torch::empty({N, C, H, W}, opts) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(gout.scalar_type(), "gather_backward", [&] {
    const scalar_t sign = subtraction ? scalar_t(1) : scalar_t(-1);
    gather_backward_kernel<scalar_t>(gout.data_ptr<scalar_t>(), gx1.defined() ? gx1.data_ptr<scalar_t>() : nullptr,
                                     gx2.defined() ? gx2.data_ptr<scalar_t>() : nullptr, sign, N * C, g);
  });
  return {gx1, gx2};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("aggregation_forward", &aggregation_forward);
  m.def("aggregation_backward", &aggregation_backward);
  m.def("gather_forward", &gather_forward);
  m.def("gather_backward", &gather_backward);
}
