"""End-to-end runs of train_tr.py in subprocesses (1 process, and 2 processes under torchrun with gloo), on the toy
SFT model and pairs that data/toy ships (the defaults). Invariants from the papers' math, plus distributed agreement
and exact resume."""
import fcntl
import json
import math
from pathlib import Path

import pytest
from conftest import (REPO, SMALL, TINY, assert_records_close, assert_same_weights, final_state, run, run_script,
                      torchrun)


def test_dpo_starts_at_ln2_and_learns(tmp_path):
    _, records = run(tmp_path, *SMALL, *TINY, '--max_iters=12', '--ref_update=none')
    first = records[0]
    assert first['loss'] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert first['rewards/chosen'] == 0 and first['rewards/margins'] == 0
    assert sum(r['rewards/margins'] for r in records[-4:]) > 0  # the policy moved toward the chosen responses
    for key in ('rewards/rejected', 'rewards/accuracies', 'logps/chosen', 'logps/rejected', 'lr', 'grad_norm',
                'step_time', 'tokens_per_sec', 'peak_mem_gb', 'ref_updates'):
        assert key in first


def test_hard_update_every_step_keeps_dpo_at_ln2(tmp_path):
    _, records = run(tmp_path, *SMALL, '--ref_update=hard', '--tr_tau=1', '--lr=1e-2')
    assert [r['ref_updates'] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r['loss'] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]['logps/chosen'] != records[-1]['logps/chosen']  # yet the policy changes


def baseline_tokens(n_pairs):
    """The tokens of KTO's baseline at step 1 (SMALL): each prompt once with both responses of the next pair."""
    from transformers import AutoTokenizer

    from data import pairs as data_pairs
    pairs = data_pairs.load_pairs(str(REPO / 'data/toy'), 'train', AutoTokenizer.from_pretrained(REPO / 'data/toy/sft'),
                                  128, 64, verbose=False)
    step = [pairs[i] for i in data_pairs.step_pair_indices(len(pairs), 0, n_pairs, 1337)]
    rows = [data_pairs.truncate(p.prompt, [q.chosen, q.rejected], 128, 64) for p, q in zip(step, step[1:] + step[:1])]
    return sum(len(prompt) + sum(map(len, responses)) for prompt, responses in rows)


def test_ipo_and_kto_first_step_values(tmp_path):
    """Also tokens/s: KTO's step runs the loss's forwards of IPO's (the same pairs) and those of its baseline."""
    _, records = run(tmp_path / 'ipo', *SMALL, '--max_iters=1', '--loss=ipo', '--beta=0.2')
    assert records[0]['loss'] == pytest.approx(1 / (4 * 0.2 ** 2), rel=1e-6)  # (0 - 1/(2β))²
    ipo_tokens = records[0]['tokens_per_sec'] * records[0]['step_time']
    for nproc in (1, 2):  # with 2 processes z is averaged over ranks
        _, records = run(tmp_path / f'kto{nproc}', *SMALL, '--max_iters=1', '--loss=kto',
                         '--kto_undesirable_weight=1.5', nproc=nproc)
        assert records[0]['tokens_per_sec'] * records[0]['step_time'] == pytest.approx(ipo_tokens + baseline_tokens(4))
        assert records[0]['loss'] == pytest.approx((1.0 + 1.5) / 4, rel=1e-6)  # z = 0, σ(0) = 1/2 on both sides
        assert records[0]['kl'] == 0


def test_activation_checkpointing_and_bf16(tmp_path):
    args = [*SMALL, '--max_iters=3', '--ref_update=none']
    _, fp32 = run(tmp_path / 'fp32', *args)
    _, recomputed = run(tmp_path / 'ckpt', *args, '--grad_checkpoint=True')
    assert [r['loss'] for r in recomputed] == [r['loss'] for r in fp32]  # recomputation gives identical gradients
    _, bf16 = run(tmp_path / 'bf16', *args, '--dtype=bfloat16')
    assert bf16[0]['loss'] == pytest.approx(math.log(2), abs=1e-6)  # policy and reference round alike
    for a, b in zip(bf16, fp32, strict=True):
        assert a['loss'] == pytest.approx(b['loss'], abs=0.01)


def test_soft_with_alpha_zero_matches_no_update(tmp_path):
    _, soft = run(tmp_path / 'soft', *SMALL, '--ref_update=soft', '--tr_alpha=0.0', '--tr_tau=1')
    _, none = run(tmp_path / 'none', *SMALL, '--ref_update=none')
    varying = ('step_time', 'tokens_per_sec', 'peak_mem_gb', 'ref_updates')
    assert [{k: v for k, v in r.items() if k not in varying} for r in soft] \
        == [{k: v for k, v in r.items() if k not in varying} for r in none]
    assert_same_weights(final_state(tmp_path / 'soft')['ref'], final_state(tmp_path / 'none')['ref'])


@pytest.mark.parametrize('tau', [1, 3])
def test_soft_update_moves_reference_by_the_formula(tmp_path, tau):
    """The saved reference after τ steps equals α·policy + (1−α)·initial (one update, τ = 1 and τ = 3)."""
    _, records = run(tmp_path, *SMALL, f'--max_iters={tau}', '--tr_alpha=0.25', f'--tr_tau={tau}')
    assert records[-1]['ref_updates'] == 1
    state = final_state(tmp_path)
    from safetensors.torch import load_file
    initial = load_file(REPO / 'data/toy/sft/model.safetensors')
    expected = {k: 0.25 * state['policy'][k] + 0.75 * initial[k] for k in initial}
    assert_same_weights({k: state['ref'][k] for k in initial}, expected, atol=1e-6)  # lerp rounds differently by 1 ulp


def test_two_processes_match_one(tmp_path):
    """The same global batch gives the same losses and weights with 1 process (2 micro-steps) and 2 processes."""
    args = [*SMALL, '--max_iters=3', '--tr_tau=2']
    _, one = run(tmp_path / 'one', *args, '--grad_accum=2')
    _, two = run(tmp_path / 'two', *args, nproc=2)
    assert_records_close(one, two, ('loss', 'rewards/margins', 'logps/chosen', 'grad_norm'))
    one_state, two_state = final_state(tmp_path / 'one'), final_state(tmp_path / 'two')
    assert_same_weights(one_state['policy'], two_state['policy'], steps=3)
    assert_same_weights(one_state['ref'], two_state['ref'], steps=3)


def test_kto_baseline_is_one_value_per_step(tmp_path):
    """KTO's z comes from the whole global batch, so 1 process, 1 process with 2 micro-steps and 2 processes give the
    same z and losses. The reference is the random base model, so the SFT policy's log-ratios on mismatched pairs
    are large and z > 0 (against a copy of the policy it would be clamped to 0 and prove nothing)."""
    args = [*SMALL, '--max_iters=3', '--loss=kto', '--ref_from=data/toy/base', '--ref_update=none']
    _, one = run(tmp_path / 'one', *args)
    _, accum = run(tmp_path / 'accum', *args, '--grad_accum=2')
    _, two = run(tmp_path / 'two', *args, nproc=2)
    assert min(r['kl'] for r in one) > 10
    for other in (accum, two):
        assert_records_close(one, other, ('kl', 'loss', 'grad_norm'))


def test_soft_update_on_fsdp_shards_equals_formula():
    """2-process gloo: the communication-free update of local shards equals the formula on gathered parameters."""
    proc = torchrun('tests/fsdp_update_check.py')
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['world'] == 2 and result['sharded']
    assert result['max_err_alpha_0.3'] < 1e-6 and result['changed_alpha_0.3']
    assert result['max_err_alpha_1.0'] == 0.0


@pytest.mark.parametrize('nproc', [1, 2])
def test_resume_continues_exactly(tmp_path, nproc):
    """6 iterations in one go == 3 iterations, then resume=True for 3 more (weights, reference, optimizer, metrics)."""
    _, straight = run(tmp_path / 'straight', *SMALL, '--max_iters=6', '--tr_tau=2', nproc=nproc)
    run(tmp_path / 'split', *SMALL, '--max_iters=3', '--tr_tau=2', nproc=nproc)
    with open(tmp_path / 'split' / 'metrics.jsonl', 'a') as f:  # as if the run had gone on past its checkpoint
        f.write(json.dumps({'iter': 4, 'loss': 123.0}) + '\n{"iter": 5, "lo')  # and was killed mid-line
    _, resumed = run(tmp_path / 'split', *SMALL, '--max_iters=6', '--tr_tau=2', '--resume=True', nproc=nproc)
    assert [r['loss'] for r in resumed] == [r['loss'] for r in straight]  # the stale and the torn line are gone
    a, b = final_state(tmp_path / 'straight'), final_state(tmp_path / 'split')
    assert a['iter'] == b['iter'] == 6
    assert_same_weights(a['policy'], b['policy'])
    assert_same_weights(a['ref'], b['ref'])


def test_resume_on_another_number_of_processes(tmp_path):
    """Full state dicts make a run saved by 1 process resumable by 2 (same global batch, so the same run)."""
    _, straight = run(tmp_path / 'straight', *SMALL, '--max_iters=6', '--tr_tau=2')
    run(tmp_path / 'split', *SMALL, '--max_iters=3', '--tr_tau=2')
    _, resumed = run(tmp_path / 'split', *SMALL, '--max_iters=6', '--tr_tau=2', '--resume=True', nproc=2)
    assert_records_close(straight, resumed, ('loss', 'rewards/margins', 'grad_norm'))
    assert_same_weights(final_state(tmp_path / 'straight')['policy'], final_state(tmp_path / 'split')['policy'],
                        steps=6)


def test_checkpoint_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run(tmp_path, *SMALL)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.eos_token_id is not None
    assert_same_weights({k: v for k, v in model.state_dict().items()}, final_state(tmp_path)['policy'])
    assert not (tmp_path / '.tmp_checkpoint').exists()


def test_sft_trains_without_reference(tmp_path):
    _, records = run(tmp_path, *SMALL, '--loss=sft', '--max_iters=6', '--lr=1e-2', '--init_from=data/toy/base')
    assert records[-1]['loss'] < records[0]['loss']
    assert 'rewards/chosen' not in records[0]
    assert final_state(tmp_path)['ref'] is None


def one_line_error(proc):
    """The `error: ...` line a failed run ends with; it must be the only thing on stderr but progress bars."""
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if '%|' not in line and line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
    return lines[0]


def test_bad_data_and_bad_config_fail_clearly(tmp_path):
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"prompt": "x", "chosen": "", "rejected": "b"}\n{"prompt": 1, "chosen": "a", "rejected": "b"}\n'
                   'not json\n')
    proc, _ = run(tmp_path / 'o1', f'--data={bad}', check=False)
    assert str(bad) in one_line_error(proc) and 'no usable preference rows' in proc.stderr
    proc, _ = run(tmp_path / 'o2', '--no_such_key=1', check=False)
    assert "unknown config key 'no_such_key'" in one_line_error(proc)
    for args, message in [([str(bad)], f'error: {bad} is not a config file'),
                          (['--init_from=/no/such/model'], 'error: init_from=/no/such/model not found')]:
        proc, _ = run(tmp_path / 'o5', *args, check=False)
        assert one_line_error(proc).startswith(message)
    (tmp_path / 'empty').mkdir()
    proc, _ = run(tmp_path / 'o4', f"--data={tmp_path / 'empty'}", check=False)
    assert proc.returncode != 0 and 'no train.jsonl, train.json or train.parquet in' in proc.stderr
    proc, _ = run(tmp_path / 'o3', '--batch_size=3', nproc=2, check=False)  # every rank refuses, rank 0 says so
    errors = [line for line in proc.stderr.splitlines() if 'error:' in line]
    assert len(errors) == 1 and errors[0].startswith('error: batch_size=3 must be a multiple of'), proc.stderr[-3000:]
    assert proc.returncode != 0 and 'train_tr.py", line' not in proc.stderr  # torchrun's own report follows it


def test_some_bad_rows_are_skipped_and_counted(tmp_path):
    rows = [json.loads(line) for line in (REPO / 'data/tiny/train.jsonl').read_text().splitlines()[:8]]
    rows += [{'prompt': 'p', 'chosen': 'same', 'rejected': 'same'}, {'chosen': 'a', 'rejected': 'b'},
             {'prompt': 'p', 'chosen': ' half an emoji \ud83c', 'rejected': ' b'}]  # crashed the tokenizer
    data = tmp_path / 'mixed.jsonl'
    data.write_text('\n'.join(map(json.dumps, rows)) + '\n{broken\n')
    proc, records = run(tmp_path / 'out', *SMALL, '--max_iters=2', f'--data={data}')
    assert (f'{data}: 8 pairs (skipped 4 rows: 1 identical responses, 1 invalid Unicode, 1 missing key, '
            '1 not a JSON object)') in proc.stdout
    assert len(records) == 2  # two steps over all 8 pairs


def test_out_dir_holds_one_run_under_its_own_settings(tmp_path):
    """A fresh run into a saved run, a resume with other settings, and a second run at the same time are refused
    in one line before anything is written; a resume with only RESUMABLE settings changed continues."""
    out = tmp_path / 'run'
    run(out, *SMALL, '--max_iters=2')
    before = {f: f.read_bytes() for f in out.rglob('*') if f.is_file()}
    proc, _ = run(out, *SMALL, '--max_iters=2', '--loss=ipo', check=False)
    assert one_line_error(proc) == (
        f'error: {out} holds files of an earlier run (chat_template.jinja, checkpoint.json, config.json, '
        'generation_config.json, metrics.jsonl, model.safetensors, nanotr_config.json, state, tokenizer.json, '
        'tokenizer_config.json); continue it with --resume=True, use another out_dir, or delete them to start a new '
        'run there')
    proc, _ = run(out, *SMALL, '--max_iters=4', '--resume=True', '--beta=0.2', '--batch_size=8', check=False)
    message = one_line_error(proc)
    assert message.startswith(f'error: resume=True with other settings than the run saved in {out}/checkpoint.json: ')
    assert 'beta=0.1 saved, 0.2 now; batch_size=4 saved, 8 now.' in message
    with open(out / '.lock') as held:  # another run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        proc, _ = run(out, *SMALL, '--max_iters=4', '--resume=True', check=False)
    assert one_line_error(proc).startswith(f'error: another run is using {out}')
    assert {f: f.read_bytes() for f in out.rglob('*') if f.is_file()} == before  # nothing was touched
    _, records = run(out, *SMALL, '--max_iters=4', '--resume=True', '--log_interval=2', '--eval_pairs=4')
    assert [r['iter'] for r in records] == [1, 2, 4]


def test_non_finite_loss_stops_before_a_checkpoint(tmp_path):
    """lr=1e30 makes the weights huge after step 1 (saved, finite) and the gradient NaN at step 2."""
    proc, records = run(tmp_path, *SMALL, '--lr=1e30', '--warmup_iters=0', '--eval_interval=1', check=False)
    assert one_line_error(proc).startswith('error: iteration 2: loss ')
    assert 'stopped before the optimizer step' in proc.stderr
    assert [r['iter'] for r in records] == [1]
    state = final_state(tmp_path)
    assert state['iter'] == 1 and all(v.isfinite().all() for v in state['policy'].values())


@pytest.mark.slow
def test_default_run(tmp_path):
    """`python train_tr.py` with no arguments: TR-DPO on the toy from the shipped SFT model. Its samples score a higher
    gold reward than the SFT model's (sample.py and data/toy/gold.py, as data/toy/grid.py measures)."""
    import train_tr
    proc, records = run(tmp_path)
    evals = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines() if 'eval/loss' in line]
    assert records[-1]['iter'] == train_tr.max_iters == 50
    assert records[-1]['ref_updates'] == train_tr.max_iters // train_tr.tr_tau
    assert evals[-1]['eval/rewards/accuracies'] > 0.6 and evals[-1]['eval/loss'] < math.log(2)
    gold = {}
    for name, model in (('sft', 'data/toy/sft'), ('policy', tmp_path)):
        samples = tmp_path / f'{name}.jsonl'
        for script in (['sample.py', f'--init_from={model}', '--ref=data/toy/sft', '--num_samples=2', '--batch_size=64',
                        f'--out={samples}'], ['data/toy/gold.py', f'--files={samples}', f'--out={samples}.gold.json']):
            proc = run_script(script)
            assert proc.returncode == 0, proc.stderr[-2000:]
        gold[name] = json.loads(Path(f'{samples}.gold.json').read_text())['results'][0]
    assert gold['sft']['kl']['mean'] == 0.0 and gold['policy']['kl']['mean'] > 0.5  # 50 steps: about 0.8-1 nat
    assert gold['policy']['gold']['ci95'][0] > gold['sft']['gold']['ci95'][1]
