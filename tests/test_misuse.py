"""A careless hand and a faulty machine, for the trainer and its data path: every case either works as README says or
stops in one `error:` line before anything is written; nothing a run produced is lost or silently wrong."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoTokenizer

import train_tr
from conftest import REPO, SMALL, TINY, run, torchrun
from data import pairs as data_pairs
from data.files import open_log

TOY_SFT = REPO / 'data/toy/sft'


def last_error(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    return lines[-1] if lines else ''


# -----------------------------------------------------------------------------
# settings
def test_unknown_key_suggests_the_nearest():
    with pytest.raises(SystemExit, match=r"unknown config key 'max_iter' .*; did you mean max_iters\?$"):
        train_tr.get_config(['--max_iter=5'])


def test_home_in_paths_is_expanded():
    cfg = train_tr.get_config(['--data=~/prefs.jsonl', '--out_dir=~/runs/a'])
    assert cfg['data'] == os.path.expanduser('~/prefs.jsonl') and not cfg['out_dir'].startswith('~')


@pytest.mark.parametrize('key', ['init_from', 'ref_from', 'data'])
def test_out_dir_over_an_input_is_refused(tmp_path, key):
    """out_dir equal to init_from overwrote the SFT model's weights with the first checkpoint."""
    model = tmp_path / 'sft'
    model.mkdir()
    for f in TOY_SFT.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    cfg = train_tr.get_config([f'--{key}={model}', f'--out_dir={model}'])
    with pytest.raises(SystemExit, match=f'^error: out_dir would write {model}, which is {key}={model}, an input'):
        train_tr.check_out_dir(cfg)


def test_out_dir_beside_the_inputs_is_fine(monkeypatch):
    monkeypatch.chdir(REPO)  # the default run: out_dir='out' next to data/toy, ref_from='' (no path)
    train_tr.check_out_dir(train_tr.get_config(['--out_dir=out/x']))
    train_tr.check_out_dir(train_tr.get_config(['--out_dir=data/tiny/runs/a', '--data=data/tiny']))  # a run inside


def test_refused_runs_leave_nothing_behind(tmp_path):
    """A bad data path, a missing checkpoint to resume or a fresh run into a saved one: no out_dir, no lock appears."""
    for args in (['--data=missing.jsonl'], ['--resume=True'], ['--init_from=nowhere/model']):
        proc, _ = run(tmp_path / 'out', *args, check=False)
        assert proc.returncode == 1 and last_error(proc), proc.stderr[-1000:]
        assert not (tmp_path / 'out').exists(), args


@pytest.mark.parametrize('args, message', [
    (['--loss=ipo', '--label_smoothing=0.1'], "label_smoothing=0.1 does nothing unless loss in ('dpo', 'pdpo')"),
    (['--loss=sft', '--ref_from=data/toy/base'], "ref_from='data/toy/base' does nothing unless loss not in ('sft', "),
    (['--loss=rm', '--beta=0.3'], "beta=0.3 does nothing unless loss not in ('sft', 'rm')"),
    (['--ref_update=hard', '--tr_alpha=0.5'], "tr_alpha=0.5 does nothing unless ref_update == 'soft'"),
    (['--ref_update=none', '--tr_tau=5'], "tr_tau=5 does nothing unless ref_update != 'none'"),
    (['--lora_alpha=8'], 'lora_alpha=8.0 does nothing unless lora_rank'),
    (['--loss=dpo', '--edistill_min=example'], "edistill_min='example' does nothing unless loss == 'edistill'"),
    (['--wandb_project=mine'], "wandb_project='mine' does nothing unless wandb_log"),
    (['--out_dir='], "out_dir='': names no folder"),
    (['--out_dir=  '], "out_dir='  ': names no folder"),
    ([f'--seed={2**64}'], f'seed={2**64}: need 0 <= seed < 2**64'),
    (['--seed=-1'], 'seed=-1: need 0 <= seed < 2**64'),
    (['--lora_rank=4', '--ref_from=data/toy/base'], "ref_from='data/toy/base': needs lora_rank=0"),
])
def test_a_setting_that_would_do_nothing_or_harm_is_refused(args, message):
    """Silently ignored before (label_smoothing with ipo), or failing late: ref_from with sft was an AttributeError,
    out_dir='' wrote a checkpoint into the working directory, a seed beyond 64 bits a late overflow."""
    with pytest.raises(SystemExit, match='^error: ' + re.escape(message)):
        train_tr.get_config(args)


def test_wandb_without_wandb_is_refused_before_any_work(monkeypatch):
    import data.settings
    monkeypatch.setattr(data.settings, 'importable', lambda module: module != 'wandb')  # as where it is not installed
    with pytest.raises(SystemExit, match=r'^error: wandb_log=True: needs `pip install wandb`$'):
        train_tr.get_config(['--wandb_log=True'])


def test_refused_inputs_leave_nothing_behind(tmp_path):
    """A reward model as the policy of a preference loss (it has no log-probs: loaded as a causal LM it got a random
    head, with only transformers' load report to hint at it) and a data folder whose train file is a link to
    nothing: one line, no out_dir."""
    proc, _ = run(tmp_path / 'rm', '--loss=rm', '--max_iters=1', '--eval_interval=1')
    data = tmp_path / 'data'
    data.mkdir()
    (data / 'train.jsonl').symlink_to(tmp_path / 'gone.jsonl')
    for args, message in [([f'--init_from={tmp_path / "rm"}'], f'error: init_from={tmp_path / "rm"} is a reward model'),
                          ([f'--data={data}'], f'error: {data / "train.jsonl"} is a broken link')]:
        proc, _ = run(tmp_path / 'out', *args, check=False)
        assert proc.returncode == 1 and last_error(proc).startswith(message), proc.stderr[-1000:]
        assert not (tmp_path / 'out').exists(), args


def test_a_refusal_under_torchrun_is_one_line(tmp_path):
    """Every rank stops at a refused setting; rank 0 alone says why (each rank printed it). torchrun itself, not the
    suite's fork server: what a user sees."""
    proc = torchrun('train_tr.py', f"--out_dir={tmp_path / 'out'}", '--beta=-1')
    assert proc.returncode != 0
    assert proc.stderr.count('error: beta=-1.0: need beta > 0') == 1, proc.stderr[-2000:]
    assert not (tmp_path / 'out').exists()


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / 'taken').write_text('not a folder')
    with pytest.raises(SystemExit, match='^error: cannot use out_dir=.*taken: '):
        train_tr.lock_out_dir(tmp_path / 'taken')


def test_model_folder_without_a_tokenizer(tmp_path):
    model = tmp_path / 'model'
    model.mkdir()
    for name in ('config.json', 'model.safetensors'):
        (model / name).write_bytes((TOY_SFT / name).read_bytes())
    proc, _ = run(tmp_path / 'out', f'--init_from={model}', check=False)
    assert last_error(proc).startswith(f'error: init_from={model} has no usable tokenizer')


SCRIPT = '''
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import train_tr
train_tr.setup_distributed('cpu')
try:
    loss = torch.tensor(float('nan') if dist.get_rank() == 1 else 0.25)
    train_tr.stop_if_not_finite(loss, torch.tensor(3.0), 7)  # the norm is already global, as clip_grad_norm_ gives it
except SystemExit as e:
    print(f'rank {{dist.get_rank()}}: {{e}}', flush=True)
dist.barrier()
dist.destroy_process_group()  # gloo can abort a process that exits with its group alive
'''


def test_a_non_finite_step_reports_the_global_norm_on_two_processes(tmp_path):
    """The norm was all-reduced again (reported as world × norm); a NaN on one rank stops both."""
    script = tmp_path / 'stop.py'
    script.write_text(SCRIPT.format(repo=str(REPO)))
    proc = torchrun(str(script))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):
        assert f'rank {rank}: error: iteration 7: loss nan, gradient norm 3;' in proc.stdout


def test_ctrl_c_is_one_line_naming_the_last_checkpoint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    proc = subprocess.Popen([sys.executable, 'train_tr.py', f'--out_dir={tmp_path}', *TINY, *SMALL,
                             '--max_iters=100000', '--eval_interval=2'], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / 'checkpoint.json').exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    saved = json.loads((tmp_path / 'checkpoint.json').read_text())['iter']
    assert proc.returncode == 1 and 'Traceback' not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: interrupted; the last checkpoint in {tmp_path}: iteration ') and saved >= 2
    pending = tmp_path / '.tmp_checkpoint/checkpoint.json'  # a save that Ctrl-C cut short: the next start finishes it
    saved = json.loads(pending.read_text())['iter'] if pending.exists() else saved
    proc, records = run(tmp_path, *TINY, *SMALL, '--max_iters=100000', '--eval_interval=2', '--resume=True',
                        f'--max_iters={saved + 1}')
    assert records[-1]['iter'] == saved + 1


# -----------------------------------------------------------------------------
# rows that would train on something else than they say
def test_an_empty_prompt_is_skipped_not_read_from_its_neighbour(tokenizer):
    """With a tokenizer that adds no BOS, an empty prompt has no ids: its response's first token was predicted from
    the previous row's last position (flat index −1), so its log-prob depended on the batch."""
    assert tokenizer('').input_ids == []
    assert data_pairs.encode_row({'prompt': '', 'chosen': ' a', 'rejected': ' b'}, tokenizer, 64, 32) == 'empty prompt'


def test_responses_identical_after_truncation_are_skipped(tokenizer):
    row = {'prompt': 'Q', 'chosen': ' a b c d e', 'rejected': ' a b c d f'}
    assert data_pairs.encode_row(row, tokenizer, 64, 32) != 'identical after truncation'
    assert data_pairs.encode_row(row, tokenizer, 4, 2) == 'identical after truncation'


def test_a_chat_template_that_raises_skips_the_row(tmp_path):
    """Llama-2's and Mistral's templates raise on roles that do not alternate: such a row is skipped and counted."""
    tok = AutoTokenizer.from_pretrained(REPO / 'data/tiny/base')
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    good = {'prompt': [{'role': 'user', 'content': 'hi'}], 'chosen': ' a', 'rejected': ' b'}
    bad = {'prompt': [{'role': 'user', 'content': 'hi'}, {'role': 'user', 'content': 'again'}], 'chosen': ' a',
           'rejected': ' b'}
    assert data_pairs.render_row(bad, tok) == 'chat template error'
    path = tmp_path / 'chat.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in (good, bad, good)))
    assert len(data_pairs.load_pairs(str(path), 'train', tok, 64, 32, verbose=False)) == 2


def test_a_corrupt_parquet_file_is_one_line(tmp_path):
    path = tmp_path / 'train.parquet'
    path.write_bytes(b'PAR1' + os.urandom(64) + b'PAR1')
    with pytest.raises(SystemExit, match=f'^error: {path} is not a readable parquet file'):
        data_pairs.read_rows(str(path), 'train')


@pytest.mark.parametrize('chosen, rejected', [(10 ** 400, 0), (1e308, -1e308)])
def test_huge_reward_labels_are_one_line(chosen, rejected):
    row = {'reward_chosen': [chosen], 'reward_rejected': [rejected]}
    with pytest.raises(SystemExit, match='^error: labels row 3 has a NaN or infinite reward'):
        data_pairs.reward_margins(row, 'labels', 2, None)


def test_foreign_lines_in_metrics_are_dropped_on_resume(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"iter": 1, "loss": 0.5}\n["not", "a", "record"]\n{"note": "by hand"}\n7\n{"iter": 2}\n')
    open_log(path, 1)
    assert path.read_text() == '{"iter": 1, "loss": 0.5}\n'


# -----------------------------------------------------------------------------
# inputs that would make a run silently wrong
def test_resume_refuses_other_data_at_the_same_path(tmp_path):
    """The saved run's pairs came from the data as it was; a resume on a changed file would train on other pairs."""
    data = tmp_path / 'data'
    data.mkdir()
    rows = (REPO / 'data/tiny/train.jsonl').read_text().splitlines(keepends=True)
    (data / 'train.jsonl').write_text(''.join(rows[:40]))
    args = ['--init_from=data/tiny/sft', f'--data={data}', '--batch_size=4', '--eval_interval=2', '--log_interval=1']
    run(tmp_path / 'out', *args, '--max_iters=2')
    (data / 'train.jsonl').write_text(''.join(rows[40:80]))
    proc, _ = run(tmp_path / 'out', *args, '--max_iters=4', '--resume=True', check=False)
    assert "data_fingerprint=" in last_error(proc) and 'saved' in last_error(proc)
    (data / 'train.jsonl').write_text(''.join(rows[:40]))  # the same bytes again: the run continues
    _, records = run(tmp_path / 'out', *args, '--max_iters=4', '--resume=True')
    assert records[-1]['iter'] == 4


def test_a_finished_run_resumed_to_fewer_steps_says_so(tmp_path):
    run(tmp_path, *TINY, *SMALL, '--max_iters=2')
    proc, _ = run(tmp_path, *TINY, *SMALL, '--max_iters=1', '--resume=True')
    assert 'note: the saved run is at iteration 2, max_iters=1: nothing to train' in proc.stdout


def test_max_length_beyond_the_models_positions(tmp_path):
    proc, _ = run(tmp_path / 'out', *TINY, '--max_length=4096', '--max_prompt_length=64', check=False)
    assert last_error(proc) == 'error: max_length=4096 is over the 512 positions of data/tiny/sft'
    assert not (tmp_path / 'out').exists()


def test_a_reference_with_another_vocabulary(tmp_path):
    proc, _ = run(tmp_path / 'out', *TINY, '--ref_from=data/toy/sft', check=False)
    assert last_error(proc).startswith('error: ref_from=data/toy/sft has another vocabulary than init_from')
