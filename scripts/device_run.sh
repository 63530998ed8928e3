#!/usr/bin/env bash
# One rehearsed GPU window (issue 13): train the study's models with the fast recipes,
# evaluate them, and, when time is left, train the data-scale ViTs and run the GPU
# benchmarks, then (issue 18) the small-data ViT designs (vit_cifar_tiny, two seeds, and its
# five variants, recipe tinyvit). Everything finished is packaged into $OUT before the guard.
#
#   scripts/device_run.sh            the GPU run (CIFAR-10 from .device/cifar10.tar.xz)
#   scripts/device_run.sh --smoke    the same steps on CPU in about a minute (tests run it)
#   scripts/device_run.sh --collect [scale|tinyvit]
#                                    on the same (still warm) machine: package the data-scale
#                                    (default) or tiny-ViT checkpoints that did not fit the
#                                    first reply
#
# Environment: VIT_RECIPE (default fast-vit-aa), RESNET_RECIPE (default fast-resnet-aa; "none"
# skips a model: the third window's fast-vit-aa reached 77.6 % in 59 epochs alone, and
# `STAGES=1 RESNET_RECIPE=none` gives the ViT the whole window), VIT_EPOCHS and RESNET_EPOCHS
# (default: what ends inside stage 1 at the H200's measured speed, at most the recipe's; the
# ViT alone at the default budget: 116, about 3.3 s an epoch after 100 s of loading, compiling
# and evaluating; the ResNet alone with DEVICE_BUDGET_S=240: 51 of its 100), PYTHON (default
# python3), OUT (default .device/out), REPSIM_CIFAR_TAR (the
# packed tree, default .device/cifar10.tar.xz), DEVICE_BUDGET_S (the guard, default 560 s:
# packaged well inside 10 minutes; the 2026-11-28 window: 521 s of 560, machine start 37 s), DEVICE_WORK (scratch, default .device/run), DEVICE_BENCH
# (0 skips the benchmarks), TINYVIT_S (seconds kept from stage 2 for stage 3, default 0:
# stage 3 then runs only on what is left), TINYVIT_PASSES (the tinyvit recipe's passes over
# CIFAR-10, default 300 as in the source; the time limit stops earlier runs honestly labelled),
# STAGES (which stages run, default t123, t the CUDA tests: "t3" gives a window to the tiny
# ViTs alone, "t2" to the data-scale runs), SCALE_RECIPE (the data-scale ViTs' recipe,
# default fast-vit-aa: the committed vit_cifar's, so the figure compares like with like).
#
# What comes back (the device returns at most 8 files of at most 16 MiB, 64 MiB together):
# summary.json, device.log, SHA256SUMS and results.tar split into parts of at most 15 MiB
# (checkpoints, manifest, training logs, evaluations, benchmark JSON). Rebuild with
# `cat results.tar.part-* > results.tar && sha256sum -c SHA256SUMS`.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO/.device/out}
WORK=${DEVICE_WORK:-$REPO/.device/run}
TAR=${REPSIM_CIFAR_TAR:-$REPO/.device/cifar10.tar.xz}
BUDGET_S=${DEVICE_BUDGET_S:-560}
MODE=${1:-gpu}
VIT_RECIPE=${VIT_RECIPE:-fast-vit-aa}
RESNET_RECIPE=${RESNET_RECIPE:-fast-resnet-aa}
T0=$(date +%s)
PART=15M

mkdir -p "$OUT"
LOG=$OUT/device.log
say() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
# --time-limit stops a run between epochs; a run still going GRACE_S seconds after its limit
# (a stuck compile, an epoch far slower than the last) is killed, keeping its last save, so the
# script still packages before the guard. Not in a smoke run (0: no limit): a slow CPU.
GRACE_S=${GRACE_S:-30}  # the test of the kill sets it short
hard() {  # hard SECONDS: the seconds after which a run of SECONDS is killed
    [ "$SMOKE" = 1 ] && echo 0 || echo $(( ($1 > 12 ? $1 : 12) + GRACE_S ))
}
minutes() { "$PYTHON" -c "print(max(0.2, ($1) / 60))"; }  # seconds -> minutes, at least 0.2
upto() {  # upto EPOCHS N: the comma-separated EPOCHS <= N (a shorter run refuses the rest)
    "$PYTHON" -c 'import sys; print(",".join(e for e in sys.argv[1].split(",") if int(e) <= int(sys.argv[2])))' "$1" "$2"
}
recipe_epochs() {  # recipe_epochs NAME: the recipe's planned epochs (0 for none or unknown)
    "$PYTHON" -c 'import sys; from repsim.recipes import RECIPES; r = RECIPES.get(sys.argv[1]); print(r.epochs if r else 0)' "$1"
}
stage1_epochs() {  # stage1_epochs vit|resnet RECIPE SECONDS: the most epochs, at most the recipe's
    # (0 for none), whose run ends within SECONDS, so the schedule runs to its end (a cut one
    # ends at a high learning rate). Measured on the H200 (benchmarks/out/
    # device_2026-11-28_third): seconds an epoch and seconds outside the epochs (loading
    # 25-30 s, the ViT's compiling 37 s, evaluations, snapshots); the ResNet's epochs as they
    # ran beside the ViT (alone: faster).
    local cost="3.3 100"
    [ "$1" = resnet ] && cost="2.2 50"
    "$PYTHON" -c 'import sys; e, f = map(float, sys.argv[1].split()); s, n = float(sys.argv[2]), int(sys.argv[3]); print(min(n, max(1, int((s - f) / e))))' "$cost" "$3" "$(recipe_epochs "$2")"
}

# Ctrl-C or SIGTERM: end the runs started in the background too. A non-interactive shell
# starts them ignoring SIGINT, and timeout puts each in its own process group, so they would
# go on training into a work folder the next run deletes. Nothing is packaged.
stop() {
    trap - INT TERM
    local running
    running=$(jobs -p)
    [ -n "$running" ] && kill $running 2>/dev/null
    wait
    say "interrupted by SIG$1: background runs stopped, nothing packaged"
    exit $((128 + $2))
}
trap 'stop INT 2' INT
trap 'stop TERM 15' TERM

package() {  # package DIR NAME: DIR as NAME.tar, split into parts, sums appended
    (cd "$1" && tar cf - .) | split -b "$PART" -d -a 3 - "$OUT/$2.tar.part-"
    (cd "$OUT" && sha256sum "$2".tar.part-* >> SHA256SUMS)
}

if [ "$MODE" = "--collect" ]; then
    : > "$LOG"
    WHAT=${2:-scale}
    case "$WHAT" in scale|tinyvit) ;; *) say "--collect takes scale or tinyvit, not $WHAT"; exit 1;; esac
    if [ -d "$WORK/$WHAT" ] && [ -n "$(ls -A "$WORK/$WHAT")" ]; then
        package "$WORK/$WHAT" "$WHAT"
        say "collected $(ls "$WORK/$WHAT" | wc -l) $WHAT files"
    else
        say "nothing to collect in $WORK/$WHAT"
    fi
    exit 0
fi

SMOKE=0
[ "$MODE" = "--smoke" ] && SMOKE=1
STAGES=${STAGES:-t123}
stage() { [[ "$STAGES" == *"$1"* ]]; }
SCALE_RECIPE=${SCALE_RECIPE:-fast-vit-aa}
# One run per work folder: a second would delete the first's data and runs from under it.
mkdir -p "$(dirname "$WORK")"
exec 9> "$WORK.lock"
if command -v flock > /dev/null && ! flock -n 9; then
    echo "another run is using $WORK (it holds $WORK.lock); wait for it, or set DEVICE_WORK"
    exit 1
fi
rm -rf "$WORK"
# An earlier run's products in a reused OUT would pass for this run's (an interrupted one's),
# and its higher-numbered parts would join this run's archive.
rm -f "$OUT/summary.json" "$OUT/SHA256SUMS" "$OUT"/*.tar.part-*
DATA=$WORK/data CK=$WORK/checkpoints RUNS=$WORK/runs LOGS=$WORK/logs
mkdir -p "$DATA" "$CK" "$RUNS" "$LOGS" "$WORK/scale" "$WORK/tinyvit"
: > "$LOG"
export PYTHONUNBUFFERED=1 REPSIM_OFFLINE=1 REPSIM_CACHE=$WORK/cache REPSIM_CHECKPOINTS=$CK
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

# ---------------------------------------------------------------- set-up
say "mode ${MODE}, budget ${BUDGET_S} s, python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
tar xJf "$TAR" -C "$DATA" || { say "cannot unpack $TAR"; exit 1; }
say "unpacked $(find "$DATA" -type f | wc -l) images"
if [ "$SMOKE" = 0 ]; then
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$LOG" 2>&1 \
        || say "pip install failed; using PYTHONPATH"
    if ls .whl/*.whl > /dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
            .whl/*.whl >> "$LOG" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1
fi
# One start of torch (seconds on a CPU) for the device, torch's version and the GPU's name;
# the summary reuses them.
{ read -r DEVICE; read -r TORCH_VERSION; read -r GPU_NAME; } < <("$PYTHON" -c 'import torch
cuda = torch.cuda.is_available()
print("cuda" if cuda else "cpu", torch.__version__, torch.cuda.get_device_name() if cuda else "",
      sep="\n")')
say "device $DEVICE, torch $TORCH_VERSION${GPU_NAME:+, $GPU_NAME}"

# CUDA tests in the background (small; they share the GPU with the first minutes of training).
TESTS=
if stage t; then
    timeout $((BUDGET_S - 60)) "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests \
        > "$LOGS/cuda_tests.log" 2>&1 &
    TESTS=$!
fi

# ---------------------------------------------------------------- stage 1: the two models
if stage 1; then
    # The ResNet trains on the GPU while the ViT compiles; both must end 150 s before the guard
    # (final evaluation 35 s, the dynamics figure 60 s on the H200, packaging), or 60 s when one
    # model is not trained (no dynamics figure: it needs both).
    DYNAMICS=1
    [ "$VIT_RECIPE" = none ] || [ "$RESNET_RECIPE" = none ] && DYNAMICS=0
    STAGE1=$(($(left) - (DYNAMICS ? 150 : 60)))
    if [ "$SMOKE" = 1 ]; then
        COMMON=(--data-root "$DATA" --json --train-fraction 0.02 --epochs 1)
        VIT_EXTRA=(--snapshots 0,1) RES_EXTRA=(--snapshots 0,1)
    else
        # Snapshots (roughly log-spaced epochs) feed the training-dynamics figure, built on this
        # machine below: they are too large to travel. VIT_EPOCHS, RESNET_EPOCHS: by default
        # what fits STAGE1 (stage1_epochs), so the whole schedule runs.
        COMMON=(--data-root "$DATA" --json)
        VE=${VIT_EPOCHS:-$(stage1_epochs vit "$VIT_RECIPE" "$STAGE1")}
        RE=${RESNET_EPOCHS:-$(stage1_epochs resnet "$RESNET_RECIPE" "$STAGE1")}
        SNAPS=0,1,2,5,10,20,50,100
        VIT_EXTRA=(--compile --eval-every 10 --epochs "$VE" --snapshots "$(upto $SNAPS "$VE"),$VE")
        RES_EXTRA=(--eval-every 5 --epochs "$RE" --snapshots "$(upto $SNAPS "$RE"),$RE")
        say "stage 1: $STAGE1 s; vit_cifar $VE epochs, resnet18_cifar $RE epochs"
    fi
    train() {  # train NAME MODEL RECIPE SECONDS [extra...]: background run, JSON summary in LOGS
        local name=$1 model=$2 recipe=$3 secs=$4
        shift 4
        # recipe none: nothing to train, but the caller's `wait $!` needs a finished process
        if [ "$recipe" = none ]; then say "$name: not trained (recipe none)"; true & return; fi
        timeout "$(hard "$secs")" "$PYTHON" -m repsim train --model "$model" --recipe "$recipe" \
            --out "$CK/$name.pt" --run-dir "$RUNS/$name" --time-limit "$(minutes "$secs")" \
            "${COMMON[@]}" "$@" \
            > "$LOGS/train_$name.json" 2> "$LOGS/train_$name.err" &
    }
    train vit_cifar vit_cifar "$VIT_RECIPE" "$STAGE1" "${VIT_EXTRA[@]}"
    VIT=$!
    train resnet18_cifar resnet18_cifar "$RESNET_RECIPE" "$STAGE1" "${RES_EXTRA[@]}"
    RES=$!
    wait "$RES"; say "resnet18_cifar: exit $? $(tail -c 300 "$LOGS/train_resnet18_cifar.json")"
    wait "$VIT"; say "vit_cifar: exit $? $(tail -c 300 "$LOGS/train_vit_cifar.json")"

    EVALS=()
    for m in resnet18_cifar vit_cifar; do  # both at once: each is mostly start-up
        [ -f "$CK/$m.pt" ] || continue
        "$PYTHON" -m repsim eval --model "$m" --weights "$CK/$m.pt" --dataset cifar10 \
            --data-root "$DATA" --json \
            > "$LOGS/eval_$m.json" 2> "$LOGS/eval_$m.err" &
        EVALS+=($!)
    done
    for p in "${EVALS[@]}"; do wait "$p"; done
    for m in resnet18_cifar vit_cifar; do
        [ -f "$LOGS/eval_$m.json" ] && say "eval $m: $(cat "$LOGS/eval_$m.json")"
    done

    # Training dynamics (issue 17) from the snapshots just kept: the figure and its data travel
    # (on a CPU the smoke run draws it from 20 probe images: its CPU time is mostly start-up).
    FIGN=()
    [ "$SMOKE" = 1 ] && FIGN=(--n 20)
    if [ "$DYNAMICS" = 0 ]; then
        say "dynamics figure skipped: a model was not trained"
    elif [ "$(left)" -ge 70 ]; then
        timeout $(($(left) - 45)) "$PYTHON" -m repsim figures --only dynamics \
            --out "$WORK/figures" "${FIGN[@]}" > "$LOGS/figures_dynamics.log" 2>&1
        say "dynamics figure: exit $? $(tail -c 300 "$LOGS/figures_dynamics.log")"
        cp -r "$WORK/figures" "$LOGS/figures" 2>/dev/null
    else
        say "dynamics figure skipped: $(left) s left"
    fi
else
    say "stage 1 skipped: STAGES=$STAGES"
fi

# ---------------------------------------------------------------- stage 2: only with 5 min left
TINYVIT_S=${TINYVIT_S:-0}
if stage 2 && { [ "$(left)" -ge $((300 + TINYVIT_S)) ] || [ "$SMOKE" = 1 ]; }; then
    say "stage 2 with $(left) s left"
    # Data-scale ViTs (same recipe) side by side, leaving 120 s for the benchmarks.
    SCALE=$(($(left) - 120 - TINYVIT_S))
    [ "$SMOKE" = 1 ] && SCALE=60
    PIDS=()
    FRACTIONS=(0.1 0.25 0.5)
    [ "$SMOKE" = 1 ] && FRACTIONS=(0.02 0.04 0.1)  # seconds on a CPU, not minutes
    for f in "${FRACTIONS[@]}"; do
        if [ "$SMOKE" = 1 ]; then  # one thread each: three processes on a few CPU cores
            OMP_NUM_THREADS=1 "$PYTHON" -m repsim train --model vit_cifar --recipe \
                "$SCALE_RECIPE" --train-fraction "$f" --out "$WORK/scale/vit_cifar_frac$f.pt" \
                --run-dir "$RUNS/frac$f" --epochs 1 \
                --data-root "$DATA" --json \
                > "$LOGS/train_frac$f.json" 2> "$LOGS/train_frac$f.err" &
        else
            timeout "$(hard "$SCALE")" "$PYTHON" -m repsim train --model vit_cifar \
                --recipe "$SCALE_RECIPE" --train-fraction "$f" \
                --out "$WORK/scale/vit_cifar_frac$f.pt" --run-dir "$RUNS/frac$f" --compile \
                --eval-every 20 --time-limit "$(minutes "$SCALE")" --data-root "$DATA" --json \
                > "$LOGS/train_frac$f.json" 2> "$LOGS/train_frac$f.err" &
        fi
        PIDS+=($!)
    done
    for p in "${PIDS[@]}"; do wait "$p"; done
    for f in "${FRACTIONS[@]}"; do say "frac $f: $(tail -c 200 "$LOGS/train_frac$f.json")"; done
    BENCH=$(($(left) - 40 - TINYVIT_S))
    if [ "$BENCH" -ge 30 ] && [ "${DEVICE_BENCH:-1}" = 1 ] && [ -f benchmarks/bench_gpu.py ]; then
        QUICK=()
        [ "$SMOKE" = 1 ] && QUICK=(--quick)
        timeout "$BENCH" "$PYTHON" benchmarks/bench_gpu.py --device "$DEVICE" --data-root "$DATA" \
            --weights-dir "$CK" --time-budget $((BENCH - 10)) --out "$LOGS/bench_gpu.json" \
            "${QUICK[@]}" > "$LOGS/bench_gpu.log" 2>&1
        say "bench_gpu: exit $? $(tail -c 600 "$LOGS/bench_gpu.log")"
    fi
else
    say "stage 2 skipped: $(left) s left, STAGES=$STAGES"
fi

# ---------------------------------------------------------------- stage 3: the tiny ViTs
# vit_cifar_tiny with two seeds (the seed-to-seed band) and its five variants, side by side,
# recipe tinyvit; only with 4 minutes left. Checkpoints go to $WORK/tinyvit (--collect
# tinyvit); their manifest and run logs travel with the first reply.
TINY=(vit_cifar_tiny:vit_cifar_tiny:0 vit_cifar_tiny_seed1:vit_cifar_tiny:1
      vit_cifar_tiny_mcls4:vit_cifar_tiny_mcls4:0 vit_cifar_tiny_reg3:vit_cifar_tiny_reg3:0
      vit_cifar_tiny_lowrankq:vit_cifar_tiny_lowrankq:0
      vit_cifar_tiny_lowrankk:vit_cifar_tiny_lowrankk:0
      vit_cifar_tiny_sptlsa:vit_cifar_tiny_sptlsa:0)
if stage 3 && { [ "$(left)" -ge 240 ] || [ "$SMOKE" = 1 ]; }; then
    say "stage 3 with $(left) s left"
    TINY_S=$(($(left) - 60))
    PIDS=()
    for run in "${TINY[@]}"; do
        IFS=: read -r name model seed <<< "$run"
        ENVS=()
        if [ "$SMOKE" = 1 ]; then
            EXTRA=(--train-fraction 0.02 --epochs 1)
            ENVS=(OMP_NUM_THREADS=1)  # seven processes on a few CPU cores: no oversubscription
        else
            EXTRA=(--compile --eval-every 25 --epochs "${TINYVIT_PASSES:-300}"
                   --time-limit "$(minutes "$TINY_S")")
        fi
        env "${ENVS[@]}" timeout "$(hard "$TINY_S")" "$PYTHON" -m repsim train --model "$model" \
            --recipe tinyvit --seed "$seed" --out "$WORK/tinyvit/$name.pt" \
            --run-dir "$RUNS/tiny_$name" --data-root "$DATA" \
            --json "${EXTRA[@]}" > "$LOGS/train_$name.json" 2> "$LOGS/train_$name.err" &
        PIDS+=($!)
    done
    for p in "${PIDS[@]}"; do wait "$p"; done
    for run in "${TINY[@]}"; do
        name=${run%%:*}
        say "$name: $(tail -c 200 "$LOGS/train_$name.json")"
    done
else
    say "stage 3 skipped: $(left) s left, STAGES=$STAGES"
fi

# ---------------------------------------------------------------- package
[ -n "$TESTS" ] && wait "$TESTS" && say "cuda tests: $(tail -n 1 "$LOGS/cuda_tests.log")"
cp -r "$RUNS" "$LOGS/runs" 2>/dev/null
rm -f "$LOGS"/runs/*/state.pt  # optimiser state: large and not needed off the machine
cp "$CK"/*.pt "$CK/manifest.json" "$LOGS/" 2>/dev/null
for d in "$CK"/*_snapshots; do  # the snapshot indexes (metrics per epoch), not the weights
    [ -f "$d/index.json" ] && mkdir -p "$LOGS/$(basename "$d")" && cp "$d/index.json" "$LOGS/$(basename "$d")/"
done
cp "$WORK/scale/manifest.json" "$LOGS/manifest_scale.json" 2>/dev/null
cp "$WORK/tinyvit/manifest.json" "$LOGS/manifest_tinyvit.json" 2>/dev/null
"$PYTHON" - "$LOGS" "$OUT/summary.json" "$(($(date +%s) - T0))" "$MODE" "$TORCH_VERSION" \
    "$GPU_NAME" <<'EOF'
import json, sys
from pathlib import Path

logs, out, seconds, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch_version, gpu = sys.argv[5] or None, sys.argv[6] or None  # no second start of torch

def read(p):
    try:
        lines = p.read_text().strip().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None

summary = {"mode": mode, "seconds": seconds, "torch": torch_version, "gpu": gpu,
           "train": {p.stem[6:]: read(p) for p in sorted(logs.glob("train_*.json"))},
           "eval": {p.stem[5:]: read(p) for p in sorted(logs.glob("eval_*.json"))},
           "bench_gpu": read(logs / "bench_gpu.json") if (logs / "bench_gpu.json").is_file()
           else None,
           "cuda_tests": (logs / "cuda_tests.log").read_text().strip().splitlines()[-1:]
           if (logs / "cuda_tests.log").is_file() else None}
out.write_text(json.dumps(summary, indent=1))
EOF
: > "$OUT/SHA256SUMS"
package "$LOGS" results
say "packaged $(ls "$OUT" | wc -l) files, $(du -sh "$OUT" | cut -f1); data-scale: $(ls "$WORK/scale" | tr '\n' ' '); tinyvit: $(ls "$WORK/tinyvit" | tr '\n' ' ')"
