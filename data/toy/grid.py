"""
The toy experiment (data/toy/prepare.py has the task, the gold reward r* and the biased annotator). Two questions,
each measured as its paper measures it, with gold reward r* and KL(π‖π_SFT) estimated from samples of each checkpoint:

A. Trust region (Gorbatovski et al.): over-optimization frontiers. For DPO, IPO and KTO, each with the reference
   fixed, soft-updated every step (τ = 1, small α), soft-updated with the paper's α = 0.6 every 20% of training, or
   hard-updated every 10/20/40% of training, runs over three β (10× apart; IPO in its own range) on the shipped pairs
   (the length-biased annotator). The frontier of a family is the best gold reached within a KL budget over all its
   β and checkpoints (Gao et al. 2023; Rafailov et al. 2024). Every checkpoint also logs the paper's toy diagnostics:
   per-token log-probs of held-out chosen and rejected responses, the fraction of samples off the task's support, and
   the implicit margin (vs π_SFT) and chosen log-prob on training pairs, which the passes over the data keep moving.
B. Distillation (Fisch et al.): a length-bias sweep. Pairs of SFT samples relabelled by Bradley–Terry on r* itself,
   then subsampled so that a fraction ρ ∈ {0.2, 0.5, 0.8} prefers the longer list; per ρ, three reward models, then
   DPO, IPO, d-DPO, e-DPO and p-DPO (γ swept), TR-DPO and TR + e-DPO.

Every run keeps a snapshot at each evaluation (train_tr.py snapshots=True); each snapshot samples the test prompts with
sample.py (ref = the SFT model, so the mean of log π(y|x) − log π_SFT(y|x) estimates the KL) and is scored by
data/toy/gold.py. Mean ± std over 3 seeds (data order); all checkpoints share one sampling seed.

  python data/toy/grid.py                                   # the full grid: data/toy/results.md and three plots
  python data/toy/grid.py --quick --out=out/toy_quick       # a smoke version, about a minute (tests/test_toy.py)

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
from prepare import bradley_terry, gold_reward, in_support, items_of, parse_prompt, write_jsonl  # noqa: E402

SFT, DATA = 'data/toy/sft', 'data/toy'
SEEDS = (1, 2, 3)
TOY = ['--init_from=data/toy/sft', '--max_length=64', '--max_prompt_length=32', '--lr=2e-4', '--log_interval=25']
SAMPLING = dict(split='test', num_samples=2, max_new_tokens=48, batch_size=64, seed=0)  # 2 × 288 test prompts
DIAGNOSTIC_PAIRS = 288  # held-out (test) and training pairs whose log-probs each checkpoint logs

# A: 350 steps of 16 pairs = 2.8 epochs of the 2,014 shipped pairs
TR_STEPS, TR_EVAL = 350, 50
FAMILIES = {'DPO': ('dpo', (0.03, 0.1, 0.3)), 'IPO': ('ipo', (0.3, 1.0, 3.0)), 'KTO': ('kto', (0.03, 0.1, 0.3))}
KL_BUDGETS = (1.0, 3.0, 10.0)  # nats: the frontier's gold at a budget = best gold of the checkpoints with KL ≤ it

# B: 2,014 pairs per ρ, 250 steps (2.0 epochs); IPO at the middle of its β range, every other loss at β = 0.1
RHOS = (0.2, 0.5, 0.8)
DISTILL_STEPS, DISTILL_EVAL = 250, 50
GAMMAS = (0.01, 0.1, 1.0)
RM_ARGS = ['--loss=rm', '--init_from=data/toy/sft', '--lr=3e-4', '--max_iters=500', '--eval_interval=100',
           '--max_length=64', '--max_prompt_length=32']


def reference_updates(steps):
    """{name: train_tr.py arguments} of the reference's schedules, with τ a fraction of the run's steps."""
    return {'none': ['--ref_update=none'],
            'soft τ=1 α=0.01': ['--ref_update=soft', '--tr_tau=1', '--tr_alpha=0.01'],
            'soft τ=1 α=0.05': ['--ref_update=soft', '--tr_tau=1', '--tr_alpha=0.05'],
            f'soft α=0.6 τ={steps // 5}': ['--ref_update=soft', f'--tr_tau={steps // 5}', '--tr_alpha=0.6'],
            **{f'hard τ={steps * p // 10}': ['--ref_update=hard', f'--tr_tau={steps * p // 10}'] for p in (1, 2, 4)}}


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
    for gamma in GAMMAS:
        methods[f'e-DPO γ={gamma}'] = ['--loss=edistill', f'--pessimism_gamma={gamma}', '--ref_update=none', labelled]
        methods[f'p-DPO γ={gamma}'] = ['--loss=pdpo', f'--pessimism_gamma={gamma}', '--ref_update=none']
        methods[f'TR + e-DPO γ={gamma}'] = ['--loss=edistill', f'--pessimism_gamma={gamma}', '--ref_update=soft',
                                            '--tr_alpha=0.1', '--tr_tau=25', labelled]
    if quick:
        methods = {name: methods[name] for name in ('DPO', 'e-DPO γ=0.1', 'p-DPO γ=0.1')}
    return methods


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
    """out/rho_<ρ>/{train,test}.jsonl: n_pairs training pairs of which a fraction ρ prefers the longer list. The 2,014
    shipped pairs hold too few that r* labels longer-preferred for ρ = 0.8 (413 of them), so pairs are drawn from all
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


def measure(model_dir, samples_path, diagnostic_pairs, sft_logps):
    """Gold reward, KL(π‖π_SFT), list length and off-support fraction of a model's samples on the test prompts; the
    per-token log-probs of held-out chosen/rejected responses and of training chosen ones; the training pairs' mean
    log-ratio margin against π_SFT, (log π − log π_SFT)(y_w) − (log π − log π_SFT)(y_l), in nats."""
    import gold
    import sample
    sample.sample(dict(sample.defaults, init_from=str(model_dir), ref=SFT, data=DATA, out=str(samples_path),
                       **SAMPLING))
    (scores,) = gold.gold(dict(gold.defaults, files=str(samples_path)))
    rows = data_pairs.read_jsonl(samples_path)
    model = train_tr.load_model(str(model_dir)).eval()
    test, train = (pair_logps(model, pairs, diagnostic_pairs['pad_id']) for pairs in diagnostic_pairs['pairs'])
    ratio = train[:, :2] - sft_logps[:, :2]
    return dict(gold=scores['gold']['mean'], kl=scores['kl']['mean'],
                items=sum(len(items_of(r['completion'])) for r in rows) / len(rows),
                off_support=sum(not in_support(r['completion']) for r in rows) / len(rows),
                logp_chosen=(test[:, 0] / test[:, 2]).mean().item(),
                logp_rejected=(test[:, 1] / test[:, 3]).mean().item(),
                train_logp_chosen=(train[:, 0] / train[:, 2]).mean().item(),
                train_margin=(ratio[:, 0] - ratio[:, 1]).mean().item())


def worker(path):
    import torch
    from transformers import AutoTokenizer
    torch.set_num_threads(1)
    path = Path(path)
    spec = json.loads((path / 'job.json').read_text())
    args = spec['args'] or [f'--data={DATA}']
    cfg = train_tr.get_config([*args, f'--out_dir={path}', f"--seed={spec.get('seed', 0)}"])
    if cfg['loss'] != 'rm':  # the pairs every checkpoint is diagnosed on: the run's own held-out and training pairs
        tokenizer = AutoTokenizer.from_pretrained(SFT)
        pairs = [data_pairs.load_pairs(cfg['data'], split, tokenizer, 64, 32, verbose=False)[:DIAGNOSTIC_PAIRS]
                 for split in ('test', 'train')]
        diagnostic = dict(pairs=pairs, pad_id=data_pairs.padding_id(tokenizer))
        sft_logps = pair_logps(train_tr.load_model(SFT).eval(), pairs[1], diagnostic['pad_id'])
    if spec['args'] is None:  # the SFT model itself: the start of every curve
        point = dict(iter=0, **measure(SFT, path / 'samples.jsonl', diagnostic, sft_logps))
        (path / 'curve.json').write_text(json.dumps([point]))
        return
    cfg['snapshots'] = cfg['loss'] != 'rm'  # a reward model is not sampled
    cfg['resume'] = (path / 'state.pt').exists()  # a run interrupted after a checkpoint continues (same settings only)
    train_tr.train(cfg)
    if cfg['loss'] == 'rm':
        (path / 'curve.json').write_text('[]')
        return
    snapshots = sorted(path.glob('iter_*'), key=lambda p: int(p.name[5:]))
    curve = [dict(iter=int(p.name[5:]), **measure(p, p / 'samples.jsonl', diagnostic, sft_logps)) for p in snapshots]
    (path / 'curve.json').write_text(json.dumps(curve))


def run_jobs(jobs, n_workers):
    """jobs: {run folder: spec}; each unfinished one runs `grid.py --worker=FOLDER`, its output in FOLDER/log.txt."""
    def one(path):
        if (path / 'curve.json').exists():
            if json.loads((path / 'job.json').read_text()) != jobs[path]:
                raise SystemExit(f'error: {path} was run with other settings; use another --out or delete it')
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
# summary: results.md, results.json, frontiers.png, diagnostics.png, gold_vs_rho.png

def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values, digits=2):
    return '{:.{d}f} ± {:.{d}f}'.format(*mean_std(values), d=digits)


def frontier(points):
    """Gold at each KL budget and the peak (with its KL), over a set of checkpoints (the SFT point included)."""
    peak = max(points, key=lambda p: p['gold'])
    return {**{f'gold at KL ≤ {b:g}': max(p['gold'] for p in points if p['kl'] <= b) for b in KL_BUDGETS},
            'peak gold': peak['gold'], 'KL at peak': peak['kl']}


def table(header, rows):
    return (f'| {" | ".join(header)} |\n' + '|---' * len(header) + '|\n'
            + ''.join(f'| {" | ".join(map(str, row))} |\n' for row in rows))


def trust_region_tables(tr_curves, sft, seeds):
    """The frontier table (per family and update, over β and checkpoints of each seed), the per-β table, and the
    diagnostics table at each family's middle β."""
    keys = list(dict.fromkeys((family, update) for family, update, _ in tr_curves))
    per_seed = {key: [frontier([sft] + [p for (f, u, _), runs in tr_curves.items() if (f, u) == key
                                        for p in runs[s]]) for s in range(len(seeds))] for key in keys}
    columns = list(per_seed[keys[0]][0])
    text = ('## A. Trust region: gold-vs-KL frontiers over β\n\nPer seed, the best gold over all checkpoints of all '
            'β (and of the SFT model) within each KL budget; mean ± std over seeds.\n\n'
            + table(['family', 'reference update', *columns],
                    [[f, u, *(cell([r[c] for r in per_seed[f, u]]) for c in columns)] for f, u in keys]))
    text += ('\nEach run: peak gold (best checkpoint), and gold, KL and list length at the last checkpoint.\n\n'
             + table(['family', 'reference update', 'β', 'peak gold', 'final gold', 'final KL', 'final items'],
                     [[f, u, beta, cell([max(p['gold'] for p in run) for run in runs]),
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


def distillation_tables(distill_curves, rm_accuracy, natural_rho):
    """Per ρ: final and best gold, final KL and items per method, with e-DPO, p-DPO and TR + e-DPO at their best γ
    (the best mean final gold over ρ), and the γ sweep."""
    rhos = list(distill_curves)
    methods = list(distill_curves[rhos[0]])

    def final_gold(name):
        return statistics.mean(run[-1]['gold'] for rho in rhos for run in distill_curves[rho][name])
    tuned = {}
    for name in methods:
        base = name.split(' γ=')[0]
        if base not in tuned or final_gold(name) > final_gold(tuned[base]):
            tuned[base] = name
    header = ['method', *(f'ρ = {rho}' for rho in rhos)]

    def rows(names, measure, digits=2):
        return [[name, *(cell([measure(run) for run in distill_curves[rho][name]], digits) for rho in rhos)]
                for name in names]
    best = list(tuned.values())
    text = (f'## B. Distillation: gold reward against the length bias ρ\n\nTraining pairs labelled by Bradley–Terry '
            f'on r*, subsampled so that a fraction ρ prefers the longer list. Relabelled by r*, the shipped SFT pairs '
            f'of different lengths prefer the longer one in {natural_rho:.2f} of cases: r* itself prefers shorter '
            f'lists of these samples, so ρ = 0.8 is the set that fights the gold reward and ρ = 0.2 the one that '
            f'agrees with it. Reward models ({len(rm_accuracy[rhos[0]])} per ρ) score the held-out pairs (relabelled '
            'by r*) with accuracy '
            + ', '.join(f'{cell(rm_accuracy[rho])} at ρ = {rho}' for rho in rhos)
            + '. e-DPO, p-DPO and TR + e-DPO at the γ with the best final gold averaged over ρ (the γ table below).'
            '\n\nFinal gold:\n\n' + table(header, rows(best, lambda run: run[-1]['gold']))
            + '\nBest checkpoint\'s gold:\n\n' + table(header, rows(best, lambda run: max(p['gold'] for p in run)))
            + '\nFinal list length (items; the test prompts ask for 3.50 on average):\n\n'
            + table(header, rows(best, lambda run: run[-1]['items']))
            + '\nFinal KL(π‖π_SFT), nats:\n\n' + table(header, rows(best, lambda run: run[-1]['kl'], 1))
            + '\nγ sweep, final gold:\n\n'
            + table(header, rows([n for n in methods if ' γ=' in n], lambda run: run[-1]['gold'])))
    return text, best


def plots(results_dir, tr_curves, sft, middle, distill_curves, best):
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
            points = [(sft['kl'], sft['gold'])] + [
                pt for (f, u, _), runs in tr_curves.items() if (f, u) == (family, update)
                for pt in zip(seed_mean(runs, 'kl'), seed_mean(runs, 'gold'))]
            points.sort()
            envelope = [max(g for _, g in points[:j + 1]) for j in range(len(points))]
            ax.scatter(*zip(*points), s=6, color=f'C{i}', alpha=0.35)
            ax.step([k for k, _ in points], envelope, where='post', color=f'C{i}', label=update)
        ax.plot([sft['kl']], [sft['gold']], 'k*', ms=10, label='SFT')
        ax.set_xscale('symlog', linthresh=1.0)
        ax.set_xlim(left=0)
        ax.set_title(f'{family}: frontier over β and checkpoints')
        ax.set_xlabel('KL(π‖π_SFT), nats')
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel('gold reward r* (mean over seeds)')
    fig.tight_layout()
    fig.savefig(results_dir / 'frontiers.png', dpi=110)

    labels = {'off_support': 'samples off support', 'logp_chosen': 'held-out chosen, logp/token',
              'logp_rejected': 'held-out rejected, logp/token', 'train_margin': 'train margin vs SFT, nats'}
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
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (what, value) in zip(axes, [('final gold', lambda run: run[-1]['gold']),
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
    parser.add_argument('--quick', action='store_true', help='a DPO frontier of 2 β, a sweep of 2 ρ; 1 seed, 20 steps')
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

    # B's data, the SFT point and B's reward models, then the labels that d-DPO and e-DPO regress on
    natural_rho = length_biased_sets(out, rhos, n_pairs=256 if args.quick else 2014)
    rms = {rho: [run_dir(out / f'rho_{rho}', ['rm'], seed) for seed in rm_seeds] for rho in rhos}
    run_jobs({out / 'sft': dict(args=None), **{path: dict(args=[*rm_args, f'--data={out}/rho_{rho}'], seed=seed)
                                               for rho in rhos for path, seed in zip(rms[rho], rm_seeds)}}, args.jobs)
    for rho in rhos:
        labels = out / f'rho_{rho}' / 'labels'
        if not (labels / 'test.jsonl').exists():
            subprocess.run([sys.executable, 'data/label.py', f'--data={out}/rho_{rho}', f'--out={labels}',
                            '--reward_models=' + ','.join(map(str, rms[rho])), '--max_length=64',
                            '--max_prompt_length=32'], check=True, stdout=subprocess.DEVNULL)

    jobs, tr_runs, distill_runs = {}, {}, {}
    for key, method_args in trust_region_grid(args.quick).items():
        tr_runs[key] = [run_dir(out / 'trust_region', method_args, seed) for seed in seeds]
        jobs.update({path: dict(args=[*TOY, *tr_steps, f'--data={DATA}', *method_args], seed=seed)
                     for path, seed in zip(tr_runs[key], seeds)})
    for rho in rhos:
        for name, method_args in distillation_grid(args.quick).items():
            data = out / f'rho_{rho}' / 'labels' if '--data=LABELS' in method_args else out / f'rho_{rho}'
            method_args = [a for a in method_args if a != '--data=LABELS']
            distill_runs[rho, name] = [run_dir(out / f'rho_{rho}', method_args, seed) for seed in seeds]
            jobs.update({path: dict(args=[*TOY, *distill_steps, f'--data={data}', *method_args], seed=seed)
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
    asked = statistics.mean(parse_prompt(json.loads(line)['prompt'])[1]
                            for line in (out / 'sft' / 'samples.jsonl').read_text().splitlines())
    minutes = (time.time() - t0) / 60
    settings = (f'`python data/toy/grid.py{" --quick" if args.quick else ""}`: {len(jobs)} training runs + '
                f'{sum(map(len, rms.values()))} reward models, {minutes:.1f} min with {args.jobs} parallel jobs on '
                f'{os.cpu_count()} CPU cores. Common arguments: `{" ".join(TOY)}`; A: `{" ".join(tr_steps)}` on the '
                f'shipped pairs; B: `{" ".join(distill_steps)}`, β = 0.1 (IPO: 1.0), reward models '
                f'`{" ".join(rm_args)}`. Seeds {seeds}.')
    tr_text, per_seed, middle = trust_region_tables(tr_curves, sft, seeds)
    distill_text, best = distillation_tables(distill_curves, rm_accuracy, natural_rho)
    text = (f'# Toy results\n\n{settings}\n\nSFT model: gold {sft["gold"]:.2f}, KL 0, {sft["items"]:.2f} items per '
            f'list (the test prompts ask for {asked:.2f} on average; the best possible gold is that number), '
            f'{sft["off_support"]:.3f} of its samples off support. Gold and KL are means over 576 samples of the 288 '
            'test prompts; KL in nats.\n\n' + tr_text + '\n' + distill_text)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / 'results.md').write_text(text)
    (results_dir / 'results.json').write_text(json.dumps(dict(
        settings=settings, sft=sft, natural_rho=natural_rho, rm_accuracy=rm_accuracy,
        frontiers={f'{f} | {u}': runs for (f, u), runs in per_seed.items()},
        trust_region={f'{f} | {u} | β={b}': runs for (f, u, b), runs in tr_curves.items()},
        distillation={f'ρ={rho} | {name}': runs for rho, by_name in distill_curves.items()
                      for name, runs in by_name.items()})) + '\n')
    plots(results_dir, tr_curves, sft, middle, distill_curves, best)
    print(f'wrote {results_dir}/results.md ({minutes:.1f} min)')


if __name__ == '__main__':
    main()
