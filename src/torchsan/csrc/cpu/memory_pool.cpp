// The outputs of the inference kernels come from a pool of the blocks earlier outputs freed (see memory_pool.h).
#include "memory_pool.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {
namespace {

constexpr std::size_t kAlignment = 64;     // and the header before each block, which records its size
constexpr std::size_t kPooledMin = 1 << 20;  // smaller blocks come from the heap without faulting pages in

struct Pool {
  std::mutex mutex;
  std::unordered_multimap<std::size_t, char*> free_blocks;  // by size
  std::size_t cached = 0, limit = std::size_t(2048) << 20;
  Pool() {
    if (const char* mb = std::getenv("TORCHSAN_POOL_MAX_MB")) limit = std::size_t(std::max(0L, std::atol(mb))) << 20;
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may outlive static destruction
  return *p;
}

void release(void* ctx) {
  char* base = static_cast<char*>(ctx);
  const std::size_t size = *reinterpret_cast<std::size_t*>(base);
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (p.cached + size <= p.limit) {
      p.free_blocks.emplace(size, base);
      p.cached += size;
      return;
    }
  }
  ::operator delete(base, std::align_val_t(kAlignment));
}

struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(std::size_t n) override {
    const std::size_t size = kAlignment + n;
    char* base = nullptr;
    Pool& p = pool();
    {
      std::lock_guard<std::mutex> lock(p.mutex);
      auto it = p.free_blocks.find(size);
      if (it != p.free_blocks.end()) {
        base = it->second;
        p.free_blocks.erase(it);
        p.cached -= size;
      }
    }
    if (!base) {
      base = static_cast<char*>(::operator new(size, std::align_val_t(kAlignment)));
      *reinterpret_cast<std::size_t*>(base) = size;
    }
    return {base + kAlignment, base, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator pool_allocator;

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  if (numel * static_cast<int64_t>(options.dtype().itemsize()) < static_cast<int64_t>(kPooledMin))
    return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &pool_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

int64_t pooled_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return static_cast<int64_t>(p.cached);
}

int64_t release_pooled_memory() {
  std::unordered_multimap<std::size_t, char*> blocks;
  std::size_t released = 0;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    blocks.swap(p.free_blocks);
    released = p.cached;
    p.cached = 0;
  }
  for (auto& [size, base] : blocks) ::operator delete(base, std::align_val_t(kAlignment));
  return static_cast<int64_t>(released);
}

}  // namespace cpu
}  // namespace torchsan
