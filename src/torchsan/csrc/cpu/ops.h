// The entry points of the fused CPU kernels, one block per source file; bindings.cpp exposes each under its own name.
// Images are (N, C, H, W); a footprint is given as k (kernel size), s (stride), p (padding), d (dilation) and reflect
// (reflect padding, else zeros); its gathered form is (N, C, K, L) with K = k * k taps and L output positions.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {

// softmax_aggregation.cpp ------------------------------------------------------------------------------------------
// Softmax over the K taps (dim 2) of x (N, C, K, L), and its backward: grad x from grad y and y.
at::Tensor tap_softmax_forward(at::Tensor x);
at::Tensor tap_softmax_backward(at::Tensor g, at::Tensor y);
// y[n, c, o] = sum_k w[n, c % Cw, k, o] * x[n, c, nbr_k(o)] for x (N, C, H, W), w (N, Cw, K, L), C % Cw == 0.
// softmax: w holds logits; returns {y, softmax(w, dim=2)} (else {y}).
std::vector<at::Tensor> aggregation_forward(at::Tensor x, at::Tensor w, int64_t k, int64_t s, int64_t p, int64_t d,
                                            bool reflect, bool softmax);
// aggregation_forward's y with softmax, the softmax kept in per-thread scratch instead of returned (no gradient).
at::Tensor softmax_aggregation_inference(at::Tensor x, at::Tensor logits, int64_t k, int64_t s, int64_t p, int64_t d,
                                         bool reflect);
// Returns {grad x, grad w} (each undefined unless asked for); softmax: w is the forward's softmax output and grad w is
// taken w.r.t. the logits.
std::vector<at::Tensor> aggregation_backward(at::Tensor gy, at::Tensor x, at::Tensor w, int64_t k, int64_t s, int64_t p,
                                             int64_t d, bool reflect, bool need_x, bool need_w, bool softmax);

// gathers.cpp ------------------------------------------------------------------------------------------------------
// subtraction2 (x1 given: x1[centre(o)] - x2[nbr_k(o)]) or unfold (x1 not given: x2[nbr_k(o)]): (N, C, H, W) ->
// (N, C + E, K, L): the C gathered channels, then `append` (B, E, K, L), B = 1 (broadcast over N) or N, if given.
at::Tensor gather_forward(c10::optional<at::Tensor> x1, at::Tensor x2, int64_t k, int64_t s, int64_t p, int64_t d,
                          bool reflect, c10::optional<at::Tensor> append);
// Returns {grad x1, grad x2} (each undefined unless asked for; grad x1 only for subtraction2). channels: how many of
// gout's leading channels are the gathered ones (the rest, `append` in the forward, are skipped).
std::vector<at::Tensor> gather_backward(at::Tensor gout, int64_t H, int64_t W, int64_t k, int64_t s, int64_t p,
                                        int64_t d, bool reflect, bool subtraction, bool need_x1, bool need_x2,
                                        int64_t channels);

// clique.cpp -------------------------------------------------------------------------------------------------------
// The clique relation: out[n, j, k, l] = sum_c q[n, c, j, l] * k[n, c, k, l] for q, k (N, C, K, L) -> (N, K, K, L).
at::Tensor clique_forward(at::Tensor q, at::Tensor k);
// Returns {grad q, grad k} (each undefined unless asked for).
std::vector<at::Tensor> clique_backward(at::Tensor gout, at::Tensor q, at::Tensor k, bool need_q, bool need_k);

// conv1x1.cpp ------------------------------------------------------------------------------------------------------
// y = weight x + bias at every position: a plain 1x1 convolution, x (N, Cin, *) -> (N, Cout, *); no backward.
at::Tensor conv1x1_forward(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias);
// y = weight relu(scale * x + shift) + bias: x (N, Cin, *) -> (N, Cout, *); scale, shift (Cin); weight (Cout, Cin);
// bias (Cout) or not given. The affine map is a BatchNorm's, per channel.
at::Tensor affine_relu_conv1x1_forward(at::Tensor x, at::Tensor scale, at::Tensor shift, at::Tensor weight,
                                       c10::optional<at::Tensor> bias, c10::optional<at::Tensor> residual);
// Returns {grad x, grad scale, grad shift, grad weight, grad bias}.
std::vector<at::Tensor> affine_relu_conv1x1_backward(at::Tensor gy, at::Tensor x, at::Tensor scale, at::Tensor shift,
                                                     at::Tensor weight);

// pooling.cpp ------------------------------------------------------------------------------------------------------
// SAN's stem: x (N, Cin, H, W) -> (N, C, H / 2, W / 2): maxpool2x2(relu(scale * (weight x) + shift)), weight
// (C, Cin) a 1x1 convolution; scale, shift (C). The backward returns gx (empty unless input_grad), gweight, gscale,
// gshift.
at::Tensor conv1x1_affine_relu_maxpool2x2_forward(at::Tensor x, at::Tensor weight, at::Tensor scale,
                                                  at::Tensor shift);
std::vector<at::Tensor> conv1x1_affine_relu_maxpool2x2_backward(at::Tensor gy, at::Tensor x, at::Tensor weight,
                                                                at::Tensor scale, at::Tensor shift, bool input_grad);
// x (N, C, H, W) -> (N, C, H / 2, W / 2): maxpool2x2(relu(scale * x + shift)); scale, shift (C).
at::Tensor affine_relu_maxpool2x2_forward(at::Tensor x, at::Tensor scale, at::Tensor shift);
// Returns {grad x, grad scale, grad shift}.
std::vector<at::Tensor> affine_relu_maxpool2x2_backward(at::Tensor gy, at::Tensor x, at::Tensor scale,
                                                        at::Tensor shift);

// statistics.cpp ---------------------------------------------------------------------------------------------------
// x (N, C, ...) -> {var, mean}, each (C): biased, over every dimension but 1.
std::vector<at::Tensor> channel_var_mean(at::Tensor x);
// grad x = base + grad_mean / n + (2 grad_var / n) * (x - mean), n = N * P; in_place: written over base.
at::Tensor channel_var_mean_backward(at::Tensor x, at::Tensor mean, at::Tensor gvar, at::Tensor gmean,
                                     c10::optional<at::Tensor> base, bool in_place);

// subtraction2_conv1x1.cpp -----------------------------------------------------------------------------------------
// The channel statistics and the affine-ReLU-1x1-conv, forward and backward, of
// z = cat([subtraction2(x1, x2), append]) (N, C + E, K, L), without writing z: the same values as the dense ops on
// the written z.
std::vector<at::Tensor> subtraction2_var_mean(at::Tensor x1, at::Tensor x2, c10::optional<at::Tensor> append, int64_t k,
                                              int64_t s, int64_t p, int64_t d, bool reflect);
at::Tensor subtraction2_affine_relu_conv1x1_forward(at::Tensor x1, at::Tensor x2, c10::optional<at::Tensor> append,
                                                    at::Tensor scale, at::Tensor shift, at::Tensor weight,
                                                    c10::optional<at::Tensor> bias, int64_t k, int64_t s, int64_t p,
                                                    int64_t d, bool reflect);
// For inference at stride 1, the pairwise layer after its transforms in one pass: softmax_aggregation(v,
// subtraction2_affine_relu_conv1x1_twice_forward(...)) (N, C, Ho, Wo), the logits never written.
at::Tensor pairwise_attention_inference(at::Tensor x1, at::Tensor x2, c10::optional<at::Tensor> append, at::Tensor v,
                                        at::Tensor scale1, at::Tensor shift1, at::Tensor weight1, at::Tensor scale2,
                                        at::Tensor shift2, at::Tensor weight2, c10::optional<at::Tensor> bias2,
                                        int64_t k, int64_t s, int64_t p, int64_t d, bool reflect);
// Inference: the whole pairwise mapping on z, two affine-ReLU-1x1-convs, neither z nor the hidden layer written:
// (N, Cout, K, L). No backward.
at::Tensor subtraction2_affine_relu_conv1x1_twice_forward(at::Tensor x1, at::Tensor x2,
                                                          c10::optional<at::Tensor> append, at::Tensor scale1,
                                                          at::Tensor shift1, at::Tensor weight1, at::Tensor scale2,
                                                          at::Tensor shift2, at::Tensor weight2,
                                                          c10::optional<at::Tensor> bias2, int64_t k, int64_t s,
                                                          int64_t p, int64_t d, bool reflect);
// Inference: the patchwise concatenation relation's whole mapping, z and the hidden layer never written:
// (N, Cout, 1, L). No backward.
at::Tensor patchwise_concat_affine_relu_conv1x1_twice_forward(at::Tensor x1, at::Tensor x2, at::Tensor scale1,
                                                              at::Tensor shift1, at::Tensor weight1, at::Tensor scale2,
                                                              at::Tensor shift2, at::Tensor weight2,
                                                              c10::optional<at::Tensor> bias2, int64_t k, int64_t s,
                                                              int64_t p, int64_t d, bool reflect);
// For inference at stride 1, the patchwise layer after its transforms in one pass: aggregation(v,
// patchwise_concat_affine_relu_conv1x1_twice_forward(...) as (N, Cw, K, L)) (N, C, Ho, Wo), the weights never written.
at::Tensor patchwise_attention_inference(at::Tensor x1, at::Tensor x2, at::Tensor v, at::Tensor scale1,
                                         at::Tensor shift1, at::Tensor weight1, at::Tensor scale2, at::Tensor shift2,
                                         at::Tensor weight2, c10::optional<at::Tensor> bias2, int64_t k, int64_t s,
                                         int64_t p, int64_t d, bool reflect);
// Returns {grad z (holding scale and shift fixed) (N, C + E, K, L), grad scale, grad shift, grad weight, grad bias}.
std::vector<at::Tensor> subtraction2_affine_relu_conv1x1_backward(at::Tensor gy, at::Tensor x1, at::Tensor x2,
                                                                  c10::optional<at::Tensor> append, at::Tensor scale,
                                                                  at::Tensor shift, at::Tensor weight, int64_t k,
                                                                  int64_t s, int64_t p, int64_t d, bool reflect);
// Returns {grad x1, grad x2} of subtraction2 from the first C channels of gz0 plus a training BatchNorm's statistics
// share, gz = gz0 + a + b * (z - mean) per channel (a, b, mean: (C)), z recomputed from x1 and x2.
std::vector<at::Tensor> subtraction2_var_mean_backward(at::Tensor gz0, at::Tensor x1, at::Tensor x2, at::Tensor a,
                                                       at::Tensor b, at::Tensor mean, int64_t k, int64_t s, int64_t p,
                                                       int64_t d, bool reflect);

// bindings.cpp -----------------------------------------------------------------------------------------------------
// Every threshold that picks a code path, and the cache sizes they derive from, by name: tests size their inputs
// with these. Each family adds its own.
using KernelConstants = std::map<std::string, int64_t>;
KernelConstants kernel_constants();
void add_aggregation_constants(KernelConstants& constants);
void add_gather_constants(KernelConstants& constants);
void add_subtraction2_constants(KernelConstants& constants);

}  // namespace cpu
}  // namespace torchsan
