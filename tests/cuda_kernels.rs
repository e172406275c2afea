//! Every CUDA kernel (and the cuBLASLt / cuDNN wrappers) against the CPU reference in `derma::ops`, through the
//! same comparisons `derma check` runs: one test per op family, fresh random inputs (the seed is printed), outputs
//! poisoned with NaN and fenced by canaries, every element compared.
//!
//! Each test body runs on every device this machine has: the emulated device (kernels/*.cu compiled for the host)
//! under two thread schedules, so a missing barrier or a race between lanes that one order hides shows under the
//! other, and the first CUDA GPU when one is usable.

use derma::cuda::alloc::Block;
use derma::cuda::{DeviceRequest, Gpu, Schedule, probe};
use derma::tools::check::{Family, check_family, device_for_check, render_table};

/// The thread schedules the emulated device runs every test under.
const SCHEDULES: [Schedule; 2] = [Schedule::WarpReverse, Schedule::Random];

fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}

/// Runs `body` on every available device: the emulated device once per schedule in [`SCHEDULES`] (the schedule is
/// set for this test's thread), then the first GPU if one is usable. A device that is there but does not open is
/// a failure, not a skip.
fn on_every_device(test: &str, mut body: impl FnMut(&Gpu, &str, u64)) {
    let seed = fresh_seed();
    let emu = Gpu::emulated().unwrap_or_else(|e| panic!("{test}: the emulated device did not open: {e:#}"));
    for schedule in SCHEDULES {
        emu.set_schedule(schedule, seed).unwrap_or_else(|e| panic!("{test}: {e:#}"));
        let label = format!("emu (schedule {})", schedule.name());
        body(&emu, &label, seed);
    }
    match device_for_check(&probe(), DeviceRequest::Cuda(0)) {
        Ok(sel) => {
            let gpu = Gpu::open(&sel).unwrap_or_else(|e| panic!("{test}: the probed GPU did not open: {e:#}"));
            let label = format!("cuda:0 ({})", gpu.info.name);
            body(&gpu, &label, seed);
        }
        Err(e) => println!("{test}: ran on the emulated device only ({})", e.to_string().replace('\n', " ")),
    }
}

/// Runs one family's comparisons on every device and fails on any mismatch, printing the whole table.
fn family(test: &str, f: Family) {
    on_every_device(test, |g, device, seed| {
        println!("{test} on {device}: seed {seed} (replay: derma check --seed {seed} --family {})", f.name());
        let results = check_family(g, f, seed).unwrap_or_else(|e| panic!("{test} on {device}: {e:#}"));
        print!("{}", render_table(&results));
        assert!(!results.is_empty(), "{test} on {device}: no comparisons ran");
        let failed: Vec<_> = results.iter().filter(|r| !r.pass).collect();
        assert!(
            failed.is_empty(),
            "{test} on {device}: {} of {} comparisons failed (seed {seed}):\n{}",
            failed.len(),
            results.len(),
            render_table(&results)
        );
    });
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
fn cuda_linear() {
    family("cuda_linear", Family::Linear);
}

#[test]
fn cuda_cudnn_conv() {
    family("cuda_cudnn_conv", Family::Conv);
}

#[test]
fn cuda_too_short_buffers_are_refused_before_launch() {
    use derma::cuda::kernels::DevSlice;
    use derma::ops::activation::Unary;
    on_every_device("cuda_too_short_buffers_are_refused_before_launch", |g, device, _| {
        let (x, y) = (g.upload(&[1.0f32; 10]).unwrap(), g.upload(&[0.0f32; 10]).unwrap());
        // Blocks are rounded up to a size class: ask for more than the class holds.
        let n = x.len_bytes() / 4 + 1;
        let e = g.kernels.unary::<f32>(&g.stream, Unary::Relu, DevSlice::of(&y), DevSlice::of(&x), n);
        let e = e.expect_err(device).to_string();
        assert!(e.contains("unary y") && e.contains("bytes"), "{device}: {e}");
        // Nothing was launched: y still holds its zeros.
        assert_eq!(g.download::<f32>(&y, 10).unwrap(), vec![0.0; 10], "{device}");
    });
}

#[test]
fn cuda_allocator_steady_state_on_device() {
    on_every_device("cuda_allocator_steady_state_on_device", |g, device, _| {
        let before = g.alloc.stats().raw_allocs;
        let sizes = [1usize << 20, 12345, 77, 3 << 20];
        for _ in 0..4 {
            let blocks: Vec<Block> = sizes.iter().map(|&b| g.alloc.alloc(b).unwrap()).collect();
            // Device memory is aligned as cudaMalloc aligns it.
            assert!(blocks.iter().all(|b| b.addr() % 256 == 0), "{device}");
            drop(blocks);
        }
        let st = g.alloc.stats();
        assert!(st.raw_allocs - before <= sizes.len() as u64, "{device}: {st:?}");
        assert_eq!(st.in_use, 0, "{device}");
        g.alloc.set_context("batch size 1");
        let e = g.alloc.alloc(1 << 50).err().expect("a petabyte cannot be allocated").to_string();
        assert!(e.contains("batch size 1") && e.contains("asked for"), "{device}: {e}");
    });
}

#[test]
fn cuda_copies_round_trip() {
    on_every_device("cuda_copies_round_trip", |g, device, _| {
        let host: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let a = g.upload(&host).unwrap();
        let b = g.zeros(4000).unwrap();
        assert_eq!(g.download::<f32>(&b, 1000).unwrap(), vec![0.0; 1000], "{device}: zeros");
        g.copy(&b, &a, 4000).unwrap();
        assert_eq!(g.download::<f32>(&b, 1000).unwrap(), host, "{device}: device-to-device copy");
        g.write(&b, 8, &[42.0f32, 43.0]).unwrap();
        let mut two = [0.0f32; 3];
        g.read(&b, 4, &mut two).unwrap();
        assert_eq!(two, [host[1], 42.0, 43.0], "{device}: copies at an offset");
        assert!(g.write(&b, 3999, &[1.0f32]).is_err(), "{device}: a write past the block is refused");
        assert!(g.download::<f32>(&b, 1001).is_err(), "{device}: a read past the block is refused");
    });
}

#[test]
fn cuda_restrict_kernels_refuse_in_place_calls() {
    use derma::cuda::kernels::DevSlice;
    use derma::ops::activation::Unary;
    on_every_device("cuda_restrict_kernels_refuse_in_place_calls", |g, device, _| {
        let host: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        let a = g.upload(&host).unwrap();
        let whole = DevSlice::of(&a);
        let refused = |r: anyhow::Result<()>, what: &str| {
            let e = r.expect_err(what).to_string();
            assert!(e.contains("__restrict__") && e.contains("overlaps"), "{device}: {what}: {e}");
        };
        refused(g.kernels.unary::<f32>(&g.stream, Unary::Silu, whole, whole, 64), "silu in place");
        refused(g.kernels.scale::<f32>(&g.stream, whole, whole, 2.0, 64, true), "axpy onto itself");
        // A partial overlap (the output starts inside the input) is refused too.
        let lo = DevSlice::range(&a, 0, 128).unwrap();
        let hi = DevSlice::range(&a, 64, 128).unwrap();
        refused(g.kernels.add::<f32>(&g.stream, hi, lo, lo, 32), "add into an overlapping range");
        refused(g.kernels.dropout::<f32>(&g.stream, hi, lo, 0.5, 1, 32), "dropout into an overlapping range");
        // Nothing ran: the buffer is unchanged.
        assert_eq!(g.download::<f32>(&a, 64).unwrap(), host, "{device}");
        // Adjacent, non-overlapping halves are fine.
        let (first, second) = (DevSlice::range(&a, 0, 128).unwrap(), DevSlice::range(&a, 128, 128).unwrap());
        g.kernels.unary::<f32>(&g.stream, Unary::Relu, second, first, 32).unwrap();
        let got = g.download::<f32>(&a, 64).unwrap();
        assert_eq!(got[32..], host[..32].iter().map(|v| v.max(0.0)).collect::<Vec<_>>()[..], "{device}");
        // amp_unscale runs in place by design (the f32 gradients unscaled where they are).
        use derma::train::adamw::cuda::ScalerState;
        let cfg = derma::train::scaler::GradScalerConfig { init_scale: 2.0, ..Default::default() };
        let state = g.upload(&[ScalerState::new(&cfg)]).unwrap();
        g.kernels.amp_unscale(&g.stream, whole, DevSlice::of(&state), 64).unwrap();
        assert_eq!(g.download::<f32>(&a, 1).unwrap()[0], host[0] * 0.5, "{device}");
    });
}
