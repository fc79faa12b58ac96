//! Build-script helper shared by every crate that links libtorch, and the Rust side of the C++
//! shims' convention (`include/sid_shim.h`): [`shim!`] declares a shim's functions and
//! [`call_shim`] turns a failed call into the C++ exception's message.
//!
//! rustc links with `--as-needed`, so a binary that calls no CUDA symbol directly would drop
//! `libtorch_cuda.so` and `tch::Cuda::is_available()` would be false on a GPU machine. A
//! `rustc-link-arg` only applies to the package whose build script emits it, so each package
//! that builds binaries, tests or examples calls [`link_libtorch`] from its own `build.rs`
//! (and depends on `torch-sys` directly, the only way to see `DEP_TCH_LIBTORCH_LIB`).

use std::ffi::{c_char, c_int, CStr};
use std::path::{Path, PathBuf};

/// Emits the link arguments: `--no-as-needed -ltorch` and an rpath to libtorch's lib folder,
/// so binaries use CUDA when present and run without `LD_LIBRARY_PATH`.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{dir}");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}

/// libtorch's lib folder and the torch package folder above it (whose `include/` holds the
/// C++ headers), with links resolved so that siblings such as pip's `nvidia/` are found.
/// `None` when `DEP_TCH_LIBTORCH_LIB` is not visible (see the crate docs).
pub fn libtorch_dirs() -> Option<(PathBuf, PathBuf)> {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok()?;
    let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.into());
    let torch = lib.parent()?.to_path_buf();
    Some((lib, torch))
}

/// The CUDA runtime headers next to libtorch (pip's `nvidia/cu13/include`, which
/// scripts/setup.sh installs), `SID_CUDA_INCLUDE`, or `/usr/local/cuda/include`; `None` when
/// none has both `cuda_runtime_api.h` and `crt/host_defines.h`.
pub fn cuda_include(torch: &Path) -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=SID_CUDA_INCLUDE");
    [
        std::env::var("SID_CUDA_INCLUDE").ok().map(PathBuf::from),
        torch.parent().map(|p| p.join("nvidia/cu13/include")),
        Some("/usr/local/cuda/include".into()),
    ]
    .into_iter()
    .flatten()
    .find(|d| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_defines.h").exists())
}

/// The folder of `sid_shim.h`, which every C++ shim includes (`sid::guarded`: a C++ exception
/// becomes an error code and its message, never an unwinding into Rust); also tells cargo to
/// rebuild when the header changes.
pub fn shim_include() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let header = dir.join("sid_shim.h");
    println!("cargo:rerun-if-changed={}", header.display());
    dir
}

/// Declares a C++ shim's functions: `extern "C"` where the build script compiled the shim and
/// set the cfg `$cfg`, otherwise stand-ins of the same type that nothing reaches, since every
/// caller checks `cfg!($cfg)` first.
#[macro_export]
macro_rules! shim {
    ($cfg:ident; $(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        #[cfg($cfg)]
        extern "C" {
            $(pub(crate) fn $name($($arg: $ty),*) $(-> $ret)?;)*
        }
        $(
            #[cfg(not($cfg))]
            #[allow(unused_variables, clippy::too_many_arguments)]
            pub(crate) unsafe extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
                unreachable!(concat!("no ", stringify!($cfg), " shim in this build"))
            }
        )*
    };
}

/// Runs the shim call `f` with an error buffer of `N` bytes (`sid::guarded`'s convention): 0
/// is success, anything else comes back as the exception's message.
pub fn call_shim<const N: usize>(
    f: impl FnOnce(*mut c_char, usize) -> c_int,
) -> Result<(), String> {
    let mut err = [0 as c_char; N];
    if f(err.as_mut_ptr(), N) == 0 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates what it writes; the buffer starts zeroed.
    let message = unsafe { CStr::from_ptr(err.as_ptr()) };
    Err(message.to_string_lossy().into_owned())
}
