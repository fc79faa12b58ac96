//! Links libtorch, and compiles `src/fused_adam.cpp` (libtorch's fused Adam kernel for Rust)
//! when libtorch's C++ headers are there. Without them the crate still builds and Adam runs
//! as separate tensor ops (same update, more kernel launches).

fn main() {
    sid_build::link_libtorch();
    println!("cargo::rustc-check-cfg=cfg(sid_fused_adam)");
    println!("cargo:rerun-if-changed=src/fused_adam.cpp");
    let Some((lib, torch)) = sid_build::libtorch_dirs() else {
        return;
    };
    let include = torch.join("include");
    if !include.join("ATen/ops/_fused_adam.h").exists() {
        println!("cargo:warning=fused Adam disabled (libtorch's C++ headers not found)");
        return;
    }
    cc::Build::new()
        .cpp(true)
        .file("src/fused_adam.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .opt_level(2)
        .warnings(false)
        .compile("sid_fused_adam");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
    println!("cargo:rustc-cfg=sid_fused_adam");
}
