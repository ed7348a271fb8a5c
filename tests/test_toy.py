"""The gold-reward toy (data/toy): r* and the biased annotator by hand, the shipped pairs regenerated from the shipped
SFT model, gold.py's scores, train_tr.py snapshots, and the grid script's --quick setting end to end. CPU."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import SMALL, run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'data/toy'))
import gold  # noqa: E402
from prepare import (CATEGORIES, COUNTS, PHRASINGS, PROMPT, gold_reward, in_support, items_of,  # noqa: E402
                     parse_prompt, proxy_reward)

pytestmark = pytest.mark.usefixtures('one_thread')  # one torch thread, as in test_sample.py

FRUITS = PROMPT.format(request='Name three fruits.')


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_gold_reward_by_hand():
    # +1 per distinct on-topic item, −2 per other (off-topic or repeated) item, −2 per item past the asked count
    assert gold_reward(FRUITS, ' apple, fig, plum.') == 3  # the best response: k distinct fruits
    assert gold_reward(FRUITS, ' apple, fig.') == 2
    assert gold_reward(FRUITS, ' apple, apple, dog.') == 1 - 2 * 2
    assert gold_reward(FRUITS, ' apple, fig, plum, pear, kiwi.') == 5 - 2 * 2
    assert gold_reward(FRUITS, ' apple, dog, plum, pear, cat.') == 3 - 2 * 2 - 2 * 2
    assert gold_reward(FRUITS, ' apples and pears') == -2  # one item, not a fruit of the list
    assert gold_reward(FRUITS, '') == 0
    # the annotator's proxy adds length_bias per item: it prefers the overlong list that r* ranks below the best one
    assert proxy_reward(FRUITS, ' apple, fig, plum, pear, kiwi.', 1.5) == 1 + 7.5
    assert proxy_reward(FRUITS, ' apple, fig, plum.', 1.5) == 3 + 4.5
    with pytest.raises(ValueError, match='not a toy prompt'):
        gold_reward('\n\nHuman: Name three cars.\n\nAssistant:', ' apple.')


def test_every_toy_prompt_parses():
    for category, words in CATEGORIES.items():
        for name, k in COUNTS.items():
            for phrasing in PHRASINGS:
                assert parse_prompt(PROMPT.format(request=phrasing.format(k=name, c=category))) == (words, k)
    assert parse_prompt('\n\nHuman: Name three.\n\nAssistant:') == (None, None)


def test_shipped_pairs():
    train, test = read(REPO / 'data/toy/train.jsonl'), read(REPO / 'data/toy/test.jsonl')
    assert len(train) > 1900 and len(test) > 250
    assert {r['prompt'] for r in train} == {r['prompt'] for r in test}  # all 96 prompts, other samples in test
    assert len({r['prompt'] for r in train}) == len(CATEGORIES) * len(COUNTS) * len(PHRASINGS)
    for row in train + test:
        assert row['chosen'] != row['rejected']
        assert row['gold_chosen'] == gold_reward(row['prompt'], row['chosen'])
        assert row['gold_rejected'] == gold_reward(row['prompt'], row['rejected'])
    # the annotator is informative but biased: it agrees with r* on most pairs r* does not tie, not on all
    decided = [r for r in train if r['gold_chosen'] != r['gold_rejected']]
    agree = sum(r['gold_chosen'] > r['gold_rejected'] for r in decided) / len(decided)
    assert 0.6 < agree < 0.9


@pytest.mark.slow
def test_prepare_regenerates_the_shipped_pairs(tmp_path):
    """Step 4 of prepare.py (sample with the shipped SFT model, label once) gives the shipped files again."""
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', TQDM_DISABLE='1')
    subprocess.run([sys.executable, 'data/toy/prepare.py', '--skip_sft', f'--out_dir={tmp_path}'], cwd=REPO, env=env,
                   check=True, capture_output=True)
    for split in ('train', 'test'):
        assert (tmp_path / f'{split}.jsonl').read_text() == (REPO / f'data/toy/{split}.jsonl').read_text()


def test_gold_scores(tmp_path):
    rows = [dict(prompt=FRUITS, completion=' apple, fig, plum.', kl=1.0),
            dict(prompt=FRUITS, completion=' apple, apple, dog.', kl=3.0),
            dict(prompt=PROMPT.format(request='List two colours.'), completion=' red, blue, green.', kl=2.0)]
    path = tmp_path / 's.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (result,) = gold.gold(dict(gold.defaults, files=str(path)))
    assert result['gold']['mean'] == pytest.approx((3 - 3 + (3 - 2)) / 3)
    assert result['kl']['mean'] == pytest.approx(2.0)
    # the command, from another folder: judge.py's table, and every number in out=
    proc = subprocess.run([sys.executable, str(REPO / 'data/toy/gold.py'), f'--files={path},{path}',
                           '--out=gold.json'], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].split() == ['file', 'n', 'gold', 'kl']
    assert proc.stdout.splitlines()[1].split()[:3] == [str(path), '3', '0.333']
    assert len(proc.stdout.splitlines()) == 2  # a file named twice is scored once
    assert json.loads((tmp_path / 'gold.json').read_text())['results'][0]['gold'] == result['gold']
    other = tmp_path / 'other.jsonl'  # a prompt the toy's gold reward does not know is an error, not a silent score
    prompt = '\n\nHuman: Hi\n\nAssistant:'
    other.write_text(json.dumps(dict(prompt=prompt, completion=' hello')) + '\n')
    message = f'error: {other} sample 1: not a toy prompt: {prompt!r} (sampled from other data than data/toy)'
    with pytest.raises(SystemExit, match='^' + re.escape(message) + '$'):
        gold.gold(dict(gold.defaults, files=f'{path},{other}'))


@pytest.mark.parametrize('setting, value, message', [
    ('files', ',', 'files= needs one or more sample files (sample.py --out=), comma-separated'),
    ('files', 'missing.jsonl', 'sample file not found: missing.jsonl'),
    ('bootstrap', 0, 'bootstrap=0: need bootstrap >= 1'),
    ('out', 'FOLDER', "out='"),  # then the folder's path: is a folder; give a file path
])
def test_gold_settings_are_checked(tmp_path, setting, value, message):
    (tmp_path / 'FOLDER').mkdir()
    path = tmp_path / 's.jsonl'
    path.write_text(json.dumps(dict(prompt=FRUITS, completion=' fig.')) + '\n')
    cfg = {**gold.defaults, 'files': str(path), setting: str(tmp_path / 'FOLDER') if value == 'FOLDER' else value}
    with pytest.raises(SystemExit, match='^error: ' + re.escape(message)):
        gold.gold(cfg)


def test_snapshots_keep_each_evaluated_policy(tmp_path):
    run(tmp_path, *SMALL, '--snapshots=True', '--eval_interval=2')
    assert sorted(p.name for p in tmp_path.glob('iter_*')) == ['iter_2', 'iter_4']
    for snap in tmp_path.glob('iter_*'):
        assert not (snap / 'state').exists() and not (snap / '.lock').exists() and (snap / 'tokenizer.json').exists()
    last, final = load_file(tmp_path / 'iter_4/model.safetensors'), load_file(tmp_path / 'model.safetensors')
    assert all((last[k] == final[k]).all() for k in final)
    first = load_file(tmp_path / 'iter_2/model.safetensors')
    assert any((first[k] != final[k]).any() for k in final)


@pytest.mark.slow
def test_grid_quick(tmp_path):
    """The grid script's smoke setting: every run trains, every snapshot is sampled, scored and diagnosed, results.md
    has each table; the SFT point has KL exactly 0, every curve point is the gold reward and off-support fraction of
    its samples, reported on the test prompts and selected on the disjoint validation prompts, and each length-bias
    set holds the fraction ρ of longer-preferred pairs it is named for."""
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, 'data/toy/grid.py', '--quick', f'--out={tmp_path}'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_grid_output(tmp_path)


def check_grid_output(out):
    table = (out / 'results.md').read_text()
    for row in ('| DPO | none | ', '| DPO | soft τ=1 α=0.05 | ', '| DPO | hard τ=4 | ', '| e-DPO per pair γ=0.1 | ',
                '| e-DPO per batch γ=0.1 | ', '| p-DPO γ=0.1 | ', '## B. Distillation', '## A. Gold at matched KL',
                '| DPO | **TR, all − none** | ', '## B. The mechanism', '| 0.8 | reward models, each | ',
                '| 0.8 | SFT (step 0) | ', "Picked on the test prompts' gold instead"):
        assert row in table, row
    results = json.loads((out / 'results.json').read_text())
    validation = set(results['validation_prompts'])
    prompts = {r['prompt'] for r in read(REPO / 'data/toy/test.jsonl')}
    assert len(validation) == 32 and validation < prompts  # one phrasing of each category and count

    def mean(rows, value):
        return sum(map(value, rows)) / len(rows)

    def split(rows):  # (test, validation) samples
        return [r for r in rows if r['prompt'] not in validation], [r for r in rows if r['prompt'] in validation]
    assert results['sft']['kl'] == results['sft']['val_kl'] == 0.0
    test_rows, val_rows = split(read(out / 'sft/samples.jsonl'))
    assert results['sft']['gold'] == pytest.approx(mean(test_rows, lambda r: gold_reward(r['prompt'], r['completion'])))
    assert results['sft']['val_gold'] == pytest.approx(mean(val_rows, lambda r: gold_reward(r['prompt'],
                                                                                            r['completion'])))
    curves = {**results['trust_region'], **results['distillation']}
    for name, runs in curves.items():
        assert [p['iter'] for p in runs[0]] == [10, 20], name
    # --quick updates the reference within its 20 steps (τ = 1 soft, 4 hard): TR-DPO is not DPO
    dpo = results['trust_region']['DPO | none | β=0.1']
    # the implicit reward margin's mean magnitude is at least β times the magnitude of the mean margin (in nats)
    assert all(p['reward_margin'] >= 0.1 * abs(p['train_margin']) - 1e-6 for p in dpo[0])
    assert results['sft']['reward_margin'] == results['sft']['train_margin'] == 0.0
    assert results['trust_region']['DPO | soft τ=1 α=0.05 | β=0.1'] != dpo
    assert results['trust_region']['DPO | hard τ=4 | β=0.1'] != dpo
    snapshots = list(out.glob('*/*/iter_*'))
    assert len(snapshots) == 2 * len(curves)
    for snap in snapshots:
        rows = read(snap.parent / f'samples_{snap.name}.jsonl')
        assert len(rows) == len(read(REPO / 'data/toy/test.jsonl'))  # --quick: 1 sample per prompt
        (point,) = [p for p in read(snap.parent / 'curve.json')[0] if p['iter'] == int(snap.name[5:])]
        for prefix, subset in zip(('', 'val_'), split(rows)):
            assert point[f'{prefix}gold'] == pytest.approx(mean(subset, lambda r: gold_reward(r['prompt'],
                                                                                              r['completion'])))
            assert point[f'{prefix}kl'] == pytest.approx(mean(subset, lambda r: r['kl']))
            assert point[f'{prefix}off_support'] == mean(subset, lambda r: not in_support(r['completion']))
    for rho in (0.2, 0.8):
        pairs = read(out / f'rho_{rho}/train.jsonl')
        longer = sum(len(items_of(r['chosen'])) > len(items_of(r['rejected'])) for r in pairs)
        assert longer == round(rho * len(pairs)) and all(len(items_of(r['chosen'])) != len(items_of(r['rejected']))
                                                         for r in pairs)
        assert all(r['gold_chosen'] == gold_reward(r['prompt'], r['chosen']) for r in pairs)
        labels = read(out / f'rho_{rho}/labels/train.jsonl')
        assert len(labels) == len(pairs) and all(len(r['reward_chosen']) == 2 for r in labels)  # 2 reward models
        # the same pairs in the same order: d-DPO's and e-DPO's runs are diagnosed on the pairs the others are
        assert [(r['prompt'], r['chosen'], r['rejected']) for r in labels] == \
            [(r['prompt'], r['chosen'], r['rejected']) for r in pairs]
        # the margins' curves start at the SFT model, whose log-probs of its own samples differ from the shipped set's
        assert -3 < results['sft_train_logp'][str(rho)] < 0