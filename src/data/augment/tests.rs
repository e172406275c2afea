use super::*;

fn norm(v: f32, c: usize) -> f32 {
    (v - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
}

fn random_image(s: usize, seed: u64) -> Vec<u8> {
    let mut rng = Pcg64::seed_from_u64(seed);
    (0..s * s * 3).map(|_| rng.random::<u8>()).collect()
}

fn run(src: &[u8], s: u32, os: u32, p: &AugParams) -> Vec<f32> {
    let mut out = vec![0f32; (os * os * 3) as usize];
    apply(src, s, os, p, &mut out).unwrap();
    out
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn normalization_hand_values() {
    let mut out = [0f32; 3];
    normalize_eval(&[0, 255, 128], &mut out).unwrap();
    assert!(close(out[0], -2.117_904, 1e-5));
    assert!(close(out[1], 2.428_571_4, 1e-5));
    assert!(close(out[2], 0.426_492_2, 1e-5));
    assert!(normalize_eval(&[0, 1], &mut out).is_err());
}

#[test]
fn identity_params_equal_eval_normalization() {
    for s in [1usize, 2, 7, 16] {
        let src = random_image(s, s as u64);
        let got = run(&src, s as u32, s as u32, &AugParams::identity(s as u32));
        let mut want = vec![0f32; s * s * 3];
        normalize_eval(&src, &mut want).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(close(*g, *w, 1e-5), "side {s}: {g} vs {w}");
        }
    }
}

#[test]
fn flip_mirrors_columns() {
    let s = 5;
    let src = random_image(s, 3);
    let mut p = AugParams::identity(s as u32);
    p.flip = 1;
    let got = run(&src, 5, 5, &p);
    for y in 0..s {
        for x in 0..s {
            for c in 0..3 {
                let want = norm(f32::from(src[(y * s + (s - 1 - x)) * 3 + c]) / 255.0, c);
                assert!(close(got[(y * s + x) * 3 + c], want, 1e-5));
            }
        }
    }
}

/// An image whose pixels are numbered `(y·s + x + 1) mod 256` in every channel.
fn numbered(s: usize) -> Vec<u8> {
    (0..s * s).flat_map(|i| [((i + 1) % 256) as u8; 3]).collect()
}

fn pixel_number(out: &[f32], s: usize, x: usize, y: usize) -> i64 {
    let v = out[(y * s + x) * 3] * IMAGENET_STD[0] + IMAGENET_MEAN[0];
    (v * 255.0).round() as i64
}

#[test]
fn rotation_90_on_3x3_is_counter_clockwise() {
    let s = 3;
    let src = numbered(s);
    let mut p = AugParams::identity(3);
    p.set_angle(90.0);
    let out = run(&src, 3, 3, &p);
    // Counter-clockwise: out[y][x] = in[x][2 − y] (the right column moves to the top row).
    for y in 0..s {
        for x in 0..s {
            assert_eq!(pixel_number(&out, s, x, y), (x * s + (2 - y) + 1) as i64, "({x},{y})");
        }
    }
}

#[test]
fn rotation_by_3_degrees_hand_cases() {
    let s = 21;
    let src = numbered(s);
    let mut p = AugParams::identity(21);
    p.set_angle(3.0);
    let out = run(&src, 21, 21, &p);
    let n = |x: usize, y: usize| ((y * s + x + 1) % 256) as i64;
    // Centre pixel fixed.
    assert_eq!(pixel_number(&out, s, 10, 10), n(10, 10));
    // Right middle (dx = 10): x_in = 10·cos3° + 10.5 = 20.49, y_in = 10·sin3° + 10.5 = 11.02 → in(20, 11).
    assert_eq!(pixel_number(&out, s, 20, 10), n(20, 11));
    // Left middle: x_in = 0.51, y_in = 9.98 → in(0, 9).
    assert_eq!(pixel_number(&out, s, 0, 10), n(0, 9));
    // Bottom right corner: y_in = 21.01 is outside → fill 0.
    assert_eq!(pixel_number(&out, s, 20, 20), 0);
    // Rotation by 0 changes nothing.
    p.set_angle(0.0);
    let out = run(&src, 21, 21, &p);
    for y in 0..s {
        for x in 0..s {
            assert_eq!(pixel_number(&out, s, x, y), n(x, y));
        }
    }
}

#[test]
fn crop_without_resize_copies_the_box() {
    let s = 9;
    let src = random_image(s, 5);
    let mut p = AugParams::identity(9);
    (p.crop_top, p.crop_left, p.crop_h, p.crop_w) = (2, 3, 4, 4);
    let out = run(&src, 9, 4, &p);
    for y in 0..4 {
        for x in 0..4 {
            for c in 0..3 {
                let want = norm(f32::from(src[((y + 2) * s + x + 3) * 3 + c]) / 255.0, c);
                assert!(close(out[(y * 4 + x) * 3 + c], want, 1e-5));
            }
        }
    }
}

#[test]
fn antialiased_shrink_hand_weights() {
    // 4 columns 0, 70, 140, 210 → 2: support 2, weights (3/7, 3/7, 1/7) and (1/7, 3/7, 3/7): 50 and 160.
    let s = 4;
    let src: Vec<u8> = (0..s * s).flat_map(|i| [(i % 4 * 70) as u8, 0, 0]).collect();
    let mut p = AugParams::identity(4);
    p.crop_h = 4;
    let out = run(&src, 4, 2, &p);
    for y in 0..2 {
        for (x, want) in [(0, 50.0), (1, 160.0)] {
            let got = (out[(y * 2 + x) * 3] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255.0;
            assert!(close(got, want, 1e-3), "({x},{y}): {got}");
        }
    }
    let w = AxisWeights::new(4, 2);
    assert_eq!(w.start, vec![0, 1]);
    let want = [3.0 / 7.0, 3.0 / 7.0, 1.0 / 7.0, 1.0 / 7.0, 3.0 / 7.0, 3.0 / 7.0];
    for (o, ws) in [(0usize, &want[..3]), (1, &want[3..])] {
        for (k, wv) in ws.iter().enumerate() {
            assert!(close(w.w[o * w.taps + k], *wv, 1e-6));
        }
    }
    // Enlarging is plain bilinear: 2 → 4 gives weights (1) at the border, (0.75, 0.25) inside.
    let w = AxisWeights::new(2, 4);
    assert_eq!(w.start, vec![0, 0, 0, 1]);
    assert!(close(w.w[0], 1.0, 1e-6));
    assert!(close(w.w[w.taps], 0.75, 1e-6) && close(w.w[w.taps + 1], 0.25, 1e-6));
}

#[test]
fn colour_operations_on_single_pixels() {
    let b = adjust_brightness([0.5, 0.2, 0.99], 1.05);
    assert!(close(b[0], 0.525, 1e-6) && close(b[1], 0.21, 1e-6) && b[2] == 1.0);
    let c = adjust_contrast([0.9, 0.1, 0.5], 0.9, 0.5);
    assert!(close(c[0], 0.86, 1e-6) && close(c[1], 0.14, 1e-6) && close(c[2], 0.5, 1e-6));
    // grey(0.6, 0.4, 0.2) = 0.437.
    let s = adjust_saturation([0.6, 0.4, 0.2], 0.5);
    assert!(close(s[0], 0.5185, 1e-6) && close(s[1], 0.4185, 1e-6) && close(s[2], 0.3185, 1e-6));
    // Red shifted by a third of a turn is green; by 0.05 it gains 0.3 green.
    let h = adjust_hue([1.0, 0.0, 0.0], 1.0 / 3.0);
    assert!(close(h[0], 0.0, 1e-5) && close(h[1], 1.0, 1e-5) && close(h[2], 0.0, 1e-5));
    let h = adjust_hue([1.0, 0.0, 0.0], 0.05);
    assert!(close(h[0], 1.0, 1e-6) && close(h[1], 0.3, 1e-5) && h[2] == 0.0);
    // Blue shifted back by 0.05 (h = 2/3 → 0.6167): (0.3, 0, 1)... sector 3, f = 0.7: (p, q, v) = (0, 0.3, 1).
    let h = adjust_hue([0.0, 0.0, 1.0], -0.05);
    assert!(close(h[0], 0.0, 1e-6) && close(h[1], 0.3, 1e-5) && close(h[2], 1.0, 1e-6));
    assert_eq!(adjust_hue([0.4, 0.4, 0.4], 0.2), [0.4, 0.4, 0.4]);
    // A zero shift is the identity on random colours.
    let mut rng = Pcg64::seed_from_u64(1);
    for _ in 0..1000 {
        let p: [f32; 3] = [rng.random(), rng.random(), rng.random()];
        let q = adjust_hue(p, 0.0);
        assert!((0..3).all(|c| close(p[c], q[c], 1e-5)), "{p:?} → {q:?}");
    }
}

#[test]
fn contrast_uses_the_image_mean_after_earlier_operations() {
    let src = [51u8, 102, 153]; // (0.2, 0.4, 0.6)
    let mut p = AugParams::identity(1);
    p.contrast = 0.5;
    p.order = [1, 0, 2, 3];
    let out = run(&src, 1, 1, &p);
    // grey = 0.363; 0.363 + 0.5·(v − 0.363).
    for (c, want) in [0.2815f32, 0.3815, 0.4815].iter().enumerate() {
        assert!(close(out[c], norm(*want, c), 1e-5));
    }
    // Brightness 1.5 first: (0.3, 0.6, 0.9), grey 0.5445.
    p.brightness = 1.5;
    p.order = [0, 1, 2, 3];
    let out = run(&src, 1, 1, &p);
    for (c, want) in [0.42225f32, 0.57225, 0.72225].iter().enumerate() {
        assert!(close(out[c], norm(*want, c), 1e-5));
    }
    // Two pixels: the mean is over the image. Grey of (0, 0, 0) is 0 and of (1, 1, 1) is 1 → mean 0.5.
    let src2 = [0u8, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255];
    let mut p = AugParams::identity(2);
    p.contrast = 0.8;
    let out = run(&src2, 2, 2, &p);
    assert!(close(out[0], norm(0.1, 0), 1e-5) && close(out[3], norm(0.9, 0), 1e-5));
}

#[test]
fn noise_is_standard_normal_and_reproducible() {
    let n = 200_000u64;
    let (mut s1, mut s2) = (0f64, 0f64);
    for i in 0..n {
        let z = f64::from(noise_at(42, i));
        s1 += z;
        s2 += z * z;
    }
    let mean = s1 / n as f64;
    let var = s2 / n as f64 - mean * mean;
    assert!(mean.abs() < 0.01, "mean {mean}");
    assert!((var - 1.0).abs() < 0.02, "var {var}");
    assert_eq!(noise_at(7, 3), noise_at(7, 3));
    assert_ne!(noise_at(7, 3), noise_at(8, 3));
    // In `apply`: the difference to the noise-free output is noise_std · noise_at(seed, element).
    let src = random_image(8, 9);
    let mut p = AugParams::identity(8);
    let clean = run(&src, 8, 8, &p);
    p.noise_std = 0.02;
    p.noise_seed = 1234;
    let noisy = run(&src, 8, 8, &p);
    for (i, (a, b)) in noisy.iter().zip(&clean).enumerate() {
        assert!(close(a - b, 0.02 * noise_at(1234, i as u64), 1e-5));
    }
}

#[test]
fn bad_parameters_are_errors() {
    let src = random_image(4, 1);
    let mut out = vec![0f32; 48];
    let mut p = AugParams::identity(4);
    p.crop_top = 1;
    assert!(apply(&src, 4, 4, &p, &mut out).is_err());
    assert!(apply(&src, 5, 4, &AugParams::identity(4), &mut out).is_err());
    assert!(apply(&src, 4, 3, &AugParams::identity(4), &mut out).is_err());
}

#[test]
fn crop_fallback_is_centred_with_clamped_ratio() {
    let mut rng = Pcg64::seed_from_u64(0);
    // An impossible scale forces the fallback: 100x50 is wider than 4/3 → h = 50, w = round(66.67) = 67.
    assert_eq!(random_resized_crop(&mut rng, 50, 100, (2.0, 3.0), (0.75, 4.0 / 3.0)), (0, 16, 50, 67));
    // Tall: 40x100 → w = 40, h = round(40 / 0.75) = 53.
    assert_eq!(random_resized_crop(&mut rng, 100, 40, (2.0, 3.0), (0.75, 4.0 / 3.0)), (23, 0, 53, 40));
    assert_eq!(random_resized_crop(&mut rng, 10, 10, (2.0, 3.0), (0.75, 4.0 / 3.0)), (0, 0, 10, 10));
}

#[test]
fn drawn_parameter_distributions() {
    let cfg = AugConfig::default();
    let n = 20_000u64;
    let s = 224u32;
    let mut flips = 0;
    let mut angle_sum = 0f64;
    let mut angle_quarters = [0usize; 4];
    let mut perms = std::collections::HashSet::new();
    let (mut min_area, mut max_area) = (f64::MAX, 0f64);
    let (mut min_ratio, mut max_ratio) = (f64::MAX, 0f64);
    for pos in 0..n {
        let p = draw(&cfg, 7, 3, pos, s, s);
        assert_eq!(p, draw(&cfg, 7, 3, pos, s, s), "not reproducible");
        flips += p.flip as usize;
        assert!(p.angle_deg.abs() <= 3.0);
        assert!(close(p.cos_a, p.angle_deg.to_radians().cos(), 1e-6));
        angle_sum += f64::from(p.angle_deg);
        angle_quarters[(((p.angle_deg + 3.0) / 1.5) as usize).min(3)] += 1;
        assert!(p.crop_top + p.crop_h <= s && p.crop_left + p.crop_w <= s);
        let area = f64::from(p.crop_h * p.crop_w) / f64::from(s * s);
        let ratio = f64::from(p.crop_w) / f64::from(p.crop_h);
        (min_area, max_area) = (min_area.min(area), max_area.max(area));
        (min_ratio, max_ratio) = (min_ratio.min(ratio), max_ratio.max(ratio));
        for f in [p.brightness, p.contrast, p.saturation] {
            assert!((0.95..=1.05).contains(&f));
        }
        assert!((-0.05..=0.05).contains(&p.hue));
        let mut o = p.order;
        o.sort_unstable();
        assert_eq!(o, [0, 1, 2, 3]);
        perms.insert(p.order);
        assert_eq!(p.noise_std, 0.02);
    }
    let rate = flips as f64 / n as f64;
    assert!((rate - 0.3).abs() < 0.015, "flip rate {rate}");
    assert!((angle_sum / n as f64).abs() < 0.05);
    for q in angle_quarters {
        assert!((q as f64 / n as f64 - 0.25).abs() < 0.02, "{angle_quarters:?}");
    }
    assert_eq!(perms.len(), 24);
    // Rounding w and h moves the area and ratio slightly past the nominal ranges.
    assert!(min_area > 0.91 && min_area < 0.93 && max_area <= 1.0, "area {min_area}..{max_area}");
    assert!(min_ratio > 0.74 && max_ratio < 1.35, "ratio {min_ratio}..{max_ratio}");
    // Different positions and epochs give different draws.
    assert_ne!(draw(&cfg, 7, 3, 0, s, s), draw(&cfg, 7, 3, 1, s, s));
    assert_ne!(draw(&cfg, 7, 3, 0, s, s), draw(&cfg, 7, 4, 0, s, s));
}

#[test]
fn params_are_plain_80_byte_data() {
    assert_eq!(std::mem::size_of::<AugParams>(), 80);
    let p = AugParams::identity(5);
    let bytes: &[u8] = bytemuck::bytes_of(&p);
    assert_eq!(bytes.len(), 80);
}

#[test]
fn portable_ln_and_sin_cos_are_accurate() {
    // Every 24-bit uniform the noise can see, strided, plus the ends.
    let mut worst_ln = 0f64;
    for k in (1u32..=1 << 24).step_by(977).chain([1, 2, (1 << 24) - 1, 1 << 24]) {
        let u = k as f32 * (1.0 / 16_777_216.0);
        let want = f64::from(u).ln();
        worst_ln = worst_ln.max((f64::from(portable_ln(u)) - want).abs() / want.abs().max(1e-30));
    }
    assert!(worst_ln < 1e-6, "ln relative error {worst_ln}");
    assert_eq!(portable_ln(1.0), 0.0);
    let mut worst_trig = 0f64;
    for k in (0u32..1 << 24).step_by(613).chain([0, 1 << 22, 1 << 23, 3 << 22, (1 << 24) - 1]) {
        let t = f64::from(k) * std::f64::consts::TAU / 16_777_216.0;
        let (s, c) = portable_sin_cos(k);
        worst_trig = worst_trig.max((f64::from(s) - t.sin()).abs()).max((f64::from(c) - t.cos()).abs());
    }
    assert!(worst_trig < 3e-7, "sin/cos absolute error {worst_trig}");
    assert_eq!(portable_sin_cos(0), (0.0, 1.0));
}

#[test]
fn contrast_mean_is_order_free_fixed_point() {
    // Summing the same grey levels in another order gives the same integer, hence the same mean.
    let greys: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 999.0).collect();
    let fwd = greys.iter().fold(0u64, |a, &g| a.wrapping_add(grey_fixed(g)));
    let rev = greys.iter().rev().fold(0u64, |a, &g| a.wrapping_add(grey_fixed(g)));
    assert_eq!(fwd, rev);
    let exact = greys.iter().map(|&g| f64::from(g)).sum::<f64>() / 1000.0;
    assert!((f64::from(grey_mean(fwd, 1000)) - exact).abs() < 1e-7);
    assert_eq!(grey_fixed(1.0), 1 << 40);
}
