//! Makes every binary we build find libtorch without `LD_LIBRARY_PATH`, and keeps CUDA on.
//!
//! tch links libtorch dynamically but sets no rpath, and the default `--as-needed` linker
//! mode drops `libtorch_cuda.so` (no symbol of ours references it directly), which silently
//! leaves `tch::Cuda::is_available()` false on a GPU host.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // torch-sys declares `links = "tch"`, so its `cargo:libtorch_lib=` reaches us as DEP_TCH_*.
    let lib = ["DEP_TCH_LIBTORCH_LIB", "DEP_TORCH_SYS_LIBTORCH_LIB"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .map(PathBuf::from);
    let Some(lib) = lib else {
        println!("cargo:warning=torch-sys did not report its libtorch folder; no rpath set");
        println!("cargo:rustc-check-cfg=cfg(clipcap_int8)");
        return;
    };
    println!("cargo:rustc-env=CLIPCAP_LIBTORCH_LIB={}", lib.display());
    build_int8_shim(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    }
}

/// Builds the C++ shims in `src/model/` (`int8.cpp`: int8 linear layers through PyTorch's
/// quantized ops; `int8_gemm.cpp`: our own int8 GEMM with its neighbours fused;
/// `attention.cpp`: one-query attention for CPU decoding; `row_topk.cpp`: beam candidates;
/// `row_sample.cpp`: sampling's top-k, nucleus and draw; `pool.cpp`: the threads they share;
/// `src/device.cpp`: CUDA memory and side streams) against the headers of the libtorch in
/// `lib`, with the C++ ABI libtorch was built with.
fn build_int8_shim(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/model/int8.cpp");
    println!("cargo:rerun-if-changed=src/model/int8_gemm.cpp");
    println!("cargo:rerun-if-changed=src/model/attention.cpp");
    println!("cargo:rerun-if-changed=src/model/row_topk.cpp");
    println!("cargo:rerun-if-changed=src/model/row_sample.cpp");
    println!("cargo:rerun-if-changed=src/model/shim.h");
    println!("cargo:rerun-if-changed=src/model/pool.h");
    println!("cargo:rerun-if-changed=src/model/pool.cpp");
    println!("cargo:rerun-if-changed=src/device.cpp");
    println!("cargo:rustc-check-cfg=cfg(clipcap_int8)");
    let include = lib.parent().map(|torch| torch.join("include"));
    let Some(include) = include.filter(|i| i.join("ATen/ATen.h").exists()) else {
        println!(
            "cargo:warning=no libtorch headers beside {}: --dtype int8 is unavailable",
            lib.display()
        );
        return;
    };
    // libc10's symbols say which std::string ABI libtorch uses.
    let abi = std::fs::read(lib.join("libc10.so"))
        .map(|b| b.windows(7).any(|w| w == b"__cxx11"))
        .unwrap_or(true);
    cc::Build::new()
        .cpp(true)
        .file("src/model/int8.cpp")
        .file("src/model/int8_gemm.cpp")
        .file("src/model/attention.cpp")
        .file("src/model/row_topk.cpp")
        .file("src/model/row_sample.cpp")
        .file("src/model/pool.cpp")
        .file("src/device.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", if abi { "1" } else { "0" })
        .warnings(false)
        // O3: the attention kernel's loops are vectorized.
        .opt_level(3)
        .compile("clipcap_int8");
    // After the shim on the link line, so that its references to libtorch resolve.
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=clipcap_int8");
}
