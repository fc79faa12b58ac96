// The CUDA caching allocator's statistics, as plain C functions for Rust.
// Return 0 on success; any C++ exception (no CUDA, bad device) becomes 1 with its message in
// `err` (at most err_len bytes, NUL-terminated).
#include <c10/cuda/CUDACachingAllocator.h>
#include <sid_shim.h>

#include <cstdint>

extern "C" int sid_cuda_memory_stats(int device, int64_t* allocated, int64_t* peak_allocated,
                                     char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[agg].current;
    *peak_allocated = stats.allocated_bytes[agg].peak;
  });
}

extern "C" int sid_cuda_reset_peak(int device, char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}
