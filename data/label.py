"""
data/label.py: reward labels for reward-model distillation. Each usable pair of each split of a train_tr.py data
source, scored by k reward models (train_tr.py --loss=rm checkpoints), to out/<split>.jsonl for train_tr.py
--loss=distill|edistill.

    python data/label.py --reward_models=out/rm1,out/rm2,out/rm3 --data=data/toy --out=out/labels

Scoring tokenizes and truncates as train_tr.py does and reads the score at the last token that is not padding (judge.py
mode=reward scores samples with the same functions); message lists are rendered with the first reward model's chat
template. A row keeps its fields and gains reward_chosen and reward_rejected (a float per reward model), reward_models
(their names) and reward_provenance: the fingerprints (data/pairs.py) of the reward models and of the split's file,
and the settings that change the numbers. An interrupted run is continued, to the same bytes; a file labelled from
other data, by other reward models or with other settings, or whose lines are not this split's rows in order, is
refused, in one line.
"""
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: runs from any folder
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from data.pairs import (end_of_turn, fingerprint, jsonl_lines, layout, read_rows, read_text, render_row,  # noqa: E402
                        tokenize_pair)
from data.pairs import check_model_path  # noqa: E402
from data.settings import AT_LEAST_1, DEVICES, parse_overrides  # noqa: E402
from data.settings import check_values as check_settings, choice as one_of  # noqa: E402
from train_tr import load_model, resolve_device, sequence_rewards  # noqa: E402

defaults = dict(
    reward_models='',       # comma-separated HF reward models (sequence classifiers with one output)
    data='data/toy',        # every split (train, test) of this train_tr.py data source
    out='',                 # the folder for <split>.jsonl
    batch_size=16,          # pairs per forward pass (the numbers depend slightly on it: a resume keeps it)
    max_length=128, max_prompt_length=64,  # tokens of prompt + response, and of the prompt, truncated as in training
    device='auto',          # auto | cpu | cuda
)
VALID = {  # setting: (test of its value, what it must be); checked before any model or file is read
    'device': one_of(*DEVICES), 'batch_size': AT_LEAST_1, 'max_length': AT_LEAST_1,
    'out': (lambda v: v and not Path(v).is_file(), 'a folder (for train.jsonl and test.jsonl), not a file'),
    'reward_models': (lambda v: any(v.split(',')), 'one or more reward models, comma-separated'),
    'data': (lambda v: bool(v), 'a data source (a file, a folder, a HF dataset name)'),
}
SETTINGS = ('max_length', 'max_prompt_length', 'batch_size')  # recorded on every row: a resume needs them unchanged
LABELS = ('reward_chosen', 'reward_rejected', 'reward_models', 'reward_provenance')  # the fields a row gains


def reward_model_names(cfg):
    return [name for name in cfg['reward_models'].split(',') if name]


def load_reward_models(cfg):
    """(name, model, tokenizer) of each reward model: a sequence classifier with one output, as train_tr.py
    --loss=rm saves. Any other model would get a randomly initialized score head, and random scores."""
    models = []
    for name in reward_model_names(cfg):
        check_model_path(name, 'reward_models', reward_model=True)
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


def check_config(cfg):
    check_settings(cfg, VALID)
    if not 0 < cfg['max_prompt_length'] < cfg['max_length']:
        raise SystemExit('error: need 0 < max_prompt_length < max_length')


def kept_lines(path, usable, made):
    """The lines of an earlier run's file that this run keeps: all when it labelled every pair, else those of its
    whole batches, so that every row is scored in the same batch as in one run. Each line must be the labelled copy
    of the usable row at its position, made as this run makes it (`made`: reward_models and reward_provenance);
    anything else, another run's labels or the lines of another file, stops the run in one line."""
    lines = jsonl_lines(read_text(path))[:-1] if path.exists() else []  # the piece after the last newline: cut short
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            have, want = provenance(row), provenance(made)
            change = next((k for k in want if have.get(k) != want[k]), None)
            if change:  # the names first, then the fingerprints and settings
                old, new = (','.join(map(str, v)) if isinstance(v, list) else '(not recorded)' if v is None else v
                            for v in (have.get(change), want[change]))
                raise SystemExit(f'error: {path} holds labels of {change}={old}, not {new}; use another out= or '
                                 'delete it')
        if number > len(usable) or not isinstance(row, dict) or unlabelled(row) != unlabelled(usable[number - 1][0]):
            raise SystemExit(f'error: {path} line {number} is not the labelled pair {number} of this data; use '
                             'another out= or delete it')
    size = made['reward_provenance']['batch_size']
    return lines if len(lines) == len(usable) else lines[:len(lines) // size * size]


def provenance(row):
    """reward_models and the entries of reward_provenance, in one dict."""
    more = row.get('reward_provenance')
    return {'reward_models': row.get('reward_models'), **(more if isinstance(more, dict) else {})}


def unlabelled(row):
    return {k: v for k, v in row.items() if k not in LABELS} if isinstance(row, dict) else row


def label(cfg):
    """Each usable pair of each split of `data`, labelled, to out/<split>.jsonl; a partial file is continued. Returns
    a dict per split: pairs, skipped (with a count per reason), labelled_now, out."""
    check_config(cfg)
    models, results, size = load_reward_models(cfg), [], cfg['batch_size']
    names = [name for name, _, _ in models]
    model_fingerprints = [fingerprint(name) for name in names]
    for split in ('train', 'test'):
        rows, name = read_rows(cfg['data'], split)
        if rows is None:
            continue
        rendered = [render_row(row, models[0][2]) for row in rows]  # (prompt, chosen, rejected), or why not
        usable = [(row, texts) for row, texts in zip(rows, rendered) if not isinstance(texts, str)]
        skipped = Counter(texts for texts in rendered if isinstance(texts, str))
        made = dict(reward_models=names, reward_provenance=dict(  # what the numbers depend on
            reward_model_fingerprints=model_fingerprints, data_fingerprint=fingerprint(name),
            **{k: cfg[k] for k in SETTINGS}))
        path = Path(cfg['out']) / f'{split}.jsonl'
        kept = kept_lines(path, usable, made)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(''.join(line + '\n' for line in kept))
        for start in tqdm(range(len(kept), len(usable), size), desc=f'labelling {split}', dynamic_ncols=True):
            chunk = usable[start:start + size]
            prompts, chosen, rejected = zip(*(texts for _, texts in chunk))
            per_row = zip(*rewards(models, prompts, chosen, cfg)), zip(*rewards(models, prompts, rejected, cfg))
            with open(path, 'a') as f:  # closed, so flushed, after every batch
                for (row, _), rc, rr in zip(chunk, *per_row):
                    f.write(json.dumps({**row, 'reward_chosen': list(rc), 'reward_rejected': list(rr), **made}) + '\n')
        results.append(dict(split=name, pairs=len(usable), skipped=sum(skipped.values()), **skipped,
                            labelled_now=len(usable) - len(kept), out=str(path)))
        why = ''.join(f', {n} {reason}' for reason, n in sorted(skipped.items()))
        print(f'{name}: {len(usable):,} pairs labelled in {path} ({len(usable) - len(kept):,} now; skipped '
              f'{sum(skipped.values()):,} rows{why})')
    if not results:
        raise SystemExit(f"error: no train or test split in {cfg['data']}")
    return results


if __name__ == '__main__':
    label(parse_overrides(sys.argv[1:], defaults, __file__))
