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

use tch::Device;

use crate::{CoreError, Result};

#[cfg(sid_cuda_graph)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};

    unsafe extern "C" {
        pub fn sid_graph_new(
            device: c_int,
            out: *mut *mut c_void,
            err: *mut c_char,
            n: usize,
        ) -> c_int;
        pub fn sid_graph_free(g: *mut c_void);
        pub fn sid_graph_begin(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
        pub fn sid_graph_end(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
        pub fn sid_graph_replay(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
    }
}

/// A captured CUDA graph on one device.
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

impl CudaGraph {
    /// Whether this build has CUDA graphs (it needs CUDA's headers at build time).
    pub fn available() -> bool {
        cfg!(sid_cuda_graph)
    }

    /// Captures what `step` queues on `device` into a graph. Nothing runs during a capture:
    /// replay the graph to run the step. The step must not read device values on the host or
    /// synchronise. If the capture fails, the error says why and the caller can go on eagerly.
    pub fn capture<R>(device: Device, step: impl FnOnce() -> Result<R>) -> Result<(Self, R)> {
        let Device::Cuda(index) = device else {
            return Err(CoreError::Graph(format!(
                "CUDA graphs need a CUDA device, not {device:?}"
            )));
        };
        Self::capture_on(index, step)
    }

    #[cfg(sid_cuda_graph)]
    fn capture_on<R>(index: usize, step: impl FnOnce() -> Result<R>) -> Result<(Self, R)> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: the shim writes a new graph into `ptr` or an error message.
        call(|e, n| unsafe { ffi::sid_graph_new(index as i32, &mut ptr, e, n) })?;
        let graph = Self { ptr };
        // SAFETY: `graph.ptr` is live until `graph` drops.
        call(|e, n| unsafe { ffi::sid_graph_begin(graph.ptr, e, n) })?;
        // End the capture whatever the step did, so the device is usable afterwards.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(step));
        let ended = call(|e, n| unsafe { ffi::sid_graph_end(graph.ptr, e, n) });
        let out = match out {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        ended?;
        Ok((graph, out))
    }

    #[cfg(not(sid_cuda_graph))]
    fn capture_on<R>(_index: usize, _step: impl FnOnce() -> Result<R>) -> Result<(Self, R)> {
        Err(CoreError::Graph(
            "this build has no CUDA graphs (CUDA headers were not found when it was compiled)"
                .into(),
        ))
    }

    /// Runs the captured kernels again, on the current stream.
    pub fn replay(&self) -> Result<()> {
        #[cfg(sid_cuda_graph)]
        {
            // SAFETY: `self.ptr` is a live graph.
            call(|e, n| unsafe { ffi::sid_graph_replay(self.ptr, e, n) })
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
    fn capture_on_the_cpu_is_refused_with_a_reason() {
        let err = CudaGraph::capture(Device::Cpu, || Ok(())).unwrap_err();
        assert!(err.to_string().contains("CUDA"), "{err}");
    }
}
