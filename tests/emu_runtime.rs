//! The emulated CUDA device's own tests (kernels/emu): launch plumbing, thread and block indices, barrier and warp
//! collective semantics against CUDA's documentation, the error reports, fp16 conversions, vector types, and
//! launches from several OS threads. Test-only kernels live in kernels/emu/tests/*.cu.

use std::ffi::c_void;

use derma::cuda::emu::sys::{self, Order, Schedule};
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64;

/// A parameter pack for `sys::launch`: owns the values, hands out pointers to them.
struct Args {
    values: Vec<Box<[u8]>>,
}

impl Args {
    fn new() -> Self {
        Self { values: Vec::new() }
    }
    fn push<T: Copy>(mut self, v: T) -> Self {
        let mut b = vec![0u8; size_of::<T>().max(1)].into_boxed_slice();
        // SAFETY: b has room for a T; write_unaligned needs no alignment.
        unsafe { std::ptr::write_unaligned(b.as_mut_ptr().cast::<T>(), v) };
        self.values.push(b);
        self
    }
    fn ptr<T>(self, p: *mut T) -> Self {
        self.push(p as u64)
    }
    fn pointers(&mut self) -> Vec<*mut c_void> {
        self.values.iter_mut().map(|b| b.as_mut_ptr().cast()).collect()
    }
}

fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
    mut args: Args,
) -> anyhow::Result<()> {
    let mut ptrs = args.pointers();
    // SAFETY: each test passes the kernel's parameter types in order and buffers large enough for its launch.
    unsafe { sys::launch(name, grid, block, shared, &mut ptrs) }
}

fn forward() -> Schedule {
    Schedule { threads: Order::Forward, blocks: Order::Forward, seed: 1 }
}

#[test]
fn the_library_has_every_kernel_and_a_flavour() {
    for name in
        ["silu_fwd_f32", "silu_fwd_f16", "bn_stats_partial_f32", "softmax_loss_f16", "adamw_apply", "emu_test_indices"]
    {
        assert!(sys::has_kernel(name), "{name} missing");
    }
    assert!(!sys::has_kernel("no_such_kernel"));
    assert!(["plain", "asan"].contains(&sys::flavour()), "flavour {}", sys::flavour());
}

#[test]
fn silu_fwd_f32_matches_the_formula_on_every_element() {
    sys::set_schedule(forward());
    let seed: u64 = rand::random();
    let mut rng = Pcg64::seed_from_u64(seed);
    // Odd size: 4-wide vector path plus a scalar tail; 3 blocks of 128 so the grid-stride loop wraps.
    let n = 4 * 1000 + 3;
    let x: Vec<f32> = (0..n).map(|_| rng.random_range(-8.0..8.0)).collect();
    let mut y = vec![f32::NAN; n];
    launch(
        "silu_fwd_f32",
        (3, 1, 1),
        (128, 1, 1),
        0,
        Args::new().ptr(y.as_mut_ptr()).ptr(x.as_ptr() as *mut f32).push(n as i64),
    )
    .unwrap();
    for i in 0..n {
        let want = x[i] / (1.0 + (-x[i]).exp());
        assert!((y[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "seed {seed}: y[{i}] = {} want {want}", y[i]);
    }
}

#[test]
fn every_thread_sees_its_own_indices() {
    sys::set_schedule(Schedule { threads: Order::Random, blocks: Order::Random, seed: 7 });
    let (grid, block) = ((3u32, 2u32, 2u32), (5u32, 3u32, 2u32));
    let threads = (block.0 * block.1 * block.2) as usize;
    let blocks = (grid.0 * grid.1 * grid.2) as usize;
    let mut out = vec![u32::MAX; 4 * threads * blocks];
    launch("emu_test_indices", grid, block, 0, Args::new().ptr(out.as_mut_ptr())).unwrap();
    for b in 0..blocks {
        for t in 0..threads {
            let i = b * threads + t;
            let want = [b as u32, t as u32 % block.0, t as u32 / block.0 % block.1, t as u32 / (block.0 * block.1)];
            assert_eq!(&out[4 * i..4 * i + 4], &want, "block {b} thread {t}");
        }
    }
}

const TEST_SOURCE: &str = include_str!("../kernels/emu/tests/runtime.cu");
const TEST_FILE: &str = "kernels/emu/tests/runtime.cu";

/// `kernels/emu/tests/runtime.cu:LINE` of the line marked `// MARK:name`.
fn marked(name: &str) -> String {
    let tag = format!("// MARK:{name}");
    let line = TEST_SOURCE.lines().position(|l| l.contains(&tag)).unwrap_or_else(|| panic!("no {tag} in {TEST_FILE}"));
    format!("{TEST_FILE}:{}", line + 1)
}

fn expect_error(result: anyhow::Result<()>, parts: &[&str]) {
    let msg = match result {
        Ok(()) => panic!("the launch succeeded; expected an error with {parts:?}"),
        Err(e) => format!("{e:#}"),
    };
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} lacks {p:?}");
    }
}

fn all_orders() -> [Schedule; 4] {
    [
        Schedule { threads: Order::Forward, blocks: Order::Forward, seed: 3 },
        Schedule { threads: Order::Reverse, blocks: Order::Reverse, seed: 3 },
        Schedule { threads: Order::Random, blocks: Order::Random, seed: 11 },
        Schedule { threads: Order::WarpReverse, blocks: Order::Forward, seed: 3 },
    ]
}

/// Source lane of each shuffle by CUDA's documentation (independent of the emulator's PTX-style formula).
fn cuda_shuffle_source(op: i32, lane: i32, arg: i32, width: i32) -> i32 {
    let group = lane / width * width;
    let in_group = lane % width;
    match op {
        0 => group + arg.rem_euclid(width),
        1 => {
            if in_group >= arg {
                lane - arg
            } else {
                lane
            }
        }
        2 => {
            if in_group + arg < width {
                lane + arg
            } else {
                lane
            }
        }
        _ => {
            // xor may read earlier groups but returns its own value for a later group.
            let src = lane ^ arg;
            if src / width <= lane / width { src } else { lane }
        }
    }
}

#[test]
fn every_shuffle_variant_follows_cudas_lane_and_width_rules() {
    let seed: u64 = rand::random();
    let mut rng = Pcg64::seed_from_u64(seed);
    let n = 64; // two warps: each shuffles within itself
    for schedule in all_orders() {
        sys::set_schedule(schedule);
        for op in 0..4 {
            for width in [1, 2, 4, 8, 16, 32] {
                for arg in if op == 0 { -3..36 } else { 0..32 } {
                    let input: Vec<i32> = (0..n).map(|_| rng.random_range(-1000..1000)).collect();
                    let mut out = vec![i32::MIN; n];
                    launch(
                        "emu_test_shfl_i32",
                        (1, 1, 1),
                        (n as u32, 1, 1),
                        0,
                        Args::new()
                            .ptr(out.as_mut_ptr())
                            .ptr(input.as_ptr() as *mut i32)
                            .push(op)
                            .push(u32::MAX)
                            .push(arg)
                            .push(width),
                    )
                    .unwrap();
                    for t in 0..n as i32 {
                        let (base, lane) = (t / 32 * 32, t % 32);
                        let want = input[(base + cuda_shuffle_source(op, lane, arg, width)) as usize];
                        assert_eq!(
                            out[t as usize], want,
                            "seed {seed} {schedule:?}: op {op} width {width} arg {arg}, thread {t}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn shuffles_move_eight_byte_values_whole() {
    sys::set_schedule(forward());
    let input: Vec<f64> = (0..32).map(|i| f64::from(i) * 1.000000000001 + 1e300).collect();
    let mut out = vec![0.0f64; 32];
    launch(
        "emu_test_shfl_f64",
        (1, 1, 1),
        (32, 1, 1),
        0,
        Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f64).push(3i32).push(5i32).push(32i32),
    )
    .unwrap();
    for t in 0..32 {
        assert_eq!(out[t].to_bits(), input[t ^ 5].to_bits(), "lane {t}");
    }
}

#[test]
fn shuffles_within_a_partial_mask_see_only_their_lanes() {
    sys::set_schedule(forward());
    // Lanes 0-15 take part (mask 0xffff); xor 1..15 and down/up stay inside them.
    let input: Vec<i32> = (0..32).map(|i| 100 + i).collect();
    for (op, arg) in [(3, 1), (3, 15), (2, 3), (1, 2), (0, 7)] {
        let mut out = vec![i32::MIN; 32];
        launch(
            "emu_test_shfl_i32",
            (1, 1, 1),
            (32, 1, 1),
            0,
            Args::new()
                .ptr(out.as_mut_ptr())
                .ptr(input.as_ptr() as *mut i32)
                .push(op)
                .push(0xffffu32)
                .push(arg)
                .push(16i32),
        )
        .unwrap();
        for t in 0..32 {
            let want = if t < 16 { input[cuda_shuffle_source(op, t as i32, arg, 16) as usize] } else { -1 };
            assert_eq!(out[t], want, "op {op} arg {arg} lane {t}");
        }
    }
}

#[test]
fn ballot_any_all_reduce_over_the_mask() {
    let seed: u64 = rand::random();
    let mut rng = Pcg64::seed_from_u64(seed);
    for schedule in all_orders() {
        sys::set_schedule(schedule);
        for mask in [u32::MAX, 0x0f0f_f0f1, 0x8000_0001, 0x1] {
            for density in [0.0, 0.1, 0.5, 1.0] {
                let pred: Vec<i32> = (0..64).map(|_| i32::from(rng.random_bool(density))).collect();
                let mut out = vec![u32::MAX; 3 * 64];
                launch(
                    "emu_test_vote",
                    (1, 1, 1),
                    (64, 1, 1),
                    0,
                    Args::new().ptr(out.as_mut_ptr()).ptr(pred.as_ptr() as *mut i32).push(mask),
                )
                .unwrap();
                for warp in 0..2 {
                    let members: Vec<usize> = (0..32).filter(|l| mask >> l & 1 == 1).collect();
                    let ballot: u32 = members.iter().filter(|&&l| pred[warp * 32 + l] != 0).map(|&l| 1u32 << l).sum();
                    let any = u32::from(ballot != 0);
                    let all = u32::from(members.iter().all(|&l| pred[warp * 32 + l] != 0));
                    for lane in 0..32 {
                        let t = warp * 32 + lane;
                        let got = &out[3 * t..3 * t + 3];
                        if mask >> lane & 1 == 1 {
                            assert_eq!(got, &[ballot, any, all], "seed {seed} mask {mask:#x} thread {t}");
                        } else {
                            assert_eq!(got, &[u32::MAX; 3], "thread {t} is outside the mask");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn syncthreads_count_and_or_reduce_over_the_block() {
    let seed: u64 = rand::random();
    let mut rng = Pcg64::seed_from_u64(seed);
    // 100 threads in a 3-D block: the last warp is partial.
    let block = (10u32, 5u32, 2u32);
    let n = (block.0 * block.1 * block.2) as usize;
    for schedule in all_orders() {
        sys::set_schedule(schedule);
        for density in [0.0, 0.03, 0.5, 1.0] {
            let pred: Vec<i32> =
                (0..n).map(|_| if rng.random_bool(density) { rng.random_range(1..9) } else { 0 }).collect();
            let mut out = vec![-1i32; 3 * n];
            launch(
                "emu_test_syncthreads_reduce",
                (1, 1, 1),
                block,
                0,
                Args::new().ptr(out.as_mut_ptr()).ptr(pred.as_ptr() as *mut i32),
            )
            .unwrap();
            let count = pred.iter().filter(|&&p| p != 0).count() as i32;
            let want = [count, i32::from(count == n as i32), i32::from(count > 0)];
            for t in 0..n {
                assert_eq!(&out[3 * t..3 * t + 3], &want, "seed {seed} {schedule:?} thread {t}");
            }
        }
    }
}

/// Runs emu_test_missing_barrier and says whether every thread read what the thread one warp below wrote.
fn missing_barrier_reads_right(schedule: Schedule, barrier: bool, rng: &mut Pcg64) -> bool {
    sys::set_schedule(schedule);
    let (blocks, threads) = (2usize, 256usize);
    let input: Vec<f32> = (0..blocks * threads).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut out = vec![f32::NAN; blocks * threads];
    launch(
        "emu_test_missing_barrier",
        (blocks as u32, 1, 1),
        (threads as u32, 1, 1),
        0,
        Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f32).push(i32::from(barrier)),
    )
    .unwrap();
    (0..blocks * threads).all(|i| {
        let (b, t) = (i / threads, i % threads);
        let src = if t >= 32 { t - 32 } else { t };
        out[i] == input[b * threads + src]
    })
}

#[test]
fn a_missing_barrier_shows_under_warp_reverse_order_but_not_forward() {
    let mut rng = Pcg64::seed_from_u64(rand::random());
    let [fwd, rev, random, warp_rev] = all_orders();
    assert!(missing_barrier_reads_right(fwd, false, &mut rng), "forward order runs warp 0 to its end first");
    assert!(!missing_barrier_reads_right(warp_rev, false, &mut rng), "warp-reverse must expose the missing barrier");
    assert!(!missing_barrier_reads_right(rev, false, &mut rng), "reverse must expose the missing barrier");
    for s in [fwd, rev, random, warp_rev] {
        assert!(missing_barrier_reads_right(s, true, &mut rng), "with the barrier every order is right: {s:?}");
    }
}

#[test]
fn a_barrier_loop_sums_each_block_under_every_order() {
    let seed: u64 = rand::random();
    let mut rng = Pcg64::seed_from_u64(seed);
    let (blocks, threads, n) = (5usize, 256usize, 10_007usize);
    let input: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    for schedule in all_orders() {
        sys::set_schedule(schedule);
        let mut out = vec![f32::NAN; blocks];
        launch(
            "emu_test_block_sum",
            (blocks as u32, 1, 1),
            (threads as u32, 1, 1),
            0,
            Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f32).push(n as i64),
        )
        .unwrap();
        for (b, got) in out.iter().enumerate() {
            let want: f64 = (0..n).filter(|i| i / threads % blocks == b).map(|i| f64::from(input[i])).sum();
            assert!((f64::from(*got) - want).abs() < 1e-3, "seed {seed} {schedule:?} block {b}: {} vs {want}", out[b]);
        }
    }
}

#[test]
fn atomics_combine_every_threads_update() {
    let seed: u64 = rand::random();
    let mut rng = Pcg64::seed_from_u64(seed);
    let n = 1000usize;
    let input: Vec<i32> = (0..n).map(|_| rng.random_range(-50..50)).collect();
    for schedule in all_orders() {
        sys::set_schedule(schedule);
        let mut counters = vec![0, i32::MAX, i32::MIN, 0, 0, 0, -1];
        let mut fsum = vec![0.0f32];
        let mut u64sum = vec![0u64];
        launch(
            "emu_test_atomics",
            (4, 1, 1),
            (256, 1, 1),
            0,
            Args::new()
                .ptr(counters.as_mut_ptr())
                .ptr(fsum.as_mut_ptr())
                .ptr(u64sum.as_mut_ptr())
                .ptr(input.as_ptr() as *mut i32)
                .push(n as i64),
        )
        .unwrap();
        let or = input.iter().fold(0i32, |a, v| a | 1 << (v & 31));
        let and = input.iter().fold(-1i32, |a, v| a & !(1 << (v & 31)));
        let want = vec![
            n as i32,
            *input.iter().min().unwrap(),
            *input.iter().max().unwrap(),
            input.iter().sum::<i32>(),
            7,
            or,
            and,
        ];
        assert_eq!(counters, want, "seed {seed} {schedule:?}");
        assert_eq!(fsum[0], input.iter().sum::<i32>() as f32, "small integers add exactly in f32");
        assert_eq!(u64sum[0], input.iter().map(|&v| (v & 0xff) as u64).sum::<u64>());
    }
}

#[test]
fn dynamic_shared_memory_is_per_launch_and_aliased_like_cuda() {
    let mut rng = Pcg64::seed_from_u64(rand::random());
    for schedule in all_orders() {
        sys::set_schedule(schedule);
        let (blocks, threads) = (3usize, 100usize);
        let input: Vec<f32> = (0..blocks * threads).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut out = vec![f32::NAN; blocks * threads];
        launch(
            "emu_test_dynamic_shared",
            (blocks as u32, 1, 1),
            (threads as u32, 1, 1),
            (threads * 4) as u32,
            Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f32),
        )
        .unwrap();
        for b in 0..blocks {
            for t in 0..threads {
                assert_eq!(out[b * threads + t], input[b * threads + threads - 1 - t], "block {b} thread {t}");
            }
        }
    }
}

#[test]
fn vector_types_have_cudas_sizes_and_alignments() {
    sys::set_schedule(forward());
    let mut out = vec![0u32; 24];
    launch("emu_test_type_layout", (1, 1, 1), (1, 1, 1), 0, Args::new().ptr(out.as_mut_ptr())).unwrap();
    let want = [
        ("float2", 8, 8),
        ("float3", 12, 4),
        ("float4", 16, 16),
        ("int2", 8, 8),
        ("int4", 16, 16),
        ("uint2", 8, 8),
        ("uint4", 16, 16),
        ("double2", 16, 16),
        ("__half", 2, 2),
        ("__half2", 4, 4),
        ("dim3", 12, 4),
        ("uint3", 12, 4),
    ];
    for (k, (name, size, align)) in want.iter().enumerate() {
        assert_eq!((out[2 * k], out[2 * k + 1]), (*size, *align), "{name}: (sizeof, alignof)");
    }
}

#[test]
fn intrinsics_compute_their_closed_forms() {
    sys::set_schedule(forward());
    let input = [0.75f32, 2.0];
    let mut out = vec![f32::NAN; 12];
    launch(
        "emu_test_intrinsics",
        (1, 1, 1),
        (32, 1, 1),
        0,
        Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f32),
    )
    .unwrap();
    let want = [
        0.75f64.exp(),
        0.375,
        1.0 / 2f64.sqrt(),
        0.75,
        0.0,
        0.0,
        2f64.ln(),
        2f64.powf(0.75),
        2.0, // 2.5 rounds to even
        8.0,
        0.75,
        2.0,
    ];
    for (k, w) in want.iter().enumerate() {
        assert!((f64::from(out[k]) - w).abs() <= 2e-7 * w.abs().max(1.0), "intrinsic {k}: {} vs {w}", out[k]);
    }
}

/// Converts through the emulator: (float -> half bits, half bits -> float).
fn f16_roundtrip(floats: &[f32], halves: &[u16]) -> (Vec<u16>, Vec<f32>) {
    assert_eq!(floats.len(), halves.len());
    let n = floats.len();
    let mut bits = vec![0u16; n];
    let mut back = vec![0f32; n];
    launch(
        "emu_test_f16",
        (8, 1, 1),
        (256, 1, 1),
        0,
        Args::new()
            .ptr(bits.as_mut_ptr())
            .ptr(back.as_mut_ptr())
            .ptr(floats.as_ptr() as *mut f32)
            .ptr(halves.as_ptr() as *mut u16)
            .push(n as i64),
    )
    .unwrap();
    (bits, back)
}

fn is_f16_nan(b: u16) -> bool {
    b & 0x7c00 == 0x7c00 && b & 0x03ff != 0
}

#[test]
fn f16_conversions_round_to_nearest_even_with_subnormals() {
    sys::set_schedule(forward());
    let p = |e: i32| 2f32.powi(e);
    // (input, expected binary16 bits), written from IEEE 754's rules.
    let cases: &[(f32, u16)] = &[
        (1.0, 0x3c00),
        (1.0 + p(-11), 0x3c00),          // halfway between 1 and 1 + 2^-10: even is 1
        (1.0 + 3.0 * p(-11), 0x3c02),    // halfway between 0x3c01 and 0x3c02: even is 0x3c02
        (1.0 + p(-11) + p(-20), 0x3c01), // just above halfway: up
        (p(-24), 0x0001),                // smallest subnormal
        (p(-25), 0x0000),                // halfway between 0 and 2^-24: even is 0
        (p(-25) + p(-40), 0x0001),       // just above: up
        (3.0 * p(-25), 0x0002),          // halfway between 1 and 2 ulps of 2^-24: even is 2
        (p(-14) - p(-25), 0x0400),       // halfway between the largest subnormal and the smallest normal: even
        (p(-14), 0x0400),
        (-0.0, 0x8000),
        (65504.0, 0x7bff),
        (65519.99, 0x7bff),
        (65520.0, 0x7c00), // halfway between 65504 and 65536 (=inf): even rounds to infinity
        (-65520.0, 0xfc00),
        (f32::INFINITY, 0x7c00),
        (1e-10, 0x0000),
        (-1e-10, 0x8000),
    ];
    let floats: Vec<f32> = cases.iter().map(|c| c.0).collect();
    let zeros = vec![0u16; floats.len()];
    let (bits, _) = f16_roundtrip(&floats, &zeros);
    for (k, (x, want)) in cases.iter().enumerate() {
        assert_eq!(bits[k], *want, "__float2half_rn({x:e}) = {:#06x}, want {want:#06x}", bits[k]);
    }
    let (nan_bits, _) = f16_roundtrip(&[f32::NAN, -f32::NAN], &[0, 0]);
    assert!(nan_bits.iter().all(|&b| is_f16_nan(b)), "NaN stays NaN: {nan_bits:x?}");

    // Random floats over the whole binary16 range and beyond, against the half crate (also round-to-nearest-even),
    // and every one of the 65536 half values back to float.
    let seed: u64 = rand::random();
    let mut rng = Pcg64::seed_from_u64(seed);
    let floats: Vec<f32> = (0..65536)
        .map(|_| {
            let e = rng.random_range(-30..18);
            let m: f32 = rng.random_range(1.0..2.0);
            if rng.random_bool(0.5) { m * p(e) } else { -m * p(e) }
        })
        .collect();
    let halves: Vec<u16> = (0..=u16::MAX).collect();
    let (bits, back) = f16_roundtrip(&floats, &halves);
    for i in 0..floats.len() {
        assert_eq!(bits[i], half::f16::from_f32(floats[i]).to_bits(), "seed {seed}: __float2half_rn({:e})", floats[i]);
    }
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h).to_f32();
        let got = back[h as usize];
        if is_f16_nan(h) {
            assert!(got.is_nan(), "__half2float({h:#06x}) = {got}, want NaN");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "__half2float({h:#06x})");
        }
    }
}

#[test]
fn half_operators_round_to_fp16_at_every_step() {
    sys::set_schedule(forward());
    let seed: u64 = rand::random();
    let mut rng = Pcg64::seed_from_u64(seed);
    let n = 300i32;
    let input: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..6.0)).collect();
    let mut out = vec![0u16; 3];
    launch(
        "emu_test_half_arith",
        (1, 1, 1),
        (32, 1, 1),
        0,
        Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f32).push(n),
    )
    .unwrap();
    use half::f16;
    // half's f16 arithmetic rounds through f32, which is exact enough for one correct rounding of + - *.
    let sum = input.iter().fold(f16::ZERO, |s, &x| s + f16::from_f32(x));
    let (a, b, c) = (f16::from_f32(input[0]), f16::from_f32(input[1]), f16::from_f32(input[2]));
    assert_eq!(out[0], sum.to_bits(), "seed {seed}: fp16 running sum");
    assert_ne!(
        f32::from(sum),
        input.iter().map(|&x| f32::from(f16::from_f32(x))).sum::<f32>(),
        "seed {seed}: the fp16 sum must differ from an f32 one"
    );
    assert_eq!(out[1], (a * b - c).to_bits(), "seed {seed}: a*b-c with a rounding after each op");
    assert_eq!(out[2], u16::from(a < b));
}

#[test]
fn a_barrier_that_exited_threads_never_reach_is_a_deadlock() {
    sys::set_schedule(forward());
    let mut out = vec![0f32; 64];
    let r = launch("emu_test_deadlock", (2, 1, 1), (64, 1, 1), 0, Args::new().ptr(out.as_mut_ptr()));
    expect_error(
        r,
        &[
            "kernel emu_test_deadlock",
            "deadlock",
            &marked("deadlock"),
            "block (0,0,0)",
            "thread (0,0,0) waits at __syncthreads",
            "thread (5,0,0) has exited",
        ],
    );
}

#[test]
fn barriers_at_different_lines_are_divergent() {
    sys::set_schedule(forward());
    let mut out = vec![0f32; 64];
    let r = launch("emu_test_divergent_barrier", (1, 1, 1), (64, 1, 1), 0, Args::new().ptr(out.as_mut_ptr()));
    expect_error(
        r,
        &[
            "kernel emu_test_divergent_barrier",
            "divergent barrier",
            "block (0,0,0)",
            &format!("thread (0,0,0) waits at __syncthreads ({})", marked("divergent-even")),
            &format!("thread (1,0,0) waits at __syncthreads ({})", marked("divergent-odd")),
        ],
    );
}

#[test]
fn shuffles_naming_exited_absent_or_unmasked_lanes_are_errors() {
    sys::set_schedule(forward());
    let mut out = vec![0f32; 64];
    let r = launch("emu_test_shfl_exited_lane", (1, 1, 1), (32, 1, 1), 0, Args::new().ptr(out.as_mut_ptr()));
    expect_error(
        r,
        &[
            "kernel emu_test_shfl_exited_lane",
            "__shfl_sync",
            &marked("shfl-exited"),
            "block (0,0,0)",
            "names lane 3, which has exited",
        ],
    );
    let r = launch("emu_test_shfl_absent_lane", (1, 1, 1), (48, 1, 1), 0, Args::new().ptr(out.as_mut_ptr()));
    expect_error(
        r,
        &[
            "__shfl_xor_sync",
            &marked("shfl-absent"),
            "thread (32,0,0)",
            "names lane 16, which does not exist (the block has 48 threads",
        ],
    );
    let r = launch("emu_test_shfl_outside_mask", (1, 1, 1), (32, 1, 1), 0, Args::new().ptr(out.as_mut_ptr()));
    expect_error(
        r,
        &[
            "__shfl_xor_sync",
            &marked("shfl-outside"),
            "thread (0,0,0) (lane 0) reads lane 16, which is outside its mask 0x0000ffff",
        ],
    );
    let r = launch("emu_test_shfl_caller_not_in_mask", (1, 1, 1), (32, 1, 1), 0, Args::new().ptr(out.as_mut_ptr()));
    expect_error(r, &["called by lane 1, which is not in the mask", &marked("shfl-caller"), "thread (1,0,0)"]);
    let r = launch("emu_test_warp_vs_barrier", (1, 1, 1), (32, 1, 1), 0, Args::new().ptr(out.as_mut_ptr()));
    expect_error(r, &["deadlock", &marked("warp-vs-barrier"), "thread (0,0,0) waits at __shfl_sync"]);
}

#[test]
fn syncwarp_waits_only_for_lanes_that_have_not_exited() {
    sys::set_schedule(forward());
    let mut out = vec![0i32; 40];
    launch("emu_test_syncwarp_after_exit", (1, 1, 1), (40, 1, 1), 0, Args::new().ptr(out.as_mut_ptr())).unwrap();
    for (t, v) in out.iter().enumerate() {
        assert_eq!(*v, i32::from(t % 3 != 0), "thread {t}");
    }
}

#[test]
fn launch_shapes_cuda_refuses_are_errors() {
    sys::set_schedule(forward());
    let mut out = vec![0u32; 4 * 1024];
    type Dim = (u32, u32, u32);
    let bad: &[(Dim, Dim, u32, &str)] = &[
        ((1, 1, 1), (1025, 1, 1), 0, "block (1025,1,1)"),
        ((1, 1, 1), (1, 1025, 1), 0, "block (1,1025,1)"),
        ((1, 1, 1), (1, 1, 65), 0, "block (1,1,65)"),
        ((1, 1, 1), (32, 32, 2), 0, "block (32,32,2)"),
        ((1, 1, 1), (0, 1, 1), 0, "block (0,1,1)"),
        ((0, 1, 1), (32, 1, 1), 0, "grid (0,1,1)"),
        ((1, 65536, 1), (32, 1, 1), 0, "grid (1,65536,1)"),
        ((1, 1, 65536), (32, 1, 1), 0, "grid (1,1,65536)"),
        ((1u32 << 31, 1, 1), (32, 1, 1), 0, "grid (2147483648,1,1)"),
        ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1, "49153 bytes of dynamic shared memory"),
    ];
    for (grid, block, shared, part) in bad {
        let r = launch("emu_test_indices", *grid, *block, *shared, Args::new().ptr(out.as_mut_ptr()));
        expect_error(r, &["kernel emu_test_indices", part, "CUDA"]);
    }
    // The limits themselves are fine.
    for (grid, block) in [((1, 1, 1), (1024, 1, 1)), ((1, 1, 1), (1, 1, 64)), ((1, 1, 1), (32, 32, 1))] {
        launch("emu_test_indices", grid, block, 48 * 1024, Args::new().ptr(out.as_mut_ptr())).unwrap();
    }
    let mut big = vec![0u32; 4 * 65535];
    launch("emu_test_indices", (1, 1, 65535), (1, 1, 1), 0, Args::new().ptr(big.as_mut_ptr())).unwrap();
    assert_eq!(big[4 * 65534], 65534, "the last block ran");
    expect_error(
        launch("no_such_kernel", (1, 1, 1), (1, 1, 1), 0, Args::new()),
        &["kernel no_such_kernel", "no such entry point"],
    );
}

#[test]
fn launches_past_a_kernels_launch_bounds_are_refused_as_on_the_gpu() {
    sys::set_schedule(forward());
    let mut out = vec![0u32; 1024];
    for (name, bound) in [("emu_test_bounded_literal", 64u32), ("emu_test_bounded_expr", 96)] {
        launch(name, (2, 1, 1), (bound, 1, 1), 0, Args::new().ptr(out.as_mut_ptr())).unwrap();
        assert!(out[..bound as usize].iter().all(|&v| v == 1), "{name}: every thread ran");
        expect_error(
            launch(name, (1, 1, 1), (bound / 2, 2, 2), 0, Args::new().ptr(out.as_mut_ptr())),
            &[
                &format!("kernel {name}: block ({},2,2) has {} threads", bound / 2, 2 * bound),
                &format!("__launch_bounds__({bound})"),
            ],
        );
    }
}

#[test]
fn launches_from_several_os_threads_run_concurrently_with_their_own_schedules() {
    let seed: u64 = rand::random();
    let handles: Vec<_> = (0..4u64)
        .map(|k| {
            std::thread::spawn(move || {
                let mut rng = Pcg64::seed_from_u64(seed ^ k);
                let [fwd, _, _, warp_rev] = all_orders();
                for round in 0..25 {
                    // Threads 0 and 2 run forward, 1 and 3 warp-reverse: each sees its own schedule's outcome.
                    let mine = if k % 2 == 0 { fwd } else { warp_rev };
                    assert_eq!(
                        missing_barrier_reads_right(mine, false, &mut rng),
                        k % 2 == 0,
                        "seed {seed}: OS thread {k} round {round} saw another thread's schedule"
                    );
                    let n = 3000usize;
                    let input: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let mut out = vec![f32::NAN; 2];
                    launch(
                        "emu_test_block_sum",
                        (2, 1, 1),
                        (256, 1, 1),
                        0,
                        Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f32).push(n as i64),
                    )
                    .unwrap();
                    let want: f64 = input.iter().map(|&v| f64::from(v)).sum();
                    let got = f64::from(out[0]) + f64::from(out[1]);
                    assert!((got - want).abs() < 1e-3, "seed {seed}: thread {k} round {round}: {got} vs {want}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Runs the ignored test `name` in a child process of this test binary and returns (success, stderr).
fn run_child(name: &str) -> (bool, String) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", name, "--ignored", "--test-threads=1"])
        .env("DERMA_EMU_CHILD", "1")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn in_child() -> bool {
    std::env::var_os("DERMA_EMU_CHILD").is_some()
}

#[test]
#[ignore = "run by asan_flavour_fails_the_run_on_bad_accesses in a child process"]
fn child_read_past_end() {
    if !in_child() {
        return;
    }
    // Exactly 37 floats on the heap: ASan's redzone starts right after them.
    let input = vec![1.0f32; 37].into_boxed_slice();
    let mut out = [0f32; 1];
    let _ = launch(
        "emu_test_read_past_end",
        (1, 1, 1),
        (32, 1, 1),
        0,
        Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f32).push(37i32),
    );
}

#[test]
#[ignore = "run by asan_flavour_fails_the_run_on_bad_accesses in a child process"]
fn child_misaligned_vector() {
    if !in_child() {
        return;
    }
    let input = vec![1.0f32; 64];
    let mut out = vec![[0f32; 4]; 1];
    let _ = launch(
        "emu_test_misaligned_vector",
        (1, 1, 1),
        (32, 1, 1),
        0,
        Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f32),
    );
}

#[test]
#[ignore = "run by asan_flavour_fails_the_run_on_bad_accesses in a child process"]
fn child_dynamic_shared_overrun() {
    if !in_child() {
        return;
    }
    let mut out = vec![0f32; 1];
    let _ = launch(
        "emu_test_dynamic_shared_overrun",
        (1, 1, 1),
        (32, 1, 1),
        128,
        Args::new().ptr(out.as_mut_ptr()).push(32i32),
    );
}

#[test]
#[ignore = "run by asan_flavour_fails_the_run_on_bad_accesses in a child process"]
fn child_read_of_memory_marked_inaccessible() {
    if !in_child() {
        return;
    }
    // 64 floats of which the last 16 are marked off limits: reading element 50 is inside the host allocation but
    // past the 48 the caller uses.
    let input = vec![1.0f32; 64];
    let mut out = vec![0f32; 1];
    // SAFETY: the range is the tail of `input`, untouched until it is marked accessible again (never: the child
    // dies in the launch).
    unsafe { sys::mark_inaccessible(input.as_ptr() as u64 + 48 * 4, 16 * 4) };
    let _ = launch(
        "emu_test_read_past_end",
        (1, 1, 1),
        (32, 1, 1),
        0,
        Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f32).push(50i32),
    );
}

#[test]
fn memory_marked_inaccessible_is_usable_again_once_marked_accessible() {
    sys::set_schedule(forward());
    let input: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let mut out = vec![0f32; 1];
    let tail = input.as_ptr() as u64 + 48 * 4;
    // SAFETY: the range is the tail of `input`; nothing reads it while it is marked.
    unsafe {
        sys::mark_inaccessible(tail, 16 * 4);
        sys::mark_accessible(tail, 16 * 4);
    }
    launch(
        "emu_test_read_past_end",
        (1, 1, 1),
        (32, 1, 1),
        0,
        Args::new().ptr(out.as_mut_ptr()).ptr(input.as_ptr() as *mut f32).push(50i32),
    )
    .unwrap();
    assert_eq!(out[0], 50.0);
}

#[test]
fn asan_flavour_fails_the_run_on_bad_accesses() {
    if sys::flavour() != "asan" {
        eprintln!("plain flavour: the ASan checks run under `--features emu-asan` (src/cuda/emu/mod.rs)");
        return;
    }
    let (ok, err) = run_child("child_read_past_end");
    assert!(!ok && err.contains("AddressSanitizer: heap-buffer-overflow"), "read past the end: {err}");
    assert!(err.contains("READ of size 4"), "{err}");
    assert!(
        err.contains("made by kernel emu_test_read_past_end, block (0,0,0), thread (0,0,0)"),
        "the report names the launch: {err}"
    );
    let (ok, err) = run_child("child_dynamic_shared_overrun");
    assert!(!ok && err.contains("AddressSanitizer"), "dynamic shared overrun: {err}");
    let (ok, err) = run_child("child_read_of_memory_marked_inaccessible");
    assert!(!ok && err.contains("AddressSanitizer: use-after-poison"), "read of marked memory: {err}");
    let (ok, err) = run_child("child_misaligned_vector");
    assert!(!ok && err.contains("misaligned address"), "misaligned float4 load: {err}");
    assert!(err.contains(TEST_FILE), "UBSan names the kernel's line: {err}");
    assert!(err.contains("made by kernel emu_test_misaligned_vector"), "{err}");
}
