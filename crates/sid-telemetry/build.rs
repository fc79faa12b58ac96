//! Links libtorch, and compiles a small C++ shim for the CUDA caching allocator's statistics
//! when the headers it needs are there (libtorch's, and CUDA's from pip's nvidia-cuda-runtime
//! and nvidia-cuda-crt, which scripts/setup.sh installs). Without them the crate still builds;
//! GPU peak memory then falls back to NVML's per-process figure. The per-owner allocation
//! accounting (`alloc_owner.cpp`) needs libtorch's headers only.

use std::path::Path;

fn main() {
    sid_build::link_libtorch();
    println!("cargo::rustc-check-cfg=cfg(sid_cuda_stats)");
    println!("cargo::rustc-check-cfg=cfg(sid_alloc_owner)");
    println!("cargo:rerun-if-changed=src/cuda_stats.cpp");
    println!("cargo:rerun-if-changed=src/alloc_owner.cpp");
    let Some((lib, torch)) = sid_build::libtorch_dirs() else {
        return;
    };
    let include = torch.join("include");
    if include.join("c10/util/ThreadLocalDebugInfo.h").exists() {
        cc::Build::new()
            .cpp(true)
            .file("src/alloc_owner.cpp")
            .include(&include)
            .include(sid_build::shim_include())
            .flag("-std=c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .warnings(false)
            .compile("sid_alloc_owner");
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-lib=c10");
        println!("cargo:rustc-cfg=sid_alloc_owner");
    } else {
        println!("cargo:warning=per-stage memory accounting disabled (libtorch headers not found)");
    }
    let cuda = sid_build::cuda_include(&torch);
    let have = |p: &Path| p.exists();
    let (Some(cuda), true, true) = (
        cuda,
        have(&include.join("c10/cuda/CUDACachingAllocator.h")),
        have(&lib.join("libc10_cuda.so")),
    ) else {
        println!("cargo:warning=CUDA allocator statistics disabled (CUDA headers or libc10_cuda.so not found)");
        return;
    };
    cc::Build::new()
        .cpp(true)
        .file("src/cuda_stats.cpp")
        .include(&include)
        .include(sid_build::shim_include())
        .include(include.join("torch/csrc/api/include"))
        .include(&cuda)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("sid_cuda_stats");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=c10_cuda");
    println!("cargo:rustc-link-lib=c10");
    println!("cargo:rustc-cfg=sid_cuda_stats");
}
