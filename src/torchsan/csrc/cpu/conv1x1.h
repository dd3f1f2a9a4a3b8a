// y = W relu(scale * x + shift) + bias over (N, Cin, P) -> (N, Cout, P): a training-mode BatchNorm (given as its
// per-channel affine map), ReLU and 1x1 convolution in one pass. This is the mapping gamma's building block; it runs
// over the (K, L) grid, where the unfused version writes and re-reads two Cin x K x L intermediates.
// The kernels are templated on a row source (see DenseRows), so that the fused subtraction2 op can feed them rows it
// gathers on the fly.
#pragma once

#include "common.h"
#include "memory_pool.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {

constexpr int64_t kColumnVectors = 2;  // column vectors per register block of the small GEMMs below
constexpr int64_t kSubBlock = 256;     // pixels per sub-block: its staged rows stay in L1/L2 (a multiple of
                                       // kColumnVectors * VW)
constexpr int64_t kInputTile = 2;      // input channels per register block of the weight-gradient reduction
constexpr int64_t kStagedStride = kSubBlock + 16;  // staged rows apart: not a multiple of 4 KB (L1 set aliasing)

// Rows per register block (R) of the small GEMMs: kWideRows or 4. With AVX2's 16 registers, 6 x kColumnVectors = 12
// accumulators hide the FMA latency better than 4 x kColumnVectors = 8, but pad 8 rows to 12; AVX-512's 32 registers
// hold 8 x kColumnVectors, which SAN's widths (multiples of 8) fill without padding. Pick the one with less padded
// work, counting a wide block as 1.2 times as fast.
#if defined(TORCHSAN_ZMM)
constexpr int kWideRows = 8;
#else
constexpr int kWideRows = 6;
#endif
inline int pick_block_rows(int64_t rows) {
  return round_up(rows, kWideRows) * 10 < round_up(rows, 4) * 12 ? kWideRows : 4;
}

// A (rows x cols) packed in blocks of R rows, column-major within a block, zero-padded:
// out[(b * cols + c) * R + j] = A[b * R + j][c]. `transpose` reads A as the transpose of a (cols x rows) src.
// Packed per call, on every thread for a large weight (packed by one thread, it would keep the others waiting at
// batch 1).
template <typename T, int R>
std::vector<T> pack_row_blocks(const T* src, int64_t rows, int64_t cols, bool transpose) {
  std::vector<T> out(round_up(rows, R) * cols, T(0));
  const int64_t blocks = round_up(rows, R) / R, grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, R * cols));
  parallel_range(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin * R; r < std::min(rows, end * R); ++r)
      for (int64_t c = 0; c < cols; ++c)
        out[((r / R) * cols + c) * R + r % R] = transpose ? src[c * rows + r] : src[r * cols + c];
  });
  return out;
}

// One register tile: acc = A_block (R x inner) @ B[:, 0 .. kColumnVectors * VW), B's rows bstride apart. Each step
// loads kColumnVectors B vectors and broadcasts R weights.
template <typename T, int R>
TORCHSAN_ALWAYS_INLINE void gemm_tile(const T* ap, int64_t inner, const T* B, int64_t bstride,
                                      V<T> (&acc)[R][kColumnVectors]) {
  for (int64_t j = 0; j < R; ++j)
    for (int64_t c = 0; c < kColumnVectors; ++c) acc[j][c] = V<T>{};
  for (int64_t i = 0; i < inner; ++i) {
    V<T> b[kColumnVectors];
    for (int64_t c = 0; c < kColumnVectors; ++c) std::memcpy(&b[c], B + i * bstride + c * VW<T>, sizeof(V<T>));
    const T* a = ap + i * R;
    for (int64_t j = 0; j < R; ++j)
      for (int64_t c = 0; c < kColumnVectors; ++c) acc[j][c] += a[j] * b[c];
  }
}

// For one packed block of R rows of A: acc = A_block (R x inner) @ B (inner x kSubBlock staged rows), for the
// columns [0, m) in steps of kColumnVectors * VW; epilogue(j, q, acc) receives row j, columns
// q .. q + kColumnVectors * VW (kColumnVectors vectors). R x kColumnVectors accumulators stay in registers.
template <typename T, int R, typename Epilogue>
inline void gemm_block(const T* ap, int64_t inner, const T* B, int64_t m, Epilogue&& epilogue) {
  for (int64_t q = 0; q < m; q += kColumnVectors * VW<T>) {
    V<T> acc[R][kColumnVectors];
    gemm_tile<T, R>(ap, inner, B + q, kStagedStride, acc);
    for (int64_t j = 0; j < R; ++j) epilogue(j, q, acc[j]);
  }
}

// Store the columns [q, q + kColumnVectors * VW) of a row, clipped to m.
template <typename T>
inline void store_columns(T* row, int64_t q, int64_t m, const V<T>* v) {
  for (int64_t c = 0; c < kColumnVectors; ++c) {
    const int64_t lanes = std::min(VW<T>, m - q - c * VW<T>);
    if (lanes <= 0) return;
    store_partial(row + q + c * VW<T>, v[c], lanes);
  }
}

// f(i, lanes) over [0, len) in whole vectors: runs can be as short as an output row, too short to leave a tail to
// scalar code. The last vector ends at len, overlapping the one before (f must write the same values twice).
template <typename T, typename F>
TORCHSAN_ALWAYS_INLINE void overlapping_vectors(int64_t len, F&& f) {
  int64_t i = 0;
  for (; i + VW<T> <= len; i += VW<T>) f(i, VW<T>);
  if (i < len) len >= VW<T> ? f(len - VW<T>, VW<T>) : f(i, len - i);
}

// out[0 .. len) <- relu(a * x + b).
template <typename T>
inline void affine_relu_run(const T* x, T a, T b, T* out, int64_t len) {
  overlapping_vectors<T>(len, [&](int64_t i, int64_t lanes) {
    V<T> pre = load_partial(x + i, lanes) * a + b;
    pre = pre <= 0 ? V<T>{} : pre;  // NaN passes through, like torch.relu
    store_partial(out + i, pre, lanes);
  });
}

// staged[0 .. fill_to) <- relu(a * x + b) for the m values of x, zero tail.
template <typename T>
inline void stage_affine_relu_row(const T* x_row, T a, T b, T* staged, int64_t m, int64_t fill_to = kSubBlock) {
  affine_relu_run(x_row, a, b, staged, m);
  std::fill(staged + m, staged + std::max(m, fill_to), T(0));
}

// Pixels per task of the forward, in whole column tiles: at most kPixelChunk, an image's chunks equal, and where the
// tasks are fewer than 8 per thread, about as many chunks as make them a multiple of the threads (rounding to whole
// tiles can leave fewer). at::parallel_for gives each thread a contiguous run of tasks, so equal tasks in equal
// numbers keep the threads equally busy (one 28 x 28 map on two threads, 512-bit: 416 and 368 pixels, where 256-pixel
// chunks gave 512 and 272). Each output pixel is computed the same way whatever its task, so the result does not
// depend on this choice.
template <typename T>
inline int64_t forward_chunk(int64_t N, int64_t P) {
  constexpr int64_t tile = kColumnVectors * VW<T>;
  const int64_t threads = std::max(1, at::get_num_threads()), tiles = ceil_div(P, tile);
  int64_t chunks = std::max<int64_t>(1, ceil_div(P, kPixelChunk));
  if (N * chunks < 8 * threads)
    while ((N * chunks) % threads != 0 && chunks < tiles) ++chunks;
  return std::max(tile, round_up(ceil_div(P, chunks), tile));
}

// Row sources that stage a row themselves (stage_affine_relu(n, ci, q0, m, a, b, staged, scratch, fill_to), the
// values of stage_affine_relu_row on row()), computing it in one pass instead of writing it to scratch first.
template <typename Rows, typename = void>
struct StagesRows : std::false_type {};
template <typename Rows>
struct StagesRows<Rows, std::void_t<decltype(&Rows::stage_affine_relu)>> : std::true_type {};

// staged[0 .. fill_to) <- relu(a * x[n, ci, q0 .. q0 + m) + b) for row ci of src, zero tail.
template <typename T, typename Rows>
inline void stage_affine_relu_one_row(const Rows& src, int64_t n, int64_t ci, int64_t q0, int64_t m, T a, T b,
                                      T* staged, T* scratch, int64_t fill_to = kSubBlock) {
  if constexpr (StagesRows<Rows>::value)
    src.stage_affine_relu(n, ci, q0, m, a, b, staged, scratch, fill_to);
  else
    stage_affine_relu_row(src.row(n, ci, q0, m, scratch), a, b, staged, m, fill_to);
}

// staged[ci][0 .. kSubBlock) <- relu(scale[ci] * x[n, ci, q0 .. q0 + m) + shift[ci]) for the rows [c0, c1) of src.
template <typename T, typename Rows>
inline void stage_affine_relu_rows(const Rows& src, int64_t n, int64_t q0, int64_t m, const T* scale, const T* shift,
                                   int64_t c0, int64_t c1, T* staged, T* scratch) {
  for (int64_t ci = c0; ci < c1; ++ci)
    stage_affine_relu_one_row(src, n, ci, q0, m, scale[ci], shift[ci], staged + ci * kStagedStride, scratch);
}

// y0[co * P + (0 .. m)] <- (W staged)[co] + bias[co] (+ r0[co * P + (0 .. m)], a residual, unless null) for the
// Cout rows of W (packed in blocks of R, inner columns), or for its row blocks [b0, b1) only.
template <typename T, int R>
inline void product_to_output(const T* w_packed, int64_t inner, const T* staged, int64_t m, const T* bias,
                              int64_t Cout, T* y0, int64_t P, const T* r0 = nullptr, int64_t b0 = 0,
                              int64_t b1 = -1) {
  for (int64_t b = b0; b < (b1 < 0 ? round_up(Cout, R) / R : b1); ++b) {
    gemm_block<T, R>(w_packed + b * inner * R, inner, staged, m, [&](int64_t j, int64_t q, const V<T>* acc) {
      const int64_t co = b * R + j;
      if (co >= Cout) return;
      const T bv = bias ? bias[co] : T(0);
      V<T> out[kColumnVectors];
      for (int64_t c = 0; c < kColumnVectors; ++c) out[c] = acc[c] + bv;
      if (r0) {
        for (int64_t c = 0; c < kColumnVectors; ++c) {
          const int64_t lanes = std::min(VW<T>, m - q - c * VW<T>);
          if (lanes > 0) out[c] += load_partial(r0 + co * P + q + c * VW<T>, lanes);
        }
      }
      store_columns<T>(y0 + co * P, q, m, out);
    });
  }
}

// residual: null, or (N, Cout, P) added to the output in the product's epilogue (a residual block's shortcut).
template <typename T, int R, typename Rows>
void affine_relu_conv1x1_forward_kernel(const Rows& src, const T* scale, const T* shift, const T* w, const T* bias,
                                        T* y, int64_t N, int64_t Cin, int64_t Cout, int64_t P, const T* residual) {
  const std::vector<T> w_packed = pack_row_blocks<T, R>(w, Cout, Cin, false);
  if (N * ((P + kSubBlock - 1) / kSubBlock) < at::get_num_threads()) {
    // Fewer sub-blocks than threads (a small map at batch 1): the threads share each sub-block's staged rows, then
    // its product's row blocks. Every value is computed as below.
    AlignedVector<T> relu_rows(Cin * kStagedStride);
    const int64_t blocks = round_up(Cout, R) / R;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t q0 = 0; q0 < P; q0 += kSubBlock) {
        const int64_t m = std::min(kSubBlock, P - q0);
        parallel_range(0, Cin, 64, [&](int64_t begin, int64_t end) {
          AlignedVector<T> scratch(kSubBlock);
          stage_affine_relu_rows(src, n, q0, m, scale, shift, begin, end, relu_rows.data(), scratch.data());
        });
        parallel_range(0, blocks, 1, [&](int64_t begin, int64_t end) {
          product_to_output<T, R>(w_packed.data(), Cin, relu_rows.data(), m, bias, Cout, y + n * Cout * P + q0, P,
                                  residual ? residual + n * Cout * P + q0 : nullptr, begin, end);
        });
      }
    }
    return;
  }
  const int64_t chunk = forward_chunk<T>(N, P), chunks = (P + chunk - 1) / chunk;
  parallel_range(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    AlignedVector<T> relu_rows(Cin * kStagedStride), scratch(kSubBlock);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * chunk, p1 = std::min(P, p0 + chunk);
      for (int64_t q0 = p0; q0 < p1; q0 += kSubBlock) {
        const int64_t m = std::min(kSubBlock, p1 - q0);
        stage_affine_relu_rows(src, n, q0, m, scale, shift, 0, Cin, relu_rows.data(), scratch.data());
        product_to_output<T, R>(w_packed.data(), Cin, relu_rows.data(), m, bias, Cout, y + n * Cout * P + q0, P,
                                residual ? residual + n * Cout * P + q0 : nullptr);
      }
    }
  });
}

// Two triples in one pass, for inference: y = W2 relu(scale2 * (W1 relu(scale1 * x + shift1)) + shift2) + bias2
// over Cin -> Cout rows, the hidden Cmid rows never written: per sub-block, the first product's epilogue applies the
// second affine map and ReLU and stages the rows the second product reads. (A bias of the first convolution folds
// into shift2.) The weights are packed once, on construction.
template <typename T, int R1, int R2>
struct TwoTriples {
  const T *scale1, *shift1, *scale2, *shift2, *bias2;
  int64_t Cin, Cmid, Cout, blocks1, blocks2;
  std::vector<T> w1_packed, w2_packed;
  TwoTriples(const T* scale1_, const T* shift1_, const T* w1, const T* scale2_, const T* shift2_, const T* w2,
             const T* bias2_, int64_t Cin_, int64_t Cmid_, int64_t Cout_)
      : scale1(scale1_), shift1(shift1_), scale2(scale2_), shift2(shift2_), bias2(bias2_), Cin(Cin_), Cmid(Cmid_),
        Cout(Cout_), blocks1(round_up(Cmid_, R1) / R1), blocks2(round_up(Cout_, R2) / R2),
        w1_packed(pack_row_blocks<T, R1>(w1, Cmid_, Cin_, false)),
        w2_packed(pack_row_blocks<T, R2>(w2, Cout_, Cmid_, false)) {}
  // The columns [q0, q0 + m) (m <= kSubBlock) of image n of src, on this thread, with its work buffers. Both
  // products run per tile of kColumnVectors * VW columns: the tile's staged rows, its hidden rows and the weights stay
  // in L1.
  template <typename Rows>
  void run(const Rows& src, int64_t n, int64_t q0, int64_t m, T* relu_rows, T* hidden_rows, T* scratch, T* y0,
           int64_t ystride) const {
    constexpr int64_t tile = kColumnVectors * VW<T>;
    stage_affine_relu_rows(src, n, q0, m, scale1, shift1, 0, Cin, relu_rows, scratch);
    for (int64_t q = 0; q < m; q += tile) {
      for (int64_t b = 0; b < blocks1; ++b) {
        V<T> acc[R1][kColumnVectors];
        gemm_tile<T, R1>(w1_packed.data() + b * Cin * R1, Cin, relu_rows + q, kStagedStride, acc);
        for (int64_t j = 0; j < R1 && b * R1 + j < Cmid; ++j) {
          const int64_t cm = b * R1 + j;
          for (int64_t c = 0; c < kColumnVectors; ++c) {
            V<T> pre = acc[j][c] * scale2[cm] + shift2[cm];
            pre = pre <= 0 ? V<T>{} : pre;  // NaN passes through, like torch.relu
            std::memcpy(hidden_rows + cm * tile + c * VW<T>, &pre, sizeof(V<T>));
          }
        }
      }
      for (int64_t b = 0; b < blocks2; ++b) {
        V<T> acc[R2][kColumnVectors];
        gemm_tile<T, R2>(w2_packed.data() + b * Cmid * R2, Cmid, hidden_rows, tile, acc);
        for (int64_t j = 0; j < R2 && b * R2 + j < Cout; ++j) {
          const int64_t co = b * R2 + j;
          const T bv = bias2 ? bias2[co] : T(0);
          V<T> out[kColumnVectors];
          for (int64_t c = 0; c < kColumnVectors; ++c) out[c] = acc[j][c] + bv;
          store_columns<T>(y0 + co * ystride, q, m, out);
        }
      }
    }
  }
};

// The small-map route of affine_relu_conv1x1_twice_forward_kernel, for maps of at most one sub-block per image (SAN's
// 14 x 14 and 7 x 7, where the patchwise relation's z has 50 rows per channel) or fewer sub-blocks than threads:
// the staged rows of a group of columns (whole maps side by side, up to kBlasColumns, or one sub-block), on all
// threads, then both products in torch's BLAS. With thousands of staged rows against a few hundred columns and a few
// dozen hidden rows, its blocking over the inner dimension beats the register tiles, which reread the staged rows for
// every block of output rows.
constexpr int64_t kBlasColumns = 256;

template <typename T, typename Rows>
void affine_relu_conv1x1_twice_blas(const Rows& src, const T* scale1, const T* shift1, const T* w1, const T* scale2,
                                    const T* shift2, const T* w2, const T* bias2, T* y, int64_t N, int64_t Cin,
                                    int64_t Cmid, int64_t Cout, int64_t P) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor w1_t = at::from_blob(const_cast<T*>(w1), {Cmid, Cin}, options);
  const at::Tensor w2_t = at::from_blob(const_cast<T*>(w2), {Cout, Cmid}, options);
  const at::Tensor b2_t = bias2 ? at::from_blob(const_cast<T*>(bias2), {Cout, 1}, options) : at::Tensor();
  const int64_t images = P <= kSubBlock ? std::max<int64_t>(1, std::min(N, kBlasColumns / P)) : 1;  // per group
  for (int64_t n0 = 0; n0 < N; n0 += images) {
    const int64_t g = std::min(images, N - n0);
    for (int64_t q0 = 0; q0 < P; q0 += kSubBlock) {
      const int64_t m = std::min(kSubBlock, P - q0), columns = g * m;
      const at::Tensor staged = pooled_empty({Cin, columns}, options);  // image j's m columns at j * m
      T* staged_rows = staged.data_ptr<T>();
      parallel_range(0, Cin, 16, [&](int64_t begin, int64_t end) {
        AlignedVector<T> scratch(kSubBlock);
        for (int64_t ci = begin; ci < end; ++ci)
          for (int64_t j = 0; j < g; ++j)
            stage_affine_relu_one_row(src, n0 + j, ci, q0, m, scale1[ci], shift1[ci], staged_rows + ci * columns + j * m,
                                      scratch.data(), m);
      });
      at::Tensor hidden = at::mm(w1_t, staged);
      TORCH_INTERNAL_ASSERT(hidden.is_contiguous());  // read below as (Cmid, columns) rows
      T* h = hidden.data_ptr<T>();
      for (int64_t cm = 0; cm < Cmid; ++cm)
        for (int64_t q = 0; q < columns; ++q) {
          const T pre = h[cm * columns + q] * scale2[cm] + shift2[cm];
          h[cm * columns + q] = pre <= 0 ? T(0) : pre;  // NaN passes through, like torch.relu
        }
      for (int64_t j = 0; j < g; ++j) {
        at::Tensor out = at::from_blob(y + (n0 + j) * Cout * P + q0, {Cout, m}, {P, 1}, options);
        if (bias2)
          at::addmm_out(out, b2_t, w2_t, hidden.narrow(1, j * m, m));
        else
          at::mm_out(out, w2_t, hidden.narrow(1, j * m, m));
      }
    }
  }
}

// TwoTriples over (N, Cin, P) -> (N, Cout, P). Tasks are images' pixel chunks; small maps take the BLAS route above.
template <typename T, int R1, int R2, typename Rows>
void affine_relu_conv1x1_twice_forward_kernel(const Rows& src, const T* scale1, const T* shift1, const T* w1,
                                              const T* scale2, const T* shift2, const T* w2, const T* bias2, T* y,
                                              int64_t N, int64_t Cin, int64_t Cmid, int64_t Cout, int64_t P) {
  if (P <= kSubBlock || N * ceil_div(P, kSubBlock) < at::get_num_threads()) {
    affine_relu_conv1x1_twice_blas(src, scale1, shift1, w1, scale2, shift2, w2, bias2, y, N, Cin, Cmid, Cout, P);
    return;
  }
  const TwoTriples<T, R1, R2> triples(scale1, shift1, w1, scale2, shift2, w2, bias2, Cin, Cmid, Cout);
  const int64_t chunk = forward_chunk<T>(N, P), chunks = (P + chunk - 1) / chunk;
  parallel_range(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    AlignedVector<T> relu_rows(Cin * kStagedStride), hidden_rows(Cmid * kStagedStride), scratch(kSubBlock);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * chunk, p1 = std::min(P, p0 + chunk);
      for (int64_t q0 = p0; q0 < p1; q0 += kSubBlock)
        triples.run(src, n, q0, std::min(kSubBlock, p1 - q0), relu_rows.data(), hidden_rows.data(), scratch.data(),
                    y + n * Cout * P + q0, P);
    }
  });
}

template <typename T, typename Rows>
auto affine_relu_conv1x1_twice_forward_for(int64_t Cmid, int64_t Cout) {
  const bool mid_wide = pick_block_rows(Cmid) == kWideRows, out_wide = pick_block_rows(Cout) == kWideRows;
  return mid_wide ? (out_wide ? affine_relu_conv1x1_twice_forward_kernel<T, kWideRows, kWideRows, Rows>
                      : affine_relu_conv1x1_twice_forward_kernel<T, kWideRows, 4, Rows>)
              : (out_wide ? affine_relu_conv1x1_twice_forward_kernel<T, 4, kWideRows, Rows>
                      : affine_relu_conv1x1_twice_forward_kernel<T, 4, 4, Rows>);
}

// Gradients: gx (N, Cin, P); and per-task partial sums of gscale, gshift (Cin), gw (Cout x Cin), gbias (Cout),
// reduced in task order at the end. Per sub-block: stage relu(pre) and grad rows, then
//   gw += G R^T (register blocks of R x kInputTile channel pairs), gR = W^T G (gemm_block), gpre = gR * (pre > 0).
// R, RI: rows per register block over the output and the input channels (see pick_block_rows).
template <typename T, int R, int RI, typename Rows>
void affine_relu_conv1x1_backward_kernel(const T* gy, const Rows& src, const T* scale, const T* shift, const T* w,
                                         T* gx, T* gscale, T* gshift, T* gw, T* gbias, int64_t N, int64_t Cin,
                                         int64_t Cout, int64_t P) {
  const int64_t chunks = (P + kPixelChunk - 1) / kPixelChunk, tasks = N * chunks;
  const int64_t cin_pad = round_up(Cin, kInputTile), cout_pad = round_up(Cout, R), in_blocks = round_up(Cin, RI) / RI;
  const int64_t width = 2 * Cin + Cout * Cin + Cout;  // partial sums of one task
  const std::vector<T> w_transposed_packed = pack_row_blocks<T, RI>(w, Cin, Cout, true);
  std::vector<T> partial(tasks * width, T(0));
  parallel_range(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // padding rows stay zero
    AlignedVector<T> relu_rows(cin_pad * kStagedStride, T(0)), grad_rows(cout_pad * kStagedStride, T(0));
    std::vector<V<T>> acc_w(cout_pad * cin_pad), acc_gscale(Cin), acc_gshift(Cin), acc_bias(Cout);
    std::vector<T> scratch(Cin * kStagedStride);  // raw input rows that src computes (not read in place)
    std::vector<const T*> xrows(Cin);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * kPixelChunk, p1 = std::min(P, p0 + kPixelChunk);
      std::fill(acc_w.begin(), acc_w.end(), V<T>{});
      std::fill(acc_gscale.begin(), acc_gscale.end(), V<T>{});
      std::fill(acc_gshift.begin(), acc_gshift.end(), V<T>{});
      std::fill(acc_bias.begin(), acc_bias.end(), V<T>{});
      for (int64_t q0 = p0; q0 < p1; q0 += kSubBlock) {
        const int64_t m = std::min(kSubBlock, p1 - q0), m_padded = round_up(m, VW<T>);
        for (int64_t ci = 0; ci < Cin; ++ci) {
          xrows[ci] = src.row(n, ci, q0, m, scratch.data() + ci * kStagedStride);
          stage_affine_relu_row(xrows[ci], scale[ci], shift[ci], relu_rows.data() + ci * kStagedStride, m);
        }
        for (int64_t co = 0; co < Cout; ++co) {
          const T* gy_row = gy + (n * Cout + co) * P + q0;
          T* gr = grad_rows.data() + co * kStagedStride;
          std::copy(gy_row, gy_row + m, gr);
          std::fill(gr + m, gr + kSubBlock, T(0));
          V<T> s = {};
          for (int64_t q = 0; q < m_padded; q += VW<T>) s += load_partial(gr + q, VW<T>);
          acc_bias[co] += s;
        }
        // gw[co][ci] += sum_q grad_rows[co][q] * relu_rows[ci][q]
        for (int64_t cb = 0; cb < cout_pad; cb += R) {
          for (int64_t ib = 0; ib < cin_pad; ib += kInputTile) {
            V<T> acc[R][kInputTile] = {};
            for (int64_t q = 0; q < m_padded; q += VW<T>) {
              V<T> rv[kInputTile];
              for (int64_t i = 0; i < kInputTile; ++i)
                rv[i] = load_partial(relu_rows.data() + (ib + i) * kStagedStride + q, VW<T>);
              for (int64_t j = 0; j < R; ++j) {
                const V<T> gv = load_partial(grad_rows.data() + (cb + j) * kStagedStride + q, VW<T>);
                for (int64_t i = 0; i < kInputTile; ++i) acc[j][i] += gv * rv[i];
              }
            }
            for (int64_t j = 0; j < R; ++j)
              for (int64_t i = 0; i < kInputTile; ++i) acc_w[(cb + j) * cin_pad + ib + i] += acc[j][i];
          }
        }
        // gR = W^T G, then the ReLU mask, the affine map's gradients and gx.
        for (int64_t b = 0; b < in_blocks; ++b) {
          gemm_block<T, RI>(w_transposed_packed.data() + b * Cout * RI, Cout, grad_rows.data(), m,
                            [&](int64_t j, int64_t q, const V<T>* acc) {
                              const int64_t ci = b * RI + j;
                              if (ci >= Cin) return;
                              const T* relu_row = relu_rows.data() + ci * kStagedStride + q;
                              const T* x_row = xrows[ci] + q;
                              V<T> grad_pre[kColumnVectors];
                              for (int64_t c = 0; c < kColumnVectors; ++c) {
                                const int64_t lanes = std::max<int64_t>(0, std::min(VW<T>, m - q - c * VW<T>));
                                const V<T> rv = load_partial(relu_row + c * VW<T>, VW<T>);
                                const V<T> xv = lanes > 0 ? load_partial(x_row + c * VW<T>, lanes) : V<T>{};
                                grad_pre[c] = rv <= 0 ? V<T>{} : acc[c];  // zero past m: grad rows are zero there
                                acc_gscale[ci] += grad_pre[c] * xv;
                                acc_gshift[ci] += grad_pre[c];
                                grad_pre[c] *= scale[ci];
                              }
                              store_columns<T>(gx + (n * Cin + ci) * P + q0, q, m, grad_pre);
                            });
        }
      }
      T* out = partial.data() + t * width;
      for (int64_t ci = 0; ci < Cin; ++ci) {
        out[ci] = hsum<T>(acc_gscale[ci]);
        out[Cin + ci] = hsum<T>(acc_gshift[ci]);
      }
      for (int64_t co = 0; co < Cout; ++co)
        for (int64_t ci = 0; ci < Cin; ++ci) out[2 * Cin + co * Cin + ci] = hsum<T>(acc_w[co * cin_pad + ci]);
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

// The forward kernel with the register-block size for Cout output channels.
template <typename T, typename Rows>
auto affine_relu_conv1x1_forward_for(int64_t Cout) {
  return pick_block_rows(Cout) == kWideRows ? affine_relu_conv1x1_forward_kernel<T, kWideRows, Rows>
                                    : affine_relu_conv1x1_forward_kernel<T, 4, Rows>;
}

// The backward kernel with the register-block sizes for these channel counts.
template <typename T, typename Rows>
auto affine_relu_conv1x1_backward_for(int64_t Cin, int64_t Cout) {
  const bool out_wide = pick_block_rows(Cout) == kWideRows, in_wide = pick_block_rows(Cin) == kWideRows;
  return out_wide ? (in_wide ? affine_relu_conv1x1_backward_kernel<T, kWideRows, kWideRows, Rows>
                     : affine_relu_conv1x1_backward_kernel<T, kWideRows, 4, Rows>)
              : (in_wide ? affine_relu_conv1x1_backward_kernel<T, 4, kWideRows, Rows>
                     : affine_relu_conv1x1_backward_kernel<T, 4, 4, Rows>);
}

}  // namespace cpu
}  // namespace torchsan
