#!/usr/bin/env bash
# The GPU check (issue 22): one command for a lent CUDA machine without registry access, inside 8 minutes.
#
#   bash scripts/gpu_check.sh [--out DIR] [--dry-run]
#
# 0. Wheels carried in .whl/ (diffusers, transformers and what they need; the machine cannot download them)
#    are unpacked into /tmp/site, put first on PYTHONPATH; the python is $PYTHON if set, else .venv-ref's if
#    it imports diffusers, else .venv's, else python3. Without diffusers the bench runs ldm's variants alone
#    (--diffusers "").
# 1. parity + speed: SD v1 512 px fp16, unet / vae / text / e2e (50 steps), ldm and ldm+default against diffusers.
# 2. the matrix (scripts/bench.py MATRIX: v1 512 px, v2 768 px, SDXL 1024 px; fp16 then bf16), variants default,
#    channels_last, compile and CUDA graphs.
# Each stage runs under `timeout` (90 s + 330 s) and writes DIR/<stage>.json, DIR/<stage>.md and DIR/<stage>.log;
# bench.py rewrites its JSON and markdown after every config, so a stage cut short keeps what completed.
# DIR/gpu-check.md gathers the tables and is printed at the end. Exit status 1 when a stage failed.
#
# --dry-run: the same stages on the CPU with the tiny test configs (tests/configs), one round, one thread, a
# two-entry matrix: the same code paths in well under a minute, with no GPU and no diffusers (CI runs it,
# tests/test_bench.py). It also prints the commands a GPU run would take.
set -uo pipefail

out=gpu-check-out
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (--out DIR, --dry-run)" >&2; exit 2 ;;
    esac
done
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the stages run from the repository root
cd "$(dirname "$0")/.."

# -- 0. the carried wheels, and the interpreter
imports() { "$1" -c "import $2" >/dev/null 2>&1; }
pick() {  # .venv-ref's python if it imports diffusers, else .venv's, else python3
    if imports .venv-ref/bin/python "diffusers, transformers"; then echo .venv-ref/bin/python
    elif [ -x .venv/bin/python ]; then echo .venv/bin/python
    else echo python3; fi
}
if compgen -G ".whl/*.whl" >/dev/null; then
    # --no-deps: no index to resolve from; the carried set is what there is, torch comes from the environment
    "${PYTHON:-$(pick)}" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        || echo "gpu_check.sh: installing .whl/*.whl failed; going on without them" >&2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python=${PYTHON:-$(pick)}  # PYTHON: an interpreter of one's own (tests/test_bench.py: the test's)
peer=()
if imports "$python" "diffusers, transformers"; then
    echo "python: $python, against diffusers"
else
    peer=(--diffusers "")
    echo "python: $python, without diffusers: ldm's variants only"
fi

# -- the stages: (name, seconds, bench.py arguments) for a GPU, and their CPU stand-ins for --dry-run
variants=ldm,ldm+default,ldm+channels_last,ldm+compile,ldm+cudagraphs
gpu_parity=(--device cuda --config configs/stable-diffusion/v1-inference.yaml --size 512 --dtype float16
            --parts unet,vae,text,e2e --steps 50 --rounds 3 --ldm ldm,ldm+default)
gpu_matrix=(--device cuda --matrix --parts unet,vae,text --rounds 3 --ldm "$variants")
if [ "$dry_run" = 1 ]; then
    echo "dry run on the CPU; on a GPU it runs:"
    echo "  timeout 90 $python scripts/bench.py ${gpu_parity[*]}"
    echo "  timeout 330 $python scripts/bench.py ${gpu_matrix[*]}"
    parity=(--device cpu --config tests/configs/tiny-v1.yaml --size 32 --dtype float32 --parts unet,vae,text,e2e
            --steps 2 --rounds 1 --threads 1 --ldm ldm,ldm+default)
    matrix=(--device cpu --runs tests/configs/tiny-v1.yaml:32:float32,tests/configs/tiny-v2.yaml:32:bfloat16
            --parts unet,vae,text --rounds 1 --threads 1 --ldm ldm,ldm+default,ldm+channels_last)
else
    parity=("${gpu_parity[@]}")
    matrix=("${gpu_matrix[@]}")
fi

failed=0
: > "$out/gpu-check.md"
stage() {  # stage NAME SECONDS ARGS...: one bench.py run under a time limit, its tables appended to gpu-check.md
    local name=$1 seconds=$2 status
    shift 2
    rm -f "$out/$name.json" "$out/$name.md" "$out/$name.log"  # nothing stale from an earlier check
    echo "== $name (at most $seconds s)"
    timeout --kill-after=10 "$seconds" "$python" scripts/bench.py "$@" "${peer[@]}" \
        --json "$out/$name.json" --markdown "$out/$name.md" 2>&1 | tee "$out/$name.log"
    status=${PIPESTATUS[0]}
    { echo "## $name"; echo
      if [ "$status" = 0 ]; then echo "completed"; elif [ "$status" = 124 ]; then echo "cut at $seconds s";
      else echo "failed (exit status $status)"; fi
      echo; [ -f "$out/$name.md" ] && cat "$out/$name.md"; echo; } >> "$out/gpu-check.md"
    [ "$status" = 0 ] || failed=1
}
stage parity 90 "${parity[@]}"
stage matrix 330 "${matrix[@]}"

echo
cat "$out/gpu-check.md"
exit "$failed"
