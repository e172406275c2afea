//! Training data on a CUDA device (or the emulated one): the decoded u8 dataset uploaded once, the epoch's plan
//! (order and every sample's [`AugParams`]) uploaded once per epoch into fixed buffers, and the fused augmentation
//! kernel ([`crate::data::augment::cuda`]) turning a batch of plan positions into the normalized f32 or f16 NHWC batch.
//!
//! - **Upload once** ([`DeviceDataset::upload`]): the images `[N, S, S, 3]` u8 and the labels go to the device in
//!   chunks through a staging buffer (page-locked on a GPU, so each chunk is one DMA), with a progress bar. A
//!   dataset that does not fit the device's free memory (less a reserve for the model, see
//!   [`UploadOptions::reserve_fraction`]) is not uploaded: batches of u8 are then copied from the host each step
//!   ([`Residency::Streaming`]), with a notice, never an out-of-memory error.
//! - **Per-epoch plan** ([`EpochPlan`]): the host draws the order and the parameters with the CPU loader's own
//!   functions ([`Loader::epoch_order`], [`Loader::train_params`]), so the device batches are the CPU loader's
//!   batches. [`DeviceLoader`] keeps the plan in buffers allocated once, at fixed addresses, so a captured
//!   training graph can read them by step.
//! - **Batches** ([`DeviceLoader::batch`]): one call of the two-pass kernel; the output equals the CPU loader's
//!   batch bit for bit in f32, and is its f16 rounding in f16.

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;

use super::augment::AugParams;
use super::loader::{ImageSource, Loader};
use crate::cuda::Gpu;
use crate::cuda::alloc::Block;
use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem};
use crate::data::augment::cuda::{AugShape, AugmentBatch, augment, partials_bytes};

/// The order and augmentation parameters of one training epoch, as the CPU loader uses them.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochPlan {
    /// Epoch number.
    pub epoch: u64,
    /// Samples per batch.
    pub batch_size: usize,
    /// Source index per plan position (the first `batches · batch_size` of the loader's epoch order: the last
    /// partial batch is dropped, as the loader drops it).
    pub order: Vec<usize>,
    /// Parameters per plan position.
    pub params: Vec<AugParams>,
}

impl EpochPlan {
    /// The plan of `epoch` for a training loader.
    pub fn new(loader: &Loader, epoch: u64) -> Result<Self> {
        let cfg = loader.config();
        ensure!(
            cfg.train,
            "the device epoch plan is for training loaders (shuffled, augmented); evaluation batches are not planned"
        );
        let positions = loader.batches_per_epoch() * cfg.batch_size;
        let mut order = loader.epoch_order(epoch);
        order.truncate(positions);
        let params = (0..positions as u64).map(|p| loader.train_params(epoch, p)).collect::<Result<Vec<_>>>()?;
        Ok(EpochPlan { epoch, batch_size: cfg.batch_size, order, params })
    }

    /// Batches in the epoch.
    pub fn batches(&self) -> usize {
        self.order.len() / self.batch_size.max(1)
    }
}

/// Where the images live during training.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Residency {
    /// Uploaded once; batches read them on the device.
    Resident,
    /// Too large for the device: each batch's images are copied from the host.
    Streaming {
        /// Bytes the dataset needs.
        needed: usize,
        /// Bytes the device had free for it (after the reserve), when known.
        available: Option<usize>,
    },
}

/// How [`DeviceDataset::upload`] uploads.
#[derive(Clone, Debug)]
pub struct UploadOptions {
    /// Fraction of the device's free memory left for everything else (model, activations): the dataset stays
    /// resident only when it fits in the rest.
    pub reserve_fraction: f64,
    /// Bytes per host→device copy.
    pub chunk_bytes: usize,
    /// No progress bar and no notice.
    pub quiet: bool,
}

impl Default for UploadOptions {
    /// A quarter of free memory kept back, 64 MiB chunks.
    fn default() -> Self {
        UploadOptions { reserve_fraction: 0.25, chunk_bytes: 64 << 20, quiet: false }
    }
}

/// Host memory the copies go through: page-locked on a GPU (one DMA per copy, no bounce through a driver buffer),
/// ordinary memory on the emulated device (its copies are memcpy).
struct Staging {
    ptr: *mut u8,
    len: usize,
    pinned: bool,
    plain: Vec<u8>,
}

impl Staging {
    fn new(stream: &Stream, len: usize) -> Result<Self> {
        if let Stream::Cuda(s) = stream {
            s.context().bind_to_thread().map_err(|e| anyhow::anyhow!("binding the CUDA context: {e:?}"))?;
            // SAFETY: a context is current; cuMemHostAlloc returns `len` page-locked bytes or an error.
            match unsafe { cudarc::driver::result::malloc_host(len.max(1), 0) } {
                Ok(p) => return Ok(Staging { ptr: p.cast(), len, pinned: true, plain: Vec::new() }),
                // Page-locked memory is a limited resource; ordinary memory still works, only slower.
                Err(e) => {
                    eprintln!("note: page-locked staging of {len} bytes failed ({e:?}); copying from pageable memory")
                }
            }
        }
        Ok(Staging { ptr: std::ptr::null_mut(), len, pinned: false, plain: vec![0u8; len] })
    }

    fn bytes(&mut self) -> &mut [u8] {
        if self.pinned {
            // SAFETY: ptr holds len bytes from cuMemHostAlloc, owned by self until drop; copies from it are
            // synchronous, so no device access overlaps this borrow.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
        } else {
            &mut self.plain
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.pinned {
            // SAFETY: ptr came from cuMemHostAlloc and is freed once.
            let _ = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) };
        }
    }
}

fn progress(total: u64, quiet: bool) -> ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message("uploading the dataset");
    pb
}

/// The dataset's labels on the device and, when it fits, its images.
pub struct DeviceDataset {
    src: Arc<dyn ImageSource>,
    images: Option<Block>,
    labels: Block,
    residency: Residency,
}

impl DeviceDataset {
    /// Uploads `src` to `gpu` (see the module docs); falls back to [`Residency::Streaming`] with a notice when it
    /// does not fit.
    pub fn upload(gpu: &Gpu, src: Arc<dyn ImageSource>, opts: &UploadOptions) -> Result<Self> {
        let (n, side) = (src.len(), src.size());
        ensure!(n > 0 && side > 0, "the dataset to upload is empty ({n} images of side {side})");
        let per_image = side * side * 3;
        let needed = n.checked_mul(per_image).context("dataset size overflows")?;
        let labels: Vec<i32> = (0..n)
            .map(|i| i32::try_from(src.label(i)).with_context(|| format!("label of image {i} does not fit i32")))
            .collect::<Result<_>>()?;
        let labels = gpu.upload(&labels)?;
        let available = gpu.alloc.free_bytes().map(|f| (f as f64 * (1.0 - opts.reserve_fraction)) as usize);
        let streaming = |why: String| {
            if !opts.quiet {
                eprintln!(
                    "note: the dataset ({:.2} GiB of u8 images) stays on the host: {why}; each batch's images are \
                     copied to {} every step instead (slower)",
                    needed as f64 / (1u64 << 30) as f64,
                    gpu.info.name
                );
            }
            Residency::Streaming { needed, available }
        };
        if let Some(a) = available
            && needed > a
        {
            let why = format!(
                "it needs more than the {:.2} GiB the device has free after keeping {:.0}% back",
                a as f64 / (1u64 << 30) as f64,
                opts.reserve_fraction * 100.0
            );
            return Ok(DeviceDataset { residency: streaming(why), src, images: None, labels });
        }
        let images = match gpu.alloc.alloc(needed) {
            Ok(b) => b,
            Err(e) => {
                let why = format!("allocating it failed ({e:#})");
                return Ok(DeviceDataset { residency: streaming(why), src, images: None, labels });
            }
        };
        let per_chunk = (opts.chunk_bytes / per_image).max(1);
        let mut staging = Staging::new(&gpu.stream, per_chunk.min(n) * per_image)?;
        let pb = progress(needed as u64, opts.quiet);
        let mut first = 0;
        while first < n {
            if crate::interrupt::requested() {
                bail!("interrupted while uploading the dataset ({first} of {n} images copied)");
            }
            let count = per_chunk.min(n - first);
            let buf = &mut staging.bytes()[..count * per_image];
            for (k, dst) in buf.chunks_exact_mut(per_image).enumerate() {
                dst.copy_from_slice(src.image(first + k));
            }
            gpu.write(&images, first * per_image, buf)?;
            pb.inc((count * per_image) as u64);
            first += count;
        }
        pb.finish_and_clear();
        Ok(DeviceDataset { src, images: Some(images), labels, residency: Residency::Resident })
    }

    /// Where the images are.
    pub fn residency(&self) -> &Residency {
        &self.residency
    }

    /// Images in the dataset.
    pub fn len(&self) -> usize {
        self.src.len()
    }

    /// Whether the dataset has no images (never true for an uploaded one).
    pub fn is_empty(&self) -> bool {
        self.src.is_empty()
    }
}

/// Output element types of [`DeviceLoader::batch`].
pub trait BatchElem: Elem {}
impl BatchElem for f32 {}
impl BatchElem for half::f16 {}

/// Training batches made on the device from a [`DeviceDataset`] and the epoch plans of a training [`Loader`].
/// Every buffer is allocated once, so the addresses of the plan, the output and the labels never change.
pub struct DeviceLoader {
    loader: Loader,
    data: DeviceDataset,
    plan: Option<EpochPlan>,
    table: Block,
    params: Block,
    out: Block,
    labels_out: Block,
    partials: Block,
    stream_images: Option<(Block, Block, Staging)>,
    out_elem_bytes: usize,
}

impl DeviceLoader {
    /// Buffers for `loader`'s batches in elements of `T` (`f32` or `f16`).
    pub fn new<T: BatchElem>(gpu: &Gpu, loader: Loader, data: DeviceDataset) -> Result<Self> {
        let cfg = loader.config().clone();
        ensure!(cfg.train, "a device loader makes training batches; evaluation batches are not planned");
        ensure!(data.len() == loader.source().len(), "the device dataset and the loader have different sources");
        let positions = (loader.batches_per_epoch() * cfg.batch_size).max(1);
        let (b, os, side) = (cfg.batch_size, cfg.out_size as usize, loader.source().size());
        let stream_images = match data.residency {
            Residency::Resident => None,
            Residency::Streaming { .. } => Some((
                gpu.alloc.alloc(b * side * side * 3)?,
                gpu.alloc.alloc(b * 4)?,
                Staging::new(&gpu.stream, b * side * side * 3)?,
            )),
        };
        Ok(DeviceLoader {
            table: gpu.alloc.alloc(positions * 4)?,
            params: gpu.alloc.alloc(positions * size_of::<AugParams>())?,
            out: gpu.alloc.alloc(b * os * os * 3 * size_of::<T>())?,
            labels_out: gpu.alloc.alloc(b * 4)?,
            partials: gpu.alloc.alloc(partials_bytes(b, os))?,
            out_elem_bytes: size_of::<T>(),
            plan: None,
            stream_images,
            loader,
            data,
        })
    }

    /// Draws epoch `epoch`'s plan and uploads it into the fixed plan buffers.
    pub fn begin_epoch(&mut self, gpu: &Gpu, epoch: u64) -> Result<&EpochPlan> {
        let plan = EpochPlan::new(&self.loader, epoch)?;
        let table: Vec<i32> = plan.order.iter().map(|&i| i as i32).collect();
        if !table.is_empty() {
            gpu.write(&self.table, 0, &table)?;
            gpu.write(&self.params, 0, bytemuck::cast_slice::<AugParams, u8>(&plan.params))?;
        }
        Ok(self.plan.insert(plan))
    }

    /// The current epoch's plan (after [`DeviceLoader::begin_epoch`]).
    pub fn plan(&self) -> Option<&EpochPlan> {
        self.plan.as_ref()
    }

    /// The dataset's residency.
    pub fn residency(&self) -> &Residency {
        &self.data.residency
    }

    /// Whether batches can be made entirely on the device ([`DeviceLoader::batch_at_device_step`]): the images are
    /// resident. Streamed batches need the host to copy each batch's images first.
    pub fn is_resident(&self) -> bool {
        self.data.images.is_some()
    }

    /// The fixed output block (`[B, out, out, 3]`) and labels block (`B` i32) every batch is made into.
    pub fn outputs(&self) -> (&Block, &Block) {
        (&self.out, &self.labels_out)
    }

    /// Issues the augmentation of the batch the device's step counter `step` (an i64: batch index in the epoch)
    /// names, without the host knowing which batch that is: the launch a captured training step replays. Resident
    /// data only; the epoch's plan must be uploaded ([`DeviceLoader::begin_epoch`]).
    pub fn batch_at_device_step<T: BatchElem>(&self, gpu: &Gpu, step: DevSlice) -> Result<()> {
        ensure!(size_of::<T>() == self.out_elem_bytes, "the device loader was created for another element type");
        let Some(plan) = &self.plan else { bail!("DeviceLoader::batch_at_device_step before begin_epoch") };
        let Some(images) = &self.data.images else {
            bail!("the dataset is streamed from the host: its batches cannot be made from a device step counter")
        };
        let cfg = self.loader.config();
        let (b, side) = (cfg.batch_size, self.loader.source().size());
        let a = AugmentBatch {
            out: DevSlice::of(&self.out),
            labels_out: Some(DevSlice::of(&self.labels_out)),
            images: DevSlice::of(images),
            labels: Some(DevSlice::of(&self.data.labels)),
            table: Some(DevSlice::of(&self.table)),
            params: DevSlice::of(&self.params),
            step: Some(step),
            partials: DevSlice::of(&self.partials),
            shape: AugShape {
                position0: 0,
                positions: plan.order.len() as i64,
                slots: self.data.len() as i64,
                batch: b as i32,
                size: side as i32,
                out_size: cfg.out_size as i32,
                pad_: 0,
            },
        };
        augment::<T>(&gpu.kernels, &gpu.stream, &a)
    }

    /// Makes batch `batch` of the current epoch: returns the output block (`[B, out, out, 3]` of `T`) and the
    /// labels block (`B` i32), both at fixed addresses.
    pub fn batch<T: BatchElem>(&mut self, gpu: &Gpu, batch: usize) -> Result<(&Block, &Block)> {
        ensure!(size_of::<T>() == self.out_elem_bytes, "the device loader was created for another element type");
        let Some(plan) = &self.plan else { bail!("DeviceLoader::batch before begin_epoch") };
        ensure!(batch < plan.batches(), "batch {batch} of an epoch of {} batches", plan.batches());
        let cfg = self.loader.config();
        let (b, side) = (cfg.batch_size, self.loader.source().size());
        let per_image = side * side * 3;
        let shape = |slots: usize, position0: usize| AugShape {
            position0: position0 as i64,
            positions: plan.order.len() as i64,
            slots: slots as i64,
            batch: b as i32,
            size: side as i32,
            out_size: cfg.out_size as i32,
            pad_: 0,
        };
        let position0 = batch * b;
        let a = match (&self.data.images, &mut self.stream_images) {
            (Some(images), _) => AugmentBatch {
                out: DevSlice::of(&self.out),
                labels_out: Some(DevSlice::of(&self.labels_out)),
                images: DevSlice::of(images),
                labels: Some(DevSlice::of(&self.data.labels)),
                table: Some(DevSlice::of(&self.table)),
                params: DevSlice::of(&self.params),
                step: None,
                partials: DevSlice::of(&self.partials),
                shape: shape(self.data.len(), position0),
            },
            (None, Some((images, labels, staging))) => {
                let src = &self.data.src;
                let buf = staging.bytes();
                let mut batch_labels = Vec::with_capacity(b);
                for (k, dst) in buf.chunks_exact_mut(per_image).enumerate() {
                    let i = plan.order[position0 + k];
                    dst.copy_from_slice(src.image(i));
                    batch_labels.push(i32::try_from(src.label(i)).context("label does not fit i32")?);
                }
                gpu.write(images, 0, buf)?;
                gpu.write(labels, 0, &batch_labels)?;
                AugmentBatch {
                    out: DevSlice::of(&self.out),
                    labels_out: Some(DevSlice::of(&self.labels_out)),
                    images: DevSlice::of(images),
                    labels: Some(DevSlice::of(labels)),
                    table: None,
                    params: DevSlice::of(&self.params),
                    step: None,
                    partials: DevSlice::of(&self.partials),
                    shape: shape(b, position0),
                }
            }
            (None, None) => bail!("the device loader has neither resident images nor streaming buffers"),
        };
        augment::<T>(&gpu.kernels, &gpu.stream, &a)?;
        Ok((&self.out, &self.labels_out))
    }
}
