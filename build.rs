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
        return;
    };
    println!("cargo:rustc-env=CLIPCAP_LIBTORCH_LIB={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    }
}
