//! Who holds which memory: libtorch's allocations charged to owners (pipeline stages), each
//! with the bytes it holds now and its peak, on the CPU and on CUDA alike.
//!
//! A process-wide figure (RSS, or the CUDA allocator's peak of a device) cannot tell stages
//! that share a process or a GPU apart. libtorch's allocators report every allocation and
//! free to a thread-local reporter when one is installed (how `torch.profiler` measures
//! memory); [`AllocOwner::enter`] installs one that charges the thread's allocations to the
//! owner until the scope ends (autograd's device threads inherit it). A block is returned to
//! the owner that allocated it whichever thread frees it, as long as that thread is inside
//! some owner's scope; a block freed elsewhere stops counting when its address is handed out
//! again. Tensors made before an owner was entered (weights built on another thread) are not
//! charged to it: count them from the tensors themselves ([`tensor_bytes`]). While any owner
//! is entered, libtorch logs errors only: its CPU allocator warns when a tracked thread frees a
//! block made before tracking began, which is expected here.
//!
//! ```
//! use sid_telemetry::allocations::AllocOwner;
//! use tch::{Device, Kind, Tensor};
//!
//! let stage = AllocOwner::new().unwrap();
//! {
//!     let _scope = stage.enter().unwrap();
//!     let t = Tensor::zeros([1 << 20], (Kind::Float, Device::Cpu)); // 4 MiB
//!     assert!(stage.counts().held >= 4 << 20);
//!     drop(t);
//! }
//! let c = stage.counts();
//! assert!(c.held < 1 << 20 && c.peak >= 4 << 20);
//! ```

use std::ffi::c_char;
use std::marker::PhantomData;

use crate::TelemetryError;

sid_build::shim! {
    sid_alloc_owner;
    fn sid_alloc_owner_new(id: *mut u32, err: *mut c_char, err_len: usize) -> i32;
    fn sid_alloc_enter(id: u32, err: *mut c_char, err_len: usize) -> i32;
    fn sid_alloc_leave(err: *mut c_char, err_len: usize) -> i32;
    fn sid_alloc_counts(id: u32, held: *mut i64, peak: *mut i64);
    fn sid_alloc_reset_peak(id: u32);
}

/// Bytes an owner holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocCounts {
    /// Allocated by the owner and not yet freed.
    pub held: u64,
    /// The most it held since it was made or since [`AllocOwner::reset_peak`].
    pub peak: u64,
}

/// Something allocations are charged to; `Send`, so a stage thread can own it, and `Clone`: a
/// clone names the same owner (a coordinator keeps one to read a stage's figures).
#[derive(Debug, Clone)]
pub struct AllocOwner {
    id: u32,
}

/// While alive, the thread's libtorch allocations are charged to one owner. Not `Send`: it
/// must end on the thread that began it.
#[must_use = "allocations are charged only while the scope lives"]
pub struct OwnerScope(PhantomData<*const ()>);

/// Calls a shim function; a non-zero code becomes the C++ message.
fn call(f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), TelemetryError> {
    if !cfg!(sid_alloc_owner) {
        return Err(TelemetryError::AllocTracking(
            "this build has no allocation shim (libtorch's headers were not found)".into(),
        ));
    }
    sid_build::call_shim::<512>(f).map_err(TelemetryError::AllocTracking)
}

impl AllocOwner {
    /// A new owner, holding nothing.
    pub fn new() -> Result<Self, TelemetryError> {
        let mut id = 0u32;
        // SAFETY: a valid out-pointer and a buffer of `len` bytes; the shim catches every C++
        // exception.
        call(|err, len| unsafe { sid_alloc_owner_new(&mut id, err, len) })?;
        Ok(Self { id })
    }

    /// Charges this thread's allocations to this owner until the scope is dropped (scopes
    /// nest: the innermost wins).
    pub fn enter(&self) -> Result<OwnerScope, TelemetryError> {
        // SAFETY: a buffer of `len` bytes; the shim catches every C++ exception.
        call(|err, len| unsafe { sid_alloc_enter(self.id, err, len) })?;
        Ok(OwnerScope(PhantomData))
    }

    /// What the owner holds now and at its peak.
    pub fn counts(&self) -> AllocCounts {
        let (mut held, mut peak) = (0i64, 0i64);
        if cfg!(sid_alloc_owner) {
            // SAFETY: two valid out-pointers; the shim takes its lock and cannot throw.
            unsafe { sid_alloc_counts(self.id, &mut held, &mut peak) };
        }
        let (held, peak) = (held.max(0) as u64, peak.max(0) as u64);
        AllocCounts { held, peak }
    }

    /// Starts a new peak from what the owner holds now.
    pub fn reset_peak(&self) {
        if cfg!(sid_alloc_owner) {
            // SAFETY: plain integer argument; unknown ids are ignored by the shim.
            unsafe { sid_alloc_reset_peak(self.id) };
        }
    }
}

/// Bytes of `tensors`' elements: what an owner holds that it did not allocate itself (weights
/// built elsewhere and moved in).
pub fn tensor_bytes<'a>(tensors: impl IntoIterator<Item = &'a tch::Tensor>) -> u64 {
    tensors
        .into_iter()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum()
}

impl Drop for OwnerScope {
    fn drop(&mut self) {
        // SAFETY: this scope pushed the reporter this pops, on this thread (not `Send`).
        let _ = call(|err, len| unsafe { sid_alloc_leave(err, len) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    const MB: u64 = 1 << 20;

    #[test]
    fn allocations_in_a_scope_are_charged_to_its_owner_only() {
        let (a, b) = (AllocOwner::new().unwrap(), AllocOwner::new().unwrap());
        let outside = Tensor::zeros([MB as i64], (Kind::Float, Device::Cpu));
        let half = Tensor::zeros([3], (Kind::Half, Device::Cpu));
        assert_eq!(tensor_bytes([&outside, &half]), 4 * MB + 6);
        let t = {
            let _s = a.enter().unwrap();
            let t = Tensor::ones([MB as i64], (Kind::Float, Device::Cpu)); // 4 MiB
            {
                // Nested: b's scope wins while it lasts.
                let _s = b.enter().unwrap();
                let u = Tensor::ones([2 * MB as i64], (Kind::Float, Device::Cpu));
                assert!(b.counts().held >= 8 * MB);
                drop(u);
            }
            let c = a.counts();
            assert!(c.held >= 4 * MB && c.held < 5 * MB, "{c:?}");
            t
        };
        let c = b.counts();
        assert!(c.held < MB && c.peak >= 8 * MB, "{c:?}");
        drop(t);
        // A block made outside every scope and freed inside one is nobody's.
        {
            let _s = b.enter().unwrap();
            drop(outside);
        }
        assert!(b.counts().held < MB);
    }

    #[test]
    fn a_block_freed_on_another_owners_thread_returns_to_its_allocator() {
        let (a, b) = (AllocOwner::new().unwrap(), AllocOwner::new().unwrap());
        let t = {
            let _s = a.enter().unwrap();
            Tensor::ones([MB as i64], (Kind::Float, Device::Cpu))
        };
        assert!(a.counts().held >= 4 * MB);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _s = b.enter().unwrap();
                drop(t);
            });
        });
        assert!(a.counts().held < MB, "{:?}", a.counts());
        assert_eq!(b.counts().held, 0);
        a.reset_peak();
        assert!(a.counts().peak < MB);
    }

    #[test]
    fn a_backward_pass_is_charged_to_the_scope_it_runs_in() {
        let owner = AllocOwner::new().unwrap();
        let w = Tensor::randn([512, 512], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([256, 512], (Kind::Float, Device::Cpu));
        {
            let _s = owner.enter().unwrap();
            let loss = x.matmul(&w).relu().sum(Kind::Float);
            loss.backward();
        }
        // The gradient (1 MiB) stays with the owner; the activations (0.5 MiB each) came and went.
        let c = owner.counts();
        assert!(c.held >= MB && c.held < 2 * MB, "{c:?}");
        assert!(c.peak >= c.held + MB / 2, "{c:?}");
    }
}
