"""LoRA in train_tr.py (lora_rank > 0): one copy of the base weights with the policy's and the reference's adapters, the
trust-region update on the adapter matrices, the memory model against hand-counted bytes, the checkpoint (a merged HF
model and PEFT's adapter files, which transformers, PEFT and sample.py load), every loss with 1 and 2 processes, exact
resume, and loading under torchrun from rank 0 only.

The tiny model of conftest: hidden 32, MLP 64, 2 layers, vocabulary 512, tied embedding. Its parameters: embedding
512·32 = 16,384; per layer attention 4·32·32 = 4,096, MLP 3·32·64 = 6,144, two norms 64; final norm 32; in all
16,384 + 2·10,304 + 32 = 37,024. A rank-R adapter on a Linear d_in → d_out has R·(d_in + d_out) parameters: per layer
4·64R (q, k, v, o) + 2·96R (gate, up) + 96R (down) = 544R, so 4,352 at R = 4 over the two layers."""
import copy
import json
import math
import os
import shutil

import pytest
import torch
from conftest import REPO, SMALL, TINY, assert_records_close, final_state, run, run_script, torchrun

import train_tr

N_PARAMS, N_ADAPTER = 37_024, 4_352  # the tiny model's and its R = 4 adapters' parameter counts (module docstring)
TARGETS = ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
LORA = ['--lora_rank=4', '--lora_alpha=8']


def peft():
    """PEFT (a test-only package): where CI runs the tests (CI=true) it must be installed, elsewhere its tests skip."""
    if os.environ.get('CI') == 'true':
        import peft as module
        return module
    return pytest.importorskip('peft')


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, train_tr.LoRALinear)}


def randomize_adapters(model, seed=0):
    """Policy and reference adapters set to different random values (at initialization B = B_ref = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for p in (m.lora_A, m.lora_B, m.ref_A, m.ref_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def read_adapters(out_dir):
    from safetensors.torch import load_file
    return load_file(out_dir / 'adapter' / 'adapter_model.safetensors')


def reference_adapters(out_dir):
    return {k: v for k, v in final_state(out_dir)['adapters'].items() if k.endswith(('ref_A', 'ref_B'))}


def same_tensors(a, b, atol=0.0):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# -----------------------------------------------------------------------------
# the adapters, in this process
def test_adapters_start_at_the_base_and_select_policy_reference_or_none(tiny_model):
    ids = torch.randint(3, 500, (2, 10))
    with torch.no_grad():
        base_logits = tiny_model(input_ids=ids).logits
    train_tr.add_lora(tiny_model, 4, 8.0, reference=True)
    modules = lora_modules(tiny_model)
    assert sorted({name.rsplit('.', 1)[1] for name in modules}) == TARGETS and len(modules) == 14
    assert sorted(n for n, p in tiny_model.named_parameters() if p.requires_grad) == sorted(
        f'{name}.{ab}' for name in modules for ab in ('lora_A', 'lora_B'))  # embedding and head stay frozen
    assert tiny_model.lora_config['target_modules'] == TARGETS and tiny_model.lora_config['r'] == 4
    with torch.no_grad():
        assert torch.equal(tiny_model(input_ids=ids).logits, base_logits)  # B = 0: the policy starts at W
        randomize_adapters(tiny_model)
        q = modules['model.layers.0.self_attn.q_proj']
        x = torch.randn(3, 32)
        by_hand = {'policy': x @ q.base.weight.T + 2.0 * x @ q.lora_A.T @ q.lora_B.T,  # scale lora_alpha/R = 8/4
                   'reference': x @ q.base.weight.T + 2.0 * x @ q.ref_A.T @ q.ref_B.T, None: x @ q.base.weight.T}
        for adapters, expected in by_hand.items():
            train_tr.select_adapters(tiny_model, adapters)
            torch.testing.assert_close(q(x), expected, atol=1e-6, rtol=0)
        assert torch.equal(tiny_model(input_ids=ids).logits, base_logits)  # adapters off: the base, exactly
        train_tr.select_adapters(tiny_model, 'policy')
        assert not torch.allclose(tiny_model(input_ids=ids).logits, base_logits, atol=1e-3)


def test_reference_forward_is_the_same_model_with_its_adapters(tiny_model):
    """AdapterReference runs the policy's own model with the reference adapters (or none) and leaves the policy's
    selected: its log-probs equal those of a copy whose policy adapters are the reference's."""
    train_tr.add_lora(tiny_model, 4, 8.0, reference=True)
    randomize_adapters(tiny_model)
    as_policy = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for m in lora_modules(as_policy).values():
            m.lora_A.copy_(m.ref_A)
            m.lora_B.copy_(m.ref_B)
    args = (torch.randint(3, 500, (1, 9)), torch.arange(9)[None], None, torch.arange(4, 8), torch.randint(3, 500, (4,)))
    with torch.no_grad():
        reference = train_tr.AdapterReference(tiny_model, 'reference').response_outputs(*args)
        torch.testing.assert_close(reference, as_policy.response_outputs(*args), atol=0, rtol=0)
        assert {m.adapters for m in lora_modules(tiny_model).values()} == {'policy'}
        assert not torch.allclose(tiny_model.response_outputs(*args), reference)


@pytest.mark.parametrize('alpha', [0.3, 1.0])
def test_update_mixes_each_adapter_matrix(tiny_model, alpha):
    """A_ref ← αA + (1−α)A_ref and B_ref ← αB + (1−α)B_ref; the reference's weight delta is then
    α²BA + (1−α)²B_ref·A_ref + α(1−α)(B·A_ref + B_ref·A), which is the mix of the deltas αBA + (1−α)B_ref·A_ref minus
    α(1−α)(B − B_ref)(A − A_ref): not the mix of the products, unless α is 0 or 1 (hard: a copy)."""
    train_tr.add_lora(tiny_model, 4, 8.0, reference=True)
    randomize_adapters(tiny_model)
    before = {name: [p.detach().clone() for p in (m.lora_A, m.lora_B, m.ref_A, m.ref_B)]
              for name, m in lora_modules(tiny_model).items()}
    train_tr.update_reference(tiny_model, train_tr.AdapterReference(tiny_model, 'reference'), alpha)
    for name, m in lora_modules(tiny_model).items():
        a, b, a_ref, b_ref = before[name]
        assert torch.equal(m.lora_A, a) and torch.equal(m.lora_B, b)  # the policy is untouched
        torch.testing.assert_close(m.ref_A, alpha * a + (1 - alpha) * a_ref, atol=1e-7, rtol=0)
        torch.testing.assert_close(m.ref_B, alpha * b + (1 - alpha) * b_ref, atol=1e-7, rtol=0)
        delta = m.ref_B @ m.ref_A
        expanded = alpha ** 2 * b @ a + (1 - alpha) ** 2 * b_ref @ a_ref + alpha * (1 - alpha) * (b @ a_ref + b_ref @ a)
        torch.testing.assert_close(delta, expanded, atol=1e-6, rtol=0)
        gap = alpha * (1 - alpha) * (b - b_ref) @ (a - a_ref)
        torch.testing.assert_close(delta, alpha * b @ a + (1 - alpha) * b_ref @ a_ref - gap, atol=1e-6, rtol=0)
        if alpha == 1.0:
            assert torch.equal(m.ref_A, a) and torch.equal(m.ref_B, b)
        else:
            assert gap.abs().max() > 1e-3


@pytest.mark.parametrize('world', [1, 2])
def test_memory_estimate_hand_values(tiny_model, world):
    """Bytes per device (module docstring for the counts). Full fine-tuning: fp32 weights 4N, gradients 4N, AdamW's
    two moments 8N, a fp32 reference 4N. LoRA over a bf16 base: weights 2N + 4·N_adapter, gradients 4·N_adapter,
    optimizer 8·N_adapter, reference adapters 4·N_adapter. FSDP divides each by the world."""
    ref = copy.deepcopy(tiny_model)
    assert train_tr.memory_estimate(tiny_model, ref, world) == {
        'weights': 4 * N_PARAMS / world, 'gradients': 4 * N_PARAMS / world, 'optimizer': 8 * N_PARAMS / world,
        'reference': 4 * N_PARAMS / world}
    assert train_tr.memory_estimate(tiny_model, None, world)['reference'] == 0  # sft, rm
    lora = train_tr.add_lora(tiny_model.to(torch.bfloat16), 4, 8.0, reference=True)
    assert train_tr.memory_estimate(lora, train_tr.AdapterReference(lora, 'reference'), world) == {
        'weights': (2 * N_PARAMS + 4 * N_ADAPTER) / world, 'gradients': 4 * N_ADAPTER / world,
        'optimizer': 8 * N_ADAPTER / world, 'reference': 4 * N_ADAPTER / world}
    assert train_tr.memory_estimate(lora, train_tr.AdapterReference(lora, None), world)['reference'] == 0


def test_memory_estimate_is_what_a_step_allocates(tiny_model):
    """The gradients and AdamW state that one optimizer step of a LoRA model leaves are the estimate's bytes."""
    train_tr.add_lora(tiny_model, 4, 8.0, reference=False)
    trained = [p for p in tiny_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, fused=True)
    tiny_model(input_ids=torch.randint(3, 500, (2, 8))).logits.sum().backward()
    optimizer.step()
    estimate = train_tr.memory_estimate(tiny_model, None, 1)
    assert estimate['gradients'] == sum(p.grad.numel() * p.grad.element_size() for p in trained) == 4 * N_ADAPTER
    moments = [t for s in optimizer.state.values() for k, t in s.items() if k != 'step']
    assert estimate['optimizer'] == sum(t.numel() * t.element_size() for t in moments) == 8 * N_ADAPTER


def test_lora_settings_fail_clearly():
    for args, message in [(['--lora_rank=-1'], 'error: lora_rank=-1: need lora_rank >= 0'),
                          (['--lora_rank=4', '--lora_alpha=0'], 'error: lora_alpha=0.0: need lora_alpha > 0'),
                          (['--lora_rank=4', '--ref_from=base'], "error: ref_from='base': needs lora_rank=0")]:
        with pytest.raises(SystemExit) as info:
            train_tr.get_config(args)
        assert str(info.value).startswith(message)


# -----------------------------------------------------------------------------
# end-to-end runs (subprocesses, as in test_train.py)
def test_checkpoint_loads_in_peft_transformers_and_sample(tmp_path):
    """A LoRA TR-DPO run: out_dir's HF model is the merged policy (W + (alpha/R)·B·A, the rest of the base exactly)
    and out_dir/adapter holds PEFT's files, with the key names and settings PEFT 0.21 writes for the same targets;
    PEFT's model over the base and the merged model give the same logits; sample.py samples the checkpoint."""
    peft_module = peft()
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    out = tmp_path / 'out'
    _, records = run(out, *SMALL, *TINY, *LORA, '--tr_tau=2', '--lr=1e-2')
    assert records[0]['loss'] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference = base at step 1
    assert [r['ref_updates'] for r in records] == [0, 1, 1, 2]
    assert not (out / 'adapter_config.json').exists()  # beside the merged model, transformers would apply it again

    base, merged = load_file(REPO / 'data/tiny/sft/model.safetensors'), load_file(out / 'model.safetensors')
    adapters = read_adapters(out)
    config = json.loads((out / 'adapter' / 'adapter_config.json').read_text())
    for key in base:
        module = key.removesuffix('.weight')
        if f'base_model.model.{module}.lora_A.weight' in adapters:
            delta = 2.0 * adapters[f'base_model.model.{module}.lora_B.weight'] @ \
                adapters[f'base_model.model.{module}.lora_A.weight']
            assert delta.abs().max() > 0
            torch.testing.assert_close(merged[key], base[key] + delta, atol=0, rtol=0)
        else:
            assert torch.equal(merged[key], base[key])  # embedding and norms do not train

    # what PEFT itself writes for these targets
    policy = AutoModelForCausalLM.from_pretrained(REPO / 'data/tiny/sft')
    expected = peft_module.get_peft_model(policy, peft_module.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                         lora_dropout=0.0, task_type='CAUSAL_LM'))
    expected.save_pretrained(tmp_path / 'peft')
    assert set(adapters) == set(load_file(tmp_path / 'peft' / 'adapter_model.safetensors'))
    peft_config = json.loads((tmp_path / 'peft' / 'adapter_config.json').read_text())
    for key in ('peft_type', 'task_type', 'r', 'lora_alpha', 'lora_dropout', 'bias', 'fan_in_fan_out'):
        assert config[key] == peft_config[key], key
    assert sorted(peft_config['target_modules']) == config['target_modules'] == TARGETS

    ids = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        with_adapter = peft_module.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(REPO / 'data/tiny/sft'), out / 'adapter')(input_ids=ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(out)  # the merged model, float32, no adapter applied
        assert loaded.dtype == torch.float32 and not any('lora' in n for n, _ in loaded.named_parameters())
        merged = loaded(input_ids=ids).logits  # W + s·B·A against W·x + s·B·(A·x): float32 sums in another order
        torch.testing.assert_close(merged, with_adapter, atol=4e-6 * merged.abs().max().item(), rtol=0)
        base_logits = AutoModelForCausalLM.from_pretrained(REPO / 'data/tiny/sft')(input_ids=ids).logits
        assert not torch.allclose(base_logits, with_adapter, atol=1e-3)

    samples = tmp_path / 'samples.jsonl'
    proc = run_script(['sample.py', f'--init_from={out}', '--ref=data/tiny/sft', '--data=data/tiny', '--num_prompts=4',
                       '--max_new_tokens=16', '--device=cpu', f'--out={samples}'])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r['kl']) for r in rows)


def test_bf16_adapter_loads_on_the_base_as_it_trained(tmp_path):
    """A --dtype=bfloat16 run trains its adapters on the base rounded to bf16, and the merged model is that base plus
    the delta, in float32. PEFT users reproduce it by loading the base as it trained: in bf16, then .float() for the
    merged model's float32 logits (to float32 round-off), or kept in bf16 (to bf16 precision). The base in float32
    (not rounded) is another model: its logits differ by the rounding (0.03 here), which README says."""
    peft_module = peft()
    from transformers import AutoModelForCausalLM
    out = tmp_path / 'out'
    run(out, *SMALL, *TINY, *LORA, '--dtype=bfloat16', '--lr=1e-2', '--max_iters=6')
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))

    def with_adapter(base):
        return peft_module.PeftModel.from_pretrained(base, out / 'adapter')(input_ids=ids).logits.float()
    base = REPO / 'data/tiny/sft'
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        as_trained = with_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).float())
        in_bf16 = with_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16))
        unrounded = with_adapter(AutoModelForCausalLM.from_pretrained(base))
    scale = merged.abs().max().item()
    torch.testing.assert_close(as_trained, merged, atol=4e-6 * scale, rtol=0)  # as test_checkpoint_loads_in_peft...
    torch.testing.assert_close(in_bf16, merged, atol=2 * 2 ** -8 * scale, rtol=0)  # two bf16 ulps of the logits
    assert (unrounded - merged).abs().max() > 1e-3


def test_two_processes_match_one(tmp_path):
    """LoRA TR-DPO, the same global batch: 1 process with 2 micro-steps == 2 processes, losses and adapters."""
    args = [*SMALL, *TINY, *LORA, '--max_iters=3', '--tr_tau=2', '--tr_alpha=0.5', '--lr=1e-2']
    _, one = run(tmp_path / 'one', *args, '--grad_accum=2')
    _, two = run(tmp_path / 'two', *args, nproc=2)
    assert_records_close(one, two, ('loss', 'rewards/margins', 'logps/chosen', 'grad_norm'))
    same_tensors(read_adapters(tmp_path / 'one'), read_adapters(tmp_path / 'two'), atol=1e-5)
    one_ref, two_ref = (reference_adapters(tmp_path / d) for d in ('one', 'two'))
    assert len(one_ref) == 2 * 14
    same_tensors(one_ref, two_ref, atol=1e-5)


def test_resume_refuses_another_base(tmp_path):
    """A LoRA checkpoint holds the adapters, not the base: resumed after init_from's weights were replaced, they went
    on over the new ones. The base's fingerprint is part of the run's settings, and the resume is refused."""
    from test_train import one_line_error
    base = tmp_path / 'base'
    shutil.copytree(REPO / 'data/tiny/sft', base)
    args = [*SMALL, *LORA, f'--init_from={base}', '--data=data/tiny', '--max_iters=1']
    run(tmp_path / 'out', *args)
    shutil.copy(REPO / 'data/tiny/base/model.safetensors', base)  # the same architecture, other weights
    proc, _ = run(tmp_path / 'out', *args, '--max_iters=2', '--resume=True', check=False)
    message = one_line_error(proc)
    assert message.startswith('error: resume=True with other settings than the run saved in ')
    assert 'init_from_fingerprint=' in message


@pytest.mark.parametrize('nproc', [1, 2])
def test_resume_continues_exactly(tmp_path, nproc):
    """6 steps in one go == 3 steps, then resume=True for 3 more: the base rebuilt from init_from, the adapters read
    from state/ with the reference adapters and AdamW; identical losses and tensors."""
    args = [*SMALL, *TINY, *LORA, '--tr_tau=2', '--lr=1e-2']
    _, straight = run(tmp_path / 'straight', *args, '--max_iters=6', nproc=nproc)
    run(tmp_path / 'split', *args, '--max_iters=3', nproc=nproc)
    _, resumed = run(tmp_path / 'split', *args, '--max_iters=6', '--resume=True', nproc=nproc)
    assert [r['loss'] for r in resumed] == [r['loss'] for r in straight]
    same_tensors(read_adapters(tmp_path / 'straight'), read_adapters(tmp_path / 'split'))
    a, b = (final_state(tmp_path / d) for d in ('straight', 'split'))
    assert a['iter'] == b['iter'] == 6
    same_tensors(a['adapters'], b['adapters'])
    assert (tmp_path / 'straight/model.safetensors').read_bytes() == (tmp_path / 'split/model.safetensors').read_bytes()


def test_bf16_base_with_float32_adapters(tmp_path):
    """dtype=bfloat16: the base in bf16, the adapters and their AdamW state float32 (the estimate printed at the start
    says so: bf16 weights of the tiny model are 2 bytes each); 1 and 2 processes (FSDP's bf16 mixed precision over
    the mixed-dtype blocks) start at ln 2 and agree to bf16 precision."""
    args = [*SMALL, *TINY, *LORA, '--max_iters=2', '--dtype=bfloat16', '--lr=1e-2']
    proc, one = run(tmp_path / 'one', *args, '--grad_accum=2')
    _, two = run(tmp_path / 'two', *args, nproc=2)
    assert 'estimated memory per device: weights 0.00 GB' in proc.stdout
    for a, b in zip(one, two, strict=True):
        assert a['loss'] == pytest.approx(b['loss'], abs=0.01)
    assert one[0]['loss'] == pytest.approx(math.log(2), abs=1e-6)
    assert {v.dtype for v in read_adapters(tmp_path / 'one').values()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['sft', 'rm', 'kto', 'edistill'])
def test_each_kind_of_loss_two_processes_match_one(tmp_path, loss):
    """Each kind of loss with LoRA (no reference; a reward model; KTO's and e-DPO's forwards without gradient through
    the reference adapters; DPO above; IPO, d-DPO and p-DPO read the same Terms as DPO): 1 process (2 micro-steps) ==
    2 processes. A reward model trains its score head too, in float32, saved with the adapter as PEFT's
    modules_to_save, and PEFT's model gives the merged model's rewards."""
    from test_distill import write_labelled
    data = [f"--data={write_labelled(tmp_path / 'data', k=2)}"] if train_tr.LOSSES[loss].labels else []
    args = [*SMALL, *TINY, *LORA, *data, f'--loss={loss}', '--max_iters=3', '--tr_tau=2', '--lr=1e-2']
    _, one = run(tmp_path / 'one', *args, '--grad_accum=2')
    _, two = run(tmp_path / 'two', *args, nproc=2)
    assert_records_close(one, two, ('loss', 'grad_norm'))
    adapters = read_adapters(tmp_path / 'one')
    # 1e-4: at step 2 the gradient of A is proportional to the still tiny B, and AdamW divides it by its own size, so
    # the last bits that the two processes' sums order differently reach the weights (distill: 2e-5 on 1e-2 values)
    same_tensors(adapters, read_adapters(tmp_path / 'two'), atol=1e-4)
    if loss != 'rm':
        return
    from transformers import AutoModelForSequenceClassification
    assert adapters['base_model.model.score.weight'].dtype == torch.float32
    ids = torch.randint(3, 500, (2, 12))
    base = AutoModelForSequenceClassification.from_pretrained(REPO / 'data/tiny/sft', num_labels=1, pad_token_id=1)
    with torch.no_grad():
        rewards = peft().PeftModel.from_pretrained(base, tmp_path / 'one' / 'adapter')(input_ids=ids).logits
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / 'one')(input_ids=ids).logits
    torch.testing.assert_close(merged, rewards, atol=1e-5, rtol=0)


def test_torchrun_loads_weights_on_rank_0_only():
    """2-process gloo (tests/fsdp_load_check.py): rank 1 reads no weights, and every rank's shards and buffers are
    those of a plain load, for full fine-tuning (with a copy or ref_from as reference) and LoRA."""
    proc = torchrun('tests/fsdp_load_check.py')
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['world'] == 2
    assert [result[run]['reads'] for run in ('full', 'ref_from', 'lora')] == [[1, 0], [2, 0], [1, 0]]
    for run_result in (result['full'], result['ref_from'], result['lora']):
        assert run_result['policy_error'] == 0 and run_result['ref_error'] in (0, None)
        assert run_result['buffers'] > 0 and run_result['buffer_errors'] == [0, 0]  # RoPE's inv_freq, recomputed
