//! Classification metrics with scikit-learn's semantics.
//!
//! - accuracy: correct / N.
//! - balanced accuracy (`balanced_accuracy_score`, the ISIC 2019 challenge metric): the mean per-class recall over
//!   the classes with support > 0 (a class that is only predicted, never true, has no recall and is left out).
//! - per-class precision tp/(tp+fp), recall tp/(tp+fn), F1 2tp/(2tp+fp+fn) and support; any 0/0 is 0
//!   (`zero_division=0`).
//! - macro average: the plain mean over **all** `num_classes` classes (as `classification_report` with
//!   `labels=range(C)`), weighted average: weighted by support.
//! - one-vs-rest ROC AUC per class from the probabilities, exact: the Mann–Whitney statistic with average ranks for
//!   ties, which equals the trapezoidal area under the ROC curve. `None` when the class has no positive or no
//!   negative sample. The macro AUC averages the defined ones, the weighted AUC weights them by support
//!   (scikit-learn would refuse when any is undefined).
//! - confusion matrix, rows true and columns predicted, and its row-normalized version (rows with no support are 0).

use std::fmt::Write as _;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Metrics of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// tp / (tp + fp), 0 when nothing was predicted as this class.
    pub precision: f64,
    /// tp / (tp + fn), 0 when the class has no support.
    pub recall: f64,
    /// 2tp / (2tp + fp + fn), 0 when undefined.
    pub f1: f64,
    /// Number of true samples of the class.
    pub support: u64,
    /// One-vs-rest ROC AUC; `None` without probabilities or without both positives and negatives.
    pub auc: Option<f64>,
}

/// An average over classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AverageMetrics {
    /// Averaged precision.
    pub precision: f64,
    /// Averaged recall.
    pub recall: f64,
    /// Averaged F1.
    pub f1: f64,
    /// Averaged ROC AUC over the classes where it is defined.
    pub auc: Option<f64>,
    /// Total support.
    pub support: u64,
}

/// Every metric of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Number of classes C.
    pub num_classes: usize,
    /// Number of samples N.
    pub num_samples: u64,
    /// Fraction of correct predictions.
    pub accuracy: f64,
    /// Mean recall over the classes with support.
    pub balanced_accuracy: f64,
    /// One entry per class.
    pub per_class: Vec<ClassMetrics>,
    /// Unweighted mean over all classes.
    pub macro_avg: AverageMetrics,
    /// Support-weighted mean.
    pub weighted_avg: AverageMetrics,
    /// `confusion[true][pred]` counts.
    pub confusion: Vec<Vec<u64>>,
    /// Each row of `confusion` divided by its sum (0 for empty rows).
    pub confusion_normalized: Vec<Vec<f64>>,
}

/// Counts `confusion[true][pred]`. Fails when the lengths differ or a label is ≥ `num_classes`.
pub fn confusion_matrix(y_true: &[usize], y_pred: &[usize], num_classes: usize) -> Result<Vec<Vec<u64>>> {
    if y_true.len() != y_pred.len() {
        bail!("metrics: {} true labels but {} predictions", y_true.len(), y_pred.len());
    }
    let mut cm = vec![vec![0u64; num_classes]; num_classes];
    for (i, (&t, &p)) in y_true.iter().zip(y_pred).enumerate() {
        if t >= num_classes || p >= num_classes {
            bail!("metrics: sample {i} has true label {t} / prediction {p}, but there are {num_classes} classes");
        }
        cm[t][p] += 1;
    }
    Ok(cm)
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 { 0.0 } else { num as f64 / den as f64 }
}

/// All count-based metrics from a square confusion matrix (no AUC). Fails when it is not square or empty.
pub fn report_from_confusion(confusion: &[Vec<u64>]) -> Result<Report> {
    let c = confusion.len();
    if c == 0 || confusion.iter().any(|r| r.len() != c) {
        bail!("metrics: the confusion matrix must be square and non-empty");
    }
    let n: u64 = confusion.iter().flatten().sum();
    if n == 0 {
        bail!("metrics: no samples to evaluate");
    }
    let correct: u64 = (0..c).map(|i| confusion[i][i]).sum();
    let mut per_class = Vec::with_capacity(c);
    for k in 0..c {
        let tp = confusion[k][k];
        let support: u64 = confusion[k].iter().sum();
        let predicted: u64 = confusion.iter().map(|r| r[k]).sum();
        let fp = predicted - tp;
        let fn_ = support - tp;
        per_class.push(ClassMetrics {
            precision: ratio(tp, predicted),
            recall: ratio(tp, support),
            f1: ratio(2 * tp, 2 * tp + fp + fn_),
            support,
            auc: None,
        });
    }
    let with_support: Vec<&ClassMetrics> = per_class.iter().filter(|m| m.support > 0).collect();
    let balanced_accuracy = with_support.iter().map(|m| m.recall).sum::<f64>() / with_support.len() as f64;
    let confusion_normalized = confusion
        .iter()
        .map(|row| {
            let s: u64 = row.iter().sum();
            row.iter().map(|&x| ratio(x, s)).collect()
        })
        .collect();
    let mut report = Report {
        num_classes: c,
        num_samples: n,
        accuracy: correct as f64 / n as f64,
        balanced_accuracy,
        macro_avg: AverageMetrics { precision: 0.0, recall: 0.0, f1: 0.0, auc: None, support: n },
        weighted_avg: AverageMetrics { precision: 0.0, recall: 0.0, f1: 0.0, auc: None, support: n },
        per_class,
        confusion: confusion.to_vec(),
        confusion_normalized,
    };
    report.recompute_averages();
    Ok(report)
}

impl Report {
    /// Recomputes the macro and weighted averages from `per_class`.
    fn recompute_averages(&mut self) {
        let c = self.per_class.len() as f64;
        let n = self.num_samples as f64;
        let mean = |f: &dyn Fn(&ClassMetrics) -> f64| self.per_class.iter().map(f).sum::<f64>() / c;
        let wmean =
            |f: &dyn Fn(&ClassMetrics) -> f64| self.per_class.iter().map(|m| m.support as f64 * f(m)).sum::<f64>() / n;
        self.macro_avg.precision = mean(&|m| m.precision);
        self.macro_avg.recall = mean(&|m| m.recall);
        self.macro_avg.f1 = mean(&|m| m.f1);
        self.weighted_avg.precision = wmean(&|m| m.precision);
        self.weighted_avg.recall = wmean(&|m| m.recall);
        self.weighted_avg.f1 = wmean(&|m| m.f1);
        let defined: Vec<(f64, f64)> =
            self.per_class.iter().filter_map(|m| m.auc.map(|a| (a, m.support as f64))).collect();
        if defined.is_empty() {
            self.macro_avg.auc = None;
            self.weighted_avg.auc = None;
        } else {
            self.macro_avg.auc = Some(defined.iter().map(|d| d.0).sum::<f64>() / defined.len() as f64);
            let w: f64 = defined.iter().map(|d| d.1).sum();
            self.weighted_avg.auc =
                if w > 0.0 { Some(defined.iter().map(|d| d.0 * d.1).sum::<f64>() / w) } else { None };
        }
    }
}

/// Exact ROC AUC of `scores` for the binary labels `positive`: average ranks for ties (= trapezoidal ROC area).
/// `None` when there is no positive or no negative. Scores must not be NaN (checked by the callers).
pub fn roc_auc_binary(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let n = scores.len().min(positive.len());
    let num_pos = positive[..n].iter().filter(|&&p| p).count();
    let num_neg = n - num_pos;
    if num_pos == 0 || num_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum = 0.0f64;
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && scores[order[j]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        let pos_in_tie = order[i..j].iter().filter(|&&k| positive[k]).count();
        rank_sum += avg_rank * pos_in_tie as f64;
        i = j;
    }
    let p = num_pos as f64;
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * num_neg as f64))
}

/// One-vs-rest ROC AUC per class from row-major probabilities `[N, C]`.
pub fn roc_auc_ovr(y_true: &[usize], probs: &[f32], num_classes: usize) -> Result<Vec<Option<f64>>> {
    if probs.len() != y_true.len() * num_classes {
        bail!(
            "metrics: probabilities have {} values, expected {} samples × {num_classes} classes",
            probs.len(),
            y_true.len()
        );
    }
    if let Some(i) = probs.iter().position(|p| p.is_nan()) {
        bail!("metrics: probability of sample {} class {} is NaN", i / num_classes, i % num_classes);
    }
    let mut out = Vec::with_capacity(num_classes);
    for c in 0..num_classes {
        let scores: Vec<f64> = (0..y_true.len()).map(|i| probs[i * num_classes + c] as f64).collect();
        let positive: Vec<bool> = y_true.iter().map(|&t| t == c).collect();
        out.push(roc_auc_binary(&scores, &positive));
    }
    Ok(out)
}

/// The full report from labels, predictions and (optionally) probabilities `[N, C]` row-major.
pub fn compute_report(y_true: &[usize], y_pred: &[usize], probs: Option<&[f32]>, num_classes: usize) -> Result<Report> {
    let cm = confusion_matrix(y_true, y_pred, num_classes)?;
    let mut report = report_from_confusion(&cm)?;
    if let Some(p) = probs {
        let aucs = roc_auc_ovr(y_true, p, num_classes)?;
        for (m, a) in report.per_class.iter_mut().zip(aucs) {
            m.auc = a;
        }
        report.recompute_averages();
    }
    Ok(report)
}

fn class_name(names: &[String], i: usize) -> String {
    names.get(i).cloned().unwrap_or_else(|| format!("class {i}"))
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.4}"))
}

/// A terminal table: per-class precision, recall, F1, support and AUC, the averages, accuracy, balanced
/// accuracy and the confusion matrix. Missing class names are shown as `class i`.
pub fn render_report(report: &Report, class_names: &[String]) -> String {
    let c = report.num_classes;
    let names: Vec<String> = (0..c).map(|i| class_name(class_names, i)).collect();
    let w = names.iter().map(|n| n.len()).max().unwrap_or(0).max("weighted avg".len());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>w$}  {:>9}  {:>9}  {:>9}  {:>8}  {:>8}",
        "", "precision", "recall", "f1-score", "support", "roc-auc"
    );
    for (name, m) in names.iter().zip(&report.per_class) {
        let _ = writeln!(
            s,
            "{name:>w$}  {:>9.4}  {:>9.4}  {:>9.4}  {:>8}  {:>8}",
            m.precision,
            m.recall,
            m.f1,
            m.support,
            fmt_opt(m.auc)
        );
    }
    let _ = writeln!(s);
    for (label, a) in [("macro avg", &report.macro_avg), ("weighted avg", &report.weighted_avg)] {
        let _ = writeln!(
            s,
            "{label:>w$}  {:>9.4}  {:>9.4}  {:>9.4}  {:>8}  {:>8}",
            a.precision,
            a.recall,
            a.f1,
            a.support,
            fmt_opt(a.auc)
        );
    }
    let with_support = report.per_class.iter().filter(|m| m.support > 0).count();
    let _ = writeln!(s);
    let _ = writeln!(s, "accuracy           {:.4}  ({} samples)", report.accuracy, report.num_samples);
    let _ = writeln!(
        s,
        "balanced accuracy  {:.4}  (mean recall over the {with_support} classes with support)",
        report.balanced_accuracy
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "confusion matrix (rows: true, columns: predicted)");
    let cw = report.confusion.iter().flatten().map(|v| v.to_string().len()).max().unwrap_or(1);
    let cw = names.iter().map(|n| n.len()).max().unwrap_or(1).max(cw);
    let nw = names.iter().map(|n| n.len()).max().unwrap_or(1);
    let _ = write!(s, "{:>nw$}", "");
    for n in &names {
        let _ = write!(s, "  {n:>cw$}");
    }
    let _ = writeln!(s);
    for (n, row) in names.iter().zip(&report.confusion) {
        let _ = write!(s, "{n:>nw$}");
        for v in row {
            let _ = write!(s, "  {v:>cw$}");
        }
        let _ = writeln!(s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    /// Labels realising a given confusion matrix.
    fn labels_from(cm: &[Vec<u64>]) -> (Vec<usize>, Vec<usize>) {
        let (mut t, mut p) = (Vec::new(), Vec::new());
        for (i, row) in cm.iter().enumerate() {
            for (j, &n) in row.iter().enumerate() {
                for _ in 0..n {
                    t.push(i);
                    p.push(j);
                }
            }
        }
        (t, p)
    }

    #[test]
    fn hand_computed_three_class() {
        let cm = vec![vec![5, 2, 1], vec![1, 3, 0], vec![0, 2, 6]];
        let (t, p) = labels_from(&cm);
        let r = compute_report(&t, &p, None, 3).unwrap();
        assert_eq!(r.confusion, cm);
        close(r.accuracy, 14.0 / 20.0);
        close(r.balanced_accuracy, (5.0 / 8.0 + 3.0 / 4.0 + 6.0 / 8.0) / 3.0);
        let prec = [5.0 / 6.0, 3.0 / 7.0, 6.0 / 7.0];
        let rec = [5.0 / 8.0, 3.0 / 4.0, 6.0 / 8.0];
        let f1 = [10.0 / 14.0, 6.0 / 11.0, 12.0 / 15.0];
        let sup = [8u64, 4, 8];
        for k in 0..3 {
            close(r.per_class[k].precision, prec[k]);
            close(r.per_class[k].recall, rec[k]);
            close(r.per_class[k].f1, f1[k]);
            // F1 is also the harmonic mean of precision and recall.
            close(r.per_class[k].f1, 2.0 * prec[k] * rec[k] / (prec[k] + rec[k]));
            assert_eq!(r.per_class[k].support, sup[k]);
            assert_eq!(r.per_class[k].auc, None);
        }
        close(r.macro_avg.precision, prec.iter().sum::<f64>() / 3.0);
        close(r.macro_avg.f1, f1.iter().sum::<f64>() / 3.0);
        close(r.weighted_avg.precision, (8.0 * prec[0] + 4.0 * prec[1] + 8.0 * prec[2]) / 20.0);
        close(r.weighted_avg.recall, r.accuracy);
        close(r.weighted_avg.f1, (8.0 * f1[0] + 4.0 * f1[1] + 8.0 * f1[2]) / 20.0);
        close(r.confusion_normalized[1][0], 0.25);
        close(r.confusion_normalized[2][2], 0.75);
        for row in &r.confusion_normalized {
            close(row.iter().sum(), 1.0);
        }
        assert_eq!(r.macro_avg.auc, None);
    }

    #[test]
    fn zero_division_and_missing_classes() {
        // Class 2: never true, predicted once. Class 3: never true, never predicted.
        let cm = vec![vec![3, 1, 0, 0], vec![0, 2, 1, 0], vec![0, 0, 0, 0], vec![0, 0, 0, 0]];
        let r = report_from_confusion(&cm).unwrap();
        let m2 = &r.per_class[2];
        assert_eq!((m2.precision, m2.recall, m2.f1, m2.support), (0.0, 0.0, 0.0, 0));
        let m3 = &r.per_class[3];
        assert_eq!((m3.precision, m3.recall, m3.f1, m3.support), (0.0, 0.0, 0.0, 0));
        // Balanced accuracy: mean over classes 0 and 1 only.
        close(r.balanced_accuracy, (3.0 / 4.0 + 2.0 / 3.0) / 2.0);
        // Macro averages divide by all 4 classes.
        close(r.macro_avg.recall, (3.0 / 4.0 + 2.0 / 3.0) / 4.0);
        close(r.macro_avg.precision, (1.0 + 2.0 / 3.0) / 4.0);
        assert_eq!(r.confusion_normalized[2], vec![0.0; 4]);
        assert!(report_from_confusion(&[vec![0, 0], vec![0, 0]]).is_err());
        assert!(report_from_confusion(&[vec![1, 0]]).is_err());
        assert!(confusion_matrix(&[0, 3], &[0, 1], 3).is_err());
        assert!(confusion_matrix(&[0], &[0, 1], 3).is_err());
    }

    #[test]
    fn auc_hand_cases() {
        // scikit-learn's documented example: 0.75.
        close(roc_auc_binary(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap(), 0.75);
        // All tied: 0.5.
        close(roc_auc_binary(&[0.5; 4], &[false, true, false, true]).unwrap(), 0.5);
        // Positives {0.3, 0.7}, negatives {0.3, 0.1}: pairs 0.5 + 1 + 1 + 1 over 4.
        close(roc_auc_binary(&[0.3, 0.7, 0.3, 0.1], &[true, true, false, false]).unwrap(), 0.875);
        // Perfect and inverted.
        close(roc_auc_binary(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]).unwrap(), 1.0);
        close(roc_auc_binary(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]).unwrap(), 0.0);
        assert_eq!(roc_auc_binary(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(roc_auc_binary(&[0.1, 0.2], &[false, false]), None);
    }

    #[test]
    fn auc_matches_pairwise_count_on_random_inputs() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for trial in 0..20 {
            let n = 5 + (next() % 60) as usize;
            // Coarse scores so ties are frequent.
            let scores: Vec<f64> = (0..n).map(|_| (next() % 8) as f64 / 8.0).collect();
            let pos: Vec<bool> = (0..n).map(|_| next() % 3 == 0).collect();
            let (mut num, mut pairs) = (0.0, 0.0);
            for i in 0..n {
                for j in 0..n {
                    if pos[i] && !pos[j] {
                        pairs += 1.0;
                        num += if scores[i] > scores[j] {
                            1.0
                        } else if scores[i] == scores[j] {
                            0.5
                        } else {
                            0.0
                        };
                    }
                }
            }
            let got = roc_auc_binary(&scores, &pos);
            if pairs == 0.0 {
                assert_eq!(got, None, "trial {trial}");
            } else {
                let g = got.unwrap();
                assert!((g - num / pairs).abs() < 1e-12, "trial {trial}: {g} vs {}", num / pairs);
            }
        }
    }

    #[test]
    fn ovr_auc_in_report() {
        // 3 classes, 4 samples; class 2 has no positives.
        let y_true = [0usize, 1, 0, 1];
        let y_pred = [0usize, 1, 1, 1];
        #[rustfmt::skip]
        let probs = [
            0.7f32, 0.2, 0.1,
            0.2, 0.6, 0.2,
            0.4, 0.5, 0.1,
            0.3, 0.3, 0.4,
        ];
        let r = compute_report(&y_true, &y_pred, Some(&probs), 3).unwrap();
        // Class 0: positives {0.7, 0.4}, negatives {0.2, 0.3} → 1.0.
        close(r.per_class[0].auc.unwrap(), 1.0);
        // Class 1: positives {0.6, 0.3}, negatives {0.2, 0.5}: (1 + 1 + 1 + 0)/4.
        close(r.per_class[1].auc.unwrap(), 0.75);
        assert_eq!(r.per_class[2].auc, None);
        close(r.macro_avg.auc.unwrap(), 0.875);
        close(r.weighted_avg.auc.unwrap(), 0.875);
        assert!(compute_report(&y_true, &y_pred, Some(&probs[..11]), 3).is_err());
        let mut nan = probs;
        nan[4] = f32::NAN;
        assert!(compute_report(&y_true, &y_pred, Some(&nan), 3).is_err());
    }

    #[test]
    fn render_and_json() {
        let cm = vec![vec![5, 2, 1], vec![1, 3, 0], vec![0, 2, 6]];
        let r = report_from_confusion(&cm).unwrap();
        let names: Vec<String> = ["MEL", "NV"].iter().map(|s| s.to_string()).collect();
        let text = render_report(&r, &names);
        assert!(text.contains("precision") && text.contains("MEL") && text.contains("class 2"), "{text}");
        assert!(text.contains("0.8333"), "{text}");
        assert!(text.contains("balanced accuracy  0.7083"), "{text}");
        assert!(text.contains("weighted avg"), "{text}");
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert!(json.contains("\"auc\":null"));
    }
}
