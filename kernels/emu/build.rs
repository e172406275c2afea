//! Host C++ build of kernels/*.cu for the emulated device (a module of the crate's build.rs).
//!
//! Each kernel file is compiled as C++20 with kernels/emu/cuda_emu.h force-included and kernels/emu first on the
//! include path (its cuda_fp16.h shadows CUDA's), inside a generated translation unit that wraps the file in a
//! namespace of its own and lists its entry points. The entry points are found by preprocessing the file with
//! `DERMA_EMU_SCAN`, which turns `__global__` into a marker, so kernels stamped out by macros are found too; each
//! gets a trampoline (`derma_emu::trampoline<&kernel>`) that unpacks a cuLaunchKernel-style `void** args` into the
//! kernel's parameters. Test-only kernels in kernels/emu/tests/*.cu are compiled the same way.
//!
//! The wrapper's namespace gives every kernel file its own copy of its helpers: two files that each define an
//! inline `silu(float)` or a template `forward<T>` with different bodies would otherwise be merged by the linker
//! (an ODR violation) and one file would silently run the other's code.
//!
//! `extern __shared__ T name[];` (dynamic shared memory) cannot compile as written, since `__shared__` is `static`
//! there; a file that has it is compiled from a copy in which that declaration reads
//! `T* const name = (T*)derma_emu::g_dynamic_shared;` (same line, `#line` keeps file and line numbers).
//!
//! Flavours: plain (`-O2`) and, with the `emu-asan` feature, `-fsanitize=address,undefined` with recovery off, so
//! the first out-of-bounds access or misaligned vector load aborts the run. Tests of the ASan flavour must run with
//! the ASan runtime loaded first (see src/cuda/emu/mod.rs).
//!
//! A manifest (`$OUT_DIR/emu/manifest.txt`) records the compiler, flags and generated sources, so
//! scripts/mutate-kernels.sh can rebuild the library from mutated kernel copies as a shared object in seconds and
//! load it through `DERMA_EMU_LIB`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

/// One kernel file of the emulated library.
struct KernelFile {
    /// Path as given to the compiler (absolute).
    path: PathBuf,
    /// Unique identifier for its namespace and table function, e.g. `elementwise` or `test_runtime`.
    ident: String,
    /// Its `extern "C" __global__` entry points, in source order.
    entries: Vec<Entry>,
}

struct Entry {
    name: String,
    /// The C++ expression of `__launch_bounds__`'s first argument, if the kernel has one.
    max_threads: Option<String>,
}

pub fn build(out_dir: &Path) -> Result<(), String> {
    let t0 = Instant::now();
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").map_err(|_| "CARGO_MANIFEST_DIR is not set")?);
    let asan = std::env::var_os("CARGO_FEATURE_EMU_ASAN").is_some();
    let kernels = root.join("kernels");
    let emu = kernels.join("emu");
    println!("cargo:rerun-if-changed={}", emu.display());
    let gen_dir = out_dir.join("emu");
    fs::create_dir_all(&gen_dir).map_err(|e| format!("cannot create {}: {e}", gen_dir.display()))?;

    let mut files = Vec::new();
    for (dir, prefix) in [(kernels.clone(), ""), (emu.join("tests"), "test_")] {
        let mut paths: Vec<PathBuf> = match fs::read_dir(&dir) {
            Ok(rd) => rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect(),
            Err(_) => Vec::new(),
        };
        paths.sort();
        for path in paths {
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let ident: String =
                format!("{prefix}{stem}").chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
            files.push(KernelFile { path, ident, entries: Vec::new() });
        }
    }
    if files.is_empty() {
        return Err(format!("no kernel files in {}", kernels.display()));
    }

    let base = base_build(&root, asan);
    let compiler = base.try_get_compiler().map_err(|e| format!("no host C++ compiler: {e}"))?;

    // Scan (preprocess) every file for its entry points, then write the generated translation units.
    let mut sources = Vec::new();
    for f in &mut files {
        f.entries = scan_entries(&compiler, &root, &f.path)?;
        let included = dynamic_shared_copy(&f.path, &gen_dir, &f.ident)?;
        let tu = gen_dir.join(format!("{}.cpp", f.ident));
        write_if_changed(&tu, &wrapper_source(f, &included))?;
        sources.push(tu);
    }
    let table = gen_dir.join("entry_table.cpp");
    write_if_changed(&table, &table_source(&files))?;
    sources.push(table);
    sources.push(emu.join("runtime.cpp"));

    // Compile in parallel (cc without its jobserver feature compiles serially), then archive.
    let jobs: usize = std::env::var("NUM_JOBS").ok().and_then(|j| j.parse().ok()).unwrap_or(2).clamp(1, sources.len());
    let next = Mutex::new(0usize);
    let objects: Mutex<Vec<(usize, Result<Vec<PathBuf>, String>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let i = {
                        let Ok(mut n) = next.lock() else { return };
                        *n += 1;
                        *n - 1
                    };
                    let Some(src) = sources.get(i) else { return };
                    let r = base.clone().file(src).try_compile_intermediates().map_err(|e| e.to_string());
                    if let Ok(mut v) = objects.lock() {
                        v.push((i, r));
                    }
                }
            });
        }
    });
    let mut objects = objects.into_inner().map_err(|_| "a compile thread died")?;
    objects.sort_by_key(|(i, _)| *i);
    let mut all_objects = Vec::new();
    let mut errors = Vec::new();
    for (_, r) in objects {
        match r {
            Ok(objs) => all_objects.extend(objs),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    let mut archive = base.clone();
    archive.objects(&all_objects);
    archive.try_compile("derma_emu").map_err(|e| e.to_string())?;

    if asan {
        // The instrumented objects call into the ASan and UBSan runtimes (GCC's shared ones).
        for lib in ["asan", "ubsan"] {
            if let Some(dir) = runtime_dir(compiler.path(), lib) {
                println!("cargo:rustc-link-search=native={}", dir.display());
            }
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }

    write_manifest(&gen_dir, &compiler, &root, asan, &files)?;
    let kernels_total: usize = files.iter().map(|f| f.entries.len()).sum();
    let _ = fs::write(
        gen_dir.join("build-time.txt"),
        format!(
            "{} flavour: {} files, {kernels_total} entry points, {:.1} s with {jobs} jobs\n",
            if asan { "asan" } else { "plain" },
            files.len(),
            t0.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}

/// The flags every emulated translation unit is compiled with.
fn emu_flags(root: &Path, asan: bool) -> Vec<String> {
    let emu = root.join("kernels").join("emu");
    let mut flags = vec![
        "-std=c++20".to_string(),
        // Kernels read floats through uint4 (16-byte vectors) and unions, as CUDA code does; in host C++ that
        // breaks strict aliasing, which -O2 would exploit.
        "-fno-strict-aliasing".to_string(),
        "-include".to_string(),
        emu.join("cuda_emu.h").display().to_string(),
        // __FILE__ in reports (and UBSan's locations) read kernels/x.cu, not a machine path.
        format!("-ffile-prefix-map={}/=", root.display()),
    ];
    if asan {
        flags.extend(
            [
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer",
                "-DDERMA_EMU_ASAN=1",
            ]
            .map(String::from),
        );
    }
    flags
}

fn base_build(root: &Path, asan: bool) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .opt_level(if asan { 1 } else { 2 })
        .debug(false)
        .warnings(false)
        .cargo_metadata(true)
        .include(root.join("kernels").join("emu"))
        .include(root.join("kernels"))
        .include(root.join("kernels").join("emu").join("tests"));
    for f in emu_flags(root, asan) {
        b.flag(&f);
    }
    b
}

/// Preprocesses `path` with `DERMA_EMU_SCAN` and returns the names of its `extern "C"` kernels.
fn scan_entries(compiler: &cc::Tool, root: &Path, path: &Path) -> Result<Vec<Entry>, String> {
    let mut cmd = Command::new(compiler.path());
    cmd.args(["-E", "-P", "-x", "c++", "-DDERMA_EMU_SCAN=1"]);
    for f in emu_flags(root, false) {
        cmd.arg(f);
    }
    cmd.arg("-I").arg(root.join("kernels").join("emu")).arg("-I").arg(root.join("kernels"));
    if let Some(dir) = path.parent() {
        cmd.arg("-I").arg(dir);
    }
    cmd.arg(path);
    let out = cmd.output().map_err(|e| format!("cannot run {}: {e}", compiler.path().display()))?;
    if !out.status.success() {
        return Err(format!("preprocessing {} failed:\n{}", path.display(), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(entry_names(&String::from_utf8_lossy(&out.stdout)))
}

/// Kernels in preprocessed text: `extern "C" derma_emu_global_mark void [derma_emu_launch_bounds_mark(A, ...)]
/// name (`.
fn entry_names(text: &str) -> Vec<Entry> {
    let tokens = tokenize(text);
    let mut entries: Vec<Entry> = Vec::new();
    for (i, w) in tokens.windows(4).enumerate() {
        if !(w[0] == "extern" && w[1] == "\"C\"" && w[2] == "derma_emu_global_mark" && w[3] == "void") {
            continue;
        }
        let mut k = i + 4;
        let mut max_threads = None;
        if tokens.get(k) == Some(&"derma_emu_launch_bounds_mark") && tokens.get(k + 1) == Some(&"(") {
            // The first argument: tokens up to the first comma or the closing parenthesis at depth 0.
            let mut depth = 0;
            let mut expr = Vec::new();
            let mut in_first = true;
            k += 2;
            while let Some(&t) = tokens.get(k) {
                k += 1;
                match t {
                    "(" => depth += 1,
                    ")" if depth == 0 => break,
                    ")" => depth -= 1,
                    "," if depth == 0 => in_first = false,
                    _ => {}
                }
                if in_first && !(t == "," && depth == 0) {
                    expr.push(t);
                }
            }
            max_threads = Some(expr.join(" "));
        }
        let Some(name) = tokens.get(k) else { continue };
        if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !entries.iter().any(|e| e.name == *name) {
            entries.push(Entry { name: name.to_string(), max_threads });
        }
    }
    entries
}

/// A rough C++ tokenizer: identifiers, string literals and single punctuation characters.
fn tokenize(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push(&text[start..i]);
        } else if c == b'"' {
            let start = i;
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(bytes.len());
            out.push(&text[start..i]);
        } else {
            let len = text[i..].chars().next().map_or(1, char::len_utf8);
            out.push(&text[i..i + len]);
            i += len;
        }
    }
    out
}

/// The file to include for `path`: itself, or a copy with its dynamic shared declarations rewritten.
fn dynamic_shared_copy(path: &Path, gen_dir: &Path, ident: &str) -> Result<PathBuf, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !text.contains("__shared__") {
        return Ok(path.to_path_buf());
    }
    let mut out = String::with_capacity(text.len() + 64);
    let mut rewritten = false;
    let mut rest = text.as_str();
    while let Some(pos) = find_extern_shared(rest) {
        let (head, tail) = rest.split_at(pos.start);
        out.push_str(head);
        let decl = &tail[..pos.len];
        let Some(semi) = tail[pos.len..].find(';') else { break };
        let body = &tail[pos.len..pos.len + semi];
        // body: `[__align__(n)] T name[]`
        let trimmed = body.trim_end();
        let Some(without_brackets) = trimmed.strip_suffix(']').and_then(|t| t.trim_end().strip_suffix('[')) else {
            return Err(format!(
                "{}: `{decl}{body};` is not `extern __shared__ T name[];`, the dynamic shared form the emulator knows",
                path.display()
            ));
        };
        let without_brackets = without_brackets.trim_end();
        let name_start =
            without_brackets.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
        let name = &without_brackets[name_start..];
        let ty = without_brackets[..name_start].replace("__align__", "").trim().to_string();
        let ty = strip_parenthesised_prefix(&ty);
        let _ = write!(out, "{ty}* const {name} = reinterpret_cast<{ty}*>(::derma_emu::g_dynamic_shared)");
        rest = &tail[pos.len + semi..];
        rewritten = true;
    }
    out.push_str(rest);
    if !rewritten {
        return Ok(path.to_path_buf());
    }
    let copy = gen_dir.join(format!("{ident}.dynshared.cu"));
    let text = format!("#line 1 \"{}\"\n{out}", path.display());
    write_if_changed(&copy, &text)?;
    Ok(copy)
}

/// `(16) float` -> `float`: what is left of `__align__(16) float` once the macro name is gone.
fn strip_parenthesised_prefix(ty: &str) -> String {
    let t = ty.trim();
    if let Some(after) = t.strip_prefix('(') {
        if let Some(close) = after.find(')') {
            return after[close + 1..].trim().to_string();
        }
    }
    t.to_string()
}

struct Match {
    start: usize,
    len: usize,
}

/// The next `extern __shared__` (any whitespace between) in `text`.
fn find_extern_shared(text: &str) -> Option<Match> {
    let mut from = 0;
    while let Some(i) = text[from..].find("extern") {
        let start = from + i;
        let after = &text[start + 6..];
        let ws = after.len() - after.trim_start().len();
        // Only a declaration: what precedes it on its line is blank or ends a statement or block (not a comment).
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let prefix = text[line_start..start].trim();
        let starts_declaration = !prefix.contains("//")
            && !prefix.contains("/*")
            && (prefix.is_empty() || prefix.ends_with([';', '{', '}']));
        if ws > 0 && starts_declaration && after[ws..].starts_with("__shared__") {
            return Some(Match { start, len: 6 + ws + "__shared__".len() });
        }
        from = start + 6;
    }
    None
}

fn wrapper_source(f: &KernelFile, included: &Path) -> String {
    let ns = format!("derma_emu_file_{}", f.ident);
    let mut s = String::new();
    let _ = writeln!(s, "// Generated by build.rs: the emulated entry points of {}.", f.path.display());
    // Headers a kernel file includes must be included here first, outside the namespace; inside it their include
    // guards make the kernel's own #include a no-op.
    s.push_str("#include <cuda_fp16.h>\n#include <float.h>\n#include <limits.h>\n#include <stdint.h>\n");
    let _ = writeln!(s, "namespace {ns} {{");
    // By file name: the include path finds it (kernels/, kernels/emu/tests/, or a mutant's folder put first).
    let name = included.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let _ = writeln!(s, "#include \"{name}\"");
    let _ = writeln!(s, "}}  // namespace {ns}");
    // Launch bounds are expressions of the kernel file: evaluate them where its names are visible.
    let _ = writeln!(s, "namespace {{\nusing namespace {ns};\nconst derma_emu::EntryPoint entries[] = {{");
    for e in &f.entries {
        let name = &e.name;
        let bound = e.max_threads.as_deref().unwrap_or("1024");
        let _ = writeln!(
            s,
            "    {{\"{name}\", &derma_emu::trampoline<&{ns}::{name}>, derma_emu::param_count(&{ns}::{name}), \
             (int)({bound})}},"
        );
    }
    if f.entries.is_empty() {
        s.push_str("    {nullptr, nullptr, 0, 0},\n");
    }
    s.push_str("};\n}  // namespace\n");
    let _ = writeln!(
        s,
        "extern \"C\" const derma_emu::EntryPoint* derma_emu_entries_{}(size_t* n) {{ *n = {}; return entries; }}",
        f.ident,
        f.entries.len()
    );
    s
}

fn table_source(files: &[KernelFile]) -> String {
    let mut s = String::from("// Generated by build.rs: every emulated entry point, one table.\n#include <vector>\n");
    for f in files {
        let _ = writeln!(s, "extern \"C\" const derma_emu::EntryPoint* derma_emu_entries_{}(size_t* n);", f.ident);
    }
    s.push_str(
        "extern \"C\" const derma_emu::EntryPoint* derma_emu_entry_table(size_t* count) {\n    \
         static const std::vector<derma_emu::EntryPoint> all = [] {\n        \
         std::vector<derma_emu::EntryPoint> v;\n        size_t n = 0;\n        const derma_emu::EntryPoint* e;\n",
    );
    for f in files {
        let _ = writeln!(s, "        e = derma_emu_entries_{}(&n);\n        v.insert(v.end(), e, e + n);", f.ident);
    }
    s.push_str("        return v;\n    }();\n    *count = all.size();\n    return all.data();\n}\n");
    s
}

fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The folder holding `lib<name>.so` of the compiler's runtime, when the compiler knows it.
fn runtime_dir(compiler: &Path, name: &str) -> Option<PathBuf> {
    let out = Command::new(compiler).arg(format!("-print-file-name=lib{name}.so")).output().ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if p.is_absolute() { p.parent().map(Path::to_path_buf) } else { None }
}

/// What scripts/mutate-kernels.sh needs to rebuild the library on its own: one `key value` pair a line.
fn write_manifest(
    gen_dir: &Path,
    compiler: &cc::Tool,
    root: &Path,
    asan: bool,
    files: &[KernelFile],
) -> Result<(), String> {
    let mut s = String::new();
    let _ = writeln!(s, "compiler {}", compiler.path().display());
    let _ = writeln!(s, "flavour {}", if asan { "asan" } else { "plain" });
    for f in emu_flags(root, asan) {
        let _ = writeln!(s, "flag {f}");
    }
    let _ = writeln!(s, "runtime {}", root.join("kernels").join("emu").join("runtime.cpp").display());
    let _ = writeln!(s, "table {}", gen_dir.join("entry_table.cpp").display());
    for f in files {
        let _ = writeln!(s, "wrapper {} {}", gen_dir.join(format!("{}.cpp", f.ident)).display(), f.path.display());
    }
    write_if_changed(&gen_dir.join("manifest.txt"), &s)
}
