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
that is printed, raised or written (data/judge_client.py has the HTTP rules: proxies, retries, limits). A setting that
does nothing in the chosen mode (reward_models with mode=pairwise, base_url with judge=hf, ...) is refused, and so is
an output that is one of the inputs. One run at a time writes an out (out.lock); runs may share a cache, each answer
appended whole under a lock. Ctrl-C stops at once, in one line; the answers received are in the cache, and the same
command continues from them.
"""
import fcntl
import json
import os
import queue
import random
import re
import sys
import threading
from collections import Counter
from concurrent.futures import Future
from contextlib import nullcontext
from pathlib import Path

from tqdm import tqdm

from sample import drop_partial_line, generate
from data.judge_client import http_answer, redact, redact_url
from data.label import load_reward_models, reward_model_names, rewards
from data.pairs import (check_model_path, fingerprint, fit_example, input_paths, is_messages, jsonl_lines,
                        load_tokenizer, padding_id, read_jsonl, read_text, tokenize_prompt)
from data.settings import (NOT_A_FOLDER, PROMPT_FITS, OutputLock, check_outputs, check_settings, defaults_of, need,
                           one_of, parse_overrides)
from train_tr import load_model, resolve_device

# -----------------------------------------------------------------------------
# settings: a setting a line, `name: its check = default  # meaning` (data/settings.py), checked before any file is
# read or request sent; with only=, another value than the default is refused where the setting does nothing
LLM_JUDGE = "mode != 'reward'"                  # pairwise and criteria ask an LLM judge; reward runs reward models
HTTP_JUDGE = f"{LLM_JUDGE} and judge == 'http'"
LOCAL_MODELS = "mode == 'reward' or judge == 'hf'"
REWARD = "mode == 'reward'"
mode: one_of('pairwise', 'criteria', 'reward') = 'pairwise'  # pairwise | criteria | reward
a: need(only="mode == 'pairwise'") = ''         # pairwise: sample file (sample.py output) of system A, whose win
                                                # rate is reported
b: need(only="mode == 'pairwise'") = ''         # pairwise: sample file of system B
files: need(only="mode != 'pairwise'") = ''     # criteria, reward: comma-separated sample files
template: need(only=LLM_JUDGE) = ''             # data/judge_templates/NAME.txt or a file path; '' = hh (pairwise),
                                                # criteria (criteria)
judge: one_of('http', 'hf', only=LLM_JUDGE) = 'http'  # http: OpenAI-compatible chat-completions endpoint | hf: local
                                                # HF causal LM
judge_model: need(only=LLM_JUDGE) = 'gpt-4o'    # http: the endpoint's model name; hf: HF directory or hub name
base_url: need(only=HTTP_JUDGE) = 'https://api.openai.com/v1'  # the OpenAI-compatible endpoint (http:// or https://,
                                                # no user, query or fragment)
api_key_env: need(only=HTTP_JUDGE) = 'OPENAI_API_KEY'  # the environment variable holding the key (never printed or
                                                # written)
max_tokens: need('max_tokens >= 1', only=LLM_JUDGE) = 256  # length of the judge's answer
timeout: need('timeout > 0', only=HTTP_JUDGE) = 60.0  # seconds per HTTP request, all of it: connecting, sending, the
                                                # whole answer
retries: need('retries >= 0', only=HTTP_JUDGE) = 5  # after a 429, a 5xx, a timeout, a dropped connection or a
                                                # malformed answer; a Retry-After is waited for within the backoff's
                                                # total, backoff·(2^retries − 1) seconds
backoff: need('backoff >= 0', only=HTTP_JUDGE) = 1.0  # seconds before the first retry; doubles every retry
concurrency: need('concurrency >= 1', only=HTTP_JUDGE) = 4  # HTTP requests in flight
cache: NOT_A_FOLDER._replace(only=LLM_JUDGE) = 'judge_cache.jsonl'  # judge answers, so that a rerun asks nothing
                                                # twice (runs may share it); '' = no cache
bootstrap: need('bootstrap >= 1') = 1000        # resamples of the prompts for the 95% confidence intervals
seed: need('0 <= seed < 2**64') = 1337          # response order shown to the judge, and the bootstrap
reward_models: need(only=REWARD) = ''           # reward: comma-separated HF reward models (sequence classifiers, one
                                                # output)
batch_size: need('batch_size >= 1', only=LOCAL_MODELS) = 16  # sequences per forward pass of a local model (reward
                                                # models, hf judge)
max_length: need('max_length >= 1', only=REWARD) = 128  # reward models: tokens of prompt + response, truncated as in
                                                # training
max_prompt_length: PROMPT_FITS._replace(only=REWARD) = 64  # reward models: tokens of the prompt, as in training
device: one_of('auto', 'cpu', 'cuda', only=LOCAL_MODELS) = 'auto'  # auto | cpu | cuda
out: NOT_A_FOLDER = ''                          # JSON of every number (pairwise, criteria: verdicts JSONL beside it)
defaults = defaults_of(globals())
CRITERIA = ('coherence', 'correctness', 'level of detail', 'helpfulness', 'harmlessness')
NEEDS = {'pairwise': ('a', 'b'), 'criteria': ('files',), 'reward': ('files', 'reward_models')}  # each mode's inputs
FIELDS = {'pairwise': ['a', 'b', 'prompt'], 'criteria': ['prompt', 'response']}  # of each mode's template, sorted
BASE_URL = re.compile(r'https?://([\w.-]+|\[[\w:.%]+\])(:\d{1,5})?(/[^?#\s]*)?')  # no user, query or fragment


def asks(cfg):  # LLM_JUDGE: an LLM judge answers (pairwise, criteria)
    return cfg['mode'] != 'reward'


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
    tokenizer = load_tokenizer(cfg['judge_model'], 'judge_model')
    model = load_model(cfg['judge_model']).to(resolve_device(cfg['device'])).eval()
    if tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{'role': 'user', 'content': p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    for start in range(0, len(prompts), cfg['batch_size']):
        chunk = [tokenize_prompt(tokenizer, p) for p in prompts[start:start + cfg['batch_size']]]
        for ids in generate(model, chunk, padding_id(tokenizer), tokenizer.eos_token_id, cfg['max_tokens']):
            yield tokenizer.decode(ids, skip_special_tokens=True)


def in_threads(function, items, n):
    """function(item) of each item, in order, from n daemon threads. Ctrl-C and a failure end the run at once: a
    ThreadPoolExecutor's threads are joined at exit, so an interrupted run waited for every request in flight (47 s).
    Closing the generator cancels the items no thread has started."""
    jobs, futures = queue.SimpleQueue(), [Future() for _ in items]
    for job in zip(items, futures):
        jobs.put(job)

    def work():
        while True:
            try:
                item, future = jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(item))
                except BaseException as e:  # SystemExit too: raised in the main thread by result()
                    future.set_exception(e)
    for _ in range(min(n, len(items))):
        threading.Thread(target=work, daemon=True).start()
    try:
        for future in futures:
            yield future.result()
    finally:
        for future in futures:
            future.cancel()


def append_line(cache, line):
    """Appends a whole line under an exclusive flock of the cache: runs that share a cache write one line at a time."""
    fcntl.flock(cache, fcntl.LOCK_EX)
    try:
        cache.write(line)
        cache.flush()
    finally:
        fcntl.flock(cache, fcntl.LOCK_UN)


def ask(prompts, cfg):
    """The judge's answer to each prompt, from the cache or else from the judge (and at once into the cache), keyed by
    what it depends on: an HTTP judge's model name and server, a local judge's files (its fingerprint, so a model
    retrained at the same path is asked again); cache lines that are no {key, answer} of text are ignored. Answers
    and errors leave redacted."""
    judged_by = [cfg['base_url']] if cfg['judge'] == 'http' else [fingerprint(cfg['judge_model'])]

    def key(prompt):
        return json.dumps([cfg['judge'], cfg['judge_model'], cfg['max_tokens'], prompt, *judged_by])
    path = cfg['cache'] or os.devnull
    cached = {r['key']: r['answer'] for r in read_jsonl(path)
              if isinstance(r, dict) and isinstance(r.get('key'), str) and isinstance(r.get('answer'), str)}
    todo = sorted({p for p in prompts if key(p) not in cached})
    if todo and cfg['judge'] == 'http' and 'api.openai.com' in cfg['base_url'] \
            and not os.environ.get(cfg['api_key_env'], '').strip():
        raise SystemExit(f"error: {cfg['api_key_env']} is not set: the judge at {cfg['base_url']} needs an API key "
                         '(or use --base_url= a local server, or --judge=hf)')
    if cfg['cache']:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    failed = threading.Event()  # a failure that stops the run: requests not yet sent are not sent

    def answer(prompt):  # after a failure: None, never read, as the failure of an earlier prompt is raised first
        try:
            return None if failed.is_set() else http_answer(prompt, cfg)
        except SystemExit:
            failed.set()
            raise
    try:
        with open(path, 'a') as cache:
            if cfg['cache']:  # a line cut short by a kill is dropped, under the lock: another run may be appending
                fcntl.flock(cache, fcntl.LOCK_EX)
                drop_partial_line(path)
                fcntl.flock(cache, fcntl.LOCK_UN)
            # http: `concurrency` requests at a time, in order; hf: a generator, not started if zip finds todo empty
            answers = in_threads(answer, todo, cfg['concurrency']) if cfg['judge'] == 'http' else hf_answers(todo, cfg)
            desc = f'judging ({len(prompts) - len(todo)} of {len(prompts)} cached)'
            try:  # the bar is closed also when interrupted, so that the error line starts a line of its own
                with tqdm(answers, desc, total=len(todo), dynamic_ncols=True) as bar:
                    for prompt, answer in zip(todo, bar):
                        cached[key(prompt)] = redact(answer, cfg)
                        append_line(cache, json.dumps({'key': key(prompt), 'answer': cached[key(prompt)]}) + '\n')
            finally:
                answers.close()
    except SystemExit as e:
        raise SystemExit(redact(str(e), cfg)) from None
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
    `completion` (or with prompt_messages that are no chat messages) stops the run, naming the file and line."""
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
            if row.get('prompt_messages') is not None and not is_messages(row['prompt_messages']):
                raise SystemExit(f'error: {path} line {number} has prompt_messages that are not chat messages')
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


def sample_ids(model, row, cfg):
    """[prompt ids, response ids] of a sample as a reward model reads it: the sampled conversation (prompt_messages,
    which sample.py writes for chat prompts) and the completion as an assistant message, rendered with the reward
    model's own chat template, else (text prompts, older sample files, a reward model without a template) the prompt
    text as sampled and the completion; fitted by the trainer's rule (data/pairs.py fit_example) with this one
    response: its prompt is cut when it and this response exceed max_length, where label.py cuts a pair's prompt by
    the longer of its two responses. An empty completion is scored too (as EOS alone): a policy's empty answers
    count."""
    name, _, tokenizer, turn_end = model
    prompt, response = row['prompt'], row['completion']
    if row.get('prompt_messages') and tokenizer.chat_template:
        prompt, response = row['prompt_messages'], [{'role': 'assistant', 'content': response}]
    try:
        return fit_example(tokenizer, prompt, [response], cfg['max_length'], cfg['max_prompt_length'], turn_end).ids
    except Exception as e:  # a template that refuses the conversation
        raise SystemExit(f"error: {row['file']}: the chat template of reward model {name} refuses the sample of "
                         f"index {row.get('index')}: {type(e).__name__}: {' '.join(str(e).split())}")


def reward(cfg, fill):
    rows = [dict(row, file=f) for f in sample_files(cfg) for row in read_samples(f)]  # before the models: fail fast
    models = load_reward_models(cfg)
    scores = rewards(models, [[sample_ids(model, row, cfg) for model in models] for row in rows], cfg)
    names = reward_model_names(cfg)
    return per_file(cfg, [dict(r, scores={n: s for n, (s,) in zip(names, per_model)})
                          for r, per_model in zip(rows, scores)], names), None


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
            verdicts_path(cfg).write_text(''.join(json.dumps(v) + '\n' for v in verdicts))


def verdicts_path(cfg):
    return Path(cfg['out']).with_suffix('.verdicts.jsonl')


def lock_out(cfg):
    """An exclusive lock on out while the run lasts (out.lock; nothing when out=''): two runs would write one file."""
    return OutputLock(f"{cfg['out']}.lock", cfg['out'], 'out') if cfg['out'] else nullcontext()


def check_config(cfg):
    """Every setting, the mode's inputs and its template, and that no output is an input, before any file is read or
    request sent. Returns the template's fill(**fields): each {field} replaced, other braces left as text
    (str.format would fail on them)."""
    if not BASE_URL.fullmatch(cfg['base_url']):  # first, and printed without what a user or query part may hold
        raise SystemExit('error: base_url must be an http:// or https:// URL without user, query or fragment, got '
                         f"{redact_url(cfg['base_url'])!r}")
    check_settings(cfg, globals())
    mode, missing = cfg['mode'], [k + '=' for k in NEEDS[cfg['mode']] if not cfg[k].strip(',')]
    if missing:
        raise SystemExit(f"error: mode={mode} needs {' and '.join(missing)} (sample files: sample.py's --out=; "
                         'python judge.py --help lists every setting)')
    name = cfg['template'] or ('criteria' if mode == 'criteria' else 'hh')
    path = Path(name) if Path(name).is_file() else Path(__file__).parent / 'data/judge_templates' / f'{name}.txt'
    if mode in FIELDS and not path.is_file():
        raise SystemExit(f'error: template={name}: neither a file nor {path}')
    judge_model = cfg['judge_model'] if asks(cfg) and cfg['judge'] == 'hf' else ''
    check_outputs([('out', cfg['out']), ('out', cfg['out'] and str(verdicts_path(cfg)) if asks(cfg) else ''),
                   ('cache', cfg['cache'] if asks(cfg) else '')],
                  [input_paths('a', cfg['a']), input_paths('b', cfg['b']),
                   *(input_paths('files', f) for f in sample_files(cfg)),
                   input_paths('template', str(path) if mode in FIELDS else ''),
                   input_paths('judge_model', judge_model),
                   *(input_paths('reward_models', m) for m in reward_model_names(cfg))])
    if judge_model:
        check_model_path(judge_model, 'judge_model', reward_model=False)
    template = read_text(path) if mode in FIELDS else ''
    found = sorted(set(re.findall(r'\{(\w+)\}', template)))
    if mode in FIELDS and found != FIELDS[mode]:
        raise SystemExit(f'error: template {path} has the fields {found}, not {FIELDS[mode]}: mode={mode} fills '
                         'exactly those {field}s (other braces are text)')
    return lambda **fields: re.sub(r'\{(\w+)\}', lambda m: fields[m[1]], template)


def evaluate(cfg):
    """The mode's results (printed, and with out= written), after every check."""
    fill = check_config(cfg)
    with lock_out(cfg):
        results, verdicts = {'pairwise': pairwise, 'criteria': criteria, 'reward': reward}[cfg['mode']](cfg, fill)
        report(cfg, results, verdicts)
    return results


if __name__ == '__main__':
    config = parse_overrides(sys.argv[1:], defaults, __file__)
    try:
        evaluate(config)
    except KeyboardInterrupt:  # Ctrl-C: one line at once; requests in flight end with the process
        kept = f"the answers received are kept in {config['cache']}: rerun the same command to continue from them" \
            if config['cache'] and asks(config) else 'nothing is kept'
        raise SystemExit(f'error: interrupted; {kept}')
