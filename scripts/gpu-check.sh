#!/usr/bin/env bash
# GPU check in two halves, because the machine that builds derma has no GPU and the GPU machine may have no Rust:
#
#   scripts/gpu-check.sh prepare DIR        (build machine) release build, strip, gather the derma binary, the
#                                           CUDA test binaries, the CUDA bench and the scripts into DIR
#   DIR/scripts/gpu-check.sh run OUTDIR     (GPU machine) find the CUDA libraries, print GPU and driver, run
#                                           `derma check --device cuda --json`, `derma gpu-info`, copy bandwidth,
#                                           `derma bench data` (augmentation kernel, resident and streamed
#                                           batches), the CUDA tests, the CUDA kernel bench (short criterion timing) and the
#                                           training benchmark against PyTorch (scripts/bench_pytorch.py: one
#                                           JSON record in OUTDIR/pytorch-bench/); write OUTDIR/report.md plus one
#                                           raw log per step
#   DIR/scripts/gpu-check.sh dry-run OUTDIR (any machine, CI) the same steps on the emulated device (--device emu):
#                                           proves the script, the binaries and the check run before GPU time is
#                                           spent on them
#
# The whole run is budgeted to 8 minutes: each step has a time limit (timeout(1)) and a step that would start
# past the budget is not started and counts as failed. A step never stops the others: every step is recorded with
# its exit status, every skip is printed and written to the report with its reason, and the script exits
# non-zero when any step failed (or, on a GPU run, skipped). check.json and bench-data.json are always valid JSON:
# derma's stdout only (its stderr goes to check.stderr.log, bench-data.stderr.log), or an error object when derma
# printed none.
set -uo pipefail

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

MAX_BYTES=$((64 * 1024 * 1024))
BUDGET_S=480
# Short criterion timing: about 0.7 s per benchmark, ~40 benchmarks.
BENCH_FLAGS=(--warm-up-time 0.2 --measurement-time 0.5)
PYTORCH_SCRIPT=bench_torch_cpu.py
# The training benchmark against PyTorch on the GPU gets what is left of the budget, at most 270 s and at least
# 120 s (the steps before it take about 160 s on a GPU, but their limits add up to 465 s: when they run long it is
# not started). Its --budget-s, 15 s under its limit, is shared between its parts, each also capped: derma's step
# bench, 10 + 40 eager steps at batch 256, the epoch on both sides over 2048 synthetic 600x450 images, then
# torch.compile with the rest (about 100 s when the budget is whole). On the GPU it replaces bench_torch_cpu.py,
# which has no derma partner there; the dry run keeps both.
TRAIN_BENCH_SCRIPT=bench_pytorch.py
TRAIN_BENCH_MAX_S=270
TRAIN_BENCH_MIN_S=120
TRAIN_BENCH_FLAGS=(--batch 256 --size 224 --steps 40 --warmup 10)

prepare() {
    local dir="${1:?usage: gpu-check.sh prepare DIR}"
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
    if [ ${#tests[@]} -eq 0 ]; then
        echo "error: no tests/cuda_*.rs found" >&2
        exit 1
    fi
    DERMA_REQUIRE_NVCC=1 cargo test --release --no-run --message-format=json "${tests[@]}" >"$dir/.cargo-tests.json" || exit 1
    copy_artifacts "$dir/.cargo-tests.json" test "$dir/tests" || exit 1

    echo "== CUDA bench binary (cuda_kernels)"
    DERMA_REQUIRE_NVCC=1 cargo bench --no-run --bench cuda_kernels --message-format=json >"$dir/.cargo-benches.json" || exit 1
    copy_artifacts "$dir/.cargo-benches.json" bench "$dir/benches" || exit 1

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
    echo "on the GPU machine: $dir/scripts/gpu-check.sh run OUTDIR (or dry-run OUTDIR anywhere)"
}

# copy_artifacts JSON KIND DEST: copies the executables of cargo's JSON messages of target kind KIND into DEST.
copy_artifacts() {
    python3 - "$1" "$2" "$3" <<'PY'
import json, os, shutil, sys
path, kind, dest = sys.argv[1:4]
copied = 0
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == [kind]:
        shutil.copy(m["executable"], os.path.join(dest, m["target"]["name"]))
        print("  ", m["target"]["name"])
        copied += 1
os.remove(path)
if copied == 0:
    sys.exit(f"error: cargo built no {kind} executables")
PY
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

# run_all MODE OUTDIR: MODE is "run" (a CUDA GPU) or "dry-run" (the emulated device).
run_all() {
    local mode="$1" out="${2:?usage: gpu-check.sh run|dry-run OUTDIR}"
    local here
    here="$(cd "$(dirname "$0")/.." && pwd)"
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    local device=cuda
    [ "$mode" = dry-run ] && device=emu
    if [ "$mode" = run ]; then
        local libs
        libs="$(cuda_lib_path)"
        export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    local report="$out/report.md"
    local failed=0
    local t_start=$SECONDS
    local derma="$here/bin/derma"
    [ -x "$derma" ] || derma="$here/target/release/derma"

    {
        echo "# derma GPU check ($mode, --device $device)"
        echo
        echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "- host: $(uname -srm), $(nproc) cores"
        [ -f "$here/MANIFEST" ] && sed 's/^/- /' "$here/MANIFEST"
        echo "- LD_LIBRARY_PATH: \`${LD_LIBRARY_PATH:-}\`"
        echo "- budget: ${BUDGET_S} s in all, a time limit per step"
        echo
        echo "| step | exit | time | log |"
        echo "|---|---|---|---|"
    } >"$report"

    # skip NAME REASON [fatal]: a loud skip, in the report and on stdout; "fatal" also fails the run.
    skip() {
        echo "SKIPPED: $1: $2"
        echo "| $1 | SKIPPED: $2 | | |" >>"$report"
        [ "${3:-}" = fatal ] && failed=1
        return 0
    }

    # step NAME LOG LIMIT_S CMD...: runs CMD under a time limit with stdout and stderr to LOG (stdout only, with
    # stderr to LOG's .stderr.log, when LOG ends in .json), records exit status and time in the report.
    step() {
        local name="$1" log="$2" limit="$3"
        shift 3
        local used=$((SECONDS - t_start))
        if [ $((used + limit)) -gt "$BUDGET_S" ]; then
            skip "$name" "not started: ${used} s used, its ${limit} s limit would pass the ${BUDGET_S} s budget" fatal
            return 0
        fi
        echo "== $name (limit ${limit} s)"
        local t0=$SECONDS rc
        if [[ "$log" == *.json ]]; then
            timeout --kill-after=5 "$limit" "$@" >"$out/$log" 2>"$out/${log%.json}.stderr.log"
            rc=$?
        else
            timeout --kill-after=5 "$limit" "$@" >"$out/$log" 2>&1
            rc=$?
        fi
        local note=""
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (time limit)"
        local skipped
        skipped=$(grep -c "SKIPPED" "$out/$log" 2>/dev/null)
        if [ "${skipped:-0}" -gt 0 ]; then
            note="$note ($skipped SKIPPED lines)"
            grep "SKIPPED" "$out/$log" | head -n 5 | sed 's/^/  /'
            # On a GPU nothing may skip; on the emulated device the GPU-only bench does, loudly.
            [ "$mode" = run ] && failed=1
        fi
        echo "| $name | $rc$note | $((SECONDS - t0)) s | [$log]($log) |" >>"$report"
        [ "$rc" -ne 0 ] && failed=1
        tail -n 5 "$out/$log"
        return 0
    }

    # valid_json FILE: rewrites FILE as an error object when it does not hold one JSON document.
    valid_json() {
        local f="$1" stem="${1%.json}"
        if command -v python3 >/dev/null; then
            python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$f" 2>/dev/null && return 0
        elif [ "$(head -c 1 "$f" 2>/dev/null)" = "{" ] && [ "$(tail -c 2 "$f" | head -c 1)" = "}" ]; then
            return 0
        fi
        mv "$f" "$stem.stdout.txt"
        printf '{"error": "derma printed no valid JSON", "stdout_log": "%s", "stderr_log": "%s"}\n' \
            "$(basename "$stem").stdout.txt" "$(basename "$stem").stderr.log" >"$f"
        echo "| ($(basename "$f")) | invalid JSON replaced by an error object | | [stdout]($(basename "$stem").stdout.txt) |" >>"$report"
        failed=1
    }

    if [ "$mode" = dry-run ]; then
        skip "nvidia-smi" "dry run on the emulated device"
    elif command -v nvidia-smi >/dev/null; then
        step "nvidia-smi" nvidia-smi.txt 15 nvidia-smi
    else
        skip "nvidia-smi" "not found" fatal
    fi
    step "derma gpu-info --json --resources" gpu-info.txt 30 "$derma" gpu-info --json --resources
    step "derma check --device $device --json" check.json 150 "$derma" check --device "$device" --json
    valid_json "$out/check.json"
    step "copy bandwidth (derma gpu-info --bandwidth --device $device)" bandwidth.txt 30 \
        "$derma" gpu-info --bandwidth --device "$device" --mib 64
    # The fused augmentation kernel's images/s (target: an ISIC epoch of 25,331 images in well under a second) and
    # the training loader's batches resident and streamed from the host, side by side.
    step "derma bench data --device $device --json" bench-data.json 30 "$derma" bench data --device "$device" --json
    valid_json "$out/bench-data.json"
    local n_tests=0
    for t in "$here"/tests/*; do
        [ -x "$t" ] || continue
        n_tests=$((n_tests + 1))
        step "test $(basename "$t")" "test-$(basename "$t").log" 60 "$t" --nocapture --test-threads=1
    done
    [ "$n_tests" -eq 0 ] && skip "CUDA tests" "no test binaries in $here/tests (run prepare first)" fatal
    if [ -x "$here/benches/cuda_kernels" ]; then
        step "bench cuda_kernels (criterion ${BENCH_FLAGS[*]})" bench-cuda_kernels.log 90 \
            "$here/benches/cuda_kernels" --bench "${BENCH_FLAGS[@]}"
    else
        skip "bench cuda_kernels" "no bench binary at $here/benches/cuda_kernels (run prepare first)" fatal
    fi
    local torch_ok=0
    command -v python3 >/dev/null && python3 -c "import torch, torchvision" 2>/dev/null && torch_ok=1
    # The training benchmark against PyTorch (the seed's model and pipeline; see bench_pytorch.py). On a GPU a
    # missing torch fails the run, as any skip there does; the dry run (CI has no torch) skips it loudly, and
    # where torch is installed runs its CPU check with derma's side on the CPU, compile left out.
    if [ ! -f "$here/scripts/$TRAIN_BENCH_SCRIPT" ]; then
        skip "PyTorch $TRAIN_BENCH_SCRIPT" "the script is missing from $here/scripts" fatal
    elif [ "$torch_ok" -eq 0 ]; then
        skip "PyTorch $TRAIN_BENCH_SCRIPT" "python3 with torch and torchvision not found" \
            "$([ "$mode" = run ] && echo fatal)"
    elif [ "$mode" = run ]; then
        local limit=$((BUDGET_S - (SECONDS - t_start)))
        [ "$limit" -gt "$TRAIN_BENCH_MAX_S" ] && limit=$TRAIN_BENCH_MAX_S
        [ "$limit" -lt "$TRAIN_BENCH_MIN_S" ] && limit=$TRAIN_BENCH_MIN_S
        step "PyTorch training bench ($TRAIN_BENCH_SCRIPT --device cuda ${TRAIN_BENCH_FLAGS[*]})" \
            pytorch-bench.log "$limit" python3 "$here/scripts/$TRAIN_BENCH_SCRIPT" "$out/pytorch-bench" \
            --device cuda --derma "$derma" --strict --budget-s $((limit - 15)) "${TRAIN_BENCH_FLAGS[@]}"
    else
        step "PyTorch training bench ($TRAIN_BENCH_SCRIPT --quick, CPU)" pytorch-bench.log 240 \
            python3 "$here/scripts/$TRAIN_BENCH_SCRIPT" "$out/pytorch-bench" --quick --derma "$derma" \
            --skip compile --budget-s 225
    fi
    if [ "$mode" = run ]; then
        :
    elif [ ! -f "$here/scripts/$PYTORCH_SCRIPT" ]; then
        skip "PyTorch $PYTORCH_SCRIPT" "the script is missing from $here/scripts" fatal
    elif [ "$torch_ok" -eq 0 ]; then
        skip "PyTorch $PYTORCH_SCRIPT" "python3 with torch and torchvision not found"
    else
        step "PyTorch $PYTORCH_SCRIPT --steps 2 --json" "pytorch-${PYTORCH_SCRIPT%.py}.log" 45 \
            python3 "$here/scripts/$PYTORCH_SCRIPT" --steps 2 --json
    fi

    {
        echo
        echo "total: $((SECONDS - t_start)) s of the ${BUDGET_S} s budget; result: $([ $failed -eq 0 ] && echo ok || echo FAILED)"
        echo
        echo "## GPU"
        echo '```'
        if [ -f "$out/nvidia-smi.txt" ]; then head -n 20 "$out/nvidia-smi.txt"; else echo "(no nvidia-smi output)"; fi
        echo '```'
        echo
        echo "## Copy bandwidth"
        echo '```'
        cat "$out/bandwidth.txt" 2>/dev/null || echo "(not run)"
        echo '```'
        echo
        echo "## Data path (bench-data.json)"
        echo '```'
        if [ -f "$out/bench-data.json" ] && command -v python3 >/dev/null; then
            python3 -c 'import json,sys
r = json.load(open(sys.argv[1]))
keys = ["device", "batch", "size", "out", "dtype", "images_per_s", "isic_epoch_s", "kernel_gb_per_s",
        "fraction_of_copy_bandwidth", "loader_resident_images_per_s", "loader_streamed_images_per_s",
        "streamed_over_resident", "error"]
for k in keys:
    if k in r: print(f"{k}: {r[k]}")' "$out/bench-data.json" 2>&1
        else
            cat "$out/bench-data.json" 2>/dev/null || echo "(not run)"
        fi
        echo '```'
        echo
        echo "## PyTorch training benchmark (pytorch-bench/pytorch-bench.json)"
        echo '```'
        if [ -f "$out/pytorch-bench.log" ]; then
            sed -n '/^PyTorch .* against derma/,$p' "$out/pytorch-bench.log" | head -n 20
        else
            echo "(not run)"
        fi
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
    echo "report: $report ($((SECONDS - t_start)) s)"
    return $failed
}

case "${1:-}" in
prepare) shift; prepare "$@" ;;
run) shift; run_all run "$@" ;;
dry-run) shift; run_all dry-run "$@" ;;
*) usage ;;
esac
