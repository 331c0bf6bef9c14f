#!/usr/bin/env bash
# The GPU benchmark suite: one JSON line per figure, for BENCHMARKS.md's GPU rows.
#   bash bench/gpu.sh [PEAK_TFLOPS]      # default 989: H100 SXM dense bf16
# A ~1.1B Llama (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32k vocab), seq 2048, bf16,
# one GPU, MIGU on vs off side by side in each run (bench/bench_train.py); then the data and
# checkpoint benchmarks. attn_implementation=auto takes flash-attn 2 when it is installed
# (pip install -e '.[gpu]'), else sdpa; the JSON does not say which, so this prints it first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PEAK=${1:-989}
$PY - <<'PY'
import importlib.util, json, torch
print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "flash_attn": importlib.util.find_spec("flash_attn") is not None}))
PY
ONE_B=(model.vocab_size=32000 model.hidden_size=2048 model.intermediate_size=5632
       model.num_layers=22 model.num_heads=32 model.num_kv_heads=4
       train.seq_len=2048 train.micro_batch_size=4 train.grad_accum=2)
run() { $PY bench/bench_train.py --nproc 1 --peak-tflops "$PEAK" "${ONE_B[@]}" "$@" | grep '^{'; }
run engine.backend=fsdp2                                      # torchtitan-style FSDP2
run engine.backend=fsdp2 model.compile=true                   # + compiled blocks
run engine.backend=deepspeed engine.zero_stage=3              # the 7B recipe's engine
run engine.backend=fsdp2 model.activation_checkpointing=true  # MIGU statistics under recompute
$PY bench/bench_data.py | grep '^{'
$PY bench/bench_checkpoint.py --nproc 1 | grep '^{'
