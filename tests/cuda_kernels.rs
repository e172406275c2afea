//! Every CUDA kernel (and the cuBLASLt / cuDNN wrappers) against the CPU reference in `derma::ops`, through the
//! same comparisons `derma check` runs: one test per op family, fresh random inputs (the seed is printed), outputs
//! poisoned with NaN before each launch, every element compared. Without a usable GPU each test prints
//! "SKIPPED (no CUDA device): ..." and returns.

use derma::cuda::alloc::Block;
use derma::cuda::check::{Family, check_family, device_for_check, render_table};
use derma::cuda::{DeviceRequest, Gpu, Selected, probe};

/// The GPU when the driver, a device and the kernels are all there; otherwise prints why the test is skipped.
fn gpu(test: &str) -> Option<Gpu> {
    match device_for_check(&probe(), DeviceRequest::Cuda(0)) {
        Ok(info) => match Gpu::open(&Selected::Cuda(info)) {
            Ok(g) => Some(g),
            Err(e) => panic!("{test}: the probed GPU did not open: {e:#}"),
        },
        Err(e) => {
            // Written to the stderr handle directly: the test harness captures `println!`/`eprintln!` of passing
            // tests, and a skip must show in the run's output.
            let line = format!("SKIPPED (no CUDA device): {test}: {}\n", e.to_string().replace('\n', " "));
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            None
        }
    }
}

fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}

/// Runs one family's comparisons and fails on any mismatch, printing the whole table.
fn family(test: &str, f: Family) {
    let Some(g) = gpu(test) else { return };
    let seed = fresh_seed();
    println!("{test}: seed {seed} (replay: derma check --seed {seed} --family {})", f.name());
    let results = check_family(&g, f, seed).unwrap_or_else(|e| panic!("{test}: {e:#}"));
    print!("{}", render_table(&results));
    assert!(!results.is_empty(), "{test}: no comparisons ran");
    let failed: Vec<_> = results.iter().filter(|r| !r.pass).collect();
    assert!(
        failed.is_empty(),
        "{test}: {} of {} comparisons failed:\n{}",
        failed.len(),
        results.len(),
        render_table(&results)
    );
}

#[test]
fn cuda_elementwise() {
    family("cuda_elementwise", Family::Elementwise);
}

#[test]
fn cuda_batchnorm() {
    family("cuda_batchnorm", Family::Batchnorm);
}

#[test]
fn cuda_depthwise() {
    family("cuda_depthwise", Family::Depthwise);
}

#[test]
fn cuda_se() {
    family("cuda_se", Family::Se);
}

#[test]
fn cuda_dropout() {
    family("cuda_dropout", Family::Dropout);
}

#[test]
fn cuda_loss() {
    family("cuda_loss", Family::Loss);
}

#[test]
fn cuda_optim() {
    family("cuda_optim", Family::Optim);
}

#[test]
fn cuda_cublaslt_gemm() {
    family("cuda_cublaslt_gemm", Family::Gemm);
}

#[test]
fn cuda_cudnn_conv() {
    family("cuda_cudnn_conv", Family::Conv);
}

#[test]
fn cuda_too_short_buffers_are_refused_before_launch() {
    let Some(g) = gpu("cuda_too_short_buffers_are_refused_before_launch") else { return };
    use derma::cuda::kernels::{DevSlice, Unary};
    let (x, y) = (g.upload(&[1.0f32; 10]).unwrap(), g.upload(&[0.0f32; 10]).unwrap());
    // Blocks are rounded up to a size class: ask for more than the class holds.
    let n = x.len_bytes() / 4 + 1;
    assert!(g.kernels.unary::<f32>(&g.stream, Unary::Relu, DevSlice::of(&y), DevSlice::of(&x), n).is_err());
}

#[test]
fn cuda_allocator_steady_state_on_device() {
    let Some(g) = gpu("cuda_allocator_steady_state_on_device") else { return };
    let sizes = [1usize << 20, 12345, 77, 3 << 20];
    for _ in 0..4 {
        let blocks: Vec<Block> = sizes.iter().map(|&b| g.alloc.alloc(b).unwrap()).collect();
        drop(blocks);
    }
    let st = g.alloc.stats();
    assert_eq!(st.raw_allocs, sizes.len() as u64, "{st:?}");
    assert_eq!(st.in_use, 0);
    g.alloc.set_context("batch size 1");
    let e = g.alloc.alloc(1 << 50).err().expect("a petabyte cannot be allocated").to_string();
    assert!(e.contains("batch size 1") && e.contains("asked for"), "{e}");
}
