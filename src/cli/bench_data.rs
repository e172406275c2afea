//! `derma bench data`: throughput of the fused augmentation kernel on a device, with the bytes it moves per image
//! set against the device's measured copy bandwidth; then the training loader's batches side by side, from a
//! resident dataset and streamed from the host through the double buffer, so the cost of streaming is one ratio
//! measured in one run.

use anyhow::{Result, bail};
use clap::Args;
use derma::cuda::kernels::DevSlice;
use derma::cuda::{DeviceRequest, Gpu, Selected, parse_device, select};
use derma::data::augment::cuda::{AugShape, AugmentBatch, augment, partials_bytes};
use derma::data::augment::{self, AugConfig, AugParams};
use derma::data::device::{BatchElem, DeviceDataset, DeviceLoader, UploadOptions};
use derma::data::loader::{ImageSource, Loader, LoaderConfig};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// ISIC 2019's training images, for the per-epoch estimate.
const ISIC_IMAGES: f64 = 25_331.0;

/// Options of `derma bench data`.
#[derive(Args)]
pub struct DataArgs {
    /// Device: cuda, cuda:N, or emu (a test device: runs the CUDA code path's kernels on the CPU through the
    /// emulator; its numbers measure the emulator, not a GPU).
    #[arg(long, default_value = "cuda", value_parser = parse_device)]
    device: DeviceRequest,
    /// Images per batch [default: 256 on a GPU, 2 on the emulated device].
    #[arg(long)]
    batch: Option<usize>,
    /// Side of the cached source images.
    #[arg(long, default_value_t = 224)]
    size: u32,
    /// Side of the output images.
    #[arg(long, default_value_t = 224)]
    out: u32,
    /// Output element type.
    #[arg(long, value_enum, default_value = "f16")]
    dtype: OutDtype,
    /// Timed batches (after one warm-up) [default: 20 on a GPU, 2 on the emulated device]; the median is reported.
    #[arg(long)]
    steps: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Output element type of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum OutDtype {
    F32,
    F16,
}

#[derive(Serialize)]
struct DataReport {
    device: String,
    emulated: bool,
    batch: usize,
    size: u32,
    out: u32,
    dtype: OutDtype,
    steps: usize,
    runs_ms: Vec<f64>,
    median_ms: f64,
    images_per_s: f64,
    isic_epoch_s: f64,
    bytes_per_image: usize,
    kernel_gb_per_s: f64,
    upload_gb_per_s: f64,
    device_copy_gb_per_s: f64,
    fraction_of_copy_bandwidth: f64,
    /// The training loader's batches (plan, kernel, labels) with the dataset resident on the device.
    loader_resident_images_per_s: f64,
    /// The same batches streamed from host memory: gathered on the host, copied through page-locked memory on the
    /// copy stream while the previous batch is made.
    loader_streamed_images_per_s: f64,
    /// Streamed over resident throughput (1: streaming costs nothing).
    streamed_over_resident: f64,
    note: &'static str,
}

/// `items` images drawn from a few distinct ones (`i mod distinct`), so a long epoch needs little host memory; the
/// gather still copies every byte.
struct RepeatingSource {
    side: usize,
    distinct: Vec<u8>,
    count: usize,
    items: usize,
}

impl ImageSource for RepeatingSource {
    fn size(&self) -> usize {
        self.side
    }
    fn len(&self) -> usize {
        self.items
    }
    fn image(&self, i: usize) -> &[u8] {
        let per = self.side * self.side * 3;
        let k = i % self.count;
        &self.distinct[k * per..(k + 1) * per]
    }
    fn label(&self, i: usize) -> usize {
        i % 8
    }
}

/// Images per second of `steps` consecutive training batches (after one warm-up batch) of a device loader over
/// `src`, its dataset resident or kept on the host.
fn loader_images_per_s<T: BatchElem>(
    gpu: &Gpu,
    src: &Arc<RepeatingSource>,
    batch: usize,
    out: u32,
    steps: usize,
    on_host: bool,
) -> Result<f64> {
    let loader = Loader::new(src.clone(), (0..src.items).collect(), LoaderConfig::train(batch, out, 1))?;
    let opts = UploadOptions { quiet: true, keep_on_host: on_host, ..UploadOptions::default() };
    let data = DeviceDataset::upload(gpu, src.clone(), &opts)?;
    if !on_host && !matches!(data.residency(), derma::data::device::Residency::Resident) {
        bail!("the benchmark's {} images did not fit the device; lower --batch or --steps", src.items);
    }
    let mut dl = DeviceLoader::new::<T>(gpu, loader, data)?;
    dl.begin_epoch(gpu, 0)?;
    dl.batch::<T>(gpu, 0)?;
    gpu.sync()?;
    let t = Instant::now();
    for k in 1..=steps {
        dl.batch::<T>(gpu, k)?;
    }
    gpu.sync()?;
    Ok((steps * batch) as f64 / t.elapsed().as_secs_f64())
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn best_of(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// The device's copy bandwidth in bytes/s (read + write: a copy moves every byte twice), best of three copies of
/// `bytes` after one warm-up.
pub(super) fn device_copy_bandwidth(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let (a, b) = (gpu.zeros(bytes)?, gpu.zeros(bytes)?);
    let secs = best_of(3, || {
        gpu.copy(&b, &a, bytes)?;
        gpu.sync()
    })?;
    Ok(2.0 * bytes as f64 / secs)
}

/// Runs `derma bench data`.
pub fn run(a: DataArgs) -> Result<()> {
    let sel = select(a.device)?;
    if sel == Selected::Cpu {
        bail!("derma bench data measures the device augmentation kernel: use --device cuda, cuda:N or emu");
    }
    let gpu = Gpu::open(&sel)?;
    let emulated = gpu.is_emulated();
    let batch = a.batch.unwrap_or(if emulated { 2 } else { 256 });
    let steps = a.steps.unwrap_or(if emulated { 2 } else { 20 });
    if batch == 0 || steps == 0 || a.size == 0 || a.out == 0 {
        bail!("--batch, --steps, --size and --out must be at least 1");
    }
    if batch > 65_535 {
        bail!("--batch {batch} is more than the kernel's 65,535 samples per launch");
    }
    match a.dtype {
        OutDtype::F32 => bench::<f32>(&gpu, &a, batch, steps),
        OutDtype::F16 => bench::<half::f16>(&gpu, &a, batch, steps),
    }
}

fn bench<T: BatchElem>(gpu: &Gpu, a: &DataArgs, batch: usize, steps: usize) -> Result<()> {
    let emulated = gpu.is_emulated();
    let (side, os) = (a.size as usize, a.out as usize);
    let per_in = side * side * 3;
    let per_out = os * os * 3 * size_of::<T>();
    // Twice the batch of distinct images in a shuffled table, so the batch gathers as a real epoch does.
    let slots = 2 * batch;
    let images: Vec<u8> = (0..slots * per_in).map(|i| (derma::data::split_mix(i as u64) >> 56) as u8).collect();
    let table: Vec<i32> = (0..slots as i32).map(|p| (p * 7 + 3) % slots as i32).collect();
    let params: Vec<AugParams> =
        (0..slots as u64).map(|p| augment::draw(&AugConfig::default(), 1, 0, p, a.size, a.size)).collect();

    let images_d = gpu.zeros(images.len())?;
    let upload = best_of(3, || gpu.write(&images_d, 0, &images))?;
    let copy_gbps = device_copy_bandwidth(gpu, images.len())? / 1e9;
    let table_d = gpu.upload(&table)?;
    let params_d = gpu.upload(bytemuck::cast_slice::<AugParams, u8>(&params))?;
    let out_d = gpu.zeros(batch * per_out)?;
    let partials_d = gpu.zeros(partials_bytes(batch, os))?;
    let mut step_runs = Vec::with_capacity(steps);
    for step in 0..=steps {
        let ab = AugmentBatch {
            out: DevSlice::of(&out_d),
            labels_out: None,
            images: DevSlice::of(&images_d),
            labels: None,
            table: Some(DevSlice::of(&table_d)),
            params: DevSlice::of(&params_d),
            step: None,
            partials: DevSlice::of(&partials_d),
            shape: AugShape {
                position0: ((step % 2) * batch) as i64,
                positions: slots as i64,
                slots: slots as i64,
                batch: batch as i32,
                size: a.size as i32,
                out_size: a.out as i32,
                pad_: 0,
            },
        };
        let t = Instant::now();
        augment::<T>(&gpu.kernels, &gpu.stream, &ab)?;
        gpu.sync()?;
        if step > 0 {
            step_runs.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut sorted = step_runs.clone();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median_ms = if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 };
    let images_per_s = batch as f64 / (median_ms / 1e3);
    // Compulsory traffic per image: the u8 source read once, the output written once, its parameters.
    let bytes_per_image = per_in + per_out + size_of::<AugParams>();
    let kernel_gbps = bytes_per_image as f64 * images_per_s / 1e9;
    // The loader over an epoch of steps + 1 batches drawn from the same distinct images.
    let src = Arc::new(RepeatingSource { side, distinct: images.clone(), count: slots, items: (steps + 1) * batch });
    let resident = loader_images_per_s::<T>(gpu, &src, batch, a.out, steps, false)?;
    let streamed = loader_images_per_s::<T>(gpu, &src, batch, a.out, steps, true)?;
    let report = DataReport {
        device: gpu.info.name.clone(),
        emulated,
        batch,
        size: a.size,
        out: a.out,
        dtype: a.dtype,
        steps,
        runs_ms: step_runs,
        median_ms,
        images_per_s,
        isic_epoch_s: ISIC_IMAGES / images_per_s,
        bytes_per_image,
        kernel_gb_per_s: kernel_gbps,
        upload_gb_per_s: gbps(images.len(), upload),
        device_copy_gb_per_s: copy_gbps,
        fraction_of_copy_bandwidth: kernel_gbps / copy_gbps,
        loader_resident_images_per_s: resident,
        loader_streamed_images_per_s: streamed,
        streamed_over_resident: streamed / resident,
        note: if emulated {
            "emulated device: the kernel ran on the CPU through the emulator; these numbers only show that the \
             command and the kernel run, not GPU throughput"
        } else {
            "median over the timed batches, each synchronised; bandwidths are best of 3 (pageable host memory); the \
             loader rates are over consecutive batches with no sync between them, the host gathering from a few \
             distinct images repeated (hot memory: an optimistic stand-in for a page-cached decode cache)"
        },
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let r = &report;
    println!(
        "fused augmentation on {}: batch {}, {}x{} u8 -> {}x{} {:?}, median of {} batches",
        r.device, r.batch, r.size, r.size, r.out, r.out, r.dtype, r.steps
    );
    println!(
        "  {:10.0} images/s ({:.2} ms per batch; an ISIC epoch of 25,331 images: {:.3} s)",
        r.images_per_s, r.median_ms, r.isic_epoch_s
    );
    println!(
        "  {} bytes per image (u8 source + output + parameters): {:.1} GB/s, {:.1}% of the device copy bandwidth",
        r.bytes_per_image,
        r.kernel_gb_per_s,
        100.0 * r.fraction_of_copy_bandwidth
    );
    println!(
        "  device copy {:.1} GB/s (read + write), host->device upload {:.1} GB/s",
        r.device_copy_gb_per_s, r.upload_gb_per_s
    );
    println!(
        "  training loader, {} batches: resident {:.0} images/s, streamed from the host {:.0} images/s ({:.2}x)",
        r.steps, r.loader_resident_images_per_s, r.loader_streamed_images_per_s, r.streamed_over_resident
    );
    if emulated {
        println!("  note: {}", r.note);
    }
    Ok(())
}
