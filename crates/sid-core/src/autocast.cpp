// Autocast to bfloat16 for a region of forward passes, as a plain C function for Rust: tch's
// `autocast` turns on CUDA autocast at libtorch's default float16 and cannot choose the type.
// The state is thread-local in libtorch; `enter` writes the state it replaced into `prev` and
// `leave` restores it, so regions nest and each thread (a stage, a worker) sets its own.
// The cast cache is off: cached weight copies would outlive a CUDA graph's capture (as
// torch.cuda.graphs advises, autocast(cache_enabled=False)). Returns 0 on success; a C++
// exception becomes 1 with its message in `err`.
#include <ATen/autocast_mode.h>
#include <sid_shim.h>

#include <cstddef>

// prev: enabled, dtype, cache enabled.
extern "C" int sid_autocast_enter(int cuda, int* prev, char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    const auto dev = cuda ? at::kCUDA : at::kCPU;
    prev[0] = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
    prev[1] = static_cast<int>(at::autocast::get_autocast_dtype(dev));
    prev[2] = at::autocast::is_autocast_cache_enabled() ? 1 : 0;
    at::autocast::set_autocast_dtype(dev, at::kBFloat16);
    at::autocast::set_autocast_enabled(dev, true);
    at::autocast::set_autocast_cache_enabled(false);
    at::autocast::increment_nesting();
  });
}

extern "C" int sid_autocast_leave(int cuda, const int* prev, char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    const auto dev = cuda ? at::kCUDA : at::kCPU;
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dev, prev[0] != 0);
    at::autocast::set_autocast_dtype(dev, static_cast<at::ScalarType>(prev[1]));
    at::autocast::set_autocast_cache_enabled(prev[2] != 0);
  });
}
