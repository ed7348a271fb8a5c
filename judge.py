"""
judge.py: evaluation of sample.py files, as the papers evaluate (GPT-4 win rates, 1–10 ratings, quality against KL
from the SFT policy), and reward labels for preference pairs. Each mode prints a table; --out=F.json keeps every number.

  mode=pairwise  a=, b= sample files: win rate of A over B = (wins + ties/2)/n with a 95% CI; F.verdicts.jsonl beside
                 --out holds each prompt's completions, order shown, answer, verdict and winner
  mode=criteria  files=: mean 1–10 score per criterion (coherence, correctness, level of detail, helpfulness,
                 harmlessness) and per file, the count of unparsed answers, the files' mean kl
  mode=reward    files=, reward_models=: mean reward per file and reward model (train_tr.py --loss=rm checkpoints)
  mode=gold      files=, gold= a Python file defining gold_reward(prompt, response) (default: the toy's r*)
  mode=label     data=, reward_models=, out= a folder: out/{train,test}.jsonl for train_tr.py --loss=distill|edistill

    python judge.py --a=samples/tr.jsonl --b=samples/sft.jsonl --template=tldr --out=samples/tr_vs_sft.json
    python judge.py --a=samples/tr.jsonl --b=samples/sft.jsonl --base_url=http://localhost:8000/v1 \
        --judge_model=Qwen/Qwen3-8B
    python judge.py --mode=gold --files=samples/sft.jsonl,samples/tr.jsonl

Pairing: samples meet by (index, sample), which sample.py writes, so a prompt that occurs several times in a split
gives a comparison per occurrence; the prompts must agree at each index. A is shown first in a random (seeded) half of
the pairs, which cancels a judge's position bias. CIs are percentiles of `bootstrap` resamples of the prompts, a
prompt's samples resampled together. A verdict is the last line starting `More helpful:` / `More harmless:` /
`Preferred:` (or a last line that is only A or B); anything else is a tie, counted as unparsed, as are scores outside
1–10. Templates (template=): data/judge_templates/{hh,hh_harmless,tldr,criteria}.txt (the DPO paper's prompts), or
a file of your own in which {prompt}, {a}, {b} and {response} are filled in.
Judges: judge=http posts to {base_url}/chat/completions of any OpenAI-compatible server with the standard library; the
key is read from the variable named api_key_env and is never printed or written. A 429, a 5xx, a timeout or a malformed
body is retried with backoff; other 4xx, a refused connection and an unknown host stop at once with the server's
message. Answers are cached by (judge, judge_model, max_tokens, prompt, base_url): a rerun asks only what is missing.
judge=hf runs a local HF causal LM greedily, through its chat template when it has one.
Scoring (reward, label) tokenizes and truncates as train_tr.py does and reads the score at the last token that is not
padding; label renders message lists with the first reward model's chat template, writes each usable row plus
reward_chosen, reward_rejected (a float per reward model) and reward_models, and resumes an interrupted file to the
same bytes; a file labelled by another reward_models list is an error.
"""
import importlib.util
import json
import os
import random
import re
import socket
import sys
import time
import urllib.request  # also imports urllib.error
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from sample import drop_partial_line, generate
from data.pairs import end_of_turn, jsonl_lines, layout, padding_id, read_jsonl, read_rows, read_text, render_row, \
    tokenize_pair, tokenize_prompt
from train_tr import check_model_path, load_model, parse_overrides, resolve_device, sequence_rewards

defaults = dict(
    mode='pairwise',        # pairwise | criteria | reward | gold | label
    a='', b='',             # pairwise: sample files (sample.py output) of systems A and B; the win rate is A's
    files='',               # criteria, reward, gold: comma-separated sample files
    gold='data/toy/prepare.py',  # gold: a Python file whose gold_reward(prompt, response) is the true reward
    template='',            # data/judge_templates/NAME.txt or a file path; '' = hh (pairwise), criteria (criteria)
    judge='http',           # http: OpenAI-compatible chat-completions endpoint | hf: local HF causal LM
    judge_model='gpt-4o',   # http: the endpoint's model name; hf: HF directory or hub name
    base_url='https://api.openai.com/v1',  # http: the OpenAI-compatible endpoint
    api_key_env='OPENAI_API_KEY',  # http: the environment variable holding the key (never printed or written)
    max_tokens=256,         # length of the judge's answer
    timeout=60.0,           # seconds per HTTP request
    retries=5,              # after a 429, a 5xx, a timeout, a dropped connection or a malformed answer
    backoff=1.0,            # seconds before the first retry; doubles every retry
    concurrency=4,          # HTTP requests in flight
    cache='judge_cache.jsonl',  # judge answers, so that a rerun asks nothing twice; '' = no cache
    bootstrap=1000,         # resamples of the prompts for the 95% confidence intervals
    seed=1337,              # response order shown to the judge, and the bootstrap
    reward_models='',       # reward, label: comma-separated HF reward models (sequence classifiers, one output)
    data='data/toy',        # label: every split of this train_tr.py data source
    batch_size=16,          # sequences per forward pass of a local model (reward models, hf judge)
    max_length=128, max_prompt_length=64,  # reward models: tokens of prompt + response, truncated as in training
    device='auto',          # auto | cpu | cuda
    out='',                 # JSON of every number (pairwise, criteria: verdicts JSONL beside it); label: a folder
)
CRITERIA = ('coherence', 'correctness', 'level of detail', 'helpfulness', 'harmlessness')


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


def http_answer(prompt, cfg):
    """One chat completion, retried with exponential backoff; the last failure stops the run in one line, and so
    does at once a failure that retrying cannot change: a 4xx other than 429 (with the server's message), a refused
    connection, an unknown host."""
    key = os.environ.get(cfg['api_key_env'])  # sent, never printed or written
    headers = {'Content-Type': 'application/json', **({'Authorization': f'Bearer {key}'} if key else {})}
    body = json.dumps({'model': cfg['judge_model'], 'messages': [{'role': 'user', 'content': prompt}],
                       'temperature': 0, 'max_tokens': cfg['max_tokens']}).encode()
    request = urllib.request.Request(cfg['base_url'].rstrip('/') + '/chat/completions', body, headers)
    for attempt in range(cfg['retries'] + 1):
        try:
            with urllib.request.urlopen(request, timeout=cfg['timeout']) as response:
                content = json.load(response)['choices'][0]['message']['content']
            if not isinstance(content, str):
                raise TypeError('malformed answer: the message content is not text')
            return content
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:  # 400, 401, 404: retrying cannot help
                message = server_message(e).replace(key, '***') if key else server_message(e)
                raise SystemExit(f"error: the judge at {cfg['base_url']} answered HTTP {e.code}: {message}")
            error = e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (ConnectionRefusedError, socket.gaierror)):  # no server, or no network
                raise SystemExit(f"error: cannot reach the judge at {cfg['base_url']}: {e.reason}")
            error = e
        except Exception as e:  # timeouts, dropped connections, bodies that are not chat completions
            error = e
        time.sleep(cfg['backoff'] * 2 ** attempt if attempt < cfg['retries'] else 0)
    raise SystemExit(f"error: the judge at {cfg['base_url']} failed {cfg['retries'] + 1} times, last with "
                     f"{type(error).__name__}: {' '.join(str(error).split())}")


def server_message(error):
    """The message of an HTTP error response, on one line: OpenAI's {"error": {"message": ...}}, else the body."""
    body = error.read().decode('utf-8', 'replace')
    try:
        message = json.loads(body)['error']
        message = message.get('message', message) if isinstance(message, dict) else message
    except (ValueError, KeyError, TypeError):
        message = body or error.reason
    return ' '.join(str(message).split())[:500]


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
    """The judge's answer to each prompt, from the cache or else from the judge (and at once into the cache)."""
    def key(prompt):  # what the answer depends on (an http judge's answers also on the server)
        return json.dumps([cfg['judge'], cfg['judge_model'], cfg['max_tokens'], prompt]
                          + ([cfg['base_url']] if cfg['judge'] == 'http' else []))
    path = cfg['cache'] or os.devnull
    cached = {r['key']: r['answer'] for r in read_jsonl(path)}
    todo = sorted({p for p in prompts if key(p) not in cached})
    if todo and cfg['judge'] == 'http' and 'api.openai.com' in cfg['base_url'] and not os.environ.get(
            cfg['api_key_env']):
        raise SystemExit(f"error: {cfg['api_key_env']} is not set: the judge at {cfg['base_url']} needs an API key "
                         '(or use --base_url= a local server, or --judge=hf)')
    drop_partial_line(path)
    pool = ThreadPoolExecutor(cfg['concurrency'])
    try:
        with open(path, 'a') as cache:
            # http: `concurrency` requests at a time, in order; hf: a generator, not started if zip finds todo empty
            answers = pool.map(lambda p: http_answer(p, cfg), todo) if cfg['judge'] == 'http' else hf_answers(todo, cfg)
            desc = f'judging ({len(prompts) - len(todo)} of {len(prompts)} cached)'
            for prompt, answer in zip(todo, tqdm(answers, desc, total=len(todo), dynamic_ncols=True)):
                cached[key(prompt)] = answer
                cache.write(json.dumps({'key': key(prompt), 'answer': answer}) + '\n')
                cache.flush()
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, requests not yet sent are not sent
    return [cached[key(p)] for p in prompts]


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


def sample_files(cfg):
    return [f for f in cfg['files'].split(',') if f]


def pairwise(cfg, template):
    """A's and B's samples meet by (index, sample), the prompt's position in its split and the sample's number that
    sample.py writes: prompts that occur several times in a split stay apart. Files without `index` meet by (prompt,
    sample), and then a prompt that occurs twice is an error. A is shown first in a random half of the pairs
    (seeded), which cancels a judge's position bias. An answer without a verdict is a tie."""
    rows_a, rows_b = read_samples(cfg['a']), read_samples(cfg['b'])
    by_index = all('index' in r for r in rows_a + rows_b)
    what = '(index, sample)' if by_index else '(prompt, sample)'

    def keyed(path, rows):
        keys = [(r['index'] if by_index else r['prompt'], r.get('sample', 0)) for r in rows]
        key, n = Counter(keys).most_common(1)[0]
        if n > 1:
            raise SystemExit(f'error: {path} has {n} rows for {what} = {key!r}, which would collapse into one pair '
                             '(sample.py writes a distinct index and sample on every row)')
        return dict(zip(keys, rows))
    keyed_a, keyed_b = keyed(cfg['a'], rows_a), keyed(cfg['b'], rows_b)
    pairs = [(row, keyed_b[k]) for k, row in keyed_a.items() if k in keyed_b]
    if not pairs:
        raise SystemExit(f"error: {cfg['a']} and {cfg['b']} have no {what} in common")
    for a, b in pairs:
        if a['prompt'] != b['prompt']:
            raise SystemExit(f"error: {cfg['a']} and {cfg['b']} have different prompts at index {a['index']}: sampled "
                             'from other data or splits')
    if len(pairs) < max(len(rows_a), len(rows_b)):
        print(f"note: {len(pairs)} pairs; {len(rows_a) - len(pairs)} samples of {cfg['a']} and "
              f"{len(rows_b) - len(pairs)} of {cfg['b']} have no counterpart")
    a_first = [i % 2 == 0 for i in range(len(pairs))]  # half of the pairs (±1), in a random pattern
    random.Random(cfg['seed']).shuffle(a_first)
    shown = [(a, b) if first else (b, a) for (a, b), first in zip(pairs, a_first)]
    answers = ask([template.format(prompt=x['prompt'].strip(), a=x['completion'].strip(), b=y['completion'].strip())
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


def criteria(cfg, template):
    rows = [dict(row, file=f) for f in sample_files(cfg) for row in read_samples(f)]
    answers = ask([template.format(prompt=r['prompt'].strip(), response=r['completion'].strip()) for r in rows], cfg)
    verdicts = [dict(r, answer=answer, scores=parse_scores(answer)) for r, answer in zip(rows, answers)]
    results = []
    for f in sample_files(cfg):
        mine = [v for v in verdicts if v['file'] == f]
        prompts = [v['prompt'] for v in mine]
        scores = {name: mean_ci([v['scores'].get(name) for v in mine], prompts, cfg) for name in CRITERIA}
        results.append(dict(file=f, n=len(mine), unparsed=sum(len(v['scores']) < len(CRITERIA) for v in mine),
                            **scores, kl=mean_ci([v.get('kl') for v in mine], prompts, cfg)))  # kl: see sample.py
    return results, verdicts


def reward_model_names(cfg):
    return [name for name in cfg['reward_models'].split(',') if name]


def load_reward_models(cfg):
    """(name, model, tokenizer) of each reward model: a sequence classifier with one output, as train_tr.py
    --loss=rm saves. Any other model would get a randomly initialized score head, and random scores."""
    models = []
    for name in reward_model_names(cfg):
        check_model_path(name, 'reward_models')
        config = AutoConfig.from_pretrained(name)
        if not any(a.endswith('ForSequenceClassification') for a in config.architectures or []) \
                or config.num_labels != 1:
            raise SystemExit(f'error: {name} is not a reward model (a sequence classifier with one output; its config '
                             f'has architectures {config.architectures}, num_labels {config.num_labels}); '
                             'train one with train_tr.py --loss=rm')
        models.append((name, load_model(name, reward_model=True).to(resolve_device(cfg['device'])).eval(),
                       AutoTokenizer.from_pretrained(name)))
    return models


@torch.no_grad()
def rewards(models, prompts, responses, cfg):
    """r(x, y) of each (prompt, response) under each reward model: tokenized, truncated and scored as train_tr.py does
    (EOS ends the response; the score is read at its last token that is not padding)."""
    scores, size = [], cfg['batch_size']
    for _, model, tokenizer in models:
        turn_end = end_of_turn(tokenizer)
        rows = [[torch.tensor(ids) for ids in tokenize_pair(tokenizer, p, r, None, cfg['max_length'],
                                                             cfg['max_prompt_length'], turn_end)]
                for p, r in zip(prompts, responses)]
        batches = [layout([(p, [r]) for p, r in rows[i:i + size]], model.config.pad_token_id, model.device)
                   for i in range(0, len(rows), size)]
        scores.append([r for batch in batches for r in sequence_rewards(model, batch).tolist()])
    return scores


def reward(cfg, template):
    """Mean score of each sample file under each reward model (mode=reward) or under the gold reward (mode=gold)."""
    samples = {f: read_samples(f) for f in sample_files(cfg)}  # before loading models: a bad file fails fast
    models, results, gold = load_reward_models(cfg) if cfg['mode'] == 'reward' else [], [], None
    if cfg['mode'] == 'gold':
        spec = importlib.util.spec_from_file_location('gold', cfg['gold'])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        gold = module.gold_reward
    for f, rows in samples.items():
        prompts, responses = [r['prompt'] for r in rows], [r['completion'] for r in rows]
        scores = rewards(models, prompts, responses, cfg)
        means = {name: mean_ci(s, prompts, cfg) for (name, _, _), s in zip(models, scores)}
        if gold is not None:
            means['gold'] = mean_ci([gold(p, r) for p, r in zip(prompts, responses)], prompts, cfg)
        results.append(dict(file=f, n=len(rows), **means, kl=mean_ci([r.get('kl') for r in rows], prompts, cfg)))
    return results, None


def label(cfg, template):
    """Each usable pair of each split of `data`, plus reward_chosen and reward_rejected (a float per reward model) and
    reward_models (their names), to out/<split>.jsonl; a partial file is continued, by the same reward models only.
    Message lists use the first reward model's chat template."""
    models, results, size = load_reward_models(cfg), [], cfg['batch_size']
    names = [name for name, _, _ in models]
    for split in ('train', 'test'):
        rows, name = read_rows(cfg['data'], split)
        if rows is None:
            continue
        rendered = [render_row(row, models[0][2]) for row in rows]  # (prompt, chosen, rejected), or why not
        usable = [(row, texts) for row, texts in zip(rows, rendered) if not isinstance(texts, str)]
        skipped = Counter(texts for texts in rendered if isinstance(texts, str))
        path = Path(cfg['out']) / f'{split}.jsonl'
        path.parent.mkdir(parents=True, exist_ok=True)
        # continue after the last whole batch, so that every row is scored in the same batch as in one run
        old = read_jsonl(path)
        other = next((r.get('reward_models') for r in old if r.get('reward_models') != names), names)
        if other != names:  # one file, one list: the rewards of a row are indexed by reward model
            raise SystemExit(f'error: {path} holds labels of reward_models={",".join(other or ["(not recorded)"])}, '
                             f'not {",".join(names)}; use another out= or delete it')
        done = len(usable) if len(old) == len(usable) else len(old) // size * size
        path.write_text(''.join(json.dumps(row) + '\n' for row in old[:done]))
        for start in tqdm(range(done, len(usable), size), desc=f'labelling {split}', dynamic_ncols=True):
            chunk = usable[start:start + size]
            prompts, chosen, rejected = zip(*(texts for _, texts in chunk))
            per_row = zip(*rewards(models, prompts, chosen, cfg)), zip(*rewards(models, prompts, rejected, cfg))
            with open(path, 'a') as f:  # closed, so flushed, after every batch
                for (row, _), rc, rr in zip(chunk, *per_row):
                    f.write(json.dumps({**row, 'reward_chosen': list(rc), 'reward_rejected': list(rr),
                                        'reward_models': names}) + '\n')
        results.append(dict(split=name, pairs=len(usable), skipped=sum(skipped.values()), **skipped,
                            labelled_now=len(usable) - done, out=str(path)))
    if not results:
        raise SystemExit(f"error: no train or test split in {cfg['data']}")
    return results, None


def judge(cfg):
    def cell(value):  # of the printed table: a {mean, ci95} as 'mean [low, high]'
        if isinstance(value, dict):
            return '{:.3f} [{:.3f}, {:.3f}]'.format(value['mean'], *value['ci95'])
        return f'{value:.3f}' if isinstance(value, float) else 'n/a' if value is None else str(value)
    modes = dict(pairwise=pairwise, criteria=criteria, reward=reward, gold=reward, label=label)
    if cfg['mode'] not in modes:
        raise SystemExit(f"error: mode must be one of {', '.join(modes)}, got {cfg['mode']!r}")
    if cfg['mode'] == 'pairwise' and not (cfg['a'] and cfg['b']):
        raise SystemExit('error: mode=pairwise needs a= and b=, the sample files (sample.py --out=) of the two '
                         'systems; python judge.py --help lists every setting')
    if cfg['mode'] in ('criteria', 'reward', 'gold') and not sample_files(cfg):
        raise SystemExit(f"error: mode={cfg['mode']} needs files=, comma-separated sample files (sample.py --out=)")
    if cfg['mode'] in ('reward', 'label') and not reward_model_names(cfg):
        raise SystemExit(f"error: mode={cfg['mode']} needs reward_models=")
    if cfg['mode'] == 'gold' and not Path(cfg['gold']).is_file():
        raise SystemExit(f"error: mode=gold needs gold= a Python file defining gold_reward(prompt, response); "
                         f"{cfg['gold']} does not exist")
    if cfg['mode'] == 'label' and not cfg['out']:
        raise SystemExit('error: mode=label needs out= (the folder for train.jsonl and test.jsonl)')
    name = cfg['template'] or ('criteria' if cfg['mode'] == 'criteria' else 'hh')
    path = Path(name) if Path(name).is_file() else Path(__file__).parent / 'data/judge_templates' / f'{name}.txt'
    if cfg['mode'] in ('pairwise', 'criteria') and not path.is_file():
        raise SystemExit(f"error: template={name}: neither a file nor {path}")
    results, verdicts = modes[cfg['mode']](cfg, path.read_text() if cfg['mode'] in ('pairwise', 'criteria') else '')
    columns = list(dict.fromkeys(k for r in results for k in r))
    table = [columns] + [[cell(r.get(k)) for k in columns] for r in results]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    print('\n'.join('  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table))
    if cfg['out'] and cfg['mode'] != 'label':
        Path(cfg['out']).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg['out']).write_text(json.dumps({'config': cfg, 'results': results}, indent=2) + '\n')
        if verdicts is not None:
            Path(cfg['out']).with_suffix('.verdicts.jsonl').write_text(''.join(json.dumps(v) + '\n' for v in verdicts))
    return results


if __name__ == '__main__':
    judge(parse_overrides(sys.argv[1:], defaults, __file__))
