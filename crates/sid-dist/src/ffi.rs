//! The shim's C functions and [`call`], which turns a failed call into the C++ exception's
//! message. Without the shim (no Gloo headers at build time) [`call`] says so instead.

pub(crate) use std::os::raw::{c_char, c_int};

/// A `TCPStore` owned by the shim.
#[repr(C)]
pub(crate) struct SidStore {
    _private: [u8; 0],
}

/// A process group owned by the shim.
#[repr(C)]
pub(crate) struct SidGroup {
    _private: [u8; 0],
}

pub(crate) type T = torch_sys::C_tensor;

/// `sid_group_op`'s operations, with the shim's codes.
#[repr(C)]
pub(crate) enum GroupOp {
    Send = 0,
    Recv = 1,
    AllReduceSum = 2,
}

const MISSING: &str =
    "this build of sid has no c10d: Gloo's headers were missing when it was built (apt-get install libgloo-dev, then rebuild)";

sid_build::shim! {
    sid_c10d;
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
    fn sid_group_op(
        g: *mut SidGroup,
        op: GroupOp,
        t: *mut T,
        peer: c_int,
        tag: c_int,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Runs a shim call with an error buffer; a non-zero return becomes its message.
pub(crate) fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    if !cfg!(sid_c10d) {
        return Err(MISSING.into());
    }
    sid_build::call_shim::<2048>(f).map_err(|message| message.trim().to_string())
}
