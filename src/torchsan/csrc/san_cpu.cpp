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

// ---------------------------------------------------------------------------------------------------------------
// y = W relu(scale * x + shift) + bias over (N, Cin, P) -> (N, Cout, P): a training-mode BatchNorm (given as a
// per-channel affine map), ReLU and 1x1 convolution in one pass. This is the mapping gamma's building block; it
// runs over the (K, L) grid, where the unfused version writes and re-reads two Cin x K x L intermediates.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename T>
using V = typename Vec<T>::type;
template <typename T>
constexpr int64_t VW = 32 / sizeof(T);

// Load nv <= VW values (zero-filled), store nv values.
// (A constant-size memcpy compiles to one unaligned vector move; only the tail pays for a variable one.)
template <typename T>
inline V<T> load_part(const T* p, int64_t nv) {
  V<T> v = {};
  if (nv == VW<T>)
    std::memcpy(&v, p, sizeof(V<T>));
  else
    std::memcpy(&v, p, sizeof(T) * nv);
  return v;
}
template <typename T>
inline void store_part(T* p, V<T> v, int64_t nv) {
  if (nv == VW<T>)
    std::memcpy(p, &v, sizeof(V<T>));
  else
    std::memcpy(p, &v, sizeof(T) * nv);
}
template <typename T>
inline T hsum(V<T> v) {
  T s = 0;
  for (int64_t i = 0; i < VW<T>; ++i) s += v[i];
  return s;
}

constexpr int64_t kPixelChunk = 4096;  // pixels per task: fixed, so reductions do not depend on thread count

template <typename T>
void brc_forward_kernel(const T* x, const T* scale, const T* shift, const T* w, const T* bias, T* y, int64_t N,
                        int64_t Cin, int64_t Cout, int64_t P) {
  const int64_t chunks = (P + kPixelChunk - 1) / kPixelChunk;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<V<T>> r(Cin);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * kPixelChunk, p1 = std::min(P, p0 + kPixelChunk);
      for (int64_t p = p0; p < p1; p += VW<T>) {
        const int64_t nv = std::min(VW<T>, p1 - p);
        for (int64_t ci = 0; ci < Cin; ++ci) {
          V<T> pre = load_part(x + (n * Cin + ci) * P + p, nv) * scale[ci] + shift[ci];
          r[ci] = pre <= 0 ? V<T>{} : pre;
        }
        for (int64_t co = 0; co < Cout; ++co) {
          V<T> acc = V<T>{} + (bias ? bias[co] : T(0));
          const T* wr = w + co * Cin;
          for (int64_t ci = 0; ci < Cin; ++ci) acc += wr[ci] * r[ci];
          store_part(y + (n * Cout + co) * P + p, acc, nv);
        }
      }
    }
  });
}

// Gradients: gx (N, Cin, P); and per-task partial sums of gscale, gshift (Cin), gw (Cout x Cin), gbias (Cout),
// reduced in task order at the end.
template <typename T>
void brc_backward_kernel(const T* gy, const T* x, const T* scale, const T* shift, const T* w, T* gx, T* gscale,
                         T* gshift, T* gw, T* gbias, int64_t N, int64_t Cin, int64_t Cout, int64_t P) {
  const int64_t chunks = (P + kPixelChunk - 1) / kPixelChunk, tasks = N * chunks;
  const int64_t width = 2 * Cin + Cout * Cin + Cout;  // partial sums of one task
  std::vector<T> partial(tasks * width, T(0));
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<V<T>> r(Cin), g(Cout), acc_w(Cout * Cin), acc_s(Cin), acc_b(Cin), acc_bias(Cout);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * kPixelChunk, p1 = std::min(P, p0 + kPixelChunk);
      std::fill(acc_w.begin(), acc_w.end(), V<T>{});
      std::fill(acc_s.begin(), acc_s.end(), V<T>{});
      std::fill(acc_b.begin(), acc_b.end(), V<T>{});
      std::fill(acc_bias.begin(), acc_bias.end(), V<T>{});
      for (int64_t p = p0; p < p1; p += VW<T>) {
        const int64_t nv = std::min(VW<T>, p1 - p);
        for (int64_t co = 0; co < Cout; ++co) {
          g[co] = load_part(gy + (n * Cout + co) * P + p, nv);
          acc_bias[co] += g[co];
        }
        for (int64_t ci = 0; ci < Cin; ++ci) {
          const V<T> xv = load_part(x + (n * Cin + ci) * P + p, nv);
          const V<T> pre = xv * scale[ci] + shift[ci];
          const V<T> rv = pre <= 0 ? V<T>{} : pre;
          V<T> gr = {};
          for (int64_t co = 0; co < Cout; ++co) {
            gr += w[co * Cin + ci] * g[co];
            acc_w[co * Cin + ci] += g[co] * rv;
          }
          const V<T> gpre = pre <= 0 ? V<T>{} : gr;
          acc_s[ci] += gpre * xv;
          acc_b[ci] += gpre;
          store_part(gx + (n * Cin + ci) * P + p, gpre * scale[ci], nv);
        }
      }
      T* out = partial.data() + t * width;
      for (int64_t ci = 0; ci < Cin; ++ci) {
        out[ci] = hsum<T>(acc_s[ci]);
        out[Cin + ci] = hsum<T>(acc_b[ci]);
      }
      for (int64_t i = 0; i < Cout * Cin; ++i) out[2 * Cin + i] = hsum<T>(acc_w[i]);
      for (int64_t co = 0; co < Cout; ++co) out[2 * Cin + Cout * Cin + co] = hsum<T>(acc_bias[co]);
    }
  });
  for (int64_t t = 0; t < tasks; ++t) {
    const T* in = partial.data() + t * width;
    for (int64_t ci = 0; ci < Cin; ++ci) {
      gscale[ci] += in[ci];
      gshift[ci] += in[Cin + ci];
    }
    for (int64_t i = 0; i < Cout * Cin; ++i) gw[i] += in[2 * Cin + i];
    for (int64_t co = 0; co < Cout; ++co) gbias[co] += in[2 * Cin + Cout * Cin + co];
  }
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, " must be float32 or float64");
}

void check_geometry(const Geometry& g) {
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "torchsan: the footprint does not fit the input (output size ", g.Ho, "x", g.Wo,
              ")");
  TORCH_CHECK(!g.reflect || (g.p < g.H && g.p < g.W), "torchsan: reflect padding ", g.p,
              " must be smaller than the input size ", g.H, "x", g.W);
}

}  // namespace

torch::Tensor aggregation_forward(torch::Tensor x, torch::Tensor w, int64_t k, int64_t s, int64_t p, int64_t d,
                                  bool reflect) {
  check_cpu(x, "x");
  check_cpu(w, "weight");
  x = x.contiguous();
  w = w.contiguous();
  const Geometry g(x.size(2), x.size(3), k, s, p, d, reflect);
  check_geometry(g);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weight dtype must match x");
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
  check_geometry(g);
  TORCH_CHECK(!c1.defined() || (c1.sizes() == x2.sizes() && c1.scalar_type() == x2.scalar_type()),
              "x1 and x2 must have the same shape and dtype");
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

// x (N, Cin, *) -> (N, Cout, *); scale, shift (Cin); weight (Cout, Cin); bias (Cout) or undefined.
torch::Tensor bn_relu_conv_forward(torch::Tensor x, torch::Tensor scale, torch::Tensor shift, torch::Tensor weight,
                                   c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "x must be a CPU tensor (N, Cin, ...)");
  x = x.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  weight = weight.contiguous();
  torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  const int64_t N = x.size(0), Cin = x.size(1), Cout = weight.size(0), P = x.numel() / std::max<int64_t>(1, N * Cin);
  TORCH_CHECK(weight.size(1) == Cin && scale.numel() == Cin && shift.numel() == Cin, "bn_relu_conv: shape mismatch");
  auto sizes = x.sizes().vec();
  sizes[1] = Cout;
  auto y = torch::empty(sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_conv_forward", [&] {
    brc_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
                                 weight.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                                 y.data_ptr<scalar_t>(), N, Cin, Cout, P);
  });
  return y;
}

std::vector<torch::Tensor> bn_relu_conv_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor scale,
                                                 torch::Tensor shift, torch::Tensor weight) {
  gy = gy.contiguous();
  x = x.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  weight = weight.contiguous();
  const int64_t N = x.size(0), Cin = x.size(1), Cout = weight.size(0), P = x.numel() / std::max<int64_t>(1, N * Cin);
  auto gx = torch::empty_like(x);
  auto gscale = torch::zeros_like(scale), gshift = torch::zeros_like(shift), gw = torch::zeros_like(weight);
  auto gbias = torch::zeros({Cout}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_conv_backward", [&] {
    brc_backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                                  shift.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                                  gscale.data_ptr<scalar_t>(), gshift.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(),
                                  gbias.data_ptr<scalar_t>(), N, Cin, Cout, P);
  });
  return {gx, gscale, gshift, gw, gbias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("aggregation_forward", &aggregation_forward);
  m.def("aggregation_backward", &aggregation_backward);
  m.def("gather_forward", &gather_forward);
  m.def("gather_backward", &gather_backward);
  m.def("bn_relu_conv_forward", &bn_relu_conv_forward);
  m.def("bn_relu_conv_backward", &bn_relu_conv_backward);
}
