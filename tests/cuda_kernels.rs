//! Every CUDA kernel against a plain CPU reference written here, on fresh random inputs with odd sizes, outputs
//! poisoned with NaN before the launch, every element compared. Without a usable GPU each test prints
//! "SKIPPED (no CUDA device): ..." and returns.

use derma::cuda::alloc::Block;
use derma::cuda::kernels::{
    AdamParams, BnParams, DevSlice, DwParams, LossParams, Unary, bn_workspace_bytes, dw_weight_workspace_bytes,
};
use derma::cuda::{Gpu, probe, uniform01};
use half::f16;

/// The GPU when the driver, a device and the kernels are all there; otherwise prints why the test is skipped.
fn gpu(test: &str) -> Option<Gpu> {
    let p = probe();
    let usable =
        p.driver && p.driver_error.is_none() && p.kernels_built && p.devices.first().is_some_and(|d| d.kernels_run);
    if !usable {
        let why = p.missing_for(0).join("; ");
        println!("SKIPPED (no CUDA device): {test}: {why}");
        return None;
    }
    let sel = derma::cuda::Selected::Cuda(p.devices[0].clone());
    Some(Gpu::open(&sel).expect("a probed GPU opens"))
}

/// xorshift64*: fresh inputs without depending on a rand version.
struct Rng(u64);
impl Rng {
    fn new() -> Self {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        println!("seed {t}");
        Rng(t | 1)
    }
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 40) as f32 / 16_777_216.0) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn poisoned(g: &Gpu, n: usize) -> Block {
    g.upload(&vec![f32::NAN; n]).unwrap()
}

fn poisoned16(g: &Gpu, n: usize) -> Block {
    g.upload(&vec![f16::NAN; n]).unwrap()
}

fn s(b: &Block) -> DevSlice<'_> {
    DevSlice::of(b)
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(g.is_finite() && err <= atol + rtol * w.abs(), "{what}[{i}]: got {g}, want {w} (err {err:.3e})");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    println!("{what}: worst abs error {:.3e} at {}", worst.0, worst.1);
}

/// A reference forward function.
type Fwd = fn(f64) -> f64;
/// A reference backward function of (x, dy).
type Bwd = fn(f64, f64) -> f64;

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn cuda_elementwise_f32_and_f16() {
    let Some(g) = gpu("cuda_elementwise_f32_and_f16") else { return };
    let mut r = Rng::new();
    for n in [1usize, 7, 1003, 4096 + 3] {
        let x = r.vec(n, 6.0);
        let dy = r.vec(n, 1.0);
        let (bx, bdy) = (g.upload(&x).unwrap(), g.upload(&dy).unwrap());
        let cases: [(Unary, Fwd, Bwd); 3] = [
            (Unary::Silu, |x| x * sig(x), |x, d| d * (sig(x) * (1.0 + x * (1.0 - sig(x))))),
            (Unary::Sigmoid, sig, |x, d| d * sig(x) * (1.0 - sig(x))),
            (Unary::Relu, |x| x.max(0.0), |x, d| if x > 0.0 { d } else { 0.0 }),
        ];
        for (op, f, df) in cases {
            let y = poisoned(&g, n);
            g.kernels.unary::<f32>(&g.stream, op, s(&y), s(&bx), n).unwrap();
            let got: Vec<f32> = g.download(&y, n).unwrap();
            let want: Vec<f64> = x.iter().map(|&v| f(v as f64)).collect();
            assert_close(&format!("{op:?} n={n}"), &got, &want, 1e-6, 1e-5);
            // Sigmoid's backward takes the forward output.
            let saved = if op == Unary::Sigmoid { &y } else { &bx };
            let dx = poisoned(&g, n);
            g.kernels.unary_backward::<f32>(&g.stream, op, s(&dx), s(saved), s(&bdy), n).unwrap();
            let got: Vec<f32> = g.download(&dx, n).unwrap();
            let want: Vec<f64> = x.iter().zip(&dy).map(|(&v, &d)| df(v as f64, d as f64)).collect();
            assert_close(&format!("{op:?} backward n={n}"), &got, &want, 1e-6, 1e-4);
        }
        let y = poisoned(&g, n);
        g.kernels.add::<f32>(&g.stream, s(&y), s(&bx), s(&bdy), n).unwrap();
        let want: Vec<f64> = x.iter().zip(&dy).map(|(&a, &b)| a as f64 + b as f64).collect();
        assert_close("add", &g.download(&y, n).unwrap(), &want, 1e-6, 1e-6);
        g.kernels.scale::<f32>(&g.stream, s(&y), s(&bx), -0.5, n, false).unwrap();
        let want: Vec<f64> = x.iter().map(|&a| -0.5 * a as f64).collect();
        assert_close("scale", &g.download(&y, n).unwrap(), &want, 1e-6, 1e-6);
        g.kernels.scale::<f32>(&g.stream, s(&y), s(&bdy), 2.0, n, true).unwrap();
        let want: Vec<f64> = x.iter().zip(&dy).map(|(&a, &b)| -0.5 * a as f64 + 2.0 * b as f64).collect();
        assert_close("axpy", &g.download(&y, n).unwrap(), &want, 1e-6, 1e-6);

        // fp16 storage, fp32 math: compare with the reference on the rounded input, to fp16 output precision.
        let x16: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let bx16 = g.upload(&x16).unwrap();
        let y16 = poisoned16(&g, n);
        g.kernels.unary::<f16>(&g.stream, Unary::Silu, s(&y16), s(&bx16), n).unwrap();
        let got: Vec<f32> = g.download::<f16>(&y16, n).unwrap().iter().map(|v| v.to_f32()).collect();
        let want: Vec<f64> = x16.iter().map(|v| v.to_f64() * sig(v.to_f64())).collect();
        assert_close("silu f16", &got, &want, 1e-3, 1e-3);
    }
    // An unaligned view (offset by one element) takes the scalar path.
    let n = 1001;
    let x = r.vec(n + 1, 3.0);
    let bx = g.upload(&x).unwrap();
    let y = poisoned(&g, n + 1);
    let (xv, yv) = (DevSlice::range(&bx, 4, n * 4).unwrap(), DevSlice::range(&y, 4, n * 4).unwrap());
    g.kernels.unary::<f32>(&g.stream, Unary::Relu, yv, xv, n).unwrap();
    let got: Vec<f32> = g.download(&y, n + 1).unwrap();
    let want: Vec<f64> = x[1..].iter().map(|&v| (v as f64).max(0.0)).collect();
    assert_close("relu unaligned", &got[1..], &want, 0.0, 0.0);
    // Too-short buffers are refused before the launch.
    assert!(g.kernels.unary::<f32>(&g.stream, Unary::Relu, s(&y), s(&bx), n + 2).is_err());
}

/// Batch norm (+SiLU) forward and backward in f64: returns (y, dx, dgamma, dbeta, mean, invstd).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn bn_reference(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    beta: &[f32],
    m: usize,
    c: usize,
    eps: f64,
    act: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for r in 0..m {
        for j in 0..c {
            mean[j] += x[r * c + j] as f64 / m as f64;
        }
    }
    for r in 0..m {
        for j in 0..c {
            var[j] += (x[r * c + j] as f64 - mean[j]).powi(2) / m as f64;
        }
    }
    let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let (mut y, mut dz) = (vec![0.0; m * c], vec![0.0; m * c]);
    let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
    for r in 0..m {
        for j in 0..c {
            let i = r * c + j;
            let xh = (x[i] as f64 - mean[j]) * invstd[j];
            let z = gamma[j] as f64 * xh + beta[j] as f64;
            y[i] = if act { z * sig(z) } else { z };
            dz[i] = dy[i] as f64 * if act { sig(z) * (1.0 + z * (1.0 - sig(z))) } else { 1.0 };
            db[j] += dz[i];
            dg[j] += dz[i] * xh;
        }
    }
    let mut dx = vec![0.0; m * c];
    for r in 0..m {
        for j in 0..c {
            let i = r * c + j;
            let xh = (x[i] as f64 - mean[j]) * invstd[j];
            dx[i] = gamma[j] as f64 * invstd[j] * (dz[i] - (db[j] + xh * dg[j]) / m as f64);
        }
    }
    (y, dx, dg, db, mean, invstd)
}

#[test]
fn cuda_batchnorm_silu_forward_backward() {
    let Some(g) = gpu("cuda_batchnorm_silu_forward_backward") else { return };
    let mut r = Rng::new();
    for (m, c, act) in [(3 * 37, 20, true), (2 * 7 * 9, 32, true), (1500, 24, false), (5, 3, true)] {
        // An offset mean makes naive E[x^2]-E[x]^2 lose digits; the kernel shifts first.
        let x: Vec<f32> = r.vec(m * c, 2.0).iter().map(|v| v + 5.0).collect();
        let dy = r.vec(m * c, 1.0);
        let gamma: Vec<f32> = r.vec(c, 0.5).iter().map(|v| v + 1.0).collect();
        let beta = r.vec(c, 0.5);
        let p = BnParams {
            m: m as i64,
            c: c as i32,
            act: act as i32,
            eps: 1e-3,
            momentum: 0.1,
            training: 1,
            rows_split: 0,
        };
        let (bx, bdy, bg, bb) =
            (g.upload(&x).unwrap(), g.upload(&dy).unwrap(), g.upload(&gamma).unwrap(), g.upload(&beta).unwrap());
        let (mean, invstd) = (poisoned(&g, c), poisoned(&g, c));
        let rm = g.upload(&vec![0.0f32; c]).unwrap();
        let rv = g.upload(&vec![1.0f32; c]).unwrap();
        let ws = g.zeros(bn_workspace_bytes(m as i64, c as i32)).unwrap();
        g.kernels
            .bn_stats::<f32>(&g.stream, &p, s(&bx), s(&mean), s(&invstd), Some(s(&rm)), Some(s(&rv)), s(&ws))
            .unwrap();
        let y = poisoned(&g, m * c);
        g.kernels.bn_forward::<f32>(&g.stream, &p, s(&y), s(&bx), s(&mean), s(&invstd), s(&bg), s(&bb)).unwrap();
        let (dx, dgam, dbet, sums) = (poisoned(&g, m * c), poisoned(&g, c), poisoned(&g, c), poisoned(&g, 2 * c));
        g.kernels
            .bn_backward::<f32>(
                &g.stream,
                &p,
                s(&dx),
                s(&bx),
                s(&bdy),
                s(&mean),
                s(&invstd),
                s(&bg),
                s(&bb),
                Some(s(&dgam)),
                Some(s(&dbet)),
                s(&ws),
                s(&sums),
            )
            .unwrap();
        let (ry, rdx, rdg, rdb, rmean, rinv) = bn_reference(&x, &dy, &gamma, &beta, m, c, 1e-3, act);
        let tag = format!("bn m={m} c={c}");
        assert_close(&format!("{tag} mean"), &g.download(&mean, c).unwrap(), &rmean, 1e-5, 1e-5);
        assert_close(&format!("{tag} invstd"), &g.download(&invstd, c).unwrap(), &rinv, 1e-5, 1e-4);
        assert_close(&format!("{tag} y"), &g.download(&y, m * c).unwrap(), &ry, 1e-4, 1e-4);
        assert_close(&format!("{tag} dgamma"), &g.download(&dgam, c).unwrap(), &rdg, 1e-3, 1e-4);
        assert_close(&format!("{tag} dbeta"), &g.download(&dbet, c).unwrap(), &rdb, 1e-3, 1e-4);
        assert_close(&format!("{tag} dx"), &g.download(&dx, m * c).unwrap(), &rdx, 1e-4, 1e-3);
        let want_rm: Vec<f64> = rmean.iter().map(|v| 0.1 * v).collect();
        assert_close(&format!("{tag} running_mean"), &g.download(&rm, c).unwrap(), &want_rm, 1e-5, 1e-5);
        let want_rv: Vec<f64> = rinv
            .iter()
            .map(|is| {
                let var = 1.0 / (is * is) - 1e-3;
                0.9 + 0.1 * var * m as f64 / (m as f64 - 1.0)
            })
            .collect();
        assert_close(&format!("{tag} running_var"), &g.download(&rv, c).unwrap(), &want_rv, 1e-4, 1e-4);
    }
}

fn dw_reference(x: &[f32], w: &[f32], p: &DwParams) -> Vec<f64> {
    let (n, h, wd, c, ho, wo, k) = (p.n, p.h, p.w, p.c, p.ho, p.wo, p.k);
    let mut y = vec![0.0; (n * ho * wo * c) as usize];
    for b in 0..n {
        for oh in 0..ho {
            for ow in 0..wo {
                for ch in 0..c {
                    let mut acc = 0.0;
                    for kh in 0..k {
                        for kw in 0..k {
                            let (ih, iw) = (oh * p.stride - p.pad + kh, ow * p.stride - p.pad + kw);
                            if ih >= 0 && ih < h && iw >= 0 && iw < wd {
                                acc += x[(((b * h + ih) * wd + iw) * c + ch) as usize] as f64
                                    * w[((kh * k + kw) * c + ch) as usize] as f64;
                            }
                        }
                    }
                    y[(((b * ho + oh) * wo + ow) * c + ch) as usize] = acc;
                }
            }
        }
    }
    y
}

#[test]
fn cuda_depthwise_forward_backward() {
    let Some(g) = gpu("cuda_depthwise_forward_backward") else { return };
    let mut r = Rng::new();
    for (n, h, w, c, k, st) in [(2, 9, 7, 12, 3, 1), (3, 11, 10, 8, 5, 2), (1, 6, 6, 5, 3, 2), (2, 8, 8, 16, 5, 1)] {
        let pad = (k - 1) / 2;
        let (ho, wo) = ((h + 2 * pad - k) / st + 1, (w + 2 * pad - k) / st + 1);
        let p = DwParams { n, h, w, c, ho, wo, k, stride: st, pad, rows_split: 0 };
        let (nx, ny, nw) = ((n * h * w * c) as usize, (n * ho * wo * c) as usize, (k * k * c) as usize);
        let (x, wt, dy) = (r.vec(nx, 1.0), r.vec(nw, 1.0), r.vec(ny, 1.0));
        let (bx, bw, bdy) = (g.upload(&x).unwrap(), g.upload(&wt).unwrap(), g.upload(&dy).unwrap());
        let y = poisoned(&g, ny);
        g.kernels.dw_forward::<f32>(&g.stream, &p, s(&y), s(&bx), s(&bw)).unwrap();
        let tag = format!("dw n={n} {h}x{w} c={c} k={k} s={st}");
        assert_close(&format!("{tag} y"), &g.download(&y, ny).unwrap(), &dw_reference(&x, &wt, &p), 1e-5, 1e-5);
        // Backward data and weight: scatter each dy through the taps that produced it.
        let dx = poisoned(&g, nx);
        g.kernels.dw_backward_data::<f32>(&g.stream, &p, s(&dx), s(&bdy), s(&bw)).unwrap();
        let dw = poisoned(&g, nw);
        let ws = g.zeros(dw_weight_workspace_bytes(&p)).unwrap();
        g.kernels.dw_backward_weight::<f32>(&g.stream, &p, s(&dw), s(&bx), s(&bdy), s(&ws), false).unwrap();
        let (mut rdx, mut rdw) = (vec![0.0f64; nx], vec![0.0f64; nw]);
        for b in 0..n {
            for oh in 0..ho {
                for ow in 0..wo {
                    for ch in 0..c {
                        let gy = dy[(((b * ho + oh) * wo + ow) * c + ch) as usize] as f64;
                        for kh in 0..k {
                            for kw in 0..k {
                                let (ih, iw) = (oh * st - pad + kh, ow * st - pad + kw);
                                if ih >= 0 && ih < h && iw >= 0 && iw < w {
                                    let xi = (((b * h + ih) * w + iw) * c + ch) as usize;
                                    let wi = ((kh * k + kw) * c + ch) as usize;
                                    rdx[xi] += gy * wt[wi] as f64;
                                    rdw[wi] += gy * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_close(&format!("{tag} dx"), &g.download(&dx, nx).unwrap(), &rdx, 1e-5, 1e-5);
        assert_close(&format!("{tag} dw"), &g.download(&dw, nw).unwrap(), &rdw, 1e-4, 1e-5);
        // Accumulation adds onto what is there.
        g.kernels.dw_backward_weight::<f32>(&g.stream, &p, s(&dw), s(&bx), s(&bdy), s(&ws), true).unwrap();
        let twice: Vec<f64> = rdw.iter().map(|v| 2.0 * v).collect();
        assert_close(&format!("{tag} dw accumulated"), &g.download(&dw, nw).unwrap(), &twice, 1e-4, 1e-5);
        // fp16 forward against the reference on rounded inputs.
        let (x16, w16): (Vec<f16>, Vec<f16>) =
            (x.iter().map(|&v| f16::from_f32(v)).collect(), wt.iter().map(|&v| f16::from_f32(v)).collect());
        let (bx16, bw16, y16) = (g.upload(&x16).unwrap(), g.upload(&w16).unwrap(), poisoned16(&g, ny));
        g.kernels.dw_forward::<f16>(&g.stream, &p, s(&y16), s(&bx16), s(&bw16)).unwrap();
        let xr: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
        let wr: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let got: Vec<f32> = g.download::<f16>(&y16, ny).unwrap().iter().map(|v| v.to_f32()).collect();
        assert_close(&format!("{tag} y f16"), &got, &dw_reference(&xr, &wr, &p), 5e-3, 2e-3);
    }
}

#[test]
fn cuda_se_pool_and_scale() {
    let Some(g) = gpu("cuda_se_pool_and_scale") else { return };
    let mut r = Rng::new();
    for (n, hw, c) in [(3, 49, 40), (2, 17, 7), (4, 1, 32)] {
        let nt = (n * hw * c) as usize;
        let (x, dy, sc, dp) =
            (r.vec(nt, 1.0), r.vec(nt, 1.0), r.vec((n * c) as usize, 1.0), r.vec((n * c) as usize, 1.0));
        let (bx, bdy, bs, bdp) =
            (g.upload(&x).unwrap(), g.upload(&dy).unwrap(), g.upload(&sc).unwrap(), g.upload(&dp).unwrap());
        let idx = |b: i32, q: i32, ch: i32| ((b * hw + q) * c + ch) as usize;
        let pooled = poisoned(&g, (n * c) as usize);
        g.kernels.se_pool::<f32>(&g.stream, s(&pooled), s(&bx), n, hw, c).unwrap();
        let mut want = vec![0.0f64; (n * c) as usize];
        let (mut want_y, mut want_dx, mut want_ds, mut want_pdx) =
            (vec![0.0; nt], vec![0.0; nt], vec![0.0; (n * c) as usize], vec![0.0; nt]);
        for b in 0..n {
            for q in 0..hw {
                for ch in 0..c {
                    let i = idx(b, q, ch);
                    let j = (b * c + ch) as usize;
                    want[j] += x[i] as f64 / hw as f64;
                    want_y[i] = x[i] as f64 * sc[j] as f64;
                    want_dx[i] = dy[i] as f64 * sc[j] as f64;
                    want_ds[j] += dy[i] as f64 * x[i] as f64;
                    want_pdx[i] = dp[j] as f64 / hw as f64;
                }
            }
        }
        let tag = format!("se n={n} hw={hw} c={c}");
        assert_close(&format!("{tag} pool"), &g.download(&pooled, (n * c) as usize).unwrap(), &want, 1e-5, 1e-5);
        let pdx = poisoned(&g, nt);
        g.kernels.se_pool_backward::<f32>(&g.stream, s(&pdx), s(&bdp), n, hw, c).unwrap();
        assert_close(&format!("{tag} pool backward"), &g.download(&pdx, nt).unwrap(), &want_pdx, 1e-6, 1e-6);
        let y = poisoned(&g, nt);
        g.kernels.se_scale::<f32>(&g.stream, s(&y), s(&bx), s(&bs), n, hw, c).unwrap();
        assert_close(&format!("{tag} scale"), &g.download(&y, nt).unwrap(), &want_y, 1e-6, 1e-6);
        let (dx, ds) = (poisoned(&g, nt), poisoned(&g, (n * c) as usize));
        g.kernels
            .se_scale_backward::<f32>(&g.stream, Some(s(&dx)), s(&ds), s(&bx), s(&bs), s(&bdy), (n, hw, c))
            .unwrap();
        assert_close(&format!("{tag} scale dx"), &g.download(&dx, nt).unwrap(), &want_dx, 1e-6, 1e-6);
        assert_close(&format!("{tag} scale ds"), &g.download(&ds, (n * c) as usize).unwrap(), &want_ds, 1e-5, 1e-5);
    }
}

#[test]
fn cuda_dropout_masks_match_the_cpu_rng() {
    let Some(g) = gpu("cuda_dropout_masks_match_the_cpu_rng") else { return };
    let mut r = Rng::new();
    let (n, p, seed) = (10_007usize, 0.3f32, 0xDEAD_BEEFu64);
    let x = r.vec(n, 1.0);
    let bx = g.upload(&x).unwrap();
    let y = poisoned(&g, n);
    g.kernels.dropout::<f32>(&g.stream, s(&y), s(&bx), p, seed, n).unwrap();
    let want: Vec<f64> =
        (0..n).map(|i| if uniform01(seed, i as u64) >= p { x[i] as f64 / (1.0 - p as f64) } else { 0.0 }).collect();
    assert_close("dropout", &g.download(&y, n).unwrap(), &want, 1e-6, 1e-6);
    let per = 1001;
    let res = r.vec(n - n % per, 1.0);
    let m = res.len();
    let bres = g.upload(&res).unwrap();
    let y2 = poisoned(&g, m);
    g.kernels.stochastic_depth::<f32>(&g.stream, s(&y2), s(&bx), Some(s(&bres)), 0.5, seed, (m, per)).unwrap();
    let want: Vec<f64> = (0..m)
        .map(|i| {
            let keep = uniform01(seed, (i / per) as u64) >= 0.5;
            res[i] as f64 + if keep { 2.0 * x[i] as f64 } else { 0.0 }
        })
        .collect();
    assert_close("stochastic depth", &g.download(&y2, m).unwrap(), &want, 1e-6, 1e-6);
}

#[test]
fn cuda_softmax_ce_and_focal_loss() {
    let Some(g) = gpu("cuda_softmax_ce_and_focal_loss") else { return };
    let mut r = Rng::new();
    let (b, k) = (301usize, 9usize);
    let logits = r.vec(b * k, 4.0);
    let targets: Vec<i32> = (0..b).map(|_| ((r.next() + 1.0) * 4.5) as i32 % k as i32).collect();
    let alpha: Vec<f32> = (0..k).map(|j| 0.5 + j as f32 * 0.25).collect();
    let (bl, bt, ba) = (g.upload(&logits).unwrap(), g.upload(&targets).unwrap(), g.upload(&alpha).unwrap());
    for (focal, gamma) in [(false, 0.0f32), (true, 2.0), (true, 0.5)] {
        let p = LossParams { b: b as i32, k: k as i32, focal: focal as i32, gamma, grad_scale: 1.0, pad_: 0 };
        let (loss, dl, bad) = (poisoned(&g, 1), poisoned(&g, b * k), g.zeros(4).unwrap());
        g.kernels
            .softmax_loss::<f32>(&g.stream, &p, s(&loss), s(&dl), None, s(&bad), s(&bl), s(&bt), Some(s(&ba)))
            .unwrap();
        // f64 reference.
        let mut total = 0.0;
        let wsum: f64 = targets.iter().map(|&t| alpha[t as usize] as f64).sum();
        let denom = if focal { b as f64 } else { wsum };
        let mut grad = vec![0.0; b * k];
        for i in 0..b {
            let z: Vec<f64> = logits[i * k..(i + 1) * k].iter().map(|&v| v as f64).collect();
            let mx = z.iter().cloned().fold(f64::MIN, f64::max);
            let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            let y = targets[i] as usize;
            let a = alpha[y] as f64;
            let nll = lse - z[y];
            let coef = if focal {
                let ce = a * nll;
                let pt = (-ce).exp();
                let g = gamma as f64;
                total += (1.0 - pt).powf(g) * ce;
                ((1.0 - pt).powf(g) + if pt < 1.0 { g * (1.0 - pt).powf(g - 1.0) * pt * ce } else { 0.0 }) * a
            } else {
                total += a * nll;
                a
            };
            for j in 0..k {
                let pj = (z[j] - lse).exp();
                grad[i * k + j] = coef / denom * (pj - if j == y { 1.0 } else { 0.0 });
            }
        }
        let tag = if focal { format!("focal gamma={gamma}") } else { "weighted CE".into() };
        assert_close(&format!("{tag} loss"), &g.download(&loss, 1).unwrap(), &[total / denom], 1e-5, 1e-5);
        assert_close(&format!("{tag} dlogits"), &g.download(&dl, b * k).unwrap(), &grad, 1e-6, 1e-4);
        assert_eq!(g.download::<i32>(&bad, 1).unwrap(), vec![0]);
    }
    // A target outside [0, K) is reported with its 1-based row.
    let mut t2 = targets.clone();
    t2[17] = k as i32;
    let bt2 = g.upload(&t2).unwrap();
    let p = LossParams { b: b as i32, k: k as i32, focal: 0, gamma: 0.0, grad_scale: 1.0, pad_: 0 };
    let (loss, dl, bad) = (poisoned(&g, 1), poisoned(&g, b * k), g.zeros(4).unwrap());
    g.kernels.softmax_loss::<f32>(&g.stream, &p, s(&loss), s(&dl), None, s(&bad), s(&bl), s(&bt2), None).unwrap();
    assert_eq!(g.download::<i32>(&bad, 1).unwrap(), vec![18]);
}

#[test]
fn cuda_unscale_and_adamw() {
    let Some(g) = gpu("cuda_unscale_and_adamw") else { return };
    let mut r = Rng::new();
    let n = 4099;
    let grads16: Vec<f16> = r.vec(n, 100.0).iter().map(|&v| f16::from_f32(v)).collect();
    let bg16 = g.upload(&grads16).unwrap();
    let (out, fi) = (poisoned(&g, n), g.zeros(4).unwrap());
    g.kernels.unscale::<f16>(&g.stream, s(&out), s(&bg16), 1.0 / 1024.0, s(&fi), n).unwrap();
    let want: Vec<f64> = grads16.iter().map(|v| v.to_f64() / 1024.0).collect();
    assert_close("unscale f16", &g.download(&out, n).unwrap(), &want, 0.0, 1e-7);
    assert_eq!(g.download::<i32>(&fi, 1).unwrap(), vec![0]);
    let mut bad = grads16.clone();
    bad[n - 1] = f16::INFINITY;
    let bbad = g.upload(&bad).unwrap();
    g.kernels.unscale::<f16>(&g.stream, s(&out), s(&bbad), 1.0 / 1024.0, s(&fi), n).unwrap();
    assert_eq!(g.download::<i32>(&fi, 1).unwrap(), vec![1], "an inf must be detected");

    // AdamW, three steps, against the scalar torch formula in f64.
    let (p0, m0, v0) = (r.vec(n, 1.0), vec![0.0f32; n], vec![0.0f32; n]);
    let (bp, bm, bv, p16) = (g.upload(&p0).unwrap(), g.upload(&m0).unwrap(), g.upload(&v0).unwrap(), poisoned16(&g, n));
    let zero = g.zeros(4).unwrap();
    let (lr, b1, b2, eps, wd) = (1e-3f32, 0.9f32, 0.999f32, 1e-8f32, 0.01f32);
    let (mut p, mut m, mut v): (Vec<f64>, Vec<f64>, Vec<f64>) =
        (p0.iter().map(|&x| x as f64).collect(), vec![0.0; n], vec![0.0; n]);
    for t in 1..=3u64 {
        let gr = r.vec(n, 1.0);
        let bgr = g.upload(&gr).unwrap();
        let a = AdamParams::for_step(n, t, lr, (b1, b2), eps, wd);
        g.kernels.adamw(&g.stream, &a, s(&bp), s(&bgr), s(&bm), s(&bv), Some(s(&p16)), Some(s(&zero))).unwrap();
        let (lr, b1, b2, eps, wd) = (lr as f64, b1 as f64, b2 as f64, eps as f64, wd as f64);
        for i in 0..n {
            let gi = gr[i] as f64;
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let denom = v[i].sqrt() / (1.0 - b2.powi(t as i32)).sqrt() + eps;
            p[i] -= lr / (1.0 - b1.powi(t as i32)) * m[i] / denom;
        }
    }
    assert_close("adamw p", &g.download(&bp, n).unwrap(), &p, 1e-6, 1e-5);
    assert_close("adamw m", &g.download(&bm, n).unwrap(), &m, 1e-6, 1e-5);
    assert_close("adamw v", &g.download(&bv, n).unwrap(), &v, 1e-7, 1e-5);
    let got16: Vec<f32> = g.download::<f16>(&p16, n).unwrap().iter().map(|v| v.to_f32()).collect();
    assert_close("adamw fp16 copy", &got16, &p, 1e-3, 1e-3);
    // found_inf set: the step is skipped entirely.
    let before: Vec<f32> = g.download(&bp, n).unwrap();
    let one = g.upload(&[1i32]).unwrap();
    let a = AdamParams::for_step(n, 4, lr, (b1, b2), eps, wd);
    g.kernels.adamw(&g.stream, &a, s(&bp), s(&bp), s(&bm), s(&bv), None, Some(s(&one))).unwrap();
    assert_eq!(g.download::<f32>(&bp, n).unwrap(), before);
}

#[test]
fn cuda_allocator_steady_state_on_device() {
    let Some(g) = gpu("cuda_allocator_steady_state_on_device") else { return };
    let sizes = [1usize << 20, 12345, 77, 3 << 20];
    for _ in 0..4 {
        let blocks: Vec<Block> = sizes.iter().map(|&b| g.alloc.alloc(b).unwrap()).collect();
        drop(blocks);
    }
    let st = g.alloc.stats();
    assert_eq!(st.raw_allocs, sizes.len() as u64, "{st:?}");
    assert_eq!(st.in_use, 0);
    g.alloc.set_context("batch size 1");
    let e = g.alloc.alloc(1 << 50).err().expect("a petabyte cannot be allocated").to_string();
    assert!(e.contains("batch size 1") && e.contains("asked for"), "{e}");
}

#[test]
fn cuda_cublaslt_gemm_f16() {
    let Some(g) = gpu("cuda_cublaslt_gemm_f16") else { return };
    if !probe().cublaslt {
        println!("SKIPPED (no cuBLASLt): cuda_cublaslt_gemm_f16");
        return;
    }
    let blas = derma::cuda::blas::Blas::new(g.stream.clone()).unwrap();
    let mut r = Rng::new();
    for (m, k, n, ta, tb) in [(37, 24, 40, false, false), (64, 32, 16, true, false), (8, 16, 24, false, true)] {
        let a: Vec<f16> = r.vec(m * k, 1.0).iter().map(|&v| f16::from_f32(v)).collect();
        let b: Vec<f16> = r.vec(k * n, 1.0).iter().map(|&v| f16::from_f32(v)).collect();
        let (ba, bb, bc) = (g.upload(&a).unwrap(), g.upload(&b).unwrap(), poisoned16(&g, m * n));
        let spec = derma::cuda::blas::Gemm { m, n, k, trans_a: ta, trans_b: tb };
        blas.gemm::<f16>(&spec, 1.0, s(&ba), s(&bb), 0.0, s(&bc)).unwrap();
        let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] }.to_f64();
        let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] }.to_f64();
        let want: Vec<f64> = (0..m * n).map(|ij| (0..k).map(|p| at(ij / n, p) * bt(p, ij % n)).sum()).collect();
        let got: Vec<f32> = g.download::<f16>(&bc, m * n).unwrap().iter().map(|v| v.to_f32()).collect();
        assert_close(&format!("gemm {m}x{k}x{n} ta={ta} tb={tb}"), &got, &want, 1e-2, 2e-3);
    }
}

#[test]
fn cuda_cudnn_conv_f32() {
    let Some(g) = gpu("cuda_cudnn_conv_f32") else { return };
    if !probe().cudnn {
        println!("SKIPPED (no cuDNN): cuda_cudnn_conv_f32");
        return;
    }
    use derma::cuda::dnn::{ConvShape, Dnn, Pass};
    let dnn = Dnn::new(g.stream.clone()).unwrap();
    let mut r = Rng::new();
    let sh = ConvShape { n: 2, c_in: 3, h: 11, w: 9, c_out: 8, k: 3, stride: 2, pad: 1, groups: 1, half: false };
    let (ho, wo) = sh.out_hw();
    let (nx, nw, ny) = ((2 * 11 * 9 * 3) as usize, (8 * 3 * 3 * 3) as usize, (2 * ho * wo * 8) as usize);
    let (x, w, dy) = (r.vec(nx, 1.0), r.vec(nw, 1.0), r.vec(ny, 1.0));
    let (bx, bw, bdy) = (g.upload(&x).unwrap(), g.upload(&w).unwrap(), g.upload(&dy).unwrap());
    let ws_bytes = [Pass::Forward, Pass::BackwardData, Pass::BackwardFilter]
        .iter()
        .map(|&p| dnn.workspace_bytes(&sh, p).unwrap())
        .max()
        .unwrap();
    let ws = g.zeros(ws_bytes.max(1)).unwrap();
    let (y, dx, dw) = (poisoned(&g, ny), poisoned(&g, nx), poisoned(&g, nw));
    dnn.forward::<f32>(&sh, s(&bx), s(&bw), s(&y), s(&ws)).unwrap();
    dnn.backward_data::<f32>(&sh, s(&bdy), s(&bw), s(&dx), s(&ws)).unwrap();
    dnn.backward_filter::<f32>(&sh, s(&bx), s(&bdy), s(&dw), s(&ws), false).unwrap();
    let (mut ry, mut rdx, mut rdw) = (vec![0.0f64; ny], vec![0.0f64; nx], vec![0.0f64; nw]);
    for b in 0..2 {
        for oh in 0..ho {
            for ow in 0..wo {
                for co in 0..8 {
                    let yi = (((b * ho + oh) * wo + ow) * 8 + co) as usize;
                    for kh in 0..3 {
                        for kw in 0..3 {
                            let (ih, iw) = (oh * 2 - 1 + kh, ow * 2 - 1 + kw);
                            if !(0..11).contains(&ih) || !(0..9).contains(&iw) {
                                continue;
                            }
                            for ci in 0..3 {
                                let xi = (((b * 11 + ih) * 9 + iw) * 3 + ci) as usize;
                                let wi = (((co * 3 + kh) * 3 + kw) * 3 + ci) as usize;
                                ry[yi] += x[xi] as f64 * w[wi] as f64;
                                rdx[xi] += dy[yi] as f64 * w[wi] as f64;
                                rdw[wi] += dy[yi] as f64 * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    // cuDNN may use TF32 tensor cores for fp32: tolerances allow ~1e-3 relative.
    assert_close("conv y", &g.download(&y, ny).unwrap(), &ry, 5e-3, 5e-3);
    assert_close("conv dx", &g.download(&dx, nx).unwrap(), &rdx, 5e-3, 5e-3);
    assert_close("conv dw", &g.download(&dw, nw).unwrap(), &rdw, 5e-3, 5e-3);
}
