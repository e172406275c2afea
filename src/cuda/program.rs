//! A step recorded as a program of launches over virtual buffers, a planner that places its transient buffers in
//! one arena, and eager execution on a [`Gpu`] (a real device or the emulated one).
//!
//! The CUDA backend does not launch as it goes. It records each launch as a [`Step`] that names, by [`BufId`], every
//! buffer it reads and writes and the bytes it moves through each. Buffers stay virtual until planned:
//! - *transient* buffers (activations, saved backward state, activation gradients, workspaces) get a fixed offset
//!   in one arena from their live range, so the bytes of a buffer that is dead are reused by a later one;
//! - *persistent* buffers (parameters, gradient slots, inputs, outputs) live outside the arena, where the caller
//!   binds them at execution.
//!
//! Fixed offsets are what make the program replayable: executing it eagerly is one step, and the same launches at
//! the same addresses are what a CUDA graph captures. The declared accesses also give the program's memory traffic
//! without a GPU ([`Report`]); EfficientNet-B0 is memory-bound, so bytes moved predict its time.
//!
//! Nothing here synchronises: launches go to the device's stream in step order.

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;

use super::alloc::Block;
use super::device::Gpu;
use super::kernels::DevSlice;

/// Offsets in the arena are multiples of this (cudaMalloc's alignment, and enough for every vector load).
pub const ARENA_ALIGN: usize = 256;

/// A virtual buffer of one [`Program`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufId(pub u32);

impl BufId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// In the arena, at the offset the planner gives it.
    Transient,
    /// Outside the arena, where the caller's [`Bindings`] put it.
    Persistent,
}

/// One virtual buffer: a name for errors and reports, its size, where it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Shown in errors and reports, e.g. "blocks.3.bn1.out".
    pub name: String,
    /// Size in bytes.
    pub bytes: usize,
    /// Arena or caller-bound.
    pub storage: Storage,
}

/// Bytes a step moves through one buffer (a launch may touch only part of a buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The buffer.
    pub buf: BufId,
    /// Bytes read or written.
    pub bytes: usize,
}

/// What a step does when the program runs: its launches, on the buffers [`Bound`] resolves.
pub type Run = Box<dyn Fn(&Bound<'_>) -> Result<()> + Send + Sync>;

/// One recorded launch (or a few that belong together), with every buffer it touches.
pub struct Step {
    /// Shown in errors and reports, e.g. "blocks.3.dw.forward".
    pub name: String,
    /// Buffers the step reads.
    pub reads: Vec<Access>,
    /// Buffers the step writes (a read-modify-write appears in both lists).
    pub writes: Vec<Access>,
    run: Run,
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("reads", &self.reads)
            .field("writes", &self.writes)
            .finish()
    }
}

/// A recorded step program: virtual buffers and the steps over them, in launch order.
#[derive(Default, Debug)]
pub struct Program {
    buffers: Vec<Buffer>,
    steps: Vec<Step>,
}

/// Where a program's buffers go: from [`Program::plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Arena offset of each buffer, by [`BufId`]: a multiple of [`ARENA_ALIGN`] for a transient that a step
    /// touches; `None` for persistent buffers and for transients no step touches (nothing to place).
    pub offsets: Vec<Option<usize>>,
    /// First and last step that touches each buffer (persistent ones too); `None` when no step touches it.
    pub live: Vec<Option<(usize, usize)>>,
    /// Bytes the arena needs: the highest end of a placed buffer (sizes rounded up to [`ARENA_ALIGN`]).
    pub arena_bytes: usize,
    /// What the placed transients would take without reuse: the sum of their aligned sizes.
    pub naive_bytes: usize,
}

/// Where the caller put each persistent buffer, for [`Program::execute`].
#[derive(Clone, Default)]
pub struct Bindings<'a> {
    slices: BTreeMap<BufId, DevSlice<'a>>,
}

impl<'a> Bindings<'a> {
    /// Puts persistent buffer `id` at `slice` (binding an id again replaces the earlier slice).
    pub fn bind(&mut self, id: BufId, slice: DevSlice<'a>) {
        self.slices.insert(id, slice);
    }

    /// Whether persistent buffer `id` is bound.
    pub fn has(&self, id: BufId) -> bool {
        self.slices.contains_key(&id)
    }
}

/// What a step's [`Run`] sees: the device, and its buffers resolved to device memory.
pub struct Bound<'a> {
    gpu: &'a Gpu,
    arena: &'a Block,
    program: &'a Program,
    plan: &'a Plan,
    bindings: &'a Bindings<'a>,
    step: usize,
}

impl Bound<'_> {
    /// The device the program runs on.
    pub fn gpu(&self) -> &Gpu {
        self.gpu
    }

    /// The whole buffer.
    pub fn slice(&self, id: BufId) -> Result<DevSlice<'_>> {
        let bytes = self.program.buffer(id)?.bytes;
        self.range(id, 0, bytes)
    }

    /// `[offset, offset+bytes)` of the buffer. Only buffers the step lists in its reads or writes resolve: the plan
    /// is only right for the accesses steps declare, so an undeclared one is an error, not a silent overlap.
    pub fn range(&self, id: BufId, offset: usize, bytes: usize) -> Result<DevSlice<'_>> {
        let step = &self.program.steps[self.step];
        let buf = self.program.buffer(id)?;
        ensure!(
            step.reads.iter().chain(&step.writes).any(|a| a.buf == id),
            "step {} '{}' uses buffer '{}', which it does not list in its reads or writes: declare every buffer a \
             step touches (the arena plan depends on it)",
            self.step,
            step.name,
            buf.name
        );
        ensure!(
            offset.checked_add(bytes).is_some_and(|end| end <= buf.bytes),
            "step {} '{}': range {offset}+{bytes} bytes is outside buffer '{}' of {} bytes",
            self.step,
            step.name,
            buf.name,
            buf.bytes
        );
        match buf.storage {
            Storage::Transient => {
                let base = self.plan.offsets[id.index()]
                    .with_context(|| format!("transient buffer '{}' has no place in the plan", buf.name))?;
                DevSlice::range(self.arena, base + offset, bytes)
            }
            Storage::Persistent => self
                .bindings
                .slices
                .get(&id)
                .with_context(|| format!("persistent buffer '{}' is not bound", buf.name))?
                .sub(offset, bytes),
        }
    }
}

impl Program {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer the planner places in the arena.
    pub fn transient(&mut self, name: impl Into<String>, bytes: usize) -> BufId {
        self.add(name.into(), bytes, Storage::Transient)
    }

    /// A buffer the caller binds at execution (see [`Bindings`]).
    pub fn persistent(&mut self, name: impl Into<String>, bytes: usize) -> BufId {
        self.add(name.into(), bytes, Storage::Persistent)
    }

    fn add(&mut self, name: String, bytes: usize, storage: Storage) -> BufId {
        // More than 4 billion buffers cannot be recorded in memory anyway; saturating keeps this total.
        let id = BufId(u32::try_from(self.buffers.len()).unwrap_or(u32::MAX));
        self.buffers.push(Buffer { name, bytes, storage });
        id
    }

    /// Appends a step. `reads`/`writes` name every buffer the launch touches (a read-modify-write appears in both).
    /// Accesses are checked by [`Program::plan`].
    pub fn push(&mut self, name: impl Into<String>, reads: Vec<Access>, writes: Vec<Access>, run: Run) {
        self.steps.push(Step { name: name.into(), reads, writes, run });
    }

    /// Every buffer, indexed by [`BufId`].
    pub fn buffers(&self) -> &[Buffer] {
        &self.buffers
    }

    /// Every step, in launch order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Same buffers, steps, names and accesses (two recordings of one stage must be identical). The steps' closures
    /// are not compared: they cannot be, and what they launch follows from the recording code.
    pub fn same_as(&self, other: &Program) -> bool {
        self.buffers == other.buffers
            && self.steps.len() == other.steps.len()
            && self
                .steps
                .iter()
                .zip(&other.steps)
                .all(|(a, b)| a.name == b.name && a.reads == b.reads && a.writes == b.writes)
    }

    fn buffer(&self, id: BufId) -> Result<&Buffer> {
        let count = self.buffers.len();
        self.buffers.get(id.index()).ok_or_else(|| {
            anyhow!("buffer #{} does not exist: the program has {count} buffers (an id from another program?)", id.0)
        })
    }

    /// Validates the accesses and places the transients.
    ///
    /// Errors: an access to a buffer the program does not have; an access of more bytes than its buffer holds; a
    /// transient read by a step before an earlier step wrote it (the step's own writes do not count: accumulating
    /// into a buffer needs something that initialised it). A transient written and never read (a workspace) is
    /// fine. Zero-byte buffers are allowed: they sit at offset 0 and overlap nothing.
    ///
    /// Placement is greedy by size: biggest first, each at the lowest aligned offset that is free of every
    /// already-placed buffer whose live range intersects its own. Big buffers placed first leave the small ones to
    /// fill the gaps. Optimal placement is NP-hard; this heuristic always lands between the peak of bytes live at
    /// one step (a lower bound for any placement) and the naive sum.
    pub fn plan(&self) -> Result<Plan> {
        let n = self.buffers.len();
        let mut live: Vec<Option<(usize, usize)>> = vec![None; n];
        let mut first_write: Vec<Option<usize>> = vec![None; n];
        for (i, step) in self.steps.iter().enumerate() {
            for (verb, accesses) in [("reads", &step.reads), ("writes", &step.writes)] {
                for a in accesses {
                    let Some(buf) = self.buffers.get(a.buf.index()) else {
                        bail!(
                            "step {i} '{}' {verb} buffer #{}, which does not exist: the program has {n} buffers (an id \
                             from another program?)",
                            step.name,
                            a.buf.0
                        );
                    };
                    ensure!(
                        a.bytes <= buf.bytes,
                        "step {i} '{}' {verb} {} bytes of buffer '{}', which holds {} bytes",
                        step.name,
                        a.bytes,
                        buf.name,
                        buf.bytes
                    );
                    let range = &mut live[a.buf.index()];
                    *range = Some(range.map_or((i, i), |(first, _)| (first, i)));
                }
            }
            for a in &step.writes {
                first_write[a.buf.index()].get_or_insert(i);
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            for a in &step.reads {
                let buf = &self.buffers[a.buf.index()];
                let written = first_write[a.buf.index()];
                if buf.storage == Storage::Transient && written.is_none_or(|w| w >= i) {
                    let why = match written {
                        None => "no step writes it".to_string(),
                        Some(w) if w == i => "its first write is this same step: a step that accumulates into a \
                                              buffer needs an earlier step that initialises it"
                            .to_string(),
                        Some(w) => format!("its first write is the later step {w} '{}'", self.steps[w].name),
                    };
                    bail!(
                        "step {i} '{}' reads transient buffer '{}' before an earlier step wrote it ({why})",
                        step.name,
                        buf.name
                    );
                }
            }
        }
        let (offsets, arena_bytes, naive_bytes) = self.place(&live)?;
        Ok(Plan { offsets, live, arena_bytes, naive_bytes })
    }

    /// Greedy-by-size placement of the transients that have a live range; returns offsets, arena and naive bytes.
    fn place(&self, live: &[Option<(usize, usize)>]) -> Result<(Vec<Option<usize>>, usize, usize)> {
        struct Placed {
            start: usize,
            end: usize,
            first: usize,
            last: usize,
        }
        let mut offsets = vec![None; self.buffers.len()];
        let mut order = Vec::new();
        let mut naive = 0usize;
        for (id, buf) in self.buffers.iter().enumerate() {
            if let (Storage::Transient, Some(range)) = (buf.storage, live[id]) {
                let size = buf.bytes.checked_next_multiple_of(ARENA_ALIGN).and_then(|s| {
                    naive = naive.checked_add(s)?;
                    Some(s)
                });
                let size = size.with_context(|| {
                    format!(
                        "transient buffer '{}' of {} bytes overflows the arena's address range",
                        buf.name, buf.bytes
                    )
                })?;
                order.push((size, range, id));
            }
        }
        // Biggest first; ties by first use, then id, so a plan is a pure function of the program.
        order.sort_unstable_by_key(|&(size, (first, _), id)| (std::cmp::Reverse(size), first, id));
        let mut placed: Vec<Placed> = Vec::with_capacity(order.len());
        let mut arena = 0usize;
        let mut busy = Vec::new();
        for (size, (first, last), id) in order {
            if size == 0 {
                offsets[id] = Some(0);
                continue;
            }
            busy.clear();
            busy.extend(placed.iter().filter(|p| p.first <= last && first <= p.last).map(|p| (p.start, p.end)));
            busy.sort_unstable();
            // First fit: the lowest gap between (or after) the intervals taken by buffers live at the same time.
            // Every placed end is at most the naive sum, so `start + size` cannot overflow.
            let mut start = 0;
            for &(s, e) in &busy {
                if start + size <= s {
                    break;
                }
                start = start.max(e);
            }
            placed.push(Placed { start, end: start + size, first, last });
            offsets[id] = Some(start);
            arena = arena.max(start + size);
        }
        Ok((offsets, arena, naive))
    }

    /// Runs every step in order on `gpu` with transient buffers at their planned offsets in `arena`
    /// (>= plan.arena_bytes) and persistent buffers where `bindings` put them. `poison`: fill the arena with
    /// 0xFF bytes first (NaN in f32 and f16), so a read of something never written shows as NaN.
    ///
    /// Every persistent buffer a step touches must be bound to a slice of at least its size; a binding of a
    /// transient or of an id the program lacks is an error (it would be silently ignored otherwise). A step's
    /// error comes back with the step's index and name.
    pub fn execute(&self, plan: &Plan, gpu: &Gpu, arena: &Block, bindings: &Bindings<'_>, poison: bool) -> Result<()> {
        self.execute_observed(plan, gpu, arena, bindings, poison, &mut |_| Ok(()))
    }

    /// [`Program::execute`], calling `after(i)` once step `i` is issued (a benchmark syncs and reads a clock
    /// there to time the program's phases).
    pub fn execute_observed(
        &self,
        plan: &Plan,
        gpu: &Gpu,
        arena: &Block,
        bindings: &Bindings<'_>,
        poison: bool,
        after: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        ensure!(
            plan.offsets.len() == self.buffers.len() && plan.live.len() == self.buffers.len(),
            "the plan is for another program: it places {} buffers, this program has {}",
            plan.offsets.len(),
            self.buffers.len()
        );
        ensure!(
            arena.len_bytes() >= plan.arena_bytes,
            "the arena holds {} bytes but the plan needs {}: allocate at least plan.arena_bytes",
            arena.len_bytes(),
            plan.arena_bytes
        );
        for &id in bindings.slices.keys() {
            let buf = self.buffer(id).map_err(|e| anyhow!("a binding names a buffer that is not there: {e}"))?;
            ensure!(
                buf.storage == Storage::Persistent,
                "buffer '{}' is transient and cannot be bound: the planner places it in the arena",
                buf.name
            );
        }
        for (i, step) in self.steps.iter().enumerate() {
            for a in step.reads.iter().chain(&step.writes) {
                let buf = self.buffer(a.buf).map_err(|e| anyhow!("step {i} '{}': {e}", step.name))?;
                match buf.storage {
                    Storage::Persistent => {
                        let slice = bindings.slices.get(&a.buf).with_context(|| {
                            format!(
                                "persistent buffer '{}' ({} bytes, used by step {i} '{}') has no binding: bind it \
                                 with Bindings::bind before execute",
                                buf.name, buf.bytes, step.name
                            )
                        })?;
                        ensure!(
                            slice.len_bytes() >= buf.bytes,
                            "persistent buffer '{}' needs {} bytes but is bound to a slice of {} bytes",
                            buf.name,
                            buf.bytes,
                            slice.len_bytes()
                        );
                    }
                    Storage::Transient => {
                        let fits = plan.offsets[a.buf.index()]
                            .and_then(|o| o.checked_add(buf.bytes))
                            .is_some_and(|end| end <= plan.arena_bytes);
                        ensure!(
                            fits,
                            "the plan has no place for transient buffer '{}' inside its arena: it is for another \
                             program (plan this one)",
                            buf.name
                        );
                    }
                }
            }
        }
        if poison {
            gpu.fill(arena, 0, arena.len_bytes(), 0xFF).context("poisoning the arena")?;
        }
        for (i, step) in self.steps.iter().enumerate() {
            let bound = Bound { gpu, arena, program: self, plan, bindings, step: i };
            (step.run)(&bound).with_context(|| format!("step {i} '{}'", step.name))?;
            after(i)?;
        }
        Ok(())
    }

    /// Bytes each step reads and writes, totals, and the arena's peak (used by `derma plan`).
    pub fn report(&self, plan: &Plan) -> Report {
        let sum = |accesses: &[Access]| accesses.iter().map(|a| a.bytes).sum::<usize>();
        let steps: Vec<StepBytes> = self
            .steps
            .iter()
            .map(|s| StepBytes { name: s.name.clone(), read_bytes: sum(&s.reads), written_bytes: sum(&s.writes) })
            .collect();
        let read_bytes = steps.iter().map(|s| s.read_bytes).sum();
        let written_bytes = steps.iter().map(|s| s.written_bytes).sum();
        let count = |storage| self.buffers.iter().filter(|b| b.storage == storage).count();
        Report {
            step_count: steps.len(),
            steps,
            read_bytes,
            written_bytes,
            moved_bytes: read_bytes + written_bytes,
            arena_bytes: plan.arena_bytes,
            naive_bytes: plan.naive_bytes,
            persistent_bytes: self.buffers.iter().filter(|b| b.storage == Storage::Persistent).map(|b| b.bytes).sum(),
            transient_buffers: count(Storage::Transient),
            persistent_buffers: count(Storage::Persistent),
        }
    }
}

/// Bytes one step moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StepBytes {
    /// The step's name.
    pub name: String,
    /// Sum of its reads.
    pub read_bytes: usize,
    /// Sum of its writes.
    pub written_bytes: usize,
}

/// What a program moves and how much memory it needs: [`Program::report`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Per step, in launch order.
    pub steps: Vec<StepBytes>,
    /// Number of steps.
    pub step_count: usize,
    /// Bytes read over all steps.
    pub read_bytes: usize,
    /// Bytes written over all steps.
    pub written_bytes: usize,
    /// Read plus written: the yardstick of a memory-bound program's time.
    pub moved_bytes: usize,
    /// The arena's peak ([`Plan::arena_bytes`]).
    pub arena_bytes: usize,
    /// The transients without reuse ([`Plan::naive_bytes`]).
    pub naive_bytes: usize,
    /// Sum of the persistent buffers' sizes (outside the arena).
    pub persistent_bytes: usize,
    /// Number of transient buffers.
    pub transient_buffers: usize,
    /// Number of persistent buffers.
    pub persistent_buffers: usize,
}

/// Bytes moved per image of a batch: [`Report::per_image`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PerImage {
    /// The batch the program was recorded for.
    pub batch: usize,
    /// Bytes read per image.
    pub read_bytes: f64,
    /// Bytes written per image.
    pub written_bytes: f64,
    /// Bytes moved per image.
    pub moved_bytes: f64,
}

impl Report {
    /// The totals divided by `batch`, the number of images the program was recorded for.
    pub fn per_image(&self, batch: usize) -> Result<PerImage> {
        ensure!(batch > 0, "bytes per image need a batch of at least 1 image (got 0)");
        let per = |b: usize| b as f64 / batch as f64;
        Ok(PerImage {
            batch,
            read_bytes: per(self.read_bytes),
            written_bytes: per(self.written_bytes),
            moved_bytes: per(self.moved_bytes),
        })
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        serde_json::to_value(self).context("writing the program report as JSON")
    }

    /// A human table: one row per step, then the totals and the arena.
    pub fn table(&self) -> String {
        let index_width = self.step_count.saturating_sub(1).to_string().len().max(1);
        let total = format!("total ({} steps)", self.step_count);
        // The totals row's label spans the index and name columns, so those widen to hold it.
        let longest_name = self.steps.iter().map(|s| s.name.chars().count()).max().unwrap_or(0);
        let name_width = longest_name.max(4).max(total.len().saturating_sub(index_width + 2));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{:>index_width$}  {:<name_width$}  {:>11}  {:>11}", "#", "step", "read", "written");
        for (i, s) in self.steps.iter().enumerate() {
            let _ = writeln!(
                out,
                "{i:>index_width$}  {:<name_width$}  {:>11}  {:>11}",
                s.name,
                human_bytes(s.read_bytes),
                human_bytes(s.written_bytes)
            );
        }
        let _ = writeln!(
            out,
            "{:<w$}  {:>11}  {:>11}",
            total,
            human_bytes(self.read_bytes),
            human_bytes(self.written_bytes),
            w = index_width + 2 + name_width
        );
        let _ = writeln!(out, "bytes moved: {}", human_bytes(self.moved_bytes));
        let saved =
            if self.naive_bytes == 0 { 0.0 } else { 100.0 * (1.0 - self.arena_bytes as f64 / self.naive_bytes as f64) };
        let _ = writeln!(
            out,
            "arena peak: {} for {} transient buffers (without reuse {}: {saved:.1}% saved)",
            human_bytes(self.arena_bytes),
            self.transient_buffers,
            human_bytes(self.naive_bytes)
        );
        let _ = writeln!(
            out,
            "persistent: {} in {} buffers (outside the arena)",
            human_bytes(self.persistent_bytes),
            self.persistent_buffers
        );
        out
    }
}

/// `512 B`, `1.50 KiB`, `3.25 MiB`, `1.02 GiB`.
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_pcg::Pcg64;

    fn noop() -> Run {
        Box::new(|_| Ok(()))
    }

    fn all(p: &Program, id: BufId) -> Access {
        Access { buf: id, bytes: p.buffers()[id.index()].bytes }
    }

    fn aligned(bytes: usize) -> usize {
        bytes.div_ceil(ARENA_ALIGN) * ARENA_ALIGN
    }

    /// A random program: sizes from 0 through unaligned to large, about one buffer in five persistent, steps that
    /// read only what is readable (persistent, or a transient an earlier step wrote) and write anything.
    fn random_program(rng: &mut Pcg64) -> Program {
        let mut p = Program::new();
        let buffers = rng.random_range(1..=24);
        let ids: Vec<BufId> = (0..buffers)
            .map(|b| {
                let bytes = match rng.random_range(0..6) {
                    0 => 0,
                    1 => rng.random_range(1..ARENA_ALIGN),
                    2 => ARENA_ALIGN * rng.random_range(1..8),
                    _ => rng.random_range(1..1 << 16),
                };
                if rng.random_range(0..5) == 0 {
                    p.persistent(format!("p{b}"), bytes)
                } else {
                    p.transient(format!("t{b}"), bytes)
                }
            })
            .collect();
        let mut written = vec![false; buffers];
        for s in 0..rng.random_range(1..=40) {
            let pick = |rng: &mut Pcg64, p: &Program, id: BufId| Access {
                buf: id,
                bytes: rng.random_range(0..=p.buffers()[id.index()].bytes),
            };
            let readable: Vec<BufId> = ids
                .iter()
                .copied()
                .filter(|id| written[id.index()] || p.buffers()[id.index()].storage == Storage::Persistent)
                .collect();
            let mut reads = Vec::new();
            for _ in 0..rng.random_range(0..=3usize.min(readable.len())) {
                let id = readable[rng.random_range(0..readable.len())];
                reads.push(pick(rng, &p, id));
            }
            let mut writes = Vec::new();
            for _ in 0..rng.random_range(usize::from(reads.is_empty())..=3) {
                let id = ids[rng.random_range(0..ids.len())];
                writes.push(pick(rng, &p, id));
            }
            for w in &writes {
                written[w.buf.index()] = true;
            }
            p.push(format!("s{s}"), reads, writes, noop());
        }
        p
    }

    #[test]
    fn planner_properties_hold_on_random_programs() {
        let seed: u64 = rand::random();
        let mut rng = Pcg64::seed_from_u64(seed);
        let mut reused = 0;
        for case in 0..400 {
            let p = random_program(&mut rng);
            let at = format!("seed {seed}, case {case}: {p:?}");
            let plan = p.plan().unwrap_or_else(|e| panic!("{at}: {e:#}"));
            assert_eq!(plan, p.plan().unwrap(), "{at}: planning is deterministic");
            // Live ranges from the steps, independently of the planner.
            let n = p.buffers().len();
            let mut live = vec![None::<(usize, usize)>; n];
            for (i, s) in p.steps().iter().enumerate() {
                for a in s.reads.iter().chain(&s.writes) {
                    let r = &mut live[a.buf.index()];
                    *r = Some((r.map_or(i, |r| r.0), i));
                }
            }
            assert_eq!(plan.live, live, "{at}");
            let placed: Vec<usize> =
                (0..n).filter(|&b| p.buffers()[b].storage == Storage::Transient && live[b].is_some()).collect();
            for (b, buf) in p.buffers().iter().enumerate() {
                match plan.offsets[b] {
                    Some(o) => {
                        assert!(placed.contains(&b), "{at}: only touched transients are placed ({})", buf.name);
                        assert_eq!(o % ARENA_ALIGN, 0, "{at}: {} at {o}", buf.name);
                        assert!(o + aligned(buf.bytes) <= plan.arena_bytes, "{at}: {} at {o} past the arena", buf.name);
                    }
                    None => assert!(!placed.contains(&b), "{at}: {} has no offset", buf.name),
                }
            }
            for (i, &a) in placed.iter().enumerate() {
                for &b in &placed[i + 1..] {
                    let ((fa, la), (fb, lb)) = (live[a].unwrap(), live[b].unwrap());
                    let (sa, sb) = (aligned(p.buffers()[a].bytes), aligned(p.buffers()[b].bytes));
                    let (oa, ob) = (plan.offsets[a].unwrap(), plan.offsets[b].unwrap());
                    if fa <= lb && fb <= la && sa > 0 && sb > 0 {
                        assert!(oa + sa <= ob || ob + sb <= oa, "{at}: live buffers {a} and {b} overlap");
                    }
                }
            }
            let naive: usize = placed.iter().map(|&b| aligned(p.buffers()[b].bytes)).sum();
            assert_eq!(plan.naive_bytes, naive, "{at}");
            assert!(plan.arena_bytes <= plan.naive_bytes, "{at}");
            assert_eq!(plan.arena_bytes % ARENA_ALIGN, 0, "{at}");
            // Buffers live at one step must all be disjoint, so the arena holds at least their sum.
            let peak = (0..p.steps().len())
                .map(|s| {
                    placed
                        .iter()
                        .filter(|&&b| live[b].is_some_and(|(f, l)| f <= s && s <= l))
                        .map(|&b| aligned(p.buffers()[b].bytes))
                        .sum::<usize>()
                })
                .max()
                .unwrap_or(0);
            assert!(plan.arena_bytes >= peak, "{at}: arena {} below the live peak {peak}", plan.arena_bytes);
            reused += usize::from(plan.arena_bytes < plan.naive_bytes);
        }
        assert!(reused > 100, "seed {seed}: only {reused} of 400 random programs reuse any memory");
    }

    #[test]
    fn dead_buffers_are_reused() {
        // x -> t0 -> t1 -> ... -> t9: at most two links are live at once, so two slots serve all ten.
        let mut p = Program::new();
        let x = p.persistent("x", 1000);
        let t: Vec<BufId> = (0..10).map(|i| p.transient(format!("t{i}"), 1000)).collect();
        p.push("first", vec![all(&p, x)], vec![all(&p, t[0])], noop());
        for i in 1..t.len() {
            p.push(format!("link{i}"), vec![all(&p, t[i - 1])], vec![all(&p, t[i])], noop());
        }
        let plan = p.plan().unwrap();
        assert_eq!(plan.naive_bytes, 10 * 1024);
        assert_eq!(plan.arena_bytes, 2 * 1024);
        assert_eq!(plan.offsets[x.index()], None);
        assert_eq!(plan.live[t[3].index()], Some((3, 4)));
        for i in 1..t.len() {
            assert_ne!(plan.offsets[t[i].index()], plan.offsets[t[i - 1].index()], "t{i} and its input overlap");
        }
    }

    #[test]
    fn zero_byte_and_write_only_buffers_are_fine() {
        let mut p = Program::new();
        let empty = p.transient("empty", 0);
        let workspace = p.transient("workspace", 300);
        let out = p.transient("out", 10);
        p.push("a", vec![], vec![all(&p, empty), all(&p, workspace)], noop());
        p.push("b", vec![all(&p, empty)], vec![all(&p, out)], noop());
        let plan = p.plan().unwrap();
        assert_eq!(plan.offsets[empty.index()], Some(0));
        assert_eq!(plan.naive_bytes, 512 + 256);
        // The workspace dies after step a, so `out` reuses its bytes.
        assert_eq!(plan.arena_bytes, 512);
        assert_eq!(plan.offsets[out.index()], Some(0));
    }

    #[test]
    fn bad_accesses_are_errors_that_name_buffer_and_steps() {
        let mut p = Program::new();
        let a = p.transient("act", 64);
        let b = p.transient("grad", 64);
        p.push("init", vec![], vec![all(&p, a)], noop());
        p.push("accumulate", vec![all(&p, b)], vec![all(&p, b)], noop());
        let e = format!("{:#}", p.plan().unwrap_err());
        assert!(e.contains("step 1 'accumulate' reads transient buffer 'grad'") && e.contains("same step"), "{e}");

        let mut p = Program::new();
        let a = p.transient("act", 64);
        p.push("use", vec![all(&p, a)], vec![], noop());
        p.push("make", vec![], vec![all(&p, a)], noop());
        let e = format!("{:#}", p.plan().unwrap_err());
        assert!(e.contains("step 0 'use' reads transient buffer 'act'") && e.contains("later step 1 'make'"), "{e}");

        let mut p = Program::new();
        let a = p.transient("act", 64);
        p.push("use", vec![all(&p, a)], vec![], noop());
        let e = format!("{:#}", p.plan().unwrap_err());
        assert!(e.contains("'act'") && e.contains("no step writes it"), "{e}");

        let mut p = Program::new();
        let a = p.transient("act", 64);
        p.push("big", vec![], vec![Access { buf: a, bytes: 65 }], noop());
        let e = format!("{:#}", p.plan().unwrap_err());
        assert!(e.contains("step 0 'big' writes 65 bytes of buffer 'act', which holds 64 bytes"), "{e}");

        let mut p = Program::new();
        let w = p.persistent("weight", 16);
        p.push("read", vec![Access { buf: w, bytes: 17 }], vec![], noop());
        let e = format!("{:#}", p.plan().unwrap_err());
        assert!(e.contains("step 0 'read' reads 17 bytes of buffer 'weight'"), "{e}");

        let mut p = Program::new();
        p.transient("act", 64);
        p.push("stray", vec![Access { buf: BufId(7), bytes: 0 }], vec![], noop());
        let e = format!("{:#}", p.plan().unwrap_err());
        assert!(e.contains("step 0 'stray' reads buffer #7, which does not exist: the program has 1 buffers"), "{e}");

        // Persistent buffers are the caller's: reading one no step wrote is fine.
        let mut p = Program::new();
        let w = p.persistent("weight", 16);
        p.push("read", vec![all(&p, w)], vec![], noop());
        p.plan().unwrap();
    }

    fn record(names: [&str; 2], bytes: usize) -> Program {
        let mut p = Program::new();
        let x = p.persistent("x", 64);
        let t = p.transient("t", 64);
        p.push(names[0], vec![all(&p, x)], vec![Access { buf: t, bytes }], noop());
        p.push(names[1], vec![all(&p, t)], vec![], noop());
        p
    }

    #[test]
    fn same_as_compares_buffers_steps_names_and_accesses() {
        assert!(record(["a", "b"], 64).same_as(&record(["a", "b"], 64)));
        assert!(!record(["a", "b"], 64).same_as(&record(["a", "c"], 64)));
        assert!(!record(["a", "b"], 64).same_as(&record(["a", "b"], 32)));
        let mut longer = record(["a", "b"], 64);
        longer.push("c", vec![], vec![], noop());
        assert!(!record(["a", "b"], 64).same_as(&longer));
        let mut more = record(["a", "b"], 64);
        more.transient("u", 8);
        assert!(!record(["a", "b"], 64).same_as(&more));
    }

    fn random_f32(n: usize) -> Vec<f32> {
        let mut rng = Pcg64::seed_from_u64(rand::random());
        (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect()
    }

    #[test]
    fn executes_in_order_on_the_emulated_device() {
        let gpu = Gpu::emulated().unwrap();
        let n = 1000;
        let bytes = n * 4;
        let mut p = Program::new();
        let x = p.persistent("x", bytes);
        let y = p.persistent("y", bytes);
        let (t1, t2, t3) = (p.transient("t1", bytes), p.transient("t2", bytes), p.transient("t3", bytes));
        let acc = |id| Access { buf: id, bytes };
        p.push(
            "double",
            vec![acc(x)],
            vec![acc(t1)],
            Box::new(move |b| b.gpu().kernels.add::<f32>(&b.gpu().stream, b.slice(t1)?, b.slice(x)?, b.slice(x)?, n)),
        );
        p.push(
            "triple",
            vec![acc(t1)],
            vec![acc(t2)],
            Box::new(move |b| b.gpu().kernels.scale::<f32>(&b.gpu().stream, b.slice(t2)?, b.slice(t1)?, 3.0, n, false)),
        );
        p.push(
            "sum",
            vec![acc(t1), acc(t2)],
            vec![acc(t3)],
            Box::new(move |b| b.gpu().kernels.add::<f32>(&b.gpu().stream, b.slice(t3)?, b.slice(t1)?, b.slice(t2)?, n)),
        );
        p.push(
            "halve",
            vec![acc(t3)],
            vec![acc(y)],
            Box::new(move |b| b.gpu().kernels.scale::<f32>(&b.gpu().stream, b.slice(y)?, b.slice(t3)?, 0.5, n, false)),
        );
        let plan = p.plan().unwrap();
        let host = random_f32(n);
        let xd = gpu.upload(&host).unwrap();
        let yd = gpu.zeros(bytes).unwrap();
        let arena = gpu.zeros(plan.arena_bytes).unwrap();
        let mut bindings = Bindings::default();
        bindings.bind(x, DevSlice::of(&xd));
        bindings.bind(y, DevSlice::of(&yd));
        p.execute(&plan, &gpu, &arena, &bindings, true).unwrap();
        let got = gpu.download::<f32>(&yd, n).unwrap();
        for (i, (&g, &v)) in got.iter().zip(&host).enumerate() {
            let t1 = v + v;
            let want = 0.5 * (t1 + 3.0 * t1);
            assert_eq!(g, want, "y[{i}] for x = {v}");
        }
    }

    #[test]
    fn poison_shows_reads_of_bytes_never_written_as_nan() {
        let gpu = Gpu::emulated().unwrap();
        let n = 300;
        let mut p = Program::new();
        let x = p.persistent("x", n * 4);
        let y = p.persistent("y", 2 * n * 4);
        let t = p.transient("t", 2 * n * 4);
        // Step "half" writes the first half of t; step "whole" reads all of it.
        p.push(
            "half",
            vec![all(&p, x)],
            vec![Access { buf: t, bytes: n * 4 }],
            Box::new(move |b| {
                b.gpu().kernels.scale::<f32>(&b.gpu().stream, b.range(t, 0, n * 4)?, b.slice(x)?, 1.0, n, false)
            }),
        );
        p.push(
            "whole",
            vec![all(&p, t)],
            vec![all(&p, y)],
            Box::new(move |b| {
                b.gpu().kernels.scale::<f32>(&b.gpu().stream, b.slice(y)?, b.slice(t)?, 1.0, 2 * n, false)
            }),
        );
        let plan = p.plan().unwrap();
        let host = random_f32(n);
        let xd = gpu.upload(&host).unwrap();
        let yd = gpu.zeros(2 * n * 4).unwrap();
        let mut bindings = Bindings::default();
        bindings.bind(x, DevSlice::of(&xd));
        bindings.bind(y, DevSlice::of(&yd));
        for poison in [true, false] {
            let arena = gpu.zeros(plan.arena_bytes).unwrap();
            p.execute(&plan, &gpu, &arena, &bindings, poison).unwrap();
            let got = gpu.download::<f32>(&yd, 2 * n).unwrap();
            assert_eq!(&got[..n], &host[..], "poison {poison}: the written half");
            for (i, &g) in got[n..].iter().enumerate() {
                // Poisoned, the unwritten half is NaN; unpoisoned, it is the zeros the arena started with.
                assert!(if poison { g.is_nan() } else { g == 0.0 }, "poison {poison}: y[{}] = {g}", n + i);
            }
            if poison {
                let bits = gpu.download::<u32>(&arena, plan.arena_bytes / 4).unwrap();
                assert!(bits[n..].iter().all(|&b| b == u32::MAX), "the rest of the arena is 0xFF bytes");
            }
        }
    }

    #[test]
    fn execute_refuses_bad_arenas_bindings_and_undeclared_buffers() {
        let gpu = Gpu::emulated().unwrap();
        let mut p = Program::new();
        let w = p.persistent("weight", 64);
        let t = p.transient("t", 600);
        p.push("init", vec![all(&p, w)], vec![all(&p, t)], Box::new(move |b| b.slice(t).map(|_| ())));
        let plan = p.plan().unwrap();
        assert_eq!(plan.arena_bytes, 768);
        let wd = gpu.zeros(64).unwrap();
        let small = gpu.zeros(32).unwrap();
        let run = |arena: &Block, bindings: &Bindings<'_>| {
            format!("{:#}", p.execute(&plan, &gpu, arena, bindings, true).unwrap_err())
        };

        let mut ok = Bindings::default();
        ok.bind(w, DevSlice::of(&wd));
        let e = run(&gpu.zeros(767).unwrap(), &ok);
        assert!(e.contains("the arena holds 767 bytes but the plan needs 768"), "{e}");
        let arena = gpu.zeros(768).unwrap();
        p.execute(&plan, &gpu, &arena, &ok, true).unwrap();

        let e = run(&arena, &Bindings::default());
        assert!(e.contains("persistent buffer 'weight' (64 bytes, used by step 0 'init') has no binding"), "{e}");
        let mut short = Bindings::default();
        short.bind(w, DevSlice::of(&small));
        let e = run(&arena, &short);
        assert!(e.contains("'weight' needs 64 bytes but is bound to a slice of 32 bytes"), "{e}");
        let mut transient = Bindings::default();
        transient.bind(w, DevSlice::of(&wd));
        transient.bind(t, DevSlice::of(&wd));
        let e = run(&arena, &transient);
        assert!(e.contains("buffer 't' is transient and cannot be bound"), "{e}");
        let other = Program::new().plan().unwrap();
        let e = format!("{:#}", p.execute(&other, &gpu, &arena, &ok, false).unwrap_err());
        assert!(e.contains("the plan is for another program"), "{e}");

        // A step that resolves a buffer it did not declare, or a range outside one, fails with its name.
        let mut q = Program::new();
        let w = q.persistent("weight", 64);
        let hidden_q = q.persistent("hidden", 64);
        q.push("sneaky", vec![all(&q, w)], vec![], Box::new(move |b| b.slice(hidden_q).map(|_| ())));
        q.push("overreach", vec![all(&q, w)], vec![], Box::new(move |b| b.range(w, 32, 33).map(|_| ())));
        let plan = q.plan().unwrap();
        let mut both = Bindings::default();
        both.bind(w, DevSlice::of(&wd));
        both.bind(hidden_q, DevSlice::of(&wd));
        let e = format!("{:#}", q.execute(&plan, &gpu, &arena, &both, false).unwrap_err());
        assert!(
            e.starts_with("step 0 'sneaky': ") && e.contains("uses buffer 'hidden', which it does not list"),
            "{e}"
        );
        q.steps.remove(0);
        let plan = q.plan().unwrap();
        let e = format!("{:#}", q.execute(&plan, &gpu, &arena, &both, false).unwrap_err());
        assert!(
            e.contains("step 0 'overreach': ") && e.contains("range 32+33 bytes is outside buffer 'weight'"),
            "{e}"
        );
    }

    #[test]
    fn bound_resolves_transients_at_their_offsets_and_persistents_at_their_bindings() {
        let gpu = Gpu::emulated().unwrap();
        let mut p = Program::new();
        let big = p.transient("big", 1000);
        let small = p.transient("small", 100);
        let w = p.persistent("w", 40);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        p.push(
            "look",
            vec![all(&p, w)],
            vec![all(&p, big), all(&p, small)],
            Box::new(move |b| {
                let mut log = log.lock().map_err(|_| anyhow!("poisoned"))?;
                for s in [b.slice(big)?, b.slice(small)?, b.range(small, 8, 16)?, b.slice(w)?, b.range(w, 4, 8)?] {
                    log.push((s.addr(), s.len_bytes()));
                }
                Ok(())
            }),
        );
        let plan = p.plan().unwrap();
        let arena = gpu.zeros(plan.arena_bytes).unwrap();
        let wd = gpu.zeros(64).unwrap();
        let mut bindings = Bindings::default();
        bindings.bind(w, DevSlice::of(&wd));
        p.execute(&plan, &gpu, &arena, &bindings, false).unwrap();
        let at = |id: BufId| arena.addr() + plan.offsets[id.index()].unwrap() as u64;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (at(big), 1000),
                (at(small), 100),
                (at(small) + 8, 16),
                (wd.addr(), 40), // the buffer's size, not the larger binding
                (wd.addr() + 4, 8),
            ]
        );
    }

    #[test]
    fn step_errors_carry_the_step_name() {
        let gpu = Gpu::emulated().unwrap();
        let mut p = Program::new();
        p.push("fine", vec![], vec![], noop());
        p.push("broken", vec![], vec![], Box::new(|_| bail!("the launch failed")));
        let plan = p.plan().unwrap();
        let arena = gpu.zeros(0).unwrap();
        let e = p.execute(&plan, &gpu, &arena, &Bindings::default(), true).unwrap_err();
        assert_eq!(format!("{e:#}"), "step 1 'broken': the launch failed");
    }

    #[test]
    fn report_counts_bytes_and_prints_them() {
        let mut p = Program::new();
        let x = p.persistent("input", 3 << 20);
        let t = p.transient("features", 1 << 20);
        let u = p.transient("logits", 1000);
        p.push("stem", vec![all(&p, x)], vec![all(&p, t)], noop());
        p.push("head.linear", vec![all(&p, t)], vec![all(&p, u)], noop());
        p.push("head.bias", vec![all(&p, u)], vec![all(&p, u)], noop());
        let plan = p.plan().unwrap();
        let r = p.report(&plan);
        assert_eq!(r.step_count, 3);
        assert_eq!(r.steps[1], StepBytes { name: "head.linear".into(), read_bytes: 1 << 20, written_bytes: 1000 });
        assert_eq!(r.read_bytes, (3 << 20) + (1 << 20) + 1000);
        assert_eq!(r.written_bytes, (1 << 20) + 2000);
        assert_eq!(r.moved_bytes, r.read_bytes + r.written_bytes);
        assert_eq!((r.arena_bytes, r.naive_bytes), (plan.arena_bytes, plan.naive_bytes));
        assert_eq!((r.persistent_bytes, r.persistent_buffers, r.transient_buffers), (3 << 20, 1, 2));
        let per = r.per_image(4).unwrap();
        assert_eq!(per.moved_bytes, r.moved_bytes as f64 / 4.0);
        assert!(format!("{:#}", r.per_image(0).unwrap_err()).contains("at least 1 image"));

        let table = r.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["#", "step", "read", "written"]);
        assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), ["0", "stem", "3.00", "MiB", "1.00", "MiB"]);
        assert_eq!(lines[3].split_whitespace().collect::<Vec<_>>(), ["2", "head.bias", "1000", "B", "1000", "B"]);
        // Columns line up: every row ends at the same width.
        assert!(lines[..5].iter().all(|l| l.len() == lines[0].len()), "{table}");
        assert!(lines[4].starts_with("total (3 steps)"), "{table}");
        assert!(table.contains("arena peak: "), "{table}");
        let json = r.to_json().unwrap();
        assert_eq!(json["steps"][2]["name"], "head.bias");
        assert_eq!(json["moved_bytes"], r.moved_bytes);
        assert_eq!(json["arena_bytes"], plan.arena_bytes);
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(5 << 30), "5.00 GiB");
    }
}
