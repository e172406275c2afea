//! Gradient checks: analytic gradients from the tape against central finite differences, in f64.
//!
//! The scalar checked is `L = Σ out ⊙ r` with `r` drawn at random, so every output element's gradient path is
//! exercised with a different weight (a plain sum would hide errors that cancel).

use super::{ParamStore, Tape, Var};
use crate::tensor::Array;
use anyhow::{Result, bail};
use rand::{RngExt, SeedableRng};

/// Tolerances of a check: an element passes when `|analytic − numeric| ≤ atol + rtol·|numeric|`.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub eps: f64,
    pub atol: f64,
    pub rtol: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self { eps: 1e-6, atol: 1e-7, rtol: 1e-5 }
    }
}

/// Result of a passing check: the worst element seen.
#[derive(Clone, Debug)]
pub struct Report {
    pub checked: usize,
    pub max_abs_err: f64,
}

fn projection(shape: &[usize], seed: u64) -> Array<f64> {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let n = crate::tensor::numel(shape);
    Array { shape: shape.to_vec(), data: (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() }
}

fn dot(a: &Array<f64>, b: &Array<f64>) -> f64 {
    a.data.iter().zip(&b.data).map(|(x, y)| x * y).sum()
}

fn compare(what: &str, idx: usize, analytic: f64, numeric: f64, tol: Tolerance, rep: &mut Report) -> Result<()> {
    let err = (analytic - numeric).abs();
    rep.checked += 1;
    rep.max_abs_err = rep.max_abs_err.max(err);
    // Written so that a NaN on either side fails too.
    let ok = err <= tol.atol + tol.rtol * numeric.abs();
    if !ok {
        bail!("{what}[{idx}]: analytic {analytic:e} vs numeric {numeric:e} (|Δ| {err:e})");
    }
    Ok(())
}

/// Checks the gradients of `f` with respect to each input array (leaves on the tape).
pub fn check_inputs<F>(inputs: &[Array<f64>], mut f: F, tol: Tolerance) -> Result<Report>
where
    F: FnMut(&mut Tape<f64>, &[Var]) -> Result<Var>,
{
    let mut store = ParamStore::new();
    let mut tape = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|a| tape.leaf(a.clone())).collect();
    let out = f(&mut tape, &vars)?;
    let r = projection(tape.shape(out), 7);
    let grads = tape.backward_with(out, r.clone(), &mut store)?;
    let mut rep = Report { checked: 0, max_abs_err: 0.0 };
    let mut eval = |xs: &[Array<f64>]| -> Result<f64> {
        let mut t = Tape::inference();
        let vs: Vec<Var> = xs.iter().map(|a| t.constant(a.clone())).collect();
        let o = f(&mut t, &vs)?;
        Ok(dot(t.value(o), &r))
    };
    let mut xs = inputs.to_vec();
    for (k, v) in vars.iter().enumerate() {
        let analytic = grads.get(*v).map_or_else(|| Array::zeros(&inputs[k].shape), |g| (**g).clone());
        for i in 0..inputs[k].numel() {
            let x0 = xs[k].data[i];
            xs[k].data[i] = x0 + tol.eps;
            let lp = eval(&xs)?;
            xs[k].data[i] = x0 - tol.eps;
            let lm = eval(&xs)?;
            xs[k].data[i] = x0;
            compare(&format!("input {k}"), i, analytic.data[i], (lp - lm) / (2.0 * tol.eps), tol, &mut rep)?;
        }
    }
    Ok(rep)
}

/// Checks the gradients of `f` with respect to every trainable parameter in `store`, and that frozen ones got
/// no gradient buffer.
pub fn check_params<F>(store: &mut ParamStore<f64>, mut f: F, tol: Tolerance) -> Result<Report>
where
    F: FnMut(&mut Tape<f64>, &ParamStore<f64>) -> Result<Var>,
{
    store.zero_grad();
    let mut tape = Tape::new();
    let out = f(&mut tape, store)?;
    let r = projection(tape.shape(out), 11);
    tape.backward_with(out, r.clone(), store)?;
    let mut rep = Report { checked: 0, max_abs_err: 0.0 };
    for id in 0..store.len() {
        let p = store.get(id);
        if !p.trainable {
            if store.grad(id).is_some() {
                bail!("frozen parameter {} received a gradient buffer", p.name);
            }
            continue;
        }
        let analytic = store.grad(id).map_or_else(|| vec![0.0; p.value.numel()], <[f64]>::to_vec);
        let name = p.name.clone();
        for (i, &want) in analytic.iter().enumerate() {
            let x0 = store.get(id).value.data[i];
            let mut at = |x: f64, store: &mut ParamStore<f64>| -> Result<f64> {
                store.get_mut(id).value_mut().data[i] = x;
                let mut t = Tape::inference();
                let o = f(&mut t, store)?;
                Ok(dot(t.value(o), &r))
            };
            let lp = at(x0 + tol.eps, store)?;
            let lm = at(x0 - tol.eps, store)?;
            store.get_mut(id).value_mut().data[i] = x0;
            compare(&name, i, want, (lp - lm) / (2.0 * tol.eps), tol, &mut rep)?;
        }
    }
    Ok(rep)
}
