// torch.distributed's c10d as plain C functions for Rust: a TCPStore, and process groups
// (Gloo for CPU tensors; NCCL for CUDA tensors when built with USE_C10D_NCCL) over it.
// Every function returns 0 on success; a C++ exception becomes 1 with its message in `err`
// (`sid::guarded`), so Rust can name the rank, peer and operation.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <c10/util/Logging.h>
#include <sid_shim.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

std::chrono::milliseconds ms(int64_t v) { return std::chrono::milliseconds(v); }

}  // namespace

struct SidStore {
  c10::intrusive_ptr<c10d::Store> store;
};

struct SidGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
};

extern "C" {

// Applies TORCH_CPP_LOG_LEVEL to libtorch's own log (c10d logs every retry, with a stack trace,
// at WARNING); plain libtorch never reads it unless asked.
void sid_c10d_init_logging() { c10::initLogging(); }

// 1 when this shim was built with NCCL.
int sid_c10d_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

int sid_store_new(const char* host, int port, int is_server, int world, int64_t timeout_ms,
                  SidStore** out, char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    if (world > 0) {
      opts.numWorkers = static_cast<std::size_t>(world);
    }
    // Rendezvous is done by the caller's own keys, so a missing rank is reported by name.
    opts.waitWorkers = false;
    opts.timeout = ms(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new SidStore{store};
  });
}

void sid_store_free(SidStore* s) { delete s; }

int sid_store_set(SidStore* s, const char* key, const uint8_t* data, size_t len, char* err,
                  size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    std::vector<uint8_t> v(data, data + len);
    s->store->set(std::string(key), v);
  });
}

// Waits up to timeout_ms for the key; *out is malloc'ed (free with sid_bytes_free).
int sid_store_get(SidStore* s, const char* key, int64_t timeout_ms, uint8_t** out,
                  size_t* out_len, char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    std::string k(key);
    s->store->wait({k}, ms(timeout_ms));
    auto v = s->store->get(k);
    *out_len = v.size();
    *out = static_cast<uint8_t*>(std::malloc(v.size() > 0 ? v.size() : 1));
    if (!v.empty()) std::memcpy(*out, v.data(), v.size());
  });
}

int sid_store_add(SidStore* s, const char* key, int64_t value, int64_t* out, char* err,
                  size_t err_len) {
  return sid::guarded(err, err_len, [&] { *out = s->store->add(std::string(key), value); });
}

void sid_bytes_free(uint8_t* p) { std::free(p); }

// A process group of `world` ranks over the store, its keys under `prefix` (so several groups
// can share one store). backend: 0 = Gloo, 1 = NCCL.
int sid_group_new(SidStore* s, const char* prefix, int rank, int world, int backend,
                  const char* hostname, int64_t timeout_ms, SidGroup** out, char* err,
                  size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s->store);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == 0) {
      auto opts = c10d::ProcessGroupGloo::Options::create(ms(timeout_ms));
      std::string host(hostname);
      opts->devices.push_back(host.empty()
                                  ? c10d::ProcessGroupGloo::createDefaultDevice()
                                  : c10d::ProcessGroupGloo::createDeviceForHostname(host));
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    } else {
#ifdef USE_C10D_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = ms(timeout_ms);
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
      throw std::runtime_error("this build of sid has no NCCL (its headers were not found at build time)");
#endif
    }
    *out = new SidGroup{pg};
  });
}

void sid_group_free(SidGroup* g) { delete g; }

// One operation on the group, waiting at most timeout_ms: op 0 = send t to peer, 1 = recv
// into t from peer, 2 = all-reduce (sum) of t.
int sid_group_op(SidGroup* g, int op, at::Tensor* t, int peer, int tag, int64_t timeout_ms,
                 char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    std::vector<at::Tensor> v{*t};
    auto& b = *g->backend;
    c10::intrusive_ptr<c10d::Work> work;
    switch (op) {
      case 0:
        work = b.send(v, peer, tag);
        break;
      case 1:
        work = b.recv(v, peer, tag);
        break;
      case 2: {
        c10d::AllreduceOptions opts;
        opts.reduceOp = c10d::ReduceOp::SUM;
        opts.timeout = ms(timeout_ms);
        work = b.allreduce(v, opts);
        break;
      }
      default:
        throw std::runtime_error("unknown group operation " + std::to_string(op));
    }
    work->wait(ms(timeout_ms));
  });
}

}  // extern "C"
