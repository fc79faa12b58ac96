//! torch.distributed's c10d for sid, through a small C++ shim (`src/c10d.cpp`):
//! - [`Store`]: libtorch's `TCPStore`, the rendezvous every rank connects to;
//! - [`Group`]: a process group over it, `ProcessGroupGloo` for CPU tensors or
//!   `ProcessGroupNCCL` for CUDA tensors: point-to-point send/recv, all-reduce, broadcast,
//!   gather and barrier, every wait with a timeout;
//! - [`DistEnv`]: the torchrun-style environment (`RANK`, `WORLD_SIZE`, …) a rank runs in.
//!
//! Every C++ exception comes back as a [`DistError`] naming the rank, the peer and the
//! operation. Without Gloo's headers at build time (Debian's `libgloo-dev`) the crate still
//! builds and every constructor returns [`DistError::Unavailable`].
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

pub use env::DistEnv;
pub use error::{DistError, Result};

/// Which c10d backend a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors, TCP.
    Gloo,
    /// NCCL: CUDA tensors.
    Nccl,
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
    ffi::available()
}

/// Applies `TORCH_CPP_LOG_LEVEL` to libtorch's log, once, before the first c10d call (c10d
/// logs every retry to reach the store at WARNING, with a stack trace; `FATAL` keeps it quiet).
fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(ffi::init_logging);
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// libtorch's `TCPStore`: a key-value store served by rank 0 (or torchrun's agent) that every
/// rank connects to.
pub struct Store {
    ptr: ffi::StorePtr,
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
        let what = if serve {
            format!("serving the store at {addr}")
        } else {
            format!("connecting to the store at {addr}")
        };
        let c_host = cstring(host)?;
        init_logging();
        let ptr = ffi::store_new(&c_host, port, serve, world, millis(timeout))
            .map_err(|cause| DistError::Rendezvous { what, cause })?;
        Ok(Self { ptr, addr })
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sets `key`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = cstring(key)?;
        ffi::store_set(&self.ptr, &k, value).map_err(|cause| self.failed("set", key, cause))
    }

    /// Waits up to `timeout` for `key` and returns its value.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let k = cstring(key)?;
        ffi::store_get(&self.ptr, &k, millis(timeout))
            .map_err(|cause| self.failed("get", key, cause))
    }

    /// Adds `value` to the counter `key` and returns the new count.
    pub fn add(&self, key: &str, value: i64) -> Result<i64> {
        let k = cstring(key)?;
        ffi::store_add(&self.ptr, &k, value).map_err(|cause| self.failed("add", key, cause))
    }

    /// Whether `key` is set.
    pub fn check(&self, key: &str) -> Result<bool> {
        let k = cstring(key)?;
        ffi::store_check(&self.ptr, &k).map_err(|cause| self.failed("check", key, cause))
    }

    fn failed(&self, op: &str, key: &str, cause: String) -> DistError {
        DistError::Store {
            op: format!("{op} {key:?} at {}", self.addr),
            cause,
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        ffi::store_free(&mut self.ptr);
    }
}

/// A c10d process group: `world` ranks, this one `rank`.
pub struct Group {
    ptr: ffi::GroupPtr,
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
        let ptr = ffi::group_new(
            &store.ptr,
            &prefix,
            rank,
            world,
            backend,
            &host,
            millis(timeout),
        )
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

    /// The timeout of collectives.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn op(&self, op: String, cause: String) -> DistError {
        DistError::Op {
            group: self.name.clone(),
            rank: self.rank,
            op,
            cause,
        }
    }

    /// Sends a contiguous tensor to `dst`, waiting at most `timeout` for it to leave.
    pub fn send(&self, t: &Tensor, dst: usize, tag: u32, timeout: Duration) -> Result<()> {
        ffi::group_send(&self.ptr, t, dst, tag, millis(timeout))
            .map_err(|c| self.op(format!("send to rank {dst} (tag {tag})"), c))
    }

    /// Receives into `t` (contiguous, of the size sent) from `src`, waiting at most `timeout`.
    pub fn recv(&self, t: &mut Tensor, src: usize, tag: u32, timeout: Duration) -> Result<()> {
        ffi::group_recv(&self.ptr, t, src, tag, millis(timeout))
            .map_err(|c| self.op(format!("recv from rank {src} (tag {tag})"), c))
    }

    /// Sums `t` in place over every rank.
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        ffi::group_allreduce(&self.ptr, t, millis(self.timeout))
            .map_err(|c| self.op(format!("all-reduce of {:?}", t.size()), c))
    }

    /// Copies `t` from `root` to every rank.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        ffi::group_broadcast(&self.ptr, t, root, millis(self.timeout))
            .map_err(|c| self.op(format!("broadcast from rank {root}"), c))
    }

    /// Gathers `t` (the same shape on every rank) to `root`: there, one tensor per rank.
    pub fn gather(&self, t: &Tensor, root: usize) -> Result<Vec<Tensor>> {
        let outs: Vec<Tensor> = if self.rank == root {
            (0..self.world).map(|_| t.empty_like()).collect()
        } else {
            Vec::new()
        };
        ffi::group_gather(&self.ptr, t, &outs, root, millis(self.timeout))
            .map_err(|c| self.op(format!("gather to rank {root}"), c))?;
        Ok(outs)
    }

    /// Waits until every rank reaches the barrier.
    pub fn barrier(&self) -> Result<()> {
        ffi::group_barrier(&self.ptr, millis(self.timeout))
            .map_err(|c| self.op("barrier".into(), c))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        ffi::group_free(&mut self.ptr);
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| DistError::Env(format!("{s:?} contains a NUL byte")))
}
