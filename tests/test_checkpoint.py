"""save_checkpoint is atomic file by file: an interrupted or failed save leaves the previous checkpoint loadable; its
HF export is what from_pretrained loads, bit for bit; the rules of out_dir (one run at a time, a fresh run only in a
folder without another run's files, resume only under the saved settings and from an unedited checkpoint.json, an
interrupted save committed only when it is of this run) and of a step that is not finite; snapshots whole or not at
all."""
import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import train_tr
from conftest import final_state
from data.files import open_log, seal

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path):
    """A 1-rank process group, a plain (unsharded) tiny model and optimizer, and a first checkpoint at iteration 1."""
    train_tr.setup_distributed('cpu')
    policy = train_tr.load_model(REPO / 'data/tiny/sft')
    optimizer = torch.optim.AdamW(policy.parameters())
    tokenizer = AutoTokenizer.from_pretrained(REPO / 'data/tiny/sft')
    cfg = train_tr.get_config([f'--out_dir={tmp_path}'])
    train_tr.save_checkpoint(tmp_path, policy, None, optimizer, tokenizer, 1, cfg)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)  # what the next save would write differs everywhere
    yield tmp_path, policy, optimizer, tokenizer, cfg
    torch.distributed.destroy_process_group()


def files(directory):  # every file of a checkpoint folder, but an interrupted save's and the lock
    return {str(f.relative_to(directory)): f.read_bytes() for f in directory.rglob('*')
            if f.is_file() and '.tmp_checkpoint' not in f.parts and f.name != '.lock'}


def saved_iter(out_dir):
    return json.loads((out_dir / 'checkpoint.json').read_text())['iter']


def resume(cfg, **changes):
    train_tr.open_out_dir({**cfg, 'resume': True, **changes}, master=True).close()


def test_failure_while_writing_leaves_previous_checkpoint(saved, monkeypatch):
    out_dir, policy, optimizer, tokenizer, cfg = saved
    before = files(out_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt('killed while writing the HF export')
    monkeypatch.setattr(train_tr, 'write_safetensors', crash)
    with pytest.raises(KeyboardInterrupt):
        train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 2, cfg)
    assert files(out_dir) == before and saved_iter(out_dir) == 1
    resume(cfg)  # the next start deletes the incomplete save
    assert not (out_dir / '.tmp_checkpoint').exists() and files(out_dir) == before


def test_failure_while_moving_leaves_every_file_whole(saved, monkeypatch):
    """Killed after the new weights were moved in but before the state/ files: the HF model is the new one, whole;
    state/ is the old one, whole; the next start finishes the move, and a later save completes and cleans up."""
    out_dir, policy, optimizer, tokenizer, cfg = saved
    real_replace = train_tr.os.replace

    def crash_on_state(src, dst):
        if Path(src).parent.name == 'state':
            raise KeyboardInterrupt('killed before state/ was moved')
        real_replace(src, dst)
    monkeypatch.setattr(train_tr.os, 'replace', crash_on_state)
    with pytest.raises(KeyboardInterrupt):
        train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 2, cfg)
    assert saved_iter(out_dir) == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    torch.testing.assert_close(reloaded.model.norm.weight, policy.model.norm.weight)
    monkeypatch.setattr(train_tr.os, 'replace', real_replace)
    with pytest.raises(SystemExit, match='changed since it was saved'):
        train_tr.check_checksums(out_dir)  # as it stands, out_dir mixes iterations 2 and 1: resume would refuse it
    resume(cfg)
    assert saved_iter(out_dir) == 2  # the next start finished the move
    train_tr.check_checksums(out_dir)
    train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 3, cfg)
    assert saved_iter(out_dir) == 3 and not (out_dir / '.tmp_checkpoint').exists()


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')


@pytest.mark.parametrize('where', ['state', 'export'])
def test_full_disk_is_one_line_naming_the_folder(saved, monkeypatch, where):
    """A full disk in a rank's state/ file (torch.distributed.checkpoint wraps it, with every rank's traceback) or in
    the HF export: one line with the error itself, the previous checkpoint untouched, no partial save left."""
    out_dir, policy, optimizer, tokenizer, cfg = saved
    before = files(out_dir)
    if where == 'state':
        monkeypatch.setattr(torch.distributed.checkpoint.filesystem, '_write_item', disk_full)
    else:
        monkeypatch.setattr('data.files.open', disk_full, raising=False)
    with pytest.raises(SystemExit) as info:
        train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 2, cfg)
    message = str(info.value)
    assert message == (f'error: could not write the checkpoint of iteration 2 to {out_dir / ".tmp_checkpoint"} '
                       f'(OSError: [Errno 28] No space left on device); the previous checkpoint in {out_dir} is intact')
    assert files(out_dir) == before and not (out_dir / '.tmp_checkpoint').exists()


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_files_are_readable_as_the_umask_allows(saved, umask, mode):
    """transformers writes model.safetensors with mode 0600, which other users (a shared group) cannot read."""
    out_dir, policy, optimizer, tokenizer, cfg = saved
    old = os.umask(umask)
    try:
        train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 2, cfg)
    finally:
        os.umask(old)
    for name in ('model.safetensors', 'state/__0_0.distcp', 'state/.metadata', 'config.json', 'checkpoint.json'):
        assert stat.S_IMODE((out_dir / name).stat().st_mode) == mode, name


def test_one_run_per_out_dir(tmp_path):
    first = train_tr.lock_out_dir(tmp_path / 'run')
    with pytest.raises(SystemExit, match=f'error: another run is using {tmp_path / "run"}'):
        train_tr.lock_out_dir(tmp_path / 'run')
    first.close()  # what the end of the process does, also after kill -9
    train_tr.lock_out_dir(tmp_path / 'run').close()


def write_manifest(path, **manifest):  # a checkpoint.json as save_checkpoint writes it
    path.write_text(json.dumps(seal(manifest)))


def test_resume_needs_the_saved_settings(tmp_path):
    cfg = train_tr.get_config([f'--out_dir={tmp_path}'])
    write_manifest(tmp_path / 'checkpoint.json', iter=5, config=cfg, sha256={})
    allowed = ['--max_iters=900', '--eval_interval=7', '--log_interval=1', '--eval_pairs=0', '--snapshots=True',
               '--device=cpu', '--dtype=float32', '--grad_accum=2', '--peak_flops=1e15', '--grad_checkpoint=True',
               '--fsdp=always', '--dist_timeout=5']
    train_tr.check_out_dir(train_tr.get_config([f'--out_dir={tmp_path}', '--resume=True', *allowed]))
    for changed in (['--beta=0.2'], ['--loss=ipo', '--batch_size=8'], ['--ref_update=hard'], ['--lr=1e-3'],
                    ['--seed=1'], ['--data=data/tiny']):
        with pytest.raises(SystemExit) as info:
            train_tr.check_out_dir(train_tr.get_config([f'--out_dir={tmp_path}', '--resume=True', *changed]))
        message = str(info.value)
        assert message.startswith(f'error: resume=True with other settings than the run saved in '
                                  f'{tmp_path / "checkpoint.json"}')
        for arg in changed:
            key, value = arg[2:].split('=')
            assert f'{key}={cfg[key]!r} saved, {train_tr.get_config([arg])[key]!r} now' in message
        assert 'may change only out_dir, resume, eval_interval, eval_pairs' in message and '\n' not in message


@pytest.mark.parametrize('name', ['checkpoint.json', 'state', 'state.pt', 'metrics.jsonl', 'model.safetensors',
                                  'config.json', 'tokenizer.json', 'adapter', 'iter_25', '.tmp_checkpoint'])
def test_a_fresh_run_refuses_an_earlier_runs_files(tmp_path, name):
    """A fresh run beside another run's files would leave them unmentioned beside its own (iter_* snapshots of the
    other run, say), or a later resume would continue the other run: anything a run writes is refused, by name. Other
    files (data/toy/grid.py's job.json and log.txt, written before its run starts) and the lock are fine."""
    cfg = train_tr.get_config([f'--out_dir={tmp_path}'])
    for other in ('job.json', 'log.txt', '.lock', 'notes.md'):
        (tmp_path / other).write_text('')
    train_tr.check_out_dir(cfg)
    (tmp_path / name).mkdir() if '.' not in name[1:] else (tmp_path / name).write_text('')
    with pytest.raises(SystemExit) as info:
        train_tr.check_out_dir(cfg)
    assert str(info.value) == (f'error: {tmp_path} holds files of an earlier run ({name}); continue it with '
                               '--resume=True, use another out_dir, or delete them to start a new run there')
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
    open_log(path, 2)({'iter': 3, 'loss': 0.25})
    assert path.read_text() == '{"iter": 1, "loss": 0.5}\n{"iter": 2, "loss": 0.4}\n{"iter": 3, "loss": 0.25}\n'
    open_log(path, None)  # a fresh run starts empty
    assert path.read_text() == ''


# -----------------------------------------------------------------------------
# the layout; a damaged, edited or foreign checkpoint
def test_the_policy_is_stored_once(saved):
    out_dir = saved[0]
    assert set(final_state(out_dir)) == {'ref', 'optimizer', 'iter', 'policy'}  # no policy copy in state/
    manifest = json.loads((out_dir / 'checkpoint.json').read_text())
    assert manifest['iter'] == 1 and set(manifest['sha256']) == {
        'model.safetensors', 'config.json', 'generation_config.json', 'nanotr_config.json', 'tokenizer.json',
        'tokenizer_config.json', 'chat_template.jinja', 'state/.metadata', 'state/__0_0.distcp'}
    assert all(digest == train_tr.sha256(out_dir / name) for name, digest in manifest['sha256'].items())


@pytest.mark.parametrize('tied', [True, False])
def test_the_export_is_what_save_pretrained_writes(tmp_path, tied):
    """The streamed export holds the tensors, names and dtypes of transformers' own save_pretrained (a tied head once,
    under the embedding's name), and from_pretrained loads it bit for bit."""
    train_tr.setup_distributed('cpu')
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, tie_word_embeddings=tied))
        model.save_pretrained(tmp_path / 'hf')
        train_tr.export_model(tmp_path / 'ours', model, AutoTokenizer.from_pretrained(REPO / 'data/tiny/sft'), {})
    finally:
        torch.distributed.destroy_process_group()
    from safetensors import safe_open
    with safe_open(tmp_path / 'hf/model.safetensors', 'pt') as hf, safe_open(tmp_path / 'ours/model.safetensors',
                                                                             'pt') as ours:
        assert sorted(ours.keys()) == sorted(hf.keys()) and ('lm_head.weight' in ours.keys()) != tied
        assert ours.metadata() == hf.metadata() == {'format': 'pt'}
        for key in hf.keys():
            assert torch.equal(ours.get_tensor(key), hf.get_tensor(key)), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / 'ours')
    assert reloaded.config.tie_word_embeddings == tied and reloaded.dtype == torch.float32
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / 'ours/config.json').read_text())['architectures'] == ['LlamaForCausalLM']


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'empty', 'delete'])
@pytest.mark.parametrize('name', ['model.safetensors', 'state/__0_0.distcp', 'state/.metadata'])
def test_a_damaged_checkpoint_is_not_resumed(saved, name, damage):
    out_dir, cfg = saved[0], saved[4]
    path = out_dir / name
    data = path.read_bytes()
    if damage == 'delete':
        path.unlink()
    else:
        path.write_bytes({'flip': data[:-100] + bytes([data[-100] ^ 1]) + data[-99:], 'truncate': data[:len(data) // 2],
                          'empty': b''}[damage])
    with pytest.raises(SystemExit, match=f'^error: {path} is missing or changed since it was saved'):
        resume(cfg)


@pytest.mark.parametrize('edit', ['not JSON', 'entry removed', 'iter changed', 'old format'])
def test_an_edited_checkpoint_json_is_not_resumed(saved, edit):
    """An entry removed left its file unchecked, another iteration resumed at another data position: checkpoint.json
    carries a digest of itself, and anything but what save_checkpoint wrote is refused in one line."""
    out_dir, cfg = saved[0], saved[4]
    path = out_dir / 'checkpoint.json'
    manifest = json.loads(path.read_text())
    if edit == 'entry removed':
        del manifest['sha256']['state/__0_0.distcp']
    elif edit == 'iter changed':
        manifest['iter'] = 7
    elif edit == 'old format':
        del manifest['digest']
    path.write_text('{"iter": 1, "sha256": ' if edit == 'not JSON' else json.dumps(manifest))
    before = files(out_dir)
    with pytest.raises(SystemExit) as info:
        resume(cfg)
    assert str(info.value).startswith(f'error: {path} is ' + ('missing or unreadable (JSONDecodeError)'
                                                              if edit == 'not JSON' else 'not as it was saved'))
    assert '\n' not in str(info.value) and files(out_dir) == before


def test_an_interrupted_save_of_another_run_is_not_committed(saved, monkeypatch, tmp_path):
    """A complete .tmp_checkpoint is committed at the next start (test_failure_while_moving_leaves_every_file_whole);
    one of another run (other settings) was committed over this run's checkpoint before the resume was refused. Now
    the resume is refused, touching nothing."""
    out_dir, policy, optimizer, tokenizer, cfg = saved
    other = {**cfg, 'beta': 0.5}
    monkeypatch.setattr(train_tr, 'commit_folder', lambda *args: None)  # as if killed before the move
    train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 9, other)
    monkeypatch.undo()
    before = files(out_dir)
    with pytest.raises(SystemExit, match=f"^error: resume=True with other settings than the run saved in "
                                         f"{out_dir / '.tmp_checkpoint/checkpoint.json'}: beta=0.5 saved, 0.1 now"):
        resume(cfg)
    assert files(out_dir) == before and (out_dir / '.tmp_checkpoint/checkpoint.json').is_file()
    with pytest.raises(SystemExit, match="saved in .*/checkpoint.json: beta=0.1 saved, 0.5 now"):
        resume(other)  # nor with the other run's settings: this run's checkpoint is not the other's to replace


def test_an_incomplete_save_is_discarded(saved):
    """A kill before checkpoint.json was written leaves a partial .tmp_checkpoint: it is deleted, the old one stays."""
    out_dir, cfg = saved[0], saved[4]
    (out_dir / '.tmp_checkpoint').mkdir()
    (out_dir / '.tmp_checkpoint' / 'model.safetensors').write_bytes(b'half')
    resume(cfg)
    assert not (out_dir / '.tmp_checkpoint').exists() and saved_iter(out_dir) == 1


def test_a_snapshot_that_does_not_fit_is_one_line(saved, monkeypatch):
    """iter_N is copied whole or not at all: a full disk half-way leaves no iter_N (nor its temporary copy), says so
    in one line, and the checkpoint stays whole."""
    out_dir = saved[0]
    assert train_tr.save_snapshot(out_dir, 1) is None and (out_dir / 'iter_1/model.safetensors').is_file()
    assert not {'state', 'checkpoint.json', '.lock', 'iter_1'} & {f.name for f in (out_dir / 'iter_1').iterdir()}
    copied, copyfile = [], shutil.copyfile

    def fills_up(src, dst, **kwargs):
        if copied:
            disk_full()
        copied.append(src)
        return copyfile(src, dst, **kwargs)
    monkeypatch.setattr(shutil, 'copyfile', fills_up)
    message = train_tr.save_snapshot(out_dir, 2)
    assert message == (f"error: could not write the snapshot {out_dir / 'iter_2'} ([Errno 28] No space left on "
                       f'device); the checkpoint of iteration 2 in {out_dir} is whole')
    assert len(copied) == 1 and sorted(f.name for f in out_dir.iterdir() if 'iter' in f.name) == ['iter_1']
    train_tr.check_checksums(out_dir)
