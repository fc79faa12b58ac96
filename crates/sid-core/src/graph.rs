//! CUDA graphs of a training step: capture its kernels once, then replay them with one launch.
//!
//! A small step on a GPU is bound by the host, not the GPU: every tensor op costs several
//! microseconds of dispatch and launch, and SID runs more, smaller ops than backprop (a loss and
//! an optimizer per module). A graph replays all of a step's kernels at GPU speed. What it needs
//! from the step (all true of [`crate::Network::train_step_queued`]): no host reads of device
//! values, tensors allocated during capture reused in place (the graph's private memory pool
//! does that), inputs copied into the same tensors every step, and the optimizer's step count
//! on the device. libtorch's `at::cuda::CUDAGraph` through a C++ shim (`src/cuda_graph.cpp`);
//! builds without CUDA headers have [`CudaGraph::available`] false.

use std::sync::atomic::{AtomicUsize, Ordering};

use tch::Device;

use crate::{CoreError, Result};

/// Set (to anything but empty or `0`), every capture fails at once, saying so: runs go on
/// eagerly, and the checks that a graph was captured fail. This is how those checks (the GPU
/// scripts', the GPU tests') are shown to fail when the feature is forced off.
pub const DISABLE_VAR: &str = "SID_NO_CUDA_GRAPH";

// Process-wide, so a run's binary reads them without plumbing from every stage's thread.
static CAPTURED: AtomicUsize = AtomicUsize::new(0);
static REPLAYS: AtomicUsize = AtomicUsize::new(0);

/// CUDA graphs captured and replays run in this process so far, by every thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Successful captures.
    pub captured: usize,
    /// Successful replays (a captured step runs as a replay too).
    pub replays: usize,
}

/// The process's [`GraphCounts`]: whether a graph was in effect, not silently replaced by
/// eager steps after a failed capture.
pub fn counts() -> GraphCounts {
    GraphCounts {
        captured: CAPTURED.load(Ordering::Relaxed),
        replays: REPLAYS.load(Ordering::Relaxed),
    }
}

/// Whether [`DISABLE_VAR`] disables capture.
fn capture_disabled() -> bool {
    std::env::var(DISABLE_VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

#[cfg(sid_cuda_graph)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};

    /// The shape of the shim's begin/end functions.
    pub type ShimFn = unsafe extern "C" fn(*mut c_void, *mut c_char, usize) -> c_int;

    unsafe extern "C" {
        pub fn sid_graph_new(
            device: c_int,
            out: *mut *mut c_void,
            err: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn sid_graph_new_local(
            device: c_int,
            out: *mut *mut c_void,
            err: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn sid_graph_free(g: *mut c_void);
        pub fn sid_graph_enter_side(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
        pub fn sid_graph_leave_side(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
        pub fn sid_graph_begin(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
        pub fn sid_graph_end(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
        pub fn sid_graph_replay(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
    }
}

/// A CUDA graph on one device with its own side stream: made empty ([`CudaGraph::new`]),
/// captured once ([`CudaGraph::capture`]), then replayed ([`CudaGraph::replay`]).
#[derive(Debug)]
pub struct CudaGraph {
    #[cfg(sid_cuda_graph)]
    ptr: *mut std::os::raw::c_void,
}

// SAFETY: the graph is only used through &mut self / &self by one thread at a time; libtorch's
// CUDAGraph may be replayed from any thread.
unsafe impl Send for CudaGraph {}

#[cfg(sid_cuda_graph)]
fn call(f: impl FnOnce(*mut std::os::raw::c_char, usize) -> std::os::raw::c_int) -> Result<()> {
    let mut err = [0 as std::os::raw::c_char; 1024];
    if f(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim wrote a NUL-terminated message.
    let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
    Err(CoreError::Graph(msg.to_string_lossy().into_owned()))
}

/// The index of a CUDA device, or why a graph cannot live on `device`.
fn cuda_index(device: Device) -> Result<usize> {
    match device {
        Device::Cuda(index) => Ok(index),
        other => Err(CoreError::Graph(format!(
            "CUDA graphs need a CUDA device, not {other:?}"
        ))),
    }
}

impl CudaGraph {
    /// Whether this build has CUDA graphs (it needs CUDA's headers at build time).
    pub fn available() -> bool {
        cfg!(sid_cuda_graph)
    }

    /// A graph-to-be on `device`, with its own side stream; nothing is captured yet.
    pub fn new(device: Device) -> Result<Self> {
        Self::new_on(cuda_index(device)?, false)
    }

    /// A graph-to-be for one thread among several that launch work on the same device (the
    /// stages of a pipeline): it captures in CUDA's thread-local mode, so the other threads'
    /// work neither fails nor breaks the capture, and its warm-up and capture wait for this
    /// thread's stream only, never for the whole device.
    pub fn new_thread_local(device: Device) -> Result<Self> {
        Self::new_on(cuda_index(device)?, true)
    }

    #[cfg(sid_cuda_graph)]
    fn new_on(index: usize, local: bool) -> Result<Self> {
        let mut ptr = std::ptr::null_mut();
        let make = if local {
            ffi::sid_graph_new_local
        } else {
            ffi::sid_graph_new
        };
        // SAFETY: the shim writes a new graph into `ptr` or an error message.
        call(|e, n| unsafe { make(index as i32, &mut ptr, e, n) })?;
        Ok(Self { ptr })
    }

    #[cfg(not(sid_cuda_graph))]
    fn new_on(_index: usize, _local: bool) -> Result<Self> {
        Err(CoreError::Graph(
            "this build has no CUDA graphs (CUDA headers were not found when it was compiled)"
                .into(),
        ))
    }

    /// Runs `work` with the graph's side stream current (after the device's queued work, and
    /// waited for at the end): warm-up steps run there before [`CudaGraph::capture`], so lazy
    /// per-stream set-up happens outside the capture.
    pub fn on_side_stream<R>(&mut self, work: impl FnOnce() -> Result<R>) -> Result<R> {
        #[cfg(sid_cuda_graph)]
        return self.bracket(ffi::sid_graph_enter_side, ffi::sid_graph_leave_side, work);
        #[cfg(not(sid_cuda_graph))]
        {
            let _ = work;
            Err(CoreError::Graph("this build has no CUDA graphs".into()))
        }
    }

    /// Captures what `step` queues on the device into this graph. Nothing runs during a
    /// capture: [`CudaGraph::replay`] runs the step. The step must not read device values on
    /// the host or synchronise. If the capture fails, the error says why and the caller can go
    /// on without the graph.
    pub fn capture<R>(&mut self, step: impl FnOnce() -> Result<R>) -> Result<R> {
        if capture_disabled() {
            return Err(CoreError::Graph(format!(
                "CUDA graph capture disabled by {DISABLE_VAR}"
            )));
        }
        #[cfg(sid_cuda_graph)]
        {
            let out = self.bracket(ffi::sid_graph_begin, ffi::sid_graph_end, step)?;
            CAPTURED.fetch_add(1, Ordering::Relaxed);
            Ok(out)
        }
        #[cfg(not(sid_cuda_graph))]
        {
            let _ = step;
            Err(CoreError::Graph("this build has no CUDA graphs".into()))
        }
    }

    /// Runs `work` between the shim's `open` and `close`; `close` runs whatever `work` did
    /// (error or panic), so the device's current stream is always restored.
    #[cfg(sid_cuda_graph)]
    fn bracket<R>(
        &mut self,
        open: ffi::ShimFn,
        close: ffi::ShimFn,
        work: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        // SAFETY: `self.ptr` is live until `self` drops; the shim writes only into `e`.
        call(|e, n| unsafe { open(self.ptr, e, n) })?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        let closed = call(|e, n| unsafe { close(self.ptr, e, n) });
        let out = match out {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        closed?;
        Ok(out)
    }

    /// Runs the captured kernels again, on the current stream.
    pub fn replay(&self) -> Result<()> {
        #[cfg(sid_cuda_graph)]
        {
            // SAFETY: `self.ptr` is a live graph.
            call(|e, n| unsafe { ffi::sid_graph_replay(self.ptr, e, n) })?;
            REPLAYS.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        #[cfg(not(sid_cuda_graph))]
        Err(CoreError::Graph("this build has no CUDA graphs".into()))
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(sid_cuda_graph)]
        // SAFETY: the pointer came from sid_graph_new and is freed once.
        unsafe {
            ffi::sid_graph_free(self.ptr)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_graph_on_the_cpu_is_refused_with_a_reason() {
        let err = CudaGraph::new(Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("CUDA"), "{err}");
    }
}
