// The CUDA caching allocator's statistics, as plain C functions for Rust.
// Return 0 on success; any C++ exception (no CUDA, bad device) becomes 1 with its message in
// `err` (at most err_len bytes, NUL-terminated).
#include <c10/cuda/CUDACachingAllocator.h>
#include <cstdint>
#include <cstring>
#include <exception>

static void sid_copy_message(const char* what, char* err, size_t err_len) {
  if (err_len > 0) {
    std::strncpy(err, what, err_len - 1);
    err[err_len - 1] = '\0';
  }
}

extern "C" int sid_cuda_memory_stats(int device, int64_t* allocated, int64_t* peak_allocated,
                                     int64_t* reserved, int64_t* peak_reserved, char* err,
                                     size_t err_len) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[agg].current;
    *peak_allocated = stats.allocated_bytes[agg].peak;
    *reserved = stats.reserved_bytes[agg].current;
    *peak_reserved = stats.reserved_bytes[agg].peak;
    return 0;
  } catch (const std::exception& e) {
    sid_copy_message(e.what(), err, err_len);
    return 1;
  } catch (...) {
    sid_copy_message("unknown C++ exception", err, err_len);
    return 1;
  }
}

extern "C" int sid_cuda_reset_peak(int device, char* err, size_t err_len) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (const std::exception& e) {
    sid_copy_message(e.what(), err, err_len);
    return 1;
  } catch (...) {
    sid_copy_message("unknown C++ exception", err, err_len);
    return 1;
  }
}
