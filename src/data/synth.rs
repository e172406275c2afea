//! A synthetic dataset in the exact ISIC 2019 layout, for tests, benchmarks and `derma train` without data.
//!
//! Classes follow ISIC 2019's imbalance (proportions of [`ISIC_TRAIN_COUNTS`](super::ISIC_TRAIN_COUNTS), every
//! class at least 3 images when `n ≥ 24`). Each lesion is drawn on a noisy, shaded skin-tone background with a
//! class-dependent look that survives downsampling to ~64 px: colour, size, shape (round to elongated, smooth or
//! ragged border) and texture (dots, stripes, a pale centre, rough speckle). A lesion is sometimes photographed
//! 2–3 times (shifted, re-lit) under one `lesion_id`; some images have no lesion id.
//!
//! With `faults`, extra rows exercise verification: a missing file, an empty file, a truncated JPEG, an
//! undecodable file, labels with two and with zero positive classes, a duplicate image id (all excluded), and
//! files that must load: a PNG named `.jpg`, a grayscale JPEG, a CMYK JPEG, a progressive JPEG and an 8×8 JPEG.

use super::ISIC_CLASSES;
use super::ISIC_TRAIN_COUNTS;
use super::source::{ISIC_GROUND_TRUTH, ISIC_IMAGES, ISIC_METADATA};
use anyhow::{Context, Result, bail};
use image::{ImageEncoder, RgbImage, codecs::jpeg::JpegEncoder};
use rand::seq::SliceRandom;
use rand::{Rng, RngExt, SeedableRng};
use rand_pcg::Pcg64;
use rayon::prelude::*;
use serde::Serialize;
use std::fs;
use std::path::PathBuf;

/// Settings of [`synth`] (the `derma synth` flags).
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Output folder (created).
    pub out: PathBuf,
    /// Number of regular images (fault rows come on top).
    pub n: usize,
    /// Seed of everything drawn.
    pub seed: u64,
    /// Add the fault rows.
    pub faults: bool,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
}

impl SynthOptions {
    /// Defaults: 400 images of 600×450, seed 0, no faults.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        SynthOptions { out: out.into(), n: 400, seed: 0, faults: false, width: 600, height: 450 }
    }
}

/// A fault row written by `--faults`.
#[derive(Clone, Debug, Serialize)]
pub struct SynthFault {
    /// Image id of the row.
    pub image: String,
    /// What is wrong (or special) about it.
    pub kind: String,
    /// Whether verification must keep it.
    pub usable: bool,
}

/// What [`synth`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SynthSummary {
    /// Output folder.
    pub out: String,
    /// Rows in the ground-truth file.
    pub rows: usize,
    /// Rows verification should keep.
    pub expected_usable: usize,
    /// Usable images per class, in ISIC order without `UNK`.
    pub class_counts: Vec<usize>,
    /// Distinct lesion ids among usable images.
    pub lesions: usize,
    /// The fault rows.
    pub faults: Vec<SynthFault>,
}

#[derive(Clone, Copy)]
enum Texture {
    Plain,
    Dots([f32; 3]),
    Stripes,
    PaleCentre,
    Rough,
}

#[derive(Clone, Copy)]
struct Style {
    color: [f32; 3],
    radius: f32,
    elong: f32,
    ragged: f32,
    texture: Texture,
}

fn style(class: usize) -> Style {
    let s = |color, radius, elong, ragged, texture| Style { color, radius, elong, ragged, texture };
    match class {
        0 => s([50.0, 35.0, 50.0], 0.30, 1.3, 0.18, Texture::Dots([15.0, 10.0, 25.0])), // MEL
        1 => s([150.0, 95.0, 60.0], 0.22, 1.0, 0.0, Texture::Plain),                    // NV
        2 => s([235.0, 175.0, 190.0], 0.20, 1.0, 0.04, Texture::Stripes),               // BCC
        3 => s([205.0, 70.0, 60.0], 0.17, 1.7, 0.08, Texture::Rough),                   // AK
        4 => s([195.0, 165.0, 85.0], 0.25, 2.2, 0.05, Texture::Stripes),                // BKL
        5 => s([105.0, 60.0, 40.0], 0.15, 1.0, 0.0, Texture::PaleCentre),               // DF
        6 => s([125.0, 15.0, 95.0], 0.11, 1.0, 0.0, Texture::Plain),                    // VASC
        _ => s([220.0, 125.0, 75.0], 0.28, 1.2, 0.10, Texture::Dots([245.0, 235.0, 225.0])), // SCC
    }
}

/// One lesion's drawn look; images of the same lesion share it.
#[derive(Clone, Copy)]
struct Lesion {
    class: usize,
    style: Style,
    cx: f32,
    cy: f32,
    radius: f32,
    angle: f32,
    phase: f32,
    skin: [f32; 3],
    tint: [f32; 3],
}

fn draw_lesion(rng: &mut Pcg64, class: usize) -> Lesion {
    let st = style(class);
    let u = |rng: &mut Pcg64, a: f32| (rng.random::<f32>() * 2.0 - 1.0) * a;
    let t = rng.random::<f32>();
    let skin = [225.0 - 60.0 * t, 190.0 - 75.0 * t, 165.0 - 75.0 * t];
    Lesion {
        class,
        style: st,
        cx: 0.5 + u(rng, 0.1),
        cy: 0.5 + u(rng, 0.1),
        radius: st.radius * (1.0 + u(rng, 0.15)),
        angle: u(rng, std::f32::consts::PI),
        phase: rng.random::<f32>() * std::f32::consts::TAU,
        skin,
        tint: [u(rng, 12.0), u(rng, 10.0), u(rng, 10.0)],
    }
}

fn render(l: &Lesion, w: u32, h: u32, shot: u64) -> RgbImage {
    let mut rng = Pcg64::seed_from_u64(shot);
    let (wf, hf) = (w as f32, h as f32);
    let m = wf.min(hf);
    // Each photograph of a lesion: slightly shifted, re-lit.
    let (sx, sy) = ((rng.random::<f32>() - 0.5) * 0.06 * wf, (rng.random::<f32>() - 0.5) * 0.06 * hf);
    let light = 0.94 + 0.12 * rng.random::<f32>();
    let (cx, cy) = (l.cx * wf + sx, l.cy * hf + sy);
    let (a, b) = (l.radius * m * l.style.elong.sqrt(), l.radius * m / l.style.elong.sqrt());
    let (ca, sa) = (l.angle.cos(), l.angle.sin());
    let period = (m / 18.0).max(3.0);
    let mut img = RgbImage::new(w, h);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
        let (dx, dy) = (fx - cx, fy - cy);
        let (u, v) = (ca * dx + sa * dy, -sa * dx + ca * dy);
        let theta = v.atan2(u);
        let ragged = 1.0 + l.style.ragged * ((5.0 * theta + l.phase).sin() + 0.5 * (11.0 * theta).sin());
        let d = ((u / a).powi(2) + (v / b).powi(2)).sqrt() / ragged;
        // Background: skin with soft shading towards the corners and pixel noise.
        let vignette = 1.0 - 0.15 * ((fx / wf - 0.5).powi(2) + (fy / hf - 0.5).powi(2));
        let mut c = l.skin.map(|s| s * vignette);
        let inside = ((1.1 - d) / 0.2).clamp(0.0, 1.0);
        if inside > 0.0 {
            let mut lc = [0, 1, 2].map(|k| l.style.color[k] + l.tint[k]);
            match l.style.texture {
                Texture::Plain => {}
                Texture::Dots(dot) => {
                    let (gx, gy) = ((u / period).rem_euclid(1.0) - 0.5, (v / period).rem_euclid(1.0) - 0.5);
                    if gx * gx + gy * gy < 0.09 && d < 0.85 {
                        lc = dot;
                    }
                }
                Texture::Stripes => {
                    if (u * std::f32::consts::TAU / period).sin() > 0.55 {
                        lc = lc.map(|c| c * 0.6);
                    }
                }
                Texture::PaleCentre => {
                    if d < 0.5 {
                        lc = [235.0, 215.0, 200.0];
                    }
                }
                Texture::Rough => {
                    let r = rng.random::<f32>() * 60.0 - 30.0;
                    lc = lc.map(|c| c + r);
                }
            }
            c = [0, 1, 2].map(|k| c[k] + inside * (lc[k] - c[k]));
        }
        let noise = (rng.random::<f32>() - 0.5) * 16.0;
        *px = image::Rgb(c.map(|v| (v * light + noise).clamp(0.0, 255.0) as u8));
    }
    img
}

fn jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, quality)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .context("encoding a synthetic JPEG")?;
    Ok(out)
}

/// Per-class image counts for `n` images: at least `min(3, n/8)` each, the rest proportional to ISIC 2019's
/// counts (largest remainder).
pub fn class_counts(n: usize) -> Vec<usize> {
    let k = 8;
    let floor = (n / k).min(3);
    let rest = n - floor * k;
    let total: usize = ISIC_TRAIN_COUNTS[..k].iter().sum();
    let exact: Vec<f64> = ISIC_TRAIN_COUNTS[..k].iter().map(|&c| rest as f64 * c as f64 / total as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let short = rest - counts.iter().sum::<usize>();
    for &c in order.iter().take(short) {
        counts[c] += 1;
    }
    counts.iter().map(|c| c + floor).collect()
}

struct Item {
    image: String,
    /// One-hot values written to the ground truth (8 classes + UNK).
    onehot: [u8; 9],
    lesion_id: Option<String>,
    /// File content; `None` = no file (the missing-file fault or a duplicate row).
    file: Option<FileKind>,
}

enum FileKind {
    Jpeg(Lesion, u64),
    Bytes(Vec<u8>),
}

/// Writes a synthetic dataset (see the module docs) and returns what verification should find.
pub fn synth(opts: &SynthOptions) -> Result<SynthSummary> {
    if opts.n < 8 {
        bail!("synth needs at least 8 images (one per class), got --n {}", opts.n);
    }
    if opts.width < 8 || opts.height < 8 || opts.width > 4096 || opts.height > 4096 {
        bail!("synth image size {}x{} is out of range (8 to 4096 per side)", opts.width, opts.height);
    }
    let img_dir = opts.out.join(ISIC_IMAGES);
    fs::create_dir_all(&img_dir).with_context(|| format!("creating {}", img_dir.display()))?;
    let mut rng = Pcg64::seed_from_u64(opts.seed ^ 0x5A17_0000);
    let counts = class_counts(opts.n);

    // Lesions: groups of 1-3 images of one class; a few single images without lesion id.
    let mut shots: Vec<(Lesion, Option<String>)> = Vec::new();
    let mut lesion_no = 0usize;
    for (class, &count) in counts.iter().enumerate() {
        let mut left = count;
        while left > 0 {
            let r = rng.random::<f32>();
            let g = if r < 0.6 {
                1
            } else if r < 0.85 {
                2
            } else {
                3
            }
            .min(left);
            let lesion = draw_lesion(&mut rng, class);
            lesion_no += 1;
            let id = if g == 1 && rng.random::<f32>() < 0.1 { None } else { Some(format!("SYN_{lesion_no:07}")) };
            for _ in 0..g {
                shots.push((lesion, id.clone()));
            }
            left -= g;
        }
    }
    shots.shuffle(&mut rng);
    let mut next_id = rng.random_range(0..20usize);
    let mut new_id = |rng: &mut Pcg64| {
        next_id += 1 + rng.random_range(0..3usize);
        format!("ISIC_{next_id:07}")
    };
    let onehot = |c: Option<usize>| {
        let mut o = [0u8; 9];
        if let Some(c) = c {
            o[c] = 1;
        }
        o
    };
    let mut items: Vec<Item> = Vec::new();
    for (lesion, lesion_id) in &shots {
        let image = new_id(&mut rng);
        items.push(Item {
            image,
            onehot: onehot(Some(lesion.class)),
            lesion_id: lesion_id.clone(),
            file: Some(FileKind::Jpeg(*lesion, rng.next_u64())),
        });
    }
    let mut faults = Vec::new();
    if opts.faults {
        add_faults(&mut items, &mut faults, &mut rng, opts, &mut new_id)?;
    }

    // Image files, in parallel.
    items
        .par_iter()
        .map(|it| -> Result<()> {
            let path = img_dir.join(format!("{}.jpg", it.image));
            let bytes = match &it.file {
                None => return Ok(()),
                Some(FileKind::Bytes(b)) => b.clone(),
                Some(FileKind::Jpeg(l, shot)) => jpeg(&render(l, opts.width, opts.height, *shot), 90)?,
            };
            fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
        })
        .collect::<Result<Vec<()>>>()?;

    // Ground truth and metadata (the duplicate row repeats an id, so the files are written from `items`).
    let gt = opts.out.join(ISIC_GROUND_TRUTH);
    let mut w = csv::Writer::from_path(&gt).with_context(|| format!("creating {}", gt.display()))?;
    let mut header = vec!["image"];
    header.extend(ISIC_CLASSES);
    w.write_record(&header)?;
    for it in &items {
        let mut rec = vec![it.image.clone()];
        rec.extend(it.onehot.iter().map(|&v| if v == 1 { "1.0".to_string() } else { "0.0".to_string() }));
        w.write_record(&rec)?;
    }
    w.flush().with_context(|| format!("writing {}", gt.display()))?;
    let meta = opts.out.join(ISIC_METADATA);
    let mut w = csv::Writer::from_path(&meta).with_context(|| format!("creating {}", meta.display()))?;
    w.write_record(["image", "age_approx", "anatom_site_general", "lesion_id", "sex"])?;
    let sites = ["anterior torso", "upper extremity", "lower extremity", "head/neck", "posterior torso", ""];
    for it in &items {
        let age = if rng.random::<f32>() < 0.05 { String::new() } else { format!("{}.0", 5 * rng.random_range(3..17)) };
        let site = sites[rng.random_range(0..sites.len())];
        let sex = ["male", "female", ""][rng.random_range(0..3usize)];
        w.write_record([it.image.as_str(), &age, site, it.lesion_id.as_deref().unwrap_or(""), sex])?;
    }
    w.flush().with_context(|| format!("writing {}", meta.display()))?;

    // What verification must find: regular images plus the usable fault files.
    let mut class_counts = counts;
    let mut lesions: std::collections::BTreeSet<&str> = shots.iter().filter_map(|s| s.1.as_deref()).collect();
    for f in faults.iter().filter(|f: &&SynthFault| f.usable) {
        if let Some(it) = items.iter().find(|it| it.image == f.image) {
            if let Some(c) = it.onehot.iter().position(|&v| v == 1) {
                class_counts[c] += 1;
            }
            if let Some(l) = &it.lesion_id {
                lesions.insert(l);
            }
        }
    }
    let lesions = lesions.len();
    Ok(SynthSummary {
        out: opts.out.display().to_string(),
        rows: items.len(),
        expected_usable: class_counts.iter().sum(),
        class_counts,
        lesions,
        faults,
    })
}

const USABLE_FAULTS: [&str; 5] = ["png named .jpg", "grayscale JPEG", "CMYK JPEG", "progressive JPEG", "tiny 8x8 JPEG"];

/// Appends a fault row with a fresh id and the given positive classes.
fn push_fault(
    items: &mut Vec<Item>,
    faults: &mut Vec<SynthFault>,
    image: String,
    kind: &str,
    classes: &[usize],
    file: Option<FileKind>,
) {
    let usable = USABLE_FAULTS.contains(&kind);
    faults.push(SynthFault { image: image.clone(), kind: kind.to_string(), usable });
    let mut onehot = [0u8; 9];
    for &c in classes {
        onehot[c] = 1;
    }
    items.push(Item { image, onehot, lesion_id: None, file });
}

fn add_faults(
    items: &mut Vec<Item>,
    faults: &mut Vec<SynthFault>,
    rng: &mut Pcg64,
    opts: &SynthOptions,
    new_id: &mut impl FnMut(&mut Pcg64) -> String,
) -> Result<()> {
    let (w, h) = (opts.width, opts.height);
    let picture = |rng: &mut Pcg64, c: usize, w: u32, h: u32| {
        let l = draw_lesion(rng, c);
        render(&l, w, h, rng.next_u64())
    };
    let id = new_id(rng);
    push_fault(items, faults, id, "missing file", &[1], None);
    let id = new_id(rng);
    push_fault(items, faults, id, "empty file", &[1], Some(FileKind::Bytes(Vec::new())));
    let full = jpeg(&picture(rng, 0, w, h), 90)?;
    let cut = full[..full.len() * 3 / 5].to_vec();
    let id = new_id(rng);
    push_fault(items, faults, id, "truncated JPEG", &[0], Some(FileKind::Bytes(cut)));
    let id = new_id(rng);
    let text = b"not an image, just text\n".to_vec();
    push_fault(items, faults, id, "undecodable file", &[1], Some(FileKind::Bytes(text)));
    let (l, shot, id) = (draw_lesion(rng, 1), rng.next_u64(), new_id(rng));
    push_fault(items, faults, id, "two positive labels", &[0, 1], Some(FileKind::Jpeg(l, shot)));
    let (l, shot, id) = (draw_lesion(rng, 2), rng.next_u64(), new_id(rng));
    push_fault(items, faults, id, "no positive label", &[], Some(FileKind::Jpeg(l, shot)));
    // The duplicate row repeats the first regular image's id with another label; the first row is kept.
    if let Some(first) = items.first() {
        let image = first.image.clone();
        push_fault(items, faults, image, "duplicate image id", &[4], None);
    }

    let mut png = std::io::Cursor::new(Vec::new());
    picture(rng, 4, w, h).write_to(&mut png, image::ImageFormat::Png).context("encoding a synthetic PNG")?;
    let id = new_id(rng);
    push_fault(items, faults, id, "png named .jpg", &[4], Some(FileKind::Bytes(png.into_inner())));

    let rgb = picture(rng, 1, w, h);
    let gray: Vec<u8> = rgb
        .pixels()
        .map(|p| ((77 * u32::from(p[0]) + 150 * u32::from(p[1]) + 29 * u32::from(p[2])) >> 8) as u8)
        .collect();
    let mut g = Vec::new();
    JpegEncoder::new_with_quality(&mut g, 90)
        .write_image(&gray, w, h, image::ExtendedColorType::L8)
        .context("encoding a grayscale JPEG")?;
    let id = new_id(rng);
    push_fault(items, faults, id, "grayscale JPEG", &[1], Some(FileKind::Bytes(g)));

    let (w16, h16) = (u16::try_from(w)?, u16::try_from(h)?);
    let rgb = picture(rng, 0, w, h);
    let cmyk: Vec<u8> = rgb
        .pixels()
        .flat_map(|p| {
            let [r, g, b] = p.0.map(f32::from);
            let k = 255.0 - r.max(g).max(b);
            let d = (255.0 - k).max(1.0);
            [(255.0 - r - k) / d * 255.0, (255.0 - g - k) / d * 255.0, (255.0 - b - k) / d * 255.0, k].map(|v| v as u8)
        })
        .collect();
    let mut c = Vec::new();
    jpeg_encoder::Encoder::new(&mut c, 90)
        .encode(&cmyk, w16, h16, jpeg_encoder::ColorType::Cmyk)
        .context("encoding a CMYK JPEG")?;
    let id = new_id(rng);
    push_fault(items, faults, id, "CMYK JPEG", &[0], Some(FileKind::Bytes(c)));

    let rgb = picture(rng, 2, w, h);
    let mut p = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut p, 90);
    enc.set_progressive(true);
    enc.encode(rgb.as_raw(), w16, h16, jpeg_encoder::ColorType::Rgb).context("encoding a progressive JPEG")?;
    let id = new_id(rng);
    push_fault(items, faults, id, "progressive JPEG", &[2], Some(FileKind::Bytes(p)));

    let tiny = jpeg(&picture(rng, 5, 8, 8), 90)?;
    let id = new_id(rng);
    push_fault(items, faults, id, "tiny 8x8 JPEG", &[5], Some(FileKind::Bytes(tiny)));
    Ok(())
}
