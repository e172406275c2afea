//! CUDA launches of this family: gradient unscaling with the inf/NaN flag and the AdamW step (kernels/optim.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).
//!
//! The step keeps everything on the device (scale, overflow flag, learning rates, step counts), so it can be
//! captured in a CUDA graph and replayed across steps, scale changes and learning-rate decays:
//!
//! 1. [`Kernels::amp_unscale`]: the gradients × 1/scale in place, the overflow flag set in [`ScalerState`];
//! 2. [`Kernels::adamw_prepare`]: per trainable parameter, its step count + 1 and its [`AdamCoeffs`] (learning
//!    rates and step counts from device memory);
//! 3. [`Kernels::adamw_apply`]: one flat launch over the whole trainable range (element → parameter through a
//!    table with one entry per 64 elements, built by [`adam_tables`]);
//! 4. [`Kernels::scaler_update`]: `GradScaler::update` on the device state, and the flag cleared.
//!
//! Steps 2 and 3 do nothing when the flag is set (a skipped step changes no weight, moment or step count), and
//! every step reproduces the CPU reference ([`crate::train::adamw::AdamW::step_one`],
//! [`crate::train::scaler::GradScaler`]) bit for bit (see the kernels' comments for why this holds on a GPU too).
//!
//! Layout the trainer keeps: the trainable parameters are a suffix of the parameter order, held as one flat f32
//! range with the gradients, `m` and `v` laid out alike; each parameter's region starts at a multiple of
//! [`ADAM_CHUNK`] elements and padding holds zeros. `steps` and `coeffs` are indexed like the entries table; keep
//! them for every parameter in parameter order and pass the trainable suffix, so an unfreeze (new entries in
//! front) leaves every earlier parameter's count where it was and the newly trainable ones start at t = 0, with
//! zero moments, as torch's lazily created state does.

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, KernelArg, Kernels, Launch, no_alias, opt_checked, span};
use crate::train::adamw::AdamWConfig;
use crate::train::scaler::GradScalerConfig;
use anyhow::{Result, bail, ensure};
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// Elements per entry of the chunk table: every parameter's region starts at a multiple of this.
pub const ADAM_CHUNK: usize = 64;

/// Device mirror of [`crate::train::scaler::GradScaler`]'s state (kernels/optim.cu `ScalerState`), 16 bytes, read
/// and written only by kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ScalerState {
    /// The loss scale.
    pub scale: f32,
    /// Consecutive clean steps since the last growth or overflow.
    pub growth_tracker: i32,
    /// Nonzero once [`Kernels::amp_unscale`] saw an inf/NaN this step; cleared by [`Kernels::scaler_update`].
    pub found_inf: i32,
    /// Steps skipped so far (one per overflow).
    pub skipped: i32,
}

impl ScalerState {
    /// The state of a fresh scaler: `init_scale`, no clean steps, no overflow.
    pub fn new(cfg: &GradScalerConfig) -> Self {
        Self { scale: cfg.init_scale, growth_tracker: 0, found_inf: 0, skipped: 0 }
    }

    /// The device state of a (possibly resumed) enabled scaler: its scale and growth tracker, no overflow pending.
    pub fn from_scaler(s: &crate::train::scaler::GradScaler) -> Result<Self> {
        ensure!(s.is_enabled(), "a disabled loss scaler has no device state: run the step without one");
        let growth_tracker = i32::try_from(s.growth_tracker())
            .map_err(|_| anyhow::anyhow!("loss scaler growth tracker {} does not fit int32", s.growth_tracker()))?;
        Ok(Self { scale: s.scale(), growth_tracker, found_inf: 0, skipped: 0 })
    }
}

/// Per trainable parameter: element offset from the range start, length, and learning-rate group index
/// (kernels/optim.cu `AdamEntry`, 24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamEntry {
    /// First element, from the start of the trainable range (a multiple of [`ADAM_CHUNK`]).
    pub offset: i64,
    /// Elements.
    pub len: i64,
    /// Index into the learning rates.
    pub group: i32,
    /// Zero (C layout padding).
    pub pad_: i32,
}

/// One parameter's step scalars, written by [`Kernels::adamw_prepare`] and read by [`Kernels::adamw_apply`]
/// (kernels/optim.cu `AdamCoeffs`, 32 bytes): f32, computed in f64 as `step_one` computes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamCoeffs {
    /// 1 − lr·weight_decay.
    pub decay: f32,
    /// 1 − β1.
    pub one_minus_beta1: f32,
    /// β2.
    pub beta2: f32,
    /// 1 − β2.
    pub one_minus_beta2: f32,
    /// √(1 − β2^t).
    pub bc2_sqrt: f32,
    /// −lr / (1 − β1^t).
    pub neg_step_size: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// Zero (C layout padding).
    pub pad_: i32,
}

impl AdamCoeffs {
    /// The scalars of step `t` (1-based, as after the increment) at learning rate `lr`, computed on the host with
    /// the formulas of `step_one` (what [`Kernels::adamw_prepare`] computes on the device).
    pub fn for_step(t: u64, lr: f64, hyper: &AdamHyper) -> Self {
        let t = t as f64;
        Self {
            decay: (1.0 - lr * hyper.weight_decay) as f32,
            one_minus_beta1: (1.0 - hyper.beta1) as f32,
            beta2: hyper.beta2 as f32,
            one_minus_beta2: (1.0 - hyper.beta2) as f32,
            bc2_sqrt: (1.0 - hyper.beta2.powf(t)).sqrt() as f32,
            neg_step_size: (-(lr / (1.0 - hyper.beta1.powf(t)))) as f32,
            eps: hyper.eps as f32,
            pad_: 0,
        }
    }
}

/// AdamW's hyper-parameters as [`Kernels::adamw_prepare`] takes them (kernels/optim.cu `AdamHyper`, a kernel
/// parameter of 32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamHyper {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl From<&AdamWConfig> for AdamHyper {
    fn from(c: &AdamWConfig) -> Self {
        Self { beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay }
    }
}

// SAFETY (the four impls below): plain #[repr(C)] structs of integers and floats without padding, laid out exactly
// like their kernels/optim.cu mirrors (pinned by the layout tests below).
unsafe impl DeviceRepr for ScalerState {}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamEntry {}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamCoeffs {}
// SAFETY: as above; AdamHyper is also passed by value as one kernel parameter of that C layout.
unsafe impl DeviceRepr for AdamHyper {}
// SAFETY: as above.
unsafe impl KernelArg for AdamHyper {}

/// The entries table and the chunk table for the trainable range of `n` elements, from `(offset, len, group)`
/// per trainable parameter (offsets from the range start, multiples of [`ADAM_CHUNK`]; the regions must not
/// overlap and must end by `n`). Entry `i` is region `i`; chunk `c` (elements `64c..64c+64`) holds the index of
/// the region it lies in, or −1.
pub fn adam_tables(regions: &[(usize, usize, usize)], n: usize) -> Result<(Vec<AdamEntry>, Vec<i32>)> {
    ensure!(
        regions.len() <= i32::MAX as usize,
        "AdamW tables: {} parameters do not fit the device's int32 index",
        regions.len()
    );
    ensure!(n <= i64::MAX as usize, "AdamW tables: a range of {n} elements does not fit int64");
    let mut chunks = vec![-1i32; n.div_ceil(ADAM_CHUNK)];
    let mut entries = Vec::with_capacity(regions.len());
    for (i, &(offset, len, group)) in regions.iter().enumerate() {
        if offset % ADAM_CHUNK != 0 {
            bail!(
                "AdamW tables: parameter {i} starts at element {offset}, not a multiple of {ADAM_CHUNK}; pad the \
                 flat layout so every parameter starts on a {ADAM_CHUNK}-element boundary"
            );
        }
        let end = offset.checked_add(len).filter(|&e| e <= n);
        let Some(end) = end else {
            bail!("AdamW tables: parameter {i} ({offset}+{len} elements) runs past the {n}-element trainable range")
        };
        ensure!(group <= i32::MAX as usize, "AdamW tables: parameter {i} has group {group}, beyond int32");
        for (c, slot) in chunks.iter_mut().enumerate().take(end.div_ceil(ADAM_CHUNK)).skip(offset / ADAM_CHUNK) {
            if *slot >= 0 {
                bail!(
                    "AdamW tables: parameters {} and {i} share chunk {c} (elements {}..{}): regions overlap or \
                     one does not start on a fresh {ADAM_CHUNK}-element boundary",
                    *slot,
                    c * ADAM_CHUNK,
                    (c + 1) * ADAM_CHUNK
                );
            }
            *slot = i as i32;
        }
        entries.push(AdamEntry { offset: offset as i64, len: len as i64, group: group as i32, pad_: 0 });
    }
    Ok((entries, chunks))
}

impl Kernels {
    /// In place: `grads[0..n] *= f32(1/f64(state.scale))`, and `state.found_inf = 1` if any element was inf/NaN
    /// (checked before unscaling; every element is unscaled regardless). The scale is read from the device, never
    /// a host argument, so the launch can sit in a captured graph. Nothing clears `found_inf` here (several
    /// gradient buffers may be unscaled into one flag); [`Self::scaler_update`] does.
    pub fn amp_unscale(&self, s: &Stream, grads: DevSlice, state: DevSlice, n: usize) -> Result<()> {
        let g = grads.checked::<f32>(n, "amp_unscale grads")?;
        let st = state.checked::<ScalerState>(1, "amp_unscale scaler state")?;
        no_alias("amp_unscale", &[span::<f32>("grads", g, n), span::<ScalerState>("scaler state", st, 1)], &[])?;
        let f = self.entry("optim", "amp_unscale_f32")?;
        let n64 = n as i64;
        // SAFETY: grads holds n f32 and state one ScalerState (checked above), and they do not overlap.
        unsafe { Launch::new(&f).arg(&g).arg(&st).arg(&n64).run(s, self.flat_cfg(n.div_ceil(4)))? };
        Ok(())
    }

    /// One small launch over `params` entries: unless `state.found_inf` (`state` None: never skip), `steps[i] += 1`
    /// (i64) and `coeffs[i]` from `lrs[entries[i].group]` (`groups` f64 learning rates on the device) and the new
    /// `steps[i]`, with `step_one`'s f64 formulas. On a skip, steps and coeffs are left as they are. An entry whose
    /// group is not below `groups` gets NaN coefficients (its weights turn NaN) instead of reading out of bounds.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_prepare(
        &self,
        s: &Stream,
        coeffs: DevSlice,
        steps: DevSlice,
        entries: DevSlice,
        lrs: DevSlice,
        state: Option<DevSlice>,
        hyper: &AdamHyper,
        groups: usize,
        params: usize,
    ) -> Result<()> {
        ensure!(params <= i32::MAX as usize, "adamw_prepare: {params} parameters do not fit int32");
        ensure!(groups <= i32::MAX as usize, "adamw_prepare: {groups} learning-rate groups do not fit int32");
        let c = coeffs.checked::<AdamCoeffs>(params, "adamw_prepare coeffs")?;
        let st = steps.checked::<i64>(params, "adamw_prepare steps")?;
        let e = entries.checked::<AdamEntry>(params, "adamw_prepare entries")?;
        let l = lrs.checked::<f64>(groups, "adamw_prepare learning rates")?;
        let sc = opt_checked::<ScalerState>(state, 1, "adamw_prepare scaler state")?;
        no_alias(
            "adamw_prepare",
            &[span::<AdamCoeffs>("coeffs", c, params), span::<i64>("steps", st, params)],
            &[
                span::<AdamEntry>("entries", e, params),
                span::<f64>("learning rates", l, groups),
                span::<ScalerState>("scaler state", sc, 1),
            ],
        )?;
        if params == 0 {
            return Ok(());
        }
        let f = self.entry("optim", "adamw_prepare")?;
        let (g32, p32) = (groups as i32, params as i32);
        // SAFETY: every table holds `params` records and lrs `groups` values (checked above); a null state is
        // skipped by the kernel; the kernel reads lrs only at indices below `groups`.
        unsafe {
            Launch::new(&f)
                .arg(&c)
                .arg(&st)
                .arg(&e)
                .arg(&l)
                .arg(&sc)
                .arg(hyper)
                .arg(&g32)
                .arg(&p32)
                .run(s, self.flat_cfg(params))?
        };
        Ok(())
    }

    /// Flat over the `n`-element trainable range: element i uses `coeffs[chunk_param[i / 64]]` (the i32 table of
    /// [`adam_tables`], one entry per [`ADAM_CHUNK`] elements; `params` coefficient records); returns at once
    /// when `state.found_inf`; p, m, v updated exactly as `step_one`; `half[i] = f16(p[i])` (round to nearest)
    /// when given. Chunks marked −1 are not touched.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_apply(
        &self,
        s: &Stream,
        p: DevSlice,
        g: DevSlice,
        m: DevSlice,
        v: DevSlice,
        half: Option<DevSlice>,
        coeffs: DevSlice,
        chunk_param: DevSlice,
        state: Option<DevSlice>,
        params: usize,
        n: usize,
    ) -> Result<()> {
        ensure!(params <= i32::MAX as usize, "adamw_apply: {params} parameters do not fit int32");
        let (p, g) = (p.checked::<f32>(n, "adamw_apply params")?, g.checked::<f32>(n, "adamw_apply grads")?);
        let (m, v) = (m.checked::<f32>(n, "adamw_apply m")?, v.checked::<f32>(n, "adamw_apply v")?);
        let h = opt_checked::<half::f16>(half, n, "adamw_apply f16 copy")?;
        let chunks = n.div_ceil(ADAM_CHUNK);
        let c = coeffs.checked::<AdamCoeffs>(params, "adamw_apply coeffs")?;
        let cp = chunk_param.checked::<i32>(chunks, "adamw_apply chunk table")?;
        let sc = opt_checked::<ScalerState>(state, 1, "adamw_apply scaler state")?;
        no_alias(
            "adamw_apply",
            &[
                span::<f32>("params", p, n),
                span::<f32>("m", m, n),
                span::<f32>("v", v, n),
                span::<half::f16>("f16 copy", h, n),
            ],
            &[
                span::<f32>("grads", g, n),
                span::<AdamCoeffs>("coeffs", c, params),
                span::<i32>("chunk table", cp, chunks),
                span::<ScalerState>("scaler state", sc, 1),
            ],
        )?;
        if n == 0 {
            return Ok(());
        }
        let f = self.entry("optim", "adamw_apply")?;
        let (p32, n64) = (params as i32, n as i64);
        // SAFETY: p, g, m, v (and half) hold n elements, the chunk table n/64 rounded up, coeffs `params` records
        // (checked above; the kernel skips chunk indices outside [0, params)); null half / state are skipped.
        unsafe {
            Launch::new(&f)
                .arg(&p)
                .arg(&g)
                .arg(&m)
                .arg(&v)
                .arg(&h)
                .arg(&c)
                .arg(&cp)
                .arg(&sc)
                .arg(&p32)
                .arg(&n64)
                .run(s, self.flat_cfg(n.div_ceil(4)))?
        };
        Ok(())
    }

    /// One thread: `GradScaler::update` on the device state (`cfg`'s growth and backoff factors and interval),
    /// then `skipped += found_inf` and `found_inf = 0` (ready for the next step).
    pub fn scaler_update(&self, s: &Stream, state: DevSlice, cfg: &GradScalerConfig) -> Result<()> {
        cfg.validate()?;
        ensure!(
            cfg.growth_interval <= i32::MAX as u32,
            "loss scaler growth_interval {} does not fit the device's int32 counter",
            cfg.growth_interval
        );
        let st = state.checked::<ScalerState>(1, "scaler_update scaler state")?;
        let f = self.entry("optim", "scaler_update")?;
        let (growth, backoff, interval) = (cfg.growth_factor, cfg.backoff_factor, cfg.growth_interval as i32);
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: state holds one ScalerState (checked above); the kernel touches nothing else.
        unsafe { Launch::new(&f).arg(&st).arg(&growth).arg(&backoff).arg(&interval).run(s, one)? };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_structs_match_the_cu_layout() {
        use std::mem::{align_of, offset_of};
        assert_eq!(size_of::<ScalerState>(), 16);
        assert_eq!([offset_of!(ScalerState, scale), offset_of!(ScalerState, growth_tracker)], [0, 4]);
        assert_eq!([offset_of!(ScalerState, found_inf), offset_of!(ScalerState, skipped)], [8, 12]);
        assert_eq!((size_of::<AdamEntry>(), align_of::<AdamEntry>()), (24, 8));
        assert_eq!(
            [offset_of!(AdamEntry, len), offset_of!(AdamEntry, group), offset_of!(AdamEntry, pad_)],
            [8, 16, 20]
        );
        assert_eq!((size_of::<AdamCoeffs>(), align_of::<AdamCoeffs>()), (32, 4));
        assert_eq!(offset_of!(AdamCoeffs, bc2_sqrt), 16);
        assert_eq!(offset_of!(AdamCoeffs, neg_step_size), 20);
        assert_eq!(offset_of!(AdamCoeffs, eps), 24);
        assert_eq!((size_of::<AdamHyper>(), align_of::<AdamHyper>()), (32, 8));
        assert_eq!(offset_of!(AdamHyper, weight_decay), 24);
    }

    #[test]
    fn tables_map_chunks_to_parameters() {
        let (e, c) = adam_tables(&[(0, 70, 0), (128, 64, 1), (256, 1, 0)], 257).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[1], AdamEntry { offset: 128, len: 64, group: 1, pad_: 0 });
        // 70 elements cover chunks 0 and 1; chunk 2 is parameter 1; chunk 3 is a gap; chunk 4 holds one element.
        assert_eq!(c, vec![0, 0, 1, -1, 2]);
        let (e, c) = adam_tables(&[], 100).unwrap();
        assert!(e.is_empty());
        assert_eq!(c, vec![-1, -1]);
        let err = adam_tables(&[(0, 10, 0), (32, 10, 0)], 64).unwrap_err().to_string();
        assert!(err.contains("parameter 1 starts at element 32"), "{err}");
        let err = adam_tables(&[(0, 10, 0), (0, 10, 0)], 64).unwrap_err().to_string();
        assert!(err.contains("share chunk 0"), "{err}");
        let err = adam_tables(&[(64, 10, 0)], 70).unwrap_err().to_string();
        assert!(err.contains("runs past the 70-element"), "{err}");
        assert!(adam_tables(&[(usize::MAX - 63, 10, 0)], 70).is_err());
    }

    #[test]
    fn adam_scalars_are_computed_in_f64() {
        let cfg = crate::train::adamw::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let hyper = AdamHyper::from(&cfg);
        let a = AdamCoeffs::for_step(1, 1e-3, &hyper);
        // 1 − β2 from the f64 0.999 is 0.001 to f32 precision; from 0.999f32 it would be 0.000999987.
        assert_eq!(a.one_minus_beta2, 0.001f32);
        assert_ne!(a.one_minus_beta2, 1.0 - 0.999f32);
        assert_eq!(a.one_minus_beta1, 0.1f32);
        assert_eq!(a.bc2_sqrt, (0.001f64).sqrt() as f32);
        assert_eq!(a.neg_step_size, -0.01f32);
        assert_eq!(a.decay, (1.0 - 1e-5f64) as f32);
        let a = AdamCoeffs::for_step(3, 2e-3, &hyper);
        assert_eq!(a.neg_step_size, (-(2e-3 / (1.0 - 0.9f64.powi(3)))) as f32);
        assert_eq!(a.bc2_sqrt, (1.0 - 0.999f64.powi(3)).sqrt() as f32);
    }
}
