"""save_checkpoint is atomic file by file: an interrupted or failed save leaves the previous checkpoint loadable; the
rules of out_dir (one run at a time, resume only under the saved settings) and of a step that is not finite."""
import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_tr

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path):
    """A 1-rank process group, a plain (unsharded) tiny model and optimizer, and a first checkpoint at iteration 1."""
    train_tr.setup_distributed('cpu')
    policy = train_tr.load_model(REPO / 'data/tiny/sft')
    optimizer = torch.optim.AdamW(policy.parameters())
    tokenizer = AutoTokenizer.from_pretrained(REPO / 'data/tiny/sft')
    train_tr.save_checkpoint(tmp_path, policy, None, optimizer, tokenizer, 1, {'note': 'first'}, master=True)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)  # what the next save would write differs everywhere
    yield tmp_path, policy, optimizer, tokenizer
    torch.distributed.destroy_process_group()


def files(directory):
    return {f.name: f.read_bytes() for f in directory.iterdir() if f.is_file()}


def test_failure_while_writing_leaves_previous_checkpoint(saved, monkeypatch):
    out_dir, policy, optimizer, tokenizer = saved
    before = files(out_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt('killed while writing state.pt')
    monkeypatch.setattr(train_tr.torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 2, {}, master=True)
    assert files(out_dir) == before
    assert torch.load(out_dir / 'state.pt', weights_only=True)['iter'] == 1


def test_failure_while_moving_leaves_every_file_whole(saved, monkeypatch):
    """Killed after the new weights were moved in but before state.pt: the HF model is the new one, whole; state.pt
    is the old one, whole; a later save completes and cleans up."""
    out_dir, policy, optimizer, tokenizer = saved
    real_replace = train_tr.os.replace

    def crash_on_state(src, dst):
        if Path(src).name == 'state.pt':
            raise KeyboardInterrupt('killed before state.pt was moved')
        real_replace(src, dst)
    monkeypatch.setattr(train_tr.os, 'replace', crash_on_state)
    with pytest.raises(KeyboardInterrupt):
        train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 2, {}, master=True)
    assert torch.load(out_dir / 'state.pt', weights_only=True)['iter'] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    torch.testing.assert_close(reloaded.model.norm.weight, policy.model.norm.weight)
    monkeypatch.setattr(train_tr.os, 'replace', real_replace)
    with pytest.raises(SystemExit, match='changed since it was saved'):
        train_tr.check_checksums(out_dir)  # as it stands, out_dir mixes iterations 2 and 1: resume would refuse it
    train_tr.open_out_dir(train_tr.get_config([f'--out_dir={out_dir}', '--resume=True']), master=True).close()
    assert torch.load(out_dir / 'state.pt', weights_only=True)['iter'] == 2  # the next start finished the move
    train_tr.check_checksums(out_dir)
    train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 3, {}, master=True)
    assert torch.load(out_dir / 'state.pt', weights_only=True)['iter'] == 3
    assert not (out_dir / '.tmp_checkpoint').exists()


@pytest.mark.parametrize('error', [OSError(errno.ENOSPC, 'No space left on device'),
                                   RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 0 vs 64')],
                         ids=['oserror', 'torch.save'])
def test_full_disk_is_one_line_naming_the_folder(saved, monkeypatch, error):
    out_dir, policy, optimizer, tokenizer = saved
    before = files(out_dir)

    def full(*args, **kwargs):
        raise error
    monkeypatch.setattr(train_tr.torch, 'save', full)
    with pytest.raises(SystemExit) as info:
        train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 2, {}, master=True)
    message = str(info.value)
    assert message.startswith(f'error: could not write the checkpoint of iteration 2 to {out_dir / ".tmp_checkpoint"}')
    assert str(error) in message and 'previous checkpoint' in message and '\n' not in message
    assert files(out_dir) == before and not (out_dir / '.tmp_checkpoint').exists()


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_files_are_readable_as_the_umask_allows(saved, umask, mode):
    """transformers writes model.safetensors with mode 0600, which other users (a shared group) cannot read."""
    out_dir, policy, optimizer, tokenizer = saved
    old = os.umask(umask)
    try:
        train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 2, {}, master=True)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out_dir.iterdir()}
    assert modes['model.safetensors'] == modes['state.pt'] == modes['config.json'] == mode


def test_one_run_per_out_dir(tmp_path):
    first = train_tr.lock_out_dir(tmp_path / 'run')
    with pytest.raises(SystemExit, match=f'error: another run is using {tmp_path / "run"}'):
        train_tr.lock_out_dir(tmp_path / 'run')
    first.close()  # what the end of the process does, also after kill -9
    train_tr.lock_out_dir(tmp_path / 'run').close()


def test_resume_needs_the_saved_settings(tmp_path):
    cfg = train_tr.get_config([f'--out_dir={tmp_path}'])
    torch.save({'config': cfg, 'iter': 5}, tmp_path / 'state.pt')
    manifest = {'sha256': {'state.pt': train_tr.sha256(tmp_path / 'state.pt')}}  # what save_checkpoint writes last
    (tmp_path / 'checkpoint.json').write_text(json.dumps(manifest))
    allowed = ['--max_iters=900', '--eval_interval=7', '--log_interval=1', '--eval_pairs=0', '--snapshots=True',
               '--device=cpu', '--dtype=float32', '--grad_accum=2', '--peak_flops=1e15', '--grad_checkpoint=True']
    train_tr.check_out_dir(train_tr.get_config([f'--out_dir={tmp_path}', '--resume=True', *allowed]))
    for changed in (['--beta=0.2'], ['--loss=ipo', '--batch_size=8'], ['--ref_update=hard'], ['--lr=1e-3'],
                    ['--seed=1'], ['--data=data/tiny']):
        with pytest.raises(SystemExit) as info:
            train_tr.check_out_dir(train_tr.get_config([f'--out_dir={tmp_path}', '--resume=True', *changed]))
        message = str(info.value)
        assert message.startswith(f'error: resume=True with other settings than the run saved in {tmp_path}')
        for arg in changed:
            key, value = arg[2:].split('=')
            assert f'{key}={cfg[key]!r} saved, {train_tr.get_config([arg])[key]!r} now' in message
        assert 'may change only out_dir, resume, eval_interval, eval_pairs' in message and '\n' not in message


def test_fresh_run_into_a_saved_run_is_refused(tmp_path):
    """Otherwise a fresh run killed before its first save leaves the old state.pt, which a later resume=True
    would continue under the new settings."""
    cfg = train_tr.get_config([f'--out_dir={tmp_path}'])
    train_tr.check_out_dir(cfg)  # an empty (or new) out_dir is fine
    (tmp_path / 'state.pt').write_bytes(b'saved run')
    with pytest.raises(SystemExit, match=f'error: {tmp_path} holds a saved run .*--resume=True.*delete'):
        train_tr.check_out_dir(cfg)
    with pytest.raises(SystemExit, match='resume=True but .* does not exist'):
        train_tr.check_out_dir(train_tr.get_config([f'--out_dir={tmp_path / "new"}', '--resume=True']))


@pytest.mark.parametrize('loss, grad_norm', [(float('nan'), 1.0), (0.7, float('inf')), (float('inf'), 2.0)])
def test_non_finite_step_stops_the_run(saved, loss, grad_norm):
    with pytest.raises(SystemExit, match=f'error: iteration 3: loss {loss:.4g}, gradient norm {grad_norm:.4g}; '
                                         'stopped before the optimizer step'):
        train_tr.stop_if_not_finite(torch.tensor(loss), torch.tensor(grad_norm), 3)
    train_tr.stop_if_not_finite(torch.tensor(0.7), torch.tensor(1.0), 3)  # finite: nothing happens


def test_metrics_of_a_resumed_run_drop_a_torn_line(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"iter": 1, "loss": 0.5}\n{"iter": 2, "loss": 0.4}\n{"iter": 3, "loss": 0.3}\n{"iter": 4, "lo')
    with train_tr.open_metrics(path, 2) as f:
        f.write('{"iter": 3, "loss": 0.25}\n')
    assert path.read_text() == '{"iter": 1, "loss": 0.5}\n{"iter": 2, "loss": 0.4}\n{"iter": 3, "loss": 0.25}\n'
    train_tr.open_metrics(path, None).close()  # a fresh run starts empty
    assert path.read_text() == ''


# -----------------------------------------------------------------------------
# the policy stored once; a damaged or partial checkpoint
def test_the_policy_is_stored_once(saved):
    out_dir = saved[0]
    state = torch.load(out_dir / 'state.pt', weights_only=True)
    assert set(state) == {'ref', 'optimizer', 'iter', 'config'}  # no policy copy, no unused RNG state
    manifest = json.loads((out_dir / 'checkpoint.json').read_text())
    assert manifest['iter'] == 1 and set(manifest['sha256']) >= {'model.safetensors', 'state.pt', 'config.json'}
    assert manifest['sha256']['state.pt'] == train_tr.sha256(out_dir / 'state.pt')


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'empty', 'delete'])
@pytest.mark.parametrize('name', ['model.safetensors', 'state.pt'])
def test_a_damaged_checkpoint_is_not_resumed(saved, name, damage):
    out_dir = saved[0]
    cfg = train_tr.get_config([f'--out_dir={out_dir}'])
    path = out_dir / name
    data = path.read_bytes()
    if damage == 'delete':
        path.unlink()
    else:
        path.write_bytes({'flip': data[:-100] + bytes([data[-100] ^ 1]) + data[-99:], 'truncate': data[:len(data) // 2],
                          'empty': b''}[damage])
    with pytest.raises(SystemExit, match='^error: .*(damaged|changed since it was saved|does not exist)'):
        train_tr.open_out_dir({**cfg, 'resume': True}, master=True)


def test_an_incomplete_save_is_discarded(saved):
    """A kill before checkpoint.json was written leaves a partial .tmp_checkpoint: it is deleted, the old one stays."""
    out_dir = saved[0]
    cfg = train_tr.get_config([f'--out_dir={out_dir}'])
    (out_dir / '.tmp_checkpoint').mkdir()
    (out_dir / '.tmp_checkpoint' / 'model.safetensors').write_bytes(b'half')
    train_tr.open_out_dir({**cfg, 'resume': True}, master=True).close()
    assert not (out_dir / '.tmp_checkpoint').exists()
    assert torch.load(out_dir / 'state.pt', weights_only=True)['iter'] == 1
