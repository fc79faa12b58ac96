//! Links libtorch and compiles the c10d shim (src/c10d.cpp) against the headers of the pip
//! wheel. Gloo's own headers come from Debian's `libgloo-dev` (scripts/setup.sh installs it);
//! NCCL is compiled in when `nccl.h` and the CUDA headers (with CCCL's `nv/target`) are there.
//! Without Gloo's headers the crate still builds and every call says what is missing.

use std::path::{Path, PathBuf};

fn main() {
    sid_build::link_libtorch();
    println!("cargo::rustc-check-cfg=cfg(sid_c10d)");
    println!("cargo:rerun-if-changed=src/c10d.cpp");
    println!("cargo:rerun-if-env-changed=SID_GLOO_INCLUDE");
    let Some((lib, torch)) = sid_build::libtorch_dirs() else {
        return;
    };
    let include = torch.join("include");
    let gloo = [
        std::env::var("SID_GLOO_INCLUDE").ok().map(PathBuf::from),
        Some(PathBuf::from("/usr/include")),
        Some(PathBuf::from("/usr/local/include")),
    ]
    .into_iter()
    .flatten()
    .find(|d| d.join("gloo/config.h").exists());
    let have = |p: &Path| p.exists();
    let (Some(gloo), true) = (
        gloo,
        have(&include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp")),
    ) else {
        println!(
            "cargo:warning=c10d disabled: Gloo's headers not found (apt-get install libgloo-dev)"
        );
        return;
    };
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("src/c10d.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&gloo)
        .include(sid_build::shim_include())
        .flag("-std=c++17")
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false);
    // NCCL: its header from pip's nvidia-nccl, CUDA's (runtime, crt, CCCL) from pip's cu13.
    let nvidia = torch.parent().map(|p| p.join("nvidia"));
    let nccl = nvidia.as_ref().map(|n| n.join("nccl/include"));
    let cuda = sid_build::cuda_include(&torch);
    let nccl_ok = match (&nccl, &cuda) {
        (Some(n), Some(c)) => {
            n.join("nccl.h").exists()
                && c.join("nv/target").exists()
                && lib.join("libtorch_cuda.so").exists()
        }
        _ => false,
    };
    if nccl_ok {
        build
            .include(nccl.unwrap())
            .include(cuda.unwrap())
            .define("USE_C10D_NCCL", None);
        println!("cargo:rustc-link-lib=torch_cuda");
        println!("cargo:rustc-link-lib=c10_cuda");
    } else {
        println!("cargo:warning=c10d built without NCCL (nccl.h or CUDA/CCCL headers not found)");
    }
    build.compile("sid_c10d");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
    println!("cargo:rustc-cfg=sid_c10d");
}
