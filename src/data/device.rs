//! Training data on a CUDA device (or the emulated one): the decoded u8 dataset uploaded once, the epoch's plan
//! (order and every sample's [`AugParams`]) uploaded once per epoch into fixed buffers, and the fused augmentation
//! kernel ([`crate::data::augment::cuda`]) turning a batch of plan positions into the normalized f32 or f16 NHWC batch.
//!
//! - **Upload once** ([`DeviceDataset::upload`]): the images `[N, S, S, 3]` u8 and the labels go to the device in
//!   chunks through two staging buffers (page-locked on a GPU, so each chunk is one DMA; the next chunk is
//!   gathered while one is copied), with a progress bar. A
//!   dataset that does not fit the device's free memory (less a reserve for the model, see
//!   [`UploadOptions::reserve_fraction`]) is not uploaded: batches of u8 are then copied from the host each step
//!   ([`Residency::Streaming`]), with a notice, never an out-of-memory error. The copies are double-buffered
//!   through page-locked memory on a stream of their own ([`crate::cuda::upstream`]): batch `k + 1` is gathered
//!   and copied while step `k` computes, and a captured step finds its batch from the step counter as a resident
//!   one does.
//! - **Per-epoch plan** ([`EpochPlan`]): the host draws the order and the parameters with the CPU loader's own
//!   functions ([`Loader::epoch_order`], [`Loader::train_params`]), so the device batches are the CPU loader's
//!   batches. [`DeviceLoader`] keeps the plan in buffers allocated once, at fixed addresses, so a captured
//!   training graph can read them by step.
//! - **Batches** ([`DeviceLoader::batch`], or [`DeviceLoader::batch_at_device_step`] inside a captured step): one
//!   call of the two-pass kernel; the output equals the CPU loader's batch bit for bit in f32, and is its f16
//!   rounding in f16, resident or streamed.

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::sync::Arc;

use super::augment::AugParams;
use super::loader::{ImageSource, Loader};
use crate::cuda::Gpu;
use crate::cuda::alloc::Block;
use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem};
use crate::cuda::upstream::{ComputeMark, CopyFence, Upstream};
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
    /// Too large for the device (or kept on the host as asked): each batch's images are copied from the host.
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
    /// Stream the batches from the host even when the dataset would fit (to leave the memory to the model).
    pub keep_on_host: bool,
}

impl Default for UploadOptions {
    /// A quarter of free memory kept back, 64 MiB chunks, resident when it fits.
    fn default() -> Self {
        UploadOptions { reserve_fraction: 0.25, chunk_bytes: 64 << 20, quiet: false, keep_on_host: false }
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
                Ok(p) => {
                    let ptr: *mut u8 = p.cast();
                    // SAFETY: `ptr` holds len.max(1) writable bytes; cuMemHostAlloc leaves them uninitialised, and
                    // `bytes` hands them out as a slice, which must hold initialised values.
                    unsafe { std::ptr::write_bytes(ptr, 0, len.max(1)) };
                    return Ok(Staging { ptr, len, pinned: true, plain: Vec::new() });
                }
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
            // SAFETY: ptr holds len initialised bytes from cuMemHostAlloc (zeroed in `new`), owned by self until
            // drop. Its users write it only when no copy out of it is in flight: the upload and the ring wait on
            // the fence after a buffer's last copy before refilling it.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
        } else {
            &mut self.plain
        }
    }

    /// The first byte, for copies that read it later (the caller keeps it unwritten until they have).
    fn as_ptr(&self) -> *const u8 {
        if self.pinned { self.ptr } else { self.plain.as_ptr() }
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
                    "note: the dataset ({:.2} GiB of u8 images) stays on the host {why}; each batch's images are \
                     copied to {} while the step before it runs (double-buffered; slower when the host cannot \
                     gather a batch within a step)",
                    needed as f64 / (1u64 << 30) as f64,
                    gpu.info.name
                );
            }
            Residency::Streaming { needed, available }
        };
        if opts.keep_on_host {
            let why = "as asked (--stream-data)".to_string();
            return Ok(DeviceDataset { residency: streaming(why), src, images: None, labels });
        }
        if let Some(a) = available
            && needed > a
        {
            let why = format!(
                "because it needs more than the {:.2} GiB the device has free after keeping {:.0}% back",
                a as f64 / (1u64 << 30) as f64,
                opts.reserve_fraction * 100.0
            );
            return Ok(DeviceDataset { residency: streaming(why), src, images: None, labels });
        }
        let images = match gpu.alloc.alloc(needed) {
            Ok(b) => b,
            Err(e) => {
                let why = format!("because allocating it failed ({e:#})");
                return Ok(DeviceDataset { residency: streaming(why), src, images: None, labels });
            }
        };
        // Two staging buffers on the copy stream: chunk k + 1 is gathered while chunk k is copied.
        let per_chunk = (opts.chunk_bytes / per_image).max(1);
        let staged = per_chunk.min(n) * per_image;
        let mut staging = [Staging::new(&gpu.stream, staged)?, Staging::new(&gpu.stream, staged)?];
        let up = Upstream::new(gpu)?;
        let mut fences: [Option<CopyFence>; 2] = [None, None];
        let pb = progress(needed as u64, opts.quiet);
        let (mut first, mut chunk) = (0, 0);
        while first < n {
            if crate::interrupt::requested() {
                bail!("interrupted while uploading the dataset ({first} of {n} images copied)");
            }
            let count = per_chunk.min(n - first);
            let slot = chunk % 2;
            if let Some(f) = &fences[slot] {
                up.host_waits(f)?;
            }
            let buf = &mut staging[slot].bytes()[..count * per_image];
            buf.par_chunks_exact_mut(per_image)
                .enumerate()
                .for_each(|(k, dst)| dst.copy_from_slice(src.image(first + k)));
            // SAFETY: the staging buffer holds count·per_image bytes and is refilled only after a host wait on the
            // fence recorded below; both buffers outlive the copies: `up`, declared after them, drops first, and
            // dropping it waits for every copy (on every path out of here, errors included).
            unsafe { up.copy(&images, first * per_image, staging[slot].as_ptr(), count * per_image) }?;
            fences[slot] = Some(up.fence()?);
            pb.inc((count * per_image) as u64);
            first += count;
            chunk += 1;
        }
        up.finish()?;
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

/// The double buffer of a streamed dataset: two device slots of one batch each (images `[2, B, S, S, 3]` u8 and
/// labels `[2, B]` i32), two host staging buffers, and the copy stream between them. Batch `k` of an epoch goes
/// to slot `k mod 2`, so a step's kernels find their batch from the step counter alone (the plan's table maps
/// position `p` to slot image `((p / B) mod 2)·B + p mod B`), and batch `k + 1` is gathered on the host and
/// copied while step `k` computes.
///
/// Napkin math for B0 at batch 256, 224²: a batch is 256 · 150,528 B = 38.5 MB of u8. At the ~25 GB/s of a
/// pinned PCIe 5 copy that is 1.5 ms; the host gather (a memcpy from the page-cached u8 cache) about 4 ms on one
/// core and a fraction of that spread over cores, both under a step of B0 (tens of ms), so a streamed step waits
/// for neither once the first batch of an epoch is in.
struct Ring {
    images: Block,
    labels: Block,
    /// Per slot: `B·S²·3` image bytes, then `B` native-endian i32 labels.
    staging: [Staging; 2],
    up: Upstream,
    /// Per slot: the fence after the copy into it (its staging buffer is free once that has passed).
    copied: [Option<CopyFence>; 2],
    /// Per slot: the mark after the last compute work that read it.
    consumed: [Option<ComputeMark>; 2],
    /// Per slot: the (plan generation, batch) it holds or is receiving.
    holds: [Option<(u64, usize)>; 2],
    batch: usize,
    per_image: usize,
}

impl Ring {
    fn new(gpu: &Gpu, batch: usize, per_image: usize) -> Result<Self> {
        let staged = batch * (per_image + 4);
        Ok(Ring {
            images: gpu.alloc.alloc(2 * batch * per_image)?,
            labels: gpu.alloc.alloc(2 * batch * 4)?,
            staging: [Staging::new(&gpu.stream, staged)?, Staging::new(&gpu.stream, staged)?],
            up: Upstream::new(gpu)?,
            copied: [None, None],
            consumed: [None, None],
            holds: [None, None],
            batch,
            per_image,
        })
    }

    /// The slot table of an epoch of `positions` plan positions (see the type's docs).
    fn slot_table(&self, positions: usize) -> Vec<i32> {
        let b = self.batch;
        (0..positions).map(|p| (((p / b) % 2) * b + p % b) as i32).collect()
    }

    /// Gathers batch `k` of `plan` on the host and queues its copy into slot `k mod 2`, unless the slot already
    /// holds it.
    fn stage(&mut self, src: &dyn ImageSource, plan: &EpochPlan, generation: u64, k: usize) -> Result<()> {
        let slot = k % 2;
        if self.holds[slot] == Some((generation, k)) {
            return Ok(());
        }
        // The staging buffer is refilled only once its last copy has finished. (A copy still reading it would be
        // followed by this one into the same slot, so the slot would still end right; the wait keeps the rule
        // simple: no host write under a DMA.)
        if let Some(f) = &self.copied[slot] {
            self.up.host_waits(f)?;
        }
        self.holds[slot] = None;
        let (b, per_image) = (self.batch, self.per_image);
        let order = &plan.order[k * b..(k + 1) * b];
        let buf = self.staging[slot].bytes();
        let (images, labels) = buf.split_at_mut(b * per_image);
        images.par_chunks_exact_mut(per_image).zip(order.par_iter()).for_each(|(dst, &i)| {
            dst.copy_from_slice(src.image(i));
        });
        for (dst, &i) in labels.chunks_exact_mut(4).zip(order) {
            let label = i32::try_from(src.label(i)).with_context(|| format!("label of image {i} does not fit i32"))?;
            dst.copy_from_slice(&label.to_ne_bytes());
        }
        // The slot is overwritten only after the compute work that last read it.
        if let Some(m) = &self.consumed[slot] {
            self.up.after_compute(m)?;
        }
        let host = self.staging[slot].as_ptr();
        // SAFETY: the staging buffer holds b·(per_image + 4) bytes and is not written again before a host wait on
        // the fence recorded below (the top of this function), nor freed before the stream is finished (Drop); the
        // device slots live as long as the ring.
        let queued = unsafe {
            self.up
                .copy(&self.images, slot * b * per_image, host, b * per_image)
                .and_then(|()| self.up.copy(&self.labels, slot * b * 4, host.add(b * per_image), b * 4))
        };
        match queued.and_then(|()| self.up.fence()) {
            Ok(fence) => self.copied[slot] = Some(fence),
            Err(e) => {
                // A copy may be queued without a fence after it: wait for everything, so a retry cannot refill
                // the staging buffer under it.
                self.copied[slot] = None;
                if let Err(f) = self.up.finish() {
                    return Err(e.context(format!("and then waiting for the copy stream failed too: {f:#}")));
                }
                return Err(e);
            }
        }
        self.holds[slot] = Some((generation, k));
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The staging buffers are freed after this: no queued copy may still read them.
        if let Err(e) = self.up.finish() {
            eprintln!("warning: waiting for the streamed copies before freeing their buffers: {e:#}");
        }
    }
}

/// Training batches made on the device from a [`DeviceDataset`] and the epoch plans of a training [`Loader`].
/// Every buffer is allocated once, so the addresses of the plan, the output and the labels never change.
///
/// A streamed dataset's batches pass through a double buffer (two device slots, two page-locked host buffers, a
/// copy stream): each step is bracketed by [`DeviceLoader::prepare_step`] (its batch is copied, or being copied,
/// and the compute stream waits for it) and [`DeviceLoader::step_issued`] (the slot is marked as read, and the
/// next batch is gathered and copied while the step runs). [`DeviceLoader::batch`] does both itself; a captured
/// training step calls them around each replay.
pub struct DeviceLoader {
    loader: Loader,
    data: DeviceDataset,
    plan: Option<EpochPlan>,
    /// Bumped by every [`DeviceLoader::begin_epoch`], so a slot staged from an older plan is not mistaken for one
    /// of the current plan.
    generation: u64,
    table: Block,
    params: Block,
    out: Block,
    labels_out: Block,
    partials: Block,
    ring: Option<Ring>,
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
        let table = gpu.alloc.alloc(positions * 4)?;
        let ring = match data.residency {
            Residency::Resident => None,
            Residency::Streaming { .. } => {
                let ring = Ring::new(gpu, b, side * side * 3)?;
                // The slot table is the same every epoch.
                gpu.write(&table, 0, &ring.slot_table(positions))?;
                Some(ring)
            }
        };
        Ok(DeviceLoader {
            table,
            params: gpu.alloc.alloc(positions * size_of::<AugParams>())?,
            out: gpu.alloc.alloc(b * os * os * 3 * size_of::<T>())?,
            labels_out: gpu.alloc.alloc(b * 4)?,
            partials: gpu.alloc.alloc(partials_bytes(b, os))?,
            out_elem_bytes: size_of::<T>(),
            plan: None,
            generation: 0,
            ring,
            loader,
            data,
        })
    }

    /// Draws epoch `epoch`'s plan and uploads it into the fixed plan buffers.
    pub fn begin_epoch(&mut self, gpu: &Gpu, epoch: u64) -> Result<&EpochPlan> {
        let plan = EpochPlan::new(&self.loader, epoch)?;
        if !plan.order.is_empty() {
            if self.ring.is_none() {
                let table: Vec<i32> = plan.order.iter().map(|&i| i as i32).collect();
                gpu.write(&self.table, 0, &table)?;
            }
            gpu.write(&self.params, 0, bytemuck::cast_slice::<AugParams, u8>(&plan.params))?;
        }
        self.generation += 1;
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

    /// The fixed output block (`[B, out, out, 3]`) and labels block (`B` i32) every batch is made into.
    pub fn outputs(&self) -> (&Block, &Block) {
        (&self.out, &self.labels_out)
    }

    /// Before the step that makes batch `batch` of the current epoch: for a streamed dataset, its images are
    /// copied (or being copied) into their slot and the compute stream waits for them. Nothing to do for a
    /// resident one. Not inside a graph capture: call it before the replay.
    pub fn prepare_step(&mut self, gpu: &Gpu, batch: usize) -> Result<()> {
        let Some(ring) = &mut self.ring else { return Ok(()) };
        let Some(plan) = &self.plan else { bail!("DeviceLoader::prepare_step before begin_epoch") };
        ensure!(batch < plan.batches(), "batch {batch} of an epoch of {} batches", plan.batches());
        ring.stage(self.data.src.as_ref(), plan, self.generation, batch)?;
        let slot = batch % 2;
        let fence = ring.copied[slot].as_ref().context("a staged slot without its copy fence")?;
        ring.up.compute_waits(gpu, fence)
    }

    /// After the step that made batch `batch` has been issued: for a streamed dataset, its slot is marked as read
    /// and the next batch of the epoch is gathered and copied into the other slot while the step runs.
    pub fn step_issued(&mut self, gpu: &Gpu, batch: usize) -> Result<()> {
        let Some(ring) = &mut self.ring else { return Ok(()) };
        let Some(plan) = &self.plan else { bail!("DeviceLoader::step_issued before begin_epoch") };
        ring.consumed[batch % 2] = Some(ring.up.mark_compute(gpu)?);
        if batch + 1 < plan.batches() {
            ring.stage(self.data.src.as_ref(), plan, self.generation, batch + 1)?;
        }
        Ok(())
    }

    /// The kernel arguments of a batch: from the step counter `step` when given, else plan position `position0`.
    fn args<'a>(&'a self, step: Option<DevSlice<'a>>, position0: usize) -> Result<AugmentBatch<'a>> {
        let Some(plan) = &self.plan else { bail!("a device batch before DeviceLoader::begin_epoch") };
        let cfg = self.loader.config();
        let (b, side) = (cfg.batch_size, self.loader.source().size());
        let (images, labels, slots) = match (&self.data.images, &self.ring) {
            (Some(images), _) => (images, &self.data.labels, self.data.len()),
            (None, Some(ring)) => (&ring.images, &ring.labels, 2 * b),
            (None, None) => bail!("the device loader has neither resident images nor streaming buffers"),
        };
        Ok(AugmentBatch {
            out: DevSlice::of(&self.out),
            labels_out: Some(DevSlice::of(&self.labels_out)),
            images: DevSlice::of(images),
            labels: Some(DevSlice::of(labels)),
            table: Some(DevSlice::of(&self.table)),
            params: DevSlice::of(&self.params),
            step,
            partials: DevSlice::of(&self.partials),
            shape: AugShape {
                position0: position0 as i64,
                positions: plan.order.len() as i64,
                slots: slots as i64,
                batch: b as i32,
                size: side as i32,
                out_size: cfg.out_size as i32,
                pad_: 0,
            },
        })
    }

    /// Issues the augmentation of the batch the device's step counter `step` (an i64: batch index in the epoch)
    /// names, without the host knowing which batch that is: the launch a captured training step replays. The
    /// epoch's plan must be uploaded ([`DeviceLoader::begin_epoch`]); with a streamed dataset, each run of the
    /// launch must sit between [`DeviceLoader::prepare_step`] and [`DeviceLoader::step_issued`] for the batch the
    /// counter holds then.
    pub fn batch_at_device_step<T: BatchElem>(&self, gpu: &Gpu, step: DevSlice) -> Result<()> {
        ensure!(size_of::<T>() == self.out_elem_bytes, "the device loader was created for another element type");
        augment::<T>(&gpu.kernels, &gpu.stream, &self.args(Some(step), 0)?)
    }

    /// Makes batch `batch` of the current epoch: returns the output block (`[B, out, out, 3]` of `T`) and the
    /// labels block (`B` i32), both at fixed addresses. A streamed dataset's next batch is copied meanwhile.
    pub fn batch<T: BatchElem>(&mut self, gpu: &Gpu, batch: usize) -> Result<(&Block, &Block)> {
        ensure!(size_of::<T>() == self.out_elem_bytes, "the device loader was created for another element type");
        let Some(plan) = &self.plan else { bail!("DeviceLoader::batch before begin_epoch") };
        ensure!(batch < plan.batches(), "batch {batch} of an epoch of {} batches", plan.batches());
        let position0 = batch * plan.batch_size;
        self.prepare_step(gpu, batch)?;
        augment::<T>(&gpu.kernels, &gpu.stream, &self.args(None, position0)?)?;
        self.step_issued(gpu, batch)?;
        Ok((&self.out, &self.labels_out))
    }
}
