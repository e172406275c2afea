//! Graph capture and replay on the device layer: a sequence of different work (an activation kernel, an add, a
//! cuBLASLt GEMM, a cuDNN convolution, a depthwise convolution kernel taking a parameter struct, a device fill, an
//! axpy kernel and a device copy) captured once and replayed; and a recorded step program captured whole.
//! Checked: nothing runs during capture (outputs keep their poison), a replay equals the eager run bit for bit and
//! the CPU closed forms within f32 rounding, replays read their inputs when they run (new contents written in
//! place between replays give new results), replays allocate nothing, and what a capture cannot hold (host
//! copies, syncs, allocations, a nested capture, a cuDNN algorithm search) fails with an error that says so.
//!
//! Each test runs on the emulated device under two thread schedules, then on the first CUDA GPU when one is usable.
//! Inputs are fresh random values; the seed is printed (`DERMA_TEST_SEED` replays one).

use derma::cuda::alloc::Block;
use derma::cuda::blas::{Blas, Gemm};
use derma::cuda::device::NOT_IN_CAPTURE;
use derma::cuda::dnn::{ConvShape, Dnn, Pass};
use derma::cuda::kernels::DevSlice;
use derma::cuda::{DeviceRequest, Gpu, Schedule, probe};
use derma::ops::activation::Unary;
use derma::ops::depthwise::DwParams;
use derma::tools::check::device_for_check;
use rand::{Rng, RngExt, SeedableRng};

const SCHEDULES: [Schedule; 2] = [Schedule::WarpReverse, Schedule::Random];

fn seed() -> u64 {
    std::env::var("DERMA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    })
}

/// Runs `body` on the emulated device under each schedule, then on the first usable GPU.
fn on_every_device(test: &str, mut body: impl FnMut(&Gpu, &str, u64)) {
    let seed = seed();
    println!("{test}: DERMA_TEST_SEED={seed}");
    let emu = Gpu::emulated().unwrap_or_else(|e| panic!("{test}: the emulated device did not open: {e:#}"));
    for schedule in SCHEDULES {
        emu.set_schedule(schedule, seed).unwrap_or_else(|e| panic!("{test}: {e:#}"));
        body(&emu, &format!("emu (schedule {})", schedule.name()), seed);
    }
    match device_for_check(&probe(), DeviceRequest::Cuda(0)) {
        Ok(sel) => {
            let gpu = Gpu::open(&sel).unwrap_or_else(|e| panic!("{test}: the probed GPU did not open: {e:#}"));
            let label = format!("cuda:0 ({})", gpu.info.name);
            body(&gpu, &label, seed);
        }
        Err(e) => println!("{test}: ran on the emulated device only ({})", e.to_string().replace('\n', " ")),
    }
}

// Shapes: x [M, K] -> silu -> + x -> GEMM with B [K, CIN] -> C [M, CIN] = NHWC [N, H, W, CIN] -> 3x3 conv (pad 1)
// -> Y [N, H, W, COUT] -> Z = depthwise 3x3 (pad 1) of Y -> acc = 0 (fill), acc += ALPHA * Z -> out = copy(acc).
const N: usize = 2;
const H: usize = 5;
const W: usize = 6;
const M: usize = N * H * W;
const K: usize = 12;
const CIN: usize = 8;
const COUT: usize = 4;
const ALPHA: f32 = 0.5;
/// Nodes the sequence issues on the emulated device: one per launch, library call, fill and copy.
const NODES: usize = 8;

fn conv_shape() -> ConvShape {
    ConvShape {
        n: N as i32,
        c_in: CIN as i32,
        h: H as i32,
        w: W as i32,
        c_out: COUT as i32,
        k: 3,
        stride: 1,
        pad: 1,
        groups: 1,
        half: false,
    }
}

fn dw_params() -> DwParams {
    let (n, h, w, c) = (N as i32, H as i32, W as i32, COUT as i32);
    DwParams { n, h, w, c, ho: h, wo: w, k: 3, stride: 1, pad: 1, rows_split: 1 }
}

/// The device buffers of the sequence; every one exists before capture.
struct Bufs {
    x: Block,
    b: Block,
    wconv: Block,
    wdw: Block,
    h: Block,
    s: Block,
    c: Block,
    y: Block,
    z: Block,
    ws: Block,
    acc: Block,
    out: Block,
}

impl Bufs {
    fn outputs(&self) -> [(&'static str, &Block, usize); 7] {
        [
            ("silu(x)", &self.h, M * K),
            ("silu(x) + x", &self.s, M * K),
            ("GEMM", &self.c, M * CIN),
            ("conv", &self.y, M * COUT),
            ("depthwise", &self.z, M * COUT),
            ("acc", &self.acc, M * COUT),
            ("out", &self.out, M * COUT),
        ]
    }
}

struct Libs {
    blas: Blas,
    dnn: Dnn,
}

fn random(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Inputs: x, the GEMM's B, the conv's and the depthwise conv's weights.
struct Inputs {
    x: Vec<f32>,
    b: Vec<f32>,
    w: Vec<f32>,
    wdw: Vec<f32>,
}

fn setup(g: &Gpu, rng: &mut impl Rng) -> (Libs, Bufs, Inputs) {
    let libs = Libs { blas: Blas::new(g).unwrap(), dnn: Dnn::new_strict(g).unwrap() };
    let (x, b, w) = (random(rng, M * K), random(rng, K * CIN), random(rng, COUT * 9 * CIN));
    let wdw = random(rng, 9 * COUT);
    // The algorithm search runs here, eagerly, before any capture.
    let ws_bytes = libs.dnn.workspace_bytes(&conv_shape(), Pass::Forward).unwrap();
    let alloc = |elems: usize| g.alloc.alloc(elems * 4).unwrap();
    let bufs = Bufs {
        x: g.upload(&x).unwrap(),
        b: g.upload(&b).unwrap(),
        wconv: g.upload(&w).unwrap(),
        wdw: g.upload(&wdw).unwrap(),
        h: alloc(M * K),
        s: alloc(M * K),
        c: alloc(M * CIN),
        y: alloc(M * COUT),
        z: alloc(M * COUT),
        ws: g.alloc.alloc(ws_bytes.max(1)).unwrap(),
        acc: alloc(M * COUT),
        out: alloc(M * COUT),
    };
    (libs, bufs, Inputs { x, b, w, wdw })
}

/// The sequence, as eager calls (or, inside a capture, as the work captured).
fn step(g: &Gpu, l: &Libs, b: &Bufs) -> anyhow::Result<()> {
    let v = DevSlice::of;
    let (k, st) = (&g.kernels, &g.stream);
    k.unary::<f32>(st, Unary::Silu, v(&b.h), v(&b.x), M * K)?;
    k.add::<f32>(st, v(&b.s), v(&b.h), v(&b.x), M * K)?;
    let gemm = Gemm { m: M, n: CIN, k: K, trans_a: false, trans_b: false };
    l.blas.gemm::<f32>(&gemm, 1.0, v(&b.s), v(&b.b), 0.0, v(&b.c))?;
    l.dnn.forward::<f32>(&conv_shape(), v(&b.c), v(&b.wconv), v(&b.y), v(&b.ws))?;
    k.dw_forward::<f32>(st, &dw_params(), v(&b.z), v(&b.y), v(&b.wdw))?;
    g.fill(&b.acc, 0, M * COUT * 4, 0)?;
    k.scale::<f32>(st, v(&b.acc), v(&b.z), ALPHA, M * COUT, true)?;
    g.copy(&b.out, &b.acc, M * COUT * 4)
}

fn poison(g: &Gpu, b: &Bufs) {
    for (_, blk, _) in b.outputs() {
        g.fill(blk, 0, blk.len_bytes(), 0xFF).unwrap();
    }
}

fn read_all(g: &Gpu, b: &Bufs) -> Vec<Vec<u32>> {
    b.outputs()
        .iter()
        .map(|(_, blk, n)| g.download::<f32>(blk, *n).unwrap().iter().map(|v| v.to_bits()).collect())
        .collect()
}

/// The sequence's outputs in f64 from the inputs, and for each the sum of the absolute values of its terms (what
/// f32 rounding is relative to).
fn reference(inp: &Inputs) -> Vec<(Vec<f64>, Vec<f64>)> {
    let (x, b, w) = (&inp.x[..], &inp.b[..], &inp.w[..]);
    let silu = |v: f64| v / (1.0 + (-v).exp());
    let h: Vec<f64> = x.iter().map(|&v| silu(v as f64)).collect();
    let s: Vec<f64> = h.iter().zip(x).map(|(&h, &x)| h + x as f64).collect();
    let (mut c, mut ca) = (vec![0.0; M * CIN], vec![0.0; M * CIN]);
    for i in 0..M {
        for j in 0..CIN {
            for p in 0..K {
                c[i * CIN + j] += s[i * K + p] * b[p * CIN + j] as f64;
                ca[i * CIN + j] += (s[i * K + p] * b[p * CIN + j] as f64).abs();
            }
        }
    }
    let (mut y, mut ya) = (vec![0.0; M * COUT], vec![0.0; M * COUT]);
    for n in 0..N {
        for oh in 0..H {
            for ow in 0..W {
                for co in 0..COUT {
                    let o = ((n * H + oh) * W + ow) * COUT + co;
                    for kh in 0..3 {
                        for kw in 0..3 {
                            let (ih, iw) = (oh as isize + kh as isize - 1, ow as isize + kw as isize - 1);
                            if ih < 0 || iw < 0 || ih >= H as isize || iw >= W as isize {
                                continue;
                            }
                            let ci0 = ((n * H + ih as usize) * W + iw as usize) * CIN;
                            for ci in 0..CIN {
                                let wv = w[((co * 3 + kh) * 3 + kw) * CIN + ci] as f64;
                                y[o] += c[ci0 + ci] * wv;
                                // The GEMM's rounding carries into the conv: bound it through |c|'s terms too.
                                ya[o] += ca[ci0 + ci].max(c[ci0 + ci].abs()) * wv.abs();
                            }
                        }
                    }
                }
            }
        }
    }
    let (mut z, mut za) = (vec![0.0; M * COUT], vec![0.0; M * COUT]);
    for n in 0..N {
        for oh in 0..H {
            for ow in 0..W {
                for c in 0..COUT {
                    let o = ((n * H + oh) * W + ow) * COUT + c;
                    for kh in 0..3 {
                        for kw in 0..3 {
                            let (ih, iw) = (oh as isize + kh as isize - 1, ow as isize + kw as isize - 1);
                            if ih < 0 || iw < 0 || ih >= H as isize || iw >= W as isize {
                                continue;
                            }
                            let i = ((n * H + ih as usize) * W + iw as usize) * COUT + c;
                            let wv = inp.wdw[(kh * 3 + kw) * COUT + c] as f64;
                            z[o] += y[i] * wv;
                            za[o] += ya[i].max(y[i].abs()) * wv.abs();
                        }
                    }
                }
            }
        }
    }
    let acc: Vec<f64> = z.iter().map(|&v| ALPHA as f64 * v).collect();
    let acca: Vec<f64> = za.iter().map(|&v| ALPHA as f64 * v).collect();
    let hs: Vec<f64> = h.iter().map(|v| v.abs()).collect();
    let sa: Vec<f64> = h.iter().zip(x).map(|(&h, &x)| h.abs() + (x as f64).abs()).collect();
    vec![(h, hs), (s, sa), (c, ca), (y, ya), (z, za), (acc.clone(), acca.clone()), (acc, acca)]
}

/// Every output element within f32 rounding of the reference: a few units of 2^-24 per term of its sum (the
/// GEMM's 12, the conv's 72 and the depthwise conv's 9 terms, each carrying the rounding before it), and the
/// GPU's fast exponential in SiLU.
fn assert_close(device: &str, when: &str, got: &[Vec<u32>], want: &[(Vec<f64>, Vec<f64>)], names: &[&str]) {
    for ((g, (w, a)), name) in got.iter().zip(want).zip(names) {
        assert_eq!(g.len(), w.len(), "{device} {when}: {name} length");
        for (i, ((&g, &w), &a)) in g.iter().zip(w).zip(a).enumerate() {
            let g = f32::from_bits(g) as f64;
            let tol = 200.0 * 2f64.powi(-24) * a + 1e-6 * w.abs() + 1e-30;
            assert!((g - w).abs() <= tol, "{device} {when}: {name}[{i}] = {g}, want {w} (tol {tol:e})");
        }
    }
}

#[test]
fn cuda_graph_replays_what_it_captured() {
    on_every_device("cuda_graph_replays_what_it_captured", |g, device, seed| {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        let (l, b, mut inp) = setup(g, &mut rng);
        let names: Vec<&str> = b.outputs().iter().map(|o| o.0).collect();
        // Eager run: the reference the replays must match bit for bit.
        poison(g, &b);
        step(g, &l, &b).unwrap();
        let eager = read_all(g, &b);
        assert_close(device, "eager", &eager, &reference(&inp), &names);

        // Capture: nothing runs, every output still holds its poison.
        poison(g, &b);
        let allocs = g.allocations();
        let graph = g.capture(|| step(g, &l, &b)).unwrap_or_else(|e| panic!("{device}: capture: {e:#}"));
        if g.is_emulated() {
            assert_eq!(graph.len(), NODES, "{device}: one node per launch, library call, fill and copy");
        } else {
            assert!(graph.len() >= NODES, "{device}: {} nodes captured, want at least {NODES}", graph.len());
        }
        assert_eq!(g.allocations(), allocs, "{device}: the capture allocated");
        for (name, got) in names.iter().zip(read_all(g, &b)) {
            assert!(got.iter().all(|&v| v == u32::MAX), "{device}: {name} was written during capture");
        }

        // Replay: the eager results, bit for bit.
        graph.replay(g).unwrap_or_else(|e| panic!("{device}: replay: {e:#}"));
        let replayed = read_all(g, &b);
        for ((e, r), name) in eager.iter().zip(&replayed).zip(&names) {
            assert!(e == r, "{device}: replay of {name} differs from the eager run");
        }

        // New inputs written in place between replays: each replay reads what the buffer holds when it runs.
        let mut last = replayed;
        for round in 0..2 {
            inp.x = random(&mut rng, M * K);
            g.write(&b.x, 0, &inp.x).unwrap();
            graph.replay(g).unwrap();
            let got = read_all(g, &b);
            assert_close(device, &format!("replay {round} on new x"), &got, &reference(&inp), &names);
            assert!(got[6] != last[6], "{device}: replay {round} gave the previous result");
            // The same inputs run eagerly give the same bits.
            poison(g, &b);
            step(g, &l, &b).unwrap();
            assert!(read_all(g, &b) == got, "{device}: replay {round} differs from the eager run on the same x");
            last = got;
        }
        assert_eq!(g.allocations(), allocs, "{device}: replays (or eager steps) allocated");

        // The graph replays on the device that captured it only.
        if g.is_emulated() {
            let other = Gpu::emulated().unwrap();
            let e = graph.replay(&other).unwrap_err().to_string();
            assert!(e.contains("another emulated device"), "{device}: {e}");
        }
    });
}

/// Asserts that capturing `f` fails with an error naming `what` and saying it is not allowed, that the device is
/// eager again afterwards, and that the launch `f` made before failing did not run.
fn refused(g: &Gpu, device: &str, what: &str, f: impl FnOnce() -> anyhow::Result<()>, probe: &Block) {
    g.fill(probe, 0, 64, 0x11).unwrap();
    let ones = g.upload(&[1.0f32; 16]).unwrap();
    let e = g
        .capture(|| {
            g.kernels.fill::<f32>(&g.stream, DevSlice::of(probe), 5.0, 16)?;
            f()
        })
        .err()
        .unwrap_or_else(|| panic!("{device}: capturing {what} succeeded"));
    let msg = format!("{e:#}");
    assert!(msg.contains(what), "{device}: error does not name {what:?}: {msg}");
    assert!(msg.contains(NOT_IN_CAPTURE) || what == "do not nest", "{device}: {msg}");
    assert!(!g.stream.is_capturing(), "{device}: the capture stayed open after {what}");
    assert_eq!(g.download::<u8>(probe, 64).unwrap(), vec![0x11; 64], "{device}: a launch ran during capture");
    // Eager again: launches and allocations work.
    g.kernels.unary::<f32>(&g.stream, Unary::Relu, DevSlice::of(probe), DevSlice::of(&ones), 16).unwrap();
    assert_eq!(g.download::<f32>(probe, 16).unwrap(), vec![1.0; 16], "{device} after {what}");
    drop(g.alloc.alloc(4096).unwrap());
}

#[test]
fn cuda_graph_refuses_what_a_capture_cannot_hold() {
    on_every_device("cuda_graph_refuses_what_a_capture_cannot_hold", |g, device, seed| {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        let (l, b, _) = setup(g, &mut rng);
        let probe = g.alloc.alloc(64).unwrap();
        refused(g, device, "device-to-host copy", || g.download::<f32>(&b.x, 4).map(|_| ()), &probe);
        refused(g, device, "host-to-device copy", || g.write(&b.x, 0, &[0.0f32; 4]), &probe);
        refused(g, device, "stream sync", || g.sync(), &probe);
        refused(g, device, "device allocation", || g.alloc.alloc(1000).map(|_| ()), &probe);
        refused(g, device, "device allocation", || g.zeros(64).map(|_| ()), &probe);
        refused(g, device, "do not nest", || g.capture(|| Ok(())).map(|_| ()), &probe);
        // A conv shape never run eagerly needs cuDNN's algorithm search, which cannot run in a capture.
        let fresh = ConvShape { c_out: 3, ..conv_shape() };
        let y3 = g.alloc.alloc(M * 3 * 4).unwrap();
        let v = DevSlice::of;
        refused(
            g,
            device,
            "algorithm search (Find)",
            || l.dnn.forward::<f32>(&fresh, v(&b.c), v(&b.wconv), v(&y3), v(&b.ws)),
            &probe,
        );
        let e = g.capture(|| l.dnn.forward::<f32>(&fresh, v(&b.c), v(&b.wconv), v(&y3), v(&b.ws))).err().unwrap();
        assert!(format!("{e:#}").contains("run the first step eagerly before capturing"), "{device}: {e:#}");
        // A replay inside a capture is refused too.
        let graph = g.capture(|| g.fill(&probe, 0, 64, 0x22)).unwrap();
        refused(g, device, "replaying a graph", || graph.replay(g), &probe);
        // After all that, captures work.
        graph.replay(g).unwrap();
        assert_eq!(g.download::<u8>(&probe, 64).unwrap(), vec![0x22; 64], "{device}");
    });
}

#[test]
fn cuda_graph_captures_a_recorded_step_program() {
    use derma::cuda::program::{Access, Bindings, Program};
    on_every_device("cuda_graph_captures_a_recorded_step_program", |g, device, seed| {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed ^ 0x9e37);
        let n = 3000;
        let bytes = n * 4;
        // x -> t1 = silu(x) -> t2 = t1 + x -> y = 2 t2, with t1 and t2 in the arena.
        let mut p = Program::new();
        let (x, y) = (p.persistent("x", bytes), p.persistent("y", bytes));
        let (t1, t2) = (p.transient("t1", bytes), p.transient("t2", bytes));
        let acc = |buf| Access { buf, bytes };
        p.push(
            "silu",
            vec![acc(x)],
            vec![acc(t1)],
            Box::new(move |b| b.gpu().kernels.unary::<f32>(&b.gpu().stream, Unary::Silu, b.slice(t1)?, b.slice(x)?, n)),
        );
        p.push(
            "add",
            vec![acc(t1), acc(x)],
            vec![acc(t2)],
            Box::new(move |b| b.gpu().kernels.add::<f32>(&b.gpu().stream, b.slice(t2)?, b.slice(t1)?, b.slice(x)?, n)),
        );
        p.push(
            "double",
            vec![acc(t2)],
            vec![acc(y)],
            Box::new(move |b| b.gpu().kernels.scale::<f32>(&b.gpu().stream, b.slice(y)?, b.slice(t2)?, 2.0, n, false)),
        );
        let plan = p.plan().unwrap();
        let (xd, yd) = (g.upload(&random(&mut rng, n)).unwrap(), g.alloc.alloc(bytes).unwrap());
        let arena = g.alloc.alloc(plan.arena_bytes).unwrap();
        let mut bindings = Bindings::default();
        bindings.bind(x, DevSlice::of(&xd));
        bindings.bind(y, DevSlice::of(&yd));
        // The first step runs eagerly; its launches at the plan's fixed offsets are then captured (the arena's
        // poison fill with them) and replayed for every later step, with each step's input written in place.
        p.execute(&plan, g, &arena, &bindings, true).unwrap();
        let allocs = g.allocations();
        let graph = g.capture(|| p.execute(&plan, g, &arena, &bindings, true)).unwrap();
        if g.is_emulated() {
            assert_eq!(graph.len(), 4, "{device}: the arena fill and three launches");
        }
        for step in 0..3 {
            let xs = random(&mut rng, n);
            g.write(&xd, 0, &xs).unwrap();
            graph.replay(g).unwrap();
            let replayed = g.download::<f32>(&yd, n).unwrap();
            p.execute(&plan, g, &arena, &bindings, true).unwrap();
            let eager = g.download::<f32>(&yd, n).unwrap();
            for (i, ((&r, &e), &v)) in replayed.iter().zip(&eager).zip(&xs).enumerate() {
                assert_eq!(r.to_bits(), e.to_bits(), "{device} step {step}: y[{i}] replayed {r}, eager {e}");
                let v = v as f64;
                let want = 2.0 * (v / (1.0 + (-v).exp()) + v);
                assert!(
                    (r as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{device} step {step}: y[{i}] {r} vs {want}"
                );
            }
        }
        assert_eq!(g.allocations(), allocs, "{device}: replays allocated");
    });
}
