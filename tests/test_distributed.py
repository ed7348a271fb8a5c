"""The multi-GPU paths, checked on a CPU: the process group's settings (timeout, NCCL's GPU, TF32), fsdp=always (one
process sharded like any world), work done once instead of on every rank (fingerprints, checksums), refusals under
torchrun, the end of a process, and the memory of a save and of gradient accumulation with SmolLM2
(tests/memory_check.py, slow)."""
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SMALL, TINY, assert_same_weights, final_state, run, torchrun
from test_real_model import smollm2  # noqa: F401 (the fixture: SmolLM2's folder, built on first use)

import train_tr


def test_process_group_settings(monkeypatch):
    """Under torchrun on GPUs: NCCL with the run's timeout (NCCL's own is 10 minutes, less than rank 0 alone takes
    to write an 8B export) and the process's GPU as device_id; float32 matmuls in TF32 (every script resolves its
    device there)."""
    calls = []
    monkeypatch.setattr(train_tr.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(train_tr.dist, 'init_process_group', lambda backend, **kwargs: calls.append((backend, kwargs)))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: None)
    for key, value in {'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1'}.items():
        monkeypatch.setenv(key, value)
    precision = torch.get_float32_matmul_precision()
    try:
        assert train_tr.setup_distributed('cuda', timeout=90) == (1, 2, torch.device('cuda', 1))
        assert torch.get_float32_matmul_precision() == 'high'
    finally:
        torch.set_float32_matmul_precision(precision)
    train_tr.setup_distributed('cpu')
    assert calls == [('nccl', {'timeout': datetime.timedelta(minutes=90), 'device_id': torch.device('cuda', 1)}),
                     ('gloo', {'timeout': datetime.timedelta(minutes=train_tr.dist_timeout), 'device_id': None})]
    assert train_tr.dist_timeout == 60 and train_tr.get_config([])['dist_timeout'] == 60


@pytest.mark.parametrize('minutes, outcome', [(0.1, 'timed out'), (0.5, 'passed')])
def test_collectives_wait_dist_timeout(minutes, outcome):
    """2-process gloo: rank 1 reaches a barrier of the FSDP mesh's group 8 s late; rank 0 gives up after dist_timeout
    (6 s), or waits (30 s). With 0.6 s, rank 0 once stopped in CI before the barrier: setting up the group, which
    waits for rank 1 under the same timeout."""
    proc = torchrun('tests/dist_timeout_check.py', str(minutes))
    assert f'rank 0: {outcome}\n' in proc.stdout, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize('code', [None, 0, 3, 'error: refused'])
def test_exit_process_ends_as_system_exit_would(code):
    """train_tr.py ends through exit_process, without the interpreter's teardown in which a gloo worker thread aborted
    a completed 2-process run (tests/exit_check.py: 4 of 20 trials aborted with a plain exit, 0 of 20 with this): the
    same status, output and message as `raise SystemExit(code)`, atexit's handlers run (W&B's finish), output that
    sits in a buffer written."""
    def end(how):
        script = (f"import atexit; from data.settings import exit_process; atexit.register(print, 'atexit ran'); "
                  f"print('partial line', end=''); {how}({code!r})")
        proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=60)
        return proc.returncode, proc.stdout, proc.stderr
    message = isinstance(code, str)
    assert end('exit_process') == end('raise SystemExit') == (
        1 if message else code or 0, 'partial lineatexit ran\n', f'{code}\n' if message else '')


def test_fsdp_always_shards_a_world_of_one():
    """fsdp=always: one process runs what several do (FSDP2 on each layer and the root, DTensor parameters), so a
    one-GPU check reaches the collectives, the sharded reference update, DTensor clipping and sharded checkpoints."""
    train_tr.setup_distributed('cpu')
    try:
        for fsdp, sharded in (('auto', False), ('always', True)):
            cfg = train_tr.get_config(['--init_from=data/tiny/sft', '--data=data/tiny', f'--fsdp={fsdp}'])
            policy, ref, _ = train_tr.load_models(cfg, torch.device('cpu'), 1)
            for model in (policy, ref):
                assert isinstance(model, train_tr.FSDPModule) == sharded
                assert all(isinstance(p, train_tr.DTensor) == sharded for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_always_matches_the_unsharded_run_and_resumes_exactly(tmp_path):
    """TR-DPO in float32 on one process: sharded (fsdp=always) the losses are those of the unsharded run to 1e-5; a
    sharded run saved at step 2 and resumed ends where the straight sharded run does, bit for bit."""
    args = [*SMALL, *TINY, '--max_iters=4', '--tr_tau=2', '--dtype=float32']
    _, plain = run(tmp_path / 'plain', *args)
    _, sharded = run(tmp_path / 'sharded', *args, '--fsdp=always')
    for a, b in zip(plain, sharded, strict=True):
        for key in ('loss', 'rewards/margins', 'logps/chosen', 'grad_norm'):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=0), (key, a['iter'])
    run(tmp_path / 'split', *args, '--fsdp=always', '--max_iters=2')
    _, resumed = run(tmp_path / 'split', *args, '--fsdp=always', '--resume=True')
    assert [r['loss'] for r in resumed] == [r['loss'] for r in sharded]
    a, b = final_state(tmp_path / 'sharded'), final_state(tmp_path / 'split')
    assert_same_weights(a['policy'], b['policy'])
    assert_same_weights(a['ref'], b['ref'])


def test_fingerprints_and_checksums_are_computed_once(tmp_path):
    """A checkpoint of 1 process resumed by 2 (tests/once_check.py): the data's fingerprint is taken by rank 0 alone
    (every rank took it); the checkpoint is verified file by file once, the files split over the ranks (every rank
    verified every file); a save hashes each file once, by the rank that wrote it (model.safetensors as it is
    written): rank 0 its state/ file, state/.metadata and the export, rank 1 its state/ file. A damaged file found
    by either rank stops both in one line."""
    out = tmp_path / 'run'
    run(out, '--init_from=data/tiny/sft', '--data=data/tiny', '--batch_size=4', '--max_iters=2', '--eval_pairs=0')
    proc = torchrun('tests/once_check.py', str(out), '3', '--resume=True')
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [json.loads((tmp_path / f'run.counts.{rank}.json').read_text()) for rank in (0, 1)]
    assert len(json.loads((out / 'checkpoint.json').read_text())['sha256']) == 10  # state/: 2 files and .metadata
    assert counts == [{'start fingerprint': 1, 'verify sha256': 5, 'save sha256': 8},
                      {'verify sha256': 4, 'save sha256': 1}]  # verified: the 9 files of the 1-process checkpoint
    # a file that rank 1 verifies, damaged, stops both: rank 0 says so in one line, no rank adds a traceback
    listed = json.loads((out / 'checkpoint.json').read_text())['sha256']
    damaged = out / sorted(listed, key=lambda name: -(out / name).stat().st_size)[1]  # rank 1's first, as it splits
    data = damaged.read_bytes()
    damaged.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    proc = torchrun('train_tr.py', f'--out_dir={out}', '--init_from=data/tiny/sft', '--data=data/tiny',
                    '--batch_size=4', '--max_iters=4', '--eval_pairs=0', '--resume=True')
    errors = [line for line in proc.stderr.splitlines() if 'error:' in line]
    assert errors == [f'error: {damaged} is missing or changed since it was saved (its sha256 differs from '
                      f"{out / 'checkpoint.json'}); the checkpoint is damaged, not resumed"], proc.stderr[-3000:]
    assert proc.returncode != 0 and 'train_tr.py", line' not in proc.stderr


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """tests/gpu_check.sh on a CPU with the tiny model: every configuration it checks on a GPU runs and passes the
    checks that hold on a CPU (ln 2 at the start, finite and falling losses, the resume against the straight run),
    the others skipped, saying so; a failed check (lr=0: the loss does not fall) stops it with a non-zero status."""
    def dry_run(work, **settings):
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MODEL': 'data/tiny/sft', 'DATA': 'data/tiny', 'DEVICE': 'cpu',
               'STEPS': '4', 'LR': '1e-3', 'WORK': str(work), **settings}
        return subprocess.run(['bash', 'tests/gpu_check.sh'], cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=600)
    proc = dry_run(tmp_path / 'ok')
    assert proc.returncode == 0 and 'gpu_check: all passed' in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count('(MFU and CUDA memory not checked on a CPU)') == 7
    proc = dry_run(tmp_path / 'stuck', LR='0')
    assert proc.returncode != 0 and 'gpu_check FAILED: ' in proc.stderr and 'all passed' not in proc.stdout


@pytest.mark.slow
def test_save_and_accumulation_memory_smollm2(smollm2):
    """SmolLM2-135M, TR-DPO in float32, 2 processes (tests/memory_check.py). While saving, rank 0's peak RSS grows at
    most 0.6 GB more than rank 1's (it gathered the whole state: 2.0 GB more); with grad_accum=4 rank 1's peak is at
    most 0.1 GB over grad_accum=1's (micro-steps without a reduce-scatter kept every whole gradient: 0.26 GB more)."""
    import memory_check
    results = memory_check.main()
    (save0, save1), (peak1, peak4) = ([r['save_growth_gb'] for r in results[1]],
                                      [results[accum][1]['peak_gb'] for accum in (1, 4)])
    assert save0 - save1 <= 0.6 and peak4 - peak1 <= 0.1, results
