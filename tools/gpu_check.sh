#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CUDA and a preinstalled torch (no package index):
#   bash tools/gpu_check.sh [OUT_DIR]
# Wheels the image lacks (transformers, peft, hydra, liger-kernel, torchao, ...) are taken from .whl/ when present
# (pip download them on a machine with an index; tools/README says which), installed into /tmp/site.
# Runs: the environment report, `pytest -m gpu tests/gpu`, a short bf16 demo run through the CLI, the bf16-vs-fp32
# probe (tools/gpu_probe_bf16.py) and the bench's gpu entry (quick). Each step has its own time limit so one hang cannot eat the others.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || { echo "wheel install failed"; tail -20 "$OUT/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for m in ("transformers", "peft", "torchao", "liger_kernel", "flash_attn", "triton", "hydra", "xtune"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - a report, not a check
        print(m, "MISSING:", type(e).__name__, str(e)[:200])
EOF
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
}
step gpu_tests "${GPU_TESTS_S:-240}" python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs --durations=10
step cli_demo "${CLI_DEMO_S:-120}" python3 -m xtune sft recipe=demo train.max_steps=30 train.log_every=10 \
  parallel.param_dtype=bfloat16 train.work_dir=/tmp/gpu_demo logging.progress=plain train.eval_every=15
step bf16_probe "${PROBE_S:-90}" python3 tools/gpu_probe_bf16.py
step bench_gpu "${BENCH_S:-300}" python3 bench/run.py --only gpu --quick
cp bench/results/results.json "$OUT/bench_results.json" 2>/dev/null || true
exit 0
