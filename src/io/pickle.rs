//! A safe pickle reader for what `torch.save` writes.
//!
//! It interprets the pickle opcodes itself and never runs code: every global reference (`GLOBAL`, `STACK_GLOBAL`)
//! must be on a short allow-list of data constructors (OrderedDict, torch's tensor rebuild functions and storage
//! types, a few plain-data helpers that protocol 2 uses for bytes, sets and numpy scalars). Anything else is refused
//! with an error naming the global. Storages arrive as persistent ids and are read through a caller-supplied
//! function, so the same reader serves zip archives and in-memory tests.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail};
use half::f16;

use crate::tensor::{Storage, Tensor, numel};

/// A decoded pickle value. Python containers map onto the obvious variants; tensors are materialised
/// (contiguous, on the CPU).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A dict or `collections.OrderedDict`, in insertion order.
    Dict(Vec<(Value, Value)>),
    Tensor(Tensor),
}

impl Value {
    /// A short name of the variant for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Tensor(_) => "tensor",
        }
    }

    /// The value under string key `key` when this is a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The items when this is a dict.
    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(items) => Some(items),
            _ => None,
        }
    }

    /// The integer, also for a bool (Python's `True == 1`).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The number as f64 (ints and bools convert; one-element tensors too, as `.item()` would).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            Value::Bool(b) => Some(*b as i64 as f64),
            Value::Tensor(t) if t.numel() == 1 => t.to_f64_vec().first().copied(),
            _ => None,
        }
    }

    /// The text when this is a str.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The tensor when this is one.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// A JSON rendering for metadata such as a training config. Dict keys become strings (ints via their decimal
    /// form); non-finite floats become the strings "nan", "inf", "-inf"; bytes become an array of numbers; a tensor
    /// becomes `{"dtype": .., "shape": [..]}` (its values are not rendered).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::None => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => J::Number(n),
                None if f.is_nan() => J::from("nan"),
                None if *f > 0.0 => J::from("inf"),
                None => J::from("-inf"),
            },
            Value::Str(s) => J::from(s.as_str()),
            Value::Bytes(b) => J::Array(b.iter().map(|&x| J::from(x)).collect()),
            Value::List(v) | Value::Tuple(v) => J::Array(v.iter().map(Value::to_json).collect()),
            Value::Dict(items) => {
                let mut map = serde_json::Map::new();
                for (k, v) in items {
                    let key = match k {
                        Value::Str(s) => s.clone(),
                        Value::Int(i) => i.to_string(),
                        other => other.to_json().to_string(),
                    };
                    map.insert(key, v.to_json());
                }
                J::Object(map)
            }
            Value::Tensor(t) => serde_json::json!({"dtype": t.dtype().name(), "shape": t.shape}),
        }
    }
}

/// Element type of a torch storage, named by its legacy class (`torch.FloatStorage`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StorageKind {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageKind {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "DoubleStorage" => Self::F64,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element in the file.
    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// Decodes little-endian bytes. Narrow integer types widen to i64 and bools become u8 0/1, since [`Storage`]
    /// has no such element types; every value is kept exactly.
    fn decode(self, bytes: &[u8]) -> Result<Storage> {
        use crate::tensor::DType;
        Ok(match self {
            Self::F32 => Storage::from_le_bytes(DType::F32, bytes)?,
            Self::F16 => Storage::from_le_bytes(DType::F16, bytes)?,
            Self::BF16 => Storage::from_le_bytes(DType::BF16, bytes)?,
            Self::F64 => Storage::from_le_bytes(DType::F64, bytes)?,
            Self::I64 => Storage::from_le_bytes(DType::I64, bytes)?,
            Self::U8 => Storage::U8(bytes.to_vec()),
            Self::Bool => Storage::U8(bytes.iter().map(|&b| (b != 0) as u8).collect()),
            Self::I32 => Storage::I64(
                bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            ),
            Self::I16 => Storage::I64(bytes.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64).collect()),
            Self::I8 => Storage::I64(bytes.iter().map(|&b| b as i8 as i64).collect()),
        })
    }
}

/// Globals the reader accepts. Everything else is refused.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    StorageType(StorageKind),
    CodecsEncode,
    Set,
    TorchSize,
    NumpyScalar,
    NumpyDtype,
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", "Size") => Global::TorchSize,
        ("_codecs", "encode") => Global::CodecsEncode,
        ("builtins" | "__builtin__", "set" | "frozenset") => Global::Set,
        ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => Global::NumpyScalar,
        ("numpy", "dtype") => Global::NumpyDtype,
        ("torch", storage) if StorageKind::from_class(storage).is_some() => {
            Global::StorageType(StorageKind::from_class(storage).ok_or_else(|| anyhow!("unreachable"))?)
        }
        ("torch.storage", "_load_from_bytes") => bail!(
            "refusing global `torch.storage._load_from_bytes`: it nests a legacy torch.save stream that can run \
             code; re-save the object with a recent PyTorch"
        ),
        _ => bail!(
            "refusing global `{module}.{name}`: only tensors, storages and plain containers can be loaded (the file \
             asks for something that would run code or build an unknown object); convert it to a plain state_dict \
             or safetensors in Python"
        ),
    })
}

/// A numpy dtype as far as scalars need it: the type code (`f8`, `i8`, ...) and the byte order from BUILD.
#[derive(Debug)]
struct NumpyDtype {
    code: String,
    big_endian: bool,
}

/// A dict plus an index for Python's replace-on-duplicate-key semantics.
#[derive(Debug, Default)]
struct DictObj {
    items: Vec<(Obj, Obj)>,
    index: HashMap<HKey, usize>,
}

/// Hashable image of a dict key (Python equality: `True == 1 == 1.0`).
#[derive(Debug, PartialEq, Eq, Hash)]
enum HKey {
    None,
    Int(i64),
    Float(u64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<HKey>),
}

/// Values on the pickle machine's stack. Lists and dicts are shared and mutable, as in Python, so memo references
/// see later `APPEND`/`SETITEM`s.
#[derive(Clone, Debug)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    List(Rc<RefCell<Vec<Obj>>>),
    Tuple(Rc<[Obj]>),
    Dict(Rc<RefCell<DictObj>>),
    Tensor(Rc<Tensor>),
    Global(Global),
    Storage { key: Rc<str>, data: Rc<Storage> },
    Dtype(Rc<RefCell<NumpyDtype>>),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) => "int",
            Obj::Float(_) => "float",
            Obj::Str(_) => "str",
            Obj::Bytes(_) => "bytes",
            Obj::List(_) => "list",
            Obj::Tuple(_) => "tuple",
            Obj::Dict(_) => "dict",
            Obj::Tensor(_) => "tensor",
            Obj::Global(_) => "global",
            Obj::Storage { .. } => "storage",
            Obj::Dtype(_) => "numpy dtype",
        }
    }

    fn hkey(&self) -> Result<HKey> {
        Ok(match self {
            Obj::None => HKey::None,
            Obj::Bool(b) => HKey::Int(*b as i64),
            Obj::Int(i) => HKey::Int(*i),
            Obj::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => HKey::Int(*f as i64),
            Obj::Float(f) => HKey::Float(f.to_bits()),
            Obj::Str(s) => HKey::Str(s.to_string()),
            Obj::Bytes(b) => HKey::Bytes(b.to_vec()),
            Obj::Tuple(t) => HKey::Tuple(t.iter().map(Obj::hkey).collect::<Result<_>>()?),
            other => bail!("a {} cannot be a dict key", other.kind()),
        })
    }

    fn as_usize(&self, what: &str) -> Result<usize> {
        match self {
            Obj::Int(i) if *i >= 0 => Ok(*i as usize),
            other => bail!("{what} must be a non-negative int, got {}", describe(other)),
        }
    }

    fn as_usize_tuple(&self, what: &str) -> Result<Vec<usize>> {
        match self {
            Obj::Tuple(t) => t.iter().map(|o| o.as_usize(what)).collect(),
            Obj::List(l) => l.borrow().iter().map(|o| o.as_usize(what)).collect(),
            other => bail!("{what} must be a tuple of ints, got {}", describe(other)),
        }
    }
}

fn describe(o: &Obj) -> String {
    match o {
        Obj::Int(i) => format!("int {i}"),
        Obj::Str(s) => format!("str {:?}", truncate(s)),
        other => other.kind().to_string(),
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 60 { format!("{}...", s.chars().take(60).collect::<String>()) } else { s.to_string() }
}

fn dict_set(d: &RefCell<DictObj>, k: Obj, v: Obj) -> Result<()> {
    let key = k.hkey()?;
    let mut d = d.borrow_mut();
    match d.index.get(&key) {
        Some(&i) => d.items[i].1 = v,
        None => {
            let i = d.items.len();
            d.index.insert(key, i);
            d.items.push((k, v));
        }
    }
    Ok(())
}

/// Output tensors beyond this many bytes more than the file's storages hold are refused: only stride-0 views or
/// repeated references can produce them, and a hostile file could otherwise exhaust memory.
const EXTRA_TENSOR_BYTES: usize = 1 << 30;
/// Deepest nesting of containers converted to [`Value`].
const MAX_DEPTH: usize = 256;
/// Values the output may hold beyond two per pickle byte. Every opcode byte makes at most one new object, so only
/// repeated references through the memo can exceed this (a hostile file can nest them to multiply exponentially).
const EXTRA_NODES: usize = 1_000_000;

struct Machine<'a, F> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Obj>,
    marks: Vec<Vec<Obj>>,
    memo: HashMap<u64, Obj>,
    storages: HashMap<String, (StorageKind, Rc<Storage>)>,
    read_storage: F,
    storage_bytes: usize,
    tensor_bytes: usize,
}

/// Unpickles `data`, reading storages through `read_storage(key, nbytes)`, which must return exactly the `nbytes`
/// raw little-endian bytes of storage `key`. Errors (never panics) on malformed or truncated input and on any global
/// outside the allow-list; nothing in the pickle is executed.
pub fn unpickle<F: FnMut(&str, usize) -> Result<Vec<u8>>>(data: &[u8], read_storage: F) -> Result<Value> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: HashMap::new(),
        read_storage,
        storage_bytes: 0,
        tensor_bytes: 0,
    };
    let result = m.run()?;
    // Drop every other reference so that singly-owned objects move into the output instead of being copied.
    let Machine { stack, marks, memo, storages, .. } = m;
    drop((stack, marks, memo, storages));
    // Counts down; conversion fails when it runs out.
    let mut budget = data.len().saturating_mul(2).saturating_add(EXTRA_NODES);
    into_value(result, 0, &mut budget)
}

fn into_value(o: Obj, depth: usize, budget: &mut usize) -> Result<Value> {
    if depth > MAX_DEPTH {
        bail!("pickle nests containers more than {MAX_DEPTH} deep (or refers to itself)");
    }
    *budget = budget
        .checked_sub(1)
        .ok_or_else(|| anyhow!("pickle expands to far more values than it has bytes (shared references multiply)"))?;
    let conv = |items: Vec<Obj>, budget: &mut usize| -> Result<Vec<Value>> {
        items.into_iter().map(|o| into_value(o, depth + 1, budget)).collect()
    };
    Ok(match o {
        Obj::None => Value::None,
        Obj::Bool(b) => Value::Bool(b),
        Obj::Int(i) => Value::Int(i),
        Obj::Float(f) => Value::Float(f),
        Obj::Str(s) => Value::Str(s.to_string()),
        Obj::Bytes(b) => Value::Bytes(b.to_vec()),
        Obj::List(l) => {
            let items = match Rc::try_unwrap(l) {
                Ok(cell) => cell.into_inner(),
                Err(shared) => shared.borrow().clone(),
            };
            Value::List(conv(items, budget)?)
        }
        Obj::Tuple(t) => Value::Tuple(conv(t.to_vec(), budget)?),
        Obj::Dict(d) => {
            let items = match Rc::try_unwrap(d) {
                Ok(cell) => cell.into_inner().items,
                Err(shared) => shared.borrow().items.clone(),
            };
            let mut out = Vec::with_capacity(items.len());
            for (k, v) in items {
                out.push((into_value(k, depth + 1, budget)?, into_value(v, depth + 1, budget)?));
            }
            Value::Dict(out)
        }
        Obj::Tensor(t) => Value::Tensor(Rc::try_unwrap(t).unwrap_or_else(|shared| (*shared).clone())),
        Obj::Global(g) => bail!("the pickle leaves a bare reference to {g:?} in its data; it is not a value"),
        Obj::Storage { key, .. } => {
            bail!("the pickle holds a bare storage (key {key}) outside a tensor; save tensors, not storages")
        }
        Obj::Dtype(d) => bail!("the pickle holds a bare numpy dtype ({}); save plain numbers", d.borrow().code),
    })
}

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
}

impl<'a, F: FnMut(&str, usize) -> Result<Vec<u8>>> Machine<'a, F> {
    fn run(&mut self) -> Result<Obj> {
        loop {
            let at = self.pos;
            let code = self.byte().context("the pickle ends without a STOP opcode (truncated file?)")?;
            if code == op::STOP {
                let top = self.pop().with_context(|| format!("STOP at byte {at}"))?;
                return Ok(top);
            }
            self.step(code).with_context(|| format!("pickle opcode 0x{code:02x} at byte {at}"))?;
        }
    }

    fn step(&mut self, code: u8) -> Result<()> {
        match code {
            op::PROTO => {
                let v = self.byte()?;
                if v > 5 {
                    bail!("pickle protocol {v} is newer than 5");
                }
            }
            op::FRAME => {
                self.take(8)?; // frames only group opcodes; the stream reads the same without them
            }
            op::MARK => {
                let stack = std::mem::take(&mut self.stack);
                self.marks.push(stack);
            }
            op::POP => {
                if self.stack.is_empty() {
                    self.pop_mark()?;
                } else {
                    self.pop()?;
                }
            }
            op::POP_MARK => {
                self.pop_mark()?;
            }
            op::DUP => {
                let top = self.stack.last().cloned().ok_or_else(|| anyhow!("DUP on an empty stack"))?;
                self.stack.push(top);
            }
            op::NONE => self.stack.push(Obj::None),
            op::NEWTRUE => self.stack.push(Obj::Bool(true)),
            op::NEWFALSE => self.stack.push(Obj::Bool(false)),
            op::INT => {
                let line = self.line()?;
                let o = match line.as_str() {
                    "00" => Obj::Bool(false),
                    "01" => Obj::Bool(true),
                    s => Obj::Int(s.parse().with_context(|| format!("INT {:?} is not an integer", truncate(s)))?),
                };
                self.stack.push(o);
            }
            op::LONG => {
                let line = self.line()?;
                let s = line.strip_suffix('L').unwrap_or(&line);
                let i = s.parse().with_context(|| format!("LONG {:?} is not a 64-bit integer", truncate(s)))?;
                self.stack.push(Obj::Int(i));
            }
            op::BININT => {
                let b = self.take(4)?;
                self.stack.push(Obj::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64));
            }
            op::BININT1 => {
                let b = self.byte()?;
                self.stack.push(Obj::Int(b as i64));
            }
            op::BININT2 => {
                let b = self.take(2)?;
                self.stack.push(Obj::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
            }
            op::LONG1 => {
                let n = self.byte()? as usize;
                let b = self.take(n)?;
                self.stack.push(Obj::Int(long_from_le(b)?));
            }
            op::LONG4 => {
                let n = self.len4()?;
                let b = self.take(n)?;
                self.stack.push(Obj::Int(long_from_le(b)?));
            }
            op::FLOAT => {
                let line = self.line()?;
                let f = line.parse().with_context(|| format!("FLOAT {:?} is not a number", truncate(&line)))?;
                self.stack.push(Obj::Float(f));
            }
            op::BINFLOAT => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                self.stack.push(Obj::Float(f64::from_be_bytes(a)));
            }
            op::BINUNICODE => {
                let n = self.len4()?;
                self.push_utf8(n)?;
            }
            op::SHORT_BINUNICODE => {
                let n = self.byte()? as usize;
                self.push_utf8(n)?;
            }
            op::BINUNICODE8 => {
                let n = self.len8()?;
                self.push_utf8(n)?;
            }
            op::BINSTRING | op::SHORT_BINSTRING => {
                // Python 2 str: Python 3 decodes it as text; latin-1 keeps every byte.
                let n = if code == op::BINSTRING { self.len4()? } else { self.byte()? as usize };
                let s: String = self.take(n)?.iter().map(|&b| b as char).collect();
                self.stack.push(Obj::Str(s.into()));
            }
            op::BINBYTES | op::SHORT_BINBYTES | op::BINBYTES8 | op::BYTEARRAY8 => {
                let n = match code {
                    op::SHORT_BINBYTES => self.byte()? as usize,
                    op::BINBYTES => self.len4()?,
                    _ => self.len8()?,
                };
                let b = self.take(n)?;
                self.stack.push(Obj::Bytes(b.into()));
            }
            op::STRING | op::UNICODE => bail!("text-mode (protocol 0) strings are not supported"),
            op::EMPTY_LIST => self.stack.push(Obj::List(Rc::default())),
            op::LIST => {
                let items = self.pop_mark()?;
                self.stack.push(Obj::List(Rc::new(RefCell::new(items))));
            }
            op::APPEND => {
                let v = self.pop()?;
                self.list_top()?.borrow_mut().push(v);
            }
            op::APPENDS => {
                let items = self.pop_mark()?;
                self.list_top()?.borrow_mut().extend(items);
            }
            op::EMPTY_SET => self.stack.push(Obj::List(Rc::default())),
            op::ADDITEMS => {
                let items = self.pop_mark()?;
                self.list_top()?.borrow_mut().extend(items);
            }
            op::FROZENSET => {
                let items = self.pop_mark()?;
                self.stack.push(Obj::List(Rc::new(RefCell::new(items))));
            }
            op::EMPTY_TUPLE => self.stack.push(Obj::Tuple(Rc::from(Vec::new()))),
            op::TUPLE => {
                let items = self.pop_mark()?;
                self.stack.push(Obj::Tuple(items.into()));
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = (code - op::TUPLE1 + 1) as usize;
                if self.stack.len() < n {
                    bail!("TUPLE{n} needs {n} items on the stack, found {}", self.stack.len());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Obj::Tuple(items.into()));
            }
            op::EMPTY_DICT => self.stack.push(Obj::Dict(Rc::default())),
            op::DICT => {
                let items = self.pop_mark()?;
                let d = Rc::new(RefCell::new(DictObj::default()));
                set_pairs(&d, items)?;
                self.stack.push(Obj::Dict(d));
            }
            op::SETITEM => {
                let v = self.pop()?;
                let k = self.pop()?;
                let d = self.dict_top()?;
                dict_set(&d, k, v)?;
            }
            op::SETITEMS => {
                let items = self.pop_mark()?;
                let d = self.dict_top()?;
                set_pairs(&d, items)?;
            }
            op::GET => {
                let line = self.line()?;
                let i = line.parse().with_context(|| format!("GET index {:?}", truncate(&line)))?;
                self.get(i)?;
            }
            op::BINGET => {
                let i = self.byte()? as u64;
                self.get(i)?;
            }
            op::LONG_BINGET => {
                let i = self.len4()? as u64;
                self.get(i)?;
            }
            op::PUT => {
                let line = self.line()?;
                let i = line.parse().with_context(|| format!("PUT index {:?}", truncate(&line)))?;
                self.put(i)?;
            }
            op::BINPUT => {
                let i = self.byte()? as u64;
                self.put(i)?;
            }
            op::LONG_BINPUT => {
                let i = self.len4()? as u64;
                self.put(i)?;
            }
            op::MEMOIZE => {
                let i = self.memo.len() as u64;
                self.put(i)?;
            }
            op::GLOBAL => {
                let module = self.line()?;
                let name = self.line()?;
                self.stack.push(Obj::Global(resolve_global(&module, &name)?));
            }
            op::STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (&module, &name) {
                    (Obj::Str(m), Obj::Str(n)) => self.stack.push(Obj::Global(resolve_global(m, n)?)),
                    _ => bail!("STACK_GLOBAL needs two strings, got {} and {}", module.kind(), name.kind()),
                }
            }
            op::REDUCE | op::NEWOBJ => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let Obj::Global(g) = callable else {
                    bail!("REDUCE on a {}, which is not an allowed callable", callable.kind());
                };
                let args = match args {
                    Obj::Tuple(t) => t,
                    other => bail!("REDUCE arguments must be a tuple, got {}", other.kind()),
                };
                let out = self.call(g, &args)?;
                self.stack.push(out);
            }
            op::BUILD => {
                let state = self.pop()?;
                let target = self.stack.last().ok_or_else(|| anyhow!("BUILD on an empty stack"))?;
                build(target, state)?;
            }
            op::BINPERSID => {
                let pid = self.pop()?;
                let storage = self.persistent_load(pid)?;
                self.stack.push(storage);
            }
            op::PERSID => bail!("text persistent ids (protocol 0) are not supported"),
            op::INST | op::OBJ | op::NEWOBJ_EX => bail!("building arbitrary class instances is not allowed"),
            op::EXT1 | op::EXT2 | op::EXT4 => bail!("extension-registry globals are not allowed"),
            other => bail!("unknown pickle opcode 0x{other:02x} (corrupt file?)"),
        }
        Ok(())
    }

    fn byte(&mut self) -> Result<u8> {
        let b = *self.data.get(self.pos).ok_or_else(|| anyhow!("the pickle is truncated at byte {}", self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            anyhow!("the pickle is truncated: {n} bytes wanted at byte {}, {} in the stream", self.pos, self.data.len())
        })?;
        let data: &'a [u8] = self.data;
        let s = &data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn len4(&mut self) -> Result<usize> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn len8(&mut self) -> Result<usize> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| anyhow!("length does not fit in memory"))
    }

    /// A newline-terminated text argument (GLOBAL, INT, ...).
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos.min(self.data.len())..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| anyhow!("the pickle is truncated in a line"))?;
        let s = std::str::from_utf8(&rest[..n]).context("a text argument is not UTF-8")?.to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn push_utf8(&mut self, n: usize) -> Result<()> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).context("a string is not valid UTF-8")?;
        self.stack.push(Obj::Str(s.into()));
        Ok(())
    }

    fn pop(&mut self) -> Result<Obj> {
        self.stack.pop().ok_or_else(|| anyhow!("stack underflow (corrupt pickle)"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Obj>> {
        let below = self.marks.pop().ok_or_else(|| anyhow!("no MARK to pop to (corrupt pickle)"))?;
        Ok(std::mem::replace(&mut self.stack, below))
    }

    fn list_top(&self) -> Result<Rc<RefCell<Vec<Obj>>>> {
        match self.stack.last() {
            Some(Obj::List(l)) => Ok(l.clone()),
            Some(other) => bail!("appending to a {}, not a list", other.kind()),
            None => bail!("appending with an empty stack"),
        }
    }

    fn dict_top(&self) -> Result<Rc<RefCell<DictObj>>> {
        match self.stack.last() {
            Some(Obj::Dict(d)) => Ok(d.clone()),
            Some(other) => bail!("setting an item on a {}, not a dict", other.kind()),
            None => bail!("setting an item with an empty stack"),
        }
    }

    fn get(&mut self, i: u64) -> Result<()> {
        let o = self.memo.get(&i).cloned().ok_or_else(|| anyhow!("memo entry {i} was never stored"))?;
        self.stack.push(o);
        Ok(())
    }

    fn put(&mut self, i: u64) -> Result<()> {
        let top = self.stack.last().cloned().ok_or_else(|| anyhow!("memo store with an empty stack"))?;
        self.memo.insert(i, top);
        Ok(())
    }

    /// torch.save's persistent id: `('storage', storage_type, key, location, numel)`.
    fn persistent_load(&mut self, pid: Obj) -> Result<Obj> {
        let Obj::Tuple(t) = &pid else {
            bail!("persistent id must be a tuple, got {}", pid.kind());
        };
        let [tag, ty, key, _location, n] = &t[..] else {
            bail!("persistent id must have 5 fields ('storage', type, key, location, numel), got {}", t.len());
        };
        if !matches!(tag, Obj::Str(s) if &**s == "storage") {
            bail!("persistent id kind {} is not 'storage'", describe(tag));
        }
        let Obj::Global(Global::StorageType(kind)) = ty else {
            bail!("persistent id storage type is {}, not a torch storage class", describe(ty));
        };
        let key: Rc<str> = match key {
            Obj::Str(s) => s.clone(),
            Obj::Int(i) => i.to_string().into(),
            other => bail!("storage key must be a string, got {}", describe(other)),
        };
        let n = n.as_usize("storage numel")?;
        if let Some((k, data)) = self.storages.get(&*key) {
            if *k != *kind || data.len() != n {
                bail!("storage {key} is referenced as {kind:?}×{n} and as {k:?}×{}", data.len());
            }
            return Ok(Obj::Storage { key, data: data.clone() });
        }
        let nbytes = n.checked_mul(kind.size()).ok_or_else(|| anyhow!("storage {key} size overflows"))?;
        let bytes = (self.read_storage)(&key, nbytes).with_context(|| format!("reading storage {key}"))?;
        if bytes.len() != nbytes {
            bail!("storage {key} holds {} bytes, the pickle says {n} {kind:?} elements ({nbytes} bytes)", bytes.len());
        }
        let data = Rc::new(kind.decode(&bytes)?);
        self.storage_bytes = self.storage_bytes.saturating_add(nbytes);
        self.storages.insert(key.to_string(), (*kind, data.clone()));
        Ok(Obj::Storage { key, data })
    }

    fn call(&mut self, g: Global, args: &[Obj]) -> Result<Obj> {
        match g {
            Global::OrderedDict => match args {
                [] => Ok(Obj::Dict(Rc::default())),
                [Obj::List(pairs)] => {
                    let d = Rc::new(RefCell::new(DictObj::default()));
                    for p in pairs.borrow().iter() {
                        match p {
                            Obj::Tuple(kv) if kv.len() == 2 => dict_set(&d, kv[0].clone(), kv[1].clone())?,
                            other => bail!("OrderedDict item must be a (key, value) tuple, got {}", other.kind()),
                        }
                    }
                    Ok(Obj::Dict(d))
                }
                _ => bail!("OrderedDict called with {} arguments", args.len()),
            },
            Global::RebuildTensorV2 => {
                if args.len() != 6 && args.len() != 7 {
                    bail!("_rebuild_tensor_v2 takes 6 or 7 arguments, got {}", args.len());
                }
                let Obj::Storage { key, data } = &args[0] else {
                    bail!("_rebuild_tensor_v2 needs a storage first, got {}", args[0].kind());
                };
                let offset = args[1].as_usize("storage_offset")?;
                let size = args[2].as_usize_tuple("size")?;
                let stride = args[3].as_usize_tuple("stride")?;
                let t = self.rebuild(key, data, offset, &size, &stride)?;
                Ok(Obj::Tensor(Rc::new(t)))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let want = if g == Global::RebuildParameter { 3 } else { 4 };
                if args.len() != want {
                    bail!("{g:?} takes {want} arguments, got {}", args.len());
                }
                match &args[0] {
                    Obj::Tensor(t) => Ok(Obj::Tensor(t.clone())),
                    other => bail!("a parameter must wrap a tensor, got {}", other.kind()),
                }
            }
            Global::TorchSize => match args {
                [Obj::Tuple(t)] => Ok(Obj::Tuple(t.clone())),
                _ => bail!("torch.Size needs one tuple argument"),
            },
            Global::Set => match args {
                [] => Ok(Obj::List(Rc::default())),
                [Obj::List(l)] => Ok(Obj::List(Rc::new(RefCell::new(l.borrow().clone())))),
                [Obj::Tuple(t)] => Ok(Obj::List(Rc::new(RefCell::new(t.to_vec())))),
                _ => bail!("set/frozenset needs one list argument"),
            },
            Global::CodecsEncode => match args {
                [Obj::Str(s), Obj::Str(enc)] if matches!(&**enc, "latin1" | "latin-1" | "iso-8859-1") => {
                    let bytes = s
                        .chars()
                        .map(|c| u8::try_from(c as u32).map_err(|_| anyhow!("latin-1 text holds {c:?}")))
                        .collect::<Result<Vec<u8>>>()?;
                    Ok(Obj::Bytes(bytes.into()))
                }
                [Obj::Str(s), Obj::Str(enc)] if matches!(&**enc, "utf-8" | "utf8") => {
                    Ok(Obj::Bytes(s.as_bytes().into()))
                }
                _ => bail!("_codecs.encode is only allowed as (str, 'latin1') for bytes"),
            },
            Global::NumpyDtype => match args {
                [Obj::Str(code), ..] => {
                    Ok(Obj::Dtype(Rc::new(RefCell::new(NumpyDtype { code: code.to_string(), big_endian: false }))))
                }
                _ => bail!("numpy.dtype needs a type-code string"),
            },
            Global::NumpyScalar => match args {
                [Obj::Dtype(d), Obj::Bytes(b)] => numpy_scalar(&d.borrow(), b),
                _ => bail!("numpy scalar needs (dtype, bytes)"),
            },
            Global::StorageType(k) => bail!("constructing a {k:?} storage directly is not supported"),
        }
    }

    /// Materialises a (possibly strided) view of a storage as a contiguous tensor.
    fn rebuild(
        &mut self,
        key: &str,
        data: &Storage,
        offset: usize,
        size: &[usize],
        stride: &[usize],
    ) -> Result<Tensor> {
        if size.len() != stride.len() {
            bail!("tensor on storage {key}: size {size:?} and stride {stride:?} differ in rank");
        }
        let n = size.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| anyhow!("size overflows"))?;
        let bytes = n.saturating_mul(data.dtype().size());
        self.tensor_bytes = self.tensor_bytes.saturating_add(bytes);
        if self.tensor_bytes > self.storage_bytes.saturating_mul(4).saturating_add(EXTRA_TENSOR_BYTES) {
            bail!(
                "tensor on storage {key} (size {size:?}, stride {stride:?}) would take the tensors past {} bytes \
                 while the file's storages hold {}: refusing to expand",
                self.tensor_bytes,
                self.storage_bytes
            );
        }
        if n > 0 {
            let last = size
                .iter()
                .zip(stride)
                .try_fold(offset, |a, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| x.checked_add(a)))
                .ok_or_else(|| anyhow!("tensor on storage {key}: index arithmetic overflows"))?;
            if last >= data.len() {
                bail!(
                    "tensor on storage {key} (offset {offset}, size {size:?}, stride {stride:?}) reads element \
                     {last}, but the storage holds {} elements",
                    data.len()
                );
            }
        }
        let storage = match data {
            Storage::F32(v) => Storage::F32(gather(v, offset, size, stride)),
            Storage::F16(v) => Storage::F16(gather(v, offset, size, stride)),
            Storage::BF16(v) => Storage::BF16(gather(v, offset, size, stride)),
            Storage::F64(v) => Storage::F64(gather(v, offset, size, stride)),
            Storage::I64(v) => Storage::I64(gather(v, offset, size, stride)),
            Storage::U8(v) => Storage::U8(gather(v, offset, size, stride)),
        };
        debug_assert_eq!(storage.len(), numel(size));
        Tensor::new(size, storage)
    }
}

/// Copies the strided view into row-major order. Bounds were checked by the caller.
fn gather<T: Copy>(src: &[T], offset: usize, size: &[usize], stride: &[usize]) -> Vec<T> {
    let n: usize = size.iter().product();
    if n == 0 {
        return Vec::new();
    }
    // Contiguous row-major strides: one slice copy.
    let mut expect = 1;
    let mut contiguous = true;
    for (&d, &s) in size.iter().zip(stride).rev() {
        if d != 1 && s != expect {
            contiguous = false;
            break;
        }
        expect *= d;
    }
    if contiguous {
        return src[offset..offset + n].to_vec();
    }
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; size.len()];
    let mut at = offset;
    for _ in 0..n {
        out.push(src[at]);
        // Odometer increment, innermost dimension first.
        for d in (0..size.len()).rev() {
            idx[d] += 1;
            at += stride[d];
            if idx[d] < size[d] {
                break;
            }
            at -= stride[d] * size[d];
            idx[d] = 0;
        }
    }
    out
}

fn set_pairs(d: &RefCell<DictObj>, items: Vec<Obj>) -> Result<()> {
    if !items.len().is_multiple_of(2) {
        bail!("SETITEMS with an odd number ({}) of stack items", items.len());
    }
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        dict_set(d, k, v)?;
    }
    Ok(())
}

/// BUILD: set an object's state. Only the shapes torch.save and numpy produce are accepted.
fn build(target: &Obj, state: Obj) -> Result<()> {
    match (target, state) {
        // An OrderedDict's attributes (a state_dict's `_metadata` versions): not items, not needed.
        (Obj::Dict(_), Obj::Dict(_) | Obj::None | Obj::Tuple(_)) => Ok(()),
        // A tensor's Python attributes (set by _rebuild_from_type_v2 subclasses): ignored.
        (Obj::Tensor(_), Obj::Dict(_) | Obj::None) => Ok(()),
        (Obj::Dtype(d), Obj::Tuple(t)) => {
            if let Some(Obj::Str(order)) = t.get(1) {
                d.borrow_mut().big_endian = &**order == ">";
            }
            Ok(())
        }
        (target, state) => bail!("BUILD of a {} with a {} state is not supported", target.kind(), state.kind()),
    }
}

fn numpy_scalar(d: &NumpyDtype, b: &[u8]) -> Result<Obj> {
    fn arr<const N: usize>(b: &[u8], big: bool) -> Result<[u8; N]> {
        let mut a: [u8; N] = b.try_into().map_err(|_| anyhow!("numpy scalar has {} bytes, expected {N}", b.len()))?;
        if big {
            a.reverse();
        }
        Ok(a)
    }
    let be = d.big_endian;
    Ok(match d.code.as_str() {
        "f8" => Obj::Float(f64::from_le_bytes(arr(b, be)?)),
        "f4" => Obj::Float(f32::from_le_bytes(arr(b, be)?) as f64),
        "f2" => Obj::Float(f16::from_le_bytes(arr(b, be)?).to_f64()),
        "i8" => Obj::Int(i64::from_le_bytes(arr(b, be)?)),
        "i4" => Obj::Int(i32::from_le_bytes(arr(b, be)?) as i64),
        "i2" => Obj::Int(i16::from_le_bytes(arr(b, be)?) as i64),
        "i1" => Obj::Int(i8::from_le_bytes(arr(b, be)?) as i64),
        "u4" => Obj::Int(u32::from_le_bytes(arr(b, be)?) as i64),
        "u2" => Obj::Int(u16::from_le_bytes(arr(b, be)?) as i64),
        "u1" => Obj::Int(b.first().copied().ok_or_else(|| anyhow!("empty numpy u1 scalar"))? as i64),
        "b1" => Obj::Bool(b.first().copied().ok_or_else(|| anyhow!("empty numpy bool scalar"))? != 0),
        "u8" => {
            let v = u64::from_le_bytes(arr(b, be)?);
            Obj::Int(i64::try_from(v).map_err(|_| anyhow!("numpy u8 scalar {v} exceeds i64"))?)
        }
        other => bail!("numpy scalar of dtype {other:?} is not supported"),
    })
}

/// Python's LONG1/LONG4 payload: little-endian two's complement.
fn long_from_le(b: &[u8]) -> Result<i64> {
    if b.is_empty() {
        return Ok(0);
    }
    let negative = b[b.len() - 1] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0x00 };
    // Extra high bytes are fine when they are pure sign extension.
    if b.len() > 8 && b[8..].iter().any(|&x| x != fill) {
        bail!("integer with {} bytes does not fit in 64 bits", b.len());
    }
    let mut a = [fill; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    let v = i64::from_le_bytes(a);
    if (v < 0) != negative {
        bail!("integer with {} bytes does not fit in 64 bits", b.len());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_storage(key: &str, _: usize) -> Result<Vec<u8>> {
        bail!("no storage {key} in this test")
    }

    fn run(p: &[u8]) -> Result<Value> {
        unpickle(p, no_storage)
    }

    #[test]
    fn long1_sign_extension() {
        assert_eq!(long_from_le(&[]).unwrap(), 0);
        assert_eq!(long_from_le(&[0xff]).unwrap(), -1);
        assert_eq!(long_from_le(&[0x00, 0x01]).unwrap(), 256);
        assert!(long_from_le(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0x00]).unwrap_err().to_string().contains("64 bits"));
        assert_eq!(long_from_le(&[1, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap(), 1);
        assert_eq!(long_from_le(&[0, 0, 0, 0, 0, 0, 0, 0x80]).unwrap(), i64::MIN);
    }

    #[test]
    fn gather_transposed_and_broadcast() {
        let src: Vec<u32> = (0..12).collect();
        // [3, 4] row-major, transposed to [4, 3] with strides (1, 4)
        let t = gather(&src, 0, &[4, 3], &[1, 4]);
        assert_eq!(t, vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
        assert_eq!(gather(&src, 2, &[2, 3], &[0, 1]), vec![2, 3, 4, 2, 3, 4]);
        assert_eq!(gather(&src, 5, &[], &[]), vec![5]);
        assert_eq!(gather(&src, 3, &[2, 1, 2], &[6, 99, 1]), vec![3, 4, 9, 10]);
    }

    #[test]
    fn dict_duplicate_keys_replace_like_python() {
        // {1: 'a', True: 'b'} == {1: 'b'}
        let p = b"\x80\x02}(K\x01X\x01\x00\x00\x00a\x88X\x01\x00\x00\x00bu.";
        assert_eq!(run(p).unwrap(), Value::Dict(vec![(Value::Int(1), Value::Str("b".into()))]));
    }

    #[test]
    fn memo_sees_later_mutation() {
        // l = []; memo[0] = l; l.append(5); (l_from_memo, l)
        let p = b"\x80\x02]q\x00K\x05ah\x00\x86.";
        let l = Value::List(vec![Value::Int(5)]);
        assert_eq!(run(p).unwrap(), Value::Tuple(vec![l.clone(), l]));
    }

    #[test]
    fn self_reference_is_an_error() {
        // l = []; l.append(l)
        let p = b"\x80\x02]q\x00h\x00a.";
        assert!(run(p).unwrap_err().to_string().contains("deep"));
    }
}
