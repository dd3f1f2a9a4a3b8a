// The Python module of the fused CPU kernels (see ops.h), and kernel_constants().
#include <torch/extension.h>

#include "common.h"
#include "memory_pool.h"
#include "ops.h"

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {

KernelConstants kernel_constants() {
  KernelConstants constants;
  constants["l2_cache_bytes"] = cache_sizes().l2_bytes;
  constants["l3_cache_bytes"] = cache_sizes().l3_bytes;
  constants["vector_bytes"] = kVectorBytes;
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  constants["fused_multiply_add"] = 1;  // the compiler contracts a * b + c into one rounding
#else
  constants["fused_multiply_add"] = 0;
#endif
  constants["pixel_chunk"] = kPixelChunk;
  add_aggregation_constants(constants);
  add_gather_constants(constants);
  add_subtraction2_constants(constants);
  return constants;
}

}  // namespace cpu
}  // namespace torchsan

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace cpu = torchsan::cpu;
  m.def("tap_softmax_forward", &cpu::tap_softmax_forward);
  m.def("tap_softmax_backward", &cpu::tap_softmax_backward);
  m.def("aggregation_forward", &cpu::aggregation_forward);
  m.def("aggregation_backward", &cpu::aggregation_backward);
  m.def("softmax_aggregation_inference", &cpu::softmax_aggregation_inference);
  m.def("gather_forward", &cpu::gather_forward);
  m.def("gather_backward", &cpu::gather_backward);
  m.def("clique_forward", &cpu::clique_forward);
  m.def("clique_backward", &cpu::clique_backward);
  m.def("conv1x1_forward", &cpu::conv1x1_forward);
  m.def("affine_relu_conv1x1_forward", &cpu::affine_relu_conv1x1_forward);
  m.def("affine_relu_conv1x1_backward", &cpu::affine_relu_conv1x1_backward);
  m.def("affine_relu_maxpool2x2_forward", &cpu::affine_relu_maxpool2x2_forward);
  m.def("affine_relu_maxpool2x2_backward", &cpu::affine_relu_maxpool2x2_backward);
  m.def("conv1x1_affine_relu_maxpool2x2_forward", &cpu::conv1x1_affine_relu_maxpool2x2_forward);
  m.def("conv1x1_affine_relu_maxpool2x2_backward", &cpu::conv1x1_affine_relu_maxpool2x2_backward);
  m.def("channel_var_mean", &cpu::channel_var_mean);
  m.def("channel_var_mean_backward", &cpu::channel_var_mean_backward);
  m.def("subtraction2_var_mean", &cpu::subtraction2_var_mean);
  m.def("subtraction2_var_mean_backward", &cpu::subtraction2_var_mean_backward);
  m.def("subtraction2_affine_relu_conv1x1_forward", &cpu::subtraction2_affine_relu_conv1x1_forward);
  m.def("subtraction2_affine_relu_conv1x1_backward", &cpu::subtraction2_affine_relu_conv1x1_backward);
  m.def("subtraction2_affine_relu_conv1x1_twice_forward", &cpu::subtraction2_affine_relu_conv1x1_twice_forward);
  m.def("pairwise_attention_inference", &cpu::pairwise_attention_inference);
  m.def("patchwise_attention_inference", &cpu::patchwise_attention_inference);
  m.def("patchwise_concat_affine_relu_conv1x1_twice_forward",
        &cpu::patchwise_concat_affine_relu_conv1x1_twice_forward);
  m.def("pooled_bytes", &cpu::pooled_bytes);
  m.def("release_pooled_memory", &cpu::release_pooled_memory);
  m.def("kernel_constants", &cpu::kernel_constants);
  m.def("vector_isa", [] { return std::string(TORCHSAN_VECTOR_ISA); });
}
