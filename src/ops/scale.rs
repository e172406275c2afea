//! Per-(sample, channel) scaling, the last step of squeeze-excite: `y[n,h,w,c] = x[n,h,w,c] · s[n,c]`.

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::tensor::{Array, Float};
use anyhow::{Result, bail};
use rayon::prelude::*;

/// Reference forward.
pub fn forward<T: Float>(x: &[T], s: &[T], hw: usize, c: usize, y: &mut [T]) {
    y.par_chunks_mut(hw * c).zip(x.par_chunks(hw * c)).enumerate().for_each(|(n, (ys, xs))| {
        let sc = &s[n * c..(n + 1) * c];
        for (yp, xp) in ys.chunks_mut(c).zip(xs.chunks(c)) {
            for ch in 0..c {
                yp[ch] = xp[ch] * sc[ch];
            }
        }
    });
}

/// Reference backward: `dx = dy · s`, `ds[n,c] = Σ_hw dy · x` (f64 accumulation).
pub fn backward<T: Float>(x: &[T], s: &[T], dy: &[T], hw: usize, c: usize, dx: Option<&mut [T]>, ds: Option<&mut [T]>) {
    if let Some(dx) = dx {
        forward(dy, s, hw, c, dx);
    }
    if let Some(ds) = ds {
        ds.par_chunks_mut(c).enumerate().for_each(|(n, dsn)| {
            let mut acc = vec![0.0f64; c];
            let base = n * hw * c;
            for (xp, gp) in x[base..base + hw * c].chunks(c).zip(dy[base..base + hw * c].chunks(c)) {
                for ch in 0..c {
                    acc[ch] += (xp[ch] * gp[ch]).as_f64();
                }
            }
            dsn.iter_mut().zip(&acc).for_each(|(d, &a)| *d = T::of_f64(a));
        });
    }
}

struct ScaleBackward;

impl<T: Float> Backward<T> for ScaleBackward {
    fn name(&self) -> &'static str {
        "channel_scale"
    }
    fn backward(&self, ctx: &BackwardCtx<'_, T>, dy: &Array<T>) -> Result<Vec<Option<Array<T>>>> {
        let (x, s) = (ctx.inputs[0], ctx.inputs[1]);
        let (hw, c) = (x.shape[1] * x.shape[2], x.shape[3]);
        let mut dx = ctx.needs[0].then(|| Array::zeros(&x.shape));
        let mut ds = ctx.needs[1].then(|| Array::zeros(&s.shape));
        backward(
            &x.data,
            &s.data,
            &dy.data,
            hw,
            c,
            dx.as_mut().map(|a| a.data.as_mut_slice()),
            ds.as_mut().map(|a| a.data.as_mut_slice()),
        );
        Ok(vec![dx, ds])
    }
}

/// Records `x[N,H,W,C] · s[N,C]`.
pub fn channel_scale<T: Float>(tape: &mut Tape<T>, x: Var, s: Var) -> Result<Var> {
    let xs = tape.shape(x).to_vec();
    super::expect_rank("channel_scale", "input", &xs, 4)?;
    if tape.shape(s) != [xs[0], xs[3]] {
        bail!("channel_scale: scale shape {:?}, expected [{}, {}]", tape.shape(s), xs[0], xs[3]);
    }
    let mut y = Array::zeros(&xs);
    forward(&tape.value(x).data, &tape.value(s).data, xs[1] * xs[2], xs[3], &mut y.data);
    Ok(tape.push_op(&[x, s], y, Box::new(ScaleBackward)))
}
