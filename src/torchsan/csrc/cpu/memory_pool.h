// A pool for the large outputs of the kernels where no gradient is wanted. glibc serves a large block with fresh
// pages that the kernel faults in and zeroes on first touch, and returns them when the block is freed, so an eval
// forward that allocates and frees the same sizes each call pays for all of its pages again every call. The pool
// keeps freed blocks (by exact size, the oldest given back first beyond TORCHSAN_POOL_MAX_MB, 2048 by default and
// read once; 0 turns it off) for the next block of that size, as ONNX Runtime's arena does for its own tensors.
// release_pooled_memory() hands them back. Kernels that also run in training pool only for inputs that need no
// gradient: a training step frees its forward's blocks during the backward, which must be able to reuse them.
#pragma once

#include <ATen/core/Tensor.h>

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {

// at::empty(sizes, options) on the CPU, from the pool if `pool` and it is at least 1 MiB.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options, bool pool = true);

// Bytes the pool holds for reuse; free them all (returns how many bytes).
int64_t pooled_bytes();
int64_t release_pooled_memory();

}  // namespace cpu
}  // namespace torchsan
