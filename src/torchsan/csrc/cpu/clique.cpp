// The clique relation of patchwise self-attention: out[n, j, k, l] = sum_c q[n, c, j, l] * kk[n, c, k, l] for the
// unfolded phi(x) and psi(x), (N, C, K, L) each: the products of every pair of taps of each footprint, written once
// in the layout the mapping gamma reads. A batched matrix product over (n, l) writes (N, L, K, K) and needs a
// transposing copy of this K-times-larger tensor, forward and backward.
#include "common.h"
#include "ops.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {
namespace {

// The one contraction behind the forward and both gradients, with different strides: for A rows x of a and B rows i
// of b, out[x * oa + i * oi + l] = sum_{t < terms} a[x * ai + t * sa + l] * b[i * bi + t * sb + l], for one vector of
// positions l. The A x B sums run in registers, each over t in ascending order, and every load feeds A or B of them.
struct Strides {
  int64_t sa, ai, sb, bi, oa, oi;
};

template <typename T, int A, int B, bool Full>
inline void products_block(const T* a, const T* b, T* out, const Strides& s, int64_t terms, int64_t l,
                           int64_t lanes) {
  const int64_t n = Full ? VW<T> : lanes;  // a constant for whole vectors: plain loads, no masks
  V<T> acc[A][B] = {};
  for (int64_t t = 0; t < terms; ++t) {
    V<T> av[A];
    for (int x = 0; x < A; ++x) av[x] = load_partial(a + x * s.ai + t * s.sa + l, n);
    for (int i = 0; i < B; ++i) {
      const V<T> bv = load_partial(b + i * s.bi + t * s.sb + l, n);
      for (int x = 0; x < A; ++x) acc[x][i] += av[x] * bv;
    }
  }
  for (int x = 0; x < A; ++x)
    for (int i = 0; i < B; ++i) store_partial(out + x * s.oa + i * s.oi + l, acc[x][i], n);
}

template <typename T, int A, bool Full>
inline void products_rows(const T* a, const T* b, T* out, const Strides& s, int64_t count, int64_t terms, int64_t l,
                          int64_t lanes) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) products_block<T, A, 4, Full>(a, b + i * s.bi, out + i * s.oi, s, terms, l, lanes);
  switch (count - i) {
    case 3: products_block<T, A, 3, Full>(a, b + i * s.bi, out + i * s.oi, s, terms, l, lanes); break;
    case 2: products_block<T, A, 2, Full>(a, b + i * s.bi, out + i * s.oi, s, terms, l, lanes); break;
    case 1: products_block<T, A, 1, Full>(a, b + i * s.bi, out + i * s.oi, s, terms, l, lanes); break;
    default: break;
  }
}

// products_block for one row of a and rows i0 .. i0 + B of b along positions [l0, l1): each output row is written
// in one sweep.
template <typename T, int B>
inline void products_sweep(const T* a, const T* b, T* out, const Strides& s, int64_t terms, int64_t l0, int64_t l1) {
  int64_t l = l0;
  for (; l + VW<T> <= l1; l += VW<T>) products_block<T, 1, B, true>(a, b, out, s, terms, l, VW<T>);
  if (l < l1) products_block<T, 1, B, false>(a, b, out, s, terms, l, l1 - l);
}

// products_block over `rows` rows of a and `count` rows of b (four at a time), positions [l0, l1). The gradients take
// the rows of a in pairs (each load of b then feeds eight sums); the forward, bound by writing its K-times-larger
// output, takes them one by one and writes each group of four output rows in one sweep along the positions.
template <typename T, bool Pairs>
void products(const T* a, const T* b, T* out, const Strides& s, int64_t rows, int64_t count, int64_t terms,
              int64_t l0, int64_t l1) {
  for (int64_t x = 0; x < rows; x += Pairs ? 2 : 1) {
    const T* ax = a + x * s.ai;
    T* o = out + x * s.oa;
    if (!Pairs) {
      int64_t i = 0;
      for (; i + 4 <= count; i += 4) products_sweep<T, 4>(ax, b + i * s.bi, o + i * s.oi, s, terms, l0, l1);
      switch (count - i) {
        case 3: products_sweep<T, 3>(ax, b + i * s.bi, o + i * s.oi, s, terms, l0, l1); break;
        case 2: products_sweep<T, 2>(ax, b + i * s.bi, o + i * s.oi, s, terms, l0, l1); break;
        case 1: products_sweep<T, 1>(ax, b + i * s.bi, o + i * s.oi, s, terms, l0, l1); break;
        default: break;
      }
      continue;
    }
    const bool pair = x + 1 < rows;
    int64_t l = l0;
    for (; l + VW<T> <= l1; l += VW<T>) {
      if (pair)
        products_rows<T, 2, true>(ax, b, o, s, count, terms, l, VW<T>);
      else
        products_rows<T, 1, true>(ax, b, o, s, count, terms, l, VW<T>);
    }
    if (l < l1) {
      if (pair)
        products_rows<T, 2, false>(ax, b, o, s, count, terms, l, l1 - l);
      else
        products_rows<T, 1, false>(ax, b, o, s, count, terms, l, l1 - l);
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
  // chunks of about equal size, in whole vectors (so only a row's last chunk has a partial one): still <= fit
  const int64_t chunks = std::max<int64_t>(1, (L + fit - 1) / fit);
  const int64_t chunk = round_up((L + chunks - 1) / chunks, VW<T>);
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
    // rows x: taps j of q (channel step K L); rows i: taps k of kk; terms: channels
    const Strides s{K * L, L, K * L, L, K * L, L};
    products<T, false>(q + image, kk + image, out + n * K * K * L, s, K, K, C, l0, l1);
  });
}

// gq[n, c, j] = sum_k g[n, j, k] * kk[n, c, k]; gk[n, c, k] = sum_j g[n, j, k] * q[n, c, j] (rows of L).
template <typename T>
void clique_backward_kernel(const T* g, const T* q, const T* kk, T* gq, T* gk, int64_t N, int64_t C, int64_t K,
                            int64_t L) {
  over_position_chunks<T>(N, C, K, L, [&](int64_t n, int64_t l0, int64_t l1) {
    const int64_t image = n * C * K * L;
    const T* gn = g + n * K * K * L;
    // gq: rows x = j of g (terms k), rows i = channels of kk; gk: rows x = k of g (terms j), rows i = channels of q
    if (gq) products<T, true>(gn, kk + image, gq + image, Strides{L, K * L, L, K * L, L, K * L}, K, C, K, l0, l1);
    if (gk) products<T, true>(gn, q + image, gk + image, Strides{K * L, L, L, K * L, L, K * L}, K, C, K, l0, l1);
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
