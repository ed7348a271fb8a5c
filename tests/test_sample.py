"""sample.py on the tiny shipped models: determinism under a seed, left-padded batches, the log-probs behind the KL
estimate (exact ids, KL of a model against itself = 0), resuming, 2 processes writing what 1 process writes (with the
files read by rank 0 alone), and the models loaded in the compute dtype (SmolLM2 in bf16: the memory of two copies)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_script, torchrun
from transformers import AutoTokenizer

import sample
from data.pairs import load_pairs, tokenize_prompt
from test_real_model import smollm2  # noqa: F401  (a fixture: SmolLM2-135M-Instruct, built on first use)
from train_tr import load_model

REPO = Path(__file__).resolve().parents[1]
SFT, BASE = str(REPO / 'data/tiny/sft'), str(REPO / 'data/tiny/base')

pytestmark = pytest.mark.usefixtures('one_thread')


def run_sample(out, **overrides):
    """sample.sample() in this process (a 1-rank gloo group, closed afterwards); returns the rows written."""
    cfg = {**sample.defaults, **dict(init_from=SFT, data=str(REPO / 'data/tiny'), num_prompts=6, num_samples=2,
                                     batch_size=4, max_new_tokens=24, device='cpu', out=str(out)), **overrides}
    try:
        sample.sample(cfg)
    finally:
        dist.destroy_process_group()
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


def test_same_seed_same_samples_other_seed_other_samples(tmp_path):
    first, again = run_sample(tmp_path / 'a.jsonl'), run_sample(tmp_path / 'b.jsonl')
    other = run_sample(tmp_path / 'c.jsonl', seed=7)
    assert first == again
    assert [r['completion'] for r in first] != [r['completion'] for r in other]
    assert [(r['index'], r['sample']) for r in first] == [(i, j) for i in range(6) for j in range(2)]
    assert len({r['completion'] for r in first}) > 6  # the two samples of a prompt differ: temperature 1
    assert first[0]['model'] == SFT and first[0]['temperature'] == 1.0 and 'kl' not in first[0]


def test_left_padded_batch_equals_one_prompt_at_a_time(tokenizer):
    model = load_model(SFT).eval()
    pairs = load_pairs(REPO / 'data/tiny', 'test', tokenizer, 64, 64, need_rejected=False, verbose=False)
    ids = [pair.prompt.tolist() for pair in pairs[:6]]
    assert len(set(map(len, ids))) > 1  # the batch really is padded
    batched = sample.generate(model, ids, tokenizer.pad_token_id, tokenizer.eos_token_id, 40)
    alone = [sample.generate(model, [x], tokenizer.pad_token_id, tokenizer.eos_token_id, 40)[0] for x in ids]
    assert batched == alone
    for c in batched:  # cut right after the first EOS, or at max_new_tokens
        assert c.count(tokenizer.eos_token_id) <= 1 and (c[-1] == tokenizer.eos_token_id or len(c) == 40)


def test_kl_of_a_model_against_itself_is_zero_and_logps_are_exact(tmp_path):
    same = run_sample(tmp_path / 'self.jsonl', ref=SFT)
    assert all(r['kl'] == 0.0 and r['logp_policy'] == r['logp_ref'] < 0 for r in same)
    other = run_sample(tmp_path / 'base.jsonl', ref=BASE)
    assert [r['logp_policy'] for r in other] == [r['logp_policy'] for r in same]  # same samples, same π
    assert all(r['kl'] == pytest.approx(r['logp_policy'] - r['logp_ref']) for r in other)
    assert sum(r['kl'] for r in other) / len(other) > 1.0  # samples of the SFT model are unlikely under the base
    # logp_policy is log π of the very tokens generated: recompute greedy samples with a plain forward
    greedy = run_sample(tmp_path / 'greedy.jsonl', ref=BASE, temperature=0.0, num_samples=1)
    tokenizer, model = AutoTokenizer.from_pretrained(SFT), load_model(SFT).eval()
    for row in greedy:
        prompt = tokenize_prompt(tokenizer, row['prompt'])
        completion = sample.generate(model, [prompt], tokenizer.pad_token_id, tokenizer.eos_token_id, 24)[0]
        assert len(completion) == row['tokens']
        with torch.no_grad():
            logps = model(torch.tensor([prompt + completion])).logits[0, :-1].log_softmax(-1)
        expected = logps[len(prompt) - 1:].gather(-1, torch.tensor(completion)[:, None]).sum()
        assert row['logp_policy'] == pytest.approx(expected.item(), abs=1e-4)


def test_resume_continues_and_does_not_redo(tmp_path):
    out = tmp_path / 'samples.jsonl'
    full = run_sample(out)
    # as if killed: rank 0 had written 2 of its 3 batches (8 rows) and half a line of the third
    lines = out.read_text().splitlines(keepends=True)
    kept = [json.dumps(dict(json.loads(line), completion='KEPT')) + '\n' for line in lines[:8]]
    Path(f'{out}.part0').write_text(''.join(kept) + lines[8][:20])
    out.unlink()
    resumed = run_sample(out)
    assert [r['completion'] for r in resumed[:8]] == ['KEPT'] * 8  # continued, not redone
    assert resumed[8:] == full[8:]  # the missing batch is sampled exactly as in the full run
    assert not list(tmp_path.glob('*.part*'))
    assert run_sample(out) == resumed  # a finished file stays as it is
    with pytest.raises(SystemExit, match=f'^error: {out} was sampled with temperature=1.0, now 0.5; use another out= '
                       'or delete it$'):
        run_sample(out, temperature=0.5)
    with pytest.raises(SystemExit, match='was sampled with num_samples=2, now 1;'):  # other batches, other seeds
        run_sample(out, num_samples=1)


def test_bfloat16_samples_and_scores_in_bfloat16(tmp_path):
    """dtype=bfloat16 loads bf16 weights for generation and scoring: greedy completions of the tiny model are the
    float32 ones, their log-probs close to float32's but not equal to them. dtype=auto is float32 on a CPU, byte for
    byte."""
    settings = dict(ref=BASE, temperature=0.0, num_samples=1)
    fp32, bf16 = run_sample(tmp_path / 'fp32.jsonl', dtype='float32', **settings), run_sample(
        tmp_path / 'bf16.jsonl', dtype='bfloat16', **settings)
    assert [r['completion'] for r in bf16] == [r['completion'] for r in fp32] and bf16[0]['dtype'] == 'bfloat16'
    for key in 'logp_policy', 'kl':
        assert [r[key] for r in bf16] == pytest.approx([r[key] for r in fp32], abs=0.1)
        assert [r[key] for r in bf16] != [r[key] for r in fp32]
    run_sample(tmp_path / 'auto.jsonl', **settings)
    assert (tmp_path / 'auto.jsonl').read_bytes() == (tmp_path / 'fp32.jsonl').read_bytes()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_models_are_loaded_in_the_compute_dtype_without_gradients(tmp_path, dtype):
    """float32 weights with requires_grad=True, autocast over them: autocast cached a bf16 copy of every weight. The
    models are now read in the compute dtype, a tensor at a time, into exactly load_model's model (weights, RoPE
    buffers, generation config); a checkpoint in shards too, and one this reader does not know (float64) through
    load_model."""
    expected = load_model(SFT, dtype=dtype).eval()
    sharded = tmp_path / 'sharded'
    expected.save_pretrained(sharded, max_shard_size='100KB')
    assert (sharded / 'model.safetensors.index.json').is_file()
    foreign = tmp_path / 'foreign'  # float64 weights, which this reader leaves to from_pretrained
    shutil.copytree(SFT, foreign)
    from safetensors.torch import load_file, save_file
    weights = load_file(foreign / 'model.safetensors')
    save_file({k: v.double() for k, v in weights.items()}, foreign / 'model.safetensors', metadata={'format': 'pt'})
    for name in (SFT, sharded, foreign):
        model = sample.load_for_sampling(str(name), dtype, torch.device('cpu'))
        assert not model.training and all(p.dtype == dtype and not p.requires_grad for p in model.parameters())
        got, want = dict(model.named_buffers()) | model.state_dict(), dict(expected.named_buffers()) | \
            expected.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert model.generation_config.to_dict() == expected.generation_config.to_dict()


def test_sampling_smollm2_in_bf16_holds_about_its_two_bf16_models(tmp_path, smollm2):  # noqa: F811
    """The peak RSS of sample.py over its imports, SmolLM2-135M policy and reference in bf16 (two bf16 copies: 0.54
    GB): 1.59 GB when the float32 weights were autocast (autocast's bf16 copies beside them), 0.85 GB loaded by
    from_pretrained in bf16 (the float32 checkpoint read beside them), and a bf16 head fed the [B, 1, H] view of the
    last position expanded its weight once per row (+0.21 GB at B = 4); the goal is 0.80 GB."""
    # VmHWM, the peak RSS of this process's memory since exec: getrusage's ru_maxrss starts a child at its parent's
    # RSS when forked (Linux keeps the forked copy's high-water mark across exec), here the test process's
    script = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
import torch, sample
torch.set_num_threads(1)
def kib(key):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key + ':'))
before = kib('VmRSS')
sample.sample(dict(sample.defaults, init_from={str(smollm2)!r}, ref={str(smollm2)!r}, data={str(REPO / 'data/toy')!r},
                   num_prompts=4, max_new_tokens=8, dtype='bfloat16', device='cpu', out={str(tmp_path / 's.jsonl')!r}))
print(json.dumps((kib('VmHWM') - before) * 1024))
"""
    proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cost = json.loads(proc.stdout.splitlines()[-1]) / 2**30
    print(f'sample.py, SmolLM2-135M policy + reference in bf16: {cost:.2f} GB of peak RSS over its imports')
    assert cost <= 0.80


def test_an_older_sample_file_is_not_continued(tmp_path):
    """Rows without prompt_messages (sample.py before it wrote them) would mix two scoring rules in one file."""
    out = tmp_path / 'samples.jsonl'
    rows = run_sample(out)
    out.write_text(''.join(json.dumps({k: v for k, v in row.items() if k != 'prompt_messages'}) + '\n' for row in rows))
    with pytest.raises(SystemExit, match=f'^error: {out} was written by an older sample.py \\(its rows have no '
                                         'prompt_messages\\); use another out= or delete it$'):
        run_sample(out)


def test_resume_refuses_samples_of_other_files_at_the_same_paths(tmp_path):
    """A checkpoint retrained at the same path, another reference or changed data: the rows already in out= were
    sampled from other files, and continuing would mix the two runs' samples in one file."""
    model, ref, data = tmp_path / 'model', tmp_path / 'ref', tmp_path / 'data'
    shutil.copytree(SFT, model)
    shutil.copytree(BASE, ref)
    data.mkdir()
    shutil.copy(REPO / 'data/tiny/test.jsonl', data / 'test.jsonl')
    out = tmp_path / 'samples.jsonl'
    paths = dict(init_from=str(model), ref=str(ref), data=str(data))
    first = run_sample(out, **paths)
    assert run_sample(out, **paths) == first  # the same files: a finished file stays as it is
    from safetensors.torch import load_file, save_file
    weights = load_file(model / 'model.safetensors')
    retrained = {k: v + 0.01 for k, v in weights.items()}  # other weights under the same file names
    extra = json.dumps({'prompt': 'One more prompt.', 'chosen': ' Yes.'}) + '\n'
    for key, path, change in [('model', model / 'model.safetensors', lambda p: save_file(retrained, p)),
                              ('ref', ref / 'model.safetensors', lambda p: save_file(retrained, p)),
                              ('data', data / 'test.jsonl', lambda p: p.write_text(p.read_text() + extra))]:
        original = path.read_bytes()
        change(path)
        with pytest.raises(SystemExit, match=f"^error: {out} was sampled with {key}_fingerprint='[0-9a-f]{{16}}', now "
                           r"'[0-9a-f]{16}' \(its files changed\); use another out= or delete it$"):
            run_sample(out, **paths)
        path.write_bytes(original)
    assert out.read_text() == ''.join(json.dumps(row) + '\n' for row in first)  # refused before any change


def test_smaller_num_prompts_keeps_the_rows_already_sampled(tmp_path, capsys):
    out = tmp_path / 'samples.jsonl'
    six = run_sample(out)
    assert run_sample(out, num_prompts=3) == six  # the rows of prompts 3..5 stay
    assert 'wrote 12 samples of 6 prompts' in capsys.readouterr().out
    eight = run_sample(out, num_prompts=8)
    assert eight[:12] == six and [(r['index'], r['sample']) for r in eight[12:]] == [(6, 0), (6, 1), (7, 0), (7, 1)]
    assert eight == run_sample(tmp_path / 'fresh.jsonl', num_prompts=8)  # as if sampled in one run


def test_without_out_samples_are_printed_also_with_ref(capsys):
    """out='' prints; with ref= the scored batch once overwrote the rows to print (a TypeError after sampling)."""
    cfg = {**sample.defaults, **dict(init_from=SFT, ref=BASE, data=str(REPO / 'data/tiny'), num_prompts=3,
                                     max_new_tokens=8, device='cpu')}
    try:
        rows = sample.sample(cfg)
    finally:
        dist.destroy_process_group()
    printed = capsys.readouterr().out
    assert [r['index'] for r in rows] == [0, 1, 2] and all('kl' in r for r in rows)
    assert all(r['prompt'] in printed and r['completion'] in printed for r in rows)


@pytest.mark.parametrize('setting, message', [
    (dict(batch_size=0), 'batch_size=0: need batch_size >= 1'),
    (dict(max_new_tokens=0), 'max_new_tokens=0: need max_new_tokens >= 1'),
    (dict(temperature=-0.5), 'temperature=-0.5: need temperature >= 0'),
    (dict(top_p=0.0), r'top_p=0.0: need 0 < top_p <= 1'),
    (dict(top_p=1.5), r'top_p=1.5: need 0 < top_p <= 1'),
    (dict(top_p=float('nan')), 'top_p must be finite, got nan'),
    (dict(num_prompts=-1), 'num_prompts=-1: need num_prompts >= 0'),
    (dict(num_samples=0), 'num_samples=0: need num_samples >= 1'),
    (dict(max_prompt_length=0), 'max_prompt_length=0: need max_prompt_length >= 1'),
    (dict(seed=2**64), f'seed={2**64}: need 0 <= seed < 2\\*\\*64'),
    (dict(device='gpu'), "device='gpu': need device in \\('auto', 'cpu', 'cuda'\\)"),
    (dict(dtype='float16'), "dtype='float16': need dtype in \\('auto', 'float32', 'bfloat16'\\)"),
    (dict(out='samples'), "out='.*samples': is a folder; give a file path"),
])
def test_settings_are_checked_before_any_work(tmp_path, setting, message):
    (tmp_path / 'samples').mkdir()
    cfg = {**sample.defaults, 'init_from': str(tmp_path / 'missing'), **setting}
    cfg['out'] = str(tmp_path / cfg['out']) if cfg['out'] else ''
    with pytest.raises(SystemExit, match=f'^error: {message}$'):
        sample.sample(cfg)
    assert not dist.is_initialized()  # stopped before the process group, the models and the data


def test_ref_with_another_tokenizer_is_refused(tmp_path):
    """The toy's tokenizer (384 tokens) is not the tiny one (512): logp_ref of the sampled ids would be a meaningless
    KL of about 70 nats."""
    toy = str(REPO / 'data/toy/sft')
    with pytest.raises(SystemExit, match=f'^error: ref={re.escape(toy)} has another vocabulary than init_from: its '
                                         'log-probs of the same token ids would be those of other text'):
        run_sample(tmp_path / 'samples.jsonl', ref=toy)
    assert not list(tmp_path.iterdir())  # refused before the lock and the folder it would make
    with pytest.raises(SystemExit, match='^error: init_from=.*missing not found'):
        run_sample(tmp_path / 'samples.jsonl', init_from=str(tmp_path / 'no/such/missing'))


def test_a_checkpoint_without_a_tokenizer_is_one_line(tmp_path):
    """sample.py read the tokenizer with AutoTokenizer itself: a checkpoint without one was a traceback."""
    model = tmp_path / 'model'
    shutil.copytree(SFT, model, ignore=shutil.ignore_patterns('tokenizer*', 'chat_template.jinja'))
    with pytest.raises(SystemExit, match=f'^error: init_from={re.escape(str(model))} has no usable tokenizer'):
        run_sample(tmp_path / 'samples.jsonl', init_from=str(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']


def test_outputs_of_readme_commands_are_ignored_by_git():
    """The README's commands write samples/, judge_cache.jsonl and out*/ into the checkout."""
    if shutil.which('git') is None or subprocess.run(['git', 'rev-parse'], cwd=REPO, capture_output=True).returncode:
        pytest.skip('not a git checkout')
    commands = re.findall(r'```bash\n(.*?)```', (REPO / 'README.md').read_text(), re.S)
    outputs = {m for block in commands for m in re.findall(r'--out(?:_dir)?=(\S+)', block)}
    assert {'samples/tr.jsonl', 'out/labels'} <= outputs
    paths = sorted(outputs | {'judge_cache.jsonl', 'samples/tr_vs_sft.verdicts.jsonl'})
    proc = subprocess.run(['git', 'check-ignore', '--no-index', *paths], cwd=REPO, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == paths


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tmp_path):
    args = [f'--init_from={SFT}', f'--ref={BASE}', '--num_prompts=10', '--num_samples=2', '--batch_size=3',
            '--max_new_tokens=24']
    for nproc in (1, 2):
        proc = run_script(['sample.py', *args, f'--out={tmp_path}/{nproc}.jsonl'], nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f'wrote 20 samples of 10 prompts to {tmp_path}/{nproc}.jsonl' in proc.stdout
    one, two = (tmp_path / '1.jsonl').read_text(), (tmp_path / '2.jsonl').read_text()
    assert one == two and len(one.splitlines()) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ['1.jsonl', '2.jsonl']  # part files merged and removed


@pytest.mark.slow
def test_rank_0_alone_reads_the_files_every_rank_needs(tmp_path):
    """Every rank fingerprinted the model files (8 ranks x 16 GB of reading at 8B) and read the earlier rows: rank 0
    does, and sends the others what it found."""
    out = tmp_path / 'samples.jsonl'
    driver = tmp_path / 'driver.py'
    driver.write_text(f"""
import json, os, sys
sys.path.insert(0, {str(REPO)!r})
import sample
calls = []
for name in ('fingerprint', 'read_jsonl'):
    real = getattr(sample, name)
    setattr(sample, name, lambda *args, real=real, name=name, **kwargs: calls.append(name) or real(*args, **kwargs))
sample.sample(dict(sample.defaults, init_from={SFT!r}, ref={BASE!r}, data={str(REPO / 'data/tiny')!r}, num_prompts=4,
                   max_new_tokens=8, batch_size=2, device='cpu', out={str(out)!r}))
with open(f"{{sys.argv[1]}}.{{os.environ['RANK']}}", 'w') as f:
    json.dump(calls, f)
""")
    for run in ('first', 'again'):  # again: the rows of the first run are read, and found complete
        proc = torchrun(str(driver), str(tmp_path / run))
        assert proc.returncode == 0, proc.stderr[-3000:]
        calls = [json.loads((tmp_path / f'{run}.{rank}').read_text()) for rank in (0, 1)]
        assert calls[0].count('fingerprint') == 3 and 'fingerprint' not in calls[1]
        assert 'read_jsonl' in calls[0] and 'read_jsonl' not in calls[1]
    assert len(out.read_text().splitlines()) == 4
