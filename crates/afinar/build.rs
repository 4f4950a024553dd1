//! With the `cuda` feature: compile afinar's kernels (src/nn/cuda_kernels.cu) to PTX with nvcc.
//! Without it: nothing. See scripts/build-cuda.sh for the toolchain.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let src = "src/nn/cuda_kernels.cu";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=AFINAR_CUDA_ARCH");
    let nvcc = match std::env::var("CUDA_HOME") {
        Ok(h) => format!("{h}/bin/nvcc"),
        Err(_) => "nvcc".to_string(),
    };
    // PTX for compute_80 runs on every GPU from Ampere on (the driver compiles it for the card).
    let arch = std::env::var("AFINAR_CUDA_ARCH").unwrap_or_else(|_| "compute_80".into());
    let out = format!("{}/afinar_kernels.ptx", std::env::var("OUT_DIR").unwrap());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch={arch}"), src, "-o", &out])
        .status()
        .unwrap_or_else(|e| {
            panic!("cuda feature: cannot run {nvcc}: {e} (see scripts/build-cuda.sh)")
        });
    assert!(status.success(), "cuda feature: {nvcc} failed on {src}");
}
