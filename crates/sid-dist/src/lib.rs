//! torch.distributed's c10d for sid, through a small C++ shim (`src/c10d.cpp`):
//! - [`Store`]: libtorch's `TCPStore`, the rendezvous every rank connects to;
//! - [`Group`]: a process group over it, `ProcessGroupGloo` for CPU tensors or
//!   `ProcessGroupNCCL` for CUDA tensors: point-to-point send/recv and all-reduce, every wait
//!   with a timeout;
//! - [`DistEnv`]: the torchrun-style environment (`RANK`, `WORLD_SIZE`, …) a rank runs in.
//!
//! Every C++ exception comes back as a [`DistError`] naming the rank, the peer and the
//! operation. Without Gloo's headers at build time (Debian's `libgloo-dev`) the crate still
//! builds and every call fails with an error that says what is missing.
//!
//! ```no_run
//! use std::time::Duration;
//! use sid_dist::{Backend, Group, Store};
//! use tch::{Device, Kind, Tensor};
//!
//! // Rank 0 of two, on one machine (rank 1 runs the same with `rank = 1`).
//! let rank = 0;
//! let timeout = Duration::from_secs(30);
//! let store = Store::connect("127.0.0.1", 29500, rank == 0, 2, timeout)?;
//! let group = Group::new(&store, "world", rank, 2, Backend::Gloo, "127.0.0.1", timeout)?;
//! let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
//! group.all_reduce_sum(&mut t)?; // now 2.0 everywhere
//! # Ok::<(), sid_dist::DistError>(())
//! ```

mod env;
mod error;
mod ffi;

use std::ffi::CString;
use std::time::Duration;

use tch::Tensor;

use ffi::{c_char, c_int, call, GroupOp};

pub use env::DistEnv;
pub use error::{DistError, Result};

/// Which c10d backend a group uses; the value is the shim's code for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors, TCP.
    Gloo = 0,
    /// NCCL: CUDA tensors.
    Nccl = 1,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Gloo => "gloo",
            Self::Nccl => "nccl",
        })
    }
}

/// Whether this build has c10d at all (Gloo), and NCCL.
pub fn available() -> (bool, bool) {
    // SAFETY: no arguments; only called where the shim exists.
    let nccl = cfg!(sid_c10d) && unsafe { ffi::sid_c10d_has_nccl() } == 1;
    (cfg!(sid_c10d), nccl)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// libtorch's `TCPStore`: a key-value store served by rank 0 (or torchrun's agent) that every
/// rank connects to.
pub struct Store {
    ptr: *mut ffi::SidStore,
    addr: String,
}

// SAFETY: TCPStore serialises its client operations internally; the pointer is owned.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// Serves the store at `host:port` (`serve`, rank 0) or connects to it, waiting up to
    /// `timeout` for the server.
    pub fn connect(
        host: &str,
        port: u16,
        serve: bool,
        world: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let addr = format!("{host}:{port}");
        let verb = if serve { "serving" } else { "connecting to" };
        let c_host = cstring(host)?;
        let mut ptr = std::ptr::null_mut();
        // Every c10d path starts here: apply `TORCH_CPP_LOG_LEVEL` to libtorch's log first (c10d
        // logs every retry to reach the store at WARNING, with a stack trace; `FATAL` keeps it
        // quiet).
        static LOGGING: std::sync::Once = std::sync::Once::new();
        // SAFETY: `call` runs this only in a build with the shim; a valid C string and
        // out-pointer.
        call(|e, n| unsafe {
            LOGGING.call_once(|| ffi::sid_c10d_init_logging());
            ffi::sid_store_new(
                c_host.as_ptr(),
                c_int::from(port),
                c_int::from(serve),
                world as c_int,
                millis(timeout),
                &mut ptr,
                e,
                n,
            )
        })
        .map_err(|cause| DistError::Rendezvous {
            what: format!("{verb} the store at {addr}"),
            cause,
        })?;
        Ok(Self { ptr, addr })
    }

    /// Sets `key`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        // SAFETY: valid pointers for the call's duration.
        self.op("set", key, |k, e, n| unsafe {
            ffi::sid_store_set(self.ptr, k, value.as_ptr(), value.len(), e, n)
        })
    }

    /// Waits up to `timeout` for `key` and returns its value.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let (mut out, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid pointers; the buffer is freed below.
        self.op("get", key, |k, e, n| unsafe {
            ffi::sid_store_get(self.ptr, k, millis(timeout), &mut out, &mut len, e, n)
        })?;
        // SAFETY: the shim allocated `len` bytes at `out`.
        let v = unsafe { std::slice::from_raw_parts(out, len) }.to_vec();
        unsafe { ffi::sid_bytes_free(out) };
        Ok(v)
    }

    /// Adds `value` to the counter `key` and returns the new count.
    pub fn add(&self, key: &str, value: i64) -> Result<i64> {
        let mut out = 0i64;
        // SAFETY: valid pointers.
        self.op("add", key, |k, e, n| unsafe {
            ffi::sid_store_add(self.ptr, k, value, &mut out, e, n)
        })?;
        Ok(out)
    }

    /// Runs the shim call `f` on `key`; a failure names the operation, the key and the store.
    fn op(
        &self,
        op: &str,
        key: &str,
        f: impl FnOnce(*const c_char, *mut c_char, usize) -> c_int,
    ) -> Result<()> {
        let k = cstring(key)?;
        call(|e, n| f(k.as_ptr(), e, n)).map_err(|cause| DistError::Store {
            op: format!("{op} {key:?} at {}", self.addr),
            cause,
        })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: owned pointer, freed once.
        unsafe { ffi::sid_store_free(self.ptr) };
    }
}

/// A c10d process group: `world` ranks, this one `rank`.
pub struct Group {
    ptr: *mut ffi::SidGroup,
    name: String,
    rank: usize,
    world: usize,
    backend: Backend,
    timeout: Duration,
}

// SAFETY: c10d backends are used from several threads in PyTorch too (each operation is
// enqueued under the backend's own locks); the pointer is owned.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Group {
    /// Joins the group `name` (its keys live under that prefix in the store): returns once
    /// all `world` ranks have joined, or fails after `timeout`. `hostname` is the address
    /// Gloo binds to (empty: the machine's own name).
    pub fn new(
        store: &Store,
        name: &str,
        rank: usize,
        world: usize,
        backend: Backend,
        hostname: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let prefix = cstring(name)?;
        let host = cstring(hostname)?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: valid pointers.
        call(|e, n| unsafe {
            ffi::sid_group_new(
                store.ptr,
                prefix.as_ptr(),
                rank as c_int,
                world as c_int,
                backend as c_int,
                host.as_ptr(),
                millis(timeout),
                &mut ptr,
                e,
                n,
            )
        })
        .map_err(|cause| DistError::Op {
            group: name.to_string(),
            rank,
            op: format!("joining the {backend} group of {world} ranks"),
            cause,
        })?;
        Ok(Self {
            ptr,
            name: name.to_string(),
            rank,
            world,
            backend,
            timeout,
        })
    }

    /// This rank within the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs the shim's `op` on `t` with `peer` (the destination or source) and `tag`, waiting
    /// at most `timeout`; a failure names the group, this rank and the operation, `what`.
    fn run(
        &self,
        what: impl FnOnce() -> String,
        op: GroupOp,
        t: &Tensor,
        peer: usize,
        tag: u32,
        timeout: Duration,
    ) -> Result<()> {
        // The shim never replaces the tensor behind the pointer, only writes into its storage.
        let t = t.as_ptr() as *mut ffi::T;
        let (peer, tag, ms) = (peer as c_int, tag as c_int, millis(timeout));
        let failed = |cause| DistError::Op {
            group: self.name.clone(),
            rank: self.rank,
            op: what(),
            cause,
        };
        // SAFETY: the tensor outlives the (waited) call; the shim writes into it in place.
        call(|e, len| unsafe { ffi::sid_group_op(self.ptr, op, t, peer, tag, ms, e, len) })
            .map_err(failed)
    }

    /// Sends a contiguous tensor to `dst`, waiting at most `timeout` for it to leave.
    pub fn send(&self, t: &Tensor, dst: usize, tag: u32, timeout: Duration) -> Result<()> {
        let what = || format!("send to rank {dst} (tag {tag})");
        self.run(what, GroupOp::Send, t, dst, tag, timeout)
    }

    /// Receives into `t` (contiguous, of the size sent) from `src`, waiting at most `timeout`.
    pub fn recv(&self, t: &mut Tensor, src: usize, tag: u32, timeout: Duration) -> Result<()> {
        let what = || format!("recv from rank {src} (tag {tag})");
        self.run(what, GroupOp::Recv, t, src, tag, timeout)
    }

    /// Sums `t` in place over every rank.
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        let what = || format!("all-reduce of {:?}", t.size());
        self.run(what, GroupOp::AllReduceSum, t, 0, 0, self.timeout)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: owned pointer, freed once.
        unsafe { ffi::sid_group_free(self.ptr) };
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| DistError::Env(format!("{s:?} contains a NUL byte")))
}
