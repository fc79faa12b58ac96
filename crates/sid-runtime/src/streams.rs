//! CUDA streams from libtorch's pool, through the plain C functions PyTorch ≥ 2.10 exports
//! from `libtorch_cuda.so` (tch has no stream API).
//!
//! The functions are looked up at run time (`dlsym`), not linked, so the same binary runs on
//! machines whose libtorch has no CUDA: there every call for a GPU fails with
//! [`StreamError::Unavailable`] (CPU devices need none).
//!
//! Why streams: several workers on one GPU (`--gpus 0,0,0,0`) would otherwise queue all their
//! kernels on the default stream, one after another. The current stream is per thread in
//! libtorch, so each worker thread takes its own stream from the pool and its kernels can
//! overlap with the other workers'.

use std::ffi::c_void;
use std::sync::OnceLock;

/// libtorch's stream functions (each returns 0 on success).
struct Api {
    get_from_pool: unsafe extern "C" fn(bool, i32, *mut *mut c_void) -> i32,
    set_current: unsafe extern "C" fn(*mut c_void, i32) -> i32,
    synchronize: unsafe extern "C" fn(*mut c_void, i32) -> i32,
    get_current: unsafe extern "C" fn(i32, *mut *mut c_void) -> i32,
}

/// What can go wrong with libtorch's streams.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The libtorch in use does not export a stream function (a CPU-only or pre-2.10 build):
    /// GPU workers cannot synchronise their streams, so they must not run.
    #[error("libtorch's CUDA stream functions are not available ({symbol} is missing; PyTorch >= 2.10 with CUDA exports it), so work on {device} cannot be synchronised")]
    Unavailable {
        /// The first missing symbol.
        symbol: &'static str,
        /// The GPU that needed it, e.g. `cuda:0`.
        device: String,
    },
    /// A stream function returned an error code.
    #[error("{call}(cuda:{device}) failed ({code})")]
    Call {
        /// The C function.
        call: &'static str,
        /// The GPU index.
        device: usize,
        /// Its return code.
        code: i32,
    },
}

/// Result alias for the stream helpers.
pub type StreamResult<T> = std::result::Result<T, StreamError>;

/// The stream functions, or the name of the first one this libtorch lacks.
fn api() -> std::result::Result<&'static Api, &'static str> {
    static API: OnceLock<std::result::Result<Api, &'static str>> = OnceLock::new();
    API.get_or_init(|| {
        // The running program and every library it loaded (libtorch_cuda.so among them).
        let lib = libloading::os::unix::Library::this();
        // SAFETY: the signatures are those of PyTorch's C shim (torch/csrc/inductor/aoti_torch
        // and torch/csrc/stable), which return 0 on success.
        unsafe {
            let api = Api {
                get_from_pool: sym(&lib, "torch_get_cuda_stream_from_pool")?,
                set_current: sym(&lib, "torch_set_current_cuda_stream")?,
                synchronize: sym(&lib, "torch_cuda_stream_synchronize")?,
                get_current: sym(&lib, "aoti_torch_get_current_cuda_stream")?,
            };
            // Keep the handle (and so the symbols) for the life of the process.
            std::mem::forget(lib);
            Ok(api)
        }
    })
    .as_ref()
    .map_err(|name| *name)
}

/// The function `name` of `lib`, or `name` when it lacks it.
///
/// # Safety
/// `T` must be the function's signature.
unsafe fn sym<T: Copy>(
    lib: &libloading::os::unix::Library,
    name: &'static str,
) -> std::result::Result<T, &'static str> {
    lib.get::<T>(name.as_bytes()).map(|f| *f).map_err(|_| name)
}

/// Whether libtorch's stream functions were found.
pub fn available() -> bool {
    api().is_ok()
}

fn unavailable(device: usize) -> impl FnOnce(&'static str) -> StreamError {
    move |symbol| StreamError::Unavailable {
        symbol,
        device: format!("cuda:{device}"),
    }
}

fn check(call: &'static str, device: usize, code: i32) -> StreamResult<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(StreamError::Call { call, device, code })
    }
}

/// Makes a fresh stream from libtorch's pool the current stream of this thread on `device`.
pub fn use_pool_stream(device: usize) -> StreamResult<()> {
    let api = api().map_err(unavailable(device))?;
    let mut stream = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the stream is owned by libtorch's pool.
    let rc = unsafe { (api.get_from_pool)(false, device as i32, &mut stream) };
    // A null stream with a zero code is a failure all the same.
    check(
        "torch_get_cuda_stream_from_pool",
        device,
        if stream.is_null() && rc == 0 { -1 } else { rc },
    )?;
    // SAFETY: the stream pointer came from the pool for this device.
    let rc = unsafe { (api.set_current)(stream, device as i32) };
    check("torch_set_current_cuda_stream", device, rc)
}

/// Blocks until everything queued on this thread's current stream of `device` has run.
/// Used before handing tensors to another thread (another stream), and before dropping
/// tensors received from one, so the caching allocator never reuses memory still in use.
/// Without libtorch's stream functions this is an error: skipping the wait would be unsafe.
pub fn synchronize_current(device: usize) -> StreamResult<()> {
    let api = api().map_err(unavailable(device))?;
    let mut stream = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    let rc = unsafe { (api.get_current)(device as i32, &mut stream) };
    check("aoti_torch_get_current_cuda_stream", device, rc)?;
    // SAFETY: the pointer is the current stream libtorch just returned.
    let rc = unsafe { (api.synchronize)(stream, device as i32) };
    check("torch_cuda_stream_synchronize", device, rc)
}

/// Synchronizes the current stream when `device` is a GPU; nothing on the CPU (which needs
/// no stream functions).
pub fn sync_device(device: tch::Device) -> StreamResult<()> {
    match device {
        tch::Device::Cuda(i) => synchronize_current(i),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn symbols_resolve_in_the_cuda_build_of_libtorch() {
        // The project builds against pip's CUDA libtorch, which exports the functions even on a
        // machine without a GPU; a CPU-only libtorch of the user's own would not, and a GPU's
        // sync must then fail naming what is missing.
        let cuda_build = std::env::var_os("LIBTORCH").is_some_and(|d| {
            std::path::Path::new(&d)
                .join("lib/libtorch_cuda.so")
                .exists()
        });
        if cuda_build {
            assert!(
                super::available(),
                "the CUDA build of libtorch exports them"
            );
        }
        if !super::available() {
            // Without the functions a GPU's sync is an error naming what is missing.
            let e = super::synchronize_current(0).unwrap_err().to_string();
            assert!(
                e.contains("stream functions are not available") && e.contains("cuda:0"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_missing_symbol_is_named_with_the_gpu() {
        let e = super::unavailable(3)("torch_cuda_stream_synchronize").to_string();
        assert_eq!(
            e,
            "libtorch's CUDA stream functions are not available (torch_cuda_stream_synchronize is missing; PyTorch >= 2.10 with CUDA exports it), so work on cuda:3 cannot be synchronised"
        );
    }
}
