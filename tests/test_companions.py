"""The companion scripts as careful as the trainer: sample.py, judge.py, data/label.py and data/toy/gold.py refuse an
output that is one of their inputs, hold a lock on their output while they run (a second run is refused, and a
refused run leaves nothing behind), refuse settings that do nothing in their run and a reward model where a language
model is needed, and stop on Ctrl-C within a second in one line, their outputs intact and continued by a rerun."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import run_script

import judge
import sample
from data import label
from data.settings import OutputLock
from data.toy import gold
from test_judge import (config, label_config, labelled_data, no_proxy_settings, reward_models,  # noqa: F401
                        server, write_samples)

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
SFT, BASE = str(REPO / 'data/tiny/sft'), str(REPO / 'data/tiny/base')
ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob('*'))


def run_sample(**overrides):
    cfg = {**sample.defaults, **dict(init_from=SFT, data=str(REPO / 'data/tiny'), num_prompts=3, max_new_tokens=4,
                                     device='cpu'), **overrides}
    try:
        return sample.sample(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def copies(tmp_path):
    """A model, a reference and a data folder of this test's own: a refused run must leave them as they are."""
    model, ref, data = tmp_path / 'model', tmp_path / 'ref', tmp_path / 'data'
    shutil.copytree(SFT, model)
    shutil.copytree(BASE, ref)
    data.mkdir()
    shutil.copy(REPO / 'data/tiny/test.jsonl', data / 'test.jsonl')
    return str(model), str(ref), data


# -----------------------------------------------------------------------------
# an output that is an input: refused before any work, every input untouched, nothing created
def test_judge_and_gold_refuse_outputs_that_are_inputs(tmp_path):
    """judge.py --out or --cache equal to a sample file overwrote or appended to it, and so did the verdicts file
    beside --out; gold.py --out the same."""
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    b = write_samples(tmp_path / 'b.verdicts.jsonl', [' y'])  # --out=b.json would write its verdicts there
    model = tmp_path / 'judge_model'
    shutil.copytree(SFT, model)
    result = tmp_path / 'result.json'
    cases = [
        (dict(out=a), f'out would write {a}, which is a={a}, an input of this run'),
        (dict(cache=b), f'cache would write {b}, which is b={b}, an input of this run'),
        (dict(out=str(tmp_path / 'b.json')), f'out would write {b}, which is b={b}, an input of this run'),
        (dict(cache=str(result)), f'cache would write {result}, which out also writes'),
        (dict(cache=str(tmp_path / 'result.verdicts.jsonl')),
         f"cache would write {tmp_path / 'result.verdicts.jsonl'}, which out also writes"),
        (dict(judge='hf', judge_model=str(model), cache=str(model / 'tokenizer.json')),
         f"cache would write {model / 'tokenizer.json'}, which is a file of judge_model={model}"),
        (dict(mode='criteria', a='', b='', files=f'{a},{b}', out=b), f'out would write {b}, which is files={b}'),
    ]
    before = listing(tmp_path)
    for overrides, message in cases:
        with pytest.raises(SystemExit, match='^error: ' + re.escape(message)):
            judge.evaluate(config(tmp_path, **{'a': a, 'b': b, **overrides}))
    with pytest.raises(SystemExit, match=f'^error: out would write {a}, which is files={a}, an input of this run'):
        gold.gold(dict(gold.defaults, files=a, out=a))
    assert listing(tmp_path) == before


def test_sample_refuses_an_out_among_its_inputs(tmp_path):
    """out= a data split (overwritten by the merge), or one of the files of init_from or ref: a file that a model
    folder's fingerprint covers (a sample file written there before, too: a rerun would call the model changed)."""
    model, ref, data = copies(tmp_path)
    (Path(model) / 'samples.jsonl').write_text('')  # an earlier run's, now one of the model folder's files
    before = listing(tmp_path)
    for out, message in [(data / 'test.jsonl', f'which is a file of data={data}'),
                         (Path(model) / 'samples.jsonl', f'which is a file of init_from={model}'),
                         (Path(ref) / 'config.json', f'which is a file of ref={ref}')]:
        with pytest.raises(SystemExit, match=f'^error: out would write {out}, {message}, an input of this run'):
            run_sample(init_from=model, ref=ref, data=str(data), out=str(out))
    assert listing(tmp_path) == before


def test_label_refuses_an_out_among_its_inputs(tmp_path, reward_models):  # noqa: F811
    data, _ = labelled_data(tmp_path)
    models = [str(tmp_path / 'rm')]
    shutil.copytree(reward_models[0], models[0])
    single = tmp_path / 'labels' / 'train.jsonl'  # data= a file in out: out/train.jsonl would be the data
    single.parent.mkdir()
    shutil.copy(data / 'train.jsonl', single)
    before = listing(tmp_path)
    for cfg, message in [(label_config(data, models, data), f'out would write {data}, which is data={data}'),
                         (label_config(data, models, models[0]), f'out would write {models[0]}, which is '
                                                                  f'reward_models={models[0]}'),
                         (label_config(single, models, single.parent), f'out would write {single}, which is data=')]:
        with pytest.raises(SystemExit, match='^error: ' + re.escape(message)):
            label.label(cfg)
    assert listing(tmp_path) == before


# -----------------------------------------------------------------------------
# one run per output: a lock, taken over from a killed run, never left behind
def test_a_second_label_run_on_one_out_is_refused_in_one_line(tmp_path, reward_models):  # noqa: F811
    """Two runs on one out both exited 0 and left 560 lines where one run writes 400."""
    data, _ = labelled_data(tmp_path)
    out = tmp_path / 'labels'
    args = [f'--data={data}', f"--reward_models={','.join(reward_models)}", f'--out={out}', '--device=cpu']
    with OutputLock(out / '.lock', str(out), 'out'):  # a run in progress
        before = listing(tmp_path)
        proc = run_script(['data/label.py', *args], ENV)
        assert proc.returncode == 1 and proc.stderr.strip() == (
            f'error: another run is writing {out} (it holds {out}/.lock); wait for it to end, or use another out=')
        assert listing(tmp_path) == before
    assert not out.exists()  # the holder made the folder for its lock, and took both away
    out.mkdir()
    (out / '.lock').write_text('')  # left by a run killed with kill -9: taken over
    proc = run_script(['data/label.py', *args], ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ['test.jsonl', 'train.jsonl']
    assert len((out / 'train.jsonl').read_text().splitlines()) == 30


def test_sample_judge_and_gold_hold_a_lock_on_their_out(tmp_path):
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    out = tmp_path / 'runs' / 'out.json'
    for run in (lambda: run_sample(out=str(out)), lambda: judge.evaluate(config(tmp_path, a=a, b=a, out=str(out))),
                lambda: gold.gold(dict(gold.defaults, files=a, out=str(out)))):
        with OutputLock(f'{out}.lock', str(out), 'out'):
            before = listing(tmp_path)
            with pytest.raises(SystemExit, match=f'^error: another run is writing {out} \\(it holds {out}.lock\\); '
                                                 'wait for it to end, or use another out=$'):
                run()
            assert listing(tmp_path) == before
        assert not out.parent.exists()


def test_a_run_refused_after_taking_the_lock_leaves_nothing(tmp_path):
    out = tmp_path / 'new' / 'deeper' / 'result.json'
    with pytest.raises(SystemExit, match='^error: sample file not found'):
        judge.evaluate(config(tmp_path, a=str(tmp_path / 'missing.jsonl'), b=str(tmp_path / 'missing.jsonl'),
                           out=str(out)))
    assert not (tmp_path / 'new').exists()


# -----------------------------------------------------------------------------
# settings that do nothing, and a model of the wrong kind: refused in one line before any work
@pytest.mark.parametrize('overrides, message', [
    (dict(judge='hf', judge_model=SFT, base_url='http://127.0.0.1:9/v1'),
     "base_url='http://127.0.0.1:9/v1' does nothing unless mode != 'reward' and judge == 'http'"),
    (dict(judge='hf', judge_model=SFT, concurrency=8), "concurrency=8 does nothing unless mode != 'reward' and judge =="),
    (dict(mode='reward', a='', b='', files='F', reward_models=SFT, template='tldr'),
     "template='tldr' does nothing unless mode != 'reward'"),
    (dict(mode='reward', a='', b='', files='F', reward_models=SFT, cache='other.jsonl'),
     "cache='other.jsonl' does nothing unless mode != 'reward'"),
    (dict(reward_models=SFT), f"reward_models='{SFT}' does nothing unless mode == 'reward'"),
    (dict(max_length=256), "max_length=256 does nothing unless mode == 'reward'"),
    (dict(mode='criteria', b='', files='F'), "a='F' does nothing unless mode == 'pairwise'"),
    (dict(files='F'), "files='F' does nothing unless mode != 'pairwise'"),
    (dict(device='cpu'), "device='cpu' does nothing unless mode == 'reward' or judge == 'hf'"),
])
def test_judge_refuses_settings_that_do_nothing(tmp_path, overrides, message):
    """A value that is ignored is a mistake, or an expectation the run does not meet: refused, naming where it acts."""
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    overrides = {k: a if v == 'F' else v for k, v in overrides.items()}
    with pytest.raises(SystemExit, match='^error: ' + re.escape(message.replace("'F'", repr(a))) + '.*; leave it at '
                                         'its default'):
        judge.evaluate({**judge.defaults, 'a': a, 'b': a, **overrides})
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.jsonl']


@pytest.mark.parametrize('overrides, message', [(dict(temperature=0.0, top_p=0.9), 'top_p=0.9'),
                                                (dict(temperature=0.0, seed=5), 'seed=5')])
def test_sample_refuses_settings_that_greedy_decoding_ignores(tmp_path, overrides, message):
    with pytest.raises(SystemExit, match=f'^error: {message} does nothing unless temperature > 0; leave it at its '
                                         'default'):
        run_sample(out=str(tmp_path / 's.jsonl'), **overrides)
    assert not list(tmp_path.iterdir()) and not dist.is_initialized()


def test_a_reward_model_is_refused_where_log_probs_are_needed(tmp_path, reward_models):  # noqa: F811
    """A sequence classifier loaded as a causal LM gets a random head: samples and KL of noise."""
    for key in ('init_from', 'ref'):
        with pytest.raises(SystemExit, match=f'^error: {key}={reward_models[0]} is a reward model'):
            run_sample(**{key: reward_models[0]}, out=str(tmp_path / 's.jsonl'))
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    with pytest.raises(SystemExit, match=f'^error: judge_model={reward_models[0]} is a reward model'):
        judge.evaluate(config(tmp_path, a=a, b=a, judge='hf', judge_model=reward_models[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.jsonl']


# -----------------------------------------------------------------------------
# Ctrl-C: within a second, one line, outputs whole, continued by a rerun
def interrupt(command, ready, timeout=180):
    """Starts the command, sends SIGINT once ready() holds, and returns (seconds from the signal to the error line,
    seconds to the exit, returncode, stderr). The exit comes later by the interpreter's own teardown of torch and
    transformers (1.5-2 s on 2 busy cores, measured with a script that only imports them)."""
    proc = subprocess.Popen([sys.executable, *command], cwd=REPO, env=ENV, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, bufsize=1)
    lines = []  # (time, line) of stderr, read as it comes
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in proc.stderr))
    reader.start()
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, ''.join(line for _, line in lines)[-3000:]
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    exited = time.monotonic() - start
    reader.join(10)
    said = next((t - start for t, line in lines if line.startswith('error:')), None)
    return said, exited, proc.returncode, ''.join(line for _, line in lines)


def assert_one_line(stderr, message):
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert stderr.strip().split('\n')[-1] == message and stderr.count('error:') == 1, stderr[-3000:]


def test_ctrl_c_stops_judge_at_once_and_a_rerun_continues(tmp_path, server):
    """The judge's thread pool waited for every request in flight (47 s), then printed a traceback."""
    a = write_samples(tmp_path / 'a.jsonl', [f' answer {i}' for i in range(12)])
    cache = tmp_path / 'cache.jsonl'

    def reply(prompt):  # the first three prompts (judge.py asks them sorted: 0, 10, 11, 1, 2, ...), then a slow judge
        if not re.search(r'answer (0|10|11)\n', prompt):
            time.sleep(30)
        return 'More helpful: A'
    server.reply = reply
    command = ['judge.py', f'--a={a}', f'--b={a}', f'--base_url={server.url}', '--judge_model=judge-1',
               f'--cache={cache}', f"--out={tmp_path / 'result.json'}", '--concurrency=4']
    said, exited, code, stderr = interrupt(command, lambda: server.hits >= 7 and cache.exists()
                                           and len(cache.read_text().splitlines()) == 3)
    assert said < 1.0 and exited < 5.0 and code == 1  # not after the 30 s answers in flight
    assert_one_line(stderr, f'error: interrupted; the answers received are kept in {cache}: rerun the same command '
                            'to continue from them')
    assert [json.loads(line)['answer'] for line in cache.read_text().splitlines()] == ['More helpful: A'] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.jsonl', 'cache.jsonl']  # no out, no lock
    server.reply, hits = (lambda prompt: 'More helpful: B'), server.hits
    proc = run_script(command, ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert server.hits == hits + 9 and json.loads((tmp_path / 'result.json').read_text())['results'][0]['n'] == 12


def test_ctrl_c_stops_sample_at_once_and_a_rerun_continues(tmp_path):
    out = tmp_path / 'samples.jsonl'
    part = Path(f'{out}.part0')
    command = ['sample.py', f'--init_from={SFT}', f'--ref={BASE}', '--data=data/tiny', '--split=train',
               '--num_prompts=400', '--batch_size=1', '--max_new_tokens=16', '--device=cpu', f'--out={out}']
    said, exited, code, stderr = interrupt(command, lambda: part.exists() and part.read_text().count('\n') >= 3)
    assert said < 1.0 and exited < 5.0 and code == 1
    assert_one_line(stderr, f'error: interrupted; the finished batches are kept in {out}.part*: rerun the same '
                            'command to continue')
    kept = [json.loads(line) for line in part.read_text().splitlines()]  # whole lines only
    assert part.read_text().endswith('\n') and len(kept) >= 3 and not Path(f'{out}.lock').exists()
    more = len(kept) + 2  # the rerun samples the missing prompts only (a smaller num_prompts keeps what it leaves)
    proc = run_script([*command[:5], f'--num_prompts={more}', *command[6:]], ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[:len(kept)] == kept and [r['index'] for r in rows] == list(range(more))


def test_ctrl_c_stops_label_at_once_and_a_rerun_continues(tmp_path, reward_models):  # noqa: F811
    data = tmp_path / 'data'
    data.mkdir()
    rows = (REPO / 'data/tiny/train.jsonl').read_text().splitlines()[:400]
    (data / 'train.jsonl').write_text(''.join(row + '\n' for row in rows))
    out = tmp_path / 'labels'
    command = ['data/label.py', f'--data={data}', f"--reward_models={','.join(reward_models)}", f'--out={out}',
               '--batch_size=1', '--device=cpu']
    path = out / 'train.jsonl'
    said, exited, code, stderr = interrupt(command, lambda: path.exists() and path.read_text().count('\n') >= 5)
    assert said < 1.0 and exited < 5.0 and code == 1
    assert_one_line(stderr, f'error: interrupted; the pairs labelled so far are kept in {out}: rerun the same command '
                            'to continue')
    kept = path.read_text().splitlines()
    assert all(json.loads(line)['reward_chosen'] for line in kept) and not (out / '.lock').exists()
    proc = run_script(command, ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    labelled = path.read_text().splitlines()
    assert labelled[:len(kept)] == kept and len(labelled) == 400
    assert f'({400 - len(kept):,} now;' in proc.stdout
