// The pairwise mapping's first stage on z = cat([subtraction2(x1, x2), append]) (N, C + E, K, L) without writing z
// (K times larger than x1): its channel statistics, the affine-ReLU-1x1-conv forward and backward, and the
// statistics' backward. Each reads z's rows through Subtraction2Rows, gathered on the fly; the results are those of
// the dense ops on the written z, bit for bit. For inference, both of gamma's triples in one pass on the pairwise z,
// and on the patchwise concatenation relation's z (PatchwiseConcatRows).
#include "conv1x1.h"
#include "gathers.h"
#include "ops.h"
#include "softmax_aggregation.h"
#include "statistics.h"

#include <utility>

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {
namespace {

// The rows of z = [x1_i - x2_j, append] (P = K * L values per channel), as a row source (see DenseRows). With
// stride 1 on narrow maps it reads x1's centre planes and x2's column-shifted copies (one run per tap, as the
// stride-1 gather); otherwise padded copies of x1 and x2 (N, C, Hp, Wp), one output row at a time. The values are
// those gather_forward writes, bit for bit.
template <typename T>
struct Subtraction2Rows {
  const T* x1_planes;
  const T* x2_planes;
  const T* append;  // (B, E, K, L) with B = 1 (broadcast over N) or N; null if E = 0
  int64_t append_batch, C, E;
  Geometry g;
  bool shifted;  // the planes are centre planes and column-shifted copies (stride 1, narrow maps), not padded planes
  // f(at, centre, other, len) for each run of z's row ci < C over [q0, q0 + m): z[q0 + at + i] = centre[i * s] -
  // other[i * s] for i < len (s = 1 on the shifted copies).
  template <typename F>
  void runs(int64_t n, int64_t ci, int64_t q0, int64_t m, F&& f) const {
    const int64_t L = g.L(), c0 = (g.k / 2) * g.d;
    if (shifted) {  // x1_planes: the centre planes (L each); x2_planes: the column-shifted copies (see shift_columns)
      const T* centre = x1_planes + (n * C + ci) * L;
      const T* S = x2_planes + (n * C + ci) * g.k * g.Hp * g.Wo;
      int64_t tap = q0 / L, o = q0 % L;
      for (int64_t left = m, at = 0; left > 0; ++tap, o = 0) {
        const int64_t len = std::min(L - o, left);
        f(at, centre + o, S + ((tap % g.k) * g.Hp + (tap / g.k) * g.d) * g.Wo + o, len);
        at += len;
        left -= len;
      }
      return;
    }
    const T* p1 = x1_planes + (n * C + ci) * g.plane();
    const T* p2 = x2_planes + (n * C + ci) * g.plane();
    // Runs along one output row of one tap; (tap, ho, wo) advance without divisions (short rows on small maps).
    const int64_t tap = q0 / L;
    int64_t ho = (q0 % L) / g.Wo, wo = (q0 % L) % g.Wo, kh = tap / g.k, kw = tap % g.k;
    for (int64_t left = m, at = 0; left > 0;) {
      const int64_t len = std::min(g.Wo - wo, left);
      f(at, p1 + (ho * g.s + c0) * g.Wp + c0 + wo * g.s, p2 + (ho * g.s + kh * g.d) * g.Wp + kw * g.d + wo * g.s, len);
      at += len;
      left -= len;
      wo = 0;
      if (++ho == g.Ho) {
        ho = 0;
        if (++kw == g.k) kw = 0, ++kh;
      }
    }
  }
  const T* row(int64_t n, int64_t ci, int64_t q0, int64_t m, T* scratch) const {
    if (ci >= C) return append + ((append_batch == 1 ? 0 : n) * E + ci - C) * g.K() * g.L() + q0;
    const int64_t s = shifted ? 1 : g.s;
    runs(n, ci, q0, m, [&](int64_t at, const T* cr, const T* xr, int64_t len) {
      T* out = scratch + at;
      if (s == 1) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) out[i] = cr[i] - xr[i];
      } else {
        for (int64_t i = 0; i < len; ++i) out[i] = cr[i * s] - xr[i * s];
      }
    });
    return scratch;
  }
  // stage_affine_relu_row(row(...), a, b, staged, m, fill_to) in one pass at stride 1: the same values.
  void stage_affine_relu(int64_t n, int64_t ci, int64_t q0, int64_t m, T a, T b, T* staged, T* scratch,
                         int64_t fill_to) const {
    if (ci >= C || (!shifted && g.s != 1)) {
      stage_affine_relu_row(row(n, ci, q0, m, scratch), a, b, staged, m, fill_to);
      return;
    }
    runs(n, ci, q0, m, [&](int64_t at, const T* cr, const T* xr, int64_t len) {
      T* out = staged + at;
      overlapping_vectors<T>(len, [&](int64_t i, int64_t lanes) {
        V<T> pre = (load_partial(cr + i, lanes) - load_partial(xr + i, lanes)) * a + b;
        pre = pre <= 0 ? V<T>{} : pre;  // NaN passes through, like torch.relu
        store_partial(out + i, pre, lanes);
      });
    });
    std::fill(staged + m, staged + std::max(m, fill_to), T(0));
  }
};

// The rows of the patchwise concatenation relation z = [x1_i, x2_j for j in R(i)] (C + C K rows of L values; row
// C + c K + k is channel c's k-th neighbour), read from padded copies of x1 and x2 (N, C, Hp, Wp): the values
// torch.cat([centre(x1), unfold(x2).reshape(N, C K, 1, L)], 1) writes, without writing them.
template <typename T>
struct PatchwiseConcatRows {
  const T* x1_planes;
  const T* x2_planes;
  int64_t C;
  Geometry g;
  // The plane row ci reads, and the offset of its window's first value (ho = wo = 0).
  std::pair<const T*, int64_t> source(int64_t n, int64_t ci) const {
    const bool centre = ci < C;
    const int64_t c = centre ? ci : (ci - C) / g.K(), tap = centre ? 0 : (ci - C) % g.K(), c0 = (g.k / 2) * g.d;
    const int64_t dh = centre ? c0 : (tap / g.k) * g.d, dw = centre ? c0 : (tap % g.k) * g.d;
    return {(centre ? x1_planes : x2_planes) + (n * C + c) * g.plane(), dh * g.Wp + dw};
  }
  // f(at, src, len) for each run of row ci over [q0, q0 + m): z[q0 + at + i] = src[i * s] for i < len.
  template <typename F>
  void runs(int64_t n, int64_t ci, int64_t q0, int64_t m, F&& f) const {
    const auto [plane, offset] = source(n, ci);
    int64_t ho = q0 / g.Wo, wo = q0 % g.Wo;
    for (int64_t left = m, at = 0; left > 0; wo = 0, ++ho) {
      const int64_t len = std::min(g.Wo - wo, left);
      f(at, plane + offset + ho * g.s * g.Wp + wo * g.s, len);
      at += len;
      left -= len;
    }
  }
  const T* row(int64_t n, int64_t ci, int64_t q0, int64_t m, T* scratch) const {
    runs(n, ci, q0, m, [&](int64_t at, const T* src, int64_t len) {
      if (g.s == 1) {
        std::memcpy(scratch + at, src, sizeof(T) * len);
      } else {
        for (int64_t i = 0; i < len; ++i) scratch[at + i] = src[i * g.s];
      }
    });
    return scratch;
  }
  // stage_affine_relu_row(row(...), a, b, staged, m, fill_to) in one pass at stride 1: the same values.
  void stage_affine_relu(int64_t n, int64_t ci, int64_t q0, int64_t m, T a, T b, T* staged, T* scratch,
                         int64_t fill_to) const {
    if (g.s != 1) {
      stage_affine_relu_row(row(n, ci, q0, m, scratch), a, b, staged, m, fill_to);
      return;
    }
    runs(n, ci, q0, m, [&](int64_t at, const T* src, int64_t len) { affine_relu_run(src, a, b, staged + at, len); });
    std::fill(staged + m, staged + std::max(m, fill_to), T(0));
  }
};

// Output rows up to this wide are read from shifted copies (one run per tap): building them pays only on short rows.
constexpr int64_t kShiftedMaxWidth = 16;

// x (N, C, H, W) -> its padded planes (N, C, Hp, Wp).
at::Tensor pad_planes(const at::Tensor& x, const Geometry& g) {
  auto out = pooled_empty({x.size(0), x.size(1), g.Hp, g.Wp}, x.options(), !x.requires_grad());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pad_planes", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_range(0, x.size(0) * x.size(1), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) pad_plane(src + t * g.H * g.W, dst + t * g.plane(), g);
    });
  });
  return out;
}

// Stride 1: x (N, C, H, W) -> the column-shifted copies of its padded planes (N, C, k * Hp * Wo), or its centre
// planes (N, C, Ho * Wo) (see shift_columns, centre_plane).
at::Tensor shifted_planes(const at::Tensor& x, const Geometry& g, bool centres) {
  const int64_t size = centres ? g.L() : g.k * g.Hp * g.Wo;
  auto out = pooled_empty({x.size(0), x.size(1), size}, x.options(), !x.requires_grad());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shifted_planes", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    parallel_range(0, x.size(0) * x.size(1), 1, [&](int64_t begin, int64_t end) {
      // Built in a private buffer (shift_columns may spill past a plane's copies), then copied out.
      std::vector<scalar_t> xp(g.plane() + kBufferSlack<scalar_t>), S(size + kBufferSlack<scalar_t>);
      for (int64_t t = begin; t < end; ++t) {
        if (centres) {
          pad_plane(src + t * g.H * g.W, xp.data(), g);
          centre_plane(xp.data(), dst + t * size, g);
        } else {
          shifted_copies(src + t * g.H * g.W, xp.data(), S.data(), g);
          std::memcpy(dst + t * size, S.data(), sizeof(scalar_t) * size);
        }
      }
    });
  });
  return out;
}

// x1 and x2 of a relation (N, C, H, W), checked, with the footprint's geometry; the planes its rows read.
struct RelationInputs {
  at::Tensor x1, x2, x1_planes, x2_planes;
  Geometry g;
  int64_t N, C;
  RelationInputs(at::Tensor a, at::Tensor b, int64_t k, int64_t s, int64_t p, int64_t d, bool reflect)
      : x1(a.contiguous()), x2(b.contiguous()), g(a.size(2), a.size(3), k, s, p, d, reflect) {
    check_cpu(x1, "x1");
    check_cpu(x2, "x2");
    check_geometry(g);
    TORCH_CHECK(x1.sizes() == x2.sizes() && x1.scalar_type() == x2.scalar_type(), "x1 and x2 must match");
    N = x1.size(0);
    C = x1.size(1);
  }
};

// The inputs of subtraction2 with append, checked, with the planes Subtraction2Rows reads.
struct Subtraction2Inputs : RelationInputs {
  at::Tensor append;
  int64_t E, Ct, P;
  bool shifted;
  Subtraction2Inputs(at::Tensor a, at::Tensor b, c10::optional<at::Tensor> appended, int64_t k, int64_t s, int64_t p,
                     int64_t d, bool reflect)
      : RelationInputs(std::move(a), std::move(b), k, s, p, d, reflect) {
    P = g.K() * g.L();
    E = 0;
    if (appended.has_value() && appended->defined()) {
      append = appended->contiguous();
      TORCH_CHECK(append.dim() == 4 && (append.size(0) == 1 || append.size(0) == N) && append.size(2) == g.K() &&
                      append.size(3) == g.L() && append.scalar_type() == x1.scalar_type(),
                  "append must be (1 or N, E, K, L) of x1's dtype");
      E = append.size(1);
    }
    Ct = C + E;
    shifted = g.s == 1 && g.Wo <= kShiftedMaxWidth;
    if (shifted) {
      x1_planes = centres_are_input(g) ? x1 : shifted_planes(x1, g, true);
      x2_planes = shifted_planes(x2, g, false);
    } else {
      x1_planes = pad_planes(x1, g);
      x2_planes = pad_planes(x2, g);
    }
  }
  template <typename T>
  Subtraction2Rows<T> rows() const {
    return Subtraction2Rows<T>{x1_planes.data_ptr<T>(), x2_planes.data_ptr<T>(), E ? append.data_ptr<T>() : nullptr,
                               E ? append.size(0) : 1, C, E, g, shifted};
  }
};

// The patchwise concatenation relation's checked inputs and their padded planes, as PatchwiseConcatRows reads
// them: Ct = C (K + 1) rows of z per image.
struct PatchwiseConcatInputs : RelationInputs {
  int64_t Ct;
  PatchwiseConcatInputs(at::Tensor a, at::Tensor b, int64_t k, int64_t s, int64_t p, int64_t d, bool reflect)
      : RelationInputs(std::move(a), std::move(b), k, s, p, d, reflect) {
    Ct = C * (g.K() + 1);
    x1_planes = pad_planes(x1, g);
    x2_planes = pad_planes(x2, g);
  }
  template <typename T>
  PatchwiseConcatRows<T> rows() const {
    return PatchwiseConcatRows<T>{x1_planes.data_ptr<T>(), x2_planes.data_ptr<T>(), C, g};
  }
};

}  // namespace

std::vector<at::Tensor> subtraction2_var_mean(at::Tensor x1, at::Tensor x2, c10::optional<at::Tensor> append, int64_t k,
                                              int64_t s, int64_t p, int64_t d, bool reflect) {
  const Subtraction2Inputs in(x1, x2, append, k, s, p, d, reflect);
  auto var = at::empty({in.Ct}, in.x1.options()), mean = at::empty({in.Ct}, in.x1.options());
  AT_DISPATCH_FLOATING_TYPES(in.x1.scalar_type(), "subtraction2_var_mean", [&] {
    channel_var_mean_kernel<scalar_t>(in.rows<scalar_t>(), var.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), in.N,
                                      in.Ct, in.P);
  });
  return {var, mean};
}

at::Tensor subtraction2_affine_relu_conv1x1_forward(at::Tensor x1, at::Tensor x2, c10::optional<at::Tensor> append,
                                                    at::Tensor scale, at::Tensor shift, at::Tensor weight,
                                                    c10::optional<at::Tensor> bias, int64_t k, int64_t s, int64_t p,
                                                    int64_t d, bool reflect) {
  const Subtraction2Inputs in(x1, x2, append, k, s, p, d, reflect);
  scale = scale.contiguous();
  shift = shift.contiguous();
  weight = weight.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t Cout = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in.Ct && scale.numel() == in.Ct && shift.numel() == in.Ct,
              "subtraction2_affine_relu_conv1x1: shape mismatch");
  auto y = at::empty({in.N, Cout, in.g.K(), in.g.L()}, in.x1.options());
  AT_DISPATCH_FLOATING_TYPES(in.x1.scalar_type(), "subtraction2_affine_relu_conv1x1_forward", [&] {
    auto kernel = affine_relu_conv1x1_forward_for<scalar_t, Subtraction2Rows<scalar_t>>(Cout);
    kernel(in.rows<scalar_t>(), scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
           b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), in.N, in.Ct, Cout, in.P, nullptr);
  });
  return y;
}

// Both of gamma's triples in one pass (affine_relu_conv1x1_twice_forward_kernel) on the rows make_rows(T{}) gives,
// Cin rows of P values per image: y (N, Cout, *tail).
template <typename MakeRows>
at::Tensor affine_relu_conv1x1_twice(MakeRows&& make_rows, const at::Tensor& x, int64_t N, int64_t Cin, int64_t P,
                                     std::vector<int64_t> tail, at::Tensor scale1, at::Tensor shift1, at::Tensor weight1,
                                     at::Tensor scale2, at::Tensor shift2, at::Tensor weight2,
                                     const c10::optional<at::Tensor>& bias2, const char* name) {
  scale1 = scale1.contiguous();
  shift1 = shift1.contiguous();
  weight1 = weight1.contiguous();
  scale2 = scale2.contiguous();
  shift2 = shift2.contiguous();
  weight2 = weight2.contiguous();
  at::Tensor b2 = bias2.has_value() ? bias2->contiguous() : at::Tensor();
  const int64_t Cmid = weight1.size(0), Cout = weight2.size(0);
  TORCH_CHECK(weight1.dim() == 2 && weight1.size(1) == Cin && scale1.numel() == Cin && shift1.numel() == Cin &&
                  weight2.dim() == 2 && weight2.size(1) == Cmid && scale2.numel() == Cmid && shift2.numel() == Cmid &&
                  (!b2.defined() || b2.numel() == Cout),
              name, ": shape mismatch");
  tail.insert(tail.begin(), {N, Cout});
  auto y = pooled_empty(tail, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "affine_relu_conv1x1_twice", [&] {
    const auto rows = make_rows(scalar_t{});
    auto kernel = affine_relu_conv1x1_twice_forward_for<scalar_t, std::decay_t<decltype(rows)>>(Cmid, Cout);
    kernel(rows, scale1.data_ptr<scalar_t>(), shift1.data_ptr<scalar_t>(), weight1.data_ptr<scalar_t>(),
           scale2.data_ptr<scalar_t>(), shift2.data_ptr<scalar_t>(), weight2.data_ptr<scalar_t>(),
           b2.defined() ? b2.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), N, Cin, Cmid, Cout, P);
  });
  return y;
}

// Output rows per block of attention_kernel: as many as a sub-block holds, or fewer where the batch gives the
// threads few blocks and fewer rows share them out better (SAN's 28 x 28 map at batch 1 on two threads, 512-bit
// vectors: 8, 8, 8 and 4 rows, not 9, 9, 9 and 1). Tasks go to the threads in contiguous chunks (at::parallel_for)
// and a block costs its products' column tiles: the rows that give the busiest thread the fewest tiles, the most
// rows among ties. Every output is computed the same way whatever the blocks.
template <typename T>
int64_t attention_block_rows(int64_t N, int64_t Ho, int64_t Wo) {
  const int64_t most = std::min(Ho, kSubBlock / Wo), threads = std::max(1, at::get_num_threads());
  if (N * ceil_div(Ho, most) >= 8 * threads) return most;  // enough blocks to even out
  constexpr int64_t tile = kColumnVectors * VW<T>;
  int64_t best = most, best_cost = -1;
  for (int64_t r = most; r >= 1; --r) {
    const int64_t blocks = ceil_div(Ho, r), tasks = N * blocks, chunk = ceil_div(tasks, threads);
    int64_t cost = 0;
    for (int64_t t0 = 0; t0 < tasks; t0 += chunk) {
      int64_t tiles = 0;
      for (int64_t t = t0; t < std::min(tasks, t0 + chunk); ++t)
        tiles += ceil_div(std::min(r, Ho - (t % blocks) * r) * Wo, tile);
      cost = std::max(cost, tiles);
    }
    if (best_cost < 0 || cost < best_cost) best = r, best_cost = cost;
  }
  return best;
}

// A layer after its transforms, for inference at stride 1: y = aggregation(v, w) with w the output of gamma's two
// triples on the rows src gives, and for the pairwise layer (per_tap) w = softmax_K(gamma(z)), z = [x1_i - x2_j,
// append] (Subtraction2Rows). Per task, an image's block of whole output rows (at most kSubBlock positions): the
// triples write the block's (Cw, K, m) weights into a per-thread buffer (pairwise: tap by tap, Cw outputs each;
// patchwise: once, Cw K outputs, channel cw K + k), the pairwise softmax normalises them over K in place, and the
// block's outputs aggregate with them while they are in cache. Neither z, gamma's hidden layer nor the (N, Cw, K, L)
// weights are written. v_planes: v's padded planes (N, C, Hp, Wp), VW values of slack.
template <typename T, int R1, int R2, typename Rows>
void attention_kernel(const Rows& src, const TwoTriples<T, R1, R2>& triples, bool per_tap, const T* v_planes, T* y,
                      int64_t N, int64_t C, const Geometry& g) {
  const int64_t K = g.K(), L = g.L(), plane = g.plane();
  const int64_t Cw = per_tap ? triples.Cout : triples.Cout / K, S = C / Cw;
  const int64_t rows = attention_block_rows<T>(N, g.Ho, g.Wo), blocks = (g.Ho + rows - 1) / rows;
  parallel_range(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    AlignedVector<T> relu_rows(triples.Cin * kStagedStride), hidden_rows(triples.Cmid * kStagedStride);
    AlignedVector<T> scratch(kSubBlock);
    AlignedVector<T> weights(Cw * K * rows * g.Wo), tap_max(rows * g.Wo);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, hb = (t % blocks) * rows, he = std::min(g.Ho, hb + rows), m = (he - hb) * g.Wo;
      if (per_tap && m == L) {
        // the whole map: its (K, L) columns in one run, full sub-blocks across the taps (no padded tile per tap)
        for (int64_t q0 = 0; q0 < K * L; q0 += kSubBlock)
          triples.run(src, n, q0, std::min(kSubBlock, K * L - q0), relu_rows.data(), hidden_rows.data(),
                      scratch.data(), weights.data() + q0, K * L);
      } else if (per_tap) {
        for (int64_t tap = 0; tap < K; ++tap)
          triples.run(src, n, tap * L + hb * g.Wo, m, relu_rows.data(), hidden_rows.data(), scratch.data(),
                      weights.data() + tap * m, K * m);
      } else {
        triples.run(src, n, hb * g.Wo, m, relu_rows.data(), hidden_rows.data(), scratch.data(), weights.data(), m);
      }
      for (int64_t cw = 0; cw < Cw; ++cw) {
        T* w_plane = weights.data() + cw * K * m;
        if (per_tap && folds_softmax(S)) {
          tap_max_plane(w_plane, K, m, tap_max.data());
          for (int64_t ho = hb; ho < he; ++ho)
            aggregation_forward_row<T, true>(v_planes + (n * C + cw) * plane, Cw * plane, S,
                                             w_plane + (ho - hb) * g.Wo, m, tap_max.data() + (ho - hb) * g.Wo,
                                             y + (n * C + cw) * L, Cw * L, ho, g);
          continue;
        }
        if (per_tap) tap_softmax_forward_plane(w_plane, w_plane, K, m);
        for (int64_t ho = hb; ho < he; ++ho)
          aggregation_forward_row<T, false>(v_planes + (n * C + cw) * plane, Cw * plane, S, w_plane + (ho - hb) * g.Wo,
                                            m, nullptr, y + (n * C + cw) * L, Cw * L, ho, g);
      }
    }
  });
}

// The entry points' shared part: checks, v's padded planes, the output, and attention_kernel with the register
// blocks for gamma's widths. make_rows(T{}) gives the rows of z (Cin of them per image).
template <typename MakeRows>
at::Tensor attention_inference(MakeRows&& make_rows, bool per_tap, const Geometry& g, int64_t N, int64_t Cin,
                               const at::Tensor& like, at::Tensor v, at::Tensor scale1, at::Tensor shift1,
                               at::Tensor weight1, at::Tensor scale2, at::Tensor shift2, at::Tensor weight2,
                               const c10::optional<at::Tensor>& bias2, const char* name) {
  TORCH_CHECK(g.s == 1 && g.Wo <= kSubBlock, name, ": stride 1 and output rows of at most ", kSubBlock,
              " positions");
  check_cpu(v, "v");
  v = v.contiguous();
  TORCH_CHECK(v.dim() == 4 && v.size(0) == N && v.size(2) == g.H && v.size(3) == g.W &&
                  v.scalar_type() == like.scalar_type(),
              name, ": v must be (N, C, H, W) like x1, of its dtype");
  scale1 = scale1.contiguous();
  shift1 = shift1.contiguous();
  weight1 = weight1.contiguous();
  scale2 = scale2.contiguous();
  shift2 = shift2.contiguous();
  weight2 = weight2.contiguous();
  at::Tensor b2 = bias2.has_value() ? bias2->contiguous() : at::Tensor();
  const int64_t Cmid = weight1.size(0), Cout = weight2.size(0), C = v.size(1);
  const int64_t Cw = per_tap ? Cout : Cout / g.K();
  TORCH_CHECK(weight1.dim() == 2 && weight1.size(1) == Cin && scale1.numel() == Cin && shift1.numel() == Cin &&
                  weight2.dim() == 2 && weight2.size(1) == Cmid && scale2.numel() == Cmid && shift2.numel() == Cmid &&
                  (!b2.defined() || b2.numel() == Cout) && Cw > 0 && (per_tap || Cout % g.K() == 0) &&
                  C % Cw == 0,
              name, ": shape mismatch");
  auto y = pooled_empty({N, C, g.Ho, g.Wo}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "attention_inference", [&] {
    using T = scalar_t;
    const int64_t values = N * C * g.plane();
    at::Tensor v_planes = pooled_empty({values + VW<T>}, v.options());  // slack: full-width loads past the last row
    T* vp = v_planes.data_ptr<T>();
    const T* src = v.data_ptr<T>();
    std::fill(vp + values, vp + values + VW<T>, T(0));
    parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) pad_plane(src + t * g.H * g.W, vp + t * g.plane(), g);
    });
    const auto rows = make_rows(T{});
    const T* bias = b2.defined() ? b2.data_ptr<T>() : nullptr;
    // R1, R2: rows per register block of gamma's two products (see pick_block_rows)
    auto run = [&](auto r1, auto r2) {
      const TwoTriples<T, decltype(r1)::value, decltype(r2)::value> triples(
          scale1.data_ptr<T>(), shift1.data_ptr<T>(), weight1.data_ptr<T>(), scale2.data_ptr<T>(),
          shift2.data_ptr<T>(), weight2.data_ptr<T>(), bias, Cin, Cmid, Cout);
      attention_kernel(rows, triples, per_tap, vp, y.data_ptr<T>(), N, C, g);
    };
    using Four = std::integral_constant<int, 4>;
    using Wide = std::integral_constant<int, kWideRows>;
    const bool mid_wide = pick_block_rows(Cmid) == kWideRows, out_wide = pick_block_rows(Cout) == kWideRows;
    if (mid_wide)
      out_wide ? run(Wide{}, Wide{}) : run(Wide{}, Four{});
    else
      out_wide ? run(Four{}, Wide{}) : run(Four{}, Four{});
  });
  return y;
}

at::Tensor subtraction2_affine_relu_conv1x1_twice_forward(at::Tensor x1, at::Tensor x2,
                                                          c10::optional<at::Tensor> append, at::Tensor scale1,
                                                          at::Tensor shift1, at::Tensor weight1, at::Tensor scale2,
                                                          at::Tensor shift2, at::Tensor weight2,
                                                          c10::optional<at::Tensor> bias2, int64_t k, int64_t s,
                                                          int64_t p, int64_t d, bool reflect) {
  const Subtraction2Inputs in(x1, x2, append, k, s, p, d, reflect);
  return affine_relu_conv1x1_twice([&](auto t) { return in.rows<decltype(t)>(); }, in.x1, in.N, in.Ct, in.P,
                                   {in.g.K(), in.g.L()}, scale1, shift1, weight1, scale2, shift2, weight2, bias2,
                                   "subtraction2_affine_relu_conv1x1_twice");
}

at::Tensor pairwise_attention_inference(at::Tensor x1, at::Tensor x2, c10::optional<at::Tensor> append, at::Tensor v,
                                        at::Tensor scale1, at::Tensor shift1, at::Tensor weight1, at::Tensor scale2,
                                        at::Tensor shift2, at::Tensor weight2, c10::optional<at::Tensor> bias2,
                                        int64_t k, int64_t s, int64_t p, int64_t d, bool reflect) {
  const Subtraction2Inputs in(x1, x2, append, k, s, p, d, reflect);
  return attention_inference([&](auto t) { return in.rows<decltype(t)>(); }, true, in.g, in.N, in.Ct, in.x1, v,
                             scale1, shift1, weight1, scale2, shift2, weight2, bias2, "pairwise_attention_inference");
}

at::Tensor patchwise_attention_inference(at::Tensor x1, at::Tensor x2, at::Tensor v, at::Tensor scale1,
                                         at::Tensor shift1, at::Tensor weight1, at::Tensor scale2, at::Tensor shift2,
                                         at::Tensor weight2, c10::optional<at::Tensor> bias2, int64_t k, int64_t s,
                                         int64_t p, int64_t d, bool reflect) {
  const PatchwiseConcatInputs in(x1, x2, k, s, p, d, reflect);
  auto make_rows = [&](auto t) { return in.rows<decltype(t)>(); };
  return attention_inference(make_rows, false, in.g, in.N, in.Ct, in.x1, v, scale1, shift1, weight1, scale2, shift2,
                             weight2, bias2, "patchwise_attention_inference");
}

at::Tensor patchwise_concat_affine_relu_conv1x1_twice_forward(at::Tensor x1, at::Tensor x2, at::Tensor scale1,
                                                              at::Tensor shift1, at::Tensor weight1, at::Tensor scale2,
                                                              at::Tensor shift2, at::Tensor weight2,
                                                              c10::optional<at::Tensor> bias2, int64_t k, int64_t s,
                                                              int64_t p, int64_t d, bool reflect) {
  const PatchwiseConcatInputs in(x1, x2, k, s, p, d, reflect);
  auto make_rows = [&](auto t) { return in.rows<decltype(t)>(); };
  return affine_relu_conv1x1_twice(make_rows, in.x1, in.N, in.Ct, in.g.L(), {1, in.g.L()}, scale1, shift1, weight1,
                                   scale2, shift2, weight2, bias2, "patchwise_concat_affine_relu_conv1x1_twice");
}

std::vector<at::Tensor> subtraction2_affine_relu_conv1x1_backward(at::Tensor gy, at::Tensor x1, at::Tensor x2,
                                                                  c10::optional<at::Tensor> append, at::Tensor scale,
                                                                  at::Tensor shift, at::Tensor weight, int64_t k,
                                                                  int64_t s, int64_t p, int64_t d, bool reflect) {
  const Subtraction2Inputs in(x1, x2, append, k, s, p, d, reflect);
  gy = gy.contiguous();
  scale = scale.contiguous();
  shift = shift.contiguous();
  weight = weight.contiguous();
  const int64_t Cin = in.Ct, Cout = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == Cin && scale.numel() == Cin && shift.numel() == Cin &&
                  gy.dim() == 4 && gy.size(0) == in.N && gy.size(1) == Cout && gy.size(2) * gy.size(3) == in.P,
              "subtraction2_affine_relu_conv1x1_backward: shape mismatch");
  auto gz = at::empty({in.N, Cin, in.g.K(), in.g.L()}, in.x1.options());
  auto gscale = at::zeros_like(scale), gshift = at::zeros_like(shift), gw = at::zeros_like(weight);
  auto gbias = at::zeros({Cout}, in.x1.options());
  AT_DISPATCH_FLOATING_TYPES(in.x1.scalar_type(), "subtraction2_affine_relu_conv1x1_backward", [&] {
    auto kernel = affine_relu_conv1x1_backward_for<scalar_t, Subtraction2Rows<scalar_t>>(Cin, Cout);
    kernel(gy.data_ptr<scalar_t>(), in.rows<scalar_t>(), scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
           weight.data_ptr<scalar_t>(), gz.data_ptr<scalar_t>(), gscale.data_ptr<scalar_t>(),
           gshift.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), gbias.data_ptr<scalar_t>(), in.N, Cin, Cout, in.P);
  });
  return {gz, gscale, gshift, gw, gbias};
}

std::vector<at::Tensor> subtraction2_var_mean_backward(at::Tensor gz0, at::Tensor x1, at::Tensor x2, at::Tensor a,
                                                       at::Tensor b, at::Tensor mean, int64_t k, int64_t s, int64_t p,
                                                       int64_t d, bool reflect) {
  check_cpu(gz0, "grad");
  check_cpu(x1, "x1");
  gz0 = gz0.contiguous();
  x1 = x1.contiguous();
  x2 = x2.contiguous();
  a = a.contiguous();
  b = b.contiguous();
  mean = mean.contiguous();
  const Geometry g(x1.size(2), x1.size(3), k, s, p, d, reflect);
  check_geometry(g);
  const int64_t N = x1.size(0), C = x1.size(1), Ct = gz0.size(1);
  TORCH_CHECK(x1.sizes() == x2.sizes() && gz0.size(0) == N && Ct >= C && gz0.size(2) == g.K() && gz0.size(3) == g.L() &&
                  a.numel() >= C && b.numel() >= C && mean.numel() >= C,
              "subtraction2_var_mean_backward: shape mismatch");
  auto gx1 = at::empty_like(x1), gx2 = at::empty_like(x1);
  AT_DISPATCH_FLOATING_TYPES(x1.scalar_type(), "subtraction2_var_mean_backward", [&] {
    const StatisticsCorrection<scalar_t> correction{x1.data_ptr<scalar_t>(), x2.data_ptr<scalar_t>(),
                                                    a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                                    mean.data_ptr<scalar_t>()};
    gather_backward_kernel<scalar_t>(gz0.data_ptr<scalar_t>(), gx1.data_ptr<scalar_t>(), gx2.data_ptr<scalar_t>(),
                                     scalar_t(1), N, C, Ct, g, &correction);
  });
  return {gx1, gx2};
}

void add_subtraction2_constants(KernelConstants& constants) {
  constants["shifted_max_width"] = kShiftedMaxWidth;
  constants["sub_block"] = kSubBlock;
}

}  // namespace cpu
}  // namespace torchsan
