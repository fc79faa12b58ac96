//! The shim's C functions, each wrapped to return the C++ exception's message as the error.
//! Without the shim (no Gloo headers at build time) the same functions say so.

use std::ffi::CStr;

use tch::Tensor;

use crate::Backend;

/// Returned by every wrapper on failure: the C++ exception's message.
pub(crate) type Res<T> = std::result::Result<T, String>;

#[cfg(sid_c10d)]
mod real {
    use super::*;
    use std::os::raw::{c_char, c_int};

    #[repr(C)]
    pub struct SidStore {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub struct SidGroup {
        _private: [u8; 0],
    }
    type T = torch_sys::C_tensor;

    extern "C" {
        fn sid_c10d_has_nccl() -> c_int;
        fn sid_c10d_init_logging();
        fn sid_store_new(
            host: *const c_char,
            port: c_int,
            is_server: c_int,
            world: c_int,
            timeout_ms: i64,
            out: *mut *mut SidStore,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_store_free(s: *mut SidStore);
        fn sid_store_set(
            s: *mut SidStore,
            key: *const c_char,
            data: *const u8,
            len: usize,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_store_get(
            s: *mut SidStore,
            key: *const c_char,
            timeout_ms: i64,
            out: *mut *mut u8,
            out_len: *mut usize,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_store_add(
            s: *mut SidStore,
            key: *const c_char,
            value: i64,
            out: *mut i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_store_check(
            s: *mut SidStore,
            key: *const c_char,
            out: *mut c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_bytes_free(p: *mut u8);
        fn sid_group_new(
            s: *mut SidStore,
            prefix: *const c_char,
            rank: c_int,
            world: c_int,
            backend: c_int,
            hostname: *const c_char,
            timeout_ms: i64,
            out: *mut *mut SidGroup,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_group_free(g: *mut SidGroup);
        fn sid_group_send(
            g: *mut SidGroup,
            t: *mut T,
            dst: c_int,
            tag: c_int,
            timeout_ms: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_group_recv(
            g: *mut SidGroup,
            t: *mut T,
            src: c_int,
            tag: c_int,
            timeout_ms: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_group_allreduce_sum(
            g: *mut SidGroup,
            t: *mut T,
            timeout_ms: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_group_broadcast(
            g: *mut SidGroup,
            t: *mut T,
            root: c_int,
            timeout_ms: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_group_gather(
            g: *mut SidGroup,
            t: *mut T,
            outs: *const *mut T,
            n_outs: c_int,
            root: c_int,
            timeout_ms: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn sid_group_barrier(
            g: *mut SidGroup,
            timeout_ms: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }

    pub struct StorePtr(*mut SidStore);
    pub struct GroupPtr(*mut SidGroup);

    const ERR: usize = 2048;

    /// Runs a shim call with an error buffer; a non-zero return becomes its message.
    fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Res<()> {
        let mut buf = vec![0 as c_char; ERR];
        if f(buf.as_mut_ptr(), ERR) == 0 {
            return Ok(());
        }
        // SAFETY: the shim NUL-terminates within ERR bytes.
        let msg = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Err(msg.to_string_lossy().trim().to_string())
    }

    fn tensor_ptr(t: &Tensor) -> *mut T {
        t.as_ptr() as *mut T
    }

    pub fn available() -> (bool, bool) {
        // SAFETY: no arguments.
        (true, unsafe { sid_c10d_has_nccl() } == 1)
    }

    pub fn init_logging() {
        // SAFETY: no arguments; reads an environment variable.
        unsafe { sid_c10d_init_logging() }
    }

    pub fn store_new(
        host: &CStr,
        port: u16,
        serve: bool,
        world: usize,
        timeout_ms: i64,
    ) -> Res<StorePtr> {
        let mut out = std::ptr::null_mut();
        // SAFETY: valid C string and out pointer.
        call(|e, n| unsafe {
            sid_store_new(
                host.as_ptr(),
                c_int::from(port),
                c_int::from(serve),
                world as c_int,
                timeout_ms,
                &mut out,
                e,
                n,
            )
        })?;
        Ok(StorePtr(out))
    }

    pub fn store_free(s: &mut StorePtr) {
        // SAFETY: owned pointer, freed once.
        unsafe { sid_store_free(s.0) };
        s.0 = std::ptr::null_mut();
    }

    pub fn store_set(s: &StorePtr, key: &CStr, value: &[u8]) -> Res<()> {
        // SAFETY: valid pointers for the call's duration.
        call(|e, n| unsafe { sid_store_set(s.0, key.as_ptr(), value.as_ptr(), value.len(), e, n) })
    }

    pub fn store_get(s: &StorePtr, key: &CStr, timeout_ms: i64) -> Res<Vec<u8>> {
        let mut out = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: valid pointers; the buffer is freed below.
        call(|e, n| unsafe {
            sid_store_get(s.0, key.as_ptr(), timeout_ms, &mut out, &mut len, e, n)
        })?;
        // SAFETY: the shim allocated `len` bytes at `out`.
        let v = unsafe { std::slice::from_raw_parts(out, len) }.to_vec();
        unsafe { sid_bytes_free(out) };
        Ok(v)
    }

    pub fn store_add(s: &StorePtr, key: &CStr, value: i64) -> Res<i64> {
        let mut out = 0i64;
        // SAFETY: valid pointers.
        call(|e, n| unsafe { sid_store_add(s.0, key.as_ptr(), value, &mut out, e, n) })?;
        Ok(out)
    }

    pub fn store_check(s: &StorePtr, key: &CStr) -> Res<bool> {
        let mut out: c_int = 0;
        // SAFETY: valid pointers.
        call(|e, n| unsafe { sid_store_check(s.0, key.as_ptr(), &mut out, e, n) })?;
        Ok(out == 1)
    }

    pub fn group_new(
        s: &StorePtr,
        prefix: &CStr,
        rank: usize,
        world: usize,
        backend: Backend,
        hostname: &CStr,
        timeout_ms: i64,
    ) -> Res<GroupPtr> {
        let mut out = std::ptr::null_mut();
        let b = match backend {
            Backend::Gloo => 0,
            Backend::Nccl => 1,
        };
        // SAFETY: valid pointers.
        call(|e, n| unsafe {
            sid_group_new(
                s.0,
                prefix.as_ptr(),
                rank as c_int,
                world as c_int,
                b,
                hostname.as_ptr(),
                timeout_ms,
                &mut out,
                e,
                n,
            )
        })?;
        Ok(GroupPtr(out))
    }

    pub fn group_free(g: &mut GroupPtr) {
        // SAFETY: owned pointer, freed once.
        unsafe { sid_group_free(g.0) };
        g.0 = std::ptr::null_mut();
    }

    pub fn group_send(g: &GroupPtr, t: &Tensor, dst: usize, tag: u32, ms: i64) -> Res<()> {
        // SAFETY: the tensor outlives the (waited) call.
        call(|e, n| unsafe {
            sid_group_send(g.0, tensor_ptr(t), dst as c_int, tag as c_int, ms, e, n)
        })
    }

    pub fn group_recv(g: &GroupPtr, t: &mut Tensor, src: usize, tag: u32, ms: i64) -> Res<()> {
        // SAFETY: as above; the tensor is written in place.
        call(|e, n| unsafe {
            sid_group_recv(g.0, t.as_mut_ptr(), src as c_int, tag as c_int, ms, e, n)
        })
    }

    pub fn group_allreduce(g: &GroupPtr, t: &mut Tensor, ms: i64) -> Res<()> {
        // SAFETY: as above.
        call(|e, n| unsafe { sid_group_allreduce_sum(g.0, t.as_mut_ptr(), ms, e, n) })
    }

    pub fn group_broadcast(g: &GroupPtr, t: &mut Tensor, root: usize, ms: i64) -> Res<()> {
        // SAFETY: as above.
        call(|e, n| unsafe { sid_group_broadcast(g.0, t.as_mut_ptr(), root as c_int, ms, e, n) })
    }

    pub fn group_gather(
        g: &GroupPtr,
        t: &Tensor,
        outs: &[Tensor],
        root: usize,
        ms: i64,
    ) -> Res<()> {
        let ptrs: Vec<*mut T> = outs.iter().map(tensor_ptr).collect();
        // SAFETY: as above; `ptrs` lives across the call.
        call(|e, n| unsafe {
            sid_group_gather(
                g.0,
                tensor_ptr(t),
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                root as c_int,
                ms,
                e,
                n,
            )
        })
    }

    pub fn group_barrier(g: &GroupPtr, ms: i64) -> Res<()> {
        // SAFETY: valid pointer.
        call(|e, n| unsafe { sid_group_barrier(g.0, ms, e, n) })
    }
}

#[cfg(not(sid_c10d))]
mod real {
    use super::*;

    const MISSING: &str =
        "this build of sid has no c10d: Gloo's headers were missing when it was built (apt-get install libgloo-dev, then rebuild)";

    pub struct StorePtr;
    pub struct GroupPtr;

    pub fn available() -> (bool, bool) {
        (false, false)
    }
    pub fn init_logging() {}
    pub fn store_new(_: &CStr, _: u16, _: bool, _: usize, _: i64) -> Res<StorePtr> {
        Err(MISSING.into())
    }
    pub fn store_free(_: &mut StorePtr) {}
    pub fn store_set(_: &StorePtr, _: &CStr, _: &[u8]) -> Res<()> {
        Err(MISSING.into())
    }
    pub fn store_get(_: &StorePtr, _: &CStr, _: i64) -> Res<Vec<u8>> {
        Err(MISSING.into())
    }
    pub fn store_add(_: &StorePtr, _: &CStr, _: i64) -> Res<i64> {
        Err(MISSING.into())
    }
    pub fn store_check(_: &StorePtr, _: &CStr) -> Res<bool> {
        Err(MISSING.into())
    }
    pub fn group_new(
        _: &StorePtr,
        _: &CStr,
        _: usize,
        _: usize,
        _: Backend,
        _: &CStr,
        _: i64,
    ) -> Res<GroupPtr> {
        Err(MISSING.into())
    }
    pub fn group_free(_: &mut GroupPtr) {}
    pub fn group_send(_: &GroupPtr, _: &Tensor, _: usize, _: u32, _: i64) -> Res<()> {
        Err(MISSING.into())
    }
    pub fn group_recv(_: &GroupPtr, _: &mut Tensor, _: usize, _: u32, _: i64) -> Res<()> {
        Err(MISSING.into())
    }
    pub fn group_allreduce(_: &GroupPtr, _: &mut Tensor, _: i64) -> Res<()> {
        Err(MISSING.into())
    }
    pub fn group_broadcast(_: &GroupPtr, _: &mut Tensor, _: usize, _: i64) -> Res<()> {
        Err(MISSING.into())
    }
    pub fn group_gather(_: &GroupPtr, _: &Tensor, _: &[Tensor], _: usize, _: i64) -> Res<()> {
        Err(MISSING.into())
    }
    pub fn group_barrier(_: &GroupPtr, _: i64) -> Res<()> {
        Err(MISSING.into())
    }
}

pub(crate) use real::*;
