// libtorch's CUDA graphs (at::cuda::CUDAGraph) as plain C functions for Rust: capture the
// kernels of one training step on a side stream, then replay them with one launch.
// Every function returns 0 on success; a C++ exception becomes 1 with its message in `err`.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <sid_shim.h>

#include <cstddef>
#include <exception>
#include <optional>

namespace {
struct SidGraph {
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;
  std::optional<c10::cuda::CUDAStream> previous;
  // Other threads keep launching work on this device (pipeline stages): capture in
  // thread-local mode, so their calls neither fail nor break this capture, and wait for this
  // thread's streams only, never for the whole device.
  bool local;
  SidGraph(c10::DeviceIndex device, bool local)
      : side(c10::cuda::getStreamFromPool(false, device)), local(local) {}
};

// Waits for all work queued on the graph's device. Only CUDA functions compiled into libtorch
// are called here, so the binary needs no direct link to libcudart.
void sync_device(const SidGraph* s) {
  const auto before = c10::cuda::ExchangeDevice(s->side.device_index());
  c10::cuda::device_synchronize();
  c10::cuda::ExchangeDevice(before);
}

// Waits for what this graph's work depends on: the whole device, or (local) this thread's
// current stream and the side stream.
void sync_before(SidGraph* s) {
  if (s->local) {
    c10::cuda::getCurrentCUDAStream(s->side.device_index()).synchronize();
    s->side.synchronize();
  } else {
    sync_device(s);
  }
}

// After the device's queued work, makes the side stream current (remembering the previous one).
void enter_side(SidGraph* s) {
  auto current = c10::cuda::getCurrentCUDAStream(s->side.device_index());
  sync_before(s);
  s->previous = current;
  c10::cuda::setCurrentCUDAStream(s->side);
}

// Makes the previous stream current again, if the side stream is current.
void leave_side(SidGraph* s) {
  if (s->previous) {
    c10::cuda::setCurrentCUDAStream(*s->previous);
    s->previous.reset();
  }
}
}  // namespace

// A graph on `device`; `local` (non-zero): for one thread among several that share the device
// (see SidGraph::local).
extern "C" int sid_graph_new(int device, int local, void** out, char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    *out = new SidGraph(static_cast<c10::DeviceIndex>(device), local != 0);
  });
}

extern "C" void sid_graph_free(void* g) { delete static_cast<SidGraph*>(g); }

// Makes the side stream current after the device's queued work: warm-up steps run there
// before the capture, as PyTorch recommends (lazy per-stream set-up such as cuBLAS workspaces
// then happens outside the capture).
extern "C" int sid_graph_enter_side(void* g, char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] { enter_side(static_cast<SidGraph*>(g)); });
}

// Waits for the side stream's work and makes the previous stream current again.
extern "C" int sid_graph_leave_side(void* g, char* err, size_t err_len) {
  auto* s = static_cast<SidGraph*>(g);
  return sid::guarded(err, err_len, [&] {
    if (s->local) {
      s->side.synchronize();
    } else {
      sync_device(s);
    }
    leave_side(s);
  });
}

// Makes the side stream current after the device's queued work and starts capturing on it (a
// capture cannot run on the default stream).
extern "C" int sid_graph_begin(void* g, char* err, size_t err_len) {
  auto* s = static_cast<SidGraph*>(g);
  return sid::guarded(err, err_len, [&] {
    enter_side(s);
    s->graph.capture_begin({0, 0}, s->local ? cudaStreamCaptureModeThreadLocal
                                             : cudaStreamCaptureModeGlobal);
  });
}

// Ends the capture (instantiating the graph) and makes the previous stream current again, even
// when the capture failed.
extern "C" int sid_graph_end(void* g, char* err, size_t err_len) {
  auto* s = static_cast<SidGraph*>(g);
  const int rc = sid::guarded(err, err_len, [&] { s->graph.capture_end(); });
  // Nothing ran during the capture, so the streams need no ordering here.
  leave_side(s);
  return rc;
}

// Replays the captured kernels on the current stream.
extern "C" int sid_graph_replay(void* g, char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] { static_cast<SidGraph*>(g)->graph.replay(); });
}
