//! Train/validation split (stratified by class, grouped by lesion) and balanced class weights.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_pcg::Pcg64;
use std::collections::BTreeMap;

/// Splits images `0..labels.len()` into (train, val), both sorted ascending.
///
/// Images sharing a `lesion_id` form one group and always land on the same side; an image without a lesion id is
/// its own group. Each group is stratified by its most frequent class (ties: the lowest class index). Within a
/// class the groups are shuffled with a seeded PCG and moved to validation one by one while the class's validation
/// count is short of `round(val_fraction · images of the class)` and the group overshoots that target by no more
/// than the shortfall (so a small class with a positive target still gets a group). The result depends only on
/// the inputs and `seed`.
pub fn stratified_group_split(
    labels: &[usize],
    lesion_ids: &[Option<String>],
    n_classes: usize,
    val_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    // Groups keyed deterministically: lesions by id, lone images by index.
    let mut groups: BTreeMap<(u8, String, usize), Vec<usize>> = BTreeMap::new();
    for (i, lesion) in lesion_ids.iter().enumerate() {
        let key = match lesion {
            Some(l) => (0, l.clone(), 0),
            None => (1, String::new(), i),
        };
        groups.entry(key).or_default().push(i);
    }
    let mut by_class: Vec<Vec<Vec<usize>>> = vec![Vec::new(); n_classes];
    for members in groups.into_values() {
        let mut counts = vec![0usize; n_classes];
        for &i in &members {
            counts[labels[i]] += 1;
        }
        let class = (0..n_classes).max_by_key(|&c| (counts[c], std::cmp::Reverse(c))).unwrap_or(0);
        by_class[class].push(members);
    }
    let mut rng = Pcg64::seed_from_u64(seed ^ 0x5EED_5B17_0000_0001);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for mut class_groups in by_class {
        class_groups.shuffle(&mut rng);
        let n: usize = class_groups.iter().map(Vec::len).sum();
        let target = (val_fraction.clamp(0.0, 1.0) * n as f64).round() as usize;
        let mut in_val = 0usize;
        for g in class_groups {
            // Move while short of the target and overshooting by no more than the shortfall.
            if in_val < target && (in_val + g.len()).saturating_sub(target) <= target - in_val {
                in_val += g.len();
                val.extend(g);
            } else {
                train.extend(g);
            }
        }
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// Balanced class weights `n / (C · n_c)` over `indices` (scikit-learn's "balanced"), where `C` counts the
/// classes that have at least one image; a class without images gets weight 0. Returns (weights, counts).
pub fn balanced_class_weights(labels: &[usize], indices: &[usize], n_classes: usize) -> (Vec<f32>, Vec<usize>) {
    let mut counts = vec![0usize; n_classes];
    for &i in indices {
        counts[labels[i]] += 1;
    }
    let present = counts.iter().filter(|&&c| c > 0).count();
    let n = indices.len() as f64;
    let weights = counts.iter().map(|&c| if c == 0 { 0.0 } else { (n / (present as f64 * c as f64)) as f32 }).collect();
    (weights, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_match_closed_form() {
        let labels = [0, 0, 0, 1, 2, 2];
        let (w, c) = balanced_class_weights(&labels, &[0, 1, 2, 3, 4, 5], 4);
        assert_eq!(c, vec![3, 1, 2, 0]);
        // n = 6, C = 3 present classes.
        assert_eq!(w, vec![6.0 / 9.0, 6.0 / 3.0, 6.0 / 6.0, 0.0]);
    }

    #[test]
    fn split_keeps_lesions_together_is_deterministic_and_stratified() {
        let n = 500;
        let labels: Vec<usize> = (0..n)
            .map(|i| {
                if i % 10 < 7 {
                    0
                } else if i % 10 < 9 {
                    1
                } else {
                    2
                }
            })
            .collect();
        // Lesions of 1-3 images with the same class; every 7th image has no lesion id.
        let lesion_ids: Vec<Option<String>> =
            (0..n).map(|i| if i % 7 == 0 { None } else { Some(format!("L{}-{}", labels[i], i / 30)) }).collect();
        let (train, val) = stratified_group_split(&labels, &lesion_ids, 3, 0.2, 9);
        assert_eq!(train.len() + val.len(), n);
        let mut all: Vec<usize> = train.iter().chain(&val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        for &v in &val {
            if let Some(l) = &lesion_ids[v] {
                assert!(train.iter().all(|&t| lesion_ids[t].as_ref() != Some(l)), "lesion {l} crosses the split");
            }
        }
        for c in 0..3 {
            let nc = labels.iter().filter(|&&l| l == c).count() as f64;
            let vc = val.iter().filter(|&&i| labels[i] == c).count() as f64;
            assert!((vc / nc - 0.2).abs() < 0.12, "class {c}: {vc}/{nc} in val");
        }
        assert_eq!(stratified_group_split(&labels, &lesion_ids, 3, 0.2, 9), (train.clone(), val.clone()));
        assert_ne!(stratified_group_split(&labels, &lesion_ids, 3, 0.2, 10).1, val);
    }
}
