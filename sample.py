"""
sample.py: completions from a train_tr.py checkpoint (or any HF causal LM) for the prompts of a dataset split, read,
rendered and tokenized exactly as train_tr.py does; optionally with each completion's log-prob under a reference
model, so that quality can be plotted against KL from the SFT policy.

    python sample.py --init_from=out --num_prompts=4 --temperature=0             # print greedy completions
    python sample.py --init_from=out --ref=data/toy/sft --out=samples/tr.jsonl     # JSONL with logp_policy/logp_ref/kl
    torchrun --standalone --nproc_per_node=8 sample.py --init_from=out/hh-tr-dpo --data=data/hh --out=tr.jsonl

Each output line: prompt, completion, index (of the prompt in the split), sample (0..num_samples-1), tokens, model,
the sampling settings, fingerprints of the files of model, ref and data and, with ref=, logp_policy, logp_ref and
kl = logp_policy − logp_ref, the summed log-probs of the exact sampled tokens (EOS included) given the prompt. Their
mean is a Monte Carlo estimate of
KL(π‖π_ref) = E_{y~π}[log π(y) − log π_ref(y)] only when y is drawn from π itself: temperature=1, top_p=1
(top_k is always off). The log-probs are those of π, not of the tempered or truncated distribution q the samples
came from, so otherwise the mean is E_{y~q}[log π(y) − log π_ref(y)]: a usable x-axis, but not a KL. Completions cut
at max_new_tokens make it the KL between the distributions of the first max_new_tokens tokens (a lower bound).

Batches are formed globally (batch i is the i-th slice of the prompts, each repeated num_samples times) and each is
seeded from (seed, i), so a sample does not depend on the number of processes or on resuming. Under torchrun, rank r
runs batches r, r+world, ...; every rank appends to its own out.part<r> file, and rank 0 merges them in prompt order.
An interrupted run is continued: batches already in out or in any part file are not sampled again, unless they were
sampled otherwise (other settings, or other files at the same model path: a retrained checkpoint), which is refused.
A smaller num_prompts keeps the rows of the prompts it leaves out; a larger one adds the missing ones.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoTokenizer

from data.pairs import derived_seed, fingerprint, layout, load_pairs, padding_id, read_jsonl
from data.pairs import check_model_path
from data.settings import AT_LEAST_1, DEVICES, NOT_NEGATIVE, parse_overrides
from data.settings import check_values as check_settings, choice as one_of
from train_tr import load_model, sequence_logps, setup_distributed

defaults = dict(
    init_from='out',        # HF checkpoint directory (train_tr.py's out_dir) or hub name
    ref='',                 # reference (usually the SFT model) for logp_ref and kl; '' = none
    data='data/toy',        # any data source train_tr.py accepts
    split='test',           # the split whose prompts are sampled (a HF dataset without test: validation)
    num_prompts=0,          # the first this many usable prompts of the split; 0 = all
    num_samples=1,          # completions per prompt
    max_prompt_length=64,   # prompts are cut to this many tokens as in training (chat: oldest turns first)
    max_new_tokens=64,      # a completion stops at EOS or after this many tokens
    temperature=1.0,        # 0 = greedy
    top_p=1.0,              # nucleus sampling: the smallest set of tokens with this much probability; 1 = all
    batch_size=8,           # sequences per generate call (must stay the same when resuming)
    seed=1337,              # with the batch number, the seed of each batch's samples
    device='auto',          # auto | cpu | cuda
    dtype='float32',        # compute dtype: float32 | bfloat16 (autocast over the float32 weights, as train_tr.py)
    out='',                 # JSONL output path; '' prints the samples (one process only)
)
VALID = {  # setting: (test of its value, what it must be); checked before any model or file is read
    **dict.fromkeys(('num_samples', 'max_prompt_length', 'max_new_tokens', 'batch_size'), AT_LEAST_1),
    **dict.fromkeys(('num_prompts', 'temperature'), NOT_NEGATIVE),
    'top_p': (lambda v: 0 < v <= 1, 'in (0, 1]'), 'device': one_of(*DEVICES), 'dtype': one_of('float32', 'bfloat16'),
    'out': (lambda v: not (v and Path(v).is_dir()), 'a file to write, not a folder'),
}
# what a sample depends on, written on every line; resuming needs them unchanged. The fingerprints of the models' and
# the data's files (data/pairs.py) tell a checkpoint retrained at the same path from the one sampled before.
# num_samples and batch_size decide which prompts share a batch, and so its seed; num_prompts only adds batches or
# leaves them out, so it may change.
SETTINGS = ('model', 'ref', 'data', 'split', 'num_samples', 'max_prompt_length', 'max_new_tokens', 'temperature',
            'top_p', 'seed', 'batch_size', 'dtype', 'model_fingerprint', 'ref_fingerprint', 'data_fingerprint')


def left_pad(sequences, pad_id):
    """(input_ids, attention_mask) with padding on the left, so every prompt ends where generation starts."""
    width = max(map(len, sequences))
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return input_ids, attention_mask


def generate(model, prompt_ids, pad_id, eos_id, max_new_tokens, temperature=0.0, top_p=1.0):
    """Completion ids of each prompt, cut after the first EOS (which is kept) or at max_new_tokens."""
    input_ids, attention_mask = left_pad(prompt_ids, pad_id)
    device = next(model.parameters()).device
    # top_k=0 and repetition_penalty=1 override transformers' default top_k=50 and any checkpoint setting, so that
    # temperature=1, top_p=1 samples from π itself
    settings = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0) \
        if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, **settings)
    completions = []
    for ids in output[:, input_ids.shape[1]:].tolist():
        completions.append(ids[:ids.index(eos_id) + 1] if eos_id in ids else ids)
    return completions


def drop_partial_line(path):
    """Truncates a file after its last newline, so that appending continues on a clean line."""
    if Path(path).exists():
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[:data.rfind(b'\n') + 1])


def check_resumable(path, rows, settings):
    """Stops, naming the first difference, when rows of an earlier run were sampled otherwise than settings say."""
    for row in rows:
        key = next((k for k in SETTINGS if row.get(k) != settings[k]), None)
        if key:
            files = ' (its files changed)' if key.endswith('_fingerprint') else ''
            raise SystemExit(f'error: {path} was sampled with {key}={row.get(key)!r}, now {settings[key]!r}{files}; '
                             'use another out= or delete it')


def sample(cfg):
    check_settings(cfg, VALID)
    rank, world, device = setup_distributed(cfg['device'])
    if not cfg['out'] and world > 1:
        raise SystemExit('error: torchrun needs out= (each rank writes a part file)')
    for key in ('init_from', 'ref'):
        if cfg[key]:
            check_model_path(cfg[key], key)
    # an earlier run's rows are checked first: a refusal need not wait for the models
    settings = dict(model=cfg['init_from'], **{k: cfg[k] for k in SETTINGS if k in cfg},
                    model_fingerprint=fingerprint(cfg['init_from']),
                    ref_fingerprint=fingerprint(cfg['ref']) if cfg['ref'] else '',
                    data_fingerprint=fingerprint(cfg['data']))

    out, part = Path(cfg['out'] or os.devnull), Path(f"{cfg['out']}.part{rank}")
    done = {}  # (index, sample) -> row, from a finished or interrupted earlier run with any number of processes
    for path in [out, *out.parent.glob(f'{out.name}.part*')] if cfg['out'] else []:
        rows = read_jsonl(path)
        check_resumable(path, rows, settings)
        done.update({(row['index'], row['sample']): row for row in rows})

    tokenizer = AutoTokenizer.from_pretrained(cfg['init_from'])
    if cfg['ref'] and AutoTokenizer.from_pretrained(cfg['ref']).get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"error: ref={cfg['ref']} has another tokenizer than init_from={cfg['init_from']}: "
                         'logp_ref scores the sampled token ids, which mean other text under another vocabulary')
    pad_id = padding_id(tokenizer)
    policy = load_model(cfg['init_from']).to(device).eval()
    ref = load_model(cfg['ref']).to(device).eval() if cfg['ref'] else None
    # max_length = max_prompt_length: only the prompt is kept, fit to max_prompt_length as training fits it
    pairs = load_pairs(cfg['data'], cfg['split'], tokenizer, cfg['max_prompt_length'], cfg['max_prompt_length'],
                       need_rejected=False, verbose=rank == 0, texts=True)
    prompts = [text for text, _ in pairs[:cfg['num_prompts'] or None]]
    prompt_ids = [pair.prompt.tolist() for _, pair in pairs[:len(prompts)]]
    items = [(i, j) for i in range(len(prompts)) for j in range(cfg['num_samples'])]
    batches = [items[start:start + cfg['batch_size']] for start in range(0, len(items), cfg['batch_size'])]

    todo = [(b, batch) for b, batch in enumerate(batches) if b % world == rank and any(i not in done for i in batch)]
    if cfg['out']:
        out.parent.mkdir(parents=True, exist_ok=True)
        dist.barrier()  # every rank has read the part files before any is changed
        drop_partial_line(part)
    rows = []
    # bf16 sampling and scoring, about twice as fast on a CPU with bf16 units (README has the figures); the weights stay
    # float32 and are cast once, autocast's cache holding the bf16 copies
    bf16 = torch.autocast(device.type, torch.bfloat16, enabled=cfg['dtype'] == 'bfloat16')
    with open(part if cfg['out'] else os.devnull, 'a') as f, bf16:
        for b, batch in tqdm(todo, desc='sampling', disable=rank != 0, dynamic_ncols=True):
            # the seed of a batch depends only on (seed, batch number), not on the rank or on what ran before
            torch.manual_seed(derived_seed(cfg['seed'], b))
            completions = generate(policy, [prompt_ids[i] for i, _ in batch], pad_id, tokenizer.eos_token_id,
                                   cfg['max_new_tokens'], cfg['temperature'], cfg['top_p'])
            batch_rows = [dict(prompt=prompts[i], completion=tokenizer.decode(c, skip_special_tokens=True), index=i,
                               sample=j, tokens=len(c), **settings) for (i, j), c in zip(batch, completions)]
            if ref is not None:  # the exact sampled ids, scored by the trainer's log-prob code
                scored = layout([(torch.tensor(prompt_ids[i]), [torch.tensor(c)])
                                 for (i, _), c in zip(batch, completions)], pad_id, device)
                with torch.no_grad():
                    logps = [sequence_logps(m, scored)[0].tolist() for m in (policy, ref)]
                for row, lp, lr in zip(batch_rows, *logps):
                    row.update(logp_policy=lp, logp_ref=lr, kl=lp - lr)
            f.writelines(json.dumps(row) + '\n' for row in batch_rows)
            f.flush()
            rows += batch_rows
    if not cfg['out']:
        for row in rows:
            print(f"{row['prompt']}\033[1m{row['completion']}\033[0m\n{'-' * 40}")
        return rows
    dist.barrier()
    if rank == 0:  # merge: every (index, sample) from the old output and all part files, in prompt order; rows of
        # prompts beyond a smaller num_prompts stay (deleting samples is for the user to do)
        parts = list(out.parent.glob(f'{out.name}.part*'))
        for path in [out, *parts]:
            done.update({(row['index'], row['sample']): row for row in read_jsonl(path)})
        rows = [done[key] for key in sorted(done)]
        tmp = out.with_name(out.name + '.tmp')
        tmp.write_text(''.join(json.dumps(row) + '\n' for row in rows))
        os.replace(tmp, out)
        for path in parts:
            path.unlink()
        kls = [row['kl'] for row in rows if 'kl' in row]
        kl_note = f', mean kl {sum(kls) / len(kls):.4f} nats' if kls else ''
        print(f"wrote {len(rows)} samples of {len({row['index'] for row in rows})} prompts to {out}{kl_note}")
    dist.barrier()
    return rows


if __name__ == '__main__':
    sample(parse_overrides(sys.argv[1:], defaults, __file__))
    dist.destroy_process_group()
