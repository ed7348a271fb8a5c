"""Reward models and reward-model distillation in train_tr.py: loss=rm, distill (d-DPO), edistill (e-DPO), pdpo (p-DPO),
against hand-computed values, invariants at the reference, trust-region composition, and bad labelled data.

Notation: ρ = logπ_θ − logπ_ref, m = β(ρ_w − ρ_l), Δr_i = r_i(y_w) − r_i(y_l), KL = −(ρ_w + ρ_l)/2."""
import json
import math
import re

import pytest
import torch
from conftest import REPO, SMALL, TINY, assert_records_close, assert_same_weights, final_state, pair_loss, run

import train_tr
from data import pairs as data_pairs
from train_tr import load_pairs, step_pair_indices


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, tol=1e-12):
    assert actual.tolist() == pytest.approx(expected, abs=tol, rel=0)


# -----------------------------------------------------------------------------
# hand values
def test_reward_model_loss_hand_values():
    """r_w − r_l = 2 − 1 = 1: −log σ(1) = log(1 + e^−1); r_w − r_l = −1 − 0.5 = −1.5: log(1 + e^1.5).
    Centring with c = 0.1 adds 0.1·(2 + 1)² = 0.9 and 0.1·(−1 + 0.5)² = 0.025."""
    plain = pair_loss('rm', t(2, -1), t(1, 0.5))
    close(plain, [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1.5))])
    close(pair_loss('rm', t(2, -1), t(1, 0.5), rm_center_coef=0.1), [math.log(1 + math.exp(-1)) + 0.9,
                                                                     math.log(1 + math.exp(1.5)) + 0.025])


# pair 1: policy (−1, −3), ref (−2, −2): ρ_w = 1, ρ_l = −1; β = 0.5 ⇒ m = 1
# pair 2: policy (−5, −4), ref (−4, −6): ρ_w = −1, ρ_l = 2 ⇒ m = −1.5
LOGPS = (t(-1, -5), t(-3, -4), t(-2, -4), t(-2, -6))
MARGINS = t(3, 0.5, -1, -1.5).reshape(2, 2)  # pair 1: Δr = (3, 0.5); pair 2: Δr = (−1, −1.5)


def test_distill_hand_values():
    """first: (1 − 3)² = 4, (−1.5 + 1)² = 0.25.
    mean: targets 1.75 and −1.25: (1 − 1.75)² = 0.5625, (−1.5 + 1.25)² = 0.0625."""
    close(pair_loss('distill', *LOGPS, reward_margins=MARGINS, beta=0.5), [4.0, 0.25])
    close(pair_loss('distill', *LOGPS, reward_margins=MARGINS, beta=0.5, distill_reduce='mean'), [0.5625, 0.0625])


def test_edistill_example_min_hand_values():
    """Pair 1: errors (1 − 3)² = 4 and (1 − 0.5)² = 0.25 → 0.25.
    Pair 2: (−1.5 + 1)² = 0.25 and (−1.5 + 1.5)² = 0 → 0."""
    close(pair_loss('edistill', *LOGPS, reward_margins=MARGINS, beta=0.5, edistill_min='example'), [0.25, 0.0])


def test_edistill_batch_min_hand_values():
    """'batch': reward model 1 has errors (4, 0.25), sum 4.25; model 2 (0.25, 0), sum 0.25 → model 2 for every pair.
    With margins chosen so the per-example and batch minima differ: model 1 errors (0, 4), model 2 (1, 1)."""
    train_tr.setup_distributed('cpu')  # a world of one: the batch minimum sums errors over ranks
    m = t(1, -1.5)  # β(ρ_w − ρ_l) of LOGPS at β = 0.5
    for margins, member, expected in ((MARGINS, 1, [0.25, 0.0]), (t(1, 0, 0.5, -0.5).reshape(2, 2), 1, [1.0, 1.0])):
        assert train_tr.closest_member(m, margins) == member
        close(pair_loss('edistill', *LOGPS, reward_margins=margins, beta=0.5, edistill_min='batch', member=member),
              expected)
    close(pair_loss('edistill', *LOGPS, reward_margins=t(1, 0, 0.5, -0.5).reshape(2, 2), beta=0.5,
                    edistill_min='example'), [0.0, 1.0])


def test_distill_gradient_hand_value():
    """d/dlogπ(y_w) of (m − Δr)² = 2(m − Δr)·β: pair 1, 2·(1 − 3)·0.5 = −2; pair 2, 2·(−1.5 + 1)·0.5 = −0.5."""
    policy_chosen = LOGPS[0].clone().requires_grad_()
    pair_loss('distill', policy_chosen, *LOGPS[1:], reward_margins=MARGINS, beta=0.5).sum().backward()
    close(policy_chosen.grad, [-2.0, -0.5])


def test_edistill_one_model_equals_distill():
    margins = MARGINS[:, :1]
    assert torch.equal(pair_loss('edistill', *LOGPS, reward_margins=margins, beta=0.5, member=0),
                       pair_loss('distill', *LOGPS, reward_margins=margins, beta=0.5))


def test_batch_loss_pessimism_term_hand_value(tiny_model, tokenizer):
    """pdpo at the reference: every ρ = 0, so the loss is log 2 per pair plus γ·0. After moving the policy, the term
    is γ·KL with KL = −(ρ_w + ρ_l)/2, checked against sequence_logps computed here."""
    pairs = [p._replace(reward_margins=(1.0,)) for p in load_pairs(REPO / 'data/tiny', 'test', tokenizer, 128, 64,
                                                                    verbose=False)[:3]]
    batch = data_pairs.make_batch(pairs, True, tokenizer.pad_token_id)
    ref = tiny_model
    cfg = train_tr.get_config(['--loss=pdpo', '--pessimism_gamma=0.3', '--beta=0.2'])
    loss_sum, metrics = train_tr.batch_loss(ref, ref, batch, cfg)
    assert loss_sum.item() == pytest.approx(3 * math.log(2), abs=1e-6)
    assert metrics['forward_kl'].tolist() == [0.0, 0.0, 0.0]
    policy = train_tr.with_response_outputs(type(ref)(ref.config))
    policy.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in ref.state_dict().items()})
    policy.eval()
    loss_sum, metrics = train_tr.batch_loss(policy, ref, batch, cfg)
    with torch.no_grad():
        rho = train_tr.sequence_logps(policy, batch)[0] - train_tr.sequence_logps(ref, batch)[0]
    kl = -(rho[:3] + rho[3:]) / 2
    dpo = -torch.nn.functional.logsigmoid(0.2 * (rho[:3] - rho[3:]))
    assert metrics['forward_kl'].tolist() == pytest.approx(kl.tolist(), abs=1e-6)
    assert loss_sum.item() == pytest.approx((dpo + 0.3 * kl).sum().item(), abs=1e-5)
    assert kl.abs().max() > 1e-3  # the term is not trivially zero here


# -----------------------------------------------------------------------------
# labelled data: checks before training
def write_labelled(folder, k=1, rows_per_split=None, edit=None):
    """data/tiny with k made-up rewards per response (any finite numbers serve: the losses only read their
    differences). `edit(split, rows)` may corrupt rows for the bad-input tests."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ('train', 'test'):
        rows = [json.loads(line) for line in (REPO / f'data/tiny/{split}.jsonl').read_text().splitlines()]
        rows = rows[:rows_per_split]
        for i, row in enumerate(rows):
            row['reward_chosen'] = [0.5 + 0.25 * j + (i % 7) / 8 for j in range(k)]
            row['reward_rejected'] = [-0.5 * j - (i % 5) / 4 for j in range(k)]
        if edit:
            edit(split, rows)
        (folder / f'{split}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return folder


def first_margin(row):
    return row['reward_chosen'][0] - row['reward_rejected'][0]


@pytest.mark.parametrize('edit, message', [
    (lambda s, rows: rows[3].pop('reward_chosen'), 'row 4 has no reward_chosen/reward_rejected'),
    (lambda s, rows: rows[5].update(reward_chosen=[1.0, 2.0], reward_rejected=[0.0, 1.0]),
     'row 6 has 2 rewards per response, earlier rows have 1'),
    (lambda s, rows: rows[2].update(reward_rejected=[0.0, 1.0]), 'row 3: reward_chosen and reward_rejected must be'),
    (lambda s, rows: rows[1].update(reward_chosen=['high']), 'row 2: reward_chosen and reward_rejected must be'),
    (lambda s, rows: rows[7].update(reward_chosen=[float('nan')]), 'row 8 has a NaN or infinite reward'),
    (lambda s, rows: rows[0].update(reward_rejected=float('-inf')), 'row 1 has a NaN or infinite reward'),
])
def test_bad_labels_name_file_and_row(tmp_path, tokenizer, edit, message):
    folder = write_labelled(tmp_path / 'data', rows_per_split=10, edit=lambda split, rows: split == 'train' and edit(
        split, rows))
    with pytest.raises(SystemExit, match=f"{tmp_path / 'data' / 'train.jsonl'} {message}".replace('(', r'\(')):
        load_pairs(folder, 'train', tokenizer, 128, 64, verbose=False, need_rewards=True)


def test_scalar_rewards_count_as_lists_of_one(tmp_path, tokenizer):
    folder = write_labelled(tmp_path / 'data', rows_per_split=4, edit=lambda split, rows: [
        r.update(reward_chosen=r['reward_chosen'][0], reward_rejected=r['reward_rejected'][0]) for r in rows])
    pairs = load_pairs(folder, 'train', tokenizer, 128, 64, verbose=False, need_rewards=True)
    assert [p.reward_margins for p in pairs] == [(0.5 + (i % 7) / 8 + (i % 5) / 4,) for i in range(4)]


def test_distill_on_unlabelled_data_stops_before_training(tmp_path):
    proc, records = run(tmp_path / 'out', *SMALL, '--loss=distill', check=False)
    assert proc.returncode != 0 and not records
    assert 'data/toy/train.jsonl row 1 has no reward_chosen/reward_rejected' in proc.stderr
    assert 'python data/label.py' in proc.stderr


def test_bad_distillation_settings_raise():
    for arg, word in [('--distill_reduce=max', 'distill_reduce'), ('--edistill_min=all', 'edistill_min'),
                      ('--pessimism_gamma=-1', 'pessimism_gamma'), ('--loss=rmx', "loss='rmx': need loss in ('sft', ")]:
        with pytest.raises(SystemExit, match=re.escape(word)):
            train_tr.get_config([arg])


# -----------------------------------------------------------------------------
# end-to-end runs (subprocesses, as in test_train.py)
def step_margins(folder, n_steps, batch_size=4):
    """Δr_1 of the pairs of each of the first steps, in the order train_tr.py draws them."""
    rows = [json.loads(line) for line in (folder / 'train.jsonl').read_text().splitlines()]
    return [[first_margin(rows[i]) for i in step_pair_indices(len(rows), it, batch_size, 1337)]
            for it in range(n_steps)]


def test_distill_first_step_is_mean_squared_target(tmp_path):
    """Policy = reference at step 1 ⇒ m = 0 ⇒ loss = mean(Δr²); with a hard update every step, at every step."""
    data = write_labelled(tmp_path / 'data', k=2)
    _, records = run(tmp_path / 'soft', *SMALL, '--loss=distill', f'--data={data}', '--lr=1e-2')
    expected = [sum(d * d for d in step) / 4 for step in step_margins(data, 4)]
    assert records[0]['loss'] == pytest.approx(expected[0], abs=1e-5)
    assert records[0]['rewards/margins'] == 0
    assert records[0]['rewards/rm_margins'] != 0
    assert records[-1]['loss'] != pytest.approx(expected[-1], abs=1e-3)  # the policy moved: m ≠ 0 later
    _, records = run(tmp_path / 'hard', *SMALL, '--loss=distill', f'--data={data}', '--lr=1e-2', '--ref_update=hard',
                     '--tr_tau=1')
    assert [r['loss'] for r in records] == pytest.approx(expected, abs=1e-5)
    assert [r['ref_updates'] for r in records] == [1, 2, 3, 4]


def test_distill_regresses_margins_toward_target(tmp_path):
    """d-DPO fits a finite, learnable target: Δr = 1 − (−1) = 2 on every pair (the chosen responses follow a rule).
    The loss falls from mean(Δr²) = 4 and the implicit margins move toward 2."""
    data = write_labelled(tmp_path / 'data', edit=lambda split, rows: [
        r.update(reward_chosen=[1.0], reward_rejected=[-1.0]) for r in rows])
    _, records = run(tmp_path / 'out', *SMALL, '--loss=distill', f'--data={data}', '--max_iters=40', '--beta=0.5',
                     '--lr=3e-4', '--ref_update=none', '--batch_size=8', '--init_from=data/tiny/sft')
    assert records[0]['loss'] == pytest.approx(4.0, abs=1e-5)
    last = records[-10:]
    assert sum(r['loss'] for r in last) / 10 < 3.0
    assert sum(r['rewards/margins'] for r in last) / 10 > 0.5


def test_edistill_with_one_model_and_no_pessimism_equals_distill(tmp_path):
    data = write_labelled(tmp_path / 'data')
    args = [*SMALL, f'--data={data}', '--lr=1e-2', '--tr_tau=2']
    _, distill = run(tmp_path / 'd', *args, '--loss=distill')
    _, edistill = run(tmp_path / 'e', *args, '--loss=edistill', '--pessimism_gamma=0')
    assert [r['loss'] for r in edistill] == [r['loss'] for r in distill]
    assert_same_weights(final_state(tmp_path / 'd')['policy'], final_state(tmp_path / 'e')['policy'])


def test_pdpo_without_pessimism_is_dpo_and_starts_at_ln2(tmp_path):
    _, dpo = run(tmp_path / 'dpo', *SMALL, '--lr=1e-2')
    _, pdpo0 = run(tmp_path / 'p0', *SMALL, '--lr=1e-2', '--loss=pdpo', '--pessimism_gamma=0')
    _, pdpo = run(tmp_path / 'p', *SMALL, '--lr=1e-2', '--loss=pdpo', '--pessimism_gamma=1')
    assert [r['loss'] for r in pdpo0] == [r['loss'] for r in dpo]
    assert pdpo[0]['loss'] == pytest.approx(math.log(2), abs=1e-6) and pdpo[0]['forward_kl'] == 0
    assert pdpo[-1]['loss'] != dpo[-1]['loss']


def opposed_rewards(split, rows):
    """Three reward models that disagree in sign and size, Δr = ((−1)^j, 0.3, −0.2·(j mod 3)), with j the position
    in the first step's pairs (its 4 pairs: j = 0..3), else the row's index. At step 1 (m = 0) the pairs' own minima
    are (0, 0.04, 0.09, 0), sum 0.13; the batch's is model 3's, (0, 0.04, 0.16, 0), sum 0.2."""
    first = step_pair_indices(len(rows), 0, 4, 1337) if split == 'train' else []
    for i, row in enumerate(rows):
        j = first.index(i) if i in first else i
        row.update(reward_chosen=[(-1.0) ** j, 0.3, -0.2 * (j % 3)], reward_rejected=[0.0, 0.0, 0.0])


@pytest.mark.slow
def test_edistill_two_processes_match_one_and_resume(tmp_path):
    """The ensemble loss with a soft trust-region update and edistill_min=batch, whose minimum is over the global
    micro-batch: 1 process == 2 processes (2 pairs each), and a run resumed halfway == the straight run. The three
    reward models disagree in sign and size, so the per-example and batch minima pick different models."""
    data = write_labelled(tmp_path / 'data', edit=opposed_rewards)
    args = [*SMALL, '--loss=edistill', f'--data={data}', '--tr_tau=2', '--tr_alpha=0.5']
    _, one = run(tmp_path / 'one', *args, '--edistill_min=batch')
    _, two = run(tmp_path / 'two', *args, '--edistill_min=batch', nproc=2)
    assert_records_close(one, two, ('loss', 'rewards/margins', 'forward_kl', 'grad_norm'))
    assert_same_weights(final_state(tmp_path / 'one')['ref'], final_state(tmp_path / 'two')['ref'], steps=4)
    run(tmp_path / 'split', *args, '--edistill_min=batch', '--max_iters=2')
    _, resumed = run(tmp_path / 'split', *args, '--edistill_min=batch', '--resume=True')
    assert [r['loss'] for r in resumed] == [r['loss'] for r in one]
    assert_same_weights(final_state(tmp_path / 'one')['ref'], final_state(tmp_path / 'split')['ref'])
    _, example = run(tmp_path / 'example', *args, '--edistill_min=example')
    assert example[0]['loss'] == pytest.approx(0.13 / 4) and one[0]['loss'] == pytest.approx(0.2 / 4)


def halves_disagree(split, rows):
    """The first step's 4 pairs: the first two fit reward model 1 exactly (Δr = (0, 2)), the last two model 2
    (Δr = (3, 0)). At step 1 (m = 0) the errors are Δr²: model 1 sums 0 + 0 + 9 + 9 = 18, model 2 4 + 4 + 0 + 0 = 8,
    so the step's minimum is model 2's, loss (4 + 4 + 0 + 0)/4 = 2; each half alone would pick its own model, loss 0."""
    first = step_pair_indices(len(rows), 0, 4, 1337) if split == 'train' else []
    for i, row in enumerate(rows):
        j = first.index(i) if i in first else i % 4
        row.update(reward_chosen=[0.0, 2.0] if j < 2 else [3.0, 0.0], reward_rejected=[0.0, 0.0])


def test_edistill_batch_min_is_one_objective_whatever_the_split(tmp_path):
    """e-DPO's minimum is over the optimizer step's global batch: grad_accum (README's advice when short of memory) and
    the number of processes leave the loss as it is (taken per micro-batch it was 2.0 with grad_accum=1, 0.0 with 2)."""
    data = write_labelled(tmp_path / 'data', k=2, edit=halves_disagree)
    args = [*SMALL, '--loss=edistill', f'--data={data}', '--max_iters=3', '--lr=1e-2', '--pessimism_gamma=0']
    _, one = run(tmp_path / 'one', *args)
    assert one[0]['loss'] == pytest.approx(2.0, abs=1e-6)
    for name, nproc in (('accum', 1), ('two', 2)):  # micro-steps of the pairs 1, 2 then 3, 4 (two: 1, 3 with 2, 4)
        _, split = run(tmp_path / name, *args, '--grad_accum=2', nproc=nproc)
        assert_records_close(one, split, ('loss', 'rewards/margins', 'grad_norm'))


def test_reward_model_learns_the_rule_and_loads_with_from_pretrained(tmp_path):
    """data/tiny's chosen responses follow a rule (correct arithmetic, sorting, counting, politeness). A reward model
    trained from the tiny SFT model ranks held-out pairs far above chance, and loads as a sequence classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    _, records = run(tmp_path, *TINY, '--loss=rm', '--max_iters=60', '--lr=1e-3', '--log_interval=10',
                     '--eval_interval=60', '--eval_pairs=192')
    evals = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines() if 'eval/loss' in line]
    assert records[0]['loss'] > records[-1]['loss'] and {'accuracy', 'margin'} <= set(records[0])
    assert evals[-1]['eval/accuracy'] > 0.7
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    pairs = load_pairs(REPO / 'data/tiny', 'test', tokenizer, 128, 64, verbose=False)[:64]
    with torch.no_grad():  # transformers' own pooling, one unpadded sequence at a time
        rewards = [[model(input_ids=torch.cat([p.prompt, r])[None].long()).logits.item()
                    for r in (p.chosen, p.rejected)] for p in pairs]
    assert sum(c > r for c, r in rewards) / 64 > 0.7
    assert final_state(tmp_path)['ref'] is None


@pytest.mark.slow
def test_reward_model_two_processes_and_resume(tmp_path):
    """loss=rm on the shared FSDP path: 2 processes resuming a 1-process checkpoint == 4 steps in one process."""
    args = [*SMALL, '--loss=rm']
    _, straight = run(tmp_path / 'straight', *args)
    run(tmp_path / 'split', *args, '--max_iters=2')
    _, resumed = run(tmp_path / 'split', *args, '--resume=True', nproc=2)
    assert_records_close(straight, resumed, ('loss', 'margin', 'grad_norm'))
    assert_same_weights(final_state(tmp_path / 'straight')['policy'], final_state(tmp_path / 'split')['policy'],
                        steps=4)
