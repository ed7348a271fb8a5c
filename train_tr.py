"""
nanoTR: offline preference alignment with a learned reference model, in one file.

For a prompt x and response y, logπ(y) is the sum of the response tokens' log-probabilities, and
    ρ(y) = logπ_θ(y) − logπ_ref(y)          (implicit log-ratio; β·ρ is the implicit reward, logged as rewards/*)
For a preference pair (y_w ≻ y_l) the losses are
    sft  −logπ_θ(y_w), averaged over the response tokens of the global batch
    dpo  −(1−ε)·log σ(β(ρ_w−ρ_l)) − ε·log σ(−β(ρ_w−ρ_l))     DPO (Rafailov et al. 2023, eq. 7); ε = label_smoothing
    ipo  (h − 1/(2β))²,  h = ρ_w/|y_w| − ρ_l/|y_l|            IPO (Azar et al. 2023, eq. 17) with per-token averaged
                                                            log-ratios as in TRL (ipo_normalize=False: summed)
    kto  [λ_D·(1−σ(β(ρ_w−z))) + λ_U·(1−σ(β(z−ρ_l)))] / 2      KTO (Ethayarajh et al. 2024): chosen are desirable,
         z = max(0, mean ρ(y'|x) over mismatched pairs)      rejected undesirable; z detached, one value per step
                                                            from the global batch (x_i with both responses of i+1)
Reward-model distillation (Fisch et al. 2024). A Bradley–Terry reward model r(x, y) is trained with
    rm        −log σ(r(y_w) − r(y_l)) + c·(r(y_w) + r(y_l))²  (c = rm_center_coef, TRL / Eisenstein et al. 2023)
pairs are labelled with k reward models (judge.py mode=label: Δr_i = r_i(y_w) − r_i(y_l)), and with the implicit
reward margin m = β(ρ_w − ρ_l) and KL = −(ρ_w + ρ_l)/2, an estimate of KL(π_ref‖π_θ) on the dataset responses:
    distill   (m − Δr)²                                  d-DPO; Δr = Δr_1, or the ensemble mean (distill_reduce)
    edistill  min_i (m − Δr_i)² + γ·KL                   e-DPO: pessimistic over k reward models; γ = pessimism_gamma
    pdpo      dpo + γ·KL                                 p-DPO
Trust region (TR-DPO / TR-IPO / TR-KTO; Gorbatovski, Shaposhnikov et al., ICLR 2025, §3): the loss is unchanged, only
π_ref moves. After optimizer step k, when k % τ == 0:
    soft   θ_ref ← α·θ + (1−α)·θ_ref        (ref_update=soft, tr_alpha=α, tr_tau=τ; τ=1 mixes every step)
    hard   θ_ref ← θ                        (ref_update=hard, tr_tau=τ)
With α=0 or ref_update=none this is plain DPO/IPO/KTO against the fixed initial (SFT) model. The update works the
same for distill, edistill and pdpo (trust-region distillation, a combination neither paper ran).

Run:
    python train_tr.py                                   # TR-DPO on the gold-reward toy in data/toy, CPU, ~15 s
    python train_tr.py --loss=ipo --ref_update=hard --tr_tau=16
    python train_tr.py --loss=rm --out_dir=out/rm                        # a reward model; judge.py labels pairs
    python train_tr.py --loss=edistill --data=out/labels                 # distillation from the labelled pairs
    torchrun --standalone --nproc_per_node=8 train_tr.py config.py --data=data/hh --init_from=EleutherAI/pythia-2.8b
Every setting below can be overridden with --key=value, or by a Python config file of `key = value` lines.
"""
import ast
import copy
import fcntl
import io
import json
import math
import os
import re
import resource
import shutil
import sys
import time
import tokenize
import types
from collections import Counter, namedtuple
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# -----------------------------------------------------------------------------
# config: defaults run TR-DPO on the toy that data/toy ships; the comments give the papers' values
# I/O
out_dir = 'out'                 # the run's folder: HF checkpoint, state.pt, metrics.jsonl
init_from = 'data/toy/sft'      # policy: HF hub name or local HF directory (usually the SFT model)
ref_from = ''                   # reference at step 0: '' = same weights as init_from
resume = False                  # continue the run saved in out_dir (weights, reference, optimizer, data position)
eval_interval = 25              # evaluate and save a checkpoint every this many iterations (and at the end)
eval_pairs = 200                # at most this many held-out pairs per evaluation
log_interval = 5                # write a metrics.jsonl line every this many iterations
snapshots = False               # also keep the HF model of every evaluation in out_dir/iter_N (curves over training)
wandb_log = False               # also log to Weights & Biases (needs `pip install wandb`)
wandb_project = 'nanotr'        # wandb: the project to log to
wandb_run_name = ''             # wandb: the run's name; '' = wandb chooses
# data
data = 'data/toy'               # .jsonl/.json/.parquet file, a folder with train.* and test.*, or a HF dataset name
max_length = 128                # prompt + response tokens
max_prompt_length = 64          # the prompt keeps its last this many tokens when a pair is too long
# loss
loss = 'dpo'                    # sft | rm | dpo | ipo | kto | distill | edistill | pdpo
beta = 0.1                      # KL strength β (TR-DPO paper: 0.05 on HH and TL;DR)
label_smoothing = 0.0           # dpo: assumed label-noise rate ε (cDPO); 0 = DPO
ipo_normalize = True            # ipo: per-token averaged log-ratios (TRL); False = summed
kto_desirable_weight = 1.0      # kto: λ_D
kto_undesirable_weight = 1.0    # kto: λ_U
rm_center_coef = 0.0            # rm: weight c of the reward-centring term c·(r_w + r_l)² (TRL suggests 0.01)
distill_reduce = 'first'        # distill: target margin of the first reward model, or 'mean' over the ensemble
edistill_min = 'example'        # edistill: min over reward models per pair, or 'batch': of the global micro-batch mean
pessimism_gamma = 0.1           # edistill, pdpo: γ, weight of the KL(π_ref‖π_θ) term (ours; the paper tunes it)
# trust region
ref_update = 'soft'             # none | soft | hard
tr_alpha = 0.1                  # soft: weight of the policy in the mix (paper: 0.6; the 300-step toy run: 0.1)
tr_tau = 25                     # update every this many optimizer steps; 1 = every step (paper, hard update: 512)
# optimization
batch_size = 16                 # preference pairs per optimizer step, over all processes
grad_accum = 1                  # micro-steps per optimizer step (each process takes batch_size/world/grad_accum pairs)
lr = 2e-4                       # AdamW peak learning rate (paper: 1e-6 for Pythia 2.8B)
weight_decay = 0.0              # AdamW weight decay
warmup_iters = 5                # linear warm-up, then constant (as in the DPO repository)
max_iters = 300                 # optimizer steps
grad_clip = 2.0                 # max gradient norm (paper: 2); 0 disables
# system
device = 'auto'                 # auto | cpu | cuda
dtype = 'auto'                  # compute dtype: auto (bfloat16 on CUDA, else float32) | float32 | bfloat16
grad_checkpoint = False         # activation checkpointing of each decoder layer
peak_flops = 989e12             # per-device peak for MFU (H100 dense bf16)
seed = 1337                     # data order and the reward model's score-head initialization
CONFIG_KEYS = [k for k, v in list(globals().items())
               if not k.startswith('_') and isinstance(v, (bool, int, float, str))]
REF_UPDATES = ('none', 'soft', 'hard')
DEVICES = ('auto', 'cpu', 'cuda')


def parse_overrides(argv, defaults, source):
    """defaults, then each argument in order: a Python config file (`name.py`, lines of `key = value`), or
    --key=value (the value is a Python literal, or else a bare string). -h or --help prints the settings of `source`,
    the script the defaults belong to. Anything else, unknown keys, and values of another type than the default are
    errors of one line (SystemExit), as data errors are."""
    if '-h' in argv or '--help' in argv:
        print(settings_help(source, defaults))
        raise SystemExit(0)
    cfg = dict(defaults)
    for arg in argv:
        if '=' in arg:
            key, value = arg.removeprefix('--').split('=', 1)
            if not isinstance(cfg.get(key), str):  # string settings take the text as is (--wandb_run_name=2024)
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    pass  # left as a string, for the type check below
            overrides = {key: value}
        elif arg.startswith('-'):
            raise SystemExit(f'error: {arg}: settings are given as --key=value (--help lists them)')
        elif not arg.endswith('.py'):  # `python train_tr.py mydata.jsonl` must not run the data as Python
            raise SystemExit(f'error: {arg} is not a config file (a .py file of `key = value` lines); '
                             f'data is given as --data={arg}')
        elif not Path(arg).is_file():
            raise SystemExit(f'error: config file {arg} not found')
        else:  # a config file may import and compute: names that are not settings are its own, unless plain data
            namespace = {}
            try:
                exec(Path(arg).read_text(), namespace)
            except Exception as e:
                raise SystemExit(f'error: config file {arg}: {type(e).__name__}: {e}')
            overrides = {k: v for k, v in namespace.items() if k in cfg or (
                not k.startswith('_') and isinstance(v, (bool, int, float, str)))}  # a setting set to None is checked
        for key, value in overrides.items():
            if key not in cfg:
                raise SystemExit(f'error: unknown config key {key!r} (from {arg!r}); known keys: {", ".join(cfg)}')
            default = cfg[key]
            if isinstance(default, float) and type(value) is int:
                value = float(value)
            if type(value) is not type(default):
                raise SystemExit(f'error: {key} must be {type(default).__name__}, got {value!r} (from {arg!r})')
            cfg[key] = value
    return cfg


def settings_help(source, defaults):
    """--help text: the first paragraph of the script's docstring, then each setting with its default and the
    comment on its line in `source` (module-level `key = value` lines, or the keywords of `defaults = dict(...)`),
    so that those comments are the one place a setting is described."""
    text = Path(source).read_text()
    comments = {t.start[0]: t.string.lstrip('#').strip()
                for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT}
    tree = ast.parse(text)
    lines = {}  # setting -> (its line, its default as written)
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == 'defaults' and isinstance(node.value, ast.Call):
                lines.update({k.arg: (k.lineno, ast.get_source_segment(text, k.value)) for k in node.value.keywords})
            else:
                lines.setdefault(node.targets[0].id, (node.lineno, ast.get_source_segment(text, node.value)))

    def shown(key, value):  # as typed in a shell: strings bare, other values as written in the source
        return (value or "''") if isinstance(value, str) else lines[key][1] if key in lines else repr(value)
    rows = [(f'--{k}={shown(k, v)}', comments.get(lines.get(k, (0,))[0], '')) for k, v in defaults.items()]
    width = max(len(flag) for flag, _ in rows)
    return '\n'.join([ast.get_docstring(tree).split('\n\n')[0], '',
                      f'usage: python {Path(source).name} [config.py ...] [--key=value ...]   (settings, defaults):',
                      *(f'  {flag:<{width}}  {meaning}'.rstrip() for flag, meaning in rows)])


def get_config(argv):
    """The training config: the module-level defaults above with argv applied, checked."""
    cfg = parse_overrides(argv, {k: globals()[k] for k in CONFIG_KEYS}, __file__)
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Fail before any model is loaded, in one line, on settings that cannot work."""
    def need(ok, message):
        if not ok:
            raise SystemExit(f'error: {message}')
    for key, value in cfg.items():
        need(not isinstance(value, float) or math.isfinite(value), f'{key} must be finite, got {value}')
    need(cfg['loss'] in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {cfg['loss']!r}")
    need(cfg['ref_update'] in REF_UPDATES, f"ref_update must be one of {REF_UPDATES}, got {cfg['ref_update']!r}")
    need(0.0 <= cfg['tr_alpha'] <= 1.0, 'tr_alpha must be in [0, 1]')
    need(cfg['tr_tau'] >= 1, 'tr_tau must be >= 1')
    need(cfg['beta'] > 0, 'beta must be > 0')
    need(0.0 <= cfg['label_smoothing'] < 0.5, 'label_smoothing must be in [0, 0.5)')
    need(0 < cfg['max_prompt_length'] < cfg['max_length'], 'need 0 < max_prompt_length < max_length')
    need(cfg['batch_size'] >= 1 and cfg['grad_accum'] >= 1 and cfg['max_iters'] >= 1,
         'batch_size, grad_accum and max_iters must be >= 1')
    need(cfg['eval_interval'] >= 1 and cfg['log_interval'] >= 1, 'eval_interval and log_interval must be >= 1')
    need(cfg['eval_pairs'] >= 0, 'eval_pairs must be >= 0 (0: no evaluation)')
    need(cfg['dtype'] in ('auto', 'float32', 'bfloat16'), 'dtype must be auto, float32 or bfloat16')
    need(cfg['device'] in DEVICES, f"device must be one of {DEVICES}, got {cfg['device']!r}")
    need(cfg['distill_reduce'] in ('first', 'mean'), 'distill_reduce must be first or mean')
    need(cfg['edistill_min'] in ('example', 'batch'), 'edistill_min must be example or batch')
    need(cfg['pessimism_gamma'] >= 0 and cfg['rm_center_coef'] >= 0, 'pessimism_gamma and rm_center_coef must be >= 0')
    need(not LOSSES[cfg['loss']].mismatched or cfg['batch_size'] >= 2,
         'kto needs batch_size >= 2 (its mismatched pairs)')
    need(cfg['kto_desirable_weight'] >= 0 and cfg['kto_undesirable_weight'] >= 0,
         'kto_desirable_weight and kto_undesirable_weight must be >= 0')
    # a negative clip flips the gradient, a negative warm-up gives a negative (or at -1 an undefined) learning rate
    need(cfg['grad_clip'] >= 0, 'grad_clip must be >= 0 (0 disables clipping)')
    need(cfg['warmup_iters'] >= 0, 'warmup_iters must be >= 0')
    need(cfg['lr'] >= 0 and cfg['weight_decay'] >= 0 and cfg['peak_flops'] > 0,
         'lr and weight_decay must be >= 0, peak_flops > 0')


# -----------------------------------------------------------------------------
# setup: one process is a world of one, so the same FSDP code path runs with `python` and with `torchrun`
def resolve_device(name):
    if name not in DEVICES:
        raise SystemExit(f'error: device must be one of {DEVICES}, got {name!r}')
    if name == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'error: device=cuda, but this torch ({torch.__version__}) sees no CUDA device (a CPU-only '
                         'build, or no GPU visible); use device=cpu or device=auto')
    return torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if name == 'auto' else name)


def check_model_path(name, setting):
    """Stops in one line on a model that is neither an HF model folder here nor loadable from the hub (transformers
    would report a missing folder as 'Repo id must be in the form ...')."""
    from transformers import AutoConfig
    if not Path(name).exists() and (name.startswith('.') or not re.fullmatch(r'[\w.-]+(/[\w.-]+)?', name)):
        raise SystemExit(f'error: {setting}={name} not found (no such folder)')
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = 'the folder is not an HF model' if Path(name).exists() else \
            'no such folder, and not loadable from the hub'
        raise SystemExit(f'error: {setting}={name}: {where} ({" ".join(str(e).split())})')


def setup_distributed(device_name):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python gets a 1-rank group."""
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = resolve_device(device_name)
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if not dist.is_initialized():
        if 'RANK' in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device


# -----------------------------------------------------------------------------
# data: canonical rows {"prompt", "chosen", "rejected"}; text or chat-message lists
DATA_SUFFIXES = ('.jsonl', '.json', '.parquet')  # in any case: .JSONL too


def read_text(path):
    """A UTF-8 file's text, without the byte-order mark some editors write (it would make the first row unreadable).
    A file in another encoding, or binary, stops the run, naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise SystemExit(f'error: {path} is not UTF-8 text ({e.reason} at line {line}, byte {e.start}); '
                         'save it as UTF-8')


def jsonl_lines(text):
    """JSONL lines end at '\\n' only: str.splitlines() also cuts at U+2028, U+2029, U+0085 and other characters
    that json.dumps(ensure_ascii=False) writes raw inside strings."""
    return text.split('\n')


def read_jsonl(path):
    """The complete JSON lines of a file (a line cut short by a kill, or not JSON, is left out); [] if it does not
    exist."""
    if not Path(path).exists():
        return []
    rows = []
    for line in jsonl_lines(read_text(path))[:-1]:  # the last piece follows the last newline: empty, or cut short
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def read_rows(source, split):
    """(rows, name) of one split; rows is None when the source has no such split, and name then says what was
    looked for. Unparseable lines become None rows."""
    path = Path(source)
    if path.is_dir():
        found = sorted(path.glob(f'{split}.*'))
        files = [f for f in found if f.suffix.lower() in DATA_SUFFIXES]
        if len(files) > 1:  # which one is meant cannot be guessed
            raise SystemExit(f'error: {path} has {" and ".join(f.name for f in files)}: keep one {split} file')
        if not files:
            ignored = f' ({", ".join(f.name for f in found)} not read: the name must end in .jsonl, .json or .parquet)'
            return None, f'no {split}.jsonl, {split}.json or {split}.parquet in {path}' + (ignored if found else '')
        path = files[0]
    elif path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise SystemExit(f'error: {path}: a data file must end in .jsonl (one JSON object per line), .json or '
                             '.parquet')
        if split != 'train':
            return None, f'no {split} split in {path} (a single file is the train split)'
    elif path.suffix.lower() in DATA_SUFFIXES + ('.txt',) or source.startswith(('.', '/', '~')):
        raise SystemExit(f'error: data file not found: {path}')
    else:  # a Hugging Face dataset name: its test split, or its validation split for evaluation
        import datasets
        try:
            splits = datasets.load_dataset(source)
        except Exception as e:  # the hub's many error types; what matters is the one line
            raise SystemExit(f'error: data={source} is no file or folder here, and datasets.load_dataset failed: '
                             f'{" ".join(str(e).split())}')
        names = [split] if split == 'train' else [split, 'validation']
        name = next((n for n in names if n in splits), None)
        return (None if name is None else splits[name].to_list()), f'{source}[{name or split}]'
    if path.suffix.lower() == '.parquet':
        import datasets
        return datasets.Dataset.from_parquet(str(path)).to_list(), str(path)
    text = read_text(path)
    if path.suffix.lower() == '.json' and text.lstrip().startswith('['):
        try:
            return json.loads(text), str(path)
        except json.JSONDecodeError as e:
            raise SystemExit(f'error: {path} is not a valid JSON array: {e}')
    rows = []
    for line in jsonl_lines(text):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
    return rows, str(path)


def is_messages(value):
    return (isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str) for m in value))


def render_response(tokenizer, prompt, prompt_text, response):
    """A response as text. A message-list response is what the chat template adds after the prompt (TRL's rule)."""
    if isinstance(response, str):
        return response
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError('the chat template does not render prompt+response as an extension of the prompt')
    return full[len(prompt_text):]


def is_valid_unicode(text):
    """False for text holding a lone surrogate (valid JSON, e.g. "\\ud83c" from a cut emoji): no tokenizer takes it."""
    return not re.search('[\ud800-\udfff]', text)


def render_row(row, tokenizer, need_rejected=True):
    """(prompt_text, chosen_text, rejected_text or None), or a short reason why the row is unusable."""
    if not isinstance(row, dict):
        return 'not a JSON object'
    keys = ('prompt', 'chosen', 'rejected') if need_rejected else ('prompt', 'chosen')
    if any(row.get(k) is None for k in keys):
        return 'missing key'
    prompt = row['prompt']
    if not (isinstance(prompt, str) or is_messages(prompt)):
        return 'non-text field'
    responses = [row[k] for k in keys[1:]]
    if not all(isinstance(r, str) or (is_messages(r) and isinstance(prompt, list)) for r in responses):
        return 'non-text field'
    if isinstance(prompt, list) and not tokenizer.chat_template:
        return 'messages without a chat template'
    if isinstance(prompt, list):
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        prompt_text = prompt
    try:
        texts = [render_response(tokenizer, prompt, prompt_text, r) for r in responses]
    except ValueError:
        return 'chat template mismatch'
    if not all(is_valid_unicode(t) for t in (prompt_text, *texts)):
        return 'invalid Unicode'
    if not all(t.strip() for t in texts):
        return 'empty response'
    if need_rejected and texts[0] == texts[1]:
        return 'identical responses'
    return prompt_text, texts[0], texts[1] if need_rejected else None


def end_of_turn(tokenizer):
    """What the chat template writes after an assistant message's text ('<|im_end|>\\n' for ChatML), or '' when it
    writes nothing that ends a turn (no template, or a plain-text one like data/toy's)."""
    if not tokenizer.chat_template:
        return ''
    marker = '\x00nanotr\x00'
    text = tokenizer.apply_chat_template([{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': marker}],
                                         tokenize=False)
    return text[text.rfind(marker) + len(marker):] if marker in text else ''


def tokenize_prompt(tokenizer, prompt):
    """Prompt ids with BOS exactly where the model expects one: the tokenizer adds it for models that use it
    (Llama) and not for others (Pythia); a chat template that already wrote it into the text is not doubled."""
    prompt_ids = tokenizer(prompt).input_ids
    if len(prompt_ids) > 1 and prompt_ids[0] == prompt_ids[1] == tokenizer.bos_token_id:
        prompt_ids = prompt_ids[1:]
    return prompt_ids


def tokenize_response(tokenizer, text, turn_end=''):
    """Response ids ending the sequence: EOS is appended to plain text, unless the text already ends with EOS or
    with the chat template's end of turn (a message-list response ends with it, and TRL appends nothing after it)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if (turn_end.strip() and text.endswith(turn_end)) or ids[-1:] == [tokenizer.eos_token_id]:
        return ids
    return ids + [tokenizer.eos_token_id]


def tokenize_pair(tokenizer, prompt, chosen, rejected, max_length, max_prompt_length, turn_end=''):
    """Token ids (prompt, chosen, rejected or nothing) of rendered texts; too-long pairs are truncated."""
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    responses = [tokenize_response(tokenizer, r, turn_end) for r in (chosen, rejected) if r is not None]
    prompt_ids, responses = truncate(prompt_ids, responses, max_length, max_prompt_length)
    return prompt_ids, *responses


def truncate(prompt_ids, responses, max_length, max_prompt_length):
    """A too-long example first loses the prompt's start (keeping its last max_prompt_length tokens), then the
    responses' ends (the DPO repository's rule: a dialogue's end matters most, and each response keeps its start)."""
    if len(prompt_ids) + max(map(len, responses)) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    return prompt_ids, [r[:max_length - len(prompt_ids)] for r in responses]


def without_oldest_exchange(messages):
    """The conversation minus its first user turn and the assistant turns that answer it (system turns stay), or
    None when only one user turn is left."""
    users = [i for i, m in enumerate(messages) if m['role'] == 'user']
    if len(users) < 2:
        return None
    return messages[:users[0]] + messages[users[1]:]


# A tokenized example: prompt and response ids (int32; rejected is None for sft), and for reward-labelled data the
# margins Δr_i = r_i(y_w) − r_i(y_l) of its k reward models.
Pair = namedtuple('Pair', 'prompt chosen rejected reward_margins', defaults=(None, None))


def encode_row(row, tokenizer, max_length, max_prompt_length, need_rejected=True, turn_end=''):
    """(prompt_text, token ids) of a row, or why it is unusable. A pair longer than max_length is truncated; a chat
    prompt first loses whole exchanges, oldest first, so that its system turn, the template's opening and its last
    user turn stay intact (cutting tokens off its start, as for text, would drop those); only a last user turn that
    alone is over max_prompt_length is cut like text."""
    while True:
        texts = render_row(row, tokenizer, need_rejected)
        if isinstance(texts, str):
            return texts
        prompt_ids, *responses = tokenize_pair(tokenizer, *texts, max_length=10**9, max_prompt_length=10**9,
                                               turn_end=turn_end)
        too_long = len(prompt_ids) + max(map(len, responses)) > max_length and len(prompt_ids) > max_prompt_length
        shorter = without_oldest_exchange(row['prompt']) if too_long and isinstance(row['prompt'], list) else None
        if shorter is None:
            break
        row = dict(row, prompt=shorter)
    prompt_ids, responses = truncate(prompt_ids, responses, max_length, max_prompt_length)
    return texts[0], [prompt_ids, *responses]


def reward_margins(row, name, index, k):
    """Δr_i = reward_chosen[i] − reward_rejected[i] of a labelled row (a number counts as a list of one). Rows are
    never skipped for their rewards: a missing or malformed label stops the run, naming the row."""
    where = f'{name} row {index + 1}'
    if 'reward_chosen' not in row or 'reward_rejected' not in row:
        raise SystemExit(f'error: {where} has no reward_chosen/reward_rejected; distillation losses train on pairs '
                         'labelled by reward models (python judge.py --mode=label)')
    chosen, rejected = (r if isinstance(r, list) else [r] for r in (row['reward_chosen'], row['reward_rejected']))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in chosen + rejected) \
            or not chosen or len(chosen) != len(rejected):
        raise SystemExit(f'error: {where}: reward_chosen and reward_rejected must be lists of numbers of equal length')
    if k is not None and len(chosen) != k:
        raise SystemExit(f'error: {where} has {len(chosen)} rewards per response, earlier rows have {k}')
    if not all(map(math.isfinite, chosen + rejected)):
        raise SystemExit(f'error: {where} has a NaN or infinite reward')
    return tuple(float(c) - float(r) for c, r in zip(chosen, rejected))


def load_pairs(source, split, tokenizer, max_length, max_prompt_length, need_rejected=True, verbose=True,
               required=True, need_rewards=False, texts=False):
    """The split's usable rows tokenized once, as Pairs (with texts=True, (prompt_text, Pair) tuples); bad rows are
    skipped and counted. A missing split is an error, or None when not required (the held-out split)."""
    rows, name = read_rows(source, split)
    if rows is None:
        if required:
            hint = ' (a data/<name> folder is filled by its prepare.py)' if Path(source).is_dir() else ''
            raise SystemExit(f'error: {name}{hint}')
        if verbose:
            print(name)
        return None
    pairs, skipped, turn_end, k = [], Counter(), end_of_turn(tokenizer), None
    for index, row in enumerate(rows):
        result = encode_row(row, tokenizer, max_length, max_prompt_length, need_rejected, turn_end)
        if isinstance(result, str):
            skipped[result] += 1
            continue
        margins = reward_margins(row, name, index, k) if need_rewards else None
        k = len(margins) if margins else None
        pair = Pair(*(torch.tensor(ids, dtype=torch.int32) for ids in result[1]), reward_margins=margins)
        pairs.append((result[0], pair) if texts else pair)
    if verbose:
        why = ', '.join(f'{n} {reason}' for reason, n in sorted(skipped.items()))
        skip_note = f' (skipped {sum(skipped.values()):,} rows: {why})' if skipped else ''
        print(f'{name}: {len(pairs):,} pairs{skip_note}')
    if not pairs:
        raise SystemExit(f'error: no usable preference rows in {name} ({len(rows)} rows read; '
                         'each needs "prompt", "chosen"' + (', "rejected"' if need_rejected else '') + ' as text)')
    return pairs


def padding_id(tokenizer):
    """The id batches are padded with: the tokenizer's pad token, else EOS (Pythia and Llama define no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# Rows are padded to a multiple of 32 tokens: a bounded set of shapes. On a CPU, oneDNN builds and caches kernels per
# shape for bf16, and with free widths a SmolLM2 run grew by 1.7 GB in 50 steps (measured; 0.3 GB padded).
PAD_MULTIPLE = 32


def layout(rows, pad_id, device='cpu'):
    """The batch tensors of rows [(prompt_ids, [response_ids, ...])]: each row is one sequence, the prompt followed by
    all its responses, right-padded. Prompt sharing (Wang & Hegde 2024): a response token attends to the prompt and to
    its own response only, and its positions continue from the prompt's end, so each response sees exactly what it
    would see after the prompt alone (the same log-probs, tested) while the prompt is computed once. Responses are
    numbered response-major: response 0 of every row (the chosen ones), then response 1 (the rejected ones).
        predict  flat index (row·width + column) of the hidden state that predicts each response token: the prompt's
                 last position for the first token, then the response's own positions
        labels   the response tokens, in that order;  lengths: tokens per response (owner: the response of each token)
        last     flat index of each response's last token that is not padding (a reward model reads its score there)
        n_tokens the real tokens of the batch (each prompt counted once)
    """
    n_rows, n_responses = len(rows), len(rows[0][1])
    width = -(-max(len(p) + sum(map(len, rs)) for p, rs in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment = torch.full((n_rows, width), -1)  # 0 prompt, j + 1 response j, -1 padding
    starts = []
    for b, (prompt, responses) in enumerate(rows):
        n = len(prompt) + sum(map(len, responses))
        input_ids[b, :n] = torch.cat([prompt, *responses])
        position_ids[b, :n] = torch.cat([torch.arange(len(prompt))] + [torch.arange(len(r)) + len(prompt)
                                                                       for r in responses])
        segment[b, :n] = torch.cat([torch.zeros(len(prompt))] + [torch.full((len(r),), j + 1)
                                                                 for j, r in enumerate(responses)])
        starts.append([len(prompt) + sum(map(len, responses[:j])) for j in range(n_responses)])
    predict, last = [], []
    for j in range(n_responses):
        for b, (prompt, responses) in enumerate(rows):
            start, response = starts[b][j], responses[j]
            predict.append(b * width + torch.cat([torch.tensor([len(prompt) - 1]),
                                                  torch.arange(start, start + len(response) - 1)]))
            real = (response != pad_id).nonzero()  # with pad = EOS, the token before the final EOS (as transformers)
            last.append(b * width + (start + real[-1, 0].item() if len(real) else len(prompt) - 1))
    lengths = torch.tensor([len(rs[j]) for j in range(n_responses) for _, rs in rows])
    column = torch.arange(width)
    visible = (segment[:, None, :] == 0) | (segment[:, :, None] == segment[:, None, :])  # [row, query, key]
    batch = {'input_ids': input_ids, 'position_ids': position_ids,
             'attention_mask': (visible & (column[None, :] <= column[:, None]))[:, None],
             'predict': torch.cat(predict), 'labels': torch.cat([rs[j] for j in range(n_responses) for _, rs in rows]),
             'owner': torch.arange(len(lengths)).repeat_interleave(lengths), 'lengths': lengths,
             'last': torch.tensor(last), 'n_tokens': (segment >= 0).sum().float()}
    return {k: v.to(device, torch.long if k == 'labels' else None) for k, v in batch.items()}


def make_batch(pairs, loss_name, pad_id, device='cpu'):
    """One micro-batch of Pairs: a row per pair, [prompt, chosen, rejected] (sft: [prompt, chosen]), and for
    labelled pairs their reward margins [n, k]."""
    with_rejected = LOSSES[loss_name].pairs
    batch = layout([(p.prompt, [p.chosen, p.rejected] if with_rejected else [p.chosen]) for p in pairs], pad_id, device)
    if pairs[0].reward_margins is not None:
        batch['reward_margins'] = torch.tensor([p.reward_margins for p in pairs], device=device)
    return batch


@lru_cache(maxsize=2)
def epoch_order(n_pairs, seed, epoch):
    return torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def step_pair_indices(n_pairs, done, batch_size, seed):
    """Indices of the pairs of the iteration after `done` iterations: consecutive slices of a stream of seeded
    per-epoch permutations, so the data position of a run is just its iteration number."""
    indices, start = [], done * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), n_pairs)
        indices += epoch_order(n_pairs, seed, epoch)[offset:offset + batch_size - len(indices)]
    return indices


# -----------------------------------------------------------------------------
# models: policy and reference are the same architecture, sharded identically, both with fp32 master weights
def load_model(name, reward_model=False):
    """An HF causal LM in float32 with dropout off (the loss compares policy and reference forwards exactly), or with
    reward_model=True a sequence classifier with one output, the Bradley–Terry reward r(x, y). From a causal-LM
    checkpoint (the SFT model) its score head starts at random, seeded by torch.manual_seed. SDPA attention, because
    layout's masks are boolean (eager attention would add them as numbers)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the "Loading weights" bars
    config = AutoConfig.from_pretrained(name)
    for key, value in config.to_dict().items():
        if ('dropout' in key or 'pdrop' in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    if reward_model:
        # Saved with the pad id that batches are padded with (the tokenizer's pad, else EOS), whatever a hub config
        # says, so that a transformers classifier loading the checkpoint pools where response_outputs reads.
        config.pad_token_id = padding_id(AutoTokenizer.from_pretrained(name))
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    return with_response_outputs(auto.from_pretrained(name, config=config, dtype=torch.float32,
                                                      attn_implementation='sdpa'))


def with_response_outputs(model):
    """The model with response_outputs (below) as a method, so that distribute_model can register it with FSDP."""
    model.response_outputs = types.MethodType(response_outputs, model)
    return model


def distribute_model(model, mesh, bf16, reshard_root):
    """Several processes: FSDP2 on each decoder layer (the classes named in model._no_split_modules), then on the root,
    with bf16 compute over the fp32 weights (MixedPrecisionPolicy); response_outputs is registered as a forward of
    the root, which holds the embedding and the head it calls. A world of one is not sharded: there FSDP's per-layer
    copies of weights and gradients are pure cost (27% of a tiny model's step, 6% of SmolLM2's and 0.4 GB, measured),
    and bf16 is autocast around response_outputs."""
    if mesh.size() == 1:
        model.to(mesh.device_type)
        if bf16:
            model.response_outputs = torch.autocast(mesh.device_type, torch.bfloat16)(model.response_outputs)
        return model
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    block_names = set(model._no_split_modules or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f'no decoder layers found in {type(model).__name__} (looked for {block_names})')
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_root)
    register_fsdp_forward_method(model, 'response_outputs')
    return model


LOGPS_CHUNK = 256  # response tokens per log-softmax: [256, V] float32 is 50 MB for V = 49,152, 131 MB for 128k


def token_logps(head, hidden, labels):
    return head(hidden).float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)


def response_outputs(model, input_ids, position_ids, attention_mask, predict, labels=None, last=None):
    """The log-prob of each response token (a reward model: the score at each response's last token), from the last
    hidden state at those positions only: no logits for prompt or padding positions. The head and log-softmax run
    in chunks recomputed in backward, so one [LOGPS_CHUNK, V] float32 block is alive at a time instead of the
    [rows, T, V] logits and their gradient, the largest tensors of a step."""
    hidden = model.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state.flatten(0, 1)
    if labels is None:
        return model.score(hidden[last])[:, 0].float()
    head = model.get_output_embeddings()
    return torch.cat([checkpoint(token_logps, head, h, y, use_reentrant=False)
                      for h, y in zip(hidden[predict].split(LOGPS_CHUNK), labels.split(LOGPS_CHUNK))])


def sequence_logps(model, batch):
    """Summed log-probs of each response of a layout batch (response-major: [chosen; rejected]), and their lengths."""
    logps = model.response_outputs(batch['input_ids'], batch['position_ids'], batch['attention_mask'],
                                   batch['predict'], batch['labels'])
    return logps.new_zeros(len(batch['lengths'])).index_add(0, batch['owner'], logps), batch['lengths']


def sequence_rewards(reward_model, batch):
    """The reward of each response of a layout batch (response-major)."""
    return reward_model.response_outputs(batch['input_ids'], batch['position_ids'], batch['attention_mask'],
                                         batch['predict'], last=batch['last'])


# -----------------------------------------------------------------------------
# losses: each is a short function of a micro-batch's per-pair Terms, its body the equation of the module docstring;
# the LOSSES table says what each one reads, and batch_loss computes exactly that
# Terms: per-pair values of a micro-batch, [n] for n pairs. The policy's summed log-probs of the chosen and rejected
# responses (a reward model: its rewards r(x, y); sft: chosen only), their log-ratios ρ = logπ_θ − logπ_ref, the
# responses' token counts, the reward models' margins Δr_i [n, k] of labelled pairs, and KTO's baseline z.
Terms = namedtuple('Terms', 'chosen rejected rho_chosen rho_rejected chosen_tokens rejected_tokens reward_margins '
                   'kto_z', defaults=(None,) * 7)


def forward_kl(x):
    """KL(π_ref‖π_θ) = E_{y∼π_ref}[logπ_ref(y) − logπ_θ(y)], the dataset responses taken as samples of π_ref:
    −(ρ_w + ρ_l)/2 per pair. Its gradient is that of the policy's NLL on the responses, whatever π_ref is."""
    return -(x.rho_chosen + x.rho_rejected) / 2


def sft_loss(x, cfg):
    return -x.chosen  # summed over each response's tokens; the step averages over all response tokens


def rm_loss(x, cfg):
    """Bradley–Terry, −log σ(r_w − r_l), plus c·(r_w + r_l)², which pins the offset that the likelihood leaves free
    (TRL's center_rewards_coefficient, Eisenstein et al. 2023)."""
    return -F.logsigmoid(x.chosen - x.rejected) + cfg['rm_center_coef'] * (x.chosen + x.rejected) ** 2


def dpo_loss(x, cfg):
    logits, eps = cfg['beta'] * (x.rho_chosen - x.rho_rejected), cfg['label_smoothing']
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def ipo_loss(x, cfg):
    h = x.rho_chosen / x.chosen_tokens - x.rho_rejected / x.rejected_tokens if cfg['ipo_normalize'] \
        else x.rho_chosen - x.rho_rejected
    return (h - 1 / (2 * cfg['beta'])) ** 2


def kto_loss(x, cfg):
    desirable = cfg['kto_desirable_weight'] * (1 - torch.sigmoid(cfg['beta'] * (x.rho_chosen - x.kto_z)))
    undesirable = cfg['kto_undesirable_weight'] * (1 - torch.sigmoid(cfg['beta'] * (x.kto_z - x.rho_rejected)))
    return (desirable + undesirable) / 2


def distill_loss(x, cfg):
    """d-DPO regresses m on one Δr: a finite target where DPO's pushes m to infinity (Fisch et al. 2024)."""
    target = x.reward_margins.mean(-1) if cfg['distill_reduce'] == 'mean' else x.reward_margins[:, 0]
    return (cfg['beta'] * (x.rho_chosen - x.rho_rejected) - target) ** 2


def edistill_loss(x, cfg):
    """e-DPO keeps, of the k reward models, the one closest to the policy: the policy need only agree with some
    plausible reward model, and γ·KL pulls it toward π_ref, so it moves only as far as the most conservative member
    of the family allows (the pessimism; our reading of the paper, see README)."""
    errors = (cfg['beta'] * (x.rho_chosen - x.rho_rejected)[:, None] - x.reward_margins) ** 2
    if cfg['edistill_min'] == 'example':
        closest = errors.min(-1).values
    else:  # 'batch': min_i of the mean error over the global micro-batch; the argmin is picked without gradient
        totals = errors.detach().sum(0)
        dist.all_reduce(totals)
        closest = errors[:, totals.argmin()]
    return closest + cfg['pessimism_gamma'] * forward_kl(x)


def pdpo_loss(x, cfg):
    return dpo_loss(x, cfg) + cfg['pessimism_gamma'] * forward_kl(x)


# What each loss reads besides the policy's log-probs of the chosen responses; batch_loss computes exactly that.
#   pairs       the rejected responses too (else: chosen only, averaged over tokens)
#   rm          the policy is a reward model: its rewards r(x, y) instead of log-probs
#   reference   the reference's log-probs (and the trust-region update moves it)
#   labels      the reward models' margins Δr_i from the data (judge.py mode=label)
#   mismatched  KTO's z, from mismatched pairs (x_i, y_{i+1}) of the step (kto_baseline)
#   pessimism   adds γ·KL(π_ref‖π_θ), logged as forward_kl
Loss = namedtuple('Loss', 'fn pairs rm reference labels mismatched pessimism')
LOSSES = {  #                        pairs  rm     reference  labels  mismatched  pessimism
    'sft':      Loss(sft_loss,       False, False, False,     False,  False,      False),
    'rm':       Loss(rm_loss,        True,  True,  False,     False,  False,      False),
    'dpo':      Loss(dpo_loss,       True,  False, True,      False,  False,      False),
    'ipo':      Loss(ipo_loss,       True,  False, True,      False,  False,      False),
    'kto':      Loss(kto_loss,       True,  False, True,      False,  True,       False),
    'distill':  Loss(distill_loss,   True,  False, True,      True,   False,      False),
    'edistill': Loss(edistill_loss,  True,  False, True,      True,   False,      True),
    'pdpo':     Loss(pdpo_loss,      True,  False, True,      False,  False,      True),
}


def chosen_rejected(values, pairs=True):
    """(chosen, rejected) of a response-major [chosen; rejected] tensor (layout's order); (values, None) for a batch
    of chosen responses only."""
    return tuple(values.chunk(2)) if pairs else (values, None)


def kto_baseline(policy, ref, pairs, micro_size, pad_id, cfg, device):
    """KTO's z for a whole global batch (every rank passes the same pairs): each prompt x_i with both responses of the
    next pair, (x_i, y_w,i+1) and (x_i, y_l,i+1), the mismatched pairs that TRL builds from chosen and rejected
    completions alike; z = max(0, mean log-ratio over all of them), without gradient. Each rank computes its share
    and one all-reduce sums them: z is one value per optimizer step, whatever the split over ranks and micro-steps."""
    rank, world, n = dist.get_rank(), dist.get_world_size(), len(pairs)
    rows = [truncate(pairs[i].prompt, [pairs[(i + 1) % n].chosen, pairs[(i + 1) % n].rejected], cfg['max_length'],
                     cfg['max_prompt_length']) for i in range(rank, n, world)]
    total = torch.zeros(2, device=device)  # Σ log-ratio, count
    with torch.no_grad():
        for start in range(0, len(rows), micro_size):
            batch = layout(rows[start:start + micro_size], pad_id, device)
            rho = sequence_logps(policy, batch)[0] - sequence_logps(ref, batch)[0]
            total += torch.stack([rho.sum(), torch.tensor(float(len(rho)), device=device)])
    dist.all_reduce(total)
    return (total[0] / total[1]).clamp(min=0)


def loss_denominator(batch, loss_name):
    """What the loss of a batch averages over: response tokens for sft, pairs (rows) otherwise."""
    if not LOSSES[loss_name].pairs:
        return batch['lengths'].sum().float()
    return torch.tensor(float(len(batch['input_ids'])), device=batch['input_ids'].device)


def batch_loss(policy, ref, batch, cfg, kto_z=None):
    """(Σ of per-pair losses, or Σ token NLL for sft; dict of per-pair metric values) for one micro-batch: the Terms
    that LOSSES says the loss reads, then its function; kto_z is KTO's baseline for the step (kto_baseline)."""
    spec = LOSSES[cfg['loss']]
    if spec.reference:
        with torch.no_grad():  # first: its temporaries are gone before the policy's activations are kept for backward
            ref_logps = sequence_logps(ref, batch)[0]
    outputs, tokens = (sequence_rewards(policy, batch), batch['lengths']) if spec.rm else sequence_logps(policy, batch)
    rho = chosen_rejected(outputs - ref_logps) if spec.reference else (None, None)
    x = Terms(*chosen_rejected(outputs, spec.pairs), *rho, *chosen_rejected(tokens, spec.pairs),
              batch.get('reward_margins'), kto_z)
    return spec.fn(x, cfg).sum(), loss_metrics(x, spec, cfg)


def loss_metrics(x, spec, cfg):
    """Per-pair values to log, under TRL's names: rewards/* are the implicit rewards β·ρ."""
    if spec.rm:
        margins = (x.chosen - x.rejected).detach()
        return {'accuracy': (margins > 0).float(), 'margin': margins}
    if not spec.reference:
        return {'logps/chosen': x.chosen.detach()}
    reward_w, reward_l = cfg['beta'] * x.rho_chosen.detach(), cfg['beta'] * x.rho_rejected.detach()
    metrics = {'rewards/chosen': reward_w, 'rewards/rejected': reward_l,
               'rewards/accuracies': (reward_w > reward_l).float(), 'rewards/margins': reward_w - reward_l,
               'logps/chosen': x.chosen.detach(), 'logps/rejected': x.rejected.detach()}
    if spec.mismatched:
        metrics['kl'] = x.kto_z.expand(len(reward_w))
    if x.reward_margins is not None:
        metrics['rewards/rm_margins'] = x.reward_margins.mean(-1)  # the target, averaged over reward models
    if spec.pessimism:
        metrics['forward_kl'] = forward_kl(x).detach()
    return metrics


def all_reduce_sums(sums):
    """Sums a dict of scalar tensors over ranks with one collective; returns floats."""
    values = torch.stack([sums[k].float() for k in sums])
    dist.all_reduce(values)
    return dict(zip(sums, values.tolist()))


# -----------------------------------------------------------------------------
# reference update: identical sharding means each rank mixes its own shards, with no communication
def fsdp_modules(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def local_tensors(model):
    return [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]


@torch.no_grad()
def update_reference(policy, ref, alpha):
    """θ_ref ← α·θ + (1−α)·θ_ref (α = 1: θ_ref ← θ), in fp32 on the local shards of both models."""
    for module in fsdp_modules(policy) + fsdp_modules(ref):
        module.reshard()  # the mix must land in the sharded storage, not in a gathered copy
    ref_params, policy_params = local_tensors(ref), local_tensors(policy)
    if alpha == 1.0:
        torch._foreach_copy_(ref_params, policy_params)
    else:
        torch._foreach_lerp_(ref_params, policy_params, alpha)


# -----------------------------------------------------------------------------
# checkpoints: out_dir holds an HF model (from_pretrained loads it) plus state.pt, everything resume needs
# settings a resumed run may change: how far it goes, what it logs, and where and how it computes. Every other
# setting defines the run (batch_size also which pairs each step reads), and resume refuses to change it.
RESUMABLE = ('out_dir', 'resume', 'max_iters', 'eval_interval', 'eval_pairs', 'log_interval', 'snapshots',
             'wandb_log', 'wandb_project', 'wandb_run_name', 'grad_accum', 'device', 'dtype', 'grad_checkpoint',
             'peak_flops')


def lock_out_dir(out_dir):
    """An exclusive lock on out_dir/.lock, held while the returned file stays open (the OS drops it when the process
    ends, even by kill -9): two runs in one out_dir would write over each other's checkpoint files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir / '.lock', 'w')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(f'error: another run is using {out_dir} (it holds {out_dir / ".lock"}); wait for it to end, '
                         'or use another out_dir')
    return lock


def check_out_dir(cfg):
    """A fresh run needs an out_dir without a saved run, so that no state.pt of another run is left for a later
    resume to continue; a resumed run needs the saved run's settings, apart from those in RESUMABLE."""
    path = Path(cfg['out_dir']) / 'state.pt'
    if not cfg['resume']:
        if path.exists():
            raise SystemExit(f"error: {cfg['out_dir']} holds a saved run ({path}); continue it with --resume=True, "
                             f'use another out_dir, or delete {path} to start a new run there')
        return
    if not path.is_file():
        raise SystemExit(f'error: resume=True but {path} does not exist')
    saved = torch.load(path, map_location='cpu', mmap=True, weights_only=True)['config']
    changed = [f'{k}={saved[k]!r} saved, {v!r} now' for k, v in cfg.items()
               if k in saved and k not in RESUMABLE and saved[k] != v]
    if changed:
        raise SystemExit(f"error: resume=True with other settings than the run saved in {path}: {'; '.join(changed)}. "
                         f"A resumed run may change only {', '.join(RESUMABLE)}")


def save_checkpoint(out_dir, policy, ref, optimizer, tokenizer, it, cfg, master):
    """Every rank gathers full state dicts; rank 0 writes them to a temporary folder, then moves each file into
    out_dir with an atomic os.replace, state.pt last. A kill at any point leaves every file whole: the HF model and
    state.pt are each either the old or the new version, and state.pt alone is what resume reads. A failed write (a
    full disk) stops the run in one line, the previous checkpoint untouched."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {'policy': get_model_state_dict(policy, options=options),
             'ref': get_model_state_dict(ref, options=options) if ref is not None else None,
             'optimizer': get_optimizer_state_dict(policy, optimizer, options=options),
             'iter': it, 'config': cfg, 'rng': torch.get_rng_state()}
    if master:
        out_dir = Path(out_dir)
        tmp = out_dir / '.tmp_checkpoint'
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # one weights file (no shards), so that replacing it is a single atomic step
            policy.save_pretrained(tmp, state_dict=state['policy'], max_shard_size='10000GB')
            tokenizer.save_pretrained(tmp)
            (tmp / 'nanotr_config.json').write_text(json.dumps(cfg, indent=2))
            torch.save(state, tmp / 'state.pt')
        except Exception as e:  # a full disk is an OSError, a RuntimeError (torch.save) or a SafetensorError
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f'error: could not write the checkpoint of iteration {it} to {tmp} ({type(e).__name__}: '
                             f'{" ".join(str(e).split())}); the previous checkpoint in {out_dir} is intact')
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # as any new file: transformers writes model.safetensors with mode 0600
            f.chmod(0o666 & ~umask)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == 'state.pt'):
            os.replace(f, out_dir / f.name)
        tmp.rmdir()
    dist.barrier()


def load_checkpoint(out_dir, policy, ref, optimizer):
    """Restores a save_checkpoint state on every rank and returns the iteration to continue from."""
    state = torch.load(Path(out_dir) / 'state.pt', map_location='cpu', mmap=True, weights_only=True)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(policy, state['policy'], options=options)
    if ref is not None:
        set_model_state_dict(ref, state['ref'], options=options)
    set_optimizer_state_dict(policy, optimizer, state['optimizer'], options=options)
    torch.set_rng_state(state['rng'])
    return state['iter']


def open_metrics(path, resume_iter):
    """metrics.jsonl, open for appending. A resumed run (resume_iter: the step of its checkpoint) keeps the lines up to
    its checkpoint: lines an interrupted run logged after it, and a line cut short by a kill, are dropped, so each
    step appears once. A fresh run starts it empty."""
    kept = [r for r in read_jsonl(path) if r['iter'] <= resume_iter] if resume_iter is not None else []
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(json.dumps(r) + '\n' for r in kept))
    os.replace(tmp, path)  # a kill while rewriting leaves the old file
    return open(path, 'a')


# -----------------------------------------------------------------------------
# training loop
def peak_memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def evaluate(policy, ref, pairs, pad_id, cfg, rank, world, micro_size, device):
    """Mean metrics over the first eval_pairs held-out pairs (a whole number of global micro-batches); KTO's z is
    one value from all of them."""
    n = min(len(pairs), cfg['eval_pairs']) // (world * micro_size) * world * micro_size
    if n == 0:
        return {}
    mismatched = LOSSES[cfg['loss']].mismatched
    kto_z = kto_baseline(policy, ref, pairs[:n], micro_size, pad_id, cfg, device) if mismatched else None
    sums = {}
    with torch.no_grad():
        for start in range(rank * micro_size, n, world * micro_size):
            batch = make_batch(pairs[start:start + micro_size], cfg['loss'], pad_id, device)
            loss_sum, metrics = batch_loss(policy, ref, batch, cfg, kto_z)
            metrics.update(loss=loss_sum, denominator=loss_denominator(batch, cfg['loss']))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.sum()
    totals = all_reduce_sums(sums)
    denominator = totals.pop('denominator')
    return {f'eval/{k}': v / (denominator if k == 'loss' else n) for k, v in totals.items()}


def note_evaluation(pairs, eval_pairs, global_micro):
    """Says why evaluate() will never run, if it will not: it evaluates whole global micro-batches only."""
    n = 0 if pairs is None else min(len(pairs), eval_pairs)
    if n < global_micro:
        why = 'no test split' if pairs is None else 'eval_pairs=0' if eval_pairs == 0 else \
            f'{len(pairs)} held-out pairs, eval_pairs={eval_pairs}: fewer than one micro-batch of {global_micro} ' \
            'over all processes'
        print(f'note: no evaluation ({why}); checkpoints are still saved every eval_interval steps')


def stop_if_not_finite(loss, grad_norm, it):
    """Stops every rank at a step whose loss or gradient norm is NaN or infinite, before the optimizer writes such
    values into the weights and a checkpoint saves them."""
    values = torch.stack([loss.float(), grad_norm.float()])
    dist.all_reduce(values)  # a NaN or inf of any rank reaches every rank, so all stop together
    if not values.isfinite().all():
        loss, grad_norm = values.tolist()
        raise SystemExit(f'error: iteration {it}: loss {loss:.4g}, gradient norm {grad_norm:.4g}; stopped before the '
                         'optimizer step, so the last checkpoint holds finite weights (lr too high?)')


def print0(*args):
    """print on rank 0 only (through tqdm, so that a progress bar stays intact)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(' '.join(map(str, args)))


def micro_batch_size(cfg, world):
    """Pairs per micro-batch of each process: batch_size / (world_size · grad_accum), which must be whole."""
    micro_size, rest = divmod(cfg['batch_size'], world * cfg['grad_accum'])
    if rest or micro_size == 0:
        raise SystemExit(f"error: batch_size={cfg['batch_size']} must be a multiple of "
                         f"world_size*grad_accum={world * cfg['grad_accum']}")
    return micro_size


def load_data(cfg, master):
    """(tokenizer, train Pairs, held-out Pairs or None), with the responses and labels that the loss reads."""
    from transformers import AutoTokenizer
    for key in ('init_from', 'ref_from'):
        if cfg[key]:  # ref_from='' is a copy of init_from
            check_model_path(cfg[key], key)
    tokenizer = AutoTokenizer.from_pretrained(cfg['init_from'])
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"error: the tokenizer of {cfg['init_from']} has no EOS token")
    settings = dict(tokenizer=tokenizer, max_length=cfg['max_length'], max_prompt_length=cfg['max_prompt_length'],
                    need_rejected=LOSSES[cfg['loss']].pairs, verbose=master, need_rewards=LOSSES[cfg['loss']].labels)
    return tokenizer, load_pairs(cfg['data'], 'train', **settings), load_pairs(cfg['data'], 'test', required=False,
                                                                              **settings)


def load_models(cfg, device, world):
    """(policy, reference or None, compute dtype), both with fp32 master weights. A bf16 reference would round small
    soft updates away (a change under half an ulp vanishes); fp32 costs 4 bytes per parameter per GPU, divided by the
    FSDP world."""
    spec = LOSSES[cfg['loss']]
    compute_dtype = cfg['dtype'] if cfg['dtype'] != 'auto' else ('bfloat16' if device.type == 'cuda' else 'float32')
    bf16 = compute_dtype == 'bfloat16'
    mesh = dist.device_mesh.init_device_mesh(device.type, (world,))
    policy, ref = load_model(cfg['init_from'], reward_model=spec.rm), None
    if spec.reference:
        ref = load_model(cfg['ref_from']) if cfg['ref_from'] else copy.deepcopy(policy)  # before any sharding
        ref.requires_grad_(False).eval()
        distribute_model(ref, mesh, bf16, reshard_root=True)  # root gathered only during its forward
    if cfg['grad_checkpoint']:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    distribute_model(policy, mesh, bf16, reshard_root=None)
    policy.train()
    if ref is not None and [p.shape for p in policy.parameters()] != [p.shape for p in ref.parameters()]:
        raise SystemExit('error: ref_from must have the same architecture as init_from (the update mixes them)')
    return policy, ref, compute_dtype


def open_log(cfg, out_dir, resume_iter, master):
    """log(record): a line of metrics.jsonl (and a wandb point) on rank 0; nothing on the other ranks."""
    if not master:
        return lambda record: None
    path = out_dir / 'metrics.jsonl'
    open_metrics(path, resume_iter).close()  # each record is appended in its own open: a kill loses no line
    wandb = None
    if cfg['wandb_log']:
        import wandb
        wandb.init(project=cfg['wandb_project'], name=cfg['wandb_run_name'] or None, config=cfg)

    def log(record):
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if wandb is not None:
            wandb.log(record, step=record['iter'])
    return log


def train(cfg):
    rank, world, device = setup_distributed(cfg['device'])
    master = rank == 0
    micro_size = micro_batch_size(cfg, world)
    out_dir = Path(cfg['out_dir'])
    lock = lock_out_dir(out_dir) if master else None  # held until train() returns or the process ends
    check_out_dir(cfg)
    print0(json.dumps(cfg, indent=2))
    torch.manual_seed(cfg['seed'])
    tokenizer, train_pairs, eval_pairs = load_data(cfg, master)
    pad_id = padding_id(tokenizer)
    if master:
        note_evaluation(eval_pairs, cfg['eval_pairs'], world * micro_size)
    policy, ref, compute_dtype = load_models(cfg, device, world)
    n_params = sum(p.numel() for p in policy.parameters())
    # fused: one kernel over all parameters, ~5x faster than the default per-tensor loop (SmolLM2 on a CPU: 0.08 s)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg['lr'], weight_decay=cfg['weight_decay'], fused=True)
    start_iter = load_checkpoint(out_dir, policy, ref, optimizer) if cfg['resume'] else 0
    log = open_log(cfg, out_dir, start_iter if cfg['resume'] else None, master)
    print0(f'{n_params / 1e6:.2f}M parameters, world size {world}, {micro_size} pairs per micro-batch, '
           f'compute dtype {compute_dtype}, device {device}')

    def eval_and_save(it):
        record = {} if eval_pairs is None else evaluate(policy, ref, eval_pairs, pad_id, cfg, rank, world,
                                                         micro_size, device)
        if record:
            log({'iter': it, **record})
            print0(f'iter {it}: ' + ', '.join(f'{k} {v:.4f}' for k, v in record.items()))
        save_checkpoint(out_dir, policy, ref, optimizer, tokenizer, it, cfg, master)
        if cfg['snapshots'] and master:  # the policy files only: a snapshot is for sampling, not for resuming
            shutil.copytree(out_dir, out_dir / f'iter_{it}', dirs_exist_ok=True,
                            ignore=lambda d, names: [n for n in names if n in ('state.pt', 'metrics.jsonl', '.lock')
                                                     or n.startswith(('iter_', '.tmp'))])

    spec = LOSSES[cfg['loss']]
    moving_ref = ref is not None and cfg['ref_update'] != 'none'
    ref_updates = start_iter // cfg['tr_tau'] if moving_ref else 0
    bar = tqdm(range(start_iter + 1, cfg['max_iters'] + 1), initial=start_iter, total=cfg['max_iters'],
               disable=not master, dynamic_ncols=True)
    for it in bar:  # it: the iteration (optimizer step) being taken, from 1; 'iter' in metrics.jsonl
        t0 = time.time()
        lr = cfg['lr'] * min(1.0, it / (cfg['warmup_iters'] + 1))
        for group in optimizer.param_groups:
            group['lr'] = lr
        step_pairs = [train_pairs[i] for i in step_pair_indices(len(train_pairs), it - 1, cfg['batch_size'],
                                                                cfg['seed'])]
        kto_z = kto_baseline(policy, ref, step_pairs, micro_size, pad_id, cfg, device) if spec.mismatched else None
        mine = step_pairs[rank::world]
        batches = [make_batch(mine[m * micro_size:(m + 1) * micro_size], cfg['loss'], pad_id, device)
                   for m in range(cfg['grad_accum'])]
        # The objective is a mean over the global batch (of pairs, or of response tokens for sft). FSDP averages
        # gradients over ranks, so each rank scales its sum by world/denominator.
        denominator = sum(loss_denominator(b, cfg['loss']) for b in batches)
        dist.all_reduce(denominator)
        sums = {}
        for m, batch in enumerate(batches):
            if isinstance(policy, FSDPModule):  # reduce gradients once, after the last micro-step
                policy.set_requires_gradient_sync(m == len(batches) - 1)
            loss_sum, metrics = batch_loss(policy, ref, batch, cfg, kto_z)
            (loss_sum * world / denominator).backward()
            metrics = {'loss': loss_sum.detach() / denominator, 'tokens': batch['n_tokens'],
                       **{k: v.sum() / cfg['batch_size'] for k, v in metrics.items()}}
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg['grad_clip'] or float('inf'))
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        stop_if_not_finite(sums['loss'], grad_norm, it)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if moving_ref and it % cfg['tr_tau'] == 0:
            update_reference(policy, ref, 1.0 if cfg['ref_update'] == 'hard' else cfg['tr_alpha'])
            ref_updates += 1
        if it % cfg['log_interval'] == 0 or it == cfg['max_iters']:
            record = {'iter': it, **all_reduce_sums(sums)}
            dt = time.time() - t0
            tokens = record.pop('tokens')
            record.update(lr=lr, grad_norm=grad_norm.item(), step_time=dt, tokens_per_sec=tokens / dt,
                          peak_mem_gb=peak_memory_gb(device), ref_updates=ref_updates)
            if device.type == 'cuda':  # policy forward+backward 6N, reference forward 2N FLOPs per token
                record['mfu'] = (6 + 2 * (ref is not None)) * n_params * tokens / dt / (world * cfg['peak_flops'])
            log(record)
            bar.set_postfix({k.split('/')[-1]: f'{record[k]:.3f}' for k in ('loss', 'rewards/accuracies', 'accuracy',
                                                                           'rewards/margins', 'margin') if k in record})
        if it % cfg['eval_interval'] == 0 or it == cfg['max_iters']:
            eval_and_save(it)
    if master:
        lock.close()
    dist.destroy_process_group()


if __name__ == '__main__':
    train(get_config(sys.argv[1:]))
