"""Losses, sequence log-probs and the reference update of train_tr.py, against values derived by hand.

Notation (as in train_tr.py): ρ(y) = logπ_θ(y) − logπ_ref(y), σ the logistic function, log σ(x) = −log(1 + e^−x).
Every expected number below is worked out in the docstring/comment with plain `math`, never read from the code."""
import copy
import math

import pytest
import torch

import train_tr
from train_tr import collate, preference_loss, sequence_logps, update_reference


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
    loss = preference_loss(t(-1, -5, -7), t(-3, -4, -7), t(-2, -4, -7), t(-2, -6, -7), 'dpo', beta=0.5)
    close(loss, [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1.5)), math.log(2)])
    close(loss[0], 0.31326168751822286)  # log(1 + e^-1) written out


def test_dpo_label_smoothing_hand_value():
    """cDPO, ε = 0.2, z = 1 (pair 1 above): −(1−ε)·log σ(1) − ε·log σ(−1) = 0.8·log(1+e^−1) + 0.2·log(1+e^1);
    pair 2, z = −1.5: 0.8·log(1+e^1.5) + 0.2·log(1+e^−1.5)."""
    loss = preference_loss(t(-1, -5), t(-3, -4), t(-2, -4), t(-2, -6), 'dpo', beta=0.5, label_smoothing=0.2)
    close(loss, [0.8 * math.log(1 + math.e ** -1) + 0.2 * math.log(1 + math.e),
                 0.8 * math.log(1 + math.exp(1.5)) + 0.2 * math.log(1 + math.exp(-1.5))])


def test_dpo_label_smoothing_zero_is_plain_dpo():
    args = (t(-1, -5, -2.5), t(-3, -4, -9), t(-2, -4, -3), t(-2, -6, -8))
    assert torch.equal(preference_loss(*args, 'dpo', beta=0.3, label_smoothing=0.0),
                       preference_loss(*args, 'dpo', beta=0.3))
    # and ε changes it whenever z != 0
    assert not torch.allclose(preference_loss(*args, 'dpo', beta=0.3, label_smoothing=0.1),
                              preference_loss(*args, 'dpo', beta=0.3))


@pytest.mark.parametrize('beta', [0.01, 0.1, 0.5, 3.0])
@pytest.mark.parametrize('label_smoothing', [0.0, 0.25])
def test_dpo_is_ln2_when_policy_equals_reference(beta, label_smoothing):
    """ρw = ρl = 0 ⇒ z = 0 ⇒ −(1−ε)·log σ(0) − ε·log σ(0) = log 2 for every β and ε."""
    logps_w, logps_l = t(-3.5, -10.0), t(-7.25, -1.0)
    loss = preference_loss(logps_w, logps_l, logps_w.clone(), logps_l.clone(), 'dpo', beta, label_smoothing)
    close(loss, [math.log(2)] * 2)


def test_dpo_gradient_signs_and_values():
    """d/dπw of −log σ(β(ρw−ρl)) = −β·(1 − σ(z)) < 0 and d/dπl = +β·(1 − σ(z)) > 0.
    Pair 1 above: β = 0.5, z = 1: ∓0.5·(1 − σ(1)) = ∓0.5·0.2689414213699951."""
    policy_chosen, policy_rejected = t(-1, -5).requires_grad_(), t(-3, -4).requires_grad_()
    preference_loss(policy_chosen, policy_rejected, t(-2, -4), t(-2, -6), 'dpo', beta=0.5).sum().backward()
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
    loss = preference_loss(t(-4), t(-9), t(-6), t(-6), 'ipo', beta=0.25, chosen_tokens=t(4), rejected_tokens=t(3),
                           ipo_normalize=True)
    close(loss, [0.25])


def test_ipo_summed_hand_value():
    """Same pair, summed log-ratios: h = 2 − (−3) = 5, loss = (5 − 2)² = 9 (token counts ignored)."""
    loss = preference_loss(t(-4), t(-9), t(-6), t(-6), 'ipo', beta=0.25, chosen_tokens=t(4), rejected_tokens=t(3),
                           ipo_normalize=False)
    close(loss, [9.0])


@pytest.mark.parametrize('ipo_normalize', [True, False])
@pytest.mark.parametrize('beta', [0.1, 0.25, 2.0])
def test_ipo_is_one_over_four_beta_squared_when_policy_equals_reference(beta, ipo_normalize):
    """h = 0 ⇒ (0 − 1/(2β))² = 1/(4β²): 25 for β = 0.1, 4 for β = 0.25, 1/16 for β = 2."""
    logps_w, logps_l = t(-3.0, -12.0), t(-8.0, -2.5)
    loss = preference_loss(logps_w, logps_l, logps_w.clone(), logps_l.clone(), 'ipo', beta,
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
        loss = preference_loss(t(-1), t(-3), t(-2), t(-2), 'kto', beta=0.5, kto_z=z, kto_desirable_weight=1.0,
                               kto_undesirable_weight=1.5)
        close(loss, [expected])
    # σ(0.35) = 0.5866176, σ(0.65) = 0.6570105: (0.4133824 + 1.5·0.3429895)/2 = (0.4133824 + 0.5144843)/2
    close(expected, 0.4639334, tol=1e-7)


def test_kto_at_reference_with_zero_baseline():
    """ρw = ρl = z = 0 ⇒ each term is λ·(1 − σ(0)) = λ/2 ⇒ loss = (λ_D + λ_U)/4 = (1.0 + 1.5)/4 = 0.625."""
    logps_w, logps_l = t(-4.0, -1.5), t(-6.0, -2.0)
    loss = preference_loss(logps_w, logps_l, logps_w.clone(), logps_l.clone(), 'kto', beta=0.1, kto_z=0.0,
                           kto_desirable_weight=1.0, kto_undesirable_weight=1.5)
    close(loss, [0.625, 0.625])


def test_unknown_loss_raises():
    with pytest.raises(ValueError, match='simpo'):
        preference_loss(t(-1), t(-2), t(-1), t(-2), 'simpo')


# -----------------------------------------------------------------------------
# sequence log-probs on a tiny random Llama
def naive_sequence_logps(model, input_ids, labels):
    """Token by token: Σ over t ≥ 1 with labels[t] != −100 of log_softmax(logits[t−1])[labels[t]]."""
    logits = model(input_ids=input_ids).logits.float()
    totals, counts = [], []
    for b in range(input_ids.shape[0]):
        total, count = logits.new_zeros(()), 0
        for pos in range(1, input_ids.shape[1]):
            if labels[b, pos] != -100:
                total = total + torch.log_softmax(logits[b, pos - 1], dim=-1)[labels[b, pos]]
                count += 1
        totals.append(total)
        counts.append(count)
    return torch.stack(totals), counts


def make_labeled_batch():
    """Three rows of 10 tokens. Row 0: prompt 3 → 7 labels; row 1: prompt 5, response 3, then padding → 3 labels;
    row 2: labels everywhere, position 0 included, which the shift drops → 9 counted."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 512, (3, 10), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[1, :5] = -100
    labels[1, 8:] = -100
    input_ids[1, 8:] = 1  # pad
    return input_ids, labels, [7, 3, 9]


def test_sequence_logps_matches_naive_values_and_gradients(tiny_model):
    input_ids, labels, expected_counts = make_labeled_batch()
    logps, counts = sequence_logps(tiny_model, input_ids, labels)
    assert counts.tolist() == expected_counts
    logps.sum().backward()
    grads = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad(set_to_none=True)

    naive, naive_counts = naive_sequence_logps(tiny_model, input_ids, labels)
    assert naive_counts == expected_counts
    naive.sum().backward()
    # Each row sums 3-9 token log-probs of about −6 in float32: a sum near −56 has an ulp of 3.8e-6, so the
    # values are compared to 1e-6 relative (summation order differs), the gradients to 1e-6 absolute.
    torch.testing.assert_close(logps, naive, atol=1e-6, rtol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads)  # the comparison below is not vacuous
    for (name, p), g in zip(tiny_model.named_parameters(), grads):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=0, msg=lambda m: f'{name}: {m}')


def test_sequence_logps_ignores_masked_labels(tiny_model):
    """A -100 label contributes nothing: changing the target id at a masked position cannot matter, but changing a
    counted one does."""
    input_ids, labels, _ = make_labeled_batch()
    with torch.no_grad():
        base = sequence_logps(tiny_model, input_ids, labels)[0]
        assert torch.equal(sequence_logps(tiny_model, input_ids, labels.masked_fill(labels == -100, -100))[0], base)
        other = labels.clone()
        other[0, 5] = (other[0, 5] + 1) % 512
        changed = sequence_logps(tiny_model, input_ids, other)[0]
    assert changed[0] != base[0] and torch.equal(changed[1:], base[1:])


def test_right_padding_does_not_change_logps(tiny_model):
    """A causal model without an attention mask: right padding comes after every real position, so the short
    sequence's log-probs alone equal its log-probs as row 0 of a right-padded batch with a longer sequence."""
    short = ([10, 11, 12], [20, 21, 22])
    long = ([30, 31, 32, 33, 34], [40, 41, 42, 43, 44, 45, 46])
    alone_ids, alone_labels = collate([short], pad_id=1)
    assert alone_ids.shape == (1, 6)
    batch_ids, batch_labels = collate([short, long], pad_id=1)
    assert batch_ids.shape == (2, 12) and (batch_ids[0, 6:] == 1).all()
    with torch.no_grad():
        alone, alone_count = sequence_logps(tiny_model, alone_ids, alone_labels)
        batched, batched_count = sequence_logps(tiny_model, batch_ids, batch_labels)
    assert alone_count.tolist() == [3] and batched_count.tolist() == [3, 7]
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)


def test_concatenated_forward_equals_separate_forwards(tiny_model):
    """[chosen; rejected] in one batch (padded to the longest of all four) gives the same per-row values as the
    chosen and rejected rows forwarded separately."""
    chosen = [([5, 6, 7], [100, 101, 102, 103]), ([8, 9], [110, 111])]
    rejected = [([5, 6, 7], [200, 201]), ([8, 9], [210, 211, 212, 213, 214, 215, 216])]
    with torch.no_grad():
        together, together_counts = sequence_logps(tiny_model, *collate(chosen + rejected, pad_id=1))
        c, c_counts = sequence_logps(tiny_model, *collate(chosen, pad_id=1))
        r, r_counts = sequence_logps(tiny_model, *collate(rejected, pad_id=1))
    assert together_counts.tolist() == [4, 2, 2, 7] == c_counts.tolist() + r_counts.tolist()
    torch.testing.assert_close(together, torch.cat([c, r]), atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# reference update on plain (unsharded) modules
def policy_and_ref(tiny_model):
    """The policy is the seed-0 model; the reference a copy moved by N(0, 0.1²) noise, so the two differ everywhere."""
    ref = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    assert train_tr.fsdp_modules(tiny_model) == [] and train_tr.fsdp_modules(ref) == []
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
