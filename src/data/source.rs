//! Reading a dataset folder's label and metadata tables into rows.
//!
//! Two layouts are recognised (see the [module docs](super) for details):
//! - ISIC 2019: `ISIC_2019_Training_GroundTruth.csv` (one-hot), optional `ISIC_2019_Training_Metadata.csv`,
//!   images in `ISIC_2019_Training_Input/<image>.jpg`.
//! - Plain: `labels.csv` with columns `image,label` (and optionally `lesion_id`), images in `images/`.
//!
//! Label problems (not exactly one positive class, unreadable values, duplicate ids) are recorded per row as an
//! exclusion reason here; file problems are found later by decoding.

use anyhow::{Context, Result, bail};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Ground-truth file of the ISIC 2019 training data.
pub const ISIC_GROUND_TRUTH: &str = "ISIC_2019_Training_GroundTruth.csv";
/// Metadata file of the ISIC 2019 training data (optional).
pub const ISIC_METADATA: &str = "ISIC_2019_Training_Metadata.csv";
/// Image folder of the ISIC 2019 training data.
pub const ISIC_IMAGES: &str = "ISIC_2019_Training_Input";
/// Label file of the plain layout.
pub const PLAIN_LABELS: &str = "labels.csv";
/// Image folder of the plain layout.
pub const PLAIN_IMAGES: &str = "images";

/// Which layout a folder uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// ISIC 2019 challenge layout.
    Isic2019,
    /// `labels.csv` + `images/`.
    Plain,
}

/// One row of the label table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Image id as written in the table (`ISIC_0000000`).
    pub image: String,
    /// 1-based line number in the label file (the header is line 1).
    pub line: usize,
    /// Image file the row refers to.
    pub path: PathBuf,
    /// Class index into [`Table::class_names`], or why the row cannot be used.
    pub label: std::result::Result<usize, String>,
    /// Lesion the image shows, when the metadata names one.
    pub lesion_id: Option<String>,
}

/// Everything read from a dataset folder's tables.
#[derive(Clone, Debug)]
pub struct Table {
    /// Which layout was found.
    pub layout: Layout,
    /// Class names in label order (ISIC: header order, `UNK` dropped while its column is all zero).
    pub class_names: Vec<String>,
    /// Every data row of the label file, in file order.
    pub rows: Vec<Row>,
    /// ISIC: every class column of the ground truth in header order, including those left out of
    /// [`Table::class_names`]; plain: the class names.
    pub columns: Vec<String>,
    /// Things the user should know about the tables (a missing metadata file, a class column taken in).
    pub warnings: Vec<String>,
}

/// Finds the layout of `dir` and reads its tables.
pub fn read_table(dir: &Path) -> Result<Table> {
    if dir.join(ISIC_GROUND_TRUTH).is_file() {
        read_isic(dir)
    } else if dir.join(PLAIN_LABELS).is_file() {
        read_plain(dir)
    } else {
        bail!(
            "{} holds neither {ISIC_GROUND_TRUTH} (ISIC 2019 layout) nor {PLAIN_LABELS} (plain layout: \
             labels.csv with columns image,label plus an images/ folder); point --data at the dataset folder",
            dir.display()
        )
    }
}

/// A one-hot value: exactly 0 or 1 (`0`, `1.0`, `1.000`, ...); anything else is no label at all.
fn parse_one_hot(v: &str) -> Option<bool> {
    let x: f64 = v.trim().parse().ok()?;
    if x == 0.0 {
        Some(false)
    } else if x == 1.0 {
        Some(true)
    } else {
        None
    }
}

/// The first line of a file as written (for error messages about its header).
fn first_line(path: &Path) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = std::io::BufReader::new(f).read_line(&mut line);
    }
    line.trim_end_matches(['\r', '\n']).trim_start_matches('\u{feff}').to_string()
}

/// Reads the ISIC 2019 ground truth and, when present, the metadata's lesion ids.
fn read_isic(dir: &Path) -> Result<Table> {
    let gt_path = dir.join(ISIC_GROUND_TRUTH);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_path(&gt_path)
        .with_context(|| format!("opening {}", gt_path.display()))?;
    let header = rdr.headers().with_context(|| format!("reading the header of {}", gt_path.display()))?.clone();
    if header.len() < 2 || header.get(0).map(str::trim) != Some("image") {
        bail!(
            "{}: the header must be `image` followed by the class columns (image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK), \
             found `{}`",
            gt_path.display(),
            first_line(&gt_path)
        );
    }
    let all_classes: Vec<String> = header.iter().skip(1).map(|s| s.trim().to_string()).collect();
    // Raw records first: whether UNK is a class depends on the whole column.
    let mut raw: Vec<(usize, String, Result<Vec<bool>, String>)> = Vec::new();
    for (k, rec) in rdr.records().enumerate() {
        let line = k + 2;
        let rec = rec.with_context(|| format!("{} line {line}: unreadable CSV record", gt_path.display()))?;
        let image = rec.get(0).unwrap_or("").trim().to_string();
        let values: Result<Vec<bool>, String> = if rec.len() != header.len() {
            Err(format!("label row has {} fields, the header has {}", rec.len(), header.len()))
        } else {
            rec.iter()
                .skip(1)
                .zip(&all_classes)
                .map(|(v, c)| parse_one_hot(v).ok_or_else(|| format!("label value {v:?} for class {c} is not 0 or 1")))
                .collect()
        };
        raw.push((line, image, values));
    }
    let unk = all_classes.iter().position(|c| c == "UNK");
    let unk_lines: Vec<usize> = unk.map_or_else(Vec::new, |u| {
        raw.iter().filter(|(_, _, v)| v.as_ref().is_ok_and(|v| v[u])).map(|(line, _, _)| *line).collect()
    });
    let drop_unk = unk.is_some() && unk_lines.is_empty();
    let kept: Vec<usize> = (0..all_classes.len()).filter(|&c| !(drop_unk && Some(c) == unk)).collect();
    let class_names: Vec<String> = kept.iter().map(|&c| all_classes[c].clone()).collect();
    let mut warnings = Vec::new();
    if !unk_lines.is_empty() {
        let shown: Vec<String> = unk_lines.iter().take(5).map(usize::to_string).collect();
        warnings.push(format!(
            "class UNK is positive in {} row(s) (line {}{}), so it is a class of its own: the model gets {} outputs \
             instead of {}",
            unk_lines.len(),
            shown.join(", "),
            if unk_lines.len() > 5 { ", ..." } else { "" },
            class_names.len(),
            class_names.len() - 1
        ));
    }

    let lesions = match read_isic_lesions(dir)? {
        Some(l) => l,
        None => {
            warnings.push(format!(
                "{ISIC_METADATA} not found in {}: the split cannot be grouped by lesion, so images of one lesion \
                 may land on both sides and validation scores come out optimistic; put the metadata file next to \
                 {ISIC_GROUND_TRUTH}",
                dir.display()
            ));
            HashMap::new()
        }
    };
    let img_dir = dir.join(ISIC_IMAGES);
    let mut seen = HashSet::new();
    let rows = raw
        .into_iter()
        .map(|(line, image, values)| {
            let label = values.and_then(|v| {
                let pos: Vec<usize> = kept.iter().enumerate().filter(|&(_, &c)| v[c]).map(|(i, _)| i).collect();
                match pos.len() {
                    1 => Ok(pos[0]),
                    0 => Err("label has no positive class".to_string()),
                    n => Err(format!(
                        "label has {n} positive classes ({})",
                        pos.iter().map(|&i| class_names[i].as_str()).collect::<Vec<_>>().join(",")
                    )),
                }
            });
            let label = check_id(&image, &mut seen).and(label);
            Row {
                path: img_dir.join(format!("{image}.jpg")),
                lesion_id: lesions.get(&image).cloned(),
                image,
                line,
                label,
            }
        })
        .collect();
    Ok(Table { layout: Layout::Isic2019, class_names, rows, columns: all_classes, warnings })
}

/// Image ids must be non-empty, must not name other folders, and must be unique (the first row is kept).
fn check_id(image: &str, seen: &mut HashSet<String>) -> Result<(), String> {
    if image.is_empty() {
        return Err("empty image id".to_string());
    }
    if image.contains('/') || image.contains('\\') || image == ".." {
        return Err(format!("image id {image:?} contains a path separator"));
    }
    if !seen.insert(image.to_string()) {
        return Err("duplicate image id (the first row with this id is kept)".to_string());
    }
    Ok(())
}

/// Lesion id per image from the ISIC metadata file; `None` when the file is absent.
fn read_isic_lesions(dir: &Path) -> Result<Option<HashMap<String, String>>> {
    let path = dir.join(ISIC_METADATA);
    let mut out = HashMap::new();
    if !path.is_file() {
        return Ok(None);
    }
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let header = rdr.headers().with_context(|| format!("reading the header of {}", path.display()))?.clone();
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let (Some(ic), Some(lc)) = (col("image"), col("lesion_id")) else {
        bail!(
            "{}: the header must have `image` and `lesion_id` columns (ISIC 2019: \
             image,age_approx,anatom_site_general,lesion_id,sex), found `{}`",
            path.display(),
            first_line(&path)
        );
    };
    for (k, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{} line {}: unreadable CSV record", path.display(), k + 2))?;
        let image = rec.get(ic).unwrap_or("").trim();
        let lesion = rec.get(lc).unwrap_or("").trim();
        if !image.is_empty() && !lesion.is_empty() {
            out.entry(image.to_string()).or_insert_with(|| lesion.to_string());
        }
    }
    Ok(Some(out))
}

/// Reads `labels.csv` (`image,label[,lesion_id]`); classes are the distinct labels in sorted order.
fn read_plain(dir: &Path) -> Result<Table> {
    let path = dir.join(PLAIN_LABELS);
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let header = rdr.headers().with_context(|| format!("reading the header of {}", path.display()))?.clone();
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let (Some(ic), Some(lc)) = (col("image"), col("label")) else {
        bail!(
            "{}: the header must have `image` and `label` columns (optionally `lesion_id`), found `{}`",
            path.display(),
            first_line(&path)
        );
    };
    let lesion_col = col("lesion_id");
    let mut warnings = Vec::new();
    if lesion_col.is_none() {
        warnings.push(format!(
            "{} has no lesion_id column: the split cannot be grouped by lesion, so images of one lesion may land \
             on both sides and validation scores come out optimistic",
            path.display()
        ));
    }
    let mut recs = Vec::new();
    for (k, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{} line {}: unreadable CSV record", path.display(), k + 2))?;
        let field = |c: usize| rec.get(c).unwrap_or("").trim().to_string();
        recs.push((k + 2, field(ic), field(lc), lesion_col.map(field).filter(|s| !s.is_empty())));
    }
    let classes: BTreeSet<&str> = recs.iter().map(|r| r.2.as_str()).filter(|s| !s.is_empty()).collect();
    let class_names: Vec<String> = classes.iter().map(|s| s.to_string()).collect();
    let img_dir = dir.join(PLAIN_IMAGES);
    let mut seen = HashSet::new();
    let rows = recs
        .into_iter()
        .map(|(line, image, label, lesion_id)| {
            let label = check_id(&image, &mut seen)
                .and_then(|()| class_names.iter().position(|c| *c == label).ok_or_else(|| "empty label".to_string()));
            // Ids without an extension name `<id>.jpg`, like ISIC's.
            let file = if Path::new(&image).extension().is_some() { image.clone() } else { format!("{image}.jpg") };
            Row { path: img_dir.join(file), image, line, label, lesion_id }
        })
        .collect();
    Ok(Table { layout: Layout::Plain, columns: class_names.clone(), class_names, rows, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write_gt(dir: &Path, rows: &str) {
        fs::write(dir.join(ISIC_GROUND_TRUTH), format!("image,MEL,NV,UNK\n{rows}")).unwrap();
    }

    #[test]
    fn unk_is_dropped_only_while_all_zero() {
        let tmp = tempfile::tempdir().unwrap();
        write_gt(tmp.path(), "a,1.0,0.0,0.0\nb,0.0,1.0,0.0\nc,abc,0.0,0.0\nd,0.0,0.0,0.0\na,0.0,1.0,0.0\ne,1,1,0\n");
        fs::write(
            tmp.path().join(ISIC_METADATA),
            "image,age_approx,anatom_site_general,lesion_id,sex\na,,,L1,\nb,30.0,,,male\n",
        )
        .unwrap();
        let t = read_table(tmp.path()).unwrap();
        assert_eq!(t.layout, Layout::Isic2019);
        assert_eq!(t.class_names, vec!["MEL", "NV"]);
        let labels: Vec<_> = t.rows.iter().map(|r| r.label.clone()).collect();
        assert_eq!(labels[0], Ok(0));
        assert_eq!(labels[1], Ok(1));
        assert!(labels[2].as_ref().unwrap_err().contains("not 0 or 1"));
        assert_eq!(labels[3], Err("label has no positive class".to_string()));
        assert!(labels[4].as_ref().unwrap_err().contains("duplicate"));
        assert!(labels[5].as_ref().unwrap_err().contains("2 positive classes (MEL,NV)"));
        assert_eq!(t.rows[0].lesion_id.as_deref(), Some("L1"));
        assert_eq!(t.rows[1].lesion_id, None);
        assert_eq!(t.rows[2].line, 4);
        assert!(t.rows[0].path.ends_with("ISIC_2019_Training_Input/a.jpg"));

        write_gt(tmp.path(), "a,0.0,0.0,1.0\nb,0.0,1.0,0.0\n");
        let t = read_table(tmp.path()).unwrap();
        assert_eq!(t.class_names, vec!["MEL", "NV", "UNK"]);
        assert_eq!(t.rows[0].label, Ok(2));
        // A ninth class is never silent: the warning names UNK and its line.
        assert!(
            t.warnings.iter().any(|w| w.contains("class UNK is positive in 1 row(s) (line 2)")),
            "{:?}",
            t.warnings
        );
        // The metadata file is there: no lesion warning.
        assert!(!t.warnings.iter().any(|w| w.contains("grouped by lesion")), "{:?}", t.warnings);
    }

    #[test]
    fn only_zero_and_one_are_labels() {
        let tmp = tempfile::tempdir().unwrap();
        write_gt(
            tmp.path(),
            "a,2,0,0\nb,-1,1,0\nc,0.6,0,0\nd,1.000,0,0\ne,0.0,1,0.0\nf,0,1e0,0\ng,1,0.5,0\nh,NaN,1,0\n",
        );
        let t = read_table(tmp.path()).unwrap();
        let labels: Vec<_> = t.rows.iter().map(|r| r.label.clone()).collect();
        assert!(labels[0].as_ref().unwrap_err().contains("label value \"2\" for class MEL is not 0 or 1"));
        assert!(labels[1].as_ref().unwrap_err().contains("\"-1\" for class MEL"));
        assert!(labels[2].as_ref().unwrap_err().contains("\"0.6\" for class MEL"));
        assert_eq!(labels[3], Ok(0));
        assert_eq!(labels[4], Ok(1));
        assert_eq!(labels[5], Ok(1));
        assert!(labels[6].as_ref().unwrap_err().contains("\"0.5\" for class NV"));
        assert!(labels[7].as_ref().unwrap_err().contains("\"NaN\""));
        assert_eq!(t.class_names, vec!["MEL", "NV"]);
        assert_eq!(t.columns, vec!["MEL", "NV", "UNK"]);
        // No metadata file: the split cannot be grouped by lesion, and the warning says so.
        assert!(
            t.warnings.iter().any(|w| w.contains(ISIC_METADATA) && w.contains("cannot be grouped by lesion")),
            "{:?}",
            t.warnings
        );
    }

    #[test]
    fn header_errors_quote_the_header_as_written() {
        let tmp = tempfile::tempdir().unwrap();
        write_gt(tmp.path(), "a,1,0,0\n");
        fs::write(tmp.path().join(ISIC_METADATA), "image;lesion;sex\na;L1;m\n").unwrap();
        let err = read_table(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("found `image;lesion;sex`"), "{err}");
        assert!(err.contains("image,age_approx,anatom_site_general,lesion_id,sex"), "{err}");
        assert!(!err.contains("StringRecord"), "{err}");
        fs::write(tmp.path().join(ISIC_GROUND_TRUTH), "name,MEL\na,1\n").unwrap();
        let err = read_table(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("found `name,MEL`") && err.contains("image,MEL,NV"), "{err}");
    }
}
