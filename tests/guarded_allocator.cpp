// A CPU allocator for the tests (tests/_helpers.py: guarded_allocations): while it is installed, every block torch
// allocates on the CPU sits between two guard regions filled with a pattern, checked when the block is freed. The
// kernels allocate their outputs and gradient buffers themselves (torch::empty), so this is how a test sees a kernel
// write outside them: the values inside an output cannot show it.
//
// Plain C functions (loaded with ctypes): no pybind11 or torch/extension.h, so it compiles in seconds.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <unordered_set>

namespace {

constexpr size_t kGuard = 4096;  // bytes on each side; a multiple of 64, so the blocks stay 64-byte aligned
constexpr unsigned char kPattern = 0xA5;
constexpr uint8_t kPriority = 200;  // above the default CPU allocator's

std::atomic<int64_t> g_allocations{0}, g_violations{0};
std::mutex g_mutex;
std::unordered_set<const void*> g_live;  // the blocks handed out and not yet freed
c10::Allocator* g_previous = nullptr;

// Layout: [size_t n | pattern ... (kGuard bytes)] [n bytes handed out] [pattern (kGuard bytes)]
bool guards_intact(const unsigned char* base) {
  size_t n;
  std::memcpy(&n, base, sizeof(n));
  for (size_t i = sizeof(size_t); i < kGuard; ++i)
    if (base[i] != kPattern) return false;
  for (size_t i = 0; i < kGuard; ++i)
    if (base[kGuard + n + i] != kPattern) return false;
  return true;
}

void guarded_free(void* base) {
  auto* bytes = static_cast<unsigned char*>(base);
  if (!guards_intact(bytes)) ++g_violations;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_live.erase(bytes + kGuard);
  }
  std::free(base);
}

struct GuardedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t total = (2 * kGuard + n + 63) / 64 * 64;
    void* base = std::aligned_alloc(64, total);
    if (base == nullptr) throw std::bad_alloc();
    auto* bytes = static_cast<unsigned char*>(base);
    std::memset(bytes, kPattern, total);  // the guards, and a recognisable (never zero) content
    std::memcpy(bytes, &n, sizeof(n));
    ++g_allocations;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      g_live.insert(bytes + kGuard);
    }
    return {bytes + kGuard, base, &guarded_free, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }
};

GuardedAllocator g_allocator;

}  // namespace

extern "C" {
void guarded_install() {
  if (g_previous == nullptr) g_previous = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&g_allocator, kPriority);
}
void guarded_uninstall() {
  if (g_previous != nullptr) c10::SetCPUAllocator(g_previous, kPriority);
}
int64_t guarded_allocations() { return g_allocations.load(); }
int64_t guarded_violations() { return g_violations.load(); }
int64_t guarded_guard_bytes() { return static_cast<int64_t>(kGuard); }
// 1 if ptr is the start of a live guarded block, and then 2 if its guards are intact too.
int guarded_check(const void* ptr) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_live.count(ptr) == 0) return 0;
  return guards_intact(static_cast<const unsigned char*>(ptr) - kGuard) ? 2 : 1;
}
}
