#!/usr/bin/env bash
# Check a fresh GPU machine in one command, within 8 minutes, from the repository root:
#   1. install: skipped when the Python in use already imports a CUDA torch and saepipe's
#      dependencies; else a venv .venv-gpu that sees the base Python's packages, into which
#      `pip install -c constraints.txt -e .` goes (torch left out of the constraints when the
#      base Python has a CUDA torch, which is then reused; else the pinned torch first), or,
#      with --wheels DIR, exactly the wheels in DIR (--no-deps);
#   2. the micro sweep end to end on CUDA through Snakemake (--resources gpu=1), outputs checked;
#   3. bench/train_throughput.py --preset h200 and bench/pack_throughput.py --preset h200;
#   4. every figure and failure into ONE JSON: bench/results/gpu_check-<date>.json.
# Steps 2-4: bench/gpu_check.py (each step has its own timeout; the JSON says which ran out).
#
#   bash bench/gpu_check.sh [--cpu-dry] [--out-dir DIR] [--wheels DIR] [--budget SECONDS]
#
#   --cpu-dry        (or GPU_CHECK_CPU_DRY=1) the same steps on the CPU: tiny presets, the sweep
#                    without GPU; JSON gpu_check-<date>-cpu-dry.json; a minute or two
#   --out-dir DIR    (GPU_CHECK_OUT) where the JSON and the benchmarks' tables go (bench/results)
#   --wheels DIR     (GPU_CHECK_WHEELS) for a machine that reaches no package index: install
#                    exactly the wheels in DIR (made here by `python bench/gpu_wheels.py`,
#                    which fills .whl/) with pip --no-index --no-deps over the base Python's
#                    packages, its CUDA torch included; saepipe from this tree (PYTHONPATH).
#                    On a lent H200 (the device tool), results straight into $OUT (5 files):
#                    run(command="bash bench/gpu_check.sh --wheels .whl --out-dir $OUT",
#                    carry=[".whl"], timeout_s=600)
#   --budget S       (GPU_CHECK_BUDGET_S) the whole check's time budget in seconds (480;
#                    --cpu-dry: 900, for a busy 2-core machine)
#   GPU_CHECK_PYTHON the Python to use (default: the first ready of .venv-gpu, .venv, python3;
#                    none ready: .venv-gpu is made over python3)
#   GPU_CHECK_TORCH_INDEX  pip index URL of the CUDA torch when none is importable
#
# Exit status 0 when every step passed, else 1 (the JSON's "failures" say which and why).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
start=$(date +%s)
dry=${GPU_CHECK_CPU_DRY:-0}
out=${GPU_CHECK_OUT:-bench/results}
wheels=${GPU_CHECK_WHEELS:-}
budget=${GPU_CHECK_BUDGET_S:-}
command="bash bench/gpu_check.sh $*"
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-dry) dry=1 ;;
    --out-dir) out=$2 && shift ;;
    --wheels) wheels=$2 && shift ;;
    --budget) budget=$2 && shift ;;
    -h | --help) sed -n '2,/^# Exit status/p' "$0" && exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (bash $0 --help)" >&2 && exit 2 ;;
  esac
  shift
done
mode=gpu dry_flag=()
[ "$dry" = 1 ] && mode=cpu-dry dry_flag=(--cpu-dry)
[ -n "$budget" ] || budget=$([ "$dry" = 1 ] && echo 900 || echo 480) # a shared 2-core CI box is slow
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 # saepipe from this tree
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ready PYTHON: exit 0 when PYTHON imports saepipe's dependencies and (gpu mode) a CUDA torch;
# prints the torch it has, or what is missing
ready() {
  "$1" - "$mode" 2>/dev/null <<'EOF'
import importlib.util, sys
need = "torch snakemake zarr numcodecs yaml transformer_lens datasets pyarrow safetensors google_crc32c jsonschema scipy sklearn matplotlib threadpoolctl tqdm"
missing = [m for m in need.split() if importlib.util.find_spec(m) is None]
if missing:
    print("missing " + " ".join(missing))
    sys.exit(1)
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {cuda}")
sys.exit(sys.argv[1] == "gpu" and not cuda)
EOF
}

# 1. install ------------------------------------------------------------------------------
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then candidates=("$GPU_CHECK_PYTHON"); else candidates=(.venv-gpu/bin/python .venv/bin/python python3); fi
py="" note=""
for c in "${candidates[@]}"; do
  if note=$(ready "$c"); then py=$c && break; fi
done
install_rc=0 install_timed_out=0
if [ -n "$py" ]; then
  action="skipped: $py already has what the check needs ($note)"
else
  base=${GPU_CHECK_PYTHON:-python3}
  torch_ok='import sys, torch; sys.exit(sys.argv[1] == "gpu" and not torch.cuda.is_available())'
  if [ -n "$wheels" ]; then
    # offline: exactly the wheels of bench/gpu_wheels.py, --no-deps, over the base's packages
    # (its torch included); saepipe itself from this tree (PYTHONPATH), no editable install
    if "$base" -c "$torch_ok" "$mode" 2>/dev/null; then
      torch_note="$base's torch $("$base" -c 'import torch; print(torch.__version__)') reused"
    else
      torch_note="NO usable torch in $base: the wheels carry none (a CUDA torch must be in the base)"
    fi
    install_args=("--no-index --no-deps --no-compile $wheels/*.whl")
    action="installed: venv .venv-gpu over $base ($torch_note), the $(ls "$wheels"/*.whl 2>/dev/null | wc -l) wheels of $wheels with --no-deps"
  else
    if "$base" -c "$torch_ok" "$mode" 2>/dev/null; then
      torch_note="$base's torch $("$base" -c 'import torch; print(torch.__version__)') reused"
      grep -viE '^(torch|triton|nvidia-)' constraints.txt >"$tmp/constraints.txt"
      torch_args=""
    else
      pin=$(grep -E '^torch==' constraints.txt)
      torch_note="$pin installed${GPU_CHECK_TORCH_INDEX:+ from $GPU_CHECK_TORCH_INDEX}"
      cp constraints.txt "$tmp/constraints.txt"
      torch_args="-c constraints.txt $pin${GPU_CHECK_TORCH_INDEX:+ --index-url $GPU_CHECK_TORCH_INDEX}"
    fi
    install_args=(${torch_args:+"$torch_args"} "-c $tmp/constraints.txt -e .")
    action="installed: venv .venv-gpu over $base ($torch_note), pip install -c constraints.txt -e ."
  fi
  echo "gpu_check: install: $action (no ready Python: ${note:-none found})"
  install_end=$((start + budget - 180)) # the steps after it keep at least 3 minutes
  # bounded CMD...: CMD with what is left of the install's time (exit 124 when it runs out)
  bounded() {
    local left=$((install_end - $(date +%s)))
    [ "$left" -gt 0 ] || return 124
    timeout --kill-after=10 "$left" "$@"
  }
  # pip for the venv: its own; where the base cannot seed one (no ensurepip: Debian's Python, a
  # venv made by uv), the venv is made without pip and the base's pip serves it (pip --python)
  vpip=".venv-gpu/bin/python -m pip"
  rm -rf .venv-gpu
  if ! "$base" -m venv --system-site-packages .venv-gpu >"$tmp/venv.log" 2>&1; then
    rm -rf .venv-gpu
    "$base" -m venv --system-site-packages --without-pip .venv-gpu >>"$tmp/venv.log" 2>&1
    vpip="$base -m pip --python .venv-gpu/bin/python"
  fi
  (
    set -e
    cat "$tmp/venv.log"
    [ -x .venv-gpu/bin/python ]
    site=$(.venv-gpu/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # the base's own packages (its CUDA torch) stay visible, also when the base is itself a venv
    "$base" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
      >"$site/_gpu_check_base.pth"
    for args in "${install_args[@]}"; do
      echo "+ $vpip install $args"
      bounded $vpip install $args # word-split on purpose: paths here hold no spaces
    done
  ) >"$tmp/install.log" 2>&1
  install_rc=$?
  # what pip thinks is unmet (the wheels' path leaves out PuLP and wandb on purpose): on record
  [ -x .venv-gpu/bin/python ] && $vpip check >"$tmp/pip_check.txt" 2>&1
  [ "$install_rc" = 124 ] && install_timed_out=1
  py=.venv-gpu/bin/python
  [ -x "$py" ] || py=$base
  if ! note=$(ready "$py"); then
    [ "$install_rc" = 0 ] && install_rc=1
    action="$action; still not ready: $note"
  fi
fi
install_s=$(($(date +%s) - start))
echo "gpu_check: install ($install_s s): $action"
# the install step's outcome, as JSON, for gpu_check.py
ACTION=$action RC=$install_rc TIMED_OUT=$install_timed_out SECONDS_=$install_s PY=$py LOG=$tmp/install.log \
  PIP_CHECK=$tmp/pip_check.txt "$py" -c '
import json, os
log = open(os.environ["LOG"], errors="replace").read() if os.path.exists(os.environ["LOG"]) else ""
step = {"ok": os.environ["RC"] == "0", "action": os.environ["ACTION"], "python": os.environ["PY"],
        "seconds": int(os.environ["SECONDS_"]), "timed_out": os.environ["TIMED_OUT"] == "1"}
if os.path.exists(os.environ["PIP_CHECK"]):  # unmet requirements pip reports (information only)
    step["pip_check"] = open(os.environ["PIP_CHECK"], errors="replace").read().splitlines()[:40]
if not step["ok"]:
    errors = [line for line in log.splitlines() if "ERROR" in line or "Error" in line] or ["see output_tail"]
    step["error"] = ("ran out of its time" if step["timed_out"] else "exit " + os.environ["RC"]) + ": " + errors[-1]
    step["output_tail"] = log[-4000:]
print(json.dumps(step))' >"$tmp/install.json"

# 2-4. sweep, benchmarks, JSON (gpu_check.py keeps to the deadline; this timeout is a backstop)
left=$((start + budget - $(date +%s)))
timeout --kill-after=20 $((left > 0 ? left + 60 : 60)) "$py" bench/gpu_check.py "${dry_flag[@]}" \
  --out-dir "$out" --deadline $((start + budget)) --budget-s "$budget" --install "$tmp/install.json" \
  --command "$command"
rc=$?
echo "gpu_check: done in $(($(date +%s) - start)) s (budget $budget s), exit $rc"
exit $rc
