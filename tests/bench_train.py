"""Benchmark (not a test): training throughput and peak memory of train_tr.py, and of TRL's DPOTrainer on the same rows
when `trl` is importable (it is never a dependency: install it in a scratch venv). Run it on a quiet machine.

    python tests/bench_train.py                          # tiny and SmolLM2, float32 and bfloat16, nanoTR and TRL
    python tests/bench_train.py --models=tiny --dtypes=float32 --trainers=nanotr
    python tests/bench_train.py --models=smollm2-lora     # the LoRA rows alone (bfloat16)

The setting both trainers run: TR-DPO (β = 0.1, soft update α = 0.6 every 2 steps: TRL's sync_ref_model with
ref_model_mixup_alpha and ref_model_sync_steps), AdamW at lr 1e-6, max grad norm 2, no gradient checkpointing, no
evaluation or saving inside the timed steps. bfloat16 means bf16 compute over float32 weights in both (FSDP's mixed
precision here, autocast in TRL).
    tiny     data/toy's SFT model (0.13M parameters) on data/toy's pairs, 8 pairs per step
    smollm2  SmolLM2-135M-Instruct (data/smollm2/prepare.py) on HH rows as chat messages that need no truncation at
             max_length 256 (data/hh/harmless_test_first300.jsonl through data/hh/prepare.py --messages, or --hh=FILE),
             4 pairs per step
    smollm2-lora  the same with LoRA, bfloat16 only: rank 16, alpha 32 on every attention and MLP projection, the base
             in bf16 and the adapters float32 in both. nanoTR runs TR-DPO (its reference adapters move); TRL cannot
             move a PEFT reference (its reference is the base, adapters off), so it runs plain LoRA-DPO, the closest
Each (model, dtype, trainer) runs in its own process, so peak memory is the peak RSS of that process alone (read after
the last timed step, before any checkpoint). Throughput is the mean over the timed steps, after warm-up steps:
    pairs/s    preference pairs per second
    tokens/s   the tokens each trainer runs through the model, padding excluded: prompt + chosen + rejected for
               nanoTR (each prompt once), prompt + chosen + prompt + rejected for TRL
    MFU        8·N·tokens FLOPs per second (policy forward and backward 6N, reference forward 2N per token; LoRA
               6N: the frozen base has no weight gradients) over the machine's matmul peak, measured here with a
               2048 × 2048 matmul in the same dtype (nanoTR computes the head only at response positions, so its true
               FLOPs are somewhat lower)

`python tests/bench_train.py` on 2026-12-07, one run on a quiet machine: AMD EPYC (Zen 4), 2 cores, matmul peak
180 GFLOP/s float32 and 400 bfloat16 (the same machine measured 780-890 bfloat16 on other days: compare rows of one
run only); torch 2.13.0 (CPU), transformers 5.25.0, TRL 1.16.0, PEFT 0.21.2. The tiny model's steps last ~25 ms, so
its rows measure per-step overheads and vary by a third from run to run (nanoTR 294-383 pairs/s, float32).
    model        dtype     trainer  pairs/s  tokens/s  step s  peak GB    MFU
    tiny         float32   nanotr    293.84     13087   0.027     0.43   7.6%
    tiny         float32   trl       313.00     17791   0.026     0.54  10.4%
    tiny         bfloat16  nanotr    268.24     11947   0.030     0.50   3.1%
    tiny         bfloat16  trl       217.09     12339   0.037     0.70   3.2%
    smollm2      float32   nanotr      0.53        92   7.580     5.10  54.7%
    smollm2      float32   trl         0.17        48  22.877     7.83  28.6%
    smollm2      bfloat16  nanotr      0.82       143   4.853     4.69  38.6%
    smollm2      bfloat16  trl         0.26        72  15.243     6.88  19.4%
    smollm2-lora bfloat16  nanotr      0.93       161   4.312     2.39  32.6%
    smollm2-lora bfloat16  trl         0.38       104  10.520     5.07  21.0%
nanoTR/TRL: SmolLM2 3.02x the pairs/s in float32 at 0.65x the peak memory, 3.14x at 0.68x in bf16, LoRA 2.44x at
0.47x; tiny 0.94x and 1.24x. Where it comes from: one row per pair, [prompt, chosen, rejected], with a mask and
positions that give each response the log-probs it would get after the prompt alone (Wang & Hegde 2024; tested equal
to the padded path), so the prompt is computed once; the head and log-softmax only at response positions, in
checkpointed chunks (tests/bench_logps_memory.py); pairs tokenized once; fused AdamW; no FSDP in a world of one.
What remains of the memory is mostly state both trainers hold (float32 policy, reference, gradients, AdamW moments).
On CPUs dtype=auto is float32: ask for bf16 where it is faster (SmolLM2 here: 1.5x; the tiny model: slower).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HH_SAMPLE = REPO / 'data/hh/harmless_test_first300.jsonl'
MODELS = {
    'tiny': dict(init_from=str(REPO / 'data/toy/sft'), pairs=8, max_length=128, warmup=5, steps=30),
    'smollm2': dict(init_from=str(REPO / 'data/smollm2/model'), pairs=4, max_length=256, warmup=2, steps=8),
    'smollm2-lora': dict(init_from=str(REPO / 'data/smollm2/model'), pairs=4, max_length=256, warmup=2, steps=8,
                         lora_rank=16, lora_alpha=32, dtypes=('bfloat16',)),
}
LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']  # train_tr's, in Llama
SETTINGS = dict(beta=0.1, lr=1e-6, tr_alpha=0.6, tr_tau=2, grad_clip=2.0)


def matmul_peak(dtype, n=2048, reps=10):
    """FLOP/s of the best of `reps` n × n matmuls."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_rows(model, folder, hh):
    """The benchmark's rows: exactly (warmup + steps) × pairs, so that both trainers see the same pairs once."""
    spec = MODELS[model]
    n = (spec['warmup'] + spec['steps']) * spec['pairs']
    if model == 'tiny':
        rows = [json.loads(line) for line in (REPO / 'data/toy/train.jsonl').read_text().splitlines()[:n]]
    else:
        from transformers import AutoTokenizer

        from data import pairs as data_pairs
        if not Path(hh).exists():
            raise SystemExit(f'error: {hh} not found; give --hh= an Anthropic HH jsonl file (raw format)')
        subprocess.run([sys.executable, str(REPO / 'data/hh/prepare.py'), f'--raw={hh}', '--messages',
                        f'--out_dir={folder}'], check=True, capture_output=True)
        tokenizer = AutoTokenizer.from_pretrained(spec['init_from'])
        turn_end = data_pairs.end_of_turn(tokenizer)
        rows = []
        for line in (Path(folder) / 'test.jsonl').read_text().splitlines():
            row = json.loads(line)
            prompt, *responses = data_pairs.encode_row(row, tokenizer, 10 ** 9, 10 ** 9, turn_end=turn_end)[1]
            if len(prompt) + max(map(len, responses)) <= spec['max_length']:
                rows.append(row)
        if len(rows) < n:
            raise SystemExit(f'error: {hh} has {len(rows)} rows that fit {spec["max_length"]} tokens, {n} needed')
        rows = rows[:n]
    path = Path(folder) / f'{model}.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return path


def tokens_per_pair(model, path, trainer):
    """Mean tokens per pair as train_tr.py tokenizes the rows: prompt + chosen + rejected (nanoTR's rows), or with
    the prompt once per response (TRL's)."""
    from transformers import AutoTokenizer

    from data import pairs as data_pairs
    spec = MODELS[model]
    tokenizer = AutoTokenizer.from_pretrained(spec['init_from'])
    pairs = data_pairs.load_pairs(str(path), 'train', tokenizer, spec['max_length'], spec['max_length'] - 1,
                                  verbose=False)
    prompts = 1 if trainer == 'nanotr' else 2
    return sum(prompts * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs) / len(pairs)


def run_nanotr(model, dtype, path, out_dir):
    import train_tr
    spec = MODELS[model]
    max_iters = spec['warmup'] + spec['steps']
    cfg = train_tr.get_config([f"--init_from={spec['init_from']}", f'--data={path}', f'--out_dir={out_dir}',
                               f"--batch_size={spec['pairs']}", f"--max_length={spec['max_length']}",
                               f"--max_prompt_length={spec['max_length'] - 1}", f'--max_iters={max_iters}',
                               '--loss=dpo', '--ref_update=soft', '--warmup_iters=0', '--log_interval=1',
                               f'--eval_interval={max_iters + 1}', f'--dtype={dtype}', '--device=cpu',
                               *[f'--{k}={v}' for k, v in SETTINGS.items()],
                               *[f'--{k}={spec[k]}' for k in ('lora_rank', 'lora_alpha') if k in spec]])
    train_tr.train(cfg)
    records = [json.loads(line) for line in (Path(out_dir) / 'metrics.jsonl').read_text().splitlines()]
    timed_steps = [r for r in records if 'step_time' in r][spec['warmup']:]
    return [r['step_time'] for r in timed_steps], timed_steps[-1]['peak_mem_gb']


def run_trl(model, dtype, path, out_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    spec = MODELS[model]
    step_times, peaks = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.start)
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)

    torch.manual_seed(1337)
    lora = 'lora_rank' in spec  # as PEFT users load it: the base in bf16 (PEFT keeps the adapters float32)
    policy = AutoModelForCausalLM.from_pretrained(spec['init_from'], dtype=torch.bfloat16 if lora else torch.float32)
    peft_config = None
    if lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=spec['lora_rank'], lora_alpha=spec['lora_alpha'], target_modules=LORA_TARGETS,
                                 lora_dropout=0.0, task_type='CAUSAL_LM')
    tokenizer = AutoTokenizer.from_pretrained(spec['init_from'])
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=spec['pairs'],
                     max_steps=spec['warmup'] + spec['steps'], max_length=spec['max_length'], beta=SETTINGS['beta'],
                     learning_rate=SETTINGS['lr'], max_grad_norm=SETTINGS['grad_clip'], lr_scheduler_type='constant',
                     sync_ref_model=not lora, ref_model_mixup_alpha=SETTINGS['tr_alpha'],
                     ref_model_sync_steps=SETTINGS['tr_tau'], bf16=dtype == 'bfloat16', use_cpu=True,
                     gradient_checkpointing=False, logging_steps=1, save_strategy='no', report_to=[],
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Timer()], peft_config=peft_config)
    trainer.train()
    return step_times[spec['warmup']:], peaks[-1]


def worker(args):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_rows(args.models, tmp, args.hh)
        step_times, peak = (run_nanotr if args.trainers == 'nanotr' else run_trl)(args.models, args.dtypes, path,
                                                                                 Path(tmp) / 'out')
        print('RESULT ' + json.dumps({'step_time': sum(step_times) / len(step_times), 'peak_gb': peak,
                                      'tokens_per_pair': tokens_per_pair(args.models, path, args.trainers)}))


def main(args):
    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
    trainers = [t for t in args.trainers.split(',') if t != 'trl' or have_trl]
    if 'trl' in args.trainers and not have_trl:
        print('trl is not installed: nanoTR alone (pip install trl in a scratch venv to compare)')
    peaks = {dtype: matmul_peak(getattr(torch, dtype)) for dtype in args.dtypes.split(',')}
    print('matmul peak (2048 x 2048): ' + ', '.join(f'{d} {p / 1e9:.0f} GFLOP/s' for d, p in peaks.items()))
    results = {}
    print(f"{'model':12} {'dtype':9} {'trainer':7} {'pairs/s':>8} {'tokens/s':>9} {'step s':>7} {'peak GB':>8} "
          f"{'MFU':>6}")
    for model in args.models.split(','):
        from transformers import AutoConfig, AutoModelForCausalLM
        with torch.device('meta'):
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(MODELS[model]['init_from'])).parameters())
        for dtype in [d for d in args.dtypes.split(',') if d in MODELS[model].get('dtypes', (d,))]:
            for trainer in trainers:
                proc = subprocess.run([sys.executable, __file__, '--worker', f'--models={model}', f'--dtypes={dtype}',
                                       f'--trainers={trainer}', f'--hh={args.hh}'], capture_output=True, text=True,
                                      env=dict(os.environ, HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false'))
                lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
                if proc.returncode != 0 or not lines:
                    raise SystemExit(f'{model} {dtype} {trainer} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}')
                r = json.loads(lines[0][len('RESULT '):])
                pairs_per_sec = MODELS[model]['pairs'] / r['step_time']
                tokens_per_sec = pairs_per_sec * r['tokens_per_pair']
                mfu = (6 if 'lora_rank' in MODELS[model] else 8) * n_params * tokens_per_sec / peaks[dtype]
                results[model, dtype, trainer] = pairs_per_sec, r['peak_gb']
                print(f"{model:12} {dtype:9} {trainer:7} {pairs_per_sec:8.2f} {tokens_per_sec:9.0f} "
                      f"{r['step_time']:7.3f} {r['peak_gb']:8.2f} {mfu:6.1%}", flush=True)
    for (model, dtype, trainer), (speed, peak) in results.items():
        if trainer == 'trl' and (model, dtype, 'nanotr') in results:
            ours, ours_peak = results[model, dtype, 'nanotr']
            print(f'{model} {dtype}: nanoTR/TRL pairs/s {ours / speed:.2f}x, peak memory {ours_peak / peak:.2f}x')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default='tiny,smollm2,smollm2-lora')
    parser.add_argument('--dtypes', default='float32,bfloat16')
    parser.add_argument('--trainers', default='nanotr,trl')
    parser.add_argument('--hh', default=str(HH_SAMPLE), help='raw Anthropic HH jsonl for the SmolLM2 rows')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    worker(parsed) if parsed.worker else main(parsed)
