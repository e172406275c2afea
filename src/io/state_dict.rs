//! Named tensors in file order, loading them from either weight format, and matching them against a model.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::pickle::Value;
use super::pth::{ZIP_MAGIC, load_pth_bytes};
use super::safetensors::{is_safetensors, load_safetensors_bytes, safetensors_header_overrun};
use crate::tensor::{DType, Storage, Tensor};

/// Name → tensor, in file (insertion) order, with lookup by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDict {
    entries: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl StateDict {
    /// An empty dict.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `tensor` under `name`; an existing entry is replaced in place (keeping its position) and returned.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => Some(std::mem::replace(&mut self.entries[i].1, tensor)),
            None => {
                self.index.insert(name.clone(), self.entries.len());
                self.entries.push((name, tensor));
                None
            }
        }
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// The tensor named `name`, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.index.get(name).map(|&i| &mut self.entries[i].1)
    }

    /// Whether an entry is named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Removes and returns the entry (the others keep their order).
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        let i = self.index.remove(name)?;
        let (_, t) = self.entries.remove(i);
        for v in self.index.values_mut() {
            if *v > i {
                *v -= 1;
            }
        }
        Some(t)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `(name, tensor)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// The entries in order.
    pub fn entries(&self) -> &[(String, Tensor)] {
        &self.entries
    }

    /// Consumes the dict, giving the entries in order.
    pub fn into_entries(self) -> Vec<(String, Tensor)> {
        self.entries
    }
}

impl FromIterator<(String, Tensor)> for StateDict {
    /// Later duplicates replace earlier ones (like a Python dict).
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        let mut sd = StateDict::new();
        for (n, t) in iter {
            sd.insert(n, t);
        }
        sd
    }
}

/// Training metadata that travels with the weights.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckpointMeta {
    pub epoch: Option<i64>,
    pub val_acc: Option<f64>,
    pub frozen_layers: Option<i64>,
    /// The training configuration (a Python dict in .pth checkpoints, a JSON string in safetensors metadata).
    pub config: Option<serde_json::Value>,
    /// A safetensors file's header metadata as written (empty for .pth files).
    pub strings: HashMap<String, String>,
}

impl CheckpointMeta {
    /// The metadata as safetensors header strings: `strings` plus `epoch`, `val_acc`, `frozen_layers` and
    /// `config` (JSON) where set. [`load_checkpoint`] reads these keys back into the typed fields.
    pub fn to_strings(&self) -> HashMap<String, String> {
        let mut m = self.strings.clone();
        if let Some(e) = self.epoch {
            m.insert("epoch".into(), e.to_string());
        }
        if let Some(v) = self.val_acc {
            m.insert("val_acc".into(), v.to_string());
        }
        if let Some(f) = self.frozen_layers {
            m.insert("frozen_layers".into(), f.to_string());
        }
        if let Some(c) = &self.config {
            m.insert("config".into(), c.to_string());
        }
        m
    }

    fn from_strings(strings: HashMap<String, String>) -> Result<Self> {
        fn parse<T: std::str::FromStr>(m: &HashMap<String, String>, key: &str) -> Result<Option<T>> {
            match m.get(key) {
                None => Ok(None),
                Some(s) => match s.trim().parse() {
                    Ok(v) => Ok(Some(v)),
                    Err(_) => bail!("metadata {key} = {s:?} is not a number"),
                },
            }
        }
        let config = match strings.get("config") {
            None => None,
            Some(s) => Some(serde_json::from_str(s).context("metadata `config` is not valid JSON")?),
        };
        Ok(Self {
            epoch: parse(&strings, "epoch")?,
            val_acc: parse(&strings, "val_acc")?,
            frozen_layers: parse(&strings, "frozen_layers")?,
            config,
            strings,
        })
    }
}

/// Everything [`load_checkpoint`] finds in a weight file.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The model weights, with a `base_model.` (and DataParallel `module.`) prefix shared by every key removed.
    pub state_dict: StateDict,
    pub meta: CheckpointMeta,
    /// `optimizer_state_dict` of a .pth training checkpoint, as decoded (torch's layout: `state` keyed by
    /// parameter index, `param_groups` list).
    pub optimizer_state: Option<Value>,
}

/// Loads the weights of a file: see [`load_checkpoint`].
pub fn load_state_dict(path: &Path) -> Result<StateDict> {
    Ok(load_checkpoint(path)?.state_dict)
}

/// Loads a weight file, recognised by its content (not its extension):
/// - a torch.save zip holding a plain state_dict, or a training checkpoint dict with the weights under
///   `model_state_dict` or `state_dict` and optional `epoch`, `val_acc`, `frozen_layers`, `config`,
///   `optimizer_state_dict`;
/// - a safetensors file (metadata keys `epoch`, `val_acc`, `frozen_layers`, `config` fill the typed fields).
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read weight file {}", path.display()))?;
    load_checkpoint_bytes(&bytes).with_context(|| format!("cannot load weight file {}", path.display()))
}

/// [`load_checkpoint`] on bytes already in memory.
pub fn load_checkpoint_bytes(bytes: &[u8]) -> Result<Checkpoint> {
    if bytes.starts_with(ZIP_MAGIC) || bytes.starts_with(b"\x80\x02") {
        let value = load_pth_bytes(bytes)?;
        return checkpoint_from_value(value);
    }
    if is_safetensors(bytes) {
        let (sd, strings) = load_safetensors_bytes(bytes)?;
        check_finite(&sd)?;
        let meta = CheckpointMeta::from_strings(strings)?;
        return Ok(Checkpoint { state_dict: strip_prefixes(sd), meta, optimizer_state: None });
    }
    if let Some(why) = safetensors_header_overrun(bytes) {
        bail!(why);
    }
    bail!("neither a torch.save zip (.pth/.pt) nor a safetensors file")
}

/// Refuses weights holding NaN or infinite values, listing every such tensor with its count of bad values. No
/// usable weights hold them: such a file is damaged or was saved from a diverged run, and loading it would only
/// turn every output into NaN.
pub fn check_finite(sd: &StateDict) -> Result<()> {
    fn count<T: Copy>(v: &[T], nan: fn(T) -> bool, inf: fn(T) -> bool) -> (usize, usize) {
        v.iter().fold((0, 0), |(n, i), &x| (n + nan(x) as usize, i + inf(x) as usize))
    }
    let mut bad = Vec::new();
    for (name, t) in sd.iter() {
        let (nan, inf) = match &t.storage {
            Storage::F32(v) => count(v, f32::is_nan, f32::is_infinite),
            Storage::F64(v) => count(v, f64::is_nan, f64::is_infinite),
            Storage::F16(v) => count(v, half::f16::is_nan, half::f16::is_infinite),
            Storage::BF16(v) => count(v, half::bf16::is_nan, half::bf16::is_infinite),
            Storage::I64(_) | Storage::U8(_) => (0, 0),
        };
        if nan + inf > 0 {
            bad.push(format!("`{name}`: {} of {} values ({nan} NaN, {inf} infinite)", nan + inf, t.numel()));
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 12;
    let more = bad.len().saturating_sub(SHOWN);
    let mut msg = format!(
        "{} tensor{} hold non-finite values (weights must be finite; the file is damaged or was saved from a \
         diverged run):",
        bad.len(),
        if bad.len() == 1 { "" } else { "s" }
    );
    for item in bad.iter().take(SHOWN) {
        let _ = write!(msg, "\n  {item}");
    }
    if more > 0 {
        let _ = write!(msg, "\n  and {more} more");
    }
    bail!(msg)
}

/// Interprets a decoded torch.save object as a state dict or a training checkpoint.
pub fn checkpoint_from_value(value: Value) -> Result<Checkpoint> {
    let Value::Dict(mut top) = value else {
        bail!("the file holds a {}, not a dict of tensors (a state_dict or a checkpoint dict)", value.kind());
    };
    let wrapped = top.iter().position(|(k, v)| {
        matches!(k, Value::Str(s) if s == "model_state_dict" || s == "state_dict") && matches!(v, Value::Dict(_))
    });
    let Some(at) = wrapped else {
        let sd = tensors_of(top, "the file")?;
        check_finite(&sd)?;
        return Ok(Checkpoint {
            state_dict: strip_prefixes(sd),
            meta: CheckpointMeta::default(),
            optimizer_state: None,
        });
    };
    let (key, weights) = top.remove(at);
    let top = Value::Dict(top);
    let key = key.as_str().unwrap_or("model_state_dict").to_string();
    let Value::Dict(weights) = weights else {
        bail!("`{key}` is not a dict");
    };
    let meta = CheckpointMeta {
        epoch: top.get("epoch").and_then(integer),
        val_acc: top.get("val_acc").and_then(Value::as_f64),
        frozen_layers: top.get("frozen_layers").and_then(integer),
        config: top.get("config").map(Value::to_json),
        strings: HashMap::new(),
    };
    let sd = tensors_of(weights, &format!("`{key}`"))?;
    check_finite(&sd)?;
    Ok(Checkpoint { state_dict: strip_prefixes(sd), meta, optimizer_state: top.get("optimizer_state_dict").cloned() })
}

/// An int, or a whole number stored as a float or one-element tensor.
fn integer(v: &Value) -> Option<i64> {
    v.as_int().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
}

fn tensors_of(items: Vec<(Value, Value)>, what: &str) -> Result<StateDict> {
    let mut sd = StateDict::new();
    let n = items.len();
    for (k, v) in items {
        let Value::Str(name) = k else {
            bail!("{what} has a {} key; a state dict is keyed by names", k.kind());
        };
        let Value::Tensor(t) = v else {
            let hint = if n < 20 {
                " (a training checkpoint should hold its weights under `model_state_dict` or `state_dict`)"
            } else {
                ""
            };
            bail!("{what}: entry `{name}` is a {}, not a tensor{hint}", v.kind());
        };
        sd.insert(name, t);
    }
    if sd.is_empty() {
        bail!("{what} holds no tensors");
    }
    Ok(sd)
}

/// Removes `base_model.` (the seed's wrapper module) and `module.` (DataParallel) when every key starts with it.
fn strip_prefixes(sd: StateDict) -> StateDict {
    let mut sd = sd;
    loop {
        let Some(prefix) = ["base_model.", "module."].into_iter().find(|p| sd.names().all(|n| n.starts_with(p))) else {
            return sd;
        };
        sd = sd.into_entries().into_iter().map(|(n, t)| (n[prefix.len()..].to_string(), t)).collect();
    }
}

/// Checks a loaded state dict against the names and shapes a model expects. On mismatch the error lists every
/// missing, unexpected and mis-shaped entry (with shapes) in one message.
pub fn check_keys(loaded: &StateDict, expected: &[(String, Vec<usize>)]) -> Result<()> {
    check(loaded, expected.iter().map(|(n, s)| (n.as_str(), s.as_slice(), None)))
}

/// [`check_keys`] that also requires each entry's dtype.
pub fn check_keys_with_dtype(loaded: &StateDict, expected: &[(String, Vec<usize>, DType)]) -> Result<()> {
    check(loaded, expected.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), Some(*d))))
}

fn check<'a>(loaded: &StateDict, expected: impl Iterator<Item = (&'a str, &'a [usize], Option<DType>)>) -> Result<()> {
    let mut missing = Vec::new();
    let mut shapes = Vec::new();
    let mut dtypes = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (name, shape, dtype) in expected {
        seen.insert(name);
        match loaded.get(name) {
            None => missing.push(format!("{name} {shape:?}")),
            Some(t) => {
                if t.shape != shape {
                    shapes.push(format!("{name}: file {:?}, model {shape:?}", t.shape));
                }
                if let Some(d) = dtype.filter(|&d| d != t.dtype()) {
                    dtypes.push(format!("{name}: file {}, model {d}", t.dtype()));
                }
            }
        }
    }
    let unexpected: Vec<String> =
        loaded.iter().filter(|(n, _)| !seen.contains(n)).map(|(n, t)| format!("{n} {:?}", t.shape)).collect();
    if missing.is_empty() && unexpected.is_empty() && shapes.is_empty() && dtypes.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "the weights do not match the model: {} missing, {} unexpected, {} with the wrong shape",
        missing.len(),
        unexpected.len(),
        shapes.len()
    );
    if !dtypes.is_empty() {
        let _ = write!(msg, ", {} with the wrong dtype", dtypes.len());
    }
    for (label, list) in
        [("missing", &missing), ("unexpected", &unexpected), ("wrong shape", &shapes), ("wrong dtype", &dtypes)]
    {
        for item in list {
            let _ = write!(msg, "\n  {label}: {item}");
        }
    }
    bail!(msg)
}
