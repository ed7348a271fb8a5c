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

The models are loaded in the compute dtype (dtype=auto: bfloat16 on CUDA, float32 elsewhere), without gradients;
under torchrun each rank holds one whole replica of the policy and of ref (sampling is not sharded). A prompt is fit to
max_prompt_length by the trainer's rule (data/pairs.py fit_example: a chat prompt drops whole old exchanges first);
`prompt` is its text and, for chat messages, `prompt_messages` the messages kept, which judge.py mode=reward renders
with each reward model's own template (null for a text prompt).

Batches are formed globally (batch i is the i-th slice of the prompts, each repeated num_samples times) and each is
seeded from (seed, i), so a sample does not depend on the number of processes or on resuming. Under torchrun, rank r
runs batches r, r+world, ...; every rank appends to its own out.part<r> file, and rank 0 merges them in prompt order.
Rank 0 alone reads the files that every rank needs to know of (the fingerprints of model, ref and data; the rows of an
earlier run) and sends what it found to the others. An interrupted run (Ctrl-C too) is continued: batches already in
out or in any part file are not sampled again, unless they were sampled otherwise (other settings, or other files at
the same model path: a retrained checkpoint), which is refused. A smaller num_prompts keeps the rows of the prompts it
leaves out; a larger one adds the missing ones. One run at a time writes an out (out.lock); an out that is one of the
inputs, a reward model as init_from or ref, and top_p or seed with greedy decoding (temperature=0) are refused.
"""
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import GenerationConfig

from data.pairs import (check_model_path, check_vocabulary, derived_seed, fingerprint, input_paths, layout,
                        load_pairs, load_tokenizer, padding_id, read_jsonl)
from data.settings import (DEVICE, NOT_A_FOLDER, OutputLock, check_outputs, check_settings, defaults_of, need, one_of,
                           parse_overrides)
from train_tr import load_model, sequence_logps, setup_distributed

# -----------------------------------------------------------------------------
# settings: a setting a line, `name: its check = default  # meaning` (data/settings.py), checked before any work; with
# only=, another value than the default is refused where the setting does nothing
SAMPLING = 'temperature > 0'                    # 0 decodes greedily: nothing random to seed, no distribution to cut
init_from: str = 'out'                          # HF checkpoint directory (train_tr.py's out_dir) or hub name
ref: str = ''                                   # reference (usually the SFT model) for logp_ref and kl; '' = none
data: str = 'data/toy'                          # any data source train_tr.py accepts
split: str = 'test'                             # the split whose prompts are sampled (a HF dataset without test:
                                                # validation)
num_prompts: need('num_prompts >= 0') = 0       # the first this many usable prompts of the split; 0 = all
num_samples: need('num_samples >= 1') = 1       # completions per prompt
max_prompt_length: need('max_prompt_length >= 1') = 64  # prompts are fit to this many tokens as in training (chat:
                                                # whole old exchanges first)
max_new_tokens: need('max_new_tokens >= 1') = 64  # a completion stops at EOS or after this many tokens
temperature: need('temperature >= 0') = 1.0     # 0 = greedy
top_p: need('0 < top_p <= 1', only=SAMPLING) = 1.0  # nucleus sampling: the smallest set of tokens with this much
                                                # probability; 1 = all
batch_size: need('batch_size >= 1') = 8         # sequences per generate call (must stay the same when resuming)
seed: need('0 <= seed < 2**64', only=SAMPLING) = 1337  # with the batch number, the seed of each batch's samples
device: DEVICE = 'auto'                         # auto | cpu | cuda
dtype: one_of('auto', 'float32', 'bfloat16') = 'auto'  # compute dtype of the models: auto (bfloat16 on CUDA, else
                                                # float32) | float32 | bfloat16
out: NOT_A_FOLDER = ''                          # JSONL output path; '' prints the samples (one process only)
defaults = defaults_of(globals())

# what a sample depends on, written on every line; resuming needs them unchanged (dtype: the compute dtype resolved).
# The fingerprints of the models' and the data's files (data/pairs.py) tell a checkpoint retrained at the same path
# from the one sampled before. num_samples and batch_size decide which prompts share a batch, and so its seed;
# num_prompts only adds batches or leaves them out, so it may change.
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


SAFETENSORS_DTYPES = {'F32': torch.float32, 'BF16': torch.bfloat16, 'F16': torch.float16}


def load_for_sampling(name, dtype, device):
    """The causal LM `name` in `dtype` on `device`, without gradients, in eval mode: train_tr.load_model's model with
    its weights read one tensor at a time from a local safetensors checkpoint (one file, or the shards of an index)
    into the model built on the meta device, each converted on its way to its place. from_pretrained of a float32
    checkpoint in bfloat16 held the float32 weights beside the bfloat16 ones (SmolLM2-135M: 0.90 GB of RSS to load
    0.27 GB), on every rank of a host at once. Anything else (a hub name, .bin files, names that transformers would
    convert while loading) goes through load_model."""
    folder = Path(name)
    index = folder / 'model.safetensors.index.json'
    files = sorted(set(json.loads(index.read_text())['weight_map'].values())) if index.is_file() else \
        ['model.safetensors'] if (folder / 'model.safetensors').is_file() else []
    if files:
        model = load_model(name, dtype=dtype, meta=True).to_empty(device=device)
        model.tie_weights()  # to_empty gave the tied embedding and head each their own storage
        for module in model.modules():  # RoPE's inv_freq: in no checkpoint, computed as transformers initializes it
            if module._non_persistent_buffers_set:
                model._init_weights(module)
        if fill_from_safetensors(model, [folder / file for file in files]):
            try:
                model.generation_config = GenerationConfig.from_pretrained(name)
            except OSError:  # no generation_config.json: from_pretrained derives it from the model's config
                model.generation_config = GenerationConfig.from_model_config(model.config)
            return contiguous_head(model.requires_grad_(False).eval())
    return contiguous_head(load_model(name, dtype=dtype).to(device).requires_grad_(False).eval())


def contiguous_head(model):
    """The model, its head fed contiguous input. generate feeds it the last position, a [B, 1, H] view of [B, T, H],
    and on a CPU in bfloat16 matmul then expands the head's weight once per row: B copies (SmolLM2, B = 4: 0.21 GB)."""
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    return model


def fill_from_safetensors(model, paths):
    """Copies each tensor of the safetensors files into the model's tensor of that name, one at a time, read with
    plain reads (a memory map would keep every page read resident until the end). False, the model partly filled,
    where a name, shape or dtype is not the model's, or a tensor of the model is in no file."""
    targets, filled = model.state_dict(), set()
    for path in paths:
        with open(path, 'rb') as f:
            size = int.from_bytes(f.read(8), 'little')
            header, start = json.loads(f.read(size)), 8 + size
            for key, info in header.items():
                if key == '__metadata__':
                    continue
                target = targets.get(key)
                if target is None or info['dtype'] not in SAFETENSORS_DTYPES or list(target.shape) != info['shape']:
                    return False
                begin, end = info['data_offsets']
                buffer = bytearray(end - begin)
                f.seek(start + begin)
                f.readinto(buffer)
                if buffer:
                    target.copy_(torch.frombuffer(buffer, dtype=SAFETENSORS_DTYPES[info['dtype']]).view(target.shape))
                filled.add(target.data_ptr())
    return all(t.data_ptr() in filled for t in targets.values() if t.numel())


def drop_partial_line(path):
    """Cuts a file after its last newline, in place, so that appending continues on a clean line."""
    if Path(path).exists():
        os.truncate(path, Path(path).read_bytes().rfind(b'\n') + 1)


def check_resumable(path, rows, settings):
    """Stops, naming the first difference, when rows of an earlier run were sampled otherwise than settings say."""
    for row in rows:
        if 'prompt_messages' not in row:  # a chat prompt's rows would be scored by two rules in one file
            raise SystemExit(f'error: {path} was written by an older sample.py (its rows have no prompt_messages); use '
                             'another out= or delete it')
        key = next((k for k in SETTINGS if row.get(k) != settings[k]), None)
        if key:
            files = ' (its files changed)' if key.endswith('_fingerprint') else ''
            raise SystemExit(f'error: {path} was sampled with {key}={row.get(key)!r}, now {settings[key]!r}{files}; '
                             'use another out= or delete it')


def sample(cfg):
    check_settings(cfg, globals())
    rank, world, device = setup_distributed(cfg['device'])
    if not cfg['out'] and world > 1:
        raise SystemExit('error: torchrun needs out= (each rank writes a part file)')
    dtype = cfg['dtype'] if cfg['dtype'] != 'auto' else 'bfloat16' if device.type == 'cuda' else 'float32'
    with ExitStack() as stack:  # rank 0's lock on out, held until the end
        shared = [None]
        if rank == 0:
            try:
                shared = [prepare(cfg, dtype, stack)]
            except SystemExit as e:  # the refusal, printed by rank 0 alone
                shared = [e]
        dist.broadcast_object_list(shared)  # also the barrier: every part file was read before any is changed
        if isinstance(shared[0], SystemExit):
            raise shared[0] if rank == 0 else SystemExit(1)
        return sample_prepared(cfg, rank, world, device, dtype, *shared[0])


def prepare(cfg, dtype, stack):
    """On rank 0, before any work: the inputs' checks, the lock on out (entered into `stack`), the settings with the
    fingerprints of the models' and the data's files (read once, not by every rank: 8 ranks read an 8B model 8 times)
    and the (index, sample) of the rows of an earlier run, checked to be sampled as this run samples."""
    for key in ('init_from', 'ref'):
        if cfg[key]:
            check_model_path(cfg[key], key, reward_model=False)
    check_outputs([('out', cfg['out'])], [input_paths('init_from', cfg['init_from']), input_paths('ref', cfg['ref']),
                                          input_paths('data', cfg['data'], splits=True)])
    check_vocabulary(load_tokenizer(cfg['init_from'], 'init_from'), cfg['ref'], 'ref')
    out = Path(cfg['out'] or os.devnull)
    if cfg['out']:
        stack.enter_context(OutputLock(f'{out}.lock', cfg['out'], 'out'))
    # an earlier run's rows are checked first: a refusal need not wait for the models
    settings = dict(model=cfg['init_from'], **{k: cfg[k] for k in SETTINGS if k in cfg},
                    model_fingerprint=fingerprint(cfg['init_from']),
                    ref_fingerprint=fingerprint(cfg['ref']) if cfg['ref'] else '',
                    data_fingerprint=fingerprint(cfg['data'], splits=True))
    settings['dtype'] = dtype  # resolved: dtype=auto on a CPU continues a float32 run
    done = set()  # (index, sample) of a finished or interrupted earlier run with any number of processes
    for path in [out, *out.parent.glob(f'{out.name}.part*')] if cfg['out'] else []:
        rows = read_jsonl(path)
        check_resumable(path, rows, settings)
        done |= {(row['index'], row['sample']) for row in rows}
    return settings, done


def sample_prepared(cfg, rank, world, device, dtype, settings, done):
    out, part = Path(cfg['out'] or os.devnull), Path(f"{cfg['out']}.part{rank}")
    tokenizer = load_tokenizer(cfg['init_from'], 'init_from')
    pad_id = padding_id(tokenizer)
    # in the compute dtype, without gradients: float32 weights autocast to bf16 held both copies (SmolLM2-135M and
    # its reference: 1.59 GB of peak RSS over the imports, 0.66 GB so; tests/test_sample.py measures it)
    policy, ref = (load_for_sampling(name, getattr(torch, dtype), device) if name else None
                   for name in (cfg['init_from'], cfg['ref']))
    # max_length = max_prompt_length: only the prompt is kept, fit to max_prompt_length as training fits it
    pairs = load_pairs(cfg['data'], cfg['split'], tokenizer, cfg['max_prompt_length'], cfg['max_prompt_length'],
                       need_rejected=False, verbose=rank == 0, texts=True)[:cfg['num_prompts'] or None]
    prompts = [(text, prompt if isinstance(prompt, list) else None) for prompt, text, _ in pairs]  # text, messages
    prompt_ids = [pair.prompt.tolist() for _, _, pair in pairs]
    items = [(i, j) for i in range(len(prompts)) for j in range(cfg['num_samples'])]
    batches = [items[start:start + cfg['batch_size']] for start in range(0, len(items), cfg['batch_size'])]

    todo = [(b, batch) for b, batch in enumerate(batches) if b % world == rank and any(i not in done for i in batch)]
    if cfg['out']:
        drop_partial_line(part)
    rows = []
    # the bar is closed also when interrupted, so that the error line starts a line of its own
    with open(part if cfg['out'] else os.devnull, 'a') as f, \
            tqdm(todo, desc='sampling', disable=rank != 0, dynamic_ncols=True) as bar:
        for b, batch in bar:
            # the seed of a batch depends only on (seed, batch number), not on the rank or on what ran before
            torch.manual_seed(derived_seed(cfg['seed'], b))
            completions = generate(policy, [prompt_ids[i] for i, _ in batch], pad_id, tokenizer.eos_token_id,
                                   cfg['max_new_tokens'], cfg['temperature'], cfg['top_p'])
            batch_rows = [dict(prompt=prompts[i][0], prompt_messages=prompts[i][1],
                               completion=tokenizer.decode(c, skip_special_tokens=True), index=i, sample=j,
                               tokens=len(c), **settings) for (i, j), c in zip(batch, completions)]
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
        parts, merged = list(out.parent.glob(f'{out.name}.part*')), {}
        for path in [out, *parts]:
            merged.update({(row['index'], row['sample']): row for row in read_jsonl(path)})
        rows = [merged[key] for key in sorted(merged)]
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
    config = parse_overrides(sys.argv[1:], defaults, __file__)
    try:
        sample(config)
    except KeyboardInterrupt:  # Ctrl-C: one line (rank 0); each batch written is whole in a part file, kept for a rerun
        if int(os.environ.get('RANK', 0)):
            raise SystemExit(1)
        kept = f"the finished batches are kept in {config['out']}.part*: rerun the same command to continue" \
            if config['out'] else 'nothing is kept (out=)'
        raise SystemExit(f'error: interrupted; {kept}')
    dist.destroy_process_group()
