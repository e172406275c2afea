//! `derma predict`: class probabilities for image files, as a table, JSON or an ISIC 2019 submission CSV.

use anyhow::{Context, Result, bail};
use clap::Args;
use derma::autograd::Tape;
use derma::cuda::{self, DeviceRequest};
use derma::data::augment::normalize_eval;
use derma::data::decode::{decode_rgb, square_resize};
use derma::data::{ISIC_CLASSES, Ordered};
use derma::io::write_atomic;
use derma::nn::{Ctx, EfficientNet};
use derma::ops::loss::softmax_rows;
use derma::tensor::Array;
use derma::train::checkpoint;
use rand::SeedableRng;
use rand_pcg::Pcg64;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// `derma predict` flags.
#[derive(Args)]
pub struct PredictArgs {
    /// Checkpoint: derma's .safetensors, the seed's .pth checkpoint or plain torchvision weights.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Image files (JPEG or PNG, recognised by content).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many of the most likely classes to show per image.
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// A JSON array on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the ISIC 2019 submission CSV (image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK) here.
    #[arg(long)]
    isic_csv: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value = "auto", value_parser = cuda::parse_device, help = cuda::DEVICE_HELP)]
    device: DeviceRequest,
}

/// One class and its probability.
#[derive(Serialize)]
struct Ranked {
    class: String,
    probability: f64,
}

/// One image's prediction as `--json` prints it.
#[derive(Serialize)]
struct Prediction {
    image: String,
    probabilities: Ordered<f64>,
    top: Vec<Ranked>,
}

/// Reads and decodes one file into the normalized eval input (HWC, `size·size·3`), as the training cache
/// would have stored it: shorter side to `size`, center crop.
fn load_image(path: &Path, size: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let img = decode_rgb(&bytes).map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))?;
    let px = square_resize(&img, size as u32);
    let mut out = vec![0f32; px.len()];
    normalize_eval(&px, &mut out)?;
    Ok(out)
}

/// Softmax probabilities `[n][C]` of a batch of normalized HWC images, model in eval mode.
fn predict_batch(model: &mut EfficientNet<f32>, images: Vec<f32>, n: usize, size: usize) -> Result<Vec<Vec<f64>>> {
    let classes = model.config.num_classes;
    let mut tape = Tape::inference();
    let x = tape.constant(Array::new(&[n, size, size, 3], images)?);
    let mut rng = Pcg64::seed_from_u64(0);
    let mut ctx = Ctx::eval(&mut rng);
    let logits = model.forward(&mut tape, x, &mut ctx)?;
    let probs = softmax_rows(&tape.value(logits).data, classes);
    Ok(probs.chunks(classes).map(<[f64]>::to_vec).collect())
}

/// Column index in the model's classes for each ISIC 2019 submission column (`None`: the model lacks it).
/// Fails when the model has a class that is not an ISIC 2019 class.
fn isic_columns(class_names: &[String]) -> Result<Vec<Option<usize>>> {
    let unknown: Vec<&str> = class_names.iter().map(String::as_str).filter(|c| !ISIC_CLASSES.contains(c)).collect();
    if !unknown.is_empty() {
        bail!(
            "--isic-csv needs a model whose classes are ISIC 2019 classes ({}); this one also has {}",
            ISIC_CLASSES.join(", "),
            unknown.join(", ")
        );
    }
    Ok(ISIC_CLASSES.iter().map(|isic| class_names.iter().position(|c| c == isic)).collect())
}

/// The ISIC 2019 submission CSV: one row per image (id = file stem), probabilities in the ISIC column order.
fn isic_csv(rows: &[(PathBuf, Vec<f64>)], columns: &[Option<usize>]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["image"];
    header.extend(ISIC_CLASSES);
    w.write_record(&header)?;
    let mut seen = BTreeSet::new();
    for (path, probs) in rows {
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name to use as the image id", path.display()))?;
        if !seen.insert(id.clone()) {
            bail!("two images have the id {id} (file stem): the ISIC submission needs unique ids");
        }
        let mut record = vec![id];
        // `{:?}` keeps a decimal point on whole numbers (0.0, not 0) and round-trips every value.
        record.extend(columns.iter().map(|c| format!("{:?}", c.map_or(0.0, |i| probs[i]))));
        w.write_record(&record)?;
    }
    w.into_inner().map_err(|e| anyhow::anyhow!("cannot finish the submission CSV: {e}"))
}

/// The `k` most likely classes, most likely first (ties keep class order).
fn top_k(probs: &[f64], class_names: &[String], k: usize) -> Vec<Ranked> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    order.into_iter().take(k).map(|i| Ranked { class: class_names[i].clone(), probability: probs[i] }).collect()
}

/// Predicts every image (going on past unusable ones), prints or writes the results, then fails if any image
/// could not be used.
pub fn run_predict(a: PredictArgs) -> Result<()> {
    let selected = derma::cuda::select(a.device)?;
    if a.top == 0 {
        bail!("--top must be at least 1");
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut loaded = checkpoint::load(&a.checkpoint)?;
    let columns = a.isic_csv.as_ref().map(|_| isic_columns(&loaded.class_names)).transpose()?;
    let size = loaded.image_size;
    let class_names = loaded.class_names.clone();
    // On a device: the eval-mode forward recorded once for batches of --batch-size, in f32.
    let mut device = match &selected {
        derma::cuda::Selected::Cpu => None,
        sel => {
            let gpu = std::sync::Arc::new(derma::cuda::Gpu::open(sel)?);
            let p = derma::backend::cuda::Precision::F32;
            Some(derma::train::device::DeviceEval::new(gpu, &loaded.model, p, a.batch_size, size)?)
        }
    };

    let mut results: Vec<(PathBuf, Vec<f64>)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for chunk in a.images.chunks(a.batch_size) {
        let mut batch = Vec::new();
        let mut paths = Vec::new();
        for path in chunk {
            match load_image(path, size) {
                Ok(px) => {
                    batch.extend(px);
                    paths.push(path.clone());
                }
                // Reported once, in the summary error at the end.
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        if paths.is_empty() {
            continue;
        }
        let probs = match device.as_mut() {
            None => predict_batch(&mut loaded.model, batch, paths.len(), size),
            Some(d) => d.logits(&mut loaded.model, &batch, paths.len()).map(|z| {
                let c = class_names.len();
                softmax_rows(&z, c).chunks(c).map(<[f64]>::to_vec).collect()
            }),
        }
        .with_context(|| format!("running {} on {}", a.checkpoint.display(), paths[0].display()))?;
        // Finite weights and images can still overflow to inf/NaN; never print such a row as a prediction.
        if let Some((path, _)) = paths.iter().zip(&probs).find(|(_, p)| p.iter().any(|v| !v.is_finite())) {
            bail!(
                "{} gives non-finite probabilities for {} (the logits overflowed): the checkpoint is unusable",
                a.checkpoint.display(),
                path.display()
            );
        }
        results.extend(paths.into_iter().zip(probs));
    }

    let k = a.top.min(class_names.len());
    if a.json {
        let out: Vec<Prediction> = results
            .iter()
            .map(|(path, probs)| Prediction {
                image: path.display().to_string(),
                probabilities: Ordered(class_names.iter().cloned().zip(probs.iter().copied()).collect()),
                top: top_k(probs, &class_names, k),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if !results.is_empty() {
        let names: Vec<String> = results.iter().map(|(p, _)| p.display().to_string()).collect();
        let w = names.iter().map(String::len).max().unwrap_or(0).max("image".len());
        let cw = class_names.iter().map(String::len).max().unwrap_or(0).max(5);
        let mut header = format!("{:<w$}", "image");
        for i in 1..=k {
            header += &format!("  {:<cw$} {:>6}", format!("top-{i}"), "p");
        }
        println!("{header}");
        for (name, (_, probs)) in names.iter().zip(&results) {
            let mut line = format!("{name:<w$}");
            for r in top_k(probs, &class_names, k) {
                line += &format!("  {:<cw$} {:>6.4}", r.class, r.probability);
            }
            println!("{line}");
        }
    }
    if let (Some(out), Some(columns)) = (&a.isic_csv, &columns) {
        write_atomic(out, &isic_csv(&results, columns)?)?;
        eprintln!("wrote {} rows to {}", results.len(), out.display());
    }
    if !failures.is_empty() {
        bail!("{} of {} images could not be used:\n  {}", failures.len(), a.images.len(), failures.join("\n  "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn isic_columns_map_model_classes_and_reject_others() {
        let cols = isic_columns(&names(&["NV", "MEL", "SCC"])).unwrap();
        assert_eq!(cols, vec![Some(1), Some(0), None, None, None, None, None, Some(2), None]);
        let err = isic_columns(&names(&["MEL", "cat"])).unwrap_err().to_string();
        assert!(err.contains("cat"), "{err}");
    }

    #[test]
    fn isic_csv_rows_follow_the_column_order() {
        let cols = isic_columns(&names(&["NV", "MEL"])).unwrap();
        let rows = vec![(PathBuf::from("a/ISIC_1.jpg"), vec![0.25, 0.75])];
        let text = String::from_utf8(isic_csv(&rows, &cols).unwrap()).unwrap();
        assert_eq!(text, "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\nISIC_1,0.75,0.25,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n");
        let dup = vec![(PathBuf::from("a/x.jpg"), vec![0.5, 0.5]), (PathBuf::from("b/x.png"), vec![0.5, 0.5])];
        assert!(isic_csv(&dup, &cols).unwrap_err().to_string().contains("x"));
    }

    #[test]
    fn top_k_orders_by_probability() {
        let t = top_k(&[0.1, 0.6, 0.3], &names(&["a", "b", "c"]), 2);
        assert_eq!(t.iter().map(|r| r.class.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(t[0].probability, 0.6);
    }
}
