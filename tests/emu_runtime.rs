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
        ["silu_fwd_f32", "silu_fwd_f16", "bn_stats_partial_f32", "softmax_loss_f16", "adamw_f32", "emu_test_indices"]
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
