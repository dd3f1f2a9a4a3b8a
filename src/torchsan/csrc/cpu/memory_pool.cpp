// The outputs of the inference kernels come from a pool of the blocks earlier outputs freed (see memory_pool.h).
#include "memory_pool.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <list>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>

namespace torchsan {
namespace __attribute__((visibility("hidden"))) cpu {
namespace {

constexpr std::size_t kAlignment = 64;       // and the header before each block, which records its size
constexpr std::size_t kPooledMin = 1 << 20;  // smaller blocks come from the heap without faulting pages in
constexpr std::size_t kDefaultLimitMb = 2048;

// TORCHSAN_POOL_MAX_MB, read at the first pooled allocation: a whole number of MiB, else the default.
std::size_t limit_from_environment() {
  const char* text = std::getenv("TORCHSAN_POOL_MAX_MB");
  if (!text || !*text) return kDefaultLimitMb << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(text, &end, 10);
  if (errno || *end || mb < 0) {
    TORCH_WARN("torchsan: TORCHSAN_POOL_MAX_MB=", text, " is not a whole number of MiB; using ", kDefaultLimitMb);
    return kDefaultLimitMb << 20;
  }
  return static_cast<std::size_t>(std::min<long long>(mb, 1LL << 40)) << 20;
}

// Free blocks by size, oldest first in `order`; a block that would take the pool past its limit evicts the oldest.
struct Pool {
  std::mutex mutex;
  std::list<std::pair<std::size_t, char*>> order;
  std::unordered_multimap<std::size_t, std::list<std::pair<std::size_t, char*>>::iterator> by_size;
  std::size_t cached = 0, limit = limit_from_environment();
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may outlive static destruction
  return *p;
}

void free_block(char* base) { ::operator delete(base, std::align_val_t(kAlignment)); }

void release(void* ctx) {
  char* base = static_cast<char*>(ctx);
  const std::size_t size = *reinterpret_cast<std::size_t*>(base);
  std::list<std::pair<std::size_t, char*>> evicted;
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (size <= p.limit) {
      while (p.cached + size > p.limit) {
        const auto oldest = p.order.begin();
        auto range = p.by_size.equal_range(oldest->first);
        for (auto it = range.first; it != range.second; ++it)
          if (it->second == oldest) {
            p.by_size.erase(it);
            break;
          }
        p.cached -= oldest->first;
        evicted.splice(evicted.end(), p.order, oldest);
      }
      p.order.emplace_back(size, base);
      p.by_size.emplace(size, std::prev(p.order.end()));
      p.cached += size;
      base = nullptr;
    }
  }
  for (auto& [s, b] : evicted) free_block(b);
  if (base) free_block(base);
}

struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(std::size_t n) override {
    const std::size_t size = kAlignment + n;
    char* base = nullptr;
    Pool& p = pool();
    {
      std::lock_guard<std::mutex> lock(p.mutex);
      const auto it = p.by_size.find(size);
      if (it != p.by_size.end()) {
        base = it->second->second;
        p.order.erase(it->second);
        p.by_size.erase(it);
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

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options, bool pool) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  if (!pool || numel * static_cast<int64_t>(options.dtype().itemsize()) < static_cast<int64_t>(kPooledMin))
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
  std::list<std::pair<std::size_t, char*>> blocks;
  std::size_t released = 0;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    blocks.swap(p.order);
    p.by_size.clear();
    released = p.cached;
    p.cached = 0;
  }
  for (auto& [size, base] : blocks) free_block(base);
  return static_cast<int64_t>(released);
}

}  // namespace cpu
}  // namespace torchsan
