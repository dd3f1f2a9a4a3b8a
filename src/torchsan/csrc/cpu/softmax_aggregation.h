// The forward pieces of the softmax over the K taps and of the aggregation, shared by softmax_aggregation.cpp and
// the pairwise attention's inference kernel (subtraction2_conv1x1.cpp).
#pragma once

#include "common.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {

// Per (K, L) plane and per vector of VW positions: the max over the K taps, exp and sum in one sweep, then the
// scaling, with the K vectors in L1.
// exp: float32 uses a Cephes-style polynomial, flushing arguments below -87.3 (where expf underflows to subnormals)
// to 0. Its relative error is at most 8.6e-8 (every float argument in [-87.3, 88.3] against a double exp, with or
// without FMA contraction); float64 calls std::exp.
inline V<float> vector_exp(V<float> x) {
  typedef int32_t VI __attribute__((vector_size(kVectorBytes)));
  const V<float> lo = x < -87.3f ? V<float>{} - 1.0f : V<float>{};  // all-ones where the result underflows
  x = x < -87.3f ? V<float>{} : x;
  x = x > 88.3f ? V<float>{} + 88.3f : x;
  V<float> fx = x * 1.44269504088896341f + 0.5f;
  V<float> fl;
#if defined(TORCHSAN_ZMM)
  __m512 f;
  std::memcpy(&f, &fx, sizeof(f));
  f = _mm512_roundscale_ps(f, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  std::memcpy(&fl, &f, sizeof(fl));
#elif defined(__AVX__)
  __m256 f;
  std::memcpy(&f, &fx, sizeof(f));
  f = _mm256_floor_ps(f);
  std::memcpy(&fl, &f, sizeof(fl));
#else
  for (int64_t i = 0; i < VW<float>; ++i) fl[i] = std::floor(fx[i]);
#endif
  x = x - fl * 0.693359375f - fl * -2.12194440e-4f;
  V<float> y = V<float>{} + 1.9875691500E-4f;
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * x * x + x + 1.0f;
  VI n = __builtin_convertvector(fl, VI);
  n = (n + 127) << 23;
  V<float> pow2;
  std::memcpy(&pow2, &n, sizeof(pow2));
  y = y * pow2;
  VI bits;
  std::memcpy(&bits, &y, sizeof(bits));
  VI keep;
  std::memcpy(&keep, &lo, sizeof(keep));
  bits = bits & ~keep;  // underflow -> +0
  std::memcpy(&y, &bits, sizeof(y));
  return y;
}
inline V<double> vector_exp(V<double> x) {
  for (int64_t i = 0; i < VW<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Each plane in blocks of kSoftmaxBlockVectors vectors of positions: every tap row is visited for 2 cache lines at
// a time, which keeps the K strided streams prefetchable; the block's K rows stay in L1 between the sweeps.
constexpr int64_t kSoftmaxBlockVectors = 4;

// The lanes of each of the B vectors of a block starting at q0 that lie inside the row of L positions.
template <typename T, int64_t B, bool FULL>
inline void block_lanes(int64_t (&lanes)[B], int64_t L, int64_t q0) {
  for (int64_t b = 0; b < B; ++b) lanes[b] = FULL ? VW<T> : std::max<int64_t>(0, std::min(VW<T>, L - q0 - b * VW<T>));
}

// One block of B vectors of positions starting at q0 (FULL: all B * VW positions are inside the row).
template <typename T, int64_t B, bool FULL>
inline void tap_softmax_forward_block(const T* x, T* y, int64_t K, int64_t L, int64_t q0) {
  int64_t lanes[B];
  block_lanes<T, B, FULL>(lanes, L, q0);
  auto load = [&](const T* p, int64_t b) { return FULL ? load_partial(p, VW<T>) : load_partial(p, lanes[b]); };
  auto store = [&](T* p, V<T> v, int64_t b) { FULL ? store_partial(p, v, VW<T>) : store_partial(p, v, lanes[b]); };
  V<T> m[B], sum[B] = {};
  for (int64_t b = 0; b < B; ++b) m[b] = load(x + q0 + b * VW<T>, b);
  for (int64_t k = 1; k < K; ++k) {
    if (FULL) {  // the K rows are K strided streams: fetch the next block's lines ahead
      __builtin_prefetch(x + k * L + q0 + B * VW<T>);
      __builtin_prefetch(x + k * L + q0 + B * VW<T> + 64 / sizeof(T));
    }
    for (int64_t b = 0; b < B; ++b) {
      const V<T> v = load(x + k * L + q0 + b * VW<T>, b);
      m[b] = v > m[b] ? v : m[b];
    }
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t b = 0; b < B; ++b) {
      const V<T> e = vector_exp(load(x + k * L + q0 + b * VW<T>, b) - m[b]);
      sum[b] += e;
      store(y + k * L + q0 + b * VW<T>, e, b);
    }
  for (int64_t b = 0; b < B; ++b) sum[b] = T(1) / sum[b];
  for (int64_t k = 0; k < K; ++k)
    for (int64_t b = 0; b < B; ++b) {
      T* o = y + k * L + q0 + b * VW<T>;
      store(o, load(o, b) * sum[b], b);
    }
}

// One (K, L) plane: y = softmax over K of x.
template <typename T>
void tap_softmax_forward_plane(const T* x, T* y, int64_t K, int64_t L) {
  constexpr int64_t B = kSoftmaxBlockVectors;
  int64_t q0 = 0;
  for (; q0 + B * VW<T> <= L; q0 += B * VW<T>) tap_softmax_forward_block<T, B, true>(x, y, K, L, q0);
  for (; q0 < L; q0 += VW<T>) tap_softmax_forward_block<T, 1, false>(x, y, K, L, q0);
}

// The max over the K taps of every position of a (K, L) plane: mx[0 .. L).
template <typename T>
inline void tap_max_plane(const T* w, int64_t K, int64_t L, T* mx) {
  for (int64_t q = 0; q < L; q += VW<T>) {
    const int64_t lanes = std::min(VW<T>, L - q);
    V<T> m = load_partial(w + q, lanes);
    for (int64_t k = 1; k < K; ++k) {
      const V<T> v = load_partial(w + k * L + q, lanes);
      m = v > m ? v : m;
    }
    store_partial(mx + q, m, lanes);
  }
}

// Stride-1 aggregation, register-blocked: for one output row and VW output pixels, the G feature channels that
// share a weight channel accumulate all K taps in G registers; each tap loads its weight vector once for all G.
// xp: the G padded planes of this block (with VW values of slack after the last), plane = Hp * Wp. w_row: tap 0's
// weights for output row ho (tap t's start t * wstride values later). FULL: lanes == VW.
// SOFTMAX: w_row holds logits and mx_row their max over the taps (the output row's); each tap weighs by
// exp(logit - max) and the G sums are scaled by 1 / sum of the exps once, instead of normalising K weights per
// position in a pass of their own.
template <typename T, int G, bool FULL, bool SOFTMAX>
TORCHSAN_ALWAYS_INLINE void aggregation_forward_block(const T* xp, int64_t plane, const T* w_row, int64_t wstride,
                                                      const T* mx_row, T* y0, int64_t ystride, int64_t ho, int64_t q,
                                                      int64_t lanes, const Geometry& g) {
  if (FULL) lanes = VW<T>;
  V<T> acc[G] = {}, sum = {}, mv = {};
  if (SOFTMAX) mv = load_partial(mx_row + q, lanes);  // (lanes past the row: logits and max 0, never stored)
  for (int64_t kh = 0; kh < g.k; ++kh) {
    const T* xrow = xp + (ho + kh * g.d) * g.Wp + q;
    for (int64_t kw = 0; kw < g.k; ++kw) {
      const T* wp = w_row + (kh * g.k + kw) * wstride + q;
      __builtin_prefetch(wp + 8 * VW<T>);  // the K weight rows are K strided streams: fetch ahead explicitly
      V<T> wv = load_partial(wp, lanes);
      if (SOFTMAX) {
        wv = vector_exp(wv - mv);
        sum += wv;
      }
      const T* xb = xrow + kw * g.d;
      for (int j = 0; j < G; ++j) acc[j] += wv * load_partial(xb + j * plane, VW<T>);
    }
  }
  if (SOFTMAX) {
    const V<T> inv = T(1) / sum;
    for (int j = 0; j < G; ++j) acc[j] *= inv;
  }
  for (int j = 0; j < G; ++j) store_partial(y0 + j * ystride + ho * g.Wo + q, acc[j], lanes);
}

// One output row of the stride-1 aggregation for the S channels sharing a weight channel (their padded planes
// `plane` values apart from xp, their outputs ystride apart from y0), in blocks of 8 channels and VW pixels.
// mx_row: null for weights, or the row's max over the taps for logits (the softmax over the K taps folded in).
template <typename T, bool SOFTMAX>
inline void aggregation_forward_row(const T* xp, int64_t plane, int64_t S, const T* w_row, int64_t wstride,
                                    const T* mx_row, T* y0, int64_t ystride, int64_t ho, const Geometry& g) {
  for (int64_t q = 0; q < g.Wo; q += VW<T>) {
    const int64_t lanes = std::min(VW<T>, g.Wo - q);
    int64_t j = 0;
    for (; j + 8 <= S; j += 8) {
      if (lanes == VW<T>)
        aggregation_forward_block<T, 8, true, SOFTMAX>(xp + j * plane, plane, w_row, wstride, mx_row,
                                                       y0 + j * ystride, ystride, ho, q, lanes, g);
      else
        aggregation_forward_block<T, 8, false, SOFTMAX>(xp + j * plane, plane, w_row, wstride, mx_row,
                                                        y0 + j * ystride, ystride, ho, q, lanes, g);
    }
    for (; j < S; ++j)
      aggregation_forward_block<T, 1, false, SOFTMAX>(xp + j * plane, plane, w_row, wstride, mx_row,
                                                      y0 + j * ystride, ystride, ho, q, lanes, g);
  }
}

// Whether the aggregation with the softmax folded in pays for S channels per weight channel: whole blocks of 8 (each
// weight's exp computed once per block; a lone channel would recompute it per channel).
inline bool folds_softmax(int64_t S) { return S % 8 == 0; }

}  // namespace cpu
}  // namespace torchsan
