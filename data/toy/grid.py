"""
The toy experiment (data/toy/prepare.py has the task, the gold reward r* and the biased annotator): gold reward
against KL(π‖π_SFT) along training for

  DPO, IPO, KTO        each with ref_update = none | soft | hard (TR-DPO, TR-IPO, TR-KTO)
  d-DPO, e-DPO         distillation from Bradley–Terry reward models trained on the same biased pairs
  sweep                TR-DPO soft (α, τ) and hard τ, which chose train_tr.py's defaults

3 seeds each, 300 steps. Every run keeps a snapshot every 25 steps (train_tr.py snapshots=True); each snapshot samples
the test prompts with sample.py (ref = the SFT model, so each sample carries log π(y|x) − log π_SFT(y|x), whose mean
estimates KL(π‖π_SFT)), and judge.py mode=gold scores the samples with r*.

  python data/toy/grid.py                                   # the full grid: data/toy/results.md, gold_vs_kl.png
  python data/toy/grid.py --quick --out=out/toy_quick       # a smoke version, under a minute (tests/test_toy.py)

Finished runs are not redone (delete --out to start over; a run folder made with other settings is an error).
The plot needs matplotlib (pip install matplotlib), which nothing else in the repository uses; without it the tables
are still written.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
import train_tr  # noqa: E402  (importing it has no side effects; its defaults are the grid's soft setting)

SFT, DATA = 'data/toy/sft', 'data/toy'
SEEDS = (1, 2, 3)
COMMON = ['--init_from=data/toy/sft', '--max_length=64', '--max_prompt_length=32', '--lr=2e-4', '--max_iters=300',
          '--eval_interval=25', '--log_interval=25']
HARD_TAU = 100     # hard update of the main grid: the hard τ of the sweep with the best final gold
KL_BUDGETS = (1.0, 3.0)  # nats: "gold at a KL budget" = best gold of the checkpoints with KL ≤ it (SFT included)
SAMPLING = dict(split='test', num_samples=2, max_new_tokens=48, batch_size=64, seed=0)  # 2 × 288 test prompts
RM_ARGS = ['--loss=rm', '--init_from=data/toy/sft', '--data=data/toy', '--lr=3e-4', '--max_iters=500',
           '--eval_interval=100', '--max_length=64', '--max_prompt_length=32']


def tr_taus(quick):
    """τ of the soft and of the hard update; --quick trains 20 steps, so that its updates do happen."""
    return (5, 10) if quick else (train_tr.tr_tau, HARD_TAU)


def grid(quick):
    """{method: train_tr.py arguments}, main grid then sweep; the family (a plot panel) is the method's first word."""
    tau_soft, tau_hard = tr_taus(quick)
    soft = ['--ref_update=soft', f'--tr_alpha={train_tr.tr_alpha}', f'--tr_tau={tau_soft}']
    methods = {}
    for loss in ('dpo', 'ipo', 'kto')[:1 if quick else 3]:
        name = loss.upper()
        methods[name] = [f'--loss={loss}', '--ref_update=none']
        methods[f'TR-{name} soft'] = [f'--loss={loss}', *soft]
        methods[f'TR-{name} hard'] = [f'--loss={loss}', '--ref_update=hard', f'--tr_tau={tau_hard}']
    methods['d-DPO'] = ['--loss=distill', '--ref_update=none', '--data=RM_LABELS']
    methods['e-DPO'] = ['--loss=edistill', '--ref_update=none', '--data=RM_LABELS']
    if not quick:
        for alpha in (0.1, 0.3, 0.6):
            for tau in (5, 10, 25):
                methods[f'sweep soft α={alpha} τ={tau}'] = ['--loss=dpo', '--ref_update=soft', f'--tr_alpha={alpha}',
                                                            f'--tr_tau={tau}']
        for tau in (10, 25, 50, 100):
            methods[f'sweep hard τ={tau}'] = ['--loss=dpo', '--ref_update=hard', f'--tr_tau={tau}']
    return methods


def run_dir(out, args, seed):
    """One folder per distinct (arguments, seed): a sweep point equal to a main-grid method is trained once."""
    slug = '_'.join(a.lstrip('-').replace('=', '-').replace('/', '-') for a in args if not a.startswith('--data='))
    return out / f'{slug}_s{seed}'


# -----------------------------------------------------------------------------
# worker: one training run, then every snapshot sampled and scored (a subprocess, one torch thread)

def measure(model_dir, samples_path):
    """Mean gold reward, KL(π‖π_SFT) and list length of a model's samples on the test prompts."""
    import judge
    import sample
    from prepare import items_of
    sample.sample(dict(sample.defaults, init_from=str(model_dir), ref=SFT, data=DATA, out=str(samples_path),
                       **SAMPLING))
    (scores,), _ = judge.reward(dict(judge.defaults, mode='gold', files=str(samples_path)), '')
    rows = train_tr.read_jsonl(samples_path)
    return dict(gold=scores['gold']['mean'], kl=scores['kl']['mean'],
                items=sum(len(items_of(r['completion'])) for r in rows) / len(rows))


def worker(path):
    import torch
    torch.set_num_threads(1)
    path = Path(path)
    spec = json.loads((path / 'job.json').read_text())
    if spec['args'] is None:  # the SFT model itself: the start of every curve
        point = dict(iter=0, **measure(SFT, path / 'samples.jsonl'))
        (path / 'curve.json').write_text(json.dumps([point]))
        return
    cfg = train_tr.get_config([*spec['args'], f'--out_dir={path}', f"--seed={spec['seed']}"])
    cfg['snapshots'] = cfg['loss'] != 'rm'  # a reward model is not sampled
    cfg['resume'] = (path / 'state.pt').exists()  # a run interrupted after a checkpoint continues (same settings only)
    train_tr.train(cfg)
    if cfg['loss'] == 'rm':
        (path / 'curve.json').write_text('[]')
        return
    snapshots = sorted(path.glob('iter_*'), key=lambda p: int(p.name[5:]))
    curve = [dict(iter=int(p.name[5:]), **measure(p, p / 'samples.jsonl')) for p in snapshots]
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
        print(f'{time.strftime("%H:%M:%S")} done {path.name}', flush=True)
    with ThreadPoolExecutor(n_workers) as pool:
        list(pool.map(one, jobs))


# -----------------------------------------------------------------------------
# summary: results.md, results.json, gold_vs_kl.png

def summarize(curve, sft):
    """Per-run numbers of the results table; the curve starts at the SFT point."""
    points = [sft] + curve
    at_budget = {f'gold_kl_{b:g}': max(p['gold'] for p in points if p['kl'] <= b) for b in KL_BUDGETS}
    return dict(peak_gold=max(p['gold'] for p in points), **at_budget, final_gold=curve[-1]['gold'],
                final_kl=curve[-1]['kl'], final_items=curve[-1]['items'])


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_results(methods, curves, sft, results_dir, settings):
    budgets = ' | '.join(f'gold at KL ≤ {b:g}' for b in KL_BUDGETS)
    header = (f'| method | peak gold | {budgets} | final gold | final KL | final items |\n'
              + '|---' * (5 + len(KL_BUDGETS)) + '|\n')
    table = {}
    for name, runs in curves.items():
        per_run = [summarize(curve, sft) for curve in runs]
        table[name] = {column: mean_std([r[column] for r in per_run]) for column in per_run[0]}
    n_seeds = len(next(iter(curves.values())))

    def rows(names):
        return ''.join(f'| {name} | ' + ' | '.join(f'{m:.2f} ± {s:.2f}' for m, s in table[name].values()) + ' |\n'
                       for name in names)
    main = [n for n in methods if not n.startswith('sweep')]
    sweep = [n for n in methods if n.startswith('sweep')]
    text = (f'# Toy results: gold reward vs KL(π‖π_SFT)\n\n{settings}\n\n'
            f'SFT model: gold {sft["gold"]:.2f}, {sft["items"]:.2f} items per list (the test prompts ask for '
            f'{sft["asked"]:.2f} on average; the best possible gold is that number).\n\n'
            f'Mean ± std over {n_seeds} seeds of each run\'s numbers. Peak gold: best '
            f'checkpoint (the SFT model included); gold at KL ≤ B: best checkpoint within that budget; final: the last '
            f'checkpoint. KL in nats, estimated from the samples; items: mean list length.\n\n'
            + header + rows(main))
    if sweep:
        text += ('\n## Sweep: TR-DPO soft (α, τ) and hard τ\n\n' + header + rows(['DPO'] + sweep))
    (results_dir / 'results.md').write_text(text)
    (results_dir / 'results.json').write_text(json.dumps(dict(settings=settings, sft=sft, curves=curves,
                                                              table=table)) + '\n')
    try:
        import matplotlib
    except ImportError:
        print('matplotlib is not installed: no plot (pip install matplotlib)')
        return
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    families = {}
    for name in main:
        family = 'distillation (vs DPO)' if name in ('d-DPO', 'e-DPO') else name.split()[0].removeprefix('TR-')
        families.setdefault(family, []).append(name)
    families.get('distillation (vs DPO)', []).insert(0, 'DPO')
    fig, axes = plt.subplots(2, (len(families) + 1) // 2, figsize=(10, 8), sharey=True, squeeze=False)
    for ax, (family, names) in zip(axes.flat, families.items()):
        for name in names:
            runs = curves[name]  # mean over seeds at each checkpoint
            kl = [sft['kl']] + [statistics.mean(r[i]['kl'] for r in runs) for i in range(len(runs[0]))]
            gold = [sft['gold']] + [statistics.mean(r[i]['gold'] for r in runs) for i in range(len(runs[0]))]
            ax.plot(kl, gold, marker='.', label=name)
        for b in KL_BUDGETS:
            ax.axvline(b, color='grey', lw=0.5, ls='--')
        ax.plot([sft['kl']], [sft['gold']], 'k*', ms=10, label='SFT')
        ax.set_xscale('symlog', linthresh=1.0)
        ax.set_xlim(left=0)
        ax.set_title(family)
        ax.set_xlabel('KL(π‖π_SFT), nats')
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel(f'gold reward r* (mean of {n_seeds} seeds)')
    fig.tight_layout()
    fig.savefig(results_dir / 'gold_vs_kl.png', dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='DPO family and distillation, 1 seed, 20 steps (CI)')
    parser.add_argument('--out', default='out/toy_grid', help='run folders (models, samples, logs)')
    parser.add_argument('--results', default='', help="folder for results.md/json and the plot; '' = data/toy, "
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
    common, rm_args, seeds = COMMON, RM_ARGS, SEEDS
    if args.quick:
        common = [*COMMON, '--max_iters=20', '--eval_interval=10']
        rm_args, seeds = [*RM_ARGS, '--max_iters=20'], SEEDS[:1]
    methods = grid(args.quick)

    # the SFT point and the reward models, then the labels that d-DPO and e-DPO regress on
    rms = [run_dir(out, ['rm'], seed) for seed in SEEDS[:2 if args.quick else 3]]
    run_jobs({out / 'sft': dict(args=None), **{p: dict(args=rm_args, seed=s) for p, s in zip(rms, SEEDS)}}, args.jobs)
    labels = out / 'rm_labels'
    if not (labels / 'test.jsonl').exists():
        subprocess.run([sys.executable, 'judge.py', '--mode=label', f'--data={DATA}', f'--out={labels}',
                        '--reward_models=' + ','.join(map(str, rms)), '--max_length=64', '--max_prompt_length=32'],
                       check=True)

    jobs, runs = {}, {}
    for name, method_args in methods.items():
        method_args = [a.replace('RM_LABELS', str(labels)) for a in method_args]
        full = [*common, f'--data={DATA}', *method_args]  # a later --data wins
        runs[name] = [run_dir(out, method_args, seed) for seed in seeds]
        jobs.update({path: dict(args=full, seed=seed) for path, seed in zip(runs[name], seeds)})
    run_jobs(jobs, args.jobs)

    from prepare import parse_prompt
    sft = json.loads((out / 'sft' / 'curve.json').read_text())[0]
    prompts = [json.loads(line)['prompt'] for line in (out / 'sft' / 'samples.jsonl').read_text().splitlines()]
    sft['asked'] = statistics.mean(parse_prompt(p)[1] for p in prompts)
    curves = {name: [json.loads((p / 'curve.json').read_text()) for p in paths] for name, paths in runs.items()}
    minutes = (time.time() - t0) / 60
    settings = (f'`python data/toy/grid.py{" --quick" if args.quick else ""}`: {len(jobs)} training runs + '
                f'{len(rms)} reward models, {minutes:.1f} min with {args.jobs} parallel jobs on '
                f'{os.cpu_count()} CPU cores. Common arguments: `{" ".join(common)}` (β = {train_tr.beta}); TR soft: '
                f'α = {train_tr.tr_alpha}, τ = {tr_taus(args.quick)[0]}; TR hard: τ = {tr_taus(args.quick)[1]}; '
                f'distillation: {len(rms)} reward models `{" ".join(rm_args)}`, seeds {SEEDS[:len(rms)]}.')
    results_dir.mkdir(parents=True, exist_ok=True)
    write_results(methods, curves, sft, results_dir, settings)
    print(f'wrote {results_dir}/results.md ({minutes:.1f} min)')


if __name__ == '__main__':
    main()
