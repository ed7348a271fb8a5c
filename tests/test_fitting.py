"""One truncation rule for every job (data/pairs.py fit_example): training's rule, found without one render per
dropped exchange, and the same token ids in reward labels (data/label.py), reward scoring (judge.py mode=reward) and
sample.py's prompts. CPU, the tiny shipped tokenizer with its chat template and with ChatML."""
import json
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

import judge
import sample
from data import label
from data import pairs as data_pairs
from test_judge import reward_models  # noqa: F401  (a fixture: two tiny reward models)
from train_tr import sequence_rewards

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def old_encode_row(row, tokenizer, max_length, max_prompt_length, need_rejected=True, turn_end=''):
    """encode_row as it was: one exchange dropped and the row rendered again per step (quadratic in the exchanges)."""
    while True:
        texts = data_pairs.render_row(row, tokenizer, need_rejected)
        if isinstance(texts, str):
            return texts
        prompt_ids, *responses = data_pairs.tokenize_pair(tokenizer, *texts, max_length=10**9,
                                                          max_prompt_length=10**9, turn_end=turn_end)
        too_long = len(prompt_ids) + max(map(len, responses)) > max_length and len(prompt_ids) > max_prompt_length
        shorter = data_pairs.without_oldest_exchange(row['prompt']) if too_long and isinstance(row['prompt'], list) \
            else None
        if shorter is None:
            break
        row = dict(row, prompt=shorter)
    if not prompt_ids:
        return 'empty prompt'
    prompt_ids, responses = data_pairs.truncate(prompt_ids, responses, max_length, max_prompt_length)
    if need_rejected and responses[0] == responses[1]:
        return 'identical after truncation'
    return texts[0], [prompt_ids, *responses]


@pytest.fixture(scope='module', params=['tiny', 'chatml'])
def chat_tokenizer(request):
    tokenizer = AutoTokenizer.from_pretrained(REPO / 'data/tiny/base')
    if request.param == 'chatml':
        tokenizer.chat_template = CHATML
    return tokenizer


def conversation(rng, exchanges, system=True):
    """A chat prompt: maybe a system turn, then user/assistant exchanges of random lengths (some with two assistant
    turns or a system turn inside), ending with a user turn."""
    words = 'apple pear plum fig kiwi lime date cherry melon grape'.split()

    def text():
        return ' '.join(rng.choices(words, k=rng.randint(1, 12)))
    messages = [{'role': 'system', 'content': text()}] if system else []
    for _ in range(exchanges):
        messages += [{'role': 'user', 'content': text()}, {'role': 'assistant', 'content': text()}]
        if rng.random() < 0.15:
            messages.append({'role': rng.choice(['assistant', 'system']), 'content': text()})
    return messages + [{'role': 'user', 'content': text()}]


def test_the_exchange_search_gives_the_old_loops_results(chat_tokenizer):
    """On 300 varied conversations and limits, chat and text rows, pairs and single responses: what the old loop
    (one exchange per render) gave, identical."""
    rng, turn_end = random.Random(0), data_pairs.end_of_turn(chat_tokenizer)
    dropped = 0
    for n in range(300):
        prompt = conversation(rng, rng.randint(0, 30), system=rng.random() < 0.5)
        responses = [' '.join(['fig'] * rng.randint(1, 40)), ' '.join(['kiwi'] * rng.randint(1, 40))]
        if rng.random() < 0.5:
            responses = [[{'role': 'assistant', 'content': r}] for r in responses]
        row = {'prompt': prompt, 'chosen': responses[0], 'rejected': responses[1]}
        if n % 10 == 0:  # text rows: tokens cut off the start
            row['prompt'] = chat_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            row = {**row, 'chosen': ' fig', 'rejected': ' kiwi kiwi'}
        max_length = rng.randint(16, 900)
        max_prompt_length = rng.randint(4, max_length - 1)
        need_rejected = rng.random() < 0.7
        new = data_pairs.encode_row(row, chat_tokenizer, max_length, max_prompt_length, need_rejected, turn_end)
        assert new == old_encode_row(row, chat_tokenizer, max_length, max_prompt_length, need_rejected, turn_end), n
        fitted = data_pairs.fit_row(row, chat_tokenizer, max_length, max_prompt_length, need_rejected, turn_end)
        if not isinstance(fitted, str) and isinstance(row['prompt'], list):
            dropped += fitted.prompt != row['prompt']
            assert fitted.prompt_text == chat_tokenizer.apply_chat_template(fitted.prompt, tokenize=False,
                                                                            add_generation_prompt=True)
    assert dropped > 50  # the search really ran


def test_a_row_of_2000_exchanges_takes_a_few_renders(chat_tokenizer, monkeypatch):
    """The old loop rendered and tokenized the whole row once per dropped exchange, ~2,000 renders (98 s); the
    exchange search renders a logarithmic number of times (counted, not timed)."""
    prompt = conversation(random.Random(1), 2000)
    row = {'prompt': prompt, 'chosen': [{'role': 'assistant', 'content': 'fig'}],
           'rejected': [{'role': 'assistant', 'content': 'kiwi kiwi'}]}
    renders, render = [], chat_tokenizer.apply_chat_template
    monkeypatch.setattr(chat_tokenizer, 'apply_chat_template', lambda *a, **k: renders.append(1) or render(*a, **k))
    prompt_text, (prompt_ids, *_) = data_pairs.encode_row(row, chat_tokenizer, 1024, 512,
                                                          turn_end=data_pairs.end_of_turn(chat_tokenizer))
    assert len(renders) < 60, len(renders)  # 60 at most where the old loop took ~2,000
    monkeypatch.undo()
    assert 512 < len(prompt_ids) < 1024 and prompt_text.startswith(  # the system turn and the template's opening stay
        chat_tokenizer.apply_chat_template(prompt[:1], tokenize=False))
    short = {**row, 'prompt': prompt[-41:]}  # 20 exchanges: the old loop is the reference
    assert data_pairs.encode_row(short, chat_tokenizer, 256, 128) == old_encode_row(short, chat_tokenizer, 256, 128)


def chat_rows(rng, n):
    return [{'prompt': conversation(rng, rng.randint(0, 12)), 'chosen': [{'role': 'assistant', 'content': c}],
             'rejected': [{'role': 'assistant', 'content': r}]}
            for c, r in (('fig ' * rng.randint(1, 30), 'kiwi ' * rng.randint(1, 30)) for _ in range(n))]


def test_labels_score_a_pair_as_reward_model_training_sees_it(tmp_path, reward_models):  # noqa: F811
    """label.py truncated chosen and rejected each alone, from the rendered text (cutting the system turn): a reward
    model's labels now read exactly the token ids of its training pairs (load_pairs with its tokenizer: exchanges
    dropped, the prompt cut by the longer response), in the layout of its training batches, so the same rewards."""
    rows = chat_rows(random.Random(2), 40)
    (tmp_path / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    cfg = dict(label.defaults, reward_models=','.join(reward_models), data=str(tmp_path), out=str(tmp_path / 'labels'),
               max_length=96, max_prompt_length=48, batch_size=8, device='cpu')
    models = label.load_reward_models(cfg)
    _, model, tokenizer, _ = models[0]
    pairs = data_pairs.load_pairs(str(tmp_path), 'train', tokenizer, 96, 48, verbose=False)
    fitted = [label.fit_pair(models, row, cfg) for row in rows]
    usable = [(row, ids) for row, ids in zip(rows, fitted) if not isinstance(ids, str)]
    assert len(usable) == len(pairs) > 30
    assert [ids[0] for _, ids in usable] == [[p.prompt.tolist(), p.chosen.tolist(), p.rejected.tolist()]
                                             for p in pairs]
    whole = [data_pairs.tokenize_prompt(tokenizer, tokenizer.apply_chat_template(row['prompt'], tokenize=False,
                                                                                 add_generation_prompt=True))
             for row, _ in usable]
    assert sum(len(p.prompt) < len(ids) for p, ids in zip(pairs, whole)) > 10  # truncated
    pad = model.config.pad_token_id
    with torch.no_grad():
        trained = torch.cat([sequence_rewards(model, data_pairs.make_batch(pairs[i:i + 8], True, pad)).view(2, -1).T
                             for i in range(0, len(pairs), 8)])
    labelled = label.label(cfg)
    written = [json.loads(line) for line in (tmp_path / 'labels/train.jsonl').read_text().splitlines()]
    assert labelled[0]['pairs'] == len(pairs)
    got = torch.tensor([[r['reward_chosen'][0], r['reward_rejected'][0]] for r in written])
    torch.testing.assert_close(got, trained, atol=1e-5, rtol=0)


def test_judge_scores_a_chat_sample_as_training_reads_its_conversation(tmp_path, reward_models):  # noqa: F811
    """judge.py mode=reward scored the prompt text rendered by the sampler, cut by tokens (the system turn went
    first): a sample with prompt_messages is now read as the reward model's training reads the row {prompt:
    messages, chosen: [the completion as an assistant message]}; a sample file without them (older sample.py) is
    read as text, as before."""
    rows = chat_rows(random.Random(3), 12)
    samples = [{'prompt': 'rendered', 'prompt_messages': r['prompt'], 'completion': r['chosen'][0]['content'],
                'index': i, 'sample': 0} for i, r in enumerate(rows)]
    samples[0]['completion'] = ''  # an empty answer is scored too (a policy's empty answers count)
    path = tmp_path / 'samples.jsonl'
    path.write_text(''.join(json.dumps(s) + '\n' for s in samples))
    cfg = dict(judge.defaults, mode='reward', files=str(path), reward_models=reward_models[0], max_length=64,
               max_prompt_length=32, batch_size=4, device='cpu', bootstrap=10)
    [result] = judge.evaluate(cfg)
    _, model, tokenizer, turn_end = label.load_reward_models(cfg)[0]
    expected = []
    for s in samples:
        row = {'prompt': s['prompt_messages'], 'chosen': [{'role': 'assistant', 'content': s['completion']}]}
        ids = data_pairs.fit_example(tokenizer, row['prompt'], [row['chosen']], 64, 32, turn_end).ids
        if s['completion']:  # training's own encoding of the row, where it would train on it
            assert ids == data_pairs.fit_row(row, tokenizer, 64, 32, need_rejected=False, turn_end=turn_end).ids
        batch = data_pairs.layout([(torch.tensor(ids[0]), [torch.tensor(ids[1])])], model.config.pad_token_id)
        with torch.no_grad():
            expected.append(sequence_rewards(model, batch).item())
    assert result[reward_models[0]]['mean'] == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    old = tmp_path / 'old.jsonl'  # no prompt_messages: the prompt text, as sampled
    old.write_text(''.join(json.dumps({'prompt': 'Q: fig?', 'completion': ' kiwi'}) + '\n' for _ in range(3)))
    [result] = judge.evaluate(dict(cfg, files=str(old)))
    assert result['n'] == 3


def test_sample_writes_the_kept_messages_of_a_chat_prompt(tmp_path, chat_tokenizer):
    """sample.py fits a chat prompt by the same rule (whole exchanges first) and writes the messages it kept, whose
    rendering is the prompt it wrote, for judge.py's reward models to render with their own templates."""
    model = tmp_path / 'model'
    import shutil
    shutil.copytree(REPO / 'data/tiny/sft', model)
    chat_tokenizer.save_pretrained(model)  # the tiny SFT model with this test's chat template
    data = tmp_path / 'data'
    data.mkdir()
    rows = chat_rows(random.Random(4), 6)
    (data / 'test.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows)
                                     + json.dumps({'prompt': 'Q: fig?', 'chosen': ' kiwi'}) + '\n')
    try:
        written = sample.sample(dict(sample.defaults, init_from=str(model), data=str(data), max_prompt_length=40,
                                     max_new_tokens=4, device='cpu', out=str(tmp_path / 'samples.jsonl')))
    finally:
        dist.destroy_process_group()
    assert len(written) == 7 and written[-1]['prompt_messages'] is None and written[-1]['prompt'] == 'Q: fig?'
    turn_end = data_pairs.end_of_turn(chat_tokenizer)
    for row, sampled in zip(rows, written):
        fitted = data_pairs.fit_row(row, chat_tokenizer, 40, 40, need_rejected=False, turn_end=turn_end)
        assert sampled['prompt_messages'] == fitted.prompt and sampled['prompt'] == fitted.prompt_text
    assert sum(s['prompt_messages'] != r['prompt'] for r, s in zip(rows, written)) >= 2  # exchanges were dropped
