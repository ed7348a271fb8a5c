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
pairs are labelled with k reward models (data/label.py: Δr_i = r_i(y_w) − r_i(y_l)), and with the implicit
reward margin m = β(ρ_w − ρ_l) and KL = −(ρ_w + ρ_l)/2, an estimate of KL(π_ref‖π_θ) on the dataset responses:
    distill   (m − Δr)²                                  d-DPO; Δr = Δr_1, or the ensemble mean (distill_reduce)
    edistill  min_i E_B[(m − Δr_i)²] + γ·KL              e-DPO: pessimistic over k reward models; γ = pessimism_gamma;
                                                         the min of the batch's mean loss (edistill_min=batch),
                                                         or E_B[min_i (m − Δr_i)²], a min per pair (example)
    pdpo      dpo + γ·KL                                 p-DPO
Trust region (TR-DPO / TR-IPO / TR-KTO; Gorbatovski, Shaposhnikov et al., ICLR 2025, §3): the loss is unchanged, only
π_ref moves. After optimizer step k, when k % τ == 0:
    soft   θ_ref ← α·θ + (1−α)·θ_ref        (ref_update=soft, tr_alpha=α, tr_tau=τ; τ=1 mixes every step)
    hard   θ_ref ← θ                        (ref_update=hard, tr_tau=τ)
With α=0 or ref_update=none this is plain DPO/IPO/KTO against the fixed initial (SFT) model. The update works the
same for distill, edistill and pdpo (trust-region distillation, a combination neither paper ran). With LoRA it mixes
the adapters, the parameters that train: A_ref ← α·A + (1−α)·A_ref, B_ref ← α·B + (1−α)·B_ref (the LoRA section).
Run `python train_tr.py` (TR-DPO on the toy in data/toy, ~10 s on a CPU) or `torchrun ... train_tr.py config.py
--key=value ...`: every setting below can be overridden (--help lists them); README.md has the recipes.
"""
import copy
import datetime
import fnmatch
import json
import math
import os
import re
import resource
import shutil
import sys
import textwrap
import time
import types
from collections import namedtuple
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data.files import (commit_folder, copy_folder, first_mismatch, lock_out_dir, open_log, read_sealed, seal,
                        write_model_files, write_safetensors)
from data.pairs import (RUN_STATE, check_model_path, check_vocabulary, fingerprint, layout, load_pairs, load_tokenizer,
                        make_batch, note_evaluation, padding_id, sha256, step_pair_indices, truncate)
from data.settings import (DEVICE, PROMPT_FITS, RESUMABLE, check_outputs, check_settings, declared, defaults_of, need,
                           exit_process, one_of, parse_overrides)

# -----------------------------------------------------------------------------
# config: `name: its check = default  # meaning`, overridden by config files and --key=value, checked before any work
# (data/settings.py): need(condition) must hold; only=: another value is refused where the setting would do nothing;
# resumable: a resumed run may change it. The defaults run TR-DPO on data/toy; the comments give the papers' values.
REFERENCE = "loss not in ('sft', 'rm')"                 # the losses that compare the policy with a reference
# I/O
out_dir: need('out_dir.strip()', resumable=True, why='names no folder') = 'out'
                                                        # the run's folder: HF model, state/ (to resume), metrics.jsonl
init_from: str = 'data/toy/sft'                         # the policy: HF hub name or HF folder (usually the SFT model)
ref_from: need('not (ref_from and lora_rank)', only=REFERENCE, why='needs lora_rank=0') = ''
                                                        # the reference at step 0 (full fine-tuning); '' = init_from
resume: RESUMABLE = False                               # continue the run saved in out_dir
eval_interval: need('eval_interval >= 1', resumable=True) = 25  # evaluate and save every this many steps
eval_pairs: need('eval_pairs >= 0', resumable=True) = 200  # at most this many held-out pairs per evaluation
log_interval: need('log_interval >= 1', resumable=True) = 5  # a metrics.jsonl line every this many iterations
snapshots: RESUMABLE = False                            # also keep each evaluation's HF model in out_dir/iter_N
wandb_log: need("not wandb_log or importable('wandb')", resumable=True, why='needs `pip install wandb`') = False
                                                        # also log to W&B
wandb_project: need(only='wandb_log', resumable=True) = 'nanotr'  # wandb: the project to log to
wandb_run_name: need(only='wandb_log', resumable=True) = ''  # wandb: the run's name; '' = wandb chooses
# data
data: str = 'data/toy'                                  # a .jsonl/.json/.parquet file or folder, or a HF dataset
max_length: need('max_length >= 1') = 128               # prompt + response tokens
max_prompt_length: PROMPT_FITS = 64                     # a too-long pair keeps the last this many prompt tokens
# loss
loss: one_of('sft', 'rm', 'dpo', 'ipo', 'kto', 'distill', 'edistill', 'pdpo') = 'dpo'  # LOSSES below
beta: need('beta > 0', only=REFERENCE) = 0.1            # KL strength β (TR-DPO paper: 0.05 on HH and TL;DR)
label_smoothing: need('0 <= label_smoothing < 0.5', only="loss in ('dpo', 'pdpo')") = 0.0
                                                        # the assumed label-noise rate ε (cDPO); 0 = DPO
ipo_normalize: need(only="loss == 'ipo'") = True        # per-token averaged log-ratios (TRL); False = summed
kto_desirable_weight: need('kto_desirable_weight >= 0', only="loss == 'kto'") = 1.0  # λ_D
kto_undesirable_weight: need('kto_undesirable_weight >= 0', only="loss == 'kto'") = 1.0  # λ_U
rm_center_coef: need('rm_center_coef >= 0', only="loss == 'rm'") = 0.0
                                                        # c of the centring term c·(r_w + r_l)² (TRL: 0.01)
distill_reduce: one_of('first', 'mean', only="loss == 'distill'") = 'first'
                                                        # the target: the first reward model's margin, or the mean
edistill_min: one_of('batch', 'example', only="loss == 'edistill'") = 'batch'
                                                        # min over reward models of the step's loss, or of each pair's
pessimism_gamma: need('pessimism_gamma >= 0', only="loss in ('edistill', 'pdpo')") = 0.1
                                                        # γ, weight of the KL(π_ref‖π_θ) term (ours to tune)
# trust region
ref_update: one_of('none', 'soft', 'hard', only=REFERENCE) = 'soft'  # how the reference moves
tr_alpha: need('0 <= tr_alpha <= 1', only="ref_update == 'soft'") = 0.1
                                                        # the policy's weight in the soft mix (paper: 0.6)
tr_tau: need('tr_tau >= 1', only="ref_update != 'none'") = 25  # update every this many steps (paper, hard update: 512)
# LoRA
lora_rank: need('lora_rank >= 0') = 0                   # rank R of adapters on decoder Linears; 0 = full fine-tuning
lora_alpha: need('lora_alpha > 0', only='lora_rank') = 16.0  # the adapters' output is scaled by lora_alpha/R (PEFT's)
# optimization
batch_size: need("batch_size >= (2 if loss == 'kto' else 1)") = 16  # pairs per optimizer step, over all processes
grad_accum: need('grad_accum >= 1', resumable=True) = 1  # micro-steps per optimizer step
lr: need('lr >= 0') = 2e-4                              # AdamW peak learning rate (paper: 1e-6 for Pythia 2.8B)
weight_decay: need('weight_decay >= 0') = 0.0           # AdamW weight decay
warmup_iters: need('warmup_iters >= 0') = 5             # linear warm-up, then constant (as the DPO repository)
max_iters: need('max_iters >= 1', resumable=True) = 50  # optimizer steps (the toy's gold peaks near 50)
grad_clip: need('grad_clip >= 0') = 2.0                 # max gradient norm (paper: 2); 0 disables
# system
device: DEVICE = 'auto'                                 # auto | cpu | cuda
dtype: one_of('auto', 'float32', 'bfloat16', resumable=True) = 'auto'  # compute dtype; auto: bf16 on CUDA, else fp32
fsdp: one_of('auto', 'always', resumable=True) = 'auto'  # auto: FSDP2 over 2+ processes; always: 1 too (gpu_check)
dist_timeout: need('dist_timeout > 0', resumable=True) = 60.0  # minutes a collective waits for a slower rank (NCCL's
                                                        # default: 10; rank 0 alone writes an 8B export, ~5 min)
grad_checkpoint: RESUMABLE = False                      # activation checkpointing of each decoder layer
peak_flops: need('peak_flops > 0', resumable=True) = 989e12  # per-device peak for MFU (H100 dense bf16)
seed: need('0 <= seed < 2**64') = 1337                  # data order, and a reward model's or LoRA's initialization


# -----------------------------------------------------------------------------
# losses: each is a short function of a micro-batch's per-pair Terms, its body the equation of the module docstring.
# Terms, [n] for n pairs: the policy's summed log-probs of the chosen and rejected responses (a reward model: its
# rewards r(x, y); sft: chosen only), their log-ratios ρ = logπ_θ − logπ_ref, the responses' token counts, the reward
# models' margins Δr_i [n, k] of labelled pairs; and of the whole step: KTO's z, e-DPO's reward model i.
Terms = namedtuple('Terms', 'chosen rejected rho_chosen rho_rejected chosen_tokens rejected_tokens reward_margins '
                   'kto_z member', defaults=(None,) * 8)


def forward_kl(terms):
    """KL(π_ref‖π_θ) = E_{y∼π_ref}[logπ_ref(y) − logπ_θ(y)], the dataset responses taken as samples of π_ref:
    −(ρ_w + ρ_l)/2 per pair. Its gradient is that of the policy's NLL on the responses, whatever π_ref is."""
    return -(terms.rho_chosen + terms.rho_rejected) / 2


def sft_loss(terms, cfg):
    return -terms.chosen  # summed over each response's tokens; the step averages over all response tokens


def rm_loss(terms, cfg):
    """Bradley–Terry, −log σ(r_w − r_l), plus c·(r_w + r_l)², which pins the offset that the likelihood leaves free
    (TRL's center_rewards_coefficient, Eisenstein et al. 2023)."""
    return -F.logsigmoid(terms.chosen - terms.rejected) + cfg['rm_center_coef'] * (terms.chosen + terms.rejected) ** 2


def dpo_loss(terms, cfg):
    logits, eps = cfg['beta'] * (terms.rho_chosen - terms.rho_rejected), cfg['label_smoothing']
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def ipo_loss(terms, cfg):
    h = terms.rho_chosen / terms.chosen_tokens - terms.rho_rejected / terms.rejected_tokens if cfg['ipo_normalize'] \
        else terms.rho_chosen - terms.rho_rejected
    return (h - 1 / (2 * cfg['beta'])) ** 2


def kto_loss(terms, cfg):
    desirable = cfg['kto_desirable_weight'] * (1 - torch.sigmoid(cfg['beta'] * (terms.rho_chosen - terms.kto_z)))
    undesirable = cfg['kto_undesirable_weight'] * (1 - torch.sigmoid(cfg['beta'] * (terms.kto_z - terms.rho_rejected)))
    return (desirable + undesirable) / 2


def distill_loss(terms, cfg):
    """d-DPO regresses m on one Δr: a finite target where DPO's pushes m to infinity (Fisch et al. 2024)."""
    target = terms.reward_margins.mean(-1) if cfg['distill_reduce'] == 'mean' else terms.reward_margins[:, 0]
    return (cfg['beta'] * (terms.rho_chosen - terms.rho_rejected) - target) ** 2


def edistill_loss(terms, cfg):
    """e-DPO keeps the reward model closest to the policy: it need only agree with one plausible member of the family,
    and γ·KL pulls it toward π_ref (the pessimism). 'batch': the minimum of the whole loss, one member for all pairs
    of the optimizer step, as in the paper (terms.member, closest_member); 'example': a member per pair."""
    errors = (cfg['beta'] * (terms.rho_chosen - terms.rho_rejected)[:, None] - terms.reward_margins) ** 2
    closest = errors.min(-1).values if cfg['edistill_min'] == 'example' else errors[:, terms.member]
    return closest + cfg['pessimism_gamma'] * forward_kl(terms)


def pdpo_loss(terms, cfg):
    return dpo_loss(terms, cfg) + cfg['pessimism_gamma'] * forward_kl(terms)


# What each loss reads besides the policy's log-probs of the chosen responses; batch_loss computes exactly that.
#   pairs       the rejected responses too (else: chosen only, averaged over tokens)
#   rm          the policy is a reward model: its rewards r(x, y) instead of log-probs
#   reference   the reference's log-probs (and the trust-region update moves it)
#   labels      the reward models' margins Δr_i from the data (data/label.py)
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
    """KTO's z of a global batch (every rank passes the same pairs): each prompt x_i with both responses of the next
    pair (TRL's mismatched pairs, from chosen and rejected alike); z = max(0, mean log-ratio), without gradient, one
    value per optimizer step whatever the split over ranks and micro-steps. Returns z and the tokens of this rank's
    forwards (they count in tokens/s and MFU)."""
    rank, world, n = dist.get_rank(), dist.get_world_size(), len(pairs)
    rows = [truncate(pairs[i].prompt, [pairs[(i + 1) % n].chosen, pairs[(i + 1) % n].rejected], cfg['max_length'],
                     cfg['max_prompt_length']) for i in range(rank, n, world)]
    total, tokens = torch.zeros(2, device=device), torch.zeros((), device=device)  # Σ log-ratio, count
    with torch.no_grad():
        for start in range(0, len(rows), micro_size):
            batch = layout(rows[start:start + micro_size], pad_id, device)
            rho = sequence_logps(policy, batch)[0] - sequence_logps(ref, batch)[0]
            total += torch.stack([rho.sum(), torch.tensor(float(len(rho)), device=device)])
            tokens += batch['n_tokens']
    dist.all_reduce(total)
    return (total[0] / total[1]).clamp(min=0), tokens


def closest_member(margins, reward_margins):
    """e-DPO's reward model of a batch: argmin_i Σ (m − Δr_i)² over the pairs of every rank (no gradient flows)."""
    totals = ((margins[:, None] - reward_margins) ** 2).sum(0)
    dist.all_reduce(totals)
    return totals.argmin()


def edistill_member(policy, ref, batches, cfg):
    """closest_member of an optimizer step's global batch, from forwards without gradient (as KTO's z), so that
    neither the split over ranks nor grad_accum changes the objective; None unless edistill with edistill_min=batch."""
    if cfg['loss'] != 'edistill' or cfg['edistill_min'] != 'batch':
        return None
    with torch.no_grad():
        margins = [cfg['beta'] * torch.sub(*chosen_rejected(sequence_logps(policy, b)[0] - sequence_logps(ref, b)[0]))
                   for b in batches]
    return closest_member(torch.cat(margins), torch.cat([b['reward_margins'] for b in batches]))


def loss_denominator(batch, loss_name):  # what the loss of a batch averages over: response tokens for sft, else pairs
    if not LOSSES[loss_name].pairs:
        return batch['lengths'].sum().float()
    return torch.tensor(float(len(batch['input_ids'])), device=batch['input_ids'].device)


def batch_loss(policy, ref, batch, cfg, kto_z=None, member=None):
    """(Σ of per-pair losses, or Σ token NLL for sft; per-pair metrics) of one micro-batch: the Terms that LOSSES says
    the loss reads, then its function; kto_z and member: the step's kto_baseline and edistill_member."""
    spec = LOSSES[cfg['loss']]
    if spec.reference:
        with torch.no_grad():  # first: its temporaries are gone before the policy's activations are kept for backward
            ref_logps = sequence_logps(ref, batch)[0]
    outputs, tokens = (sequence_rewards(policy, batch), batch['lengths']) if spec.rm else sequence_logps(policy, batch)
    rho = chosen_rejected(outputs - ref_logps) if spec.reference else (None, None)
    terms = Terms(*chosen_rejected(outputs, spec.pairs), *rho, *chosen_rejected(tokens, spec.pairs),
              batch.get('reward_margins'), kto_z, member)
    return spec.fn(terms, cfg).sum(), loss_metrics(terms, spec, cfg)


def loss_metrics(terms, spec, cfg):
    """Per-pair values to log, under TRL's names: rewards/* are the implicit rewards β·ρ."""
    if spec.rm:
        margins = (terms.chosen - terms.rejected).detach()
        return {'accuracy': (margins > 0).float(), 'margin': margins}
    if not spec.reference:
        return {'logps/chosen': terms.chosen.detach()}
    reward_w, reward_l = cfg['beta'] * terms.rho_chosen.detach(), cfg['beta'] * terms.rho_rejected.detach()
    metrics = {'rewards/chosen': reward_w, 'rewards/rejected': reward_l,
               'rewards/accuracies': (reward_w > reward_l).float(), 'rewards/margins': reward_w - reward_l,
               'logps/chosen': terms.chosen.detach(), 'logps/rejected': terms.rejected.detach()}
    if spec.mismatched:
        metrics['kl'] = terms.kto_z.expand(len(reward_w))
    if terms.reward_margins is not None:
        metrics['rewards/rm_margins'] = terms.reward_margins.mean(-1)  # the target, averaged over reward models
    if spec.pessimism:
        metrics['forward_kl'] = forward_kl(terms).detach()
    return metrics


def all_reduce_sums(sums):
    """Sums a dict of scalar tensors over ranks with one collective; returns floats."""
    values = torch.stack([sums[k].float() for k in sums])
    dist.all_reduce(values)
    return dict(zip(sums, values.tolist()))


# -----------------------------------------------------------------------------
# reference update: identical sharding means each rank mixes its own shards, with no communication
@torch.no_grad()
def update_reference(policy, ref, alpha):
    """θ_ref ← α·θ + (1−α)·θ_ref (α = 1: θ_ref ← θ), in fp32 on the local shards of both models; in a LoRA run on the
    adapters (mixed_parameters)."""
    reshard(policy, ref)  # the mix must land in the sharded storage, not in a gathered copy
    ref_params, policy_params = ([p.to_local() if isinstance(p, DTensor) else p for p in params]
                                 for params in mixed_parameters(policy, ref))
    if alpha == 1.0:
        torch._foreach_copy_(ref_params, policy_params)
    else:
        torch._foreach_lerp_(ref_params, policy_params, alpha)


def reshard(*models):
    """FSDP's sharded parameters, the optimizer's and the checkpoint's, registered again where a forward left them
    gathered (the policy's root stays gathered until its backward, and an evaluation has none)."""
    for module in {m for model in models if isinstance(model, torch.nn.Module) for m in model.modules()}:
        if isinstance(module, FSDPModule):
            module.reshard()


# -----------------------------------------------------------------------------
# training loop
def train(cfg):
    rank, world, device = setup_distributed(cfg['device'])
    master = rank == 0
    micro_size = micro_batch_size(cfg, world)
    print0(textwrap.fill(' '.join(f'{k}={v!r}' for k, v in cfg.items()), 120, initial_indent='config: '))
    torch.manual_seed(cfg['seed'])  # a new score head, LoRA's A; nothing else draws from torch's generator
    tokenizer, train_pairs, eval_pairs = load_data(cfg, master, world * micro_size)
    cfg = {**cfg, **run_fingerprints(cfg, master)}
    pad_id = padding_id(tokenizer)
    out_dir, lock = Path(cfg['out_dir']), open_out_dir(cfg, master)
    policy, ref, compute_dtype = load_models(cfg, device, world)
    trained = [p for p in policy.parameters() if p.requires_grad]
    # the parameters of the policy's forward (a LoRA run's reference adapters are not)
    n_params = sum(p.numel() for n, p in policy.named_parameters() if not n.endswith(('ref_A', 'ref_B')))
    # fused: one kernel over all parameters, ~5x faster than the default per-tensor loop (SmolLM2 on a CPU: 0.08 s)
    optimizer = torch.optim.AdamW(trained, lr=cfg['lr'], weight_decay=cfg['weight_decay'], fused=True)
    start_iter = load_checkpoint(out_dir, ref, optimizer, policy) if cfg['resume'] else 0
    if start_iter >= cfg['max_iters']:
        print0(f"note: the saved run is at iteration {start_iter}, max_iters={cfg['max_iters']}: nothing to train")
    wandb_init = dict(project=cfg['wandb_project'], name=cfg['wandb_run_name'] or None, config=cfg)
    log = open_log(out_dir / 'metrics.jsonl', start_iter if cfg['resume'] else None,
                   wandb_init if cfg['wandb_log'] else None) if master else lambda record: None
    print0(f'{n_params / 1e6:.2f}M parameters ({sum(p.numel() for p in trained) / 1e6:.2f}M trained), world size '
           f'{world}, {micro_size} pairs per micro-batch, compute dtype {compute_dtype}, device {device}')
    estimate = ', '.join(f'{k} {v / 2**30:.2f} GB' for k, v in memory_estimate(policy, ref, world).items())
    print0(textwrap.fill(f'estimated memory per device: {estimate} (activations not included)', 120))
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
        kto_z, forward_tokens = kto_baseline(policy, ref, step_pairs, micro_size, pad_id, cfg, device) \
            if spec.mismatched else (None, torch.zeros((), device=device))
        mine = step_pairs[rank::world]
        batches = [make_batch(mine[m * micro_size:(m + 1) * micro_size], spec.pairs, pad_id, device)
                   for m in range(cfg['grad_accum'])]
        member = edistill_member(policy, ref, batches, cfg)
        if member is not None:  # its forwards without gradient count as KTO's do
            forward_tokens = forward_tokens + sum(b['n_tokens'] for b in batches)
        # The objective is a mean over the global batch (of pairs, or of response tokens for sft). FSDP averages
        # gradients over ranks, so each rank scales its sum by world/denominator.
        denominator = sum(loss_denominator(b, cfg['loss']) for b in batches)
        dist.all_reduce(denominator)
        # FSDP reduce-scatters each micro-step's gradients into the sharded ones: deferring it to the last micro-step
        # would keep every parameter's whole float32 gradient on every rank (32 GB at 8B). LoRA's is tiny.
        sums = {'forward_tokens': forward_tokens}
        for batch in batches:
            loss_sum, metrics = batch_loss(policy, ref, batch, cfg, kto_z, member)
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
            tokens, forwards = record.pop('tokens'), record.pop('forward_tokens')
            record.update(lr=lr, grad_norm=grad_norm.item(), step_time=dt, tokens_per_sec=(tokens + forwards) / dt,
                          ref_updates=ref_updates, peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30
                          if device.type == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
            if device.type == 'cuda':  # FLOPs per token: policy forward 2N, backward 4N (LoRA: 2N, no weight
                # gradients of the frozen base), reference forward 2N; the forwards without gradient: 4N
                flops = (6 - 2 * (cfg['lora_rank'] > 0) + 2 * (ref is not None)) * n_params * tokens
                record['mfu'] = (flops + 4 * n_params * forwards) / dt / (world * cfg['peak_flops'])
            log(record)
            bar.set_postfix({k.split('/')[-1]: f'{record[k]:.3f}' for k in ('loss', 'rewards/accuracies', 'accuracy',
                                                                           'rewards/margins', 'margin') if k in record})
        if it % cfg['eval_interval'] == 0 or it == cfg['max_iters']:
            record = {} if eval_pairs is None else evaluate(policy, ref, eval_pairs, pad_id, cfg, rank, world,
                                                             micro_size, device)
            if record:
                log({'iter': it, **record})
                print0(textwrap.fill(f'iter {it}: ' + ', '.join(f'{k} {v:.4f}' for k, v in record.items()), 120,
                                     subsequent_indent='    '))
            save_checkpoint(out_dir, policy, ref, optimizer, tokenizer, it, cfg)
            if cfg['snapshots']:
                stop_together(save_snapshot(out_dir, it) if master else None)
    if master:
        lock.close()
    dist.destroy_process_group()


# =============================================================================
# plumbing, in the order a run meets it: settings, processes, data, models (FSDP, LoRA), evaluation, checkpoints
def get_config(argv):
    """The config block above with argv applied, each setting checked by its rule (data/settings.py)."""
    cfg = parse_overrides(argv, defaults_of(globals()), __file__)
    check_settings(cfg, globals())
    return cfg


# -----------------------------------------------------------------------------
# processes: one process is a world of one, so the same FSDP code path runs with `python` and with `torchrun`
def resolve_device(name):
    if name == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'error: device=cuda, but this torch ({torch.__version__}) sees no CUDA device (a CPU-only '
                         'build, or no GPU visible); use device=cpu or device=auto')
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if name == 'auto' else name)
    if device.type == 'cuda':  # float32 matmuls (a float32 run, the fp32 parts of a bf16 one) in TF32 on tensor cores
        torch.set_float32_matmul_precision('high')
    return device


def setup_distributed(device_name, timeout=dist_timeout):
    """(rank, world_size, device) from torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or a 1-rank group for plain python; the
    group's collectives (the FSDP mesh's too) wait `timeout` minutes for a slower rank."""
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = resolve_device(device_name)
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if not dist.is_initialized():  # device_id: NCCL binds the group to this GPU at once, not at a first collective
        alone = {} if 'RANK' in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend, **alone, timeout=datetime.timedelta(minutes=timeout),
                                device_id=device if backend == 'nccl' else None)
    return rank, world, device


def stop_together(error):
    """Every rank stops, or none: each passes its 'error: ...' line or None; all raise the first (rank 0 prints it)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if error := next((e for e in errors if e), None):
        raise SystemExit(error)


def print0(*args):  # on rank 0 only, through tqdm so that a progress bar stays intact
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(' '.join(map(str, args)))


# -----------------------------------------------------------------------------
# data: pairs from data/pairs.py, checked before out_dir is touched
def micro_batch_size(cfg, world):  # pairs per micro-batch of each process
    micro_size, rest = divmod(cfg['batch_size'], world * cfg['grad_accum'])
    if rest or micro_size == 0:
        raise SystemExit(f"error: batch_size={cfg['batch_size']} must be a multiple of "
                         f"world_size*grad_accum={world * cfg['grad_accum']}")
    return micro_size


def load_data(cfg, master, global_micro):
    """(tokenizer, train Pairs, held-out Pairs or None), with the responses and labels that the loss reads."""
    from transformers import AutoConfig
    for key in ('init_from', 'ref_from'):  # ref_from='' is a copy of init_from; rm trains a new or a given reward model
        if cfg[key]:
            check_model_path(cfg[key], key, reward_model=None if LOSSES[cfg['loss']].rm else False)
    tokenizer = load_tokenizer(cfg['init_from'], 'init_from')
    check_vocabulary(tokenizer, cfg['ref_from'], 'ref_from')
    limit = getattr(AutoConfig.from_pretrained(cfg['init_from']), 'max_position_embeddings', None) or math.inf
    if cfg['max_length'] > limit:
        raise SystemExit(f"error: max_length={cfg['max_length']} is over the {limit} positions of {cfg['init_from']}")
    settings = dict(tokenizer=tokenizer, max_length=cfg['max_length'], max_prompt_length=cfg['max_prompt_length'],
                    need_rejected=LOSSES[cfg['loss']].pairs, verbose=master, need_rewards=LOSSES[cfg['loss']].labels)
    train_pairs, eval_pairs = (load_pairs(cfg['data'], split, required=split == 'train', **settings)
                               for split in ('train', 'test'))
    if master:
        note_evaluation(eval_pairs, cfg['eval_pairs'], global_micro)
    return tokenizer, train_pairs, eval_pairs


# -----------------------------------------------------------------------------
# models: policy and reference, one architecture with float32 master weights (a bf16 reference would round a small
# soft update away), sharded alike by FSDP2 (each decoder layer, then the root; bf16 compute by MixedPrecisionPolicy).
# A world of one is not sharded unless fsdp=always (FSDP's copies cost a tiny model 27% of its step, SmolLM2 6% and
# 0.4 GB on a CPU); bf16 is autocast there. Under torchrun only rank 0 reads weights; the others receive their shards.
def load_models(cfg, device, world):
    """(policy, reference or None, compute dtype): two models, or with LoRA one (add_lora), the reference being that
    model with its reference adapters selected."""
    spec, lora = LOSSES[cfg['loss']], cfg['lora_rank'] > 0
    compute_dtype = cfg['dtype'] if cfg['dtype'] != 'auto' else ('bfloat16' if device.type == 'cuda' else 'float32')
    bf16 = compute_dtype == 'bfloat16'
    mesh = dist.device_mesh.init_device_mesh(device.type, (world,))
    meta = dist.get_rank() != 0
    # a resumed run's policy is out_dir's HF model; a LoRA run's is init_from's (a merged weight cannot be un-merged)
    name = cfg['out_dir'] if cfg['resume'] and not lora else cfg['init_from']
    policy = load_model(name, spec.rm, getattr(torch, compute_dtype) if lora else torch.float32, meta)
    moving = spec.reference and cfg['ref_update'] != 'none'
    if lora:
        add_lora(policy, cfg['lora_rank'], cfg['lora_alpha'], reference=moving)
    # without ref_from the reference copies the policy: before sharding in a world of one, else its local shards
    copied = spec.reference and not lora and not cfg['ref_from']
    ref = (copy.deepcopy(policy) if world == 1 else load_model(name, meta=True)) if copied else None
    if cfg['grad_checkpoint']:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    shard = world > 1 or cfg['fsdp'] == 'always'
    shard_from_rank0(policy, mesh, bf16, device, reshard_root=False, shard=shard)
    policy.train()
    if spec.reference and lora:
        ref = AdapterReference(policy, 'reference' if moving else None)
    elif spec.reference:
        ref = ref or load_model(cfg['ref_from'], meta=meta)
        ref.requires_grad_(False).eval()
        # root gathered only during its forward
        shard_from_rank0(ref, mesh, bf16, device, reshard_root=True, shard=shard, copy_of=policy if copied else None)
    if cfg['ref_from'] and [p.shape for p in policy.parameters()] != [p.shape for p in ref.parameters()]:
        raise SystemExit('error: ref_from must have the same architecture as init_from (the update mixes them)')
    return policy, ref, compute_dtype


def load_model(name, reward_model=False, dtype=torch.float32, meta=False):
    """An HF causal LM in `dtype` with dropout off (the loss compares policy and reference forwards exactly), or a
    sequence classifier with one output, the reward r(x, y) (from the SFT model its score head starts at random). SDPA
    attention: layout's masks are boolean. meta=True: the architecture alone, on the meta device, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the "Loading weights" bars
    config = AutoConfig.from_pretrained(name)
    for key, value in config.to_dict().items():
        if ('dropout' in key or 'pdrop' in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    if reward_model:
        # the pad id of the batches, whatever a hub config says: a transformers classifier then pools where we read
        config.pad_token_id = padding_id(AutoTokenizer.from_pretrained(name))
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    if meta:
        with torch.device('meta'):
            return with_response_outputs(auto.from_config(config, dtype=dtype, attn_implementation='sdpa'))
    return with_response_outputs(auto.from_pretrained(name, config=config, dtype=dtype, attn_implementation='sdpa'))


def with_response_outputs(model):
    """The model with response_outputs (below) as a method, so that distribute_model can register it with FSDP."""
    model.response_outputs = types.MethodType(response_outputs, model)
    return model


def distribute_model(model, mesh, bf16, reshard_root, shard):
    """FSDP2 on each decoder layer, then on the root, whose forward response_outputs becomes (it calls the embedding and
    the head the root holds); reshard_root=False keeps the root gathered from forward to backward. shard=False: the
    model on the device, bf16 autocast around response_outputs."""
    if not shard:
        model.to(mesh.device_type)
        if bf16:
            model.response_outputs = torch.autocast(mesh.device_type, torch.bfloat16)(model.response_outputs)
        return model
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_root)
    register_fsdp_forward_method(model, 'response_outputs')
    return model


def decoder_blocks(model):
    """The decoder layers: the modules whose class is named in model._no_split_modules."""
    block_names = set(model._no_split_modules or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f'no decoder layers found in {type(model).__name__} (looked for {block_names})')
    return blocks


def shard_from_rank0(model, mesh, bf16, device, reshard_root, shard, copy_of=None):
    """distribute_model, then under torchrun each rank's shards: broadcast one tensor at a time from rank 0, or copied
    from the local shards of copy_of (sharded the same way). A meta model's non-persistent buffers (RoPE's inv_freq),
    in no state dict, are recomputed as transformers initializes them."""
    weights = model.state_dict() if dist.get_rank() == 0 and mesh.size() > 1 and copy_of is None else {}
    distribute_model(model, mesh, bf16, reshard_root, shard)
    if mesh.size() == 1:  # the one rank read every model itself (a reference is a copy made before sharding)
        return model
    if any(p.device.type == 'meta' for p in model.parameters()):
        model.to_empty(device=device)
        for module in model.modules():
            if module._non_persistent_buffers_set:
                model._init_weights(module)
    if copy_of is not None:
        update_reference(copy_of, model, 1.0)
    else:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


# response tokens per log-softmax block: [256, V] float32 is 50 MB for V = 49,152, and a CPU is no faster with more; on
# a GPU a block's ~20 kernel launches outlast a small model's 256-row head matmul (estimated, not timed on a GPU).
LOGPS_CHUNK = {'cpu': 256, 'cuda': 1024}


def token_logps(head, hidden, labels):
    return head(hidden).float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)


def response_outputs(model, input_ids, position_ids, attention_mask, predict, labels=None, last=None):
    """The log-prob of each response token (a reward model: the score at each response's last token), from the hidden
    states at those positions only; head and log-softmax in chunks recomputed in backward, so one [LOGPS_CHUNK, V]
    float32 block is alive at a time instead of the [rows, T, V] logits and their gradient."""
    hidden = model.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state.flatten(0, 1)
    if labels is None:
        return model.score(hidden[last])[:, 0].float()
    head, chunk = model.get_output_embeddings(), LOGPS_CHUNK[hidden.device.type]
    return torch.cat([checkpoint(token_logps, head, h, y, use_reentrant=False)
                      for h, y in zip(hidden[predict].split(chunk), labels.split(chunk))])


def sequence_logps(model, batch):
    """Summed log-probs of each response of a layout batch (response-major: [chosen; rejected]), and their lengths."""
    logps = model.response_outputs(batch['input_ids'], batch['position_ids'], batch['attention_mask'],
                                   batch['predict'], batch['labels'])
    return logps.new_zeros(len(batch['lengths'])).index_add(0, batch['owner'], logps), batch['lengths']


def sequence_rewards(reward_model, batch):
    """The reward of each response of a layout batch (response-major)."""
    return reward_model.response_outputs(batch['input_ids'], batch['position_ids'], batch['attention_mask'],
                                         batch['predict'], last=batch['last'])


def memory_estimate(policy, ref, world):
    """Estimated bytes per device of a run's state, printed at its start (tests/memory_table.py: for Llama 1B-70B): the
    policy's weights (LoRA: the base in the compute dtype and the float32 adapters), gradients and AdamW's two moments
    of what trains, and the reference (a float32 model, LoRA's reference adapters, or none), each divided over the
    world by FSDP, gradients too whatever grad_accum. Activations, gathered layers and autocast copies come on top:
    SmolLM2 on a CPU (bf16, 4 pairs of 256 tokens per step) peaks at 4.69 GB RSS for 2.50 GB (tests/bench_train.py)."""
    ref_params = mixed_parameters(policy, ref)[0] if ref is not None else []
    in_ref = {id(p) for p in ref_params}
    trained = [p for p in policy.parameters() if p.requires_grad]

    def size(params):
        return sum(p.numel() * p.element_size() for p in params) / world
    return {'weights': size(p for p in policy.parameters() if id(p) not in in_ref), 'gradients': size(trained),
            'optimizer': 2 * size(trained), 'reference': size(ref_params)}


# -----------------------------------------------------------------------------
# LoRA (lora_rank=R > 0; Hu et al. 2022): each Linear of the decoder blocks (not the embedding, the LM head or a score
# head, which trains whole) computes W·x + (lora_alpha/R)·B·A·x, W frozen in the compute dtype and stored once, A
# (kaiming-uniform) and B (zero) float32 and trained, as PEFT starts them. The reference is a second pair (A_ref, B_ref)
# on the same W, selected for its forward, and the update applies the paper's rule to what trains:
#     A_ref ← α·A + (1−α)·A_ref,   B_ref ← α·B + (1−α)·B_ref
# Its delta (αB + (1−α)B_ref)(αA + (1−α)A_ref) is not the mix of the deltas αBA + (1−α)B_ref·A_ref: it differs by
# −α(1−α)(B − B_ref)(A − A_ref), zero only for α = 0 or 1 (tested). ref_update=none: the reference is W, adapters off
# (PEFT's DPO). Checkpoints hold the merged policy and the PEFT adapter (export_model); resume reads the adapters.
class LoRALinear(torch.nn.Module):
    """A frozen Linear `base` plus float32 adapters: base(x) + scale·B·A·x with the policy's (lora_A, lora_B) or the
    reference's (ref_A, ref_B) as `adapters` selects, or base(x) alone (adapters=None)."""

    def __init__(self, base, rank, scale, reference):
        super().__init__()
        self.base, self.scale, self.adapters = base.requires_grad_(False), scale, 'policy'
        device = base.weight.device
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=device))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if reference:
            self.ref_A = torch.nn.Parameter(self.lora_A.detach().clone(), requires_grad=False)
            self.ref_B = torch.nn.Parameter(self.lora_B.detach().clone(), requires_grad=False)

    def forward(self, x):
        if self.adapters is None:
            return self.base(x)
        a, b = (self.lora_A, self.lora_B) if self.adapters == 'policy' else (self.ref_A, self.ref_B)
        return self.base(x) + self.scale * F.linear(F.linear(x, a), b)


class AdapterReference:
    """The reference of a LoRA run, called like a model by sequence_logps: the policy's model with the reference
    adapters selected ('reference'), or none (None: the base)."""

    def __init__(self, model, adapters):
        self.model, self.adapters = model, adapters

    def response_outputs(self, *args, **kwargs):
        select_adapters(self.model, self.adapters)
        try:
            return self.model.response_outputs(*args, **kwargs)
        finally:
            select_adapters(self.model, 'policy')


def select_adapters(model, adapters):
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.adapters = adapters


def add_lora(model, rank, alpha, reference):
    """Wraps every Linear of the decoder blocks in a LoRALinear and freezes everything else but a score head, which is
    new and trains in float32. model.lora_config is the adapter's PEFT config (adapter_config.json)."""
    model.requires_grad_(False)
    targets = set()
    for block in decoder_blocks(model):
        for name, module in list(block.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent, _, child = name.rpartition('.')
                setattr(block.get_submodule(parent), child, LoRALinear(module, rank, alpha / rank, reference))
                targets.add(child)
    head = getattr(model, 'score', None)
    if head is not None:
        head.float().requires_grad_(True)
    model.lora_config = dict(peft_type='LORA', task_type='CAUSAL_LM' if head is None else 'SEQ_CLS',
                             base_model_name_or_path=model.name_or_path, r=rank, lora_alpha=alpha, lora_dropout=0.0,
                             target_modules=sorted(targets), bias='none', fan_in_fan_out=False, use_rslora=False,
                             use_dora=False, init_lora_weights=True, inference_mode=True,
                             modules_to_save=None if head is None else ['score'])
    return model


def mixed_parameters(policy, ref):
    """(reference parameters, policy parameters), pairwise what update_reference mixes: every parameter of the two
    models, or in a LoRA run each adapted Linear's (A_ref, A) and (B_ref, B); none when the reference is the base."""
    if not isinstance(ref, AdapterReference):
        return list(ref.parameters()), list(policy.parameters())
    modules = [m for m in policy.modules() if isinstance(m, LoRALinear)] if ref.adapters == 'reference' else []
    return [p for m in modules for p in (m.ref_A, m.ref_B)], [p for m in modules for p in (m.lora_A, m.lora_B)]


# -----------------------------------------------------------------------------
# evaluation and logs
def evaluate(policy, ref, pairs, pad_id, cfg, rank, world, micro_size, device):
    """Mean metrics over the first eval_pairs held-out pairs (a whole number of global micro-batches); KTO's z and
    e-DPO's reward model are each one value from all of them."""
    n = min(len(pairs), cfg['eval_pairs']) // (world * micro_size) * world * micro_size
    if n == 0:
        return {}
    mismatched = LOSSES[cfg['loss']].mismatched
    kto_z = kto_baseline(policy, ref, pairs[:n], micro_size, pad_id, cfg, device)[0] if mismatched else None
    batches = [make_batch(pairs[start:start + micro_size], LOSSES[cfg['loss']].pairs, pad_id, device)
               for start in range(rank * micro_size, n, world * micro_size)]
    member = edistill_member(policy, ref, batches, cfg)
    sums = {}
    with torch.no_grad():
        for batch in batches:
            loss_sum, metrics = batch_loss(policy, ref, batch, cfg, kto_z, member)
            metrics.update(loss=loss_sum, denominator=loss_denominator(batch, cfg['loss']))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.sum()
    totals = all_reduce_sums(sums)
    denominator = totals.pop('denominator')
    return {f'eval/{k}': v / (denominator if k == 'loss' else n) for k, v in totals.items()}


def stop_if_not_finite(loss, grad_norm, it):
    """Stops every rank at a step whose loss or gradient norm is NaN or infinite, before the optimizer writes it into
    the weights (the loss summed over ranks, so that all stop together; the gradient norm is already the model's)."""
    loss = loss.detach().float().clone()
    dist.all_reduce(loss)
    if not (loss.isfinite() and grad_norm.isfinite()):
        raise SystemExit(f'error: iteration {it}: loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}; '
                         'stopped before the optimizer step: the last checkpoint holds finite weights (lr too high?)')


# -----------------------------------------------------------------------------
# checkpoints. Every eval_interval steps out_dir receives the policy as an HF model that from_pretrained loads (float32,
# read back at resume; a LoRA run's merged, its PEFT adapter in out_dir/adapter), the tokenizer, nanotr_config.json;
# state/, the rest of what resume needs (reference or adapters, AdamW), each rank writing its own shards with
# torch.distributed.checkpoint (DCP); and checkpoint.json last: the step, the settings, each file's sha256 (hashed by
# its writer) and a digest of itself. All goes to .tmp_checkpoint, then moves in by atomic renames: a kill leaves the
# previous checkpoint, or a whole new one that the next start finishes moving. --resume=True verifies each file once
# and refuses in one line a damaged or edited checkpoint, settings changed other than RESUMABLE, and other data or
# another LoRA base under the same path; DCP reshards state/ for another number of processes. A resumed run ends with
# the straight run's weights. One run per out_dir (a lock); a fresh run refuses an earlier run's files (RUN_FILES);
# out_dir may not be an input. Nothing draws from torch's generator after the seed: no RNG state is saved.
RESUMABLE = [name for name, (_, rule) in declared(globals()).items() if rule.resumable]
RUN_FILES = ('checkpoint.json', 'state', 'state.pt', 'metrics.jsonl', 'nanotr_config.json', 'config.json',
             'generation_config.json', '*.safetensors', 'adapter', 'tokenizer*', 'special_tokens_map.json',
             'added_tokens.json', 'vocab.*', 'merges.txt', 'chat_template.*', 'iter_*', '.tmp_*', '*.tmp')


def run_fingerprints(cfg, master):
    """Fingerprints of the pairs and of a LoRA run's base, checked at resume like the settings; taken by rank 0."""
    fingerprints = [{'data_fingerprint': fingerprint(cfg['data'], splits=True),
                     **({'init_from_fingerprint': fingerprint(cfg['init_from'])} if cfg['lora_rank'] else {})}
                    if master else None]
    dist.broadcast_object_list(fingerprints)
    return fingerprints[0]


def open_out_dir(cfg, master):
    """Checks out_dir on every rank (a refused run leaves nothing behind); rank 0 locks it for the run, checks it again
    and commits a save that a kill interrupted; the ranks verify a checkpoint to resume."""
    out_dir, lock, error = Path(cfg['out_dir']), None, None
    check_out_dir(cfg)
    if master:
        try:
            lock = lock_out_dir(out_dir)
            check_out_dir(cfg)  # what a run that held the lock until now left
            commit_folder(out_dir / '.tmp_checkpoint', out_dir, 'checkpoint.json')
        except SystemExit as e:
            error = str(e)
    stop_together(error)
    if cfg['resume']:
        check_checksums(out_dir)
    return lock


def check_out_dir(cfg):
    """The rules of out_dir above; a save that a kill interrupted (.tmp_checkpoint, committed before resuming) must be
    this run's too: another run's is refused, touching nothing."""
    out_dir = Path(cfg['out_dir']).resolve()
    check_outputs([('out_dir', cfg['out_dir'])], [(k, cfg[k], [cfg[k]]) for k in ('init_from', 'ref_from', 'data')])
    if not cfg['resume']:
        found = sorted(f.name for f in out_dir.iterdir() if any(fnmatch.fnmatch(f.name, p) for p in RUN_FILES)) \
            if out_dir.is_dir() else []
        if found:
            raise SystemExit(f"error: {cfg['out_dir']} holds files of an earlier run ({', '.join(found)}); continue "
                             'it with --resume=True, use another out_dir, or delete them to start a new run there')
        return
    manifests = [p for p in (out_dir / 'checkpoint.json', out_dir / '.tmp_checkpoint/checkpoint.json') if p.is_file()]
    if not manifests:
        raise SystemExit(f"error: resume=True but {out_dir / 'checkpoint.json'} does not exist")
    for path in manifests:
        saved = read_sealed(path)['config']
        changed = [f'{k}={saved[k]!r} saved, {v!r} now' for k, v in cfg.items()
                   if k in saved and k not in RESUMABLE and saved[k] != v]
        if changed:
            raise SystemExit(f"error: resume=True with other settings than the run saved in {path}: "
                             f"{'; '.join(changed)}. A resumed run may change only {', '.join(RESUMABLE)}")


def check_checksums(out_dir):
    """Stops every rank in one line unless each file that checkpoint.json lists has its sha256, each hashed once."""
    damaged = first_mismatch(out_dir, read_sealed(out_dir / 'checkpoint.json')['sha256'], dist.get_rank(),
                             dist.get_world_size())
    stop_together(damaged and f'error: {out_dir / damaged} is missing or changed since it was saved (its sha256 '
                              f"differs from {out_dir / 'checkpoint.json'}); the checkpoint is damaged, not resumed")


def save_checkpoint(out_dir, policy, ref, optimizer, tokenizer, it, cfg):
    """Writes out_dir/.tmp_checkpoint and commits it into out_dir (the section's comment); a failed write on any rank (a
    full disk) stops every rank in one line."""
    rank, out_dir = dist.get_rank(), Path(out_dir)
    tmp, digests, error = out_dir / '.tmp_checkpoint', {}, None
    reshard(policy, ref)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:  # a failed write in dcp.save raises on every rank, so all or none go on to the export's gathers
        dcp.save(resume_state(policy, ref, optimizer), checkpoint_id=tmp / 'state')
        digests = export_model(tmp, policy, tokenizer, cfg)
        digests.update({f'state/{f.name}': sha256(f) for f in (tmp / 'state').iterdir()  # rank 0: also .metadata
                        if f.name.startswith(f'__{rank}_') or rank == 0 and not f.name.startswith('__')})
    except (Exception, dcp.CheckpointException) as e:  # a full disk is an OSError; DCP wraps every rank's error
        e = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C while DCP writes: an interruption, not a failed write
            raise e
        error = f'error: could not write the checkpoint of iteration {it} to {tmp} ({type(e).__name__}: ' \
                f'{" ".join(str(e).split())}); the previous checkpoint in {out_dir} is intact'
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, (error, digests))
    error = next((e for e, _ in results if e), None)
    if rank == 0 and not error:
        try:
            listed = dict(sorted(digest for _, ranks in results for digest in ranks.items()))
            (tmp / 'checkpoint.json.tmp').write_text(json.dumps(seal({'iter': it, 'config': cfg, 'sha256': listed})))
            os.replace(tmp / 'checkpoint.json.tmp', tmp / 'checkpoint.json')  # from here on, the save is complete
        except OSError as e:
            error = f'error: could not write {tmp / "checkpoint.json"} ({e.strerror or e}); the previous checkpoint ' \
                    f'in {out_dir} is intact'
    if rank == 0 and error:
        shutil.rmtree(tmp, ignore_errors=True)
    stop_together(error)
    if rank == 0:
        commit_folder(tmp, out_dir, 'checkpoint.json')
    dist.barrier()


def resume_state(policy, ref, optimizer):
    """What resume reads besides the HF export, each rank its own shards: AdamW's state and the reference, or a LoRA
    run's adapters (the policy's, the reference's, a reward model's score head)."""
    if getattr(policy, 'lora_config', None):
        kept = {n for n, p in policy.named_parameters() if p.requires_grad or n.endswith(('ref_A', 'ref_B'))}
        models = {'adapters': {k: v for k, v in get_model_state_dict(policy).items() if k in kept}}
    else:
        models = {'ref': get_model_state_dict(ref)} if ref is not None else {}
    return {**models, 'optimizer': get_optimizer_state_dict(policy, optimizer)}


def export_model(folder, policy, tokenizer, cfg):
    """The policy's HF folder as save_pretrained writes it, with the tokenizer and nanotr_config.json, streamed: no rank
    holds more than one whole tensor. A LoRA run's is the merged policy, its adapter in folder/adapter as PEFT saves
    it (beside the model, transformers would apply it twice); PeftModel.from_pretrained gives the merged logits on the
    base loaded in the dtype it trained in (after dtype=bfloat16, bf16). Returns {file: sha256}, on rank 0."""
    weights, adapters = export_entries(policy)
    master, lora_config = dist.get_rank() == 0, getattr(policy, 'lora_config', None)
    digests = {'model.safetensors': write_safetensors(folder / 'model.safetensors', weights, master)}
    if lora_config:
        digests['adapter/adapter_model.safetensors'] = write_safetensors(
            folder / 'adapter' / 'adapter_model.safetensors', adapters, master)
    return write_model_files(folder, policy, tokenizer, cfg, lora_config, digests) if master else {}


def export_entries(policy):
    """(HF weights, a LoRA run's PEFT adapter weights) as lists of (name, shape, dtype, get), get() gathering a whole
    tensor on every rank; tied weights once. All float32: W + (alpha/R)·B·A would lose a delta under half a bf16 ulp."""
    def whole(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
    lora = getattr(policy, 'lora_config', None)
    scale = lora['lora_alpha'] / lora['r'] if lora else None
    state, seen, weights, adapters = policy.state_dict(keep_vars=True), set(), [], []
    for key, value in state.items():
        module, _, name = key.rpartition('.')
        if id(value) in seen or name in ('ref_A', 'ref_B'):
            continue
        seen.add(id(value))
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        if name in ('lora_A', 'lora_B') or lora and key.startswith('score.'):  # PEFT's base_model.model.{key}[.weight]
            adapters.append(('base_model.model.' + re.sub(r'\.(lora_[AB])$', r'.\1.weight', key), value.shape, dtype,
                             lambda v=value: whole(v)))
        if module.endswith('.base') and name == 'weight':  # a LoRALinear's frozen W
            a, b = (state[f"{module.removesuffix('.base')}.{ab}"] for ab in ('lora_A', 'lora_B'))
            weights.append((f"{module.removesuffix('.base')}.weight", value.shape, dtype,
                            lambda v=value, a=a, b=b: whole(v).float() + scale * whole(b) @ whole(a)))
        elif name not in ('lora_A', 'lora_B'):  # the rest; a LoRALinear's bias under its Linear's name
            weights.append((re.sub(r'\.base\.bias$', '.bias', key), value.shape, dtype,
                            lambda v=value, d=dtype: whole(v).to(d)))
    return weights, adapters


def load_checkpoint(out_dir, ref, optimizer, policy):
    """Restores resume_state, each rank reading the shards it needs; returns the step."""
    state = resume_state(policy, ref, optimizer)
    dcp.load(state, checkpoint_id=Path(out_dir) / 'state')
    if 'adapters' in state:
        set_model_state_dict(policy, state['adapters'], options=StateDictOptions(strict=False))
    elif 'ref' in state:
        set_model_state_dict(ref, state['ref'])
    set_optimizer_state_dict(policy, optimizer, state['optimizer'])
    return read_sealed(Path(out_dir) / 'checkpoint.json')['iter']


def save_snapshot(out_dir, it):
    """out_dir/iter_{it}: a copy of the HF model files, for sampling (not resuming), whole or not at all; an error line
    if it failed (a full disk)."""
    try:
        copy_folder(out_dir, out_dir / f'iter_{it}', lambda names: [
            n for n in names if n in RUN_STATE or n.startswith(('iter_', '.'))])
    except OSError as e:  # shutil.Error lists (source, target, reason) of each file it could not copy
        reason = e.args[0][0][2] if isinstance(e, shutil.Error) else e
        return f"error: could not write the snapshot {out_dir / f'iter_{it}'} ({reason}); the checkpoint of " \
               f'iteration {it} in {out_dir} is whole'


def main(argv):
    config = get_config(argv)
    try:
        train(config)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; a save in progress is finished by the next start
        manifest = Path(config['out_dir']) / 'checkpoint.json'
        last = f"iteration {json.loads(manifest.read_text())['iter']}" if manifest.is_file() else 'none yet'
        raise SystemExit(f"error: interrupted; the last checkpoint in {config['out_dir']}: {last} (--resume=True "
                         'continues from it)')


if __name__ == '__main__':
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:  # every rank stops at a refusal and rank 0 says why; the others end with status 0, so that
        # torchrun waits for rank 0's line instead of stopping it before the line is out
        if dist.is_initialized():
            dist.destroy_process_group()  # NCCL warns at exit of a group left alive
        code = 0 if e.code and os.environ.get('RANK', '0') != '0' else e.code
    exit_process(code)  # not a plain exit: a DTensor op kept the group's threads alive (data/settings.py)
