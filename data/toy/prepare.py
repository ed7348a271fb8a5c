"""
The gold-reward toy: nanoTR's default run and the experiment of data/toy/grid.py.

Why: the papers' claims (trust-region updates over-optimize less; distilled, pessimistic rewards are robust to a
biased annotator) are about *true* quality against KL from the SFT policy. Real runs measure that with GPT-4 or an
oracle reward model on GPUs. Here the true reward is a formula, so anyone can measure it on a laptop CPU.

The task: "\\n\\nHuman: Name three fruits.\\n\\nAssistant: apple, fig, plum." Eight categories of ten words, k from
two to five, three phrasings: 96 prompts. The test split has the same prompts with other samples: a 2-layer model
does not generalize to held-out (category, count, phrasing) combinations well enough for its reward model to learn.

The gold reward r*(x, y), for a response read as a comma-separated list of n items:
    r* = (distinct items of the asked category) − 2·(other items: off-topic or repeated) − 2·max(0, n − k)
i.e. relevance minus a penalty for going past the asked length. Its maximum is k: k distinct on-topic items.

The annotator: Bradley–Terry on a *biased proxy*, proxy = r* + length_bias·n. Each pair is labelled once,
P(y1 ≻ y2) = σ(proxy(y1) − proxy(y2)). With length_bias = 2 the proxy counts one more on-topic item past k as +1
where the gold reward counts it −1: the length bias of the distillation paper's TL;DR experiment.

The pipeline (all deterministic from --seed on one machine):
  1. demos/{train,test}.jsonl: SFT demonstrations, lists of k−2 … k+2 items, each on-topic with probability 0.75,
     else off-topic (0.15) or a repeat (0.10).
  2. base/: a byte-level BPE tokenizer trained on the demos and a random 2-layer Llama (data/prepare_common.py).
  3. sft/: `python train_tr.py --loss=sft --init_from=data/toy/base --data=data/toy/demos --out_dir=data/toy/sft` with
     the settings of SFT_ARGS below (400 steps of 32 demos; its state/, checkpoint.json, metrics.jsonl are deleted).
  4. train.jsonl, test.jsonl: two samples of the SFT model per prompt (sample.py, temperature 1), identical or
     empty pairs dropped, labelled once by the annotator. Rows carry gold_chosen/gold_rejected for analysis.

Run: python data/toy/prepare.py     (all four steps, about 35 s on 2 CPU cores; --skip_sft: step 4 only)
"""
import argparse
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # data/prepare_common.py: data/ is no package
from prepare_common import write_jsonl  # noqa: E402

CATEGORIES = {
    'fruits': 'apple pear plum fig lime grape peach mango kiwi lemon',
    'animals': 'cat dog horse mouse sheep goat tiger lion bear wolf',
    'colours': 'red blue green pink black white brown grey gold purple',
    'tools': 'hammer saw drill wrench chisel pliers axe rake spade clamp',
    'vegetables': 'carrot onion leek bean pea kale potato turnip radish celery',
    'instruments': 'piano violin drum flute harp guitar cello trumpet oboe banjo',
    'sports': 'tennis golf rugby soccer hockey boxing rowing cricket skiing judo',
    'countries': 'France Spain Italy Japan Chile Peru Egypt Kenya India Brazil',
}
CATEGORIES = {name: words.split() for name, words in CATEGORIES.items()}
COUNTS = {'two': 2, 'three': 3, 'four': 4, 'five': 5}
PHRASINGS = ['Name {k} {c}.', 'List {k} {c}.', 'Give me {k} {c}.']
PROMPT = '\n\nHuman: {request}\n\nAssistant:'
OFF_TOPIC_COST = 2.0  # gold: an off-topic or repeated item costs this much (a fresh on-topic one earns 1)
OVERSHOOT_COST = 2.0  # gold: each item past the asked count costs this much on top of its relevance
SFT_ARGS = ['--loss=sft', '--init_from={out}/base', '--data={out}/demos', '--out_dir={out}/sft', '--max_iters=400',
            '--batch_size=32', '--lr=3e-3', '--warmup_iters=10', '--eval_interval=100', '--log_interval=50']


# every toy prompt -> (the asked category's words, the asked count k)
PROMPTS = {PROMPT.format(request=phrasing.format(k=name, c=category)): (words, k)
           for category, words in CATEGORIES.items() for name, k in COUNTS.items() for phrasing in PHRASINGS}


def parse_prompt(prompt):
    """(category words, asked count k) of a toy prompt; (None, None) for any other text."""
    return PROMPTS.get(prompt, (None, None))


def items_of(response):
    text = response.strip()
    text = text[:-1] if text.endswith('.') else text
    return [item.strip() for item in text.split(',')] if text else []


def gold_reward(prompt, response):
    """r*(x, y): distinct on-topic items − OFF_TOPIC_COST per other item − OVERSHOOT_COST per item past k."""
    words, k = parse_prompt(prompt)
    if words is None:
        raise ValueError(f'not a toy prompt: {prompt!r}')
    items = items_of(response)
    on_topic = len({item for item in items if item in words})
    return on_topic - OFF_TOPIC_COST * (len(items) - on_topic) - OVERSHOOT_COST * max(0, len(items) - k)


WORDS = {word for words in CATEGORIES.values() for word in words}


def in_support(response):
    """Whether a response is a list the demonstrations could contain: known words, commas, a final full stop.
    Broken words ("rapple"), other text and lists cut off before their full stop are off the task's support."""
    items = items_of(response)
    return response.strip().endswith('.') and bool(items) and all(item in WORDS for item in items)


def proxy_reward(prompt, response, length_bias):
    """What the biased annotator prefers: r* plus length_bias per listed item."""
    return gold_reward(prompt, response) + length_bias * len(items_of(response))


def bradley_terry(y1, y2, margin, rng):
    """(chosen, rejected), drawn once: y1 wins with probability σ(margin), the Bradley–Terry model."""
    return (y1, y2) if rng.random() < 1 / (1 + math.exp(-margin)) else (y2, y1)


def demo(rng, words, k):
    """One SFT demonstration: k−2 … k+2 items, mostly distinct on-topic words, some off-topic or repeated."""
    others = [w for ws in CATEGORIES.values() if ws is not words for w in ws]
    items = []
    for _ in range(max(1, k + rng.randint(-2, 2))):
        u = rng.random()
        fresh = [w for w in words if w not in items]
        if u < 0.10 and items:
            items.append(rng.choice(items))
        elif u < 0.25 or not fresh:
            items.append(rng.choice(others))
        else:
            items.append(rng.choice(fresh))
    return ' ' + ', '.join(items) + '.'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seed', type=int, default=1337)
    parser.add_argument('--length_bias', type=float, default=1.5, help='annotator: proxy = r* + this · items')
    parser.add_argument('--n_demos', type=int, default=4000)
    parser.add_argument('--pairs_per_prompt', type=int, default=21, help='train split; the test split gets 3')
    parser.add_argument('--skip_sft', action='store_true', help='sample and label pairs with the shipped data/toy/sft')
    parser.add_argument('--out_dir', default=str(HERE))
    args = parser.parse_args()
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sft = HERE / 'sft' if args.skip_sft else out / 'sft'
    rng = random.Random(args.seed)
    splits = ('test', 'train')  # both have every prompt (the test pairs are other samples); random draws in this order

    # 1-3: demonstrations, base model, SFT model
    if not args.skip_sft:
        n_demos = {'train': args.n_demos, 'test': args.n_demos // 10}
        demos = {split: [{'prompt': p, 'chosen': demo(rng, *parse_prompt(p))}
                         for p in rng.choices(list(PROMPTS), k=n_demos[split])] for split in splits}
        (out / 'demos').mkdir(exist_ok=True)
        for split, rows in demos.items():
            write_jsonl(rows, out / 'demos' / f'{split}.jsonl')
        from prepare_common import build_model, build_tokenizer, save_base
        tok = build_tokenizer([t for row in demos['train'] for t in row.values()], vocab_size=384)
        save_base(tok, build_model(tok), out / 'base')
        rel = os.path.relpath(out, ROOT)  # relative paths, so that sft/nanotr_config.json names no machine's folders
        subprocess.run([sys.executable, 'train_tr.py', *(a.format(out=rel) for a in SFT_ARGS)], cwd=ROOT, check=True)
        for leftover in ('state', 'checkpoint.json', 'metrics.jsonl', '.lock'):  # the run's state: the model stays
            shutil.rmtree(sft / leftover) if leftover == 'state' else (sft / leftover).unlink(missing_ok=True)

    # 4: pairs sampled from the SFT model, labelled once by the biased Bradley–Terry annotator
    sys.path.insert(0, str(ROOT))
    import sample
    rng = random.Random(args.seed + 1)  # the labels do not depend on whether step 1-3 ran
    for split in splits:
        per_prompt = args.pairs_per_prompt if split == 'train' else 3
        with tempfile.TemporaryDirectory() as tmp:
            prompts_only = [{'prompt': p, 'chosen': ' -'} for p in PROMPTS for _ in range(per_prompt)]
            write_jsonl(prompts_only, Path(tmp) / 'test.jsonl')  # sample.py reads prompts from a data split
            cfg = dict(sample.defaults, init_from=str(sft), data=tmp, split='test', num_samples=2,
                       max_new_tokens=48, batch_size=64, seed=args.seed + (split == 'test'), out=f'{tmp}/s.jsonl')
            samples = sample.sample(cfg)
        rows, dropped = [], 0
        for a, b in zip(samples[0::2], samples[1::2]):
            prompt, y1, y2 = a['prompt'], a['completion'], b['completion']
            if y1 == y2 or not y1.strip() or not y2.strip():
                dropped += 1
                continue
            margin = proxy_reward(prompt, y1, args.length_bias) - proxy_reward(prompt, y2, args.length_bias)
            y1, y2 = bradley_terry(y1, y2, margin, rng)
            rows.append(dict(prompt=prompt, chosen=y1, rejected=y2, gold_chosen=gold_reward(prompt, y1),
                             gold_rejected=gold_reward(prompt, y2)))
        write_jsonl(rows, out / f'{split}.jsonl')
        gold_agrees = sum(r['gold_chosen'] > r['gold_rejected'] for r in rows)
        gold_ties = sum(r['gold_chosen'] == r['gold_rejected'] for r in rows)
        longer = sum(len(items_of(r['chosen'])) > len(items_of(r['rejected'])) for r in rows)
        same_length = sum(len(items_of(r['chosen'])) == len(items_of(r['rejected'])) for r in rows)
        print(f'{split}: {len(rows)} pairs ({dropped} identical or empty dropped); the gold reward prefers the chosen '
              f'response in {gold_agrees / len(rows):.3f}, ties {gold_ties / len(rows):.3f}; the chosen one is longer '
              f'in {longer / len(rows):.3f}, as long in {same_length / len(rows):.3f}; mean gold reward of the SFT '
              f'samples {sum(r["gold_chosen"] + r["gold_rejected"] for r in rows) / (2 * len(rows)):.3f}')


if __name__ == '__main__':
    main()
