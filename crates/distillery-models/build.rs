//! With the `cuda` feature: compiles `kernels/*.cu` to PTX in `OUT_DIR` with nvcc (`$NVCC`, else
//! `$CUDA_ROOT/bin/nvcc`, else `nvcc` on `PATH`) for compute capability `$CUDA_COMPUTE_CAP`
//! (default 80; the driver compiles the PTX for newer GPUs when it loads it). Without the feature
//! it does nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["adamw", "batchnorm", "depthwise", "epilogue"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_ROOT", "CUDA_COMPUTE_CAP"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("CUDA_ROOT")
            .map(|root| PathBuf::from(root).join("bin/nvcc"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("nvcc"))
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: u32 = cap.trim().parse().unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP: `{cap}` is not a number"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in KERNELS {
        let src = format!("kernels/{name}.cu");
        println!("cargo::rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("running {} for {src}: {e} (set NVCC or CUDA_ROOT)", nvcc.display()));
        assert!(status.success(), "{} failed on {src} ({status})", nvcc.display());
    }
}
