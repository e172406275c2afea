//! Build script: compiles every `kernels/*.cu` with nvcc into one fatbin per file (SASS for each target
//! architecture plus PTX for the newest), checks ptxas's resource report (the build fails on any register spill),
//! and writes `$OUT_DIR/kernels.rs`, which embeds the images with `include_bytes!`.
//!
//! nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `$PATH` and `/usr/local/cuda/bin`. When none
//! is found, a pinned CUDA 13.0 compiler is installed once from NVIDIA's PyPI wheels into a cache outside the source
//! tree (`$DERMA_NVCC_CACHE`, else `$XDG_CACHE_HOME/derma/nvcc-13.0`, else `~/.cache/derma/nvcc-13.0`). When that
//! fails too, the crate still builds, without GPU kernels, unless `DERMA_REQUIRE_NVCC=1`.
//!
//! It also compiles the same files with the host C++ compiler against kernels/emu (the CUDA execution model as a
//! header and a fiber runtime) into the static library `derma_emu`, always: that is the emulated device
//! (src/cuda/emu). With the `emu-asan` feature the library is built with AddressSanitizer and UBSan instead.
//!
//! Environment: `DERMA_CUDA_ARCHS` (e.g. "80,90"; default "80,86,89,90"), `DERMA_REQUIRE_NVCC=1`,
//! `DERMA_NO_CUDA_KERNELS=1` (skip the kernel build entirely), `DERMA_NVCC_CACHE`, `NVCC`, `CUDA_HOME`, `CUDA_PATH`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

#[path = "kernels/emu/build.rs"]
mod emu;

/// CUDA 13.0 wheels: their PTX (ISA 9.0) loads on 580-series drivers; newer toolkits need newer drivers.
const NVCC_WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-nvvm==13.0.88",
];
const DEFAULT_ARCHS: &str = "80,86,89,90";
const MARKER: &str = "derma-nvcc-complete";

fn main() {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "DERMA_CUDA_ARCHS",
        "DERMA_REQUIRE_NVCC",
        "DERMA_NO_CUDA_KERNELS",
        "DERMA_NVCC_CACHE",
        "XDG_CACHE_HOME",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo::rustc-check-cfg=cfg(derma_kernels)");

    let out_dir =
        PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR is not set (run through cargo)")));
    let require = std::env::var("DERMA_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let sources = kernel_sources();
    for s in &sources.all {
        println!("cargo:rerun-if-changed={}", s.display());
    }

    if let Err(e) = emu::build(&out_dir) {
        fail(&format!("the emulated kernel library (host C++ build of kernels/*.cu): {e}"));
    }

    let archs = match parse_archs() {
        Ok(a) => a,
        Err(e) => fail(&e),
    };

    if std::env::var("DERMA_NO_CUDA_KERNELS").is_ok_and(|v| v == "1") {
        write_absent(&out_dir, "the build was told to skip them (DERMA_NO_CUDA_KERNELS=1)");
        return;
    }

    let nvcc = match find_nvcc().map(Ok).unwrap_or_else(provision_nvcc) {
        Ok(n) => n,
        Err(e) => {
            let msg = format!("no CUDA compiler: {e}");
            if require {
                fail(&format!(
                    "{msg}\nDERMA_REQUIRE_NVCC=1 is set, so the build stops here. Install the CUDA toolkit (or set \
                     NVCC to an nvcc binary), or unset DERMA_REQUIRE_NVCC to build without GPU kernels."
                ));
            }
            println!("cargo:warning=derma: building WITHOUT GPU kernels: {msg}");
            write_absent(&out_dir, &msg);
            return;
        }
    };

    match compile_all(&nvcc, &sources.cu, &archs, &out_dir) {
        Ok(()) => {}
        Err(CompileError::Source(e)) => fail(&e),
        Err(CompileError::Toolchain(e)) => {
            let msg = format!("nvcc at {} does not work: {e}", nvcc.display());
            if require {
                fail(&format!("{msg}\nDERMA_REQUIRE_NVCC=1 is set, so the build stops here."));
            }
            println!("cargo:warning=derma: building WITHOUT GPU kernels: {}", first_line(&msg));
            write_absent(&out_dir, &msg);
        }
    }
}

/// Prints a build failure and stops the build script.
fn fail(msg: &str) -> ! {
    eprintln!("\nderma build error: {msg}\n");
    std::process::exit(1);
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

struct Sources {
    cu: Vec<PathBuf>,
    all: Vec<PathBuf>,
}

fn kernel_sources() -> Sources {
    let mut cu = Vec::new();
    let mut all = Vec::new();
    if let Ok(rd) = fs::read_dir("kernels") {
        for entry in rd.flatten() {
            let p = entry.path();
            match p.extension().and_then(|e| e.to_str()) {
                Some("cu") => {
                    cu.push(p.clone());
                    all.push(p);
                }
                Some("cuh") => all.push(p),
                _ => {}
            }
        }
    }
    cu.sort();
    all.sort();
    Sources { cu, all }
}

fn parse_archs() -> Result<Vec<u32>, String> {
    let raw = std::env::var("DERMA_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let mut archs = Vec::new();
    for part in raw.split([',', ' ', ';']).filter(|p| !p.is_empty()) {
        let digits = part.trim().trim_start_matches("sm_").trim_start_matches("compute_").replace('.', "");
        match digits.parse::<u32>() {
            Ok(a) if (50..=130).contains(&a) => archs.push(a),
            _ => {
                return Err(format!(
                    "DERMA_CUDA_ARCHS={raw:?}: {part:?} is not a compute capability; write e.g. \"80,86,89,90\""
                ));
            }
        }
    }
    archs.sort_unstable();
    archs.dedup();
    if archs.is_empty() {
        return Err(format!("DERMA_CUDA_ARCHS={raw:?} names no architecture; write e.g. \"80,90\""));
    }
    Ok(archs)
}

fn is_file(p: &Path) -> bool {
    p.is_file()
}

/// nvcc from the environment, a CUDA install, or an already provisioned cache; `None` when there is none.
fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC").map(PathBuf::from) {
        if is_file(&p) {
            return Some(p);
        }
        println!("cargo:warning=derma: NVCC={} is not a file; looking elsewhere", p.display());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let p = PathBuf::from(root).join("bin").join("nvcc");
            if is_file(&p) {
                return Some(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if is_file(&p) {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from("/usr/local/cuda/bin/nvcc");
    if is_file(&p) {
        return Some(p);
    }
    let cache = cache_dir()?;
    let p = cached_nvcc(&cache);
    (cache.join(MARKER).is_file() && is_file(&p)).then_some(p)
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DERMA_NVCC_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("derma").join("nvcc-13.0"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("derma").join("nvcc-13.0"))
}

fn cached_nvcc(cache: &Path) -> PathBuf {
    cache.join("toolkit").join("nvidia").join("cu13").join("bin").join("nvcc")
}

/// Installs the pinned nvcc wheels into the cache, once, under a lock so that parallel builds do not race.
fn provision_nvcc() -> Result<PathBuf, String> {
    let cache = cache_dir().ok_or("no cache folder for a provisioned nvcc (set DERMA_NVCC_CACHE or HOME)")?;
    let nvcc = cached_nvcc(&cache);
    fs::create_dir_all(&cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let lock = cache.join("lock");
    let started = Instant::now();
    // create_dir is atomic: whoever creates the lock folder provisions; the others wait for the marker.
    loop {
        if cache.join(MARKER).is_file() && is_file(&nvcc) {
            return Ok(nvcc);
        }
        match fs::create_dir(&lock) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let age = fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .unwrap_or_default();
                if age > Duration::from_secs(20 * 60) {
                    // A build that died mid-install leaves its lock behind; 20 minutes is far past a normal install.
                    let _ = fs::remove_dir(&lock);
                    continue;
                }
                if started.elapsed() > Duration::from_secs(15 * 60) {
                    return Err(format!("waited 15 minutes for another build holding {}", lock.display()));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(format!("cannot create lock {}: {e}", lock.display())),
        }
    }
    let result = install_wheels(&cache, &nvcc);
    let _ = fs::remove_dir(&lock);
    result.map(|()| nvcc)
}

fn install_wheels(cache: &Path, nvcc: &Path) -> Result<(), String> {
    println!(
        "cargo:warning=derma: nvcc not found; installing CUDA 13.0 nvcc from PyPI wheels into {} (once)",
        cache.display()
    );
    let staging = cache.join(format!("staging-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let t0 = Instant::now();
    let mut errors = Vec::new();
    let mut installed = false;
    for python in ["python3", "python"] {
        let out = Command::new(python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-deps", "--target"])
            .arg(&staging)
            .args(NVCC_WHEELS)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                installed = true;
                break;
            }
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                errors.push(format!("`{python} -m pip install` failed: {}", err.trim().lines().last().unwrap_or("")));
            }
            Err(e) => errors.push(format!("cannot run {python}: {e}")),
        }
    }
    if !installed {
        let _ = fs::remove_dir_all(&staging);
        return Err(errors.join("; "));
    }
    let dest = cache.join("toolkit");
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&staging, &dest).map_err(|e| format!("cannot move {} to {}: {e}", staging.display(), dest.display()))?;
    if !is_file(nvcc) {
        return Err(format!("the wheels installed, but {} is missing", nvcc.display()));
    }
    fs::write(cache.join(MARKER), NVCC_WHEELS.join("\n") + "\n")
        .map_err(|e| format!("cannot write the marker in {}: {e}", cache.display()))?;
    println!("cargo:warning=derma: nvcc installed in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

enum CompileError {
    /// A kernel does not compile or spills: a bug in kernels/, the build must fail.
    Source(String),
    /// nvcc itself does not run (no host compiler, broken install): build without kernels.
    Toolchain(String),
}

/// One kernel's resource use for one architecture, from ptxas's `-v` report.
struct Resource {
    file: String,
    kernel: String,
    arch: String,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn compile_all(nvcc: &Path, sources: &[PathBuf], archs: &[u32], out_dir: &Path) -> Result<(), CompileError> {
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| CompileError::Toolchain(format!("cannot run it: {e}")))?;
    let version = String::from_utf8_lossy(&version.stdout);
    let version = version.lines().rfind(|l| l.contains("release")).unwrap_or("unknown").trim().to_string();

    let jobs: usize = std::env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(2)
        .clamp(1, sources.len().max(1));
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<(usize, Result<String, CompileError>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let i = {
                        let Ok(mut n) = next.lock() else { return };
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(src) = sources.get(i) else { return };
                    let r = compile_one(nvcc, src, archs, out_dir);
                    if let Ok(mut v) = results.lock() {
                        v.push((i, r));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(i, _)| *i);
    if results.len() != sources.len() {
        return Err(CompileError::Toolchain("a compile thread died".into()));
    }

    let mut resources = Vec::new();
    let mut source_errors = Vec::new();
    for ((_, r), src) in results.into_iter().zip(sources) {
        match r {
            Ok(report) => resources.extend(parse_ptxas(&file_stem(src), &report)),
            Err(CompileError::Source(e)) => source_errors.push(e),
            Err(e @ CompileError::Toolchain(_)) => return Err(e),
        }
    }
    if !source_errors.is_empty() {
        return Err(CompileError::Source(source_errors.join("\n")));
    }

    let spills: Vec<String> = resources
        .iter()
        .filter(|r| r.spill_stores > 0 || r.spill_loads > 0)
        .map(|r| {
            format!(
                "  kernel {} ({}.cu) on {}: {} bytes spill stores, {} bytes spill loads, {} registers",
                r.kernel, r.file, r.arch, r.spill_stores, r.spill_loads, r.registers
            )
        })
        .collect();
    if !spills.is_empty() {
        return Err(CompileError::Source(format!(
            "register spills (local-memory traffic in a hot loop) are not allowed; reduce live values or add \
             __launch_bounds__:\n{}",
            spills.join("\n")
        )));
    }

    let archs_str = archs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let mut table = format!(
        "# ptxas resource usage per kernel and architecture ({version}; archs {archs_str})\n\
         # file kernel arch registers smem_bytes stack_bytes spill_stores spill_loads\n"
    );
    for r in &resources {
        let _ = writeln!(
            table,
            "{} {} {} {} {} {} {} {}",
            r.file, r.kernel, r.arch, r.registers, r.smem, r.stack, r.spill_stores, r.spill_loads
        );
    }
    let res_path = out_dir.join("kernels_resources.txt");
    fs::write(&res_path, &table)
        .map_err(|e| CompileError::Source(format!("cannot write {}: {e}", res_path.display())))?;

    let mut code = String::from("// Generated by build.rs: the CUDA kernel images embedded in this binary.\n");
    code.push_str(
        "/// Whether the GPU kernels were compiled into this binary.\npub const KERNELS_BUILT: bool = true;\n",
    );
    code.push_str(
        "/// Why the kernels are absent (empty when they are built).\npub const KERNELS_ABSENT_REASON: &str = \"\";\n",
    );
    let _ = writeln!(code, "/// The nvcc that compiled them.\npub const NVCC_VERSION: &str = {version:?};");
    let _ = writeln!(
        code,
        "/// Compute capabilities with SASS in each image (PTX for the newest).\npub const ARCHS: &[u32] = &{archs:?};"
    );
    let _ = writeln!(
        code,
        "/// ptxas's per-kernel report.\npub const RESOURCES: &str = include_str!({:?});",
        res_path.display().to_string()
    );
    code.push_str("/// (family name, fatbin image) for each kernels/*.cu.\npub const IMAGES: &[(&str, &[u8])] = &[\n");
    for src in sources {
        let stem = file_stem(src);
        let path = out_dir.join(format!("{stem}.fatbin"));
        let _ = writeln!(code, "    ({stem:?}, include_bytes!({:?})),", path.display().to_string());
    }
    code.push_str("];\n");
    write_generated(out_dir, &code);
    println!("cargo:rustc-cfg=derma_kernels");
    Ok(())
}

fn file_stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn compile_one(nvcc: &Path, src: &Path, archs: &[u32], out_dir: &Path) -> Result<String, CompileError> {
    let stem = file_stem(src);
    let out = out_dir.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-v", "-Ikernels", "-o"]).arg(&out);
    let newest = archs.iter().copied().max().unwrap_or(80);
    for a in archs {
        if *a == newest {
            cmd.arg(format!("-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]"));
        } else {
            cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
        }
    }
    cmd.arg(src);
    let o = cmd.output().map_err(|e| CompileError::Toolchain(format!("cannot run nvcc: {e}")))?;
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    if !o.status.success() {
        let text = format!("{stdout}{stderr}");
        // Diagnostics that point into a kernel file are ours to fix; anything else is the toolchain.
        if text.contains(".cu(") || text.contains(".cuh(") || text.contains(".cu:") || text.contains(".cuh:") {
            return Err(CompileError::Source(format!("nvcc failed on {}:\n{text}", src.display())));
        }
        return Err(CompileError::Toolchain(format!("nvcc failed on {}:\n{text}", src.display())));
    }
    Ok(format!("{stdout}{stderr}"))
}

/// Parses ptxas `-v` output: an "entry function 'k' for 'sm_XX'" line, then the stack/spill and registers lines.
fn parse_ptxas(file: &str, report: &str) -> Vec<Resource> {
    let mut out: Vec<Resource> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or("").to_string();
            let arch = parts.nth(1).unwrap_or("").to_string();
            out.push(Resource {
                file: file.to_string(),
                kernel,
                arch,
                registers: 0,
                smem: 0,
                stack: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(r) = out.last_mut() {
            if line.contains("spill stores") {
                r.stack = number_before(line, "bytes stack frame");
                r.spill_stores = number_before(line, "bytes spill stores");
                r.spill_loads = number_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = number_before(line, "registers");
                r.smem = number_before(line, "bytes smem");
            }
        }
    }
    out
}

/// The integer just before `label` in `line` (0 when absent).
fn number_before(line: &str, label: &str) -> u32 {
    line.split(label)
        .next()
        .filter(|head| head.len() < line.len())
        .and_then(|head| head.split(|c: char| !c.is_ascii_digit()).rfind(|t| !t.is_empty()))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

fn write_absent(out_dir: &Path, reason: &str) {
    let mut code = String::from("// Generated by build.rs: no CUDA kernels in this binary.\n");
    code.push_str(
        "/// Whether the GPU kernels were compiled into this binary.\npub const KERNELS_BUILT: bool = false;\n",
    );
    let _ = writeln!(code, "/// Why the kernels are absent.\npub const KERNELS_ABSENT_REASON: &str = {reason:?};");
    code.push_str("/// The nvcc that compiled them.\npub const NVCC_VERSION: &str = \"\";\n");
    code.push_str("/// Compute capabilities with SASS in each image.\npub const ARCHS: &[u32] = &[];\n");
    code.push_str("/// ptxas's per-kernel report.\npub const RESOURCES: &str = \"\";\n");
    code.push_str(
        "/// (family name, fatbin image) for each kernels/*.cu.\npub const IMAGES: &[(&str, &[u8])] = &[];\n",
    );
    write_generated(out_dir, &code);
}

fn write_generated(out_dir: &Path, text: &str) {
    let path = out_dir.join("kernels.rs");
    if let Err(e) = fs::write(&path, text) {
        fail(&format!("cannot write {}: {e}", path.display()));
    }
}
