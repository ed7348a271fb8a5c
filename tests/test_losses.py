"""Losses, sequence log-probs and the reference update of train_tr.py, against values derived by hand.

Notation (as in train_tr.py): ρ(y) = logπ_θ(y) − logπ_ref(y), σ the logistic function, log σ(x) = −log(1 + e^−x).
Every expected number below is worked out in the docstring/comment with plain `math`, never read from the code."""
import copy
import math

import pytest
import torch

import train_tr
from data import pairs as data_pairs
from conftest import padded_logps, pair_loss, plain_logps
from train_tr import update_reference


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def close(actual, expected, tol=1e-12):
    actual = actual.tolist() if isinstance(actual, torch.Tensor) else actual
    assert actual == pytest.approx(expected, abs=tol, rel=0)


# -----------------------------------------------------------------------------
# DPO
def test_dpo_hand_values():
    """β = 0.5.
    pair 1: policy (−1, −3), ref (−2, −2): ρw = 1, ρl = −1, z = β(ρw−ρl) = 0.5·2 = 1     loss = −log σ(1) = log(1+e^−1)
    pair 2: policy (−5, −4), ref (−4, −6): ρw = −1, ρl = 2, z = 0.5·(−3) = −1.5          loss = log(1+e^1.5)
    pair 3: policy (−7, −7), ref (−7, −7): z = 0                                          loss = log 2"""
    loss = pair_loss('dpo', t(-1, -5, -7), t(-3, -4, -7), t(-2, -4, -7), t(-2, -6, -7), beta=0.5)
    close(loss, [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1.5)), math.log(2)])
    close(loss[0], 0.31326168751822286)  # log(1 + e^-1) written out


def test_dpo_label_smoothing_hand_value():
    """cDPO, ε = 0.2, z = 1 (pair 1 above): −(1−ε)·log σ(1) − ε·log σ(−1) = 0.8·log(1+e^−1) + 0.2·log(1+e^1);
    pair 2, z = −1.5: 0.8·log(1+e^1.5) + 0.2·log(1+e^−1.5)."""
    loss = pair_loss('dpo', t(-1, -5), t(-3, -4), t(-2, -4), t(-2, -6), beta=0.5, label_smoothing=0.2)
    close(loss, [0.8 * math.log(1 + math.e ** -1) + 0.2 * math.log(1 + math.e),
                 0.8 * math.log(1 + math.exp(1.5)) + 0.2 * math.log(1 + math.exp(-1.5))])


def test_dpo_label_smoothing_zero_is_plain_dpo():
    args = (t(-1, -5, -2.5), t(-3, -4, -9), t(-2, -4, -3), t(-2, -6, -8))
    assert torch.equal(pair_loss('dpo', *args, beta=0.3, label_smoothing=0.0),
                       pair_loss('dpo', *args, beta=0.3))
    # and ε changes it whenever z != 0
    assert not torch.allclose(pair_loss('dpo', *args, beta=0.3, label_smoothing=0.1),
                              pair_loss('dpo', *args, beta=0.3))


@pytest.mark.parametrize('beta', [0.01, 0.1, 0.5, 3.0])
@pytest.mark.parametrize('label_smoothing', [0.0, 0.25])
def test_dpo_is_ln2_when_policy_equals_reference(beta, label_smoothing):
    """ρw = ρl = 0 ⇒ z = 0 ⇒ −(1−ε)·log σ(0) − ε·log σ(0) = log 2 for every β and ε."""
    logps_w, logps_l = t(-3.5, -10.0), t(-7.25, -1.0)
    loss = pair_loss('dpo', logps_w, logps_l, logps_w.clone(), logps_l.clone(), beta=beta,
                     label_smoothing=label_smoothing)
    close(loss, [math.log(2)] * 2)


def test_dpo_gradient_signs_and_values():
    """d/dπw of −log σ(β(ρw−ρl)) = −β·(1 − σ(z)) < 0 and d/dπl = +β·(1 − σ(z)) > 0.
    Pair 1 above: β = 0.5, z = 1: ∓0.5·(1 − σ(1)) = ∓0.5·0.2689414213699951."""
    policy_chosen, policy_rejected = t(-1, -5).requires_grad_(), t(-3, -4).requires_grad_()
    pair_loss('dpo', policy_chosen, policy_rejected, t(-2, -4), t(-2, -6), beta=0.5).sum().backward()
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()
    close(policy_chosen.grad, [-0.5 * (1 - sigmoid(1)), -0.5 * (1 - sigmoid(-1.5))])
    close(policy_rejected.grad, [0.5 * (1 - sigmoid(1)), 0.5 * (1 - sigmoid(-1.5))])
    close(policy_chosen.grad[0], -0.5 * 0.2689414213699951)


# -----------------------------------------------------------------------------
# IPO
def test_ipo_normalized_hand_value():
    """β = 0.25, so 1/(2β) = 2.
    policy (−4, −9), ref (−6, −6): ρw = 2 over 4 tokens → 0.5; ρl = −3 over 3 tokens → −1; h = 1.5.
    loss = (1.5 − 2)² = 0.25."""
    loss = pair_loss('ipo', t(-4), t(-9), t(-6), t(-6), beta=0.25, chosen_tokens=t(4), rejected_tokens=t(3),
                     ipo_normalize=True)
    close(loss, [0.25])


def test_ipo_summed_hand_value():
    """Same pair, summed log-ratios: h = 2 − (−3) = 5, loss = (5 − 2)² = 9 (token counts ignored)."""
    loss = pair_loss('ipo', t(-4), t(-9), t(-6), t(-6), beta=0.25, chosen_tokens=t(4), rejected_tokens=t(3),
                     ipo_normalize=False)
    close(loss, [9.0])


@pytest.mark.parametrize('ipo_normalize', [True, False])
@pytest.mark.parametrize('beta', [0.1, 0.25, 2.0])
def test_ipo_is_one_over_four_beta_squared_when_policy_equals_reference(beta, ipo_normalize):
    """h = 0 ⇒ (0 − 1/(2β))² = 1/(4β²): 25 for β = 0.1, 4 for β = 0.25, 1/16 for β = 2."""
    logps_w, logps_l = t(-3.0, -12.0), t(-8.0, -2.5)
    loss = pair_loss('ipo', logps_w, logps_l, logps_w.clone(), logps_l.clone(), beta=beta,
                     chosen_tokens=t(3, 7), rejected_tokens=t(5, 2), ipo_normalize=ipo_normalize)
    close(loss, [1 / (4 * beta ** 2)] * 2, tol=1e-9)
    close(1 / (4 * beta ** 2), {0.1: 25.0, 0.25: 4.0, 2.0: 0.0625}[beta], tol=1e-9)


# -----------------------------------------------------------------------------
# KTO
def test_kto_hand_value():
    """β = 0.5, z = 0.3, λ_D = 1.0, λ_U = 1.5; policy (−1, −3), ref (−2, −2): ρw = 1, ρl = −1.
    desirable   = 1.0·(1 − σ(0.5·(1 − 0.3)))   = 1 − σ(0.35)
    undesirable = 1.5·(1 − σ(0.5·(0.3 − (−1)))) = 1.5·(1 − σ(0.65))
    loss = (desirable + undesirable)/2"""
    expected = ((1 - sigmoid(0.35)) + 1.5 * (1 - sigmoid(0.65))) / 2
    for z in (0.3, torch.tensor(0.3, dtype=torch.float64)):
        loss = pair_loss('kto', t(-1), t(-3), t(-2), t(-2), beta=0.5, kto_z=z, kto_desirable_weight=1.0,
                         kto_undesirable_weight=1.5)
        close(loss, [expected])
    # σ(0.35) = 0.5866176, σ(0.65) = 0.6570105: (0.4133824 + 1.5·0.3429895)/2 = (0.4133824 + 0.5144843)/2
    close(expected, 0.4639334, tol=1e-7)


def test_kto_at_reference_with_zero_baseline():
    """ρw = ρl = z = 0 ⇒ each term is λ·(1 − σ(0)) = λ/2 ⇒ loss = (λ_D + λ_U)/4 = (1.0 + 1.5)/4 = 0.625."""
    logps_w, logps_l = t(-4.0, -1.5), t(-6.0, -2.0)
    loss = pair_loss('kto', logps_w, logps_l, logps_w.clone(), logps_l.clone(), beta=0.1, kto_z=0.0,
                     kto_desirable_weight=1.0, kto_undesirable_weight=1.5)
    close(loss, [0.625, 0.625])


def test_unknown_loss_raises():
    with pytest.raises(SystemExit, match='simpo'):
        train_tr.get_config(['--loss=simpo'])


# -----------------------------------------------------------------------------
# sequence log-probs: the shared-prompt layout against plain forwards, on tiny random models
PROMPTS = [[5, 6, 7], [8, 9], [30, 31, 32, 33, 34, 35, 36]]
CHOSEN = [[100, 101, 102, 103], [110, 111], [120]]
REJECTED = [[200, 201], [210, 211, 212, 213, 214, 215, 216], [220, 221, 222]]


def shared_batch(chosen=CHOSEN, pad_id=1):
    rows = [(torch.tensor(p), [torch.tensor(c), torch.tensor(r)]) for p, c, r in zip(PROMPTS, chosen, REJECTED)]
    return data_pairs.layout(rows, pad_id)


def test_layout_hand_example(monkeypatch):
    """Rows are 3+4+2 = 9, 2+2+7 = 11 and 7+1+3 = 11 tokens, so the width is 11 (unrounded here). Each response's
    positions restart at its prompt's end; in row 1 the first rejected token (column 4) sees the prompt (0, 1) and
    itself only."""
    monkeypatch.setattr(data_pairs, 'PAD_MULTIPLE', 1)
    batch = shared_batch()
    assert batch['input_ids'][0].tolist() == [5, 6, 7, 100, 101, 102, 103, 200, 201, 1, 1]
    assert batch['position_ids'][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 0, 0]
    assert batch['input_ids'][1].tolist() == [8, 9, 110, 111, 210, 211, 212, 213, 214, 215, 216]
    assert batch['position_ids'][1].tolist() == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 8]
    mask = batch['attention_mask'][1, 0]
    assert mask[4].nonzero().flatten().tolist() == [0, 1, 4]
    assert mask[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert mask[10].nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 7, 8, 9, 10]
    # response-major: the chosen responses of rows 0, 1, 2, then the rejected ones; flat index = row·11 + column
    assert batch['lengths'].tolist() == [4, 2, 1, 2, 7, 3]
    assert batch['labels'].tolist() == sum(CHOSEN + REJECTED, [])
    assert batch['predict'].tolist() == [2, 3, 4, 5, 12, 13, 28, 2, 7, 12, 15, 16, 17, 18, 19, 20, 28, 30, 31]
    assert batch['owner'].tolist() == [0] * 4 + [1] * 2 + [2] + [3] * 2 + [4] * 7 + [5] * 3
    assert batch['last'].tolist() == [6, 14, 29, 8, 21, 32]
    assert batch['n_tokens'] == 31


def test_layout_width_is_a_multiple_of_32():
    """11 tokens are padded to 32; padding is never attended by a real token, and the flat indices use the width."""
    batch = shared_batch()
    assert batch['input_ids'].shape == (3, 32) and (batch['input_ids'][1, 11:] == 1).all()
    assert not batch['attention_mask'][:, 0, :11, 11:].any()
    assert batch['predict'][:4].tolist() == [2, 3, 4, 5] and batch['predict'][4:6].tolist() == [33, 34]


def test_layout_reads_rewards_before_a_padding_eos():
    """With pad = EOS (Llama, Pythia), a reward is read at the token before the response's final EOS, where a
    transformers sequence classifier pools; a response of EOS alone is read at the prompt's end."""
    batch = data_pairs.layout([(torch.tensor([5, 6]), [torch.tensor([7, 8, 2]), torch.tensor([2])])], pad_id=2)
    assert batch['last'].tolist() == [3, 1]


def gpt_neox(vocab_size=512):
    """Pythia's architecture (the paper's models), tiny and random."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, rotary_pct=0.5, attn_implementation='sdpa')
    return train_tr.with_response_outputs(GPTNeoXForCausalLM(config).float().eval())


@pytest.mark.parametrize('architecture', ['llama', 'gpt_neox'])
def test_shared_prompt_equals_the_plain_padded_path(tiny_model, architecture):
    """The shared-prompt rows give each response the log-prob of the plain padded [chosen; rejected] path (float32,
    to 1e-5 relative; the summation order differs), and the same gradients as separate unpadded forwards."""
    model = tiny_model if architecture == 'llama' else gpt_neox()
    logps, lengths = train_tr.sequence_logps(model, shared_batch())
    assert lengths.tolist() == [4, 2, 1, 2, 7, 3]
    sequences = list(zip(PROMPTS, CHOSEN)) + list(zip(PROMPTS, REJECTED))
    with torch.no_grad():
        torch.testing.assert_close(logps, padded_logps(model, sequences), rtol=1e-5, atol=0)
    logps.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    sum(plain_logps(model, p, r) for p, r in sequences).backward()
    assert all(g.abs().sum() > 0 for g in grads)  # the comparison below is not vacuous
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f'{name}: {m}')


def test_rejected_never_sees_chosen(tiny_model):
    """Changing the chosen tokens changes the chosen log-probs and leaves the rejected ones bit for bit."""
    with torch.no_grad():
        base = train_tr.sequence_logps(tiny_model, shared_batch())[0]
        changed = train_tr.sequence_logps(tiny_model, shared_batch([[c + 1 for c in ids] for ids in CHOSEN]))[0]
    assert (changed[:3] != base[:3]).all() and torch.equal(changed[3:], base[3:])


def test_padding_does_not_change_logps(tiny_model, monkeypatch):
    """Row 0 alone (no padding) and as row 0 of the batch (23 columns of padding) give the same log-probs."""
    monkeypatch.setattr(data_pairs, 'PAD_MULTIPLE', 1)
    alone = data_pairs.layout([(torch.tensor(PROMPTS[0]), [torch.tensor(CHOSEN[0]), torch.tensor(REJECTED[0])])], 1)
    monkeypatch.undo()
    assert alone['input_ids'].shape == (1, 9)
    with torch.no_grad():
        single = train_tr.sequence_logps(tiny_model, alone)[0]
        batched = train_tr.sequence_logps(tiny_model, shared_batch())[0]
    torch.testing.assert_close(batched[[0, 3]], single, rtol=1e-6, atol=0)


def test_log_softmax_chunks_do_not_change_logps(tiny_model, monkeypatch):
    with torch.no_grad():
        whole = train_tr.sequence_logps(tiny_model, shared_batch())[0]
        monkeypatch.setitem(train_tr.LOGPS_CHUNK, 'cpu', 3)
        chunked = train_tr.sequence_logps(tiny_model, shared_batch())[0]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)


# -----------------------------------------------------------------------------
# reference update on plain (unsharded) modules
def policy_and_ref(tiny_model):
    """The policy is the seed-0 model; the reference a copy moved by N(0, 0.1²) noise, so the two differ everywhere."""
    ref = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    assert not any(isinstance(m, train_tr.FSDPModule) for m in [*tiny_model.modules(), *ref.modules()])
    return tiny_model, ref


@pytest.mark.parametrize('alpha', [0.6, 0.25])
def test_update_reference_soft_mix(tiny_model, alpha):
    """θ_ref ← α·θ + (1−α)·θ_ref, parameter by parameter; the policy is untouched."""
    policy, ref = policy_and_ref(tiny_model)
    policy_before = [p.detach().clone() for p in policy.parameters()]
    ref_before = [p.detach().clone() for p in ref.parameters()]
    update_reference(policy, ref, alpha)
    for p_old, r_old, p, r in zip(policy_before, ref_before, policy.parameters(), ref.parameters()):
        assert torch.equal(p, p_old)
        # expected in float64, so that only the update's own float32 rounding (under 1e-7 for |θ| < 2) is measured
        expected = alpha * p_old.double() + (1 - alpha) * r_old.double()
        torch.testing.assert_close(r.detach().double(), expected, atol=1e-7, rtol=0)
        assert not torch.equal(r, r_old)
    # tied embeddings stay tied
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()


def test_update_reference_alpha_one_copies_exactly(tiny_model):
    policy, ref = policy_and_ref(tiny_model)
    update_reference(policy, ref, 1.0)
    for p, r in zip(policy.parameters(), ref.parameters()):
        assert torch.equal(r, p) and r.data_ptr() != p.data_ptr()


def test_update_reference_alpha_zero_leaves_reference_bitwise(tiny_model):
    policy, ref = policy_and_ref(tiny_model)
    ref_before = [p.detach().clone() for p in ref.parameters()]
    update_reference(policy, ref, 0.0)
    for r_old, r in zip(ref_before, ref.parameters()):
        assert torch.equal(r.detach().view(torch.int32), r_old.view(torch.int32))
