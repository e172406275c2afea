#!/usr/bin/env bash
# GPU check in two halves, because the machine that builds derma has no GPU and the GPU machine may have no Rust:
#
#   scripts/gpu-check.sh prepare [DIR]   (build machine) release build, strip, gather the derma binary, the CUDA
#                                        test binaries, benches and scripts into DIR (default: carry/gpu, git-ignored)
#   DIR/scripts/gpu-check.sh run OUTDIR  (GPU machine) find the CUDA libraries, print GPU and driver, run
#                                        `derma check --device cuda --json`, `derma gpu-info`, the CUDA tests, the
#                                        benches and the PyTorch comparison if present; write OUTDIR/report.md plus
#                                        one raw log per step
#
# `run` never stops at the first failure: every step is recorded with its exit status, and the script exits
# non-zero when any step failed.
set -uo pipefail

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

MAX_BYTES=$((64 * 1024 * 1024))

prepare() {
    local dir="${1:-carry/gpu}"
    local root
    root="$(cd "$(dirname "$0")/.." && pwd)"
    cd "$root" || exit 1
    command -v cargo >/dev/null || { echo "prepare needs cargo (run it on the build machine)" >&2; exit 1; }
    rm -rf "$dir"
    mkdir -p "$dir/bin" "$dir/tests" "$dir/benches" "$dir/scripts"

    echo "== cargo build --release (kernels must be built: DERMA_REQUIRE_NVCC=1)"
    DERMA_REQUIRE_NVCC=1 cargo build --release --bin derma || exit 1
    cp target/release/derma "$dir/bin/derma"

    echo "== CUDA test binaries"
    local tests=()
    for t in tests/cuda_*.rs; do
        [ -e "$t" ] && tests+=(--test "$(basename "$t" .rs)")
    done
    if [ ${#tests[@]} -gt 0 ]; then
        DERMA_REQUIRE_NVCC=1 cargo test --release --no-run --message-format=json "${tests[@]}" >"$dir/.cargo-tests.json" || exit 1
        python3 - "$dir" <<'PY' || exit 1
import json, shutil, sys, os
out = sys.argv[1]
for line in open(os.path.join(out, ".cargo-tests.json")):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], os.path.join(out, "tests", m["target"]["name"]))
        print("  ", m["target"]["name"])
PY
        rm -f "$dir/.cargo-tests.json"
    fi

    echo "== benches (if any)"
    if ls benches/*.rs >/dev/null 2>&1; then
        DERMA_REQUIRE_NVCC=1 cargo bench --no-run --message-format=json >"$dir/.cargo-benches.json" 2>/dev/null || echo "  (bench build failed; continuing without benches)"
        python3 - "$dir" <<'PY'
import json, shutil, sys, os
out = sys.argv[1]
path = os.path.join(out, ".cargo-benches.json")
for line in open(path) if os.path.exists(path) else []:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bench"]:
        shutil.copy(m["executable"], os.path.join(out, "benches", m["target"]["name"]))
        print("  ", m["target"]["name"])
PY
        rm -f "$dir/.cargo-benches.json"
    fi

    cp scripts/gpu-check.sh "$dir/scripts/"
    for s in scripts/*.py; do [ -e "$s" ] && cp "$s" "$dir/scripts/"; done
    if command -v strip >/dev/null; then
        strip "$dir"/bin/* "$dir"/tests/* "$dir"/benches/* 2>/dev/null || true
    fi
    {
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
        echo "rustc: $(rustc --version)"
    } >"$dir/MANIFEST"
    local size
    size=$(du -sb "$dir" | cut -f1)
    echo "== $dir: $((size / 1024 / 1024)) MiB"
    if [ "$size" -gt "$MAX_BYTES" ]; then
        echo "error: $dir is larger than 64 MiB; it cannot travel to the GPU machine" >&2
        exit 1
    fi
    echo "on the GPU machine: $dir/scripts/gpu-check.sh run OUTDIR"
}

# Folders that hold CUDA libraries: CUDA installs, then the nvidia/*/lib folders of python3's site-packages (where
# PyTorch's wheels keep cuBLAS and cuDNN).
cuda_lib_path() {
    local p=""
    for d in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib; do
        [ -d "$d" ] && p="$p:$d"
    done
    if command -v python3 >/dev/null; then
        local sp
        for sp in $(python3 -c 'import site,sys; print(" ".join(site.getsitepackages()+[site.getusersitepackages()]))' 2>/dev/null); do
            for d in "$sp"/nvidia/*/lib; do
                [ -d "$d" ] && p="$p:$d"
            done
        done
    fi
    echo "${p#:}"
}

run() {
    local out="${1:?usage: gpu-check.sh run OUTDIR}"
    local here
    here="$(cd "$(dirname "$0")/.." && pwd)"
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    local libs
    libs="$(cuda_lib_path)"
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    local report="$out/report.md"
    local failed=0
    local derma="$here/bin/derma"
    [ -x "$derma" ] || derma="$here/target/release/derma"

    {
        echo "# derma GPU check"
        echo
        echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "- host: $(uname -srm), $(nproc) cores"
        [ -f "$here/MANIFEST" ] && sed 's/^/- /' "$here/MANIFEST"
        echo "- LD_LIBRARY_PATH: \`$LD_LIBRARY_PATH\`"
        echo
        echo "| step | exit | log |"
        echo "|---|---|---|"
    } >"$report"

    # step NAME LOGFILE CMD...: runs CMD with output to LOGFILE, records the exit status in the report.
    step() {
        local name="$1" log="$2"
        shift 2
        echo "== $name"
        local t0=$SECONDS
        "$@" >"$out/$log" 2>&1
        local rc=$?
        local extra=""
        if grep -q "SKIPPED" "$out/$log" 2>/dev/null; then
            extra=" ($(grep -c SKIPPED "$out/$log") skipped)"
        fi
        echo "| $name | $rc$extra | [$log]($log) ($((SECONDS - t0)) s) |" >>"$report"
        [ "$rc" -ne 0 ] && failed=1
        tail -n 5 "$out/$log"
        return 0
    }

    if command -v nvidia-smi >/dev/null; then
        step "nvidia-smi" nvidia-smi.txt nvidia-smi
    else
        echo "| nvidia-smi | not found | |" >>"$report"
    fi
    step "derma gpu-info --json --resources" gpu-info.txt "$derma" gpu-info --json --resources
    step "derma check --device cuda --json" check.json "$derma" check --device cuda --json
    step "copy bandwidth (derma gpu-info --bandwidth)" bandwidth.txt "$derma" gpu-info --bandwidth
    for t in "$here"/tests/*; do
        [ -x "$t" ] || continue
        step "test $(basename "$t")" "test-$(basename "$t").log" "$t" --nocapture --test-threads=1
    done
    for b in "$here"/benches/*; do
        [ -x "$b" ] || continue
        step "bench $(basename "$b")" "bench-$(basename "$b").log" "$b" --bench
    done
    if command -v python3 >/dev/null && python3 -c "import torch" 2>/dev/null; then
        for s in "$here"/scripts/bench_pytorch.py; do
            [ -f "$s" ] && step "PyTorch $(basename "$s")" "pytorch-$(basename "$s" .py).log" python3 "$s"
        done
    else
        echo "| PyTorch comparison | skipped: no torch in python3 | |" >>"$report"
    fi

    {
        echo
        echo "## GPU"
        echo '```'
        if [ -f "$out/nvidia-smi.txt" ]; then head -n 20 "$out/nvidia-smi.txt"; else echo "(nvidia-smi not found)"; fi
        echo '```'
        echo
        echo "## Copy bandwidth"
        echo '```'
        cat "$out/bandwidth.txt"
        echo '```'
        for l in "$out"/test-*.log; do
            [ -f "$l" ] || continue
            echo
            echo "## $(basename "$l")"
            echo '```'
            grep -E "^test |test result|SKIPPED|worst abs error|panicked" "$l" | head -n 80
            echo '```'
        done
    } >>"$report"
    echo "report: $report"
    return $failed
}

case "${1:-}" in
prepare) shift; prepare "$@" ;;
run) shift; run "$@" ;;
*) usage ;;
esac
