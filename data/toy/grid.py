"""
The toy experiment (data/toy/prepare.py has the task, the gold reward r* and the biased annotator). Two questions,
each measured as its paper measures it, with gold reward r* and KL(π‖π_SFT) estimated from samples of each checkpoint:

A. Trust region (Gorbatovski et al.): over-optimization. For DPO, IPO and KTO, each with the reference fixed,
   soft-updated every step (τ = 1, small α), soft-updated with the paper's α = 0.6 every 20% of training, or
   hard-updated every 20% of training, runs over three β (10× apart; IPO in its own range) on the shipped pairs (the
   length-biased annotator): frontiers within KL budgets (Gao et al. 2023; Rafailov et al. 2024) and gold at matched
   KL, far from the SFT model included. Every checkpoint also logs the paper's toy diagnostics: per-token log-probs of
   held-out chosen and rejected responses, the fraction of samples off the task's support, and the implicit margin
   (vs π_SFT) and chosen log-prob on training pairs.
B. Distillation (Fisch et al.): a length-bias sweep. Pairs of SFT samples relabelled by Bradley–Terry on r* itself,
   then subsampled so that a fraction ρ ∈ {0.2, 0.5, 0.8} prefers the longer list; per ρ, three reward models, then
   DPO, IPO, d-DPO, e-DPO (both forms of its minimum) and p-DPO with γ swept, and TR-DPO; the implicit reward margins
   and chosen log-probs on training pairs against the reward models' margins.

Validation and test: the 96 prompts are split once into 32 validation and 64 test prompts. Every tuned setting and
every chosen checkpoint is picked on the validation prompts; every reported number is measured on the test prompts.

Every run keeps a snapshot at each evaluation (train_tr.py snapshots=True); each snapshot samples all prompts with
sample.py (ref = the SFT model, so the mean of log π(y|x) − log π_SFT(y|x) estimates the KL) and is scored by r*.
Mean ± std over 3 seeds (data order); all checkpoints share one sampling seed.

  python data/toy/grid.py                                   # the full grid: data/toy/results.md and four plots
  python data/toy/grid.py --quick --out=out/toy_quick       # a smoke version, about 2 minutes (tests/test_toy.py)

Finished runs are not redone (delete --out to start over; a run folder made with other settings is an error).
The plots need matplotlib (pip install matplotlib), which nothing else in the repository uses; without it the tables
are still written.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(HERE)]
import train_tr  # noqa: E402  (importing it has no side effects)
from data import pairs as data_pairs  # noqa: E402
from prepare import (CATEGORIES, COUNTS, PHRASINGS, PROMPT, bradley_terry, gold_reward,  # noqa: E402
                     in_support, items_of, parse_prompt, write_jsonl)

SFT, DATA = 'data/toy/sft', 'data/toy'
SEEDS = (1, 2, 3)
TOY = ['--init_from=data/toy/sft', '--max_length=64', '--max_prompt_length=32', '--lr=2e-4', '--log_interval=25']
SAMPLING = dict(split='test', num_samples=2, max_new_tokens=48, batch_size=64, seed=0)  # 2 × 288 test prompts
DIAGNOSTIC_PAIRS = 288  # held-out (test) and training pairs whose log-probs each checkpoint logs


def spread(rows):
    """DIAGNOSTIC_PAIRS rows spread evenly over a split (the shipped files are ordered by prompt)."""
    return rows[::max(1, len(rows) // DIAGNOSTIC_PAIRS)][:DIAGNOSTIC_PAIRS]


def validation_prompts(seed=0):
    """A third of the 96 prompts, one phrasing of each (category, count) drawn at random. Every tuned setting and
    every chosen checkpoint is picked by the gold reward of the samples on these prompts; the reported numbers are
    those of the other 64 (the test prompts), so no selection reads them."""
    rng = random.Random(seed)
    return {PROMPT.format(request=rng.choice(PHRASINGS).format(k=name, c=category))
            for category in CATEGORIES for name in COUNTS}


VALIDATION = validation_prompts()

# A: 350 steps of 16 pairs = 2.8 epochs of the 2,009 shipped pairs
TR_STEPS, TR_EVAL = 350, 50
FAMILIES = {'DPO': ('dpo', (0.03, 0.1, 0.3)), 'IPO': ('ipo', (0.3, 1.0, 3.0)), 'KTO': ('kto', (0.03, 0.1, 0.3))}
KL_BUDGETS = (1.0, 3.0, 10.0)  # nats: the frontier at a budget = the checkpoint picked on validation with KL ≤ it
KL_BINS = ((0, 1), (1, 3), (3, 6), (6, 12), (12, 48))  # nats: gold at matched KL, TR against its baseline

# B: 2,014 pairs per ρ, 250 steps (2.0 epochs); IPO at the middle of its β range, every other loss at β = 0.1
RHOS = (0.2, 0.5, 0.8)
DISTILL_STEPS, DISTILL_EVAL = 250, 50
GAMMAS = (0.01, 0.1)  # γ = 1 kept e-DPO and p-DPO within 0.4 nats of π_SFT at every ρ (the previous grid)
E_DPO_FORMS = {'e-DPO per pair': 'example', 'e-DPO per batch': 'batch'}  # min over reward models of each pair's error,
# or of the batch's mean error (train_tr.py edistill_min)
RM_ARGS = ['--loss=rm', '--init_from=data/toy/sft', '--lr=3e-4', '--max_iters=500', '--eval_interval=100',
           '--max_length=64', '--max_prompt_length=32']


def reference_updates(steps):
    """{name: train_tr.py arguments} of the reference's schedules, with τ a fraction of the run's steps."""
    return {'none': ['--ref_update=none'],
            'soft τ=1 α=0.05': ['--ref_update=soft', '--tr_tau=1', '--tr_alpha=0.05'],
            f'soft α=0.6 τ={steps // 5}': ['--ref_update=soft', f'--tr_tau={steps // 5}', '--tr_alpha=0.6'],
            f'hard τ={steps // 5}': ['--ref_update=hard', f'--tr_tau={steps // 5}']}


def trust_region_grid(quick):
    """{(family, update, β): arguments}."""
    updates = reference_updates(TR_STEPS)
    families = FAMILIES
    if quick:
        updates = {name: args for name, args in reference_updates(20).items() if name in
                   ('none', 'soft τ=1 α=0.05', 'hard τ=4')}
        families = {'DPO': ('dpo', (0.1, 0.3))}
    return {(family, update, beta): [f'--loss={loss}', f'--beta={beta}', *args]
            for family, (loss, betas) in families.items() for update, args in updates.items() for beta in betas}


def distillation_grid(quick):
    """{method: arguments}; LABELS stands for the ρ set labelled by its reward models."""
    labelled = '--data=LABELS'
    methods = {'DPO': ['--loss=dpo', '--ref_update=none'], 'IPO': ['--loss=ipo', '--beta=1.0', '--ref_update=none'],
               'd-DPO': ['--loss=distill', '--ref_update=none', labelled],
               'TR-DPO': ['--loss=dpo', '--ref_update=soft', '--tr_alpha=0.1', '--tr_tau=25']}
    for gamma in GAMMAS:  # e-DPO in both forms of its minimum over the reward models (train_tr.py edistill_min)
        for name, form in E_DPO_FORMS.items():
            methods[f'{name} γ={gamma}'] = ['--loss=edistill', f'--edistill_min={form}', f'--pessimism_gamma={gamma}',
                                            '--ref_update=none', labelled]
        methods[f'p-DPO γ={gamma}'] = ['--loss=pdpo', f'--pessimism_gamma={gamma}', '--ref_update=none']
    if quick:
        methods = {name: methods[name] for name in ('DPO', *(f'{name} γ=0.1' for name in E_DPO_FORMS), 'p-DPO γ=0.1')}
    return methods


def job(args, seed=0):
    """A run's spec: its arguments and seed, and the fingerprints of the data and the model it reads, so that a run
    kept in --out is reused only while all three are unchanged (regenerated pairs would otherwise meet old runs)."""
    reads = [a.split('=', 1) for a in args or [f'--data={DATA}', f'--init_from={SFT}'] if
             a.startswith(('--data=', '--init_from='))]
    return dict(args=args, seed=seed, inputs={key[2:]: data_pairs.fingerprint(value, splits=key == '--data')
                                              for key, value in reads})


def run_dir(out, args, seed):
    """One folder per distinct (arguments, seed)."""
    slug = '_'.join(a.lstrip('-').replace('=', '-').replace('/', '-') for a in args if not a.startswith('--data='))
    return out / f'{slug}_s{seed}'


# -----------------------------------------------------------------------------
# B's data: pairs of SFT samples labelled by the gold reward, subsampled to a length bias ρ

def gold_label(prompt, y1, y2, rng):
    """(chosen, rejected) drawn from Bradley–Terry on r*: P(y1 ≻ y2) = σ(r*(y1) − r*(y2))."""
    return bradley_terry(y1, y2, gold_reward(prompt, y1) - gold_reward(prompt, y2), rng)


def pair_row(prompt, chosen, rejected):
    return dict(prompt=prompt, chosen=chosen, rejected=rejected, gold_chosen=gold_reward(prompt, chosen),
                gold_rejected=gold_reward(prompt, rejected))


def length_biased_sets(out, rhos, n_pairs, seed=0):
    """out/rho_<ρ>/{train,test}.jsonl: n_pairs training pairs of which a fraction ρ prefers the longer list. The 2,009
    shipped pairs hold too few that r* labels longer-preferred for ρ = 0.8, so pairs are drawn from all
    pairs of distinct SFT samples of a prompt with different list lengths; the test pairs are the shipped ones,
    relabelled. Returns the fraction of the relabelled shipped pairs (of different lengths) that prefer the longer."""
    rng = random.Random(seed)
    shipped = data_pairs.read_jsonl(HERE / 'train.jsonl')
    samples = {}
    for row in shipped:
        samples.setdefault(row['prompt'], {}).update(dict.fromkeys((row['chosen'], row['rejected'])))
    longer, shorter = [], []
    for prompt, texts in samples.items():
        texts = list(texts)
        for i, y1 in enumerate(texts):
            for y2 in texts[i + 1:]:
                if len(items_of(y1)) != len(items_of(y2)):
                    chosen, rejected = gold_label(prompt, y1, y2, rng)
                    longer_won = len(items_of(chosen)) > len(items_of(rejected))
                    (longer if longer_won else shorter).append(pair_row(prompt, chosen, rejected))
    relabelled = [gold_label(r['prompt'], r['chosen'], r['rejected'], rng) for r in shipped]
    unequal = [(c, r) for c, r in relabelled if len(items_of(c)) != len(items_of(r))]
    natural = sum(len(items_of(c)) > len(items_of(r)) for c, r in unequal) / len(unequal)
    test = [pair_row(r['prompt'], *gold_label(r['prompt'], r['chosen'], r['rejected'], rng))
            for r in data_pairs.read_jsonl(HERE / 'test.jsonl')]
    for rho in rhos:
        n_longer = round(rho * n_pairs)
        rows = rng.sample(longer, n_longer) + rng.sample(shorter, n_pairs - n_longer)
        rng.shuffle(rows)
        folder = out / f'rho_{rho}'
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(rows, folder / 'train.jsonl')
        write_jsonl(test, folder / 'test.jsonl')
    return natural


# -----------------------------------------------------------------------------
# worker: one training run, then every snapshot sampled, scored and diagnosed (a subprocess, one torch thread)

def pair_logps(model, pairs, pad_id):
    """[pairs, 4]: summed log-probs of chosen and rejected, and their token counts."""
    import torch
    rows = []
    with torch.no_grad():
        for start in range(0, len(pairs), 64):
            batch = data_pairs.make_batch(pairs[start:start + 64], True, pad_id)
            logps, lengths = train_tr.sequence_logps(model, batch)
            rows.append(torch.stack([*train_tr.chosen_rejected(logps), *train_tr.chosen_rejected(lengths.float())], 1))
    return torch.cat(rows)


def sample_scores(rows):
    """Mean gold reward r*, KL(π‖π_SFT) (the mean of log π − log π_SFT of the samples), list length and off-support
    fraction of a set of samples."""
    return dict(gold=statistics.mean(gold_reward(r['prompt'], r['completion']) for r in rows),
                kl=statistics.mean(r['kl'] for r in rows),
                items=statistics.mean(len(items_of(r['completion'])) for r in rows),
                off_support=sum(not in_support(r['completion']) for r in rows) / len(rows))


def diagnostic_pairs(data):
    """The pairs every checkpoint of a run is diagnosed on: DIAGNOSTIC_PAIRS of its held-out and of its training
    pairs, with the padding id to batch them."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(SFT)
    pairs = [spread(data_pairs.load_pairs(data, split, tokenizer, 64, 32, verbose=False))
             for split in ('test', 'train')]
    return dict(pairs=pairs, pad_id=data_pairs.padding_id(tokenizer))


def chosen_per_token(logps):
    """The mean per-token log-prob of the chosen responses, from pair_logps."""
    return (logps[:, 0] / logps[:, 2]).mean().item()


def sft_train_logps(diagnostic):
    """[pairs, 4] pair_logps of the SFT model on the diagnostic training pairs: the start of every curve."""
    return pair_logps(train_tr.load_model(SFT).eval(), diagnostic['pairs'][1], diagnostic['pad_id'])


def measure(model_dir, samples_path, diagnostic, sft_logps, beta, num_samples):
    """sample_scores of a model's samples on the test prompts (gold, kl, items, off_support) and on the validation
    prompts (val_gold, ...); the per-token log-probs of held-out chosen/rejected responses and of training chosen ones;
    on the training pairs, the log-ratio margin against π_SFT, m = (log π − log π_SFT)(y_w) − (log π − log π_SFT)(y_l)
    in nats (mean), and the implicit reward margin β·m (mean and 90th percentile of its magnitude: the quantity DPO
    drives to infinity and distillation regresses onto the reward models' margins)."""
    import torch

    import sample
    sample.sample(dict(sample.defaults, init_from=str(model_dir), ref=SFT, data=DATA, out=str(samples_path),
                       **{**SAMPLING, 'num_samples': num_samples}))
    rows = data_pairs.read_jsonl(samples_path)
    model = train_tr.load_model(str(model_dir)).eval()
    test, train = (pair_logps(model, pairs, diagnostic['pad_id']) for pairs in diagnostic['pairs'])
    ratio = train[:, :2] - sft_logps[:, :2]
    margin = ratio[:, 0] - ratio[:, 1]
    reward_margin = (beta * margin).abs()
    validation = sample_scores([r for r in rows if r['prompt'] in VALIDATION])
    return dict(**sample_scores([r for r in rows if r['prompt'] not in VALIDATION]),
                **{f'val_{key}': value for key, value in validation.items()},
                logp_chosen=chosen_per_token(test),
                logp_rejected=(test[:, 1] / test[:, 3]).mean().item(),
                train_logp_chosen=chosen_per_token(train),
                train_margin=margin.mean().item(), reward_margin=reward_margin.mean().item(),
                reward_margin_p90=torch.quantile(reward_margin, 0.9).item())


def worker(path):
    import torch
    torch.set_num_threads(1)
    path = Path(path)
    spec = json.loads((path / 'job.json').read_text())
    args = spec['args'] or [f'--data={DATA}']
    cfg = train_tr.get_config([*args, f'--out_dir={path}', f"--seed={spec.get('seed', 0)}"])
    num_samples = spec.get('num_samples', SAMPLING['num_samples'])  # --quick: 1
    if cfg['loss'] != 'rm':
        diagnostic = diagnostic_pairs(cfg['data'])
        sft_logps = sft_train_logps(diagnostic)
    if spec['args'] is None:  # the SFT model itself: the start of every curve
        point = dict(iter=0, **measure(SFT, path / 'samples.jsonl', diagnostic, sft_logps, 0.0, num_samples))
        (path / 'curve.json').write_text(json.dumps([point]))
        return
    cfg['snapshots'] = cfg['loss'] != 'rm'  # a reward model is not sampled
    # a run interrupted after a checkpoint (or while saving one) continues, under the same settings only
    cfg['resume'] = (path / 'checkpoint.json').exists() or (path / '.tmp_checkpoint/checkpoint.json').exists()
    train_tr.train(cfg)
    if cfg['loss'] == 'rm':
        (path / 'curve.json').write_text('[]')
        return
    snapshots = sorted(path.glob('iter_*'), key=lambda p: int(p.name[5:]))
    # samples beside the snapshots: a file inside one would be a file of sample.py's input (refused on a rerun)
    curve = [dict(iter=int(p.name[5:]), **measure(p, path / f'samples_{p.name}.jsonl', diagnostic, sft_logps,
                                                  cfg['beta'], num_samples)) for p in snapshots]
    (path / 'curve.json').write_text(json.dumps(curve))


def run_jobs(jobs, n_workers):
    """jobs: {run folder: spec}; each unfinished one runs `grid.py --worker=FOLDER`, its output in FOLDER/log.txt."""
    def one(path):
        if (path / 'curve.json').exists():
            if json.loads((path / 'job.json').read_text()) != jobs[path]:
                raise SystemExit(f'error: {path} was run with other settings or from other data or models; use '
                                 'another --out or delete it')
            return
        path.mkdir(parents=True, exist_ok=True)
        (path / 'job.json').write_text(json.dumps(jobs[path]))
        with open(path / 'log.txt', 'w') as log:
            env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
            proc = subprocess.run([sys.executable, __file__, f'--worker={path}'], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        if proc.returncode:
            raise SystemExit(f'error: {path} failed, see {path}/log.txt')
        print(f'{time.strftime("%H:%M:%S")} done {path.relative_to(path.parents[1])}', flush=True)
    with ThreadPoolExecutor(n_workers) as pool:
        list(pool.map(one, jobs))


# -----------------------------------------------------------------------------
# summary: results.md, results.json, frontiers.png, diagnostics.png, margins.png, gold_vs_rho.png

def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values, digits=2):
    return '{:.{d}f} ± {:.{d}f}'.format(*mean_std(values), d=digits)


def chosen(points, budget=float('inf')):
    """The checkpoint with the best gold on the validation prompts among those whose KL (estimated on the same
    prompts) is within budget: the pick of a user who never looks at the test prompts."""
    return max((p for p in points if p['val_kl'] <= budget), key=lambda p: p['val_gold'])


def optimism(runs):
    """Mean and largest excess of a run's best test gold over the test gold of its checkpoint chosen on validation:
    what picking on the reported prompts would have added."""
    gaps = [max(p['gold'] for p in run) - chosen(run)['gold'] for run in runs]
    return statistics.mean(gaps), max(gaps)


def frontier(points):
    """Test gold of the checkpoint chosen on validation within each KL budget, and of the overall choice (the peak),
    with its test KL and its validation gold (which picks between schedules)."""
    peak = chosen(points)
    return {**{f'gold at KL ≤ {b:g}': chosen(points, b)['gold'] for b in KL_BUDGETS},
            'peak gold': peak['gold'], 'KL at peak': peak['kl'], 'validation peak gold': peak['val_gold']}


def in_bin(runs, low, high):
    """Per run that has any, the test gold of its checkpoints whose test KL lies in [low, high)."""
    golds = [[p['gold'] for p in run if low <= p['kl'] < high] for run in runs]
    return [g for g in golds if g]


def pooled(golds):
    return statistics.mean(g for run in golds for g in run)


def bootstrap(golds, baseline=None, resamples=2000, seed=0):
    """95% interval of the pooled mean of golds (minus that of baseline), resampling whole runs: the checkpoints of
    one run are not independent of each other."""
    rng = random.Random(seed)
    stats = sorted(pooled(rng.choices(golds, k=len(golds)))
                   - (pooled(rng.choices(baseline, k=len(baseline))) if baseline else 0.0) for _ in range(resamples))
    return stats[int(0.025 * resamples)], stats[int(0.975 * resamples) - 1]


def bin_cell(golds, baseline=None):
    if not golds or baseline == []:
        return '–'
    low, high = bootstrap(golds, baseline)
    value = pooled(golds) - (pooled(baseline) if baseline else 0.0)
    count = '' if baseline else f' ({sum(map(len, golds))} from {len(golds)})'
    return f'{value:.2f} [{low:.2f}, {high:.2f}]{count}'


def table(header, rows):
    return (f'| {" | ".join(header)} |\n' + '|---' * len(header) + '|\n'
            + ''.join(f'| {" | ".join(map(str, row))} |\n' for row in rows))


def trust_region_tables(tr_curves, sft, seeds):
    """The frontier table and the schedule chosen on validation (per family and update, over β and checkpoints of
    each seed), gold in KL bins, the per-β table, and the diagnostics table at each family's middle β."""
    keys = list(dict.fromkeys((family, update) for family, update, _ in tr_curves))
    points = {key: [[sft] + [p for (f, u, _), runs in tr_curves.items() if (f, u) == key for p in runs[s]]
                    for s in range(len(seeds))] for key in keys}  # per seed, every checkpoint of every β
    per_seed = {key: [frontier(p) for p in points[key]] for key in keys}
    excess = optimism([p for key in keys for p in points[key]])
    columns = [c for c in per_seed[keys[0]][0] if c != 'validation peak gold']
    text = ('## A. Trust region: gold-vs-KL frontiers over β\n\nPer seed, of all checkpoints of all β (and the SFT '
            'model) whose KL on the validation prompts is within each budget, the one with the best validation gold; '
            'its gold and KL on the test prompts; mean ± std over seeds. "Peak": the best validation gold at any KL. '
            f'Picked on the test prompts\' own gold instead, the peaks would read {excess[0]:.2f} higher on average '
            f'(up to {excess[1]:.2f}).\n\n' + table(['family', 'reference update', *columns],
                           [[f, u, *(cell([r[c] for r in per_seed[f, u]]) for c in columns)] for f, u in keys]))
    families = list(dict.fromkeys(f for f, _ in keys))
    rows = []
    for family in families:
        updates = [u for f, u in keys if f == family and u != 'none']
        pick = max(updates, key=lambda u: statistics.mean(r['validation peak gold'] for r in per_seed[family, u]))
        base, tr = per_seed[family, 'none'], per_seed[family, pick]
        rows.append([family, cell([r['peak gold'] for r in base]), pick, cell([r['peak gold'] for r in tr]),
                     cell([t['peak gold'] - b['peak gold'] for t, b in zip(tr, base)])])
    text += (f'\nThe reference update chosen on validation: of the {len(keys) // len(families) - 1} schedules, the '
             'one with the best mean validation peak; test gold at the peak.\n\n'
             + table(['family', 'none: peak gold', 'schedule chosen on validation', 'its peak gold',
                      'difference (per seed)'], rows))
    rows = []
    for family in families:
        updates = [u for f, u in keys if f == family]
        runs = {u: [run for (f, u2, _), r in tr_curves.items() if (f, u2) == (family, u) for run in r] for u in updates}
        runs['TR, all schedules'] = [run for u in updates if u != 'none' for run in runs[u]]
        for name, group in runs.items():
            rows.append([family, name, *(bin_cell(in_bin(group, *b)) for b in KL_BINS)])
        rows.append([family, '**TR, all − none**', *(bin_cell(in_bin(runs['TR, all schedules'], *b),
                                                              in_bin(runs['none'], *b)) for b in KL_BINS)])
    text += ('\n## A. Gold at matched KL\n\nEvery checkpoint of every β and seed whose test KL falls in the bin, '
             'pooled: mean test gold, 95% bootstrap interval over runs (a run\'s checkpoints are resampled together), '
             '(checkpoints from runs). The difference row: TR (all schedules pooled) minus the fixed reference, with '
             'its interval. No selection is involved.\n\n'
             + table(['family', 'reference update', *(f'KL {low:g}–{high:g}' for low, high in KL_BINS)], rows))
    text += ('\nEach run: peak gold (the checkpoint with the best validation gold, its test gold), and test gold, KL '
             'and list length at the last checkpoint.\n\n'
             + table(['family', 'reference update', 'β', 'peak gold', 'final gold', 'final KL', 'final items'],
                     [[f, u, beta, cell([chosen(run)['gold'] for run in runs]),
                       cell([run[-1]['gold'] for run in runs]), cell([run[-1]['kl'] for run in runs], 1),
                       cell([run[-1]['items'] for run in runs])] for (f, u, beta), runs in tr_curves.items()]))
    diagnostics = ('off_support', 'logp_chosen', 'logp_rejected', 'train_logp_chosen', 'train_margin')
    middle = {family: sorted({b for f, _, b in tr_curves if f == family})[1] for family, _ in keys}
    rows = [['SFT', '', '', *(f'{sft[d]:.3f}' for d in diagnostics)]]
    rows += [[f, u, middle[f], *(cell([run[-1][d] for run in tr_curves[f, u, middle[f]]], 3) for d in diagnostics)]
             for f, u in keys]
    text += ('\n## A. Diagnostics at the last checkpoint (each family\'s middle β)\n\nOff support: fraction of '
             'samples that are not a list of known words ending in a full stop. Log-probs per token: held-out (test) '
             'chosen and rejected responses, and training chosen ones. Train margin: mean over training pairs of the '
             'log-ratio margin against π_SFT in nats. Curves over steps: diagnostics.png.\n\n'
             + table(['family', 'reference update', 'β', 'off support', 'logp/token chosen (held-out)',
                      'logp/token rejected (held-out)', 'logp/token chosen (train)', 'train margin'], rows))
    return text, per_seed, middle


def reward_model_margins(labels):
    """abs(Δr) of the reward models on the training pairs that the checkpoints are diagnosed on: the mean and the 90th
    percentile for each model (averaged over models), and the mean of the family's mean margin."""
    rows = spread(data_pairs.read_jsonl(labels / 'train.jsonl'))
    margins = [[c - r for c, r in zip(row['reward_chosen'], row['reward_rejected'])] for row in rows]
    per_model = [sorted(abs(m[i]) for m in margins) for i in range(len(margins[0]))]
    return dict(mean=statistics.mean(statistics.mean(m) for m in per_model),
                p90=statistics.mean(m[int(0.9 * (len(m) - 1))] for m in per_model),
                family_mean=statistics.mean(abs(statistics.mean(m)) for m in margins))


def distillation_tables(distill_curves, sft_train_logp, rm_accuracy, rm_margins, natural_rho, asked):
    """Per ρ: final and best gold, final KL and items per method, with e-DPO (both forms) and p-DPO at their γ chosen
    on validation, the γ sweep, and the margins and chosen log-probs on the training pairs (sft_train_logp: {ρ: the
    SFT model's per-token log-prob of the chosen responses})."""
    rhos = list(distill_curves)
    methods = list(distill_curves[rhos[0]])

    def tune(key):  # {method: its name at the γ with the best final gold (key) averaged over ρ and seeds}
        def score(name):
            return statistics.mean(run[-1][key] for rho in rhos for run in distill_curves[rho][name])
        tuned = {}
        for name in methods:
            base = name.split(' γ=')[0]
            if base not in tuned or score(name) > score(tuned[base]):
                tuned[base] = name
        return tuned
    tuned, on_test = tune('val_gold'), tune('gold')
    changed = [f'{on_test[b]} instead of {tuned[b]}' for b in tuned if on_test[b] != tuned[b]]
    header = ['method', *(f'ρ = {rho}' for rho in rhos)]

    def rows(names, measure, digits=2):
        return [[name, *(cell([measure(run) for run in distill_curves[rho][name]], digits) for rho in rhos)]
                for name in names]
    best = list(tuned.values())
    excess = optimism([run for name in best for rho in rhos for run in distill_curves[rho][name]])
    text = (f'## B. Distillation: gold reward against the length bias ρ\n\nTraining pairs labelled by Bradley–Terry '
            f'on r*, subsampled so that a fraction ρ prefers the longer list. Relabelled by r*, the shipped SFT pairs '
            f'of different lengths prefer the longer one in {natural_rho:.2f} of cases: r* itself prefers shorter '
            f'lists of these samples, so ρ = 0.8 is the set that fights the gold reward and ρ = 0.2 the one that '
            f'agrees with it. Reward models ({len(rm_accuracy[rhos[0]])} per ρ) score the held-out pairs (relabelled '
            'by r*) with accuracy '
            + ', '.join(f'{cell(rm_accuracy[rho])} at ρ = {rho}' for rho in rhos)
            + '. e-DPO (both forms of its minimum) and p-DPO at the γ with the best final gold on the validation '
            'prompts, averaged over ρ and seeds (the γ tables below); β = 0.1 (IPO: 1) is fixed, not tuned.'
            '\n\nFinal gold (test prompts):\n\n' + table(header, rows(best, lambda run: run[-1]['gold']))
            + '\nGold of the checkpoint with the best validation gold (test prompts):\n\n'
            + table(header, rows(best, lambda run: chosen(run)['gold']))
            + '\nPicked on the test prompts\' gold instead (the leak the split removes): γ '
            + (', '.join(changed) if changed else 'the same for every method')
            + f'; a run\'s best checkpoint would read {excess[0]:.2f} higher on average (up to {excess[1]:.2f}).\n'
            + f'\nFinal list length (items; the test prompts ask for {asked:.2f} on average):\n\n'
            + table(header, rows(best, lambda run: run[-1]['items']))
            + '\nFinal KL(π‖π_SFT), nats:\n\n' + table(header, rows(best, lambda run: run[-1]['kl'], 1))
            + '\nγ sweep, final gold on the validation prompts (what picks γ):\n\n'
            + table(header, rows([n for n in methods if ' γ=' in n], lambda run: run[-1]['val_gold']))
            + '\nγ sweep, final gold on the test prompts:\n\n'
            + table(header, rows([n for n in methods if ' γ=' in n], lambda run: run[-1]['gold'])))
    first = distill_curves[rhos[0]][best[0]][0][0]['iter']
    rows = []
    for rho in rhos:
        rm = rm_margins[rho]
        rows.append([rho, 'reward models, each', '', f'{rm["mean"]:.2f}', f'{rm["p90"]:.2f}', '', ''])
        rows.append([rho, 'reward models, family mean', '', f'{rm["family_mean"]:.2f}', '', '', ''])
        rows.append([rho, 'SFT (step 0)', '0', '0', '0', '0', f'{sft_train_logp[rho]:.3f}'])
        for name in best:
            runs = distill_curves[rho][name]
            rows.append([rho, name, cell([run[0]['reward_margin'] for run in runs]),
                         cell([run[-1]['reward_margin'] for run in runs]),
                         cell([run[-1]['reward_margin_p90'] for run in runs]),
                         cell([run[-1]['train_margin'] for run in runs], 1),
                         cell([run[-1]['train_logp_chosen'] for run in runs], 3)])
    last = distill_curves[rhos[0]][best[0]][0][-1]['iter']
    text += (f'\n## B. The mechanism: implicit reward margins and chosen log-probs on training pairs\n\nOn '
             f'{DIAGNOSTIC_PAIRS} training pairs of each ρ (spread evenly over the file): the implicit reward margin '
             'β·m, m = (log π − log π_SFT)(y_w) − (log π − log π_SFT)(y_l) (against π_SFT also for TR-DPO, whose own '
             'reference moves), the mean and 90th percentile of its magnitude abs(β·m); m in nats; the per-token '
             'log-prob of the chosen responses. The reward models\' abs(Δr) on the same pairs is what d-DPO and e-DPO '
             'regress β·m onto. Curves over steps: margins.png.\n\n'
             + table(['ρ', 'method', f'mean abs(β·m), step {first}', f'mean abs(β·m), step {last}',
                      f'p90 abs(β·m), step {last}', f'm (nats), step {last}',
                      f'chosen logp/token (train), step {last}'],
                     rows))
    return text, best


def plots(results_dir, tr_curves, sft, middle, distill_curves, best, rm_margins, sft_train_logp):
    try:
        import matplotlib
    except ImportError:
        print('matplotlib is not installed: no plots (pip install matplotlib)')
        return
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    def seed_mean(runs, key):  # [checkpoint] mean over seeds
        return [statistics.mean(run[i][key] for run in runs) for i in range(len(runs[0]))]
    families = list(dict.fromkeys(f for f, _, _ in tr_curves))
    updates = list(dict.fromkeys(u for _, u, _ in tr_curves))
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4.5), sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
        for i, update in enumerate(updates):
            runs = [run for (f, u, _), r in tr_curves.items() if (f, u) == (family, update) for run in r]
            ax.scatter([p['kl'] for run in runs for p in run], [p['gold'] for run in runs for p in run], s=5,
                       color=f'C{i}', alpha=0.3)
            means = [(statistics.mean(p['kl'] for run in golds for p in run), pooled([[p['gold'] for p in run]
                                                                                      for run in golds]))
                     for golds in ([[p for p in run if low <= p['kl'] < high] for run in runs] for low, high in KL_BINS)
                     if any(golds)]
            ax.plot(*zip(*means), marker='o', color=f'C{i}', label=update)
        ax.plot([sft['kl']], [sft['gold']], 'k*', ms=10, label='SFT')
        ax.set_xscale('symlog', linthresh=1.0)
        ax.set_xlim(left=0)
        ax.set_title(f'{family}: every checkpoint; lines: mean gold per KL bin', fontsize=9)
        ax.set_xlabel('KL(π‖π_SFT), nats (test prompts)')
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel('gold reward r* (test prompts)')
    fig.tight_layout()
    fig.savefig(results_dir / 'frontiers.png', dpi=110)

    labels = {'off_support': 'samples off support', 'logp_chosen': 'held-out chosen, logp/token',
              'train_logp_chosen': 'train chosen, logp/token', 'train_margin': 'train margin vs SFT, nats'}
    fig, axes = plt.subplots(len(families), len(labels), figsize=(4 * len(labels), 3.2 * len(families)),
                             squeeze=False)
    for row, family in zip(axes, families):
        for ax, (key, label) in zip(row, labels.items()):
            for update in updates:
                runs = tr_curves[family, update, middle[family]]
                ax.plot([0] + [p['iter'] for p in runs[0]], [sft[key]] + seed_mean(runs, key), marker='.',
                        label=update)
            ax.set_title(f'{family} (β = {middle[family]}): {label}', fontsize=9)
            ax.set_xlabel('step')
        row[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(results_dir / 'diagnostics.png', dpi=100)

    rhos = list(distill_curves)
    labels = {'reward_margin': 'mean |β·m|', 'reward_margin_p90': '90th percentile of |β·m|',
              'train_logp_chosen': 'train chosen, logp/token'}
    fig, axes = plt.subplots(len(rhos), len(labels), figsize=(4.5 * len(labels), 3.2 * len(rhos)), squeeze=False)
    for row, rho in zip(axes, rhos):
        for ax, (key, label) in zip(row, labels.items()):
            for name in best:
                runs = distill_curves[rho][name]
                start = sft_train_logp[rho] if key == 'train_logp_chosen' else 0.0  # the SFT model's margins are 0
                ax.plot([0] + [p['iter'] for p in runs[0]], [start] + seed_mean(runs, key), marker='.', label=name)
            rm = {'reward_margin': 'mean', 'reward_margin_p90': 'p90'}.get(key)
            if rm:
                ax.axhline(rm_margins[rho][rm], color='k', ls='--', lw=1, label='reward models\' |Δr|')
                ax.set_yscale('symlog', linthresh=1.0)
            ax.set_title(f'ρ = {rho}: {label}', fontsize=9)
            ax.set_xlabel('step')
        row[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(results_dir / 'margins.png', dpi=100)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (what, value) in zip(axes, [('final gold (test prompts)', lambda run: run[-1]['gold']),
                                        ('final list length', lambda run: run[-1]['items'])]):
        for name in best:
            stats = [mean_std([value(run) for run in distill_curves[rho][name]]) for rho in rhos]
            ax.errorbar(rhos, [m for m, _ in stats], yerr=[s for _, s in stats], marker='o', capsize=3, label=name)
        ax.set_xlabel('ρ: fraction of training pairs that prefer the longer list')
        ax.set_title(what)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir / 'gold_vs_rho.png', dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='a DPO frontier of 2 β, a sweep of 2 ρ; 1 seed, 20 steps, '
                        '1 sample per prompt')
    parser.add_argument('--out', default='out/toy_grid', help='run folders (models, samples, logs)')
    parser.add_argument('--results', default='', help="folder for results.md/json and the plots; '' = data/toy, "
                                                      'or --out with --quick')
    parser.add_argument('--jobs', type=int, default=2, help='runs in parallel, one CPU thread each')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.worker:
        return worker(args.worker)
    t0 = time.time()
    out = Path(args.out).resolve()
    results_dir = Path(args.results or (out if args.quick else HERE))
    seeds, rhos, rm_seeds = (SEEDS[:1], (0.2, 0.8), SEEDS[:2]) if args.quick else (SEEDS, RHOS, SEEDS)
    tr_steps = ['--max_iters=20', '--eval_interval=10'] if args.quick else \
        [f'--max_iters={TR_STEPS}', f'--eval_interval={TR_EVAL}']
    distill_steps = ['--max_iters=20', '--eval_interval=10'] if args.quick else \
        [f'--max_iters={DISTILL_STEPS}', f'--eval_interval={DISTILL_EVAL}']
    rm_args = [a.replace('=500', '=20') if args.quick else a for a in RM_ARGS]
    sampling = {'num_samples': 1} if args.quick else {}  # a sample per prompt: a smoke test's worth, in half the time

    # B's data, the SFT point and B's reward models, then the labels that d-DPO and e-DPO regress on
    natural_rho = length_biased_sets(out, rhos, n_pairs=256 if args.quick else 2014)
    rms = {rho: [run_dir(out / f'rho_{rho}', ['rm'], seed) for seed in rm_seeds] for rho in rhos}
    reward_models = {path: job([*rm_args, f'--data={out}/rho_{rho}'], seed)
                     for rho in rhos for path, seed in zip(rms[rho], rm_seeds)}
    run_jobs({out / 'sft': job(None) | sampling, **reward_models}, args.jobs)
    for rho in rhos:  # label.py continues or keeps labels made by the same reward models, and refuses any others
        subprocess.run([sys.executable, 'data/label.py', f'--data={out}/rho_{rho}', f'--out={out}/rho_{rho}/labels',
                        '--reward_models=' + ','.join(map(str, rms[rho])), '--max_length=64',
                        '--max_prompt_length=32'], check=True, stdout=subprocess.DEVNULL)

    jobs, tr_runs, distill_runs = {}, {}, {}
    for key, method_args in trust_region_grid(args.quick).items():
        tr_runs[key] = [run_dir(out / 'trust_region', method_args, seed) for seed in seeds]
        jobs.update({path: job([*TOY, *tr_steps, f'--data={DATA}', *method_args], seed) | sampling
                     for path, seed in zip(tr_runs[key], seeds)})
    for rho in rhos:
        for name, method_args in distillation_grid(args.quick).items():
            data = out / f'rho_{rho}' / 'labels' if '--data=LABELS' in method_args else out / f'rho_{rho}'
            method_args = [a for a in method_args if a != '--data=LABELS']
            distill_runs[rho, name] = [run_dir(out / f'rho_{rho}', method_args, seed) for seed in seeds]
            jobs.update({path: job([*TOY, *distill_steps, f'--data={data}', *method_args], seed) | sampling
                         for path, seed in zip(distill_runs[rho, name], seeds)})
    run_jobs(jobs, args.jobs)

    def curves(paths):
        return [json.loads((p / 'curve.json').read_text()) for p in paths]
    sft = json.loads((out / 'sft' / 'curve.json').read_text())[0]
    tr_curves = {key: curves(paths) for key, paths in tr_runs.items()}
    distill_curves = {rho: {name: curves(paths) for (r, name), paths in distill_runs.items() if r == rho}
                      for rho in rhos}
    rm_accuracy = {rho: [[json.loads(line) for line in (p / 'metrics.jsonl').read_text().splitlines()
                          if 'eval/accuracy' in line][-1]['eval/accuracy'] for p in rms[rho]] for rho in rhos}
    rm_margins = {rho: reward_model_margins(out / f'rho_{rho}' / 'labels') for rho in rhos}
    sft_samples = data_pairs.read_jsonl(out / 'sft' / 'samples.jsonl')
    test_samples = [r for r in sft_samples if r['prompt'] not in VALIDATION]
    asked = statistics.mean(parse_prompt(r['prompt'])[1] for r in test_samples)
    # each run's time from its start to its end, summed (a reused run keeps its files' times; runs done in several
    # invocations, or on a busy machine, still add up to what the runs took)
    folders = [out / 'sft', *(p for paths in rms.values() for p in paths), *jobs]
    minutes = sum((p / 'curve.json').stat().st_mtime - (p / 'job.json').stat().st_mtime for p in folders) / 60
    settings = (f'`python data/toy/grid.py{" --quick" if args.quick else ""}`: {len(jobs)} training runs + '
                f'{sum(map(len, rms.values()))} reward models, {minutes:.0f} run-minutes (each run from its start to '
                f'its end, summed; one CPU thread each, {args.jobs} at a time on {os.cpu_count()} cores). Common '
                'arguments: '
                f'`{" ".join(TOY)}`; A: `{" ".join(tr_steps)}` on the '
                f'shipped pairs; B: `{" ".join(distill_steps)}`, β = 0.1 (IPO: 1.0), reward models '
                f'`{" ".join(rm_args)}`. Seeds {seeds}.')
    tr_text, per_seed, middle = trust_region_tables(tr_curves, sft, seeds)
    sft_train_logp = {rho: chosen_per_token(sft_train_logps(diagnostic_pairs(str(out / f'rho_{rho}')))) for rho in rhos}
    distill_text, best = distillation_tables(distill_curves, sft_train_logp, rm_accuracy, rm_margins, natural_rho,
                                             asked)
    n_test, n_val = len({r['prompt'] for r in test_samples}), len(VALIDATION)
    text = (f'# Toy results\n\n{settings}\n\n**Validation and test.** The 96 prompts are split once: {n_val} '
            f'validation prompts (one phrasing of each category and count, drawn at random) and {n_test} test prompts. '
            f'Every checkpoint samples both ({len(sft_samples) - len(test_samples)} and {len(test_samples)} samples). '
            'Every choice below (a checkpoint within a KL budget, the best checkpoint, a reference schedule, γ) is '
            'made on the validation prompts\' gold and KL; every number reported is measured on the test prompts. '
            'Training pairs cover all 96 prompts, as in the default run.\n\n'
            f'SFT model: gold {sft["gold"]:.2f}, KL 0, {sft["items"]:.2f} items per list (the test prompts ask for '
            f'{asked:.2f} on average; the best possible gold is that number), {sft["off_support"]:.3f} of its '
            'samples off support. Gold and KL are means over the test prompts\' samples; KL in nats.\n\n'
            + tr_text + '\n' + distill_text)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / 'results.md').write_text(text)
    (results_dir / 'results.json').write_text(json.dumps(dict(
        settings=settings, validation_prompts=sorted(VALIDATION), sft=sft, natural_rho=natural_rho,
        rm_accuracy=rm_accuracy, rm_margins=rm_margins, sft_train_logp=sft_train_logp,
        frontiers={f'{f} | {u}': runs for (f, u), runs in per_seed.items()},
        trust_region={f'{f} | {u} | β={b}': runs for (f, u, b), runs in tr_curves.items()},
        distillation={f'ρ={rho} | {name}': runs for rho, by_name in distill_curves.items()
                      for name, runs in by_name.items()})) + '\n')
    plots(results_dir, tr_curves, sft, middle, distill_curves, best, rm_margins, sft_train_logp)
    print(f'wrote {results_dir}/results.md ({(time.time() - t0) / 60:.1f} min)')


if __name__ == '__main__':
    main()
