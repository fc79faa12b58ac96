// What every C++ shim of sid shares: no C++ exception may cross into Rust (ARCHITECTURE.md
// rule 9), so each exported function runs its body through `sid::guarded`, which returns 0,
// or 1 with the exception's message in the caller's buffer `err` (at most err_len bytes,
// NUL-terminated). libtorch's own errors give their message without the C++ stack trace.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstring>
#include <exception>

namespace sid {

// Copies `what` into `err`; returns 1, the failure code.
inline int fail(const char* what, char* err, size_t err_len) {
  if (err_len > 0) {
    std::strncpy(err, what, err_len - 1);
    err[err_len - 1] = '\0';
  }
  return 1;
}

// Runs `f`: 0 when it returns, 1 and the message when it throws.
template <typename F>
int guarded(char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    return fail(e.what_without_backtrace(), err, err_len);
  } catch (const std::exception& e) {
    return fail(e.what(), err, err_len);
  } catch (...) {
    return fail("unknown C++ exception", err, err_len);
  }
}

}  // namespace sid
