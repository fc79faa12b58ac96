//! Links libtorch and compiles three small C++ shims when their headers are there:
//! - `src/fused_adam.cpp`, libtorch's fused Adam kernel (needs libtorch's C++ headers; without
//!   them Adam runs as separate tensor ops: same update, more kernel launches);
//! - `src/autocast.cpp`, bfloat16 autocast for `--precision bf16` (libtorch's C++ headers;
//!   without them bf16 is refused);
//! - `src/cuda_graph.cpp`, libtorch's CUDA graphs (needs CUDA's runtime headers too, from pip's
//!   nvidia packages, which scripts/setup.sh installs; without them `--cuda-graph` reports that
//!   this build has no CUDA graphs).

fn main() {
    sid_build::link_libtorch();
    println!("cargo::rustc-check-cfg=cfg(sid_fused_adam)");
    println!("cargo::rustc-check-cfg=cfg(sid_cuda_graph)");
    println!("cargo::rustc-check-cfg=cfg(sid_autocast)");
    println!("cargo:rerun-if-changed=src/fused_adam.cpp");
    println!("cargo:rerun-if-changed=src/autocast.cpp");
    println!("cargo:rerun-if-changed=src/cuda_graph.cpp");
    let Some((lib, torch)) = sid_build::libtorch_dirs() else {
        return;
    };
    let include = torch.join("include");
    if !include.join("ATen/ops/_fused_adam.h").exists() {
        println!(
            "cargo:warning=fused Adam and CUDA graphs disabled (libtorch's C++ headers not found)"
        );
        return;
    }
    let build = |file: &str| {
        let mut b = cc::Build::new();
        b.cpp(true)
            .file(file)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .include(sid_build::shim_include())
            .flag("-std=c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .opt_level(2)
            .warnings(false);
        b
    };
    build("src/fused_adam.cpp").compile("sid_fused_adam");
    build("src/autocast.cpp").compile("sid_autocast");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
    println!("cargo:rustc-cfg=sid_fused_adam");
    println!("cargo:rustc-cfg=sid_autocast");
    match sid_build::cuda_include(&torch) {
        Some(cuda) if lib.join("libtorch_cuda.so").exists() => {
            build("src/cuda_graph.cpp")
                .include(cuda)
                .compile("sid_cuda_graph");
            println!("cargo:rustc-link-lib=torch_cuda");
            println!("cargo:rustc-link-lib=c10_cuda");
            println!("cargo:rustc-cfg=sid_cuda_graph");
        }
        _ => println!(
            "cargo:warning=CUDA graphs disabled (CUDA headers or libtorch_cuda.so not found)"
        ),
    }
}
