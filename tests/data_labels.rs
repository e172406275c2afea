//! Ground-truth values other than 0 and 1 exclude their row (named, with the reason, in excluded.csv); every
//! class column is reported; a class too small for the split, an UNK column that becomes a class and a missing
//! metadata file are warnings that say so.

mod data_support;

use data_support::*;
use derma::data::{PrepareOptions, prepare};
use std::fs;

const GT: &str = "ISIC_2019_Training_GroundTruth.csv";

/// The synthetic ground truth with `edit` applied to its data lines (header excluded).
fn edit_ground_truth(dir: &std::path::Path, edit: impl Fn(usize, &str) -> String) {
    let text = fs::read_to_string(dir.join(GT)).unwrap();
    let mut lines = text.lines();
    let mut out = format!("{}\n", lines.next().unwrap());
    for (k, l) in lines.enumerate() {
        out += &edit(k, l);
        out += "\n";
    }
    fs::write(dir.join(GT), out).unwrap();
}

fn opts(dir: &std::path::Path) -> PrepareOptions {
    PrepareOptions { size: 16, quiet: true, ..PrepareOptions::new(dir) }
}

/// Sets the row's one-hot fields (MEL..UNK) to `values`.
fn with_values(line: &str, values: &[&str]) -> String {
    let image = line.split(',').next().unwrap();
    format!("{image},{}", values.join(","))
}

#[test]
fn values_other_than_zero_and_one_exclude_the_row_with_its_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("isic");
    synth_isic(&dir, 40, 11);
    let z = "0.0";
    edit_ground_truth(&dir, |k, l| match k {
        0 => with_values(l, &["2", z, z, z, z, z, z, z, z]),
        1 => with_values(l, &[z, "-1", z, z, z, z, z, "1.0", z]),
        2 => with_values(l, &[z, z, "0.6", z, z, z, z, z, z]),
        3 => with_values(l, &[z, "1", z, z, z, z, z, z, z]),
        _ => l.to_string(),
    });
    let p = prepare(&opts(&dir)).unwrap();
    let ex = &p.summary.excluded;
    assert_eq!(ex.len(), 3, "{ex:#?}");
    for (line, value, class) in [(2, "2", "MEL"), (3, "-1", "NV"), (4, "0.6", "BCC")] {
        let e = ex.iter().find(|e| e.line == line).unwrap_or_else(|| panic!("line {line} not excluded: {ex:#?}"));
        assert_eq!(e.reason, format!("label value \"{value}\" for class {class} is not 0 or 1"));
    }
    assert_eq!(p.len(), 37);
    let csv = fs::read_to_string(dir.join(".derma-cache-16").join("excluded.csv")).unwrap();
    assert!(csv.contains(",2,\"label value \"\"2\"\" for class MEL is not 0 or 1\"\n"), "{csv}");
    assert_eq!(csv.lines().count(), 4);
}

#[test]
fn an_unk_row_is_reported_and_a_small_class_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("isic");
    synth_isic(&dir, 40, 12);
    let z = "0.0";
    edit_ground_truth(
        &dir,
        |k, l| if k == 5 { with_values(l, &[z, z, z, z, z, z, z, z, "1.0"]) } else { l.to_string() },
    );
    let p = prepare(&opts(&dir)).unwrap();
    let s = &p.summary;
    assert_eq!(p.class_names.len(), 9);
    assert_eq!(s.class_columns.0.last().unwrap(), &("UNK".to_string(), 1));
    assert!(s.unused_columns.is_empty());
    assert!(
        s.warnings.iter().any(|w| w.contains("class UNK is positive in 1 row(s) (line 7)") && w.contains("9 outputs")),
        "{:#?}",
        s.warnings
    );
    assert!(
        s.warnings.iter().any(|w| w.starts_with("class UNK has only 1 image(s), too few for the split")
            && w.contains("at least 3 images")),
        "{:#?}",
        s.warnings
    );
    let text = s.to_text();
    assert!(text.contains("class columns: MEL ") && text.contains(", UNK 1\n"), "{text}");

    // Without the UNK row the column is reported as empty and is not a class.
    edit_ground_truth(
        &dir,
        |k, l| if k == 5 { with_values(l, &[z, "1.0", z, z, z, z, z, z, z]) } else { l.to_string() },
    );
    let p = prepare(&opts(&dir)).unwrap();
    assert_eq!(p.class_names.len(), 8);
    assert_eq!(p.summary.unused_columns, vec!["UNK"]);
    assert!(p.summary.to_text().contains("UNK empty (not a class)"), "{}", p.summary.to_text());
    assert!(!p.summary.warnings.iter().any(|w| w.contains("UNK")), "{:#?}", p.summary.warnings);
}

#[test]
fn a_missing_metadata_file_warns_that_the_split_is_not_grouped_by_lesion() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("isic");
    synth_isic(&dir, 24, 13);
    let p = prepare(&opts(&dir)).unwrap();
    assert!(!p.summary.warnings.iter().any(|w| w.contains("lesion")), "{:#?}", p.summary.warnings);
    fs::remove_file(dir.join("ISIC_2019_Training_Metadata.csv")).unwrap();
    // The text report lists it; with --json it goes to stderr (and into the JSON).
    let o = derma(&dir, &["prepare", "--data", ".", "--size", "16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("warning: ISIC_2019_Training_Metadata.csv not found")
            && out.contains("cannot be grouped by lesion"),
        "{out}"
    );
    let o = derma(&dir, &["prepare", "--data", ".", "--size", "16", "--json"]);
    let err = stderr(&o);
    assert!(err.contains("warning: ISIC_2019_Training_Metadata.csv not found"), "{err}");
    assert!(json(&o)["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("lesion")));
    // A quiet training run still warns.
    let o = derma(
        &dir,
        &[
            "train",
            "--data",
            ".",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--out",
            "run",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot be grouped by lesion"), "{}", stderr(&o));
}

#[test]
fn a_bad_metadata_header_is_quoted_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("isic");
    synth_isic(&dir, 8, 14);
    fs::write(dir.join("ISIC_2019_Training_Metadata.csv"), "image,age,site,lesion,sex\nx,1,2,3,4\n").unwrap();
    let o = derma(&dir, &["prepare", "--data", "."]);
    assert_clean_failure(&o);
    let err = stderr(&o);
    assert!(err.contains("found `image,age,site,lesion,sex`"), "{err}");
    assert!(err.contains("`image` and `lesion_id` columns"), "{err}");
    assert!(!err.contains("StringRecord"), "{err}");
}
