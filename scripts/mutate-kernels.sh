#!/usr/bin/env bash
# Mutation score of the kernel checks: injects realistic bugs into copies of kernels/*.cu, rebuilds the emulated
# kernel library for each (a shared object loaded through DERMA_EMU_LIB, so the crate is not rebuilt), runs
# `derma check --device emu --json` on it under two thread schedules and in both flavours (plain and
# ASan/UBSan), and writes a report of which mutants were caught and by what.
#
# Usage: scripts/mutate-kernels.sh OUT [MUTANT_ID...]
#   OUT        folder for the report (OUT/mutation.md, OUT/mutation.json) and the per-mutant logs
#   MUTANT_ID  run only these mutants (default: all)
# Environment: DERMA_MUTATE_SEED (the check's seed, default 12), DERMA_MUTATE_FLAVOURS ("plain asan" by default).
#
# Needs: cargo, python3, the host C++ compiler the crate's build uses (g++ 12+), and GCC's libasan for the ASan
# flavour. About a minute per mutant on 2 cores.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT [MUTANT_ID...]" >&2
    exit 2
fi
OUT=$1
shift
ONLY=("$@")
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SEED=${DERMA_MUTATE_SEED:-12}
FLAVOURS=${DERMA_MUTATE_FLAVOURS:-plain asan}
# Two schedules: forward order and warp-reverse order (threads), with blocks reversed in the second.
SCHEDULES=(forward warp-reverse)

echo "building derma (release) ..." >&2
cargo build --release --quiet
DERMA="$ROOT/target/release/derma"
MANIFEST=$(ls -t target/release/build/derma-*/out/emu/manifest.txt 2>/dev/null | head -1)
if [ -z "$MANIFEST" ]; then
    echo "error: no emulated-library manifest under target/release/build (did build.rs run?)" >&2
    exit 1
fi
CXX=$(awk '$1 == "compiler" { print $2 }' "$MANIFEST")
mapfile -t BASE_FLAGS < <(awk '$1 == "flag" { print $2 }' "$MANIFEST")
RUNTIME=$(awk '$1 == "runtime" { print $2 }' "$MANIFEST")
TABLE=$(awk '$1 == "table" { print $2 }' "$MANIFEST")
# wrapper lines: "wrapper GENERATED.cpp KERNEL_FILE"
declare -A WRAPPER_OF KERNEL_OF
while read -r _ gen src; do
    WRAPPER_OF[$(basename "$src")]=$gen
    KERNEL_OF[$gen]=$(basename "$src")
done < <(awk '$1 == "wrapper" && $3 !~ /kernels\/emu\/tests\//' "$MANIFEST")
# Every generated wrapper, the runtime's own test kernels included (the entry table names them all).
mapfile -t ALL_WRAPPERS < <(awk '$1 == "wrapper" { print $2 }' "$MANIFEST")
ASAN_LIB=$("$CXX" -print-file-name=libasan.so)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

flavour_flags() {
    if [ "$1" = asan ]; then
        echo "-O1 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -DDERMA_EMU_ASAN=1"
    else
        echo "-O2"
    fi
}

# compile FLAVOUR SRC OBJ KERNEL_DIR
compile() {
    # shellcheck disable=SC2046
    "$CXX" $(flavour_flags "$1") -fPIC "${BASE_FLAGS[@]}" -I "$4" -I kernels/emu -I kernels -I kernels/emu/tests \
        -c "$2" -o "$3"
}

# Objects of the unmutated library, per flavour: a mutant recompiles only the wrappers of the files it changes.
build_baseline() {
    local fl=$1 dir=$WORK/base-$1
    mkdir -p "$dir"
    local pids=() src
    for src in "$RUNTIME" "$TABLE" "${ALL_WRAPPERS[@]}"; do
        compile "$fl" "$src" "$dir/$(basename "$src").o" "$ROOT/kernels" &
        pids+=($!)
    done
    local p
    for p in "${pids[@]}"; do wait "$p"; done
}

# regen_wrapper WRAPPER KERNEL_FILE KERNEL_DIR OUT: the generated wrapper with each kernel's launch bound read
# again from the (mutated) kernel file, as build.rs reads it: a mutant may change a __launch_bounds__.
regen_wrapper() {
    "$CXX" -E -P -x c++ -DDERMA_EMU_SCAN=1 "${BASE_FLAGS[@]}" -I "$3" -I kernels/emu -I kernels "$2" >"$4.scan"
    python3 - "$1" "$4.scan" "$4" <<'PY'
import re, sys
wrapper, scan, out_path = sys.argv[1:4]
text = open(scan).read()
bounds = {}
for m in re.finditer(r'extern\s+"C"\s+derma_emu_global_mark\s+void\s+'
                     r'(?:derma_emu_launch_bounds_mark\s*\(\s*([^,)]*)[^)]*\)\s*)?(\w+)\s*\(', text):
    bounds[m.group(2)] = (m.group(1) or "1024").strip()
out = []
for line in open(wrapper):
    m = re.match(r'(\s*\{"(\w+)",.*\(int\)\()(.*)(\)\},\s*)$', line)
    if m and m.group(2) in bounds:
        line = m.group(1) + bounds[m.group(2)] + m.group(4)
    out.append(line)
open(out_path, "w").write("".join(out))
PY
}

# build_mutant FLAVOUR KERNEL_DIR CHANGED_FILE SO
build_mutant() {
    local fl=$1 kdir=$2 changed=$3 so=$4 dir
    dir=$(dirname "$so")/obj-$fl
    mkdir -p "$dir"
    cp "$WORK/base-$fl"/*.o "$dir/"
    local targets=()
    if [ "$changed" = common.cuh ]; then
        targets=("${WRAPPER_OF[@]}")
    elif [ -n "$changed" ]; then
        targets=("${WRAPPER_OF[$changed]}")
    fi
    local pids=() src
    for src in "${targets[@]}"; do
        regen_wrapper "$src" "$kdir/${KERNEL_OF[$src]}" "$kdir" "$dir/$(basename "$src")"
        compile "$fl" "$dir/$(basename "$src")" "$dir/$(basename "$src").o" "$kdir" &
        pids+=($!)
    done
    local p status=0
    for p in "${pids[@]}"; do wait "$p" || status=1; done
    [ $status -eq 0 ] || return 1
    local link=()
    [ "$fl" = asan ] && link=(-fsanitize=address,undefined)
    "$CXX" -shared "${link[@]}" -o "$so" "$dir"/*.o
}

# run_check FLAVOUR SO SCHEDULE FAMILIES JSON LOG -> exit status of derma check
run_check() {
    local fl=$1 so=$2 sched=$3 fam=$4 json=$5 log=$6
    local env=(DERMA_EMU_LIB="$so")
    [ "$fl" = asan ] && env+=(LD_PRELOAD="$ASAN_LIB" ASAN_OPTIONS=detect_leaks=0:abort_on_error=0)
    set +e
    local families=()
    [ "$fam" != all ] && families=(--family "$fam")
    env "${env[@]}" timeout 600 "$DERMA" check --device emu --json --seed "$SEED" --schedule "$sched" \
        "${families[@]}" >"$json" 2>"$log"
    local rc=$?
    set -e
    return $rc
}

# id|file|family|description|old text|new text|occurrence (1-based)
# Old and new are Python string literals, so \n and quotes are exact.
MUTANTS=$(cat <<'EOF'
M01|common.cuh|loss,batchnorm|block_sum: barrier between the per-warp partial store and its read removed|"scratch[warp] = v;\n    __syncthreads();\n    v = lane < nwarps ? scratch[lane] : 0.0f;"|"scratch[warp] = v;\n    v = lane < nwarps ? scratch[lane] : 0.0f;"|1
M02|common.cuh|loss|block_sum: barrier before the scratch store removed (a second call overwrites what other warps still read)|"v = warp_sum(v);\n    __syncthreads();"|"v = warp_sum(v);"|1
M03|common.cuh|loss|warp_sum: xor butterfly starts at offset 8 instead of 16 (half-warp sums)|"for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync"|"for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync"|1
M04|common.cuh|loss|warp_sum: __shfl_down_sync instead of __shfl_xor_sync (only lane 0 gets the total)|"v += __shfl_xor_sync(0xffffffffu, v, o);"|"v += __shfl_down_sync(0xffffffffu, v, o);"|1
M05|batchnorm.cu|batchnorm|bn_stats_partial: barrier between the shared partials and their reduction removed|"red[threadIdx.y][threadIdx.x] = make_float2(s1, s2);\n    __syncthreads();"|"red[threadIdx.y][threadIdx.x] = make_float2(s1, s2);"|1
M06|batchnorm.cu|batchnorm|bn_stats_finalize: channel bound off by one (c > C instead of c >= C)|"if (c >= p.c) return;"|"if (c > p.c) return;"|1
M07|batchnorm.cu|batchnorm|bn_backward_partial: row stride ignores rows_split (gridDim.y), rows counted rows_split times|"r < p.m; r += (int64_t)gridDim.y * 8) {\n            const int64_t i"|"r < p.m; r += 8) {\n            const int64_t i"|1
M08|batchnorm.cu|batchnorm|bn_forward: gamma and beta swapped in the affine (vector path)|"float z = gamma[c] * (to_f(vx.v[k]) - mean[c]) * invstd[c] + beta[c];"|"float z = beta[c] * (to_f(vx.v[k]) - mean[c]) * invstd[c] + gamma[c];"|1
M09|elementwise.cu|elementwise|map1: vector count rounded up (the last vector reads and writes past n)|"const int64_t nv = n / N;"|"const int64_t nv = (n + N - 1) / N;"|1
M10|elementwise.cu|elementwise|map2: alignment guard forgets the second input (misaligned 16-byte loads)|"if (aligned16(y) && aligned16(a) && aligned16(b)) {"|"if (aligned16(y) && aligned16(a)) {"|1
M11|elementwise.cu|elementwise|map1: scalar tail stops one element early|"for (int64_t i = done + i0; i < n; i += stride) y[i] = from_f<T>(f(to_f(a[i])));"|"for (int64_t i = done + i0; i < n - 1; i += stride) y[i] = from_f<T>(f(to_f(a[i])));"|1
M12|depthwise.cu|depthwise|dw_forward: filter taps transposed (kw * k + kh)|"load_v<T, V>(wt + ((int64_t)kh * p.k + kw) * p.c + c, wv);"|"load_v<T, V>(wt + ((int64_t)kw * p.k + kh) * p.c + c, wv);"|1
M13|depthwise.cu|depthwise|dw_backward_data: output row bound off by one (ho > Ho)|"if (ho >= p.ho) continue;"|"if (ho > p.ho) continue;"|1
M14|depthwise.cu|depthwise|dw_backward_weight_partial: barrier before the shared reduction removed|"red[threadIdx.y][threadIdx.x] = acc;\n    __syncthreads();"|"red[threadIdx.y][threadIdx.x] = acc;"|1
M15|se.cu|se|se_pool: fp16 accumulator (T instead of float)|"float s = 0.f;\n    if (c < c_total) {\n        const T* xs"|"T s = 0.f;\n    if (c < c_total) {\n        const T* xs"|1
M16|se.cu|se|se_scale_backward: barrier before the shared reduction removed|"red[threadIdx.y][threadIdx.x] = acc;\n    __syncthreads();"|"red[threadIdx.y][threadIdx.x] = acc;"|1
M17|se.cu|se|se_scale: per-sample scale indexed without the sample offset (vector path)|"const T* sn = s + (i / plane) * c_total + c0;"|"const T* sn = s + c0;"|1
M18|dropout.cu|dropout|stochastic_depth: coin per element index modulo the sample size instead of per sample|"uniform01(seed, (uint64_t)(i / per_sample))"|"uniform01(seed, (uint64_t)(i % per_sample))"|1
M19|loss.cu|loss|softmax_loss: row loop bound off by one (i <= B reads a row past the batch)|"for (int i = threadIdx.x; i < p.b; i += blockDim.x) {\n        const T* z"|"for (int i = threadIdx.x; i <= p.b; i += blockDim.x) {\n        const T* z"|1
M20|optim.cu|optim|unscale: __all_sync instead of __any_sync (one inf in a warp goes unnoticed)|"__any_sync(0xffffffffu, bad)"|"__all_sync(0xffffffffu, bad)"|1
M21|optim.cu|optim|adamw: vector count rounded up (reads and writes past n)|"const int64_t nv = a.n / 4;"|"const int64_t nv = (a.n + 3) / 4;"|1
M22|se.cu|se|se_pool: __launch_bounds__ retuned to 128 threads while the launcher uses 256 (the GPU refuses the launch)|"__launch_bounds__(256, 4) se_pool_##SFX"|"__launch_bounds__(128, 4) se_pool_##SFX"|1
EOF
)

selected() {
    [ ${#ONLY[@]} -eq 0 ] && return 0
    local m
    for m in "${ONLY[@]}"; do [ "$m" = "$1" ] && return 0; done
    return 1
}

# apply_mutant KERNEL_DIR FILE OLD NEW OCCURRENCE: exits non-zero when OLD does not occur that often
apply_mutant() {
    python3 - "$@" <<'PY'
import ast, sys
kdir, name, old, new, nth = sys.argv[1], sys.argv[2], ast.literal_eval(sys.argv[3]), ast.literal_eval(sys.argv[4]), int(sys.argv[5])
path = f"{kdir}/{name}"
text = open(path).read()
pos = -1
for _ in range(nth):
    pos = text.find(old, pos + 1)
    if pos < 0:
        sys.exit(f"{name}: occurrence {nth} of {old!r} not found")
open(path, "w").write(text[:pos] + new + text[pos + len(old):])
PY
}

# judge JSON LOG BASELINE_JSON: prints "caught: WHAT" when the run shows something the unmutated kernels did
# not (a check row that failed, an error, a crash or a sanitizer report), else "not caught"
judge() {
    python3 - "$1" "$2" "$3" <<'PY'
import json, re, sys
js, log, base = sys.argv[1:4]
err = open(log, errors="replace").read()

def rows(doc):
    fails = set()
    for r in doc.get("results", []):
        if not r.get("pass", True):
            fails.add(" ".join(str(r.get(k)) for k in ("family", "op", "dtype", "shape") if r.get(k) is not None))
    return fails, set(e.splitlines()[0] if e else "" for e in doc.get("errors", []))

m = re.search(r"(AddressSanitizer: [\w-]+|runtime error: [^\n]{0,100})", err)
if m:
    who = re.search(r"made by kernel [^\n]+", err)
    print("caught: sanitizer: " + m.group(1) + (" (" + who.group(0) + ")" if who else ""))
    sys.exit()
try:
    doc = json.load(open(js))
except Exception:
    tail = err.strip().splitlines()[-1][:200] if err.strip() else "no output"
    print("caught: no report (crash or timeout): " + tail)
    sys.exit()
base_rows, base_errs = rows(json.load(open(base)))
got_rows, got_errs = rows(doc)
new_rows = sorted(got_rows - base_rows)
new_errs = sorted(e for e in got_errs if e not in base_errs)
parts = []
if new_rows:
    parts.append(f"{len(new_rows)} check(s) failed: " + "; ".join(new_rows[:3]) + (" ..." if len(new_rows) > 3 else ""))
if new_errs:
    parts.append("error: " + "; ".join(e[:200] for e in new_errs[:2]))
print("caught: " + " / ".join(parts) if parts else "not caught")
PY
}

# baseline_failures JSON: the rows and errors that fail without any mutant (listed in the report)
baseline_failures() {
    python3 - "$1" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
for r in doc.get("results", []):
    if not r.get("pass", True):
        print("row: " + " ".join(str(r.get(k)) for k in ("family", "op", "dtype", "shape") if r.get(k) is not None))
for e in doc.get("errors", []):
    print("error: " + (e.splitlines()[0] if e else ""))
PY
}

for fl in $FLAVOURS; do
    echo "baseline ($fl) ..." >&2
    build_baseline "$fl"
    mkdir -p "$WORK/baseline"
    build_mutant "$fl" "$ROOT/kernels" "" "$WORK/baseline/lib-$fl.so"
    for sched in "${SCHEDULES[@]}"; do
        # A failing baseline is allowed (a known bug being fixed elsewhere), but it must produce its JSON report:
        # mutants are judged by what fails beyond it.
        run_check "$fl" "$WORK/baseline/lib-$fl.so" "$sched" all "$OUT/baseline-$fl-$sched.json" \
            "$OUT/baseline-$fl-$sched.log" || true
        if ! python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$OUT/baseline-$fl-$sched.json" 2>/dev/null
        then
            echo "error: derma check on the unmutated kernels ($fl, $sched) wrote no JSON report; see" \
                "$OUT/baseline-$fl-$sched.log" >&2
            exit 1
        fi
    done
done

ROWS=()
TOTAL=0
CAUGHT=0
while IFS='|' read -r id file family desc old new nth; do
    [ -z "$id" ] && continue
    selected "$id" || continue
    TOTAL=$((TOTAL + 1))
    mdir=$WORK/$id
    mkdir -p "$mdir/kernels"
    cp kernels/*.cu kernels/*.cuh "$mdir/kernels/"
    apply_mutant "$mdir/kernels" "$file" "$old" "$new" "$nth"
    if cmp -s "kernels/$file" "$mdir/kernels/$file"; then
        echo "error: mutant $id changed nothing" >&2
        exit 1
    fi
    diff -u "kernels/$file" "$mdir/kernels/$file" >"$OUT/$id.diff" || true
    verdicts=()
    caught_any=0
    for fl in $FLAVOURS; do
        if ! build_mutant "$fl" "$mdir/kernels" "$file" "$mdir/lib-$fl.so" 2>"$OUT/$id-$fl-build.log"; then
            verdicts+=("does not compile")
            caught_any=1
            continue
        fi
        for sched in "${SCHEDULES[@]}"; do
            json=$OUT/$id-$fl-$sched.json
            log=$OUT/$id-$fl-$sched.log
            run_check "$fl" "$mdir/lib-$fl.so" "$sched" "$family" "$json" "$log" || true
            verdict=$(judge "$json" "$log" "$OUT/baseline-$fl-$sched.json")
            verdict=${verdict//|//}
            verdicts+=("$fl/$sched: $verdict")
            [[ $verdict == caught:* ]] && caught_any=1
        done
    done
    [ $caught_any -eq 1 ] && CAUGHT=$((CAUGHT + 1))
    echo "$id: $([ $caught_any -eq 1 ] && echo caught || echo NOT CAUGHT)" >&2
    ROWS+=("$id|$file|$desc|$([ $caught_any -eq 1 ] && echo yes || echo NO)|$(IFS=$'\x1f'; echo "${verdicts[*]}")")
done <<<"$MUTANTS"

{
    echo "# Kernel mutation score"
    echo
    echo "$CAUGHT of $TOTAL injected bugs caught by \`derma check --device emu\` (seed $SEED; schedules:" \
        "${SCHEDULES[*]}; flavours: $FLAVOURS). Generated by \`scripts/mutate-kernels.sh\`; each mutant is one edit" \
        "of a copy of kernels/, rebuilt as the emulated kernel library and loaded through \`DERMA_EMU_LIB\`."
    echo
    base_lines=$(for fl in $FLAVOURS; do for sched in "${SCHEDULES[@]}"; do
        baseline_failures "$OUT/baseline-$fl-$sched.json" | sed "s|^|$fl/$sched\t|"; done; done |
        awk -F'\t' '{ runs[$2] = runs[$2] (runs[$2] ? ", " : "") $1 } END { for (k in runs) print "- " k " (" runs[k] ")" }' |
        sort)
    if [ -n "$base_lines" ]; then
        echo "The unmutated kernels already fail these (a mutant is judged by what fails beyond them):"
        echo
        echo "$base_lines"
        echo
    fi
    echo "| mutant | file | bug | caught | by (flavour/schedule: what failed) |"
    echo "| --- | --- | --- | --- | --- |"
    for r in "${ROWS[@]}"; do
        IFS='|' read -r id file desc yes verdicts <<<"$r"
        echo "| $id | $file | $desc | $yes | ${verdicts//$'\x1f'/<br>} |"
    done
} >"$OUT/mutation.md"
echo "report: $OUT/mutation.md ($CAUGHT of $TOTAL caught)" >&2
[ "$CAUGHT" -eq "$TOTAL" ]
