// Per-owner accounting of libtorch's allocations: how many bytes each owner (a pipeline stage)
// holds now and at its peak.
//
// libtorch's allocators (the CPU allocator and the CUDA caching allocator) report every
// allocation and free to the calling thread's MemoryReportingInfoBase when one is pushed as
// its PROFILER_STATE debug info (torch.profiler's profile_memory works this way; autograd's
// device threads inherit the caller's debug info). While an owner is entered on a thread, its
// Reporter charges that thread's allocations to the owner. Frees are matched by address in
// one table, so a tensor sent to another stage and freed there still returns its bytes to the
// stage that allocated it (on real devices the memory is the allocating stage's).
//
// While any owner is entered, c10's log level is raised to errors: a tracked thread that frees
// a block allocated before tracking began (the coordinator's input, weights built elsewhere)
// makes libtorch's CPU allocator warn, which is expected here and would only be noise.
//
// Return 0 on success; a C++ exception becomes 1 with its message in `err` (`sid::guarded`).
#include <c10/core/Allocator.h>
#include <c10/util/Logging.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <sid_shim.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

struct Counts {
  int64_t held = 0;
  int64_t peak = 0;
};

std::mutex mu;
// Live tracked blocks: address → (owner, bytes).
std::unordered_map<void*, std::pair<uint32_t, int64_t>> live;
// Indexed by owner id; owners are never removed (a few bytes each).
std::vector<Counts> owners;
// Scopes entered and not yet left, over all threads, and the log level before the first.
int64_t active = 0;
int saved_log_level = 0;

void scope_began() {
  std::lock_guard<std::mutex> guard(mu);
  if (active++ == 0) {
    saved_log_level = FLAGS_caffe2_log_level;
    FLAGS_caffe2_log_level = std::max(saved_log_level, 2);  // GLOG_ERROR
  }
}

void scope_ended() {
  std::lock_guard<std::mutex> guard(mu);
  if (--active == 0) {
    FLAGS_caffe2_log_level = saved_log_level;
  }
}

void release(std::unordered_map<void*, std::pair<uint32_t, int64_t>>::iterator it) {
  owners[it->second.first].held -= it->second.second;
  live.erase(it);
}

struct Reporter final : c10::MemoryReportingInfoBase {
  explicit Reporter(uint32_t id) : owner(id) {}

  void reportMemoryUsage(void* ptr, int64_t size, size_t, size_t, c10::Device) override {
    std::lock_guard<std::mutex> guard(mu);
    auto it = live.find(ptr);
    if (size > 0) {
      // An address handed out again whose free happened on an untracked thread: that block
      // is gone, so stop charging its old owner.
      if (it != live.end()) {
        release(it);
      }
      live.emplace(ptr, std::make_pair(owner, size));
      Counts& c = owners[owner];
      c.held += size;
      c.peak = std::max(c.peak, c.held);
    } else if (size < 0 && it != live.end()) {
      release(it);
    }
  }

  bool memoryProfilingEnabled() const override { return true; }

  uint32_t owner;
};

}  // namespace

extern "C" int sid_alloc_owner_new(uint32_t* id, char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    std::lock_guard<std::mutex> guard(mu);
    *id = static_cast<uint32_t>(owners.size());
    owners.emplace_back();
  });
}

extern "C" int sid_alloc_enter(uint32_t id, char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE,
                                     std::make_shared<Reporter>(id));
    scope_began();
  });
}

extern "C" int sid_alloc_leave(char* err, size_t err_len) {
  return sid::guarded(err, err_len, [] {
    c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
    scope_ended();
  });
}

extern "C" void sid_alloc_counts(uint32_t id, int64_t* held, int64_t* peak) {
  std::lock_guard<std::mutex> guard(mu);
  const Counts c = id < owners.size() ? owners[id] : Counts{};
  *held = c.held;
  *peak = c.peak;
}

extern "C" void sid_alloc_reset_peak(uint32_t id) {
  std::lock_guard<std::mutex> guard(mu);
  if (id < owners.size()) {
    owners[id].peak = owners[id].held;
  }
}
