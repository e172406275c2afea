//! `derma model summary`: a layer table with output shapes, parameter counts and multiply-adds.
//!
//! Multiply-adds count convolutions and linear layers (squeeze-excite's included), the convention behind
//! torchvision's published 0.39 GFLOPs for B0 at 224×224; batch norm, activations and pooling are left out.

use super::efficientnet::{ConvBnAct, EfficientNet, Head, MbConv};
use crate::tensor::Float;

/// One row of the table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub name: String,
    pub kind: String,
    pub output: Vec<usize>,
    pub params: usize,
    pub macs: usize,
}

/// The table, with totals.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub rows: Vec<Row>,
    pub total_params: usize,
    pub trainable_params: usize,
    pub total_macs: usize,
    pub input: Vec<usize>,
}

fn out_size(s: usize, k: usize, stride: usize) -> usize {
    (s + 2 * ((k - 1) / 2) - k) / stride + 1
}

fn numel<T: Float>(m: &EfficientNet<T>, ids: &[usize]) -> usize {
    ids.iter().map(|&i| m.params.get(i).value.numel()).sum()
}

fn cba_macs<T: Float>(m: &EfficientNet<T>, c: &ConvBnAct<T>, h: &mut usize, w: &mut usize) -> usize {
    let s = &m.params.get(c.conv.weight).value.shape;
    let (k, stride) = (s[1], c.conv.cfg.stride);
    *h = out_size(*h, k, stride);
    *w = out_size(*w, k, stride);
    *h * *w * s[0] * s[1] * s[2] * s[3]
}

fn block_macs<T: Float>(m: &EfficientNet<T>, b: &MbConv<T>, h: &mut usize, w: &mut usize) -> usize {
    let mut macs = 0;
    if let Some(e) = &b.expand {
        macs += cba_macs(m, e, h, w);
    }
    macs += cba_macs(m, &b.depthwise, h, w);
    macs += m.params.get(b.se.fc1.weight).value.numel() + m.params.get(b.se.fc2.weight).value.numel();
    macs + cba_macs(m, &b.project, h, w)
}

/// Parameters of the model `cfg` describes, without building it at its size: the classifier is the only part
/// that grows with the class count (`in·C + C`), so two small builds (1 and 2 classes) give the exact count for
/// any `C`, even one whose weights would not fit in memory.
pub fn parameter_count(cfg: &super::ModelConfig) -> u64 {
    let count = |classes: usize| {
        let m = EfficientNet::<f32>::new(super::ModelConfig { num_classes: classes, ..cfg.clone() }, 0);
        m.params.counts().0 as u64
    };
    let (one, two) = (count(1), count(2));
    let per_class = two - one;
    one.saturating_add(per_class.saturating_mul((cfg.num_classes as u64).saturating_sub(1)))
}

/// Builds the table for an input of `size`×`size`.
pub fn summarize<T: Float>(m: &EfficientNet<T>, size: usize) -> Summary {
    let (mut h, mut w) = (size, size);
    let mut rows = Vec::new();
    let out_c = |c: &ConvBnAct<T>| m.params.get(c.conv.weight).value.shape[0];
    let macs = cba_macs(m, &m.stem, &mut h, &mut w);
    rows.push(Row {
        name: "features.0".into(),
        kind: "stem conv3x3/2 + BN + SiLU".into(),
        output: vec![h, w, out_c(&m.stem)],
        params: numel(m, &m.block_params[0]),
        macs,
    });
    for (si, blocks) in m.stages.iter().enumerate() {
        let mut macs = 0;
        let mut c = 0;
        for b in blocks {
            macs += block_macs(m, b, &mut h, &mut w);
            c = out_c(&b.project);
        }
        let k = m.params.get(blocks[0].depthwise.conv.weight).value.shape[1];
        let e = if blocks[0].expand.is_some() { "MBConv6" } else { "MBConv1" };
        rows.push(Row {
            name: format!("features.{}", si + 1),
            kind: format!("{} × {e} {k}x{k}/{}", blocks.len(), blocks[0].depthwise.conv.cfg.stride),
            output: vec![h, w, c],
            params: numel(m, &m.block_params[si + 1]),
            macs,
        });
    }
    let macs = cba_macs(m, &m.top, &mut h, &mut w);
    rows.push(Row {
        name: "features.8".into(),
        kind: "conv1x1 + BN + SiLU".into(),
        output: vec![h, w, out_c(&m.top)],
        params: numel(m, &m.block_params[8]),
        macs,
    });
    let backbone: usize = m.block_params.iter().flatten().count();
    let head_ids: Vec<usize> = (backbone..m.params.len()).collect();
    let (kind, head_macs, classes) = match &m.head {
        Head::Torchvision { fc, .. } => {
            let s = &m.params.get(fc.weight).value.shape;
            ("avgpool + dropout + linear".to_string(), s[0] * s[1], s[0])
        }
        Head::Seed { fc1, fc2, .. } => {
            let (a, b) = (&m.params.get(fc1.weight).value.shape, &m.params.get(fc2.weight).value.shape);
            ("avgpool + seed head (linear, ReLU, BN1d, linear)".to_string(), a[0] * a[1] + b[0] * b[1], b[0])
        }
    };
    rows.push(Row {
        name: "classifier".into(),
        kind,
        output: vec![classes],
        params: numel(m, &head_ids),
        macs: head_macs,
    });
    let (total_params, trainable_params) = m.params.counts();
    let total_macs = rows.iter().map(|r| r.macs).sum();
    Summary { rows, total_params, trainable_params, total_macs, input: vec![size, size, 3] }
}

/// Thousands separators for counts.
pub fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The table as text.
pub fn render(s: &Summary) -> String {
    let mut out =
        format!("{:<12} {:<48} {:>16} {:>12} {:>16}\n", "layer", "kind", "output (HWC)", "params", "mult-adds");
    for r in &s.rows {
        let shape = r.output.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("×");
        out += &format!(
            "{:<12} {:<48} {:>16} {:>12} {:>16}\n",
            r.name,
            r.kind,
            shape,
            group_digits(r.params),
            group_digits(r.macs)
        );
    }
    out += &format!(
        "total parameters {} (trainable {}); {:.3} G mult-adds per image at {}×{}\n",
        group_digits(s.total_params),
        group_digits(s.trainable_params),
        s.total_macs as f64 / 1e9,
        s.input[0],
        s.input[1]
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{HeadKind, ModelConfig, Variant};

    #[test]
    fn parameter_count_matches_a_built_model() {
        for head in [HeadKind::Torchvision, HeadKind::Seed] {
            let cfg = ModelConfig::variant(Variant::B0, 13, head);
            let built = EfficientNet::<f32>::new(cfg.clone(), 0).params.counts().0 as u64;
            assert_eq!(parameter_count(&cfg), built, "{head:?}");
        }
    }
}
