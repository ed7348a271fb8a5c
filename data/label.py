"""
data/label.py: reward labels for reward-model distillation. Each usable pair of each split of a train_tr.py data
source, scored by k reward models (train_tr.py --loss=rm checkpoints), to out/<split>.jsonl for train_tr.py
--loss=distill|edistill.

    python data/label.py --reward_models=out/rm1,out/rm2,out/rm3 --data=data/toy --out=out/labels

Each reward model scores a pair as train_tr.py --loss=rm trained it: rendered with its own chat template, fitted by the
trainer's rule (data/pairs.py fit_row: a too-long pair drops whole old exchanges, then loses the prompt's start when
the prompt and the longer response exceed max_length, then the responses' ends), chosen and rejected in one row after
one prompt, the score read at each response's last token that is not padding. A row that a reward model cannot score
so (no chat template for messages, responses identical once truncated, ...) is skipped and counted. judge.py
mode=reward scores samples with the same functions, one response at a time. A row keeps its fields and gains
reward_chosen and reward_rejected (a float per reward model), reward_models (their names) and reward_provenance: the
fingerprints (data/pairs.py) of the reward models and of the split's file, the settings that change the numbers and
the scoring rule. An interrupted run (Ctrl-C too) is continued, to the same bytes; a file labelled from other data, by
other reward models, with other settings or by another rule, or whose lines are not this split's rows in order, is
refused, in one line. One run at a time writes an out folder (out/.lock).
"""
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: runs from any folder
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.pairs import (check_model_path, end_of_turn, fingerprint, fit_row, input_paths,  # noqa: E402
                        jsonl_lines, layout, load_tokenizer, read_rows, read_text)
from data.settings import (DEVICE, PROMPT_FITS, OutputLock, check_outputs, check_settings, defaults_of,  # noqa: E402
                           need, parse_overrides)
from train_tr import load_model, resolve_device, sequence_rewards  # noqa: E402

# settings: a setting a line, `name: its check = default  # meaning` (data/settings.py), checked before any model or
# file is read
reward_models: need("any(reward_models.split(','))", why='needs one or more reward models, comma-separated') = ''
                                                # comma-separated HF reward models (sequence classifiers, one output)
data: need('data', why='needs a data source (a file, a folder, a HF dataset name)') = 'data/toy'
                                                # every split (train, test) of this train_tr.py data source
out: need('out and not Path(out).is_file()', why='needs a folder (for train.jsonl and test.jsonl), not a file') = ''
                                                # the folder for <split>.jsonl
batch_size: need('batch_size >= 1') = 16        # pairs per forward pass (the numbers depend slightly on it: a resume
                                                # keeps it)
max_length: need('max_length >= 1') = 128       # tokens of prompt + response, truncated as in training
max_prompt_length: PROMPT_FITS = 64             # tokens of the prompt, truncated as in training
device: DEVICE = 'auto'                         # auto | cpu | cuda
defaults = defaults_of(globals())
SETTINGS = ('max_length', 'max_prompt_length', 'batch_size')  # recorded on every row: a resume needs them unchanged
# how a pair is scored, recorded on every row: labels made otherwise (each response truncated alone after the first
# reward model's rendering, before) are not continued
SCORING = 'pair fitted per reward model'
SPLITS = ('train', 'test')
LABELS = ('reward_chosen', 'reward_rejected', 'reward_models', 'reward_provenance')  # the fields a row gains


def reward_model_names(cfg):
    return [name for name in cfg['reward_models'].split(',') if name]


def load_reward_models(cfg):
    """(name, model, tokenizer, end of turn) of each reward model: a sequence classifier with one output, as
    train_tr.py --loss=rm saves. Any other model would get a randomly initialized score head, and random scores."""
    models = []
    for name in reward_model_names(cfg):
        check_model_path(name, 'reward_models', reward_model=True)
        tokenizer = load_tokenizer(name, 'reward_models')
        models.append((name, load_model(name, reward_model=True).to(resolve_device(cfg['device'])).eval(), tokenizer,
                       end_of_turn(tokenizer)))
    return models


def fit_pair(models, row, cfg):
    """The token ids [prompt, chosen, rejected] of a row under each reward model, as its training fitted them
    (data/pairs.py fit_row with its own tokenizer and template), or why one of them cannot score it."""
    ids = []
    for _, _, tokenizer, turn_end in models:
        fitted = fit_row(row, tokenizer, cfg['max_length'], cfg['max_prompt_length'], turn_end=turn_end)
        if isinstance(fitted, str):
            return fitted
        ids.append(fitted.ids)
    return ids


@torch.no_grad()
def rewards(models, examples, cfg):
    """r(x, y) of each response of each example under each reward model, as [example][model][response]: examples
    hold, per reward model, the token ids [prompt, *responses] it reads (fit_pair, or judge.py's per-sample fitting);
    batch_size examples per forward, each a row of its prompt and all its responses (train_tr.py's layout), the score
    read at each response's last token that is not padding."""
    scores, size = [[] for _ in examples], cfg['batch_size']
    for m, (_, model, _, _) in enumerate(models):
        for start in range(0, len(examples), size):
            chunk = [[torch.tensor(ids) for ids in example[m]] for example in examples[start:start + size]]
            batch = layout([(prompt, responses) for prompt, *responses in chunk], model.config.pad_token_id,
                           model.device)
            per_response = sequence_rewards(model, batch).view(len(chunk[0]) - 1, len(chunk)).T.tolist()
            for i, values in enumerate(per_response, start):
                scores[i].append(values)
    return scores


def check_config(cfg):
    """Every setting, and that out is none of the inputs, before any model or file is read."""
    check_settings(cfg, globals())
    check_outputs([('out', cfg['out']), *(('out', str(Path(cfg['out']) / f'{split}.jsonl')) for split in SPLITS)],
                  [input_paths('data', cfg['data'], splits=True),
                   *(input_paths('reward_models', m) for m in reward_model_names(cfg))])


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
    with OutputLock(Path(cfg['out']) / '.lock', cfg['out'], 'out'):
        return label_locked(cfg)


def label_locked(cfg):
    models, size = load_reward_models(cfg), cfg['batch_size']
    names = [name for name, *_ in models]
    model_fingerprints = [fingerprint(name) for name in names]
    splits = []  # every split's earlier file is checked before any is written: a refused run changes nothing
    for split in SPLITS:
        rows, name = read_rows(cfg['data'], split)
        if rows is None:
            continue
        fitted = [fit_pair(models, row, cfg) for row in rows]  # per reward model [prompt, chosen, rejected], or why not
        usable = [(row, ids) for row, ids in zip(rows, fitted) if not isinstance(ids, str)]
        made = dict(reward_models=names, reward_provenance=dict(  # what the numbers depend on
            reward_model_fingerprints=model_fingerprints, data_fingerprint=fingerprint(name),
            **{k: cfg[k] for k in SETTINGS}, scoring=SCORING))
        path = Path(cfg['out']) / f'{split}.jsonl'
        splits.append((name, path, usable, made, kept_lines(path, usable, made),
                       Counter(ids for ids in fitted if isinstance(ids, str))))
    if not splits:
        raise SystemExit(f"error: no train or test split in {cfg['data']}")
    results = []
    for name, path, usable, made, kept, skipped in splits:
        path.write_text(''.join(line + '\n' for line in kept))
        # the bar is closed also when interrupted, so that the error line starts a line of its own
        with tqdm(range(len(kept), len(usable), size), desc=f'labelling {path.stem}', dynamic_ncols=True) as bar:
            for start in bar:
                chunk = usable[start:start + size]
                scores = rewards(models, [ids for _, ids in chunk], cfg)
                with open(path, 'a') as f:  # closed, so flushed, after every batch
                    for (row, _), per_model in zip(chunk, scores):
                        f.write(json.dumps({**row, 'reward_chosen': [c for c, _ in per_model],
                                            'reward_rejected': [r for _, r in per_model], **made}) + '\n')
        results.append(dict(split=name, pairs=len(usable), skipped=sum(skipped.values()), **skipped,
                            labelled_now=len(usable) - len(kept), out=str(path)))
        why = ''.join(f', {n} {reason}' for reason, n in sorted(skipped.items()))
        print(f'{name}: {len(usable):,} pairs labelled in {path} ({len(usable) - len(kept):,} now; skipped '
              f'{sum(skipped.values()):,} rows{why})')
    return results


if __name__ == '__main__':
    config = parse_overrides(sys.argv[1:], defaults, __file__)
    try:
        label(config)
    except KeyboardInterrupt:  # Ctrl-C: one line; the batches written are whole lines, kept by the next run
        raise SystemExit(f"error: interrupted; the pairs labelled so far are kept in {config['out']}: rerun the same "
                         'command to continue')
