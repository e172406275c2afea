//! The GPU data path on the emulated device (and on the first CUDA GPU when there is one): the fused augmentation
//! kernel against the CPU applier bit for bit, the epoch plan against the CPU loader, the device loader's batches
//! against the CPU loader's batches (resident, streamed from the host when the device is too small, and streamed
//! through the double buffer from a replayed step counter), and the `augment` family of `derma check`.

use std::sync::Arc;

use derma::cuda::kernels::DevSlice;
use derma::cuda::{DeviceRequest, Gpu, Schedule, probe};
use derma::data::augment::cuda::{AugShape, AugmentBatch, augment, partials_bytes};
use derma::data::augment::{self, AugConfig, AugParams};
use derma::data::device::{DeviceDataset, DeviceLoader, EpochPlan, Residency, UploadOptions};
use derma::data::loader::{Batch, Loader, LoaderConfig, VecSource};
use derma::ops::dropout::cuda::StepValues;
use derma::tools::check::{Family, check_family, device_for_check, render_table};
use half::f16;

fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}

/// The emulated device under two schedules, then the first GPU if one is usable.
fn on_every_device(test: &str, mut body: impl FnMut(&Gpu, &str, u64)) {
    let seed = fresh_seed();
    println!("{test}: seed {seed}");
    let emu = Gpu::emulated().unwrap_or_else(|e| panic!("{test}: the emulated device did not open: {e:#}"));
    for schedule in [Schedule::Random, Schedule::WarpReverse] {
        emu.set_schedule(schedule, seed).unwrap();
        body(&emu, &format!("emu ({})", schedule.name()), seed);
    }
    if let Ok(sel) = device_for_check(&probe(), DeviceRequest::Cuda(0)) {
        let gpu = Gpu::open(&sel).unwrap_or_else(|e| panic!("{test}: the probed GPU did not open: {e:#}"));
        body(&gpu, &format!("cuda:0 ({})", gpu.info.name), seed);
    }
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    (0..n as u64).map(|i| (derma::data::split_mix(seed ^ (i << 8)) >> 56) as u8).collect()
}

/// One streamed batch (no table) through the kernel; returns the output as f32 bits, or f16 bits widened.
fn run_kernel<T: derma::cuda::kernels::Elem + Default + Clone>(
    gpu: &Gpu,
    images: &[u8],
    params: &[AugParams],
    size: u32,
    out: u32,
    step: Option<i64>,
) -> Vec<T> {
    let b = params.len();
    let n = b * (out * out * 3) as usize;
    let images_d = gpu.upload(images).unwrap();
    let params_d = gpu.upload(bytemuck::cast_slice::<AugParams, u8>(params)).unwrap();
    let out_d = gpu.upload(&vec![T::default(); n]).unwrap();
    let partials = gpu.zeros(partials_bytes(b, out as usize)).unwrap();
    let step_d = gpu.upload(&[step.unwrap_or(0)]).unwrap();
    let a = AugmentBatch {
        out: DevSlice::of(&out_d),
        labels_out: None,
        images: DevSlice::of(&images_d),
        labels: None,
        table: None,
        params: DevSlice::of(&params_d),
        step: step.map(|_| DevSlice::of(&step_d)),
        partials: DevSlice::of(&partials),
        shape: AugShape {
            position0: 0,
            positions: b as i64,
            slots: b as i64,
            batch: if step.is_some() { 1 } else { b as i32 },
            size: size as i32,
            out_size: out as i32,
            pad_: 0,
        },
    };
    augment::<T>(&gpu.kernels, &gpu.stream, &a).unwrap();
    gpu.download::<T>(&out_d, if step.is_some() { n / b } else { n }).unwrap()
}

fn cpu(images: &[u8], params: &[AugParams], size: u32, out: u32) -> Vec<f32> {
    let (per_in, per_out) = ((size * size * 3) as usize, (out * out * 3) as usize);
    let mut want = vec![0f32; params.len() * per_out];
    for (k, (chunk, p)) in want.chunks_exact_mut(per_out).zip(params).enumerate() {
        augment::apply(&images[k * per_in..(k + 1) * per_in], size, out, p, chunk).unwrap();
    }
    want
}

#[test]
fn fused_kernel_equals_the_cpu_applier_bit_for_bit() {
    let strong = AugConfig { degrees: 45.0, scale: (0.2, 1.0), hue: 0.5, contrast: 0.6, ..AugConfig::default() };
    let cases = [(19u32, 13u32, 3usize, AugConfig::default()), (11, 27, 2, strong.clone()), (64, 31, 3, strong)];
    on_every_device("fused_kernel_equals_the_cpu_applier_bit_for_bit", |gpu, device, seed| {
        // On a GPU, arithmetic of the same IEEE operations is the same too, so the claim is the same everywhere.
        for (i, (size, out, b, cfg)) in cases.iter().enumerate() {
            let s = seed ^ i as u64;
            let images = random_bytes(s, b * (size * size * 3) as usize);
            let params: Vec<AugParams> = (0..*b as u64).map(|p| augment::draw(cfg, s, 1, p, *size, *size)).collect();
            let want = cpu(&images, &params, *size, *out);
            let got32 = run_kernel::<f32>(gpu, &images, &params, *size, *out, None);
            let bad = got32.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
            assert_eq!(bad, 0, "{device}: case {i}: {bad} of {} f32 values differ from the CPU applier", want.len());
            let got16 = run_kernel::<f16>(gpu, &images, &params, *size, *out, None);
            let bad = got16.iter().zip(&want).filter(|(g, w)| g.to_bits() != f16::from_f32(**w).to_bits()).count();
            assert_eq!(bad, 0, "{device}: case {i}: {bad} f16 values are not the CPU value rounded once");
        }
    });
}

#[test]
fn step_counter_selects_the_plan_position_and_past_the_plan_is_nan() {
    on_every_device("step_counter", |gpu, device, seed| {
        let (size, out) = (9u32, 7u32);
        let images = random_bytes(seed, 3 * (size * size * 3) as usize);
        let params: Vec<AugParams> =
            (0..3u64).map(|p| augment::draw(&AugConfig::default(), seed, 0, p, size, size)).collect();
        let want = cpu(&images, &params, size, out);
        let per = (out * out * 3) as usize;
        // With batch 1 and no table, step k reads position k and image slot 0 (streamed), so compare with the
        // CPU applier on image 0 under position k's parameters.
        for k in 0..3 {
            let got = run_kernel::<f32>(gpu, &images, &params, size, out, Some(k));
            let want_k = cpu(&images[..(size * size * 3) as usize], &params[k as usize..=k as usize], size, out);
            assert_eq!(got, want_k, "{device}: step {k}");
            if k == 0 {
                assert_eq!(got, want[..per].to_vec());
            }
        }
        let past = run_kernel::<f32>(gpu, &images, &params, size, out, Some(3));
        assert!(past.iter().all(|v| v.is_nan()), "{device}: a position past the plan must come out NaN");
    });
}

fn source(n: usize, size: usize, seed: u64) -> Arc<VecSource> {
    let images = (0..n).map(|i| random_bytes(seed ^ (i as u64 * 7919), size * size * 3)).collect();
    Arc::new(VecSource { size, images, labels: (0..n).map(|i| (i * 5) % 8).collect() })
}

fn train_loader(src: Arc<VecSource>, batch: usize, out: u32, seed: u64) -> Loader {
    let mut cfg = LoaderConfig::train(batch, out, seed);
    cfg.workers = 2;
    let n = src.images.len();
    // Items in a different order than the source, so plan positions, items and slots are all different numbers.
    Loader::new(src, (0..n).rev().collect(), cfg).unwrap()
}

#[test]
fn epoch_plan_is_the_cpu_loaders_order_and_parameters() {
    let seed = fresh_seed();
    let src = source(23, 10, seed);
    let loader = train_loader(src.clone(), 4, 8, seed);
    for epoch in [0u64, 3] {
        let plan = EpochPlan::new(&loader, epoch).unwrap();
        assert_eq!(plan.batches(), 5, "23 items in batches of 4: the last partial batch is dropped");
        assert_eq!(plan.order, loader.epoch_order(epoch)[..20].to_vec());
        let cfg = AugConfig::default();
        for (p, params) in plan.params.iter().enumerate() {
            assert_eq!(*params, augment::draw(&cfg, seed, epoch, p as u64, 10, 10), "epoch {epoch} position {p}");
        }
        // The plan reproduces the CPU loader's batches exactly.
        let batches: Vec<Batch> = loader.epoch(epoch).map(Result::unwrap).collect();
        for (bi, batch) in batches.iter().enumerate() {
            assert_eq!(batch.indices, plan.order[bi * 4..(bi + 1) * 4].to_vec());
            let imgs: Vec<u8> = batch.indices.iter().flat_map(|&i| src.images[i].clone()).collect();
            assert_eq!(batch.images, cpu(&imgs, &plan.params[bi * 4..(bi + 1) * 4], 10, 8), "batch {bi}");
        }
    }
    assert_ne!(EpochPlan::new(&loader, 0).unwrap(), EpochPlan::new(&loader, 1).unwrap());
    let eval = Loader::new(src, (0..23).collect(), LoaderConfig::eval(4, 8)).unwrap();
    let e = EpochPlan::new(&eval, 0).unwrap_err().to_string();
    assert!(e.contains("training loaders"), "{e}");
}

/// The device loader's batches of two epochs equal the CPU loader's (f32 bit for bit, f16 its rounding).
fn device_batches_equal_cpu(gpu: &Gpu, device: &str, seed: u64, want_resident: bool) {
    let src = source(40, 12, seed);
    let loader = train_loader(src.clone(), 3, 9, seed);
    let quiet = UploadOptions { quiet: true, chunk_bytes: 1000, ..UploadOptions::default() };
    for half in [false, true] {
        let data = DeviceDataset::upload(gpu, src.clone(), &quiet).unwrap();
        assert_eq!(matches!(data.residency(), Residency::Resident), want_resident, "{device}: {:?}", data.residency());
        let mut dl = if half {
            DeviceLoader::new::<f16>(gpu, loader.clone(), data).unwrap()
        } else {
            DeviceLoader::new::<f32>(gpu, loader.clone(), data).unwrap()
        };
        for epoch in [2u64, 5] {
            dl.begin_epoch(gpu, epoch).unwrap();
            let cpu_batches: Vec<Batch> = loader.epoch(epoch).map(Result::unwrap).collect();
            assert_eq!(cpu_batches.len(), 13);
            for (bi, want) in cpu_batches.iter().enumerate() {
                let n = want.images.len();
                let (got, labels) = if half {
                    let (o, l) = dl.batch::<f16>(gpu, bi).unwrap();
                    let got: Vec<f16> = gpu.download(o, n).unwrap();
                    let want16: Vec<u16> = want.images.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
                    assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want16, "{device} e{epoch} b{bi}");
                    (vec![], gpu.download::<i32>(l, 3).unwrap())
                } else {
                    let (o, l) = dl.batch::<f32>(gpu, bi).unwrap();
                    (gpu.download::<f32>(o, n).unwrap(), gpu.download::<i32>(l, 3).unwrap())
                };
                if !half {
                    assert_eq!(got, want.images, "{device}: epoch {epoch} batch {bi} differs from the CPU loader");
                }
                let want_labels: Vec<i32> = want.labels.iter().map(|&l| l as i32).collect();
                assert_eq!(labels, want_labels, "{device}: labels of epoch {epoch} batch {bi}");
            }
        }
        assert!(dl.batch::<f32>(gpu, 0).is_err() == half, "a loader for one element type refuses the other");
        assert!(dl.batch::<f32>(gpu, 13).is_err(), "batch past the epoch");
    }
}

#[test]
fn device_loader_resident_batches_equal_the_cpu_loader() {
    on_every_device("device_loader_resident", |gpu, device, seed| device_batches_equal_cpu(gpu, device, seed, true));
}

#[test]
fn too_small_a_device_streams_the_same_batches() {
    // 40 images of 12x12x3 are 17,280 bytes; a 16 KiB device keeps a quarter of its free memory back, so the
    // dataset stays on the host, while the loader's own buffers (about 8 KiB) still fit.
    let seed = fresh_seed();
    let gpu = Gpu::emulated_with_memory(Some(16 * 1024)).unwrap();
    gpu.set_schedule(Schedule::Random, seed).unwrap();
    device_batches_equal_cpu(&gpu, "emu (16 KiB)", seed, false);
    // The same dataset fits a larger one.
    let big = Gpu::emulated_with_memory(Some(1 << 20)).unwrap();
    device_batches_equal_cpu(&big, "emu (1 MiB)", seed, true);
}

/// A streamed dataset's batches through the double buffer in any order (slots refilled, prefetches discarded),
/// and from a device step counter inside a captured graph replayed step after step, as the GPU trainer runs them:
/// every batch equals the CPU loader's. Nothing waits on the host between steps (each output is copied aside on
/// the device and all are read at the end), so on a GPU the copies of later batches run while earlier steps still
/// compute, and a missing ordering between the two streams shows as a wrong batch. On the emulated device the copy
/// engine copies late (at the wait), so a step that does not wait for its batch's copy reads the slot's previous
/// batch (tried: dropping the wait in `prepare_step` fails this test and the one above).
#[test]
fn streamed_batches_in_any_order_and_from_a_replayed_step_counter() {
    on_every_device("streamed_batches", |gpu, device, seed| {
        // A GPU gets batches large enough (32 × 224², 4.8 MB a slot) for copies and kernels to overlap.
        let (n, side, batch, out) = if gpu.is_emulated() { (40, 12, 3, 9) } else { (420, 224, 32, 224) };
        streamed_case(gpu, device, seed, (n, side, batch, out));
    });
}

fn streamed_case(gpu: &Gpu, device: &str, seed: u64, (n, side, batch, out): (usize, usize, usize, u32)) {
    use derma::cuda::alloc::Block;
    let src = source(n, side, seed);
    let loader = train_loader(src.clone(), batch, out, seed);
    let opts = UploadOptions { quiet: true, keep_on_host: true, ..UploadOptions::default() };
    let data = DeviceDataset::upload(gpu, src.clone(), &opts).unwrap();
    assert!(matches!(data.residency(), Residency::Streaming { .. }), "{device}: {:?}", data.residency());
    let mut dl = DeviceLoader::new::<f32>(gpu, loader.clone(), data).unwrap();
    let batches = loader.batches_per_epoch();
    assert!(batches >= 13, "{device}: {batches} batches");
    let per = batch * (out * out * 3) as usize;
    // Copies each step's output aside on the compute stream, in step order; nothing syncs until `check_all`.
    let aside = |gpu: &Gpu, dl: &DeviceLoader| -> (Block, Block) {
        let (o, l) = dl.outputs();
        let (ko, kl) = (gpu.alloc.alloc(per * 4).unwrap(), gpu.alloc.alloc(batch * 4).unwrap());
        gpu.copy(&ko, o, per * 4).unwrap();
        gpu.copy(&kl, l, batch * 4).unwrap();
        (ko, kl)
    };
    let check_all = |gpu: &Gpu, kept: &[(usize, (Block, Block))], cpu: &[Batch], what: &str| {
        for (k, (o, l)) in kept {
            let want = &cpu[*k];
            let got = gpu.download::<f32>(o, per).unwrap();
            let bad = got.iter().zip(&want.images).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
            assert_eq!(bad, 0, "{device}: {what}: batch {k}: {bad} of {per} values differ from the CPU loader");
            let want_labels: Vec<i32> = want.labels.iter().map(|&l| l as i32).collect();
            assert_eq!(gpu.download::<i32>(l, batch).unwrap(), want_labels, "{device}: {what}: labels of batch {k}");
        }
    };

    // Host-indexed batches, out of order: repeats, same-parity neighbours, a jump back to the start.
    dl.begin_epoch(gpu, 4).unwrap();
    let cpu4: Vec<Batch> = loader.epoch(4).map(Result::unwrap).collect();
    let mut rng = derma::data::split_mix(seed);
    let mut order = vec![5usize, 2, 3, 3, 12, 0, 1, 7, 9, 11];
    for _ in 0..10 {
        rng = derma::data::split_mix(rng);
        order.push((rng % batches as u64) as usize);
    }
    let mut kept = Vec::new();
    for &k in &order {
        dl.batch::<f32>(gpu, k).unwrap();
        kept.push((k, aside(gpu, &dl)));
    }
    check_all(gpu, &kept, &cpu4, &format!("epoch 4 in the order {order:?}"));

    // A captured step: the batch from the step values' counter, then the counter's advance; replayed over two
    // epochs, one of them resumed mid-way at an odd step, each replay between prepare_step and step_issued.
    let values = gpu.zeros(size_of::<StepValues>()).unwrap();
    for (epoch, first) in [(6u64, 0usize), (7, 5)] {
        dl.begin_epoch(gpu, epoch).unwrap();
        let sv = StepValues { step: first as i64, seed, epoch, pad_: 0 };
        gpu.write(&values, 0, bytemuck::bytes_of(&sv)).unwrap();
        let graph = gpu
            .capture(|| {
                dl.batch_at_device_step::<f32>(gpu, DevSlice::of(&values))?;
                gpu.kernels.step_advance(&gpu.stream, DevSlice::of(&values))
            })
            .unwrap();
        let cpu: Vec<Batch> = loader.epoch(epoch).map(Result::unwrap).collect();
        let mut kept = Vec::new();
        for k in first..batches {
            dl.prepare_step(gpu, k).unwrap();
            graph.replay(gpu).unwrap();
            dl.step_issued(gpu, k).unwrap();
            kept.push((k, aside(gpu, &dl)));
        }
        check_all(gpu, &kept, &cpu, &format!("replayed epoch {epoch} from step {first}"));
    }
    assert!(dl.prepare_step(gpu, batches).is_err(), "{device}: a step past the epoch");
}

#[test]
fn augment_check_family_passes() {
    on_every_device("augment_check_family_passes", |gpu, device, seed| {
        let results = check_family(gpu, Family::Augment, seed).unwrap_or_else(|e| panic!("{device}: {e:#}"));
        print!("{}", render_table(&results));
        assert!(results.len() >= 10);
        assert!(results.iter().any(|r| r.shape.contains("224 -> 224")));
        let failed: Vec<_> = results.iter().filter(|r| !r.pass).collect();
        assert!(failed.is_empty(), "{device}: {} failed (seed {seed}):\n{}", failed.len(), render_table(&results));
    });
}
