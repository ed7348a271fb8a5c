"""
judge.py: evaluation of sample.py files, as the papers evaluate (GPT-4 win rates, 1–10 ratings, quality against KL
from the SFT policy). Each mode prints a table; --out=F.json keeps every number.

  mode=pairwise  a=, b= sample files: win rate of A over B = (wins + ties/2)/n with a 95% CI; F.verdicts.jsonl beside
                 --out holds each prompt's completions, order shown, answer, verdict and winner
  mode=criteria  files=: mean 1–10 score per criterion (coherence, correctness, level of detail, helpfulness,
                 harmlessness) and per file, the count of unparsed answers, the files' mean kl
  mode=reward    files=, reward_models=: mean reward per file and reward model (train_tr.py --loss=rm checkpoints),
                 scored as data/label.py scores the pairs it labels (the toy's gold reward: data/toy/gold.py)

    python judge.py --a=samples/tr.jsonl --b=samples/sft.jsonl --template=tldr --out=samples/tr_vs_sft.json
    python judge.py --a=samples/tr.jsonl --b=samples/sft.jsonl --base_url=http://localhost:8000/v1 --judge_model=m

Templates: data/judge_templates/NAME.txt or a file with exactly the fields {prompt}, {a}, {b} (pairwise) or
{prompt}, {response} (criteria); other braces are text. The API key goes to base_url only, and *** replaces it in all
that is printed, raised or written.
"""
import json
import os
import random
import re
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer

from sample import drop_partial_line, generate
from data.judge_client import http_answer, redact
from data.label import load_reward_models, reward_model_names, rewards
from data.pairs import jsonl_lines, padding_id, read_jsonl, read_text, tokenize_prompt
from data.pairs import check_model_path
from data.settings import AT_LEAST_1, DEVICES, NOT_NEGATIVE, parse_overrides
from data.settings import check_values as check_settings, choice as one_of
from train_tr import load_model, resolve_device

defaults = dict(
    mode='pairwise',        # pairwise | criteria | reward
    a='', b='',             # pairwise: sample files (sample.py output) of systems A and B; the win rate is A's
    files='',               # criteria, reward: comma-separated sample files
    template='',            # data/judge_templates/NAME.txt or a file path; '' = hh (pairwise), criteria (criteria)
    judge='http',           # http: OpenAI-compatible chat-completions endpoint | hf: local HF causal LM
    judge_model='gpt-4o',   # http: the endpoint's model name; hf: HF directory or hub name
    base_url='https://api.openai.com/v1',  # http: the OpenAI-compatible endpoint
    api_key_env='OPENAI_API_KEY',  # http: the environment variable holding the key (never printed or written)
    max_tokens=256,         # length of the judge's answer
    timeout=60.0,           # seconds per HTTP request, all of it: connecting, sending, the whole answer
    retries=5,              # after a 429, a 5xx, a timeout, a dropped connection or a malformed answer
    backoff=1.0,            # seconds before the first retry; doubles every retry
    concurrency=4,          # HTTP requests in flight
    cache='judge_cache.jsonl',  # judge answers, so that a rerun asks nothing twice; '' = no cache
    bootstrap=1000,         # resamples of the prompts for the 95% confidence intervals
    seed=1337,              # response order shown to the judge, and the bootstrap
    reward_models='',       # reward: comma-separated HF reward models (sequence classifiers, one output)
    batch_size=16,          # sequences per forward pass of a local model (reward models, hf judge)
    max_length=128, max_prompt_length=64,  # reward models: tokens of prompt + response, truncated as in training
    device='auto',          # auto | cpu | cuda
    out='',                 # JSON of every number (pairwise, criteria: verdicts JSONL beside it)
)
CRITERIA = ('coherence', 'correctness', 'level of detail', 'helpfulness', 'harmlessness')
NEEDS = {'pairwise': ('a', 'b'), 'criteria': ('files',), 'reward': ('files', 'reward_models')}  # each mode's inputs
FIELDS = {'pairwise': ['a', 'b', 'prompt'], 'criteria': ['prompt', 'response']}  # of each mode's template, sorted
NOT_A_FOLDER = (lambda v: not v or not Path(v).is_dir(), 'a file path, not a folder')
VALID = {  # setting: (test of its value, what it must be); checked before any file is read or request sent
    'mode': one_of(*NEEDS), 'judge': one_of('http', 'hf'), 'device': one_of(*DEVICES), 'out': NOT_A_FOLDER,
    'base_url': (lambda v: re.fullmatch(r'https?://([\w.-]+|\[[\w:.%]+\])(:\d{1,5})?(/[^?#\s]*)?', v),
                 'an http:// or https:// URL without user, query or fragment'), 'cache': NOT_A_FOLDER,
    'timeout': (lambda v: v > 0, '> 0'), **dict.fromkeys(('retries', 'backoff'), NOT_NEGATIVE),
    **dict.fromkeys(('bootstrap', 'concurrency', 'max_tokens', 'batch_size', 'max_length'), AT_LEAST_1),
}


def parse_verdict(answer):
    """'A' or 'B' from the last 'More helpful:', 'Preferred:', ... line, or a last line that is only the letter."""
    labels = re.findall(r'^[\W_]*(?i:more \w+|preferred|answer|verdict|choice)\W{0,6}(?:(?i:response|summary) )?'
                        r'([AB])\b', answer, re.M)
    last = re.fullmatch(r'\W*(?:(?i:response|summary) )?([AB])\W*', answer.strip().split('\n')[-1])
    return labels[-1] if labels else last[1] if last else None


def parse_scores(answer):
    """{criterion: score} for each criterion whose last line '<criterion>: <number>' has a number in 1..10."""
    found = {name: re.findall(rf'^[\W_]*(?i:{name})\W{{0,6}}(\d+(?:\.\d+)?)', answer, re.M) for name in CRITERIA}
    return {name: float(v[-1]) for name, v in found.items() if v and 1 <= float(v[-1]) <= 10}


def hf_answers(prompts, cfg):
    """The answer to each prompt from a local causal LM: greedy, through its chat template if it has one."""
    check_model_path(cfg['judge_model'], 'judge_model')
    tokenizer = AutoTokenizer.from_pretrained(cfg['judge_model'])
    model = load_model(cfg['judge_model']).to(resolve_device(cfg['device'])).eval()
    if tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{'role': 'user', 'content': p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    for start in range(0, len(prompts), cfg['batch_size']):
        chunk = [tokenize_prompt(tokenizer, p) for p in prompts[start:start + cfg['batch_size']]]
        for ids in generate(model, chunk, padding_id(tokenizer), tokenizer.eos_token_id, cfg['max_tokens']):
            yield tokenizer.decode(ids, skip_special_tokens=True)


def ask(prompts, cfg):
    """The judge's answer to each prompt, from the cache or else from the judge (and at once into the cache), keyed by
    what it depends on; cache lines that are no {key, answer} of text are ignored. Answers and errors leave redacted."""
    def key(prompt):
        return json.dumps([cfg['judge'], cfg['judge_model'], cfg['max_tokens'], prompt]
                          + ([cfg['base_url']] if cfg['judge'] == 'http' else []))
    path = cfg['cache'] or os.devnull
    cached = {r['key']: r['answer'] for r in read_jsonl(path)
              if isinstance(r, dict) and isinstance(r.get('key'), str) and isinstance(r.get('answer'), str)}
    todo = sorted({p for p in prompts if key(p) not in cached})
    if todo and cfg['judge'] == 'http' and 'api.openai.com' in cfg['base_url'] \
            and not os.environ.get(cfg['api_key_env']):
        raise SystemExit(f"error: {cfg['api_key_env']} is not set: the judge at {cfg['base_url']} needs an API key "
                         '(or use --base_url= a local server, or --judge=hf)')
    drop_partial_line(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    failed = threading.Event()  # a failure that stops the run: requests not yet sent are not sent

    def answer(prompt):  # after a failure: None, never read, as the failure of an earlier prompt is raised first
        try:
            return None if failed.is_set() else http_answer(prompt, cfg)
        except SystemExit:
            failed.set()
            raise
    pool = ThreadPoolExecutor(cfg['concurrency'])
    try:
        with open(path, 'a') as cache:
            # http: `concurrency` requests at a time, in order; hf: a generator, not started if zip finds todo empty
            answers = pool.map(answer, todo) if cfg['judge'] == 'http' else hf_answers(todo, cfg)
            desc = f'judging ({len(prompts) - len(todo)} of {len(prompts)} cached)'
            for prompt, answer in zip(todo, tqdm(answers, desc, total=len(todo), dynamic_ncols=True)):
                cached[key(prompt)] = redact(answer, cfg)
                cache.write(json.dumps({'key': key(prompt), 'answer': cached[key(prompt)]}) + '\n')
                cache.flush()
    except SystemExit as e:
        raise SystemExit(redact(str(e), cfg)) from None
    finally:
        pool.shutdown(cancel_futures=True)
    return [redact(cached[key(p)], cfg) for p in prompts]


def mean_ci(values, prompts, cfg):
    """{mean, ci95} of the values that are not None, or None; the CI bootstraps prompts, each with all its samples."""
    groups = {}
    for v, p in zip(values, prompts):
        if v is not None:
            groups.setdefault(p, []).append(v)
    if not groups:
        return None
    groups, rng = list(groups.values()), random.Random(cfg['seed'])
    resamples = (rng.choices(groups, k=len(groups)) for _ in range(cfg['bootstrap']))
    means = sorted(sum(map(sum, s)) / sum(map(len, s)) for s in resamples)
    low, high = means[int(0.025 * len(means))], means[int(0.975 * len(means)) - 1]
    return dict(mean=sum(map(sum, groups)) / sum(map(len, groups)), ci95=[low, high])


def read_samples(path):
    """The rows of a sample.py file. A missing file, a line that is not JSON, or a row without text `prompt` and
    `completion` stops the run, naming the file and line."""
    if not Path(path).is_file():
        raise SystemExit(f'error: sample file not found: {path}')
    rows = []
    for number, line in enumerate(jsonl_lines(read_text(path)), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f'error: {path} line {number} is not valid JSON')
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ('prompt', 'completion')):
                raise SystemExit(f'error: {path} line {number} has no text "prompt" and "completion" (sample.py '
                                 'writes both)')
            rows.append(row)
    if not rows:
        raise SystemExit(f'error: {path} holds no samples')
    return rows


def pairwise(cfg, fill):
    """A's and B's samples meet by (index, sample), the prompt's position in its split and the sample's number that
    sample.py writes: prompts that occur several times in a split stay apart. Files without `index` meet by (prompt,
    sample), and then a prompt that occurs twice is an error. A is shown first in a random half of the pairs
    (seeded), which cancels a judge's position bias."""
    rows = {side: read_samples(cfg[side]) for side in 'ab'}
    by_index, keyed = all('index' in r for r in rows['a'] + rows['b']), {}
    what = '(index, sample)' if by_index else '(prompt, sample)'
    for side, mine in rows.items():
        keys = [(r['index'] if by_index else r['prompt'], r.get('sample', 0)) for r in mine]
        key, n = Counter(keys).most_common(1)[0]
        if n > 1:
            raise SystemExit(f'error: {cfg[side]} has {n} rows for {what} = {key!r}, which would collapse into one '
                             'pair (sample.py writes a distinct index and sample on every row)')
        keyed[side] = dict(zip(keys, mine))
    pairs = [(row, keyed['b'][k]) for k, row in keyed['a'].items() if k in keyed['b']]
    if not pairs:
        raise SystemExit(f"error: {cfg['a']} and {cfg['b']} have no {what} in common")
    for a, b in pairs:
        if a['prompt'] != b['prompt']:
            raise SystemExit(f"error: {cfg['a']} and {cfg['b']} have different prompts at index {a['index']}: sampled "
                             'from other data or splits')
    if len(pairs) < max(map(len, rows.values())):
        print(f"note: {len(pairs)} pairs; {len(rows['a']) - len(pairs)} samples of {cfg['a']} and "
              f"{len(rows['b']) - len(pairs)} of {cfg['b']} have no counterpart")
    a_first = [i % 2 == 0 for i in range(len(pairs))]  # half of the pairs (±1), in a random pattern
    random.Random(cfg['seed']).shuffle(a_first)
    shown = [(a, b) if first else (b, a) for (a, b), first in zip(pairs, a_first)]
    answers = ask([fill(prompt=x['prompt'].strip(), a=x['completion'].strip(), b=y['completion'].strip())
                   for x, y in shown], cfg)
    verdicts = [dict(prompt=a['prompt'], completion_a=a['completion'], completion_b=b['completion'],
                     a_shown_first=first, answer=answer, verdict=parse_verdict(answer))
                for (a, b), first, answer in zip(pairs, a_first, answers)]
    for v in verdicts:  # the verdict names a position, the winner a system; only an unparsed answer is a tie
        v['winner'] = 'tie' if v['verdict'] is None else 'a' if (v['verdict'] == 'A') == v['a_shown_first'] else 'b'
    count = Counter(v['winner'] for v in verdicts)
    points = [{'a': 1.0, 'tie': 0.5, 'b': 0.0}[v['winner']] for v in verdicts]  # win rate = (wins + ties/2) / n
    return [dict(a=cfg['a'], b=cfg['b'], n=len(verdicts), wins=count['a'], ties=count['tie'], losses=count['b'],
                 unparsed=count['tie'], win_rate=mean_ci(points, [v['prompt'] for v in verdicts], cfg))], verdicts


def sample_files(cfg):
    return list(dict.fromkeys(f for f in cfg['files'].split(',') if f))  # a file named twice is scored once


def per_file(cfg, rows, names):
    """Per sample file (rows carry `file`): n, the mean of each score in `names` of the rows' `scores`, the mean kl
    (sample.py's log π − log π_ref)."""
    results = []
    for f in dict.fromkeys(r['file'] for r in rows):
        mine = [r for r in rows if r['file'] == f]
        prompts = [r['prompt'] for r in mine]
        means = {k: mean_ci([r['scores'].get(k) for r in mine], prompts, cfg) for k in names}
        results.append(dict(file=f, n=len(mine), **means, kl=mean_ci([r.get('kl') for r in mine], prompts, cfg)))
    return results


def criteria(cfg, fill):
    rows = [dict(row, file=f) for f in sample_files(cfg) for row in read_samples(f)]
    answers = ask([fill(prompt=r['prompt'].strip(), response=r['completion'].strip()) for r in rows], cfg)
    verdicts = [dict(r, answer=answer, scores=parse_scores(answer)) for r, answer in zip(rows, answers)]
    return [dict(r, unparsed=sum(len(v['scores']) < len(CRITERIA) for v in verdicts if v['file'] == r['file']))
            for r in per_file(cfg, verdicts, CRITERIA)], verdicts


def reward(cfg, fill):
    rows = [dict(row, file=f) for f in sample_files(cfg) for row in read_samples(f)]  # before the models: fail fast
    scores = rewards(load_reward_models(cfg), [r['prompt'] for r in rows], [r['completion'] for r in rows], cfg)
    names = reward_model_names(cfg)
    return per_file(cfg, [dict(r, scores=dict(zip(names, s))) for r, s in zip(rows, zip(*scores))], names), None


def report(cfg, results, verdicts=None):
    """Prints the results as a table; with out=, writes them with the config as JSON, and the verdicts beside them."""
    def cell(value):  # a {mean, ci95} as 'mean [low, high]'
        if isinstance(value, dict):
            return '{:.3f} [{:.3f}, {:.3f}]'.format(value['mean'], *value['ci95'])
        return f'{value:.3f}' if isinstance(value, float) else 'n/a' if value is None else str(value)
    columns = list(dict.fromkeys(k for r in results for k in r))
    table = [columns] + [[cell(r.get(k)) for k in columns] for r in results]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    print('\n'.join('  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table))
    if cfg['out']:
        Path(cfg['out']).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg['out']).write_text(json.dumps({'config': cfg, 'results': results}, indent=2) + '\n')
        if verdicts is not None:
            Path(cfg['out']).with_suffix('.verdicts.jsonl').write_text(''.join(json.dumps(v) + '\n' for v in verdicts))


def check_config(cfg):
    """Every setting, the mode's inputs and its template, before any file is read or request sent. Returns the
    template's fill(**fields): each {field} replaced, other braces left as text (str.format would fail on them)."""
    check_settings(cfg, VALID)
    mode, missing = cfg['mode'], [k + '=' for k in NEEDS[cfg['mode']] if not cfg[k].strip(',')]
    if not 0 < cfg['max_prompt_length'] < cfg['max_length']:
        raise SystemExit('error: need 0 < max_prompt_length < max_length')
    if missing:
        raise SystemExit(f"error: mode={mode} needs {' and '.join(missing)} (sample files: sample.py's --out=; "
                         'python judge.py --help lists every setting)')
    name = cfg['template'] or ('criteria' if mode == 'criteria' else 'hh')
    path = Path(name) if Path(name).is_file() else Path(__file__).parent / 'data/judge_templates' / f'{name}.txt'
    if mode in FIELDS and not path.is_file():
        raise SystemExit(f'error: template={name}: neither a file nor {path}')
    template = read_text(path) if mode in FIELDS else ''
    found = sorted(set(re.findall(r'\{(\w+)\}', template)))
    if mode in FIELDS and found != FIELDS[mode]:
        raise SystemExit(f'error: template {path} has the fields {found}, not {FIELDS[mode]}: mode={mode} fills '
                         'exactly those {field}s (other braces are text)')
    return lambda **fields: re.sub(r'\{(\w+)\}', lambda m: fields[m[1]], template)


def judge(cfg):
    fill = check_config(cfg)
    results, verdicts = {'pairwise': pairwise, 'criteria': criteria, 'reward': reward}[cfg['mode']](cfg, fill)
    report(cfg, results, verdicts)
    return results


if __name__ == '__main__':
    judge(parse_overrides(sys.argv[1:], defaults, __file__))
