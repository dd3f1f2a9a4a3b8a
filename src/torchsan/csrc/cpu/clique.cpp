// The clique relation of patchwise self-attention: out[n, j, k, l] = sum_c q[n, c, j, l] * kk[n, c, k, l] for the
// unfolded phi(x) and psi(x), (N, C, K, L) each: the products of every pair of taps of each footprint, written once
// in the layout the mapping gamma reads. A batched matrix product over (n, l) writes (N, L, K, K) and needs a
// transposing copy of this K-times-larger tensor, forward and backward.
#include "common.h"
#include "ops.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {
namespace {

// out + i * oi: rows of L, out_i[l] = sum_{t < terms} a[t * sa + l] * b[i * bi + t * sb + l] for i < B. The forward
// and both gradients are this one contraction with different strides; B rows share each load of a, and the sum over
// t runs in registers in ascending order.
template <typename T, int B, bool Full>
inline void products_block(const T* a, int64_t sa, const T* b, int64_t bi, int64_t sb, T* out, int64_t oi,
                           int64_t terms, int64_t l, int64_t lanes) {
  const int64_t n = Full ? VW<T> : lanes;  // a constant for whole vectors: plain loads, no masks
  V<T> acc[B] = {};
  for (int64_t t = 0; t < terms; ++t) {
    const V<T> av = load_partial(a + t * sa + l, n);
    for (int i = 0; i < B; ++i) acc[i] += av * load_partial(b + i * bi + t * sb + l, n);
  }
  for (int i = 0; i < B; ++i) store_partial(out + i * oi + l, acc[i], n);
}

// products_block for `count` rows i (b and out stepping by bi and oi), four at a time, at positions [l0, l1).
template <typename T>
void products(const T* a, int64_t sa, const T* b, int64_t bi, int64_t sb, T* out, int64_t oi, int64_t count,
              int64_t terms, int64_t l0, int64_t l1) {
  for (int64_t i = 0; i < count; i += 4) {
    const T* bb = b + i * bi;
    T* o = out + i * oi;
    int64_t l = l0;
    for (; l + VW<T> <= l1; l += VW<T>) {
      switch (std::min<int64_t>(4, count - i)) {
        case 4: products_block<T, 4, true>(a, sa, bb, bi, sb, o, oi, terms, l, VW<T>); break;
        case 3: products_block<T, 3, true>(a, sa, bb, bi, sb, o, oi, terms, l, VW<T>); break;
        case 2: products_block<T, 2, true>(a, sa, bb, bi, sb, o, oi, terms, l, VW<T>); break;
        default: products_block<T, 1, true>(a, sa, bb, bi, sb, o, oi, terms, l, VW<T>); break;
      }
    }
    if (l < l1) {
      switch (std::min<int64_t>(4, count - i)) {
        case 4: products_block<T, 4, false>(a, sa, bb, bi, sb, o, oi, terms, l, l1 - l); break;
        case 3: products_block<T, 3, false>(a, sa, bb, bi, sb, o, oi, terms, l, l1 - l); break;
        case 2: products_block<T, 2, false>(a, sa, bb, bi, sb, o, oi, terms, l, l1 - l); break;
        default: products_block<T, 1, false>(a, sa, bb, bi, sb, o, oi, terms, l, l1 - l); break;
      }
    }
  }
}

// Tasks are (image, chunk of positions). A task forms every pair of taps from its chunk of the image's q and k (C K
// rows each), sized to stay in half the L2 cache while all K * K pairs are read from it, and writes rows of its chunk
// only: no atomics, and sums over c in the same order for any number of threads.
template <typename T, typename F>
void over_position_chunks(int64_t N, int64_t C, int64_t K, int64_t L, const F& f) {
  const int64_t per_position = std::max<int64_t>(1, 2 * C * K * int64_t(sizeof(T)));
  const int64_t fit = std::max<int64_t>(VW<T>, cache_sizes().l2_bytes / 2 / per_position / VW<T> * VW<T>);
  const int64_t chunks = std::max<int64_t>(1, (L + fit - 1) / fit), chunk = (L + chunks - 1) / chunks;
  parallel_range(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, l0 = (t % chunks) * chunk;
      if (l0 < L) f(n, l0, std::min(L, l0 + chunk));
    }
  });
}

// out[n, j, k] = sum_c q[n, c, j] * kk[n, c, k] (rows of L).
template <typename T>
void clique_forward_kernel(const T* q, const T* kk, T* out, int64_t N, int64_t C, int64_t K, int64_t L) {
  over_position_chunks<T>(N, C, K, L, [&](int64_t n, int64_t l0, int64_t l1) {
    const int64_t image = n * C * K * L;
    for (int64_t j = 0; j < K; ++j)
      products(q + image + j * L, K * L, kk + image, L, K * L, out + (n * K + j) * K * L, L, K, C, l0, l1);
  });
}

// gq[n, c, j] = sum_k g[n, j, k] * kk[n, c, k]; gk[n, c, k] = sum_j g[n, j, k] * q[n, c, j] (rows of L).
template <typename T>
void clique_backward_kernel(const T* g, const T* q, const T* kk, T* gq, T* gk, int64_t N, int64_t C, int64_t K,
                            int64_t L) {
  over_position_chunks<T>(N, C, K, L, [&](int64_t n, int64_t l0, int64_t l1) {
    const int64_t image = n * C * K * L;
    const T* gn = g + n * K * K * L;
    for (int64_t r = 0; r < K; ++r) {
      if (gq) products(gn + r * K * L, L, kk + image, K * L, L, gq + image + r * L, K * L, C, K, l0, l1);
      if (gk) products(gn + r * L, K * L, q + image, K * L, L, gk + image + r * L, K * L, C, K, l0, l1);
    }
  });
}

void check_pair(const at::Tensor& q, const at::Tensor& k) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  TORCH_CHECK(q.sizes() == k.sizes() && q.scalar_type() == k.scalar_type(),
              "clique_products: q and k must have the same shape and dtype");
}

}  // namespace

at::Tensor clique_forward(at::Tensor q, at::Tensor k) {
  check_pair(q, k);
  q = q.contiguous();
  k = k.contiguous();
  const int64_t N = q.size(0), C = q.size(1), K = q.size(2), L = q.size(3);
  auto out = at::empty({N, K, K, L}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "clique_forward", [&] {
    clique_forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, C,
                                    K, L);
  });
  return out;
}

std::vector<at::Tensor> clique_backward(at::Tensor gout, at::Tensor q, at::Tensor k, bool need_q, bool need_k) {
  check_pair(q, k);
  q = q.contiguous();
  k = k.contiguous();
  gout = gout.contiguous();
  const int64_t N = q.size(0), C = q.size(1), K = q.size(2), L = q.size(3);
  TORCH_CHECK(gout.dim() == 4 && gout.size(0) == N && gout.size(1) == K && gout.size(2) == K && gout.size(3) == L &&
                  gout.scalar_type() == q.scalar_type(),
              "clique_backward: the gradient must be (N, K, K, L) of q's dtype");
  at::Tensor gq = need_q ? at::empty_like(q) : at::Tensor(), gk = need_k ? at::empty_like(k) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "clique_backward", [&] {
    clique_backward_kernel<scalar_t>(gout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                     need_q ? gq.data_ptr<scalar_t>() : nullptr,
                                     need_k ? gk.data_ptr<scalar_t>() : nullptr, N, C, K, L);
  });
  return {gq, gk};
}

}  // namespace cpu
}  // namespace torchsan
