//! Dropout and stochastic depth with counter masks: a mask is its key, never a buffer. The kernels recompute
//! `uniform01(key, index) >= p` (index = element, or sample for stochastic depth), so backward is the same launch
//! on the output gradient, and the CPU reference draws the same mask from the same key.

use super::{Cuda, Tensor, View, by_dtype};
use crate::backend::{MaskKind, MaskSource};
use crate::ops::dropout::cuda::MaskSeed;
use anyhow::{Result, bail, ensure};

/// A counter mask: its key (or, in a replayed step, where on the device its key is), drop probability and grouping
/// (elements per mask value).
#[derive(Clone, Copy, Debug)]
pub struct CudaMask {
    key: u64,
    device_key: Option<View>,
    p: f32,
    kind: MaskKind,
    group: usize,
    numel: usize,
}

pub(super) fn draw_mask(
    cu: &Cuda,
    kind: MaskKind,
    x_shape: &[usize],
    p: f64,
    source: MaskSource<'_>,
) -> Result<CudaMask> {
    let MaskSource::Counter { key, layer } = source else {
        bail!(
            "the CUDA backend draws only counter masks (the kernels' rule); a host-drawn mask cannot be reproduced \
             on the device: set Ctx::counter_masks"
        )
    };
    ensure!((0.0..1.0).contains(&p), "mask probability {p} must be in [0, 1) on the CUDA backend");
    let numel: usize = x_shape.iter().product();
    let group = match kind {
        MaskKind::Element => 1,
        MaskKind::Row => {
            let n = x_shape.first().copied().unwrap_or(0);
            ensure!(n > 0, "stochastic depth on an empty batch {x_shape:?}");
            (numel / n).max(1)
        }
    };
    let device_key = match cu.mask_keys {
        None => None,
        Some((keys, layers)) => {
            ensure!(
                layer < layers as u64,
                "mask layer {layer} is past the device's key table of {layers} layers: record with a larger table"
            );
            Some(View { buf: keys.buf, offset: keys.offset + layer as usize * 8, bytes: 8 })
        }
    };
    Ok(CudaMask { key, device_key, p: p as f32, kind, group, numel })
}

pub(super) fn apply_mask(cu: &mut Cuda, x: &Tensor, mask: &CudaMask) -> Result<Tensor> {
    cu.expect_act("mask input", x)?;
    ensure!(x.numel() == mask.numel, "mask drawn for {} elements applied to {:?}", mask.numel, x.shape);
    let m = *mask;
    let y = cu.alloc("masked y", &x.shape, x.dtype);
    let (xv, yv, dt, n) = (x.view, y.view, x.dtype, x.numel());
    let name = match m.kind {
        MaskKind::Element => format!("dropout p={} [{n}]", m.p),
        MaskKind::Row => format!("stochastic depth p={} [{n}]", m.p),
    };
    let mut reads = vec![x.access()];
    reads.extend(m.device_key.map(|k| k.all()));
    cu.push(name, reads, vec![y.access()], move |b| {
        let gpu = b.gpu();
        let s = &gpu.stream;
        let seed = match m.device_key {
            Some(k) => MaskSeed::Device(k.get(b)?),
            None => MaskSeed::Host(m.key),
        };
        by_dtype!(dt, T => match m.kind {
            MaskKind::Element => gpu.kernels.dropout_with::<T>(s, yv.get(b)?, xv.get(b)?, m.p, seed, n),
            MaskKind::Row => gpu.kernels.stochastic_depth_with::<T>(s, yv.get(b)?, xv.get(b)?, None, m.p, seed, (n, m.group)),
        })
    });
    Ok(y)
}
