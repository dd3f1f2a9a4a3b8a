// The parts of the gathers (subtraction2, unfold) that the fused subtraction2 op reuses: the column-shifted copies
// and centre planes of the stride-1 path, and the backward with its optional statistics correction.
#pragma once

#include "common.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {

// Stride 1: the k column-shifted copies S_kw[h][wo] = xp[h][wo + kw d] (Hp x Wo each) of a padded plane turn each
// tap's window into one contiguous run: tap (kh, kw) is rows kh d .. kh d + Ho - 1 of S_kw, L values from kh d Wo.
// So every tap is one long vectorised loop, where row-by-row gathers run Ho loops of Wo values (7 and 14 on SAN's
// last stages, mostly remainder iterations). Building the copies costs k Hp rows per plane, not K Ho.
//
// The copies' rows are short on small maps, so they move whole vectors: xp, S and the gradient planes are private
// work buffers with kBufferSlack values past their end. A copied row may spill up to VW - 1 values into the next,
// which is written right after it; an accumulated row reads its source exactly (a masked tail) and adds 0 to the
// spilled lanes.
template <typename T>
constexpr int64_t kBufferSlack = VW<T>;

// Output planes (K * L values) this small have taps too short for the hardware prefetcher to run ahead: the stride-1
// backward prefetches the next plane's gradient, and the forward may stage them (see gathers.cpp).
constexpr int64_t kSmallPlaneBytes = int64_t(64) << 10;

template <typename T>
void shift_columns(const T* xp, T* S, const Geometry& g) {
  for (int64_t kw = 0; kw < g.k; ++kw)
    for (int64_t h = 0; h < g.Hp; ++h) {
      const T* src = xp + h * g.Wp + kw * g.d;
      T* dst = S + (kw * g.Hp + h) * g.Wo;
      for (int64_t i = 0; i < g.Wo; i += VW<T>) std::memcpy(dst + i, src + i, sizeof(V<T>));
    }
}

// The adjoint of shift_columns: grad_padded[h][wo + kw d] += grad_shifted_kw[h][wo].
template <typename T>
void unshift_columns(const T* grad_shifted, T* grad_padded, const Geometry& g) {
  for (int64_t kw = 0; kw < g.k; ++kw)
    for (int64_t h = 0; h < g.Hp; ++h) {
      const T* src = grad_shifted + (kw * g.Hp + h) * g.Wo;
      T* dst = grad_padded + h * g.Wp + kw * g.d;
      for (int64_t i = 0; i < g.Wo; i += VW<T>) {
        V<T> acc;
        std::memcpy(&acc, dst + i, sizeof(acc));
        acc += load_partial(src + i, std::min(VW<T>, g.Wo - i));
        std::memcpy(dst + i, &acc, sizeof(acc));
      }
    }
}

// The centres of a stride-1 footprint: rows c0 .. c0 + Ho - 1, columns c0 .. of the padded plane xp, as an (Ho, Wo)
// plane. When the padding is the footprint's half-span (SAN's "same" padding) that is the unpadded plane itself.
template <typename T>
void centre_plane(const T* xp, T* centre, const Geometry& g) {
  const int64_t c0 = (g.k / 2) * g.d;
  for (int64_t ho = 0; ho < g.Ho; ++ho) std::memcpy(centre + ho * g.Wo, xp + (ho + c0) * g.Wp + c0, sizeof(T) * g.Wo);
}

// Plane src -> its column-shifted copies S, through the padded buffer xp.
template <typename T>
void shifted_copies(const T* src, T* xp, T* S, const Geometry& g) {
  pad_plane(src, xp, g);
  shift_columns(xp, S, g);
}

// Whether the centres of a stride-1 footprint are the unpadded plane itself: "same" padding (see centre_plane).
inline bool centres_are_input(const Geometry& g) { return g.p == (g.k / 2) * g.d; }

// The centres of plane src (see centre_plane): src itself with "same" padding, else extracted into centre through xp.
template <typename T>
const T* centres(const T* src, T* xp, T* centre, const Geometry& g) {
  if (centres_are_input(g)) return src;
  pad_plane(src, xp, g);
  centre_plane(xp, centre, g);
  return centre;
}

// A training-mode BatchNorm's statistics share of the gradient of z = subtraction2(x1, x2), added to gout on the fly:
// gz = gout + a[c] + b[c] * (z - mean[c]) (see channel_var_mean_backward_kernel), z recomputed from x1 and x2.
template <typename T>
struct StatisticsCorrection {
  const T *x1, *x2, *a, *b, *mean;  // x1, x2 (N, C, H, W); a, b, mean (C)
};

template <typename T>
void gather_backward_stride1(const T* gout, T* gx1, T* gx2, T sign, int64_t N, int64_t C, int64_t Ct, const Geometry& g,
                             const StatisticsCorrection<T>* correction) {
  const int64_t K = g.K(), L = g.L(), HW = g.H * g.W, c0 = (g.k / 2) * g.d, shifted = g.k * g.Hp * g.Wo;
  const bool same = centres_are_input(g);
  const bool prefetch_next = K * L * int64_t(sizeof(T)) <= kSmallPlaneBytes;
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    const T local_sign = sign;  // the task's copy (captured by reference): not reloaded after each store
    std::vector<T> grad_shifted(gx2 ? shifted : 0), grad_centre(gx1 ? L : 0);
    std::vector<T> grad_padded(g.plane() + kBufferSlack<T>);  // also the padded input planes of the correction
    std::vector<T> S(correction ? shifted + kBufferSlack<T> : 0), centre_buffer(correction && !same ? L : 0);
    std::vector<T> gz(correction ? L : 0);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(grad_shifted.begin(), grad_shifted.end(), T(0));
      std::fill(grad_centre.begin(), grad_centre.end(), T(0));
      const T* centre_values = nullptr;
      if (correction) {  // z = centre - S, as in the forward
        shifted_copies(correction->x2 + t * HW, grad_padded.data(), S.data(), g);
        centre_values = centres(correction->x1 + t * HW, grad_padded.data(), centre_buffer.data(), g);
      }
      const T* grad_plane = gout + ((t / C) * Ct + t % C) * K * L;  // gout: Ct >= C channels
      const T* next_grad_plane =
          prefetch_next && t + 1 < end ? gout + (((t + 1) / C) * Ct + (t + 1) % C) * K * L : nullptr;
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          const T* grad_tap = grad_plane + (kh * g.k + kw) * L;
          if (next_grad_plane)
            for (int64_t i = 0; i < L; i += 64 / sizeof(T))
              __builtin_prefetch(next_grad_plane + (kh * g.k + kw) * L + i);
          const int64_t tap_start = (kw * g.Hp + kh * g.d) * g.Wo;
          if (correction) {
            const int64_t c = t % C;
            const T a = correction->a[c], b = correction->b[c], mu = correction->mean[c];
            const T* src = S.data() + tap_start;
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) gz[i] = grad_tap[i] + a + b * ((centre_values[i] - src[i]) - mu);
            grad_tap = gz.data();
          }
          if (gx1 && gx2) {
            T* grad_shifted_tap = grad_shifted.data() + tap_start;
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) {
              grad_centre[i] += grad_tap[i];
              grad_shifted_tap[i] -= local_sign * grad_tap[i];
            }
          } else if (gx1) {
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) grad_centre[i] += grad_tap[i];
          } else if (gx2) {
            T* grad_shifted_tap = grad_shifted.data() + tap_start;
#pragma omp simd
            for (int64_t i = 0; i < L; ++i) grad_shifted_tap[i] -= local_sign * grad_tap[i];
          }
        }
      }
      if (gx2) {
        std::fill(grad_padded.begin(), grad_padded.end(), T(0));
        unshift_columns(grad_shifted.data(), grad_padded.data(), g);
        std::fill(gx2 + t * HW, gx2 + (t + 1) * HW, T(0));
        fold_plane(grad_padded.data(), gx2 + t * HW, g);
      }
      if (gx1 && same) {
        std::copy(grad_centre.begin(), grad_centre.end(), gx1 + t * HW);
      } else if (gx1) {
        std::fill(grad_padded.begin(), grad_padded.end(), T(0));
        for (int64_t ho = 0; ho < g.Ho; ++ho)
          std::copy(grad_centre.data() + ho * g.Wo, grad_centre.data() + (ho + 1) * g.Wo,
                    grad_padded.data() + (ho + c0) * g.Wp + c0);
        std::fill(gx1 + t * HW, gx1 + (t + 1) * HW, T(0));
        fold_plane(grad_padded.data(), gx1 + t * HW, g);
      }
    }
  });
}

// gx1 += the centre taps of gout, gx2 -= sign * every tap of gout (each of them may be null), from the first C of
// gout's Ct channels. Stride 1 runs gather_backward_stride1; the rows below are strided.
template <typename T>
void gather_backward_kernel(const T* gout, T* gx1, T* gx2, T sign, int64_t N, int64_t C, int64_t Ct, const Geometry& g,
                            const StatisticsCorrection<T>* correction = nullptr) {
  if (g.s == 1) return gather_backward_stride1(gout, gx1, gx2, sign, N, C, Ct, g, correction);
  const int64_t K = g.K(), L = g.L(), HW = g.H * g.W, c0 = (g.k / 2) * g.d;
  parallel_range(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> grad_padded1(gx1 ? g.plane() : 0), grad_padded2(gx2 ? g.plane() : 0);
    std::vector<T> x1_padded(correction ? g.plane() : 0), x2_padded(correction ? g.plane() : 0);
    std::vector<T> gz(correction ? g.Wo : 0);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(grad_padded1.begin(), grad_padded1.end(), T(0));
      std::fill(grad_padded2.begin(), grad_padded2.end(), T(0));
      if (correction) {
        pad_plane(correction->x1 + t * HW, x1_padded.data(), g);
        pad_plane(correction->x2 + t * HW, x2_padded.data(), g);
      }
      for (int64_t kh = 0; kh < g.k; ++kh) {
        for (int64_t kw = 0; kw < g.k; ++kw) {
          const T* grad_plane = gout + (((t / C) * Ct + t % C) * K + kh * g.k + kw) * L;  // gout: Ct >= C channels
          for (int64_t ho = 0; ho < g.Ho; ++ho) {
            const T* grad_row = grad_plane + ho * g.Wo;
            if (correction) {
              const int64_t c = t % C;
              const T a = correction->a[c], b = correction->b[c], mu = correction->mean[c];
              const T* crow = x1_padded.data() + (ho * g.s + c0) * g.Wp + c0;
              const T* xrow = x2_padded.data() + (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t wo = 0; wo < g.Wo; ++wo)
                gz[wo] = grad_row[wo] + a + b * ((crow[wo * g.s] - xrow[wo * g.s]) - mu);
              grad_row = gz.data();
            }
            if (gx1) {
              T* crow = grad_padded1.data() + (ho * g.s + c0) * g.Wp + c0;
              for (int64_t wo = 0; wo < g.Wo; ++wo) crow[wo * g.s] += grad_row[wo];
            }
            if (gx2) {
              T* xrow = grad_padded2.data() + (ho * g.s + kh * g.d) * g.Wp + kw * g.d;
              for (int64_t wo = 0; wo < g.Wo; ++wo) xrow[wo * g.s] -= sign * grad_row[wo];
            }
          }
        }
      }
      if (gx1) {
        std::fill(gx1 + t * HW, gx1 + (t + 1) * HW, T(0));
        fold_plane(grad_padded1.data(), gx1 + t * HW, g);
      }
      if (gx2) {
        std::fill(gx2 + t * HW, gx2 + (t + 1) * HW, T(0));
        fold_plane(grad_padded2.data(), gx2 + t * HW, g);
      }
    }
  });
}

}  // namespace cpu
}  // namespace torchsan
