//! Batches for training and evaluation, built ahead of compute by background worker threads.
//!
//! Per epoch the loader orders its items (training: shuffled by a PCG seeded from `(seed, epoch)`; evaluation:
//! as given), cuts the order into batches (training drops the last partial batch, evaluation keeps it) and
//! builds batch `b` on worker `b mod workers`, each worker `prefetch` batches ahead through its own bounded
//! channel. Sample `p` of an epoch is augmented with [`augment::draw`]`(seed, epoch, p)`, so the batches are the
//! same whatever the number of workers, and a resumed run reproduces them bit for bit.
//!
//! Pinned host memory: [`EpochIter`] hands out `Vec<f32>` batches. A caller that owns its buffers (e.g.
//! page-locked memory for asynchronous copies to a GPU) calls [`Loader::fill`] with its own slice instead; it is
//! the same code path the workers run, so both give identical values.

use super::augment::{self, AugConfig, AugParams};
use super::split_mix;
use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_pcg::Pcg64;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Where a loader's images and labels come from: the prepared cache, or anything else square u8 HWC.
pub trait ImageSource: Send + Sync {
    /// Side of every image in pixels.
    fn size(&self) -> usize;
    /// Number of images.
    fn len(&self) -> usize;
    /// Whether there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// HWC RGB bytes of image `i` (`size·size·3`).
    fn image(&self, i: usize) -> &[u8];
    /// Class index of image `i`.
    fn label(&self, i: usize) -> usize;
}

/// In-memory images, for tests and small experiments.
#[derive(Clone, Debug)]
pub struct VecSource {
    /// Side of every image.
    pub size: usize,
    /// Images, each `size·size·3` bytes.
    pub images: Vec<Vec<u8>>,
    /// Labels, one per image.
    pub labels: Vec<usize>,
}

impl ImageSource for VecSource {
    fn size(&self) -> usize {
        self.size
    }
    fn len(&self) -> usize {
        self.images.len()
    }
    fn image(&self, i: usize) -> &[u8] {
        &self.images[i]
    }
    fn label(&self, i: usize) -> usize {
        self.labels[i]
    }
}

/// How a [`Loader`] builds batches.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Side of the output images (224 for the seed).
    pub out_size: u32,
    /// Seed of shuffling and augmentation.
    pub seed: u64,
    /// Training: shuffle, augment, drop the last partial batch. Evaluation: none of these.
    pub train: bool,
    /// Background worker threads (at least 1).
    pub workers: usize,
    /// Batches each worker may hold ready ahead of the consumer.
    pub prefetch: usize,
    /// Augmentation ranges (training only).
    pub aug: AugConfig,
}

impl LoaderConfig {
    /// Training defaults: seed pipeline augmentation, workers = cores − 1 (at least 1), 2 batches ahead each.
    pub fn train(batch_size: usize, out_size: u32, seed: u64) -> Self {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1));
        LoaderConfig { batch_size, out_size, seed, train: true, workers, prefetch: 2, aug: AugConfig::default() }
    }

    /// Evaluation defaults: like [`LoaderConfig::train`] without shuffling, augmentation or dropped batches.
    pub fn eval(batch_size: usize, out_size: u32) -> Self {
        LoaderConfig { train: false, ..Self::train(batch_size, out_size, 0) }
    }
}

/// One batch: images NHWC `[B, S, S, 3]` normalized f32, their labels and their indices in the source.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `B·S·S·3` values, sample-major then HWC.
    pub images: Vec<f32>,
    /// Class per sample.
    pub labels: Vec<usize>,
    /// Source index per sample.
    pub indices: Vec<usize>,
    /// Side S.
    pub size: usize,
    /// Batch number within its epoch.
    pub batch: usize,
}

struct Inner {
    src: Arc<dyn ImageSource>,
    items: Vec<usize>,
    cfg: LoaderConfig,
}

/// Builds batches over a subset of an [`ImageSource`] (e.g. the training indices).
#[derive(Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

impl Loader {
    /// A loader over `items` (indices into `src`).
    pub fn new(src: Arc<dyn ImageSource>, items: Vec<usize>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.out_size == 0 {
            bail!("loader: batch size and output size must be at least 1");
        }
        if let Some(&bad) = items.iter().find(|&&i| i >= src.len()) {
            bail!("loader: item {bad} is out of range for a source of {} images", src.len());
        }
        Ok(Loader { inner: Arc::new(Inner { src, items, cfg }) })
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.inner.items.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.inner.items.is_empty()
    }

    /// Floats per image (`S·S·3`).
    pub fn image_len(&self) -> usize {
        let s = self.inner.cfg.out_size as usize;
        s * s * 3
    }

    /// Batches per epoch (training drops the last partial batch).
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.len(), self.inner.cfg.batch_size);
        if self.inner.cfg.train { n / b } else { n.div_ceil(b) }
    }

    /// The items in epoch `epoch`'s order.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order = self.inner.items.clone();
        if self.inner.cfg.train {
            let mut rng = Pcg64::seed_from_u64(split_mix(split_mix(self.inner.cfg.seed ^ 0x5348_5546) ^ epoch));
            order.shuffle(&mut rng);
        }
        order
    }

    /// The loader's configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.inner.cfg
    }

    /// The image source.
    pub fn source(&self) -> &Arc<dyn ImageSource> {
        &self.inner.src
    }

    /// The augmentation of sample `position` of `epoch` in a training loader: what [`Loader::fill`] applies to
    /// it (the one place the loader draws parameters; the device-side epoch plan calls it too).
    pub fn train_params(&self, epoch: u64, position: u64) -> Result<AugParams> {
        train_params(&self.inner, epoch, position)
    }

    /// Fills `images` (`len · S·S·3` floats for the batch's `len` samples) with batch `batch` of `order` (from
    /// [`Loader::epoch_order`]); returns (labels, indices). The hook for caller-owned (e.g. pinned) buffers.
    pub fn fill(
        &self,
        epoch: u64,
        order: &[usize],
        batch: usize,
        images: &mut [f32],
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        fill_batch(&self.inner, epoch, order, batch, images)
    }

    /// Iterates over epoch `epoch`'s batches, built by background workers.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        let order = Arc::new(self.epoch_order(epoch));
        let nb = self.batches_per_epoch();
        let workers = self.inner.cfg.workers.max(1).min(nb.max(1));
        let mut rxs = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx): (SyncSender<Result<Batch>>, Receiver<Result<Batch>>) =
                sync_channel(self.inner.cfg.prefetch.max(1));
            let (inner, order) = (Arc::clone(&self.inner), Arc::clone(&order));
            handles.push(std::thread::spawn(move || {
                for b in (w..nb).step_by(workers) {
                    let r = build_batch(&inner, epoch, &order, b);
                    // A closed channel means the consumer stopped early: just finish.
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            }));
            rxs.push(rx);
        }
        EpochIter { rxs, handles, next: 0, batches: nb }
    }
}

fn train_params(inner: &Inner, epoch: u64, position: u64) -> Result<AugParams> {
    let size = u32::try_from(inner.src.size()).context("image side does not fit u32")?;
    Ok(augment::draw(&inner.cfg.aug, inner.cfg.seed, epoch, position, size, size))
}

fn batch_range(inner: &Inner, order_len: usize, batch: usize) -> (usize, usize) {
    let b = inner.cfg.batch_size;
    let start = (batch * b).min(order_len);
    (start, (start + b).min(order_len))
}

fn fill_batch(
    inner: &Inner,
    epoch: u64,
    order: &[usize],
    batch: usize,
    images: &mut [f32],
) -> Result<(Vec<usize>, Vec<usize>)> {
    let (start, end) = batch_range(inner, order.len(), batch);
    let s = inner.cfg.out_size as usize;
    let per = s * s * 3;
    if start == end || images.len() != (end - start) * per {
        bail!(
            "loader: batch {batch} has {} samples, the buffer {} floats ({per} per sample)",
            end - start,
            images.len()
        );
    }
    let src_size = inner.src.size();
    let size32 = u32::try_from(src_size).context("image side does not fit u32")?;
    let mut labels = Vec::with_capacity(end - start);
    for (k, (&idx, out)) in order[start..end].iter().zip(images.chunks_exact_mut(per)).enumerate() {
        let img = inner.src.image(idx);
        if inner.cfg.train {
            let p = train_params(inner, epoch, (start + k) as u64)?;
            augment::apply(img, size32, inner.cfg.out_size, &p, out)?;
        } else if src_size == s {
            augment::normalize_eval(img, out)?;
        } else {
            augment::apply(img, size32, inner.cfg.out_size, &AugParams::identity(size32), out)?;
        }
        labels.push(inner.src.label(idx));
    }
    Ok((labels, order[start..end].to_vec()))
}

fn build_batch(inner: &Inner, epoch: u64, order: &[usize], batch: usize) -> Result<Batch> {
    let (start, end) = batch_range(inner, order.len(), batch);
    let s = inner.cfg.out_size as usize;
    let floats = (end - start) * s * s * 3;
    let mut images = Vec::new();
    images.try_reserve_exact(floats).map_err(|_| {
        anyhow::anyhow!(
            "cannot allocate a batch of {} images of {s}x{s} ({} of f32): lower --batch-size or --image-size",
            end - start,
            super::human_bytes(floats as u64 * 4)
        )
    })?;
    images.resize(floats, 0f32);
    let (labels, indices) = fill_batch(inner, epoch, order, batch, &mut images)?;
    Ok(Batch { images, labels, indices, size: s, batch })
}

/// The batches of one epoch, in order. Dropping it early stops the workers.
pub struct EpochIter {
    rxs: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    batches: usize,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.batches || self.rxs.is_empty() {
            return None;
        }
        let w = self.next % self.rxs.len();
        self.next += 1;
        Some(self.rxs[w].recv().unwrap_or_else(|_| Err(anyhow::anyhow!("loader worker {w} stopped unexpectedly"))))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.batches - self.next.min(self.batches);
        (n, Some(n))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the channels first unblocks workers waiting to send.
        self.rxs.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(n: usize, size: usize) -> Arc<VecSource> {
        let images = (0..n).map(|i| (0..size * size * 3).map(|k| ((i * 31 + k * 7) % 256) as u8).collect()).collect();
        Arc::new(VecSource { size, images, labels: (0..n).map(|i| i % 3).collect() })
    }

    #[test]
    fn train_epoch_shuffles_drops_last_and_ignores_worker_count() {
        let src = source(23, 6);
        let mut cfg = LoaderConfig::train(5, 6, 11);
        cfg.workers = 1;
        let one = Loader::new(src.clone(), (0..23).collect(), cfg.clone()).unwrap();
        cfg.workers = 3;
        let three = Loader::new(src.clone(), (0..23).collect(), cfg).unwrap();
        assert_eq!(one.batches_per_epoch(), 4);
        let a: Vec<Batch> = one.epoch(2).map(Result::unwrap).collect();
        let b: Vec<Batch> = three.epoch(2).map(Result::unwrap).collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
        let order = one.epoch_order(2);
        let mut seen: Vec<usize> = a.iter().flat_map(|x| x.indices.clone()).collect();
        assert_eq!(seen, order[..20].to_vec());
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 20);
        assert_ne!(order, (0..23).collect::<Vec<_>>());
        assert_ne!(one.epoch_order(3), order);
        for x in &a {
            assert_eq!(x.images.len(), 5 * 6 * 6 * 3);
            assert_eq!(x.labels, x.indices.iter().map(|i| i % 3).collect::<Vec<_>>());
        }
        // The fill hook gives the same values as the workers.
        let mut buf = vec![0f32; 5 * 108];
        let (labels, idx) = one.fill(2, &order, 1, &mut buf).unwrap();
        assert_eq!((labels, idx, buf), (a[1].labels.clone(), a[1].indices.clone(), a[1].images.clone()));
        // Stopping early is fine.
        let mut it = three.epoch(5);
        assert!(it.next().unwrap().is_ok());
        drop(it);
    }

    #[test]
    fn eval_keeps_order_and_last_partial_batch() {
        let src = source(7, 4);
        let l = Loader::new(src.clone(), vec![6, 0, 3, 2, 5], LoaderConfig::eval(2, 4)).unwrap();
        let batches: Vec<Batch> = l.epoch(0).map(Result::unwrap).collect();
        assert_eq!(
            batches.iter().map(|b| b.indices.clone()).collect::<Vec<_>>(),
            vec![vec![6, 0], vec![3, 2], vec![5]]
        );
        let last = &batches[2];
        assert_eq!(last.images.len(), 48);
        for (k, v) in last.images.iter().enumerate() {
            let c = k % 3;
            let want = (f32::from(src.images[5][k]) / 255.0 - augment::IMAGENET_MEAN[c]) / augment::IMAGENET_STD[c];
            assert!((v - want).abs() < 1e-6);
        }
    }
}
