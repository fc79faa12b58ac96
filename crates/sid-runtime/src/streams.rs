//! CUDA streams from libtorch's pool, through the plain C functions PyTorch ≥ 2.10 exports
//! from `libtorch_cuda.so` (tch has no stream API).
//!
//! The functions are looked up at run time (`dlsym`), not linked, so the same binary runs on
//! machines whose libtorch has no CUDA: there every call here reports "unavailable".
//!
//! Why streams: several workers on one GPU (`--gpus 0,0,0,0`) would otherwise queue all their
//! kernels on the default stream, one after another. The current stream is per thread in
//! libtorch, so each worker thread takes its own stream from the pool and its kernels can
//! overlap with the other workers'.

use std::ffi::c_void;
use std::sync::OnceLock;

type GetFromPool = unsafe extern "C" fn(bool, i32, *mut *mut c_void) -> i32;
type SetCurrent = unsafe extern "C" fn(*mut c_void, i32) -> i32;
type Synchronize = unsafe extern "C" fn(*mut c_void, i32) -> i32;
type GetCurrent = unsafe extern "C" fn(i32, *mut *mut c_void) -> i32;

struct Api {
    get_from_pool: GetFromPool,
    set_current: SetCurrent,
    synchronize: Synchronize,
    get_current: GetCurrent,
}

fn api() -> Option<&'static Api> {
    static API: OnceLock<Option<Api>> = OnceLock::new();
    API.get_or_init(|| {
        // The running program and every library it loaded (libtorch_cuda.so among them).
        let lib = libloading::os::unix::Library::this();
        // SAFETY: the signatures are those of PyTorch's C shim (torch/csrc/inductor/aoti_torch
        // and torch/csrc/stable), which return 0 on success.
        unsafe {
            let api = Api {
                get_from_pool: *lib
                    .get::<GetFromPool>(b"torch_get_cuda_stream_from_pool\0")
                    .ok()?,
                set_current: *lib
                    .get::<SetCurrent>(b"torch_set_current_cuda_stream\0")
                    .ok()?,
                synchronize: *lib
                    .get::<Synchronize>(b"torch_cuda_stream_synchronize\0")
                    .ok()?,
                get_current: *lib
                    .get::<GetCurrent>(b"aoti_torch_get_current_cuda_stream\0")
                    .ok()?,
            };
            // Keep the handle (and so the symbols) for the life of the process.
            std::mem::forget(lib);
            Some(api)
        }
    })
    .as_ref()
}

/// Whether libtorch's stream functions were found.
pub fn available() -> bool {
    api().is_some()
}

/// Makes a fresh stream from libtorch's pool the current stream of this thread on `device`.
pub fn use_pool_stream(device: usize) -> Result<(), String> {
    let api = api().ok_or("libtorch's CUDA stream functions are not available")?;
    let mut stream = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the stream is owned by libtorch's pool.
    let rc = unsafe { (api.get_from_pool)(false, device as i32, &mut stream) };
    if rc != 0 || stream.is_null() {
        return Err(format!(
            "torch_get_cuda_stream_from_pool(cuda:{device}) failed ({rc})"
        ));
    }
    // SAFETY: the stream pointer came from the pool for this device.
    let rc = unsafe { (api.set_current)(stream, device as i32) };
    if rc != 0 {
        return Err(format!(
            "torch_set_current_cuda_stream(cuda:{device}) failed ({rc})"
        ));
    }
    Ok(())
}

/// Blocks until everything queued on this thread's current stream of `device` has run.
/// Used before handing tensors to another thread (another stream), and before dropping
/// tensors received from one, so the caching allocator never reuses memory still in use.
pub fn synchronize_current(device: usize) -> Result<(), String> {
    let Some(api) = api() else {
        return Ok(());
    };
    let mut stream = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    let rc = unsafe { (api.get_current)(device as i32, &mut stream) };
    if rc != 0 {
        return Err(format!(
            "aoti_torch_get_current_cuda_stream(cuda:{device}) failed ({rc})"
        ));
    }
    // SAFETY: the pointer is the current stream libtorch just returned.
    let rc = unsafe { (api.synchronize)(stream, device as i32) };
    if rc != 0 {
        return Err(format!(
            "torch_cuda_stream_synchronize(cuda:{device}) failed ({rc})"
        ));
    }
    Ok(())
}

/// Synchronizes the current stream when `device` is a GPU; nothing on the CPU.
pub fn sync_device(device: tch::Device) -> Result<(), String> {
    match device {
        tch::Device::Cuda(i) => synchronize_current(i),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn symbols_resolve_in_the_cuda_build_of_libtorch() {
        // The project builds against pip's CUDA libtorch, which exports the shim even on a
        // machine without a GPU; a CPU-only libtorch would not, and sync must then be a no-op.
        if super::available() {
            assert!(super::sync_device(tch::Device::Cpu).is_ok());
        } else {
            assert!(super::synchronize_current(0).is_ok());
        }
    }
}
