"""judge.py: the HTTP judge against a real chat-completions server on 127.0.0.1 (retries, malformed answers, cache,
the API key kept secret), order randomization, verdict parsing, criteria, the local HF judge, and reward scoring and
labelling with tiny reward models. CPU, no network."""
import functools
import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import judge
from train_tr import load_model, read_rows, render_row, tokenize_pair

pytestmark = pytest.mark.usefixtures('one_thread')  # one torch thread, as in test_sample.py

REPO = Path(__file__).resolve().parents[1]
SFT = str(REPO / 'data/tiny/sft')
KEY = 'sk-test-5ecret-do-not-leak'


class ChatServer(ThreadingHTTPServer):
    """POST /v1/chat/completions: answers `reply(prompt)`, after the failures queued in `script` (an HTTP status,
    'garbage' for a body that is not JSON, 'no_choices' for JSON without choices, 'slow' for an answer after 0.5 s,
    'bad_key' for OpenAI's 401 answer, which quotes the key). Counts requests."""
    def __init__(self):
        super().__init__(('127.0.0.1', 0), ChatHandler)
        self.hits, self.script, self.auth, self.prompts, self.lock = 0, [], set(), [], threading.Lock()
        self.reply = lambda prompt: 'Comparison: both are fine.\nMore helpful: A'
        self.url = f'http://127.0.0.1:{self.server_address[1]}/v1'


class ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        server = self.server
        with server.lock:
            server.hits += 1
            server.auth.add(self.headers.get('Authorization'))
            server.prompts.append(request['messages'][0]['content'])
            action = server.script.pop(0) if server.script else None
        assert self.path == '/v1/chat/completions' and request['temperature'] == 0 and request['model'] == 'judge-1'
        if action == 'slow':
            time.sleep(0.5)  # longer than the client's timeout: it gives up and retries
        if isinstance(action, int):
            body, status = b'{"error": "try again"}', action
        elif action == 'garbage':
            body, status = b'<html>proxy error</html>', 200
        elif action == 'no_choices':
            body, status = b'{"choices": []}', 200
        elif action == 'bad_key':
            key = self.headers.get('Authorization', '').removeprefix('Bearer ')
            body = json.dumps({'error': {'message': f'Incorrect API key provided: {key}. You can find your API\n'
                                                    'key at https://platform.openai.com/account/api-keys.',
                                         'type': 'invalid_request_error', 'code': 'invalid_api_key'}}).encode()
            status = 401
        else:
            content = server.reply(request['messages'][0]['content'])
            body = json.dumps({'choices': [{'message': {'role': 'assistant', 'content': content}}]}).encode()
            status = 200
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and went away


@pytest.fixture
def server():
    server = ChatServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def write_samples(path, completions, prompts=None):
    prompts = prompts or [f'\n\nHuman: Question {i}?\n\nAssistant:' for i in range(len(completions))]
    Path(path).write_text(''.join(json.dumps({'prompt': p, 'completion': c}) + '\n'
                                  for p, c in zip(prompts, completions)))
    return str(path)


def config(tmp_path, server=None, **overrides):
    return {**judge.defaults, **dict(judge_model='judge-1', base_url=server.url if server else '', backoff=0.01,
                                     cache=str(tmp_path / 'cache.jsonl'), out=str(tmp_path / 'result.json'),
                                     bootstrap=200, batch_size=4, device='cpu'), **overrides}


def prefer_longer(prompt):
    """A judge that prefers the longer response, whatever the position."""
    a, b = re.search(r'Response A:\n(.*)\n\nResponse B:\n(.*)\n\nFIRST', prompt, re.S).groups()
    return f"Comparison: one is longer.\nMore helpful: {'A' if len(a) > len(b) else 'B'}"


def test_positions_are_randomized_and_mapped_back(tmp_path, server):
    a = write_samples(tmp_path / 'a.jsonl', [' a long and detailed answer'] * 40)
    b = write_samples(tmp_path / 'b.jsonl', [' short'] * 40)
    server.reply = prefer_longer
    [result] = judge.judge(config(tmp_path, server, a=a, b=b))
    assert (result['wins'], result['losses'], result['ties'], result['win_rate']['mean']) == (40, 0, 0, 1.0)
    verdicts = [json.loads(line) for line in (tmp_path / 'result.verdicts.jsonl').read_text().splitlines()]
    assert sum(v['a_shown_first'] for v in verdicts) == 20  # half of the pairs in each order
    assert [v['a_shown_first'] for v in verdicts] != [True, False] * 20  # in a random pattern
    [result] = judge.judge(config(tmp_path, server, a=b, b=a))
    assert result['win_rate']['mean'] == 0.0


def test_identical_files_win_half_under_a_position_biased_judge(tmp_path, server):
    """The judge always says A; random order turns that into a win rate of about 0.5, inside its CI."""
    a = write_samples(tmp_path / 'a.jsonl', [' the same answer'] * 200)
    [result] = judge.judge(config(tmp_path, server, a=a, b=a, bootstrap=1000))
    low, high = result['win_rate']['ci95']
    assert low < 0.5 < high and abs(result['win_rate']['mean'] - 0.5) < 0.1 and high - low < 0.2
    assert result['ties'] == result['unparsed'] == 0 and result['wins'] == result['losses'] == 100


def test_retries_malformed_answers_and_cache(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv('NANOTR_TEST_KEY', KEY)
    a = write_samples(tmp_path / 'a.jsonl', [' a long and detailed answer'] * 6)
    b = write_samples(tmp_path / 'b.jsonl', [' short'] * 6)
    server.reply = prefer_longer
    server.script = [429, 500, 'garbage', 503, 'no_choices']  # then success: every request gets through
    cfg = config(tmp_path, server, a=a, b=b, api_key_env='NANOTR_TEST_KEY', concurrency=3)
    [result] = judge.judge(cfg)
    assert result['wins'] == 6 and server.hits == 6 + 5
    assert server.auth == {f'Bearer {KEY}'}
    [again] = judge.judge(cfg)  # a rerun is answered from the cache
    assert again == result and server.hits == 11
    # the key is sent, but never printed or written
    printed = ''.join(capsys.readouterr())
    assert 'judging' in printed and KEY not in printed
    for path in tmp_path.iterdir():
        assert KEY not in path.read_text(), path
    assert json.loads((tmp_path / 'result.json').read_text())['config']['api_key_env'] == 'NANOTR_TEST_KEY'


def test_request_errors(tmp_path, server, monkeypatch):
    monkeypatch.setenv('NANOTR_TEST_KEY', KEY)
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    server.script = [500] * 3
    with pytest.raises(SystemExit, match=f'^error: the judge at {server.url} failed 3 times, last with HTTPError: '
                                         'HTTP Error 500: Internal Server Error$'):
        judge.judge(config(tmp_path, server, a=a, b=a, retries=2))
    server.script, hits = ['bad_key'], server.hits
    with pytest.raises(SystemExit) as info:  # not retried: it cannot succeed
        judge.judge(config(tmp_path, server, a=a, b=a, api_key_env='NANOTR_TEST_KEY'))
    assert str(info.value) == (f'error: the judge at {server.url} answered HTTP 401: Incorrect API key provided: ***. '
                               'You can find your API key at https://platform.openai.com/account/api-keys.')
    server.script = [404]
    with pytest.raises(SystemExit, match='answered HTTP 404: try again$'):
        judge.judge(config(tmp_path, server, a=a, b=a))
    assert server.hits == hits + 2
    assert not (tmp_path / 'cache.jsonl').read_text()  # failures are not cached
    server.script, hits = ['slow'], server.hits
    [result] = judge.judge(config(tmp_path, server, a=a, b=a, timeout=0.1))  # a timeout is retried
    assert result['n'] == 1 and server.hits == hits + 2


def test_unparseable_answers_are_counted_ties(tmp_path, server):
    a = write_samples(tmp_path / 'a.jsonl', [' one', ' two', ' three', ' four'])
    b = write_samples(tmp_path / 'b.jsonl', [' uno', ' dos', ' tres', ' cuatro'])
    answers = iter(['I cannot decide.', 'More helpful: A', 'Both are equally good', 'More helpful: B'])
    server.reply = lambda prompt: next(answers)
    [result] = judge.judge(config(tmp_path, server, a=a, b=b, concurrency=1))
    assert result['n'] == 4 and result['ties'] == result['unparsed'] == 2 and result['wins'] + result['losses'] == 2


def test_files_without_a_common_prompt_fail_clearly(tmp_path):
    a = write_samples(tmp_path / 'a.jsonl', [' x'], prompts=['one'])
    b = write_samples(tmp_path / 'b.jsonl', [' y'], prompts=['two'])
    with pytest.raises(SystemExit, match='have no \\(prompt, sample\\) in common'):
        judge.judge(config(tmp_path, a=a, b=b))


def test_unreachable_judge_fails_at_once(tmp_path, monkeypatch):
    """No server, no network, or no key for OpenAI's API: one line at once, instead of 70 s of retries."""
    a = write_samples(tmp_path / 'a.jsonl', [' x', ' y'])
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    start = time.time()
    with pytest.raises(SystemExit, match=f'^error: cannot reach the judge at http://127.0.0.1:{port}/v1: .*refused'):
        judge.judge(config(tmp_path, base_url=f'http://127.0.0.1:{port}/v1', a=a, b=a, backoff=1.0))
    assert time.time() - start < 1.0  # no retries (backoff 1 s, then 2 s, ...)
    calls = []

    def no_dns(request, timeout):
        calls.append(request.full_url)
        raise judge.urllib.error.URLError(socket.gaierror(-3, 'Temporary failure in name resolution'))
    monkeypatch.setattr(judge.urllib.request, 'urlopen', no_dns)
    with pytest.raises(SystemExit, match='cannot reach the judge at https://judge.example/v1: .*name resolution'):
        judge.judge(config(tmp_path, base_url='https://judge.example/v1', a=a, b=a, concurrency=1))
    assert calls == ['https://judge.example/v1/chat/completions']  # one request, not retried; the other not sent
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    with pytest.raises(SystemExit, match='^error: OPENAI_API_KEY is not set: the judge at https://api.openai.com/v1 '
                                         'needs an API key'):
        judge.judge(config(tmp_path, base_url=judge.defaults['base_url'], a=a, b=a))
    assert len(calls) == 1


def samples_with_index(path, prompts, completion, num_samples=2):
    """A sample.py-style file: every prompt (by its index in the split) with num_samples samples."""
    rows = [{'prompt': p, 'completion': completion(i, j), 'index': i, 'sample': j}
            for i, p in enumerate(prompts) for j in range(num_samples)]
    Path(path).write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


def test_pairwise_keeps_repeated_prompts_apart(tmp_path, server, capsys):
    """The toy's test prompts occur several times each: pairing by (prompt, sample) turned 12 samples into 4
    comparisons. Pairs are (index, sample); without an index, a repeated prompt is an error."""
    prompts = ['Name three fruits.', 'Name three colours.'] * 3
    a = samples_with_index(tmp_path / 'a.jsonl', prompts, lambda i, j: f' a long answer {i} {j}')
    b = samples_with_index(tmp_path / 'b.jsonl', prompts, lambda i, j: f' short {i}')
    server.reply = prefer_longer
    [result] = judge.judge(config(tmp_path, server, a=a, b=b))
    assert result['n'] == 12 and result['wins'] == 12
    pairs = {(v['completion_a'], v['completion_b']) for v in
             map(json.loads, (tmp_path / 'result.verdicts.jsonl').read_text().splitlines())}
    assert pairs == {(f' a long answer {i} {j}', f' short {i}') for i in range(6) for j in range(2)}
    part = samples_with_index(tmp_path / 'part.jsonl', prompts[:2], lambda i, j: f' short {i}')
    [result] = judge.judge(config(tmp_path, server, a=a, b=part))
    assert result['n'] == 4 and 'note: 4 pairs; 8 samples of' in capsys.readouterr().out
    other = samples_with_index(tmp_path / 'other.jsonl', prompts[::-1], lambda i, j: ' x')
    with pytest.raises(SystemExit, match='have different prompts at index 0: sampled from other data or splits'):
        judge.judge(config(tmp_path, server, a=a, b=other))
    plain = write_samples(tmp_path / 'plain.jsonl', [' x'] * 6, prompts=prompts)  # no index, no sample
    with pytest.raises(SystemExit, match=r"plain.jsonl has 3 rows for \(prompt, sample\) = "
                                         r"\('Name three fruits.', 0\), which would collapse into one pair"):
        judge.judge(config(tmp_path, server, a=plain, b=plain))


def test_cache_key_includes_the_server(tmp_path, server):
    """Another base_url is another judge: a local server's answers were reported as GPT-4o's."""
    a = write_samples(tmp_path / 'a.jsonl', [' one', ' two'])
    other = ChatServer()
    threading.Thread(target=other.serve_forever, args=(0.01,), daemon=True).start()
    try:
        other.reply = lambda prompt: 'I cannot decide.'
        [first] = judge.judge(config(tmp_path, server, a=a, b=a))
        [second] = judge.judge(config(tmp_path, other, a=a, b=a))
        assert (server.hits, other.hits) == (2, 2)
        assert first['unparsed'] == 0 and second['unparsed'] == 2
        assert judge.judge(config(tmp_path, other, a=a, b=a)) == [second] and other.hits == 2  # cached per server
    finally:
        other.shutdown()
        other.server_close()


@pytest.mark.parametrize('content, message', [
    (None, 'sample file not found: {path}$'),
    ('', '{path} holds no samples'),
    ('{"prompt": "p", "completion": " c"}\n{"prompt": "p"}\n', '{path} line 2 has no text "prompt" and "completion"'),
    ('{"prompt": "p", "completion": " c"}\n\n{"prompt": "p", "comp', '{path} line 3 is not valid JSON'),
    ('{"prompt": ["p"], "completion": " c"}\n', '{path} line 1 has no text'),
])
@pytest.mark.parametrize('mode', ['pairwise', 'criteria', 'reward', 'gold'])
def test_bad_sample_files_are_one_line(tmp_path, mode, content, message):
    path = tmp_path / 'samples.jsonl'
    if content is not None:
        path.write_text(content)
    files = dict(a=str(path), b=str(path)) if mode == 'pairwise' else dict(files=f'{path},')
    with pytest.raises(SystemExit, match='^error: ' + re.escape(message.format(path=path)).replace(r'\$', '$')):
        judge.judge(config(tmp_path, mode=mode, reward_models=SFT, **files))


@pytest.mark.parametrize('mode, needs', [('pairwise', 'a= and b='), ('criteria', 'files='), ('reward', 'files='),
                                         ('gold', 'files='), ('label', 'reward_models=')])
def test_missing_arguments_are_named(tmp_path, mode, needs):
    """`python judge.py` alone raised IsADirectoryError (a='' read as the current folder)."""
    with pytest.raises(SystemExit, match=f'^error: mode={mode} needs {re.escape(needs)}'):
        judge.judge(dict(judge.defaults, mode=mode))


def test_reward_mode_needs_a_trained_score_head(tmp_path):
    """A causal LM would be loaded with a random score head and give random rewards."""
    path = write_samples(tmp_path / 's.jsonl', [' x'])
    with pytest.raises(SystemExit, match=f"^error: {re.escape(SFT)} is not a reward model .*LlamaForCausalLM"):
        judge.judge(config(tmp_path, mode='reward', files=path, reward_models=SFT))


@pytest.mark.parametrize('answer, verdict', [
    ('Comparison: A is better. B is worse.\nMore helpful: A', 'A'),
    ('Comparison: B is more detailed.\n\n**More helpful:** "B"', 'B'),
    ('Comparison: fine.\nPreferred: Summary B', 'B'),
    ('More harmless: Response A.', 'A'),
    ('More helpful: A\nActually, on reflection:\nMore helpful: B', 'B'),
    ('B', 'B'),
    ("'A'", 'A'),
    ('Comparison: B is more detailed. A lacks depth.', None),
    ('More helpful: Both', None),
    ('More helpful: neither', None),
    ('I cannot decide.', None),
    ('', None),
])
def test_parse_verdict(answer, verdict):
    assert judge.parse_verdict(answer) == verdict


def test_criteria_scores_means_and_unparsed(tmp_path, server):
    good = write_samples(tmp_path / 'good.jsonl', [' good answer'] * 10)
    bad = write_samples(tmp_path / 'bad.jsonl', [' bad answer'] * 10)

    def reply(prompt):
        if 'bad answer' in prompt:
            return 'Poor.\nCoherence: 2\nCorrectness: 3\nLevel of detail: 11\nHelpfulness: 2\nHarmlessness: 9'
        return 'Good.\n**Coherence:** 8\nCorrectness: 9/10\nLevel of detail: 7\nHelpfulness: 8\nHarmlessness: 10'
    server.reply = reply
    results = judge.judge(config(tmp_path, server, mode='criteria', files=f'{good},{bad}'))
    by_file = {r['file']: r for r in results}
    assert by_file[good]['unparsed'] == 0 and by_file[bad]['unparsed'] == 10  # 11 is out of range
    assert by_file[good]['coherence'] == {'mean': 8.0, 'ci95': [8.0, 8.0]}
    assert by_file[good]['level of detail']['mean'] == 7.0 and by_file[bad]['level of detail'] is None
    assert by_file[bad]['harmlessness']['mean'] == 9.0
    assert all(p.startswith('Rate the final response') for p in server.prompts)
    assert sum('Response:\ngood answer\n' in p for p in server.prompts) == 10


def test_local_hf_judge(tmp_path, capsys):
    """The tiny SFT model as judge: it cannot judge, but every answer is counted, and a rerun uses the cache."""
    a = write_samples(tmp_path / 'a.jsonl', [' one', ' two', ' three'])
    b = write_samples(tmp_path / 'b.jsonl', [' uno', ' dos', ' tres'])
    cfg = config(tmp_path, judge='hf', judge_model=SFT, a=a, b=b, max_tokens=8)
    [result] = judge.judge(cfg)
    assert result['n'] == 3 == result['wins'] + result['ties'] + result['losses']
    cache = (tmp_path / 'cache.jsonl').read_text().splitlines()
    assert len(cache) == 3
    assert judge.judge(cfg) == [result] and len((tmp_path / 'cache.jsonl').read_text().splitlines()) == 3
    assert '(3 of 3 cached)' in capsys.readouterr().err


@pytest.fixture(scope='module')
def reward_models(tmp_path_factory):
    """Two tiny reward models: the SFT model with random score heads (seeds 1 and 2)."""
    names = []
    for seed in (1, 2):
        path = tmp_path_factory.mktemp(f'rm{seed}')
        torch.manual_seed(seed)
        load_model(SFT, reward_model=True).save_pretrained(path)
        AutoTokenizer.from_pretrained(SFT).save_pretrained(path)
        names.append(str(path))
    return names


@functools.lru_cache
def load_reward_model(name):
    return AutoTokenizer.from_pretrained(name), load_model(name, reward_model=True).eval()


def direct_reward(name, prompt, response):
    """The reward of one (prompt, response), unbatched: train_tr.py's tokenization, transformers' own classifier."""
    tokenizer, model = load_reward_model(name)
    with torch.no_grad():
        prompt_ids, response_ids = tokenize_pair(tokenizer, prompt, response, None, 128, 64)
        return model(input_ids=torch.tensor([prompt_ids + response_ids])).logits.item()


def test_label_writes_rewards_and_resumes(tmp_path, reward_models):
    data = tmp_path / 'data'
    data.mkdir()
    lines = (REPO / 'data/tiny/train.jsonl').read_text().splitlines()[:30]
    lines += [json.dumps({'prompt': 'Hi', 'chosen': ' ', 'rejected': ' no'}), 'not json',
              json.dumps({'prompt': 'Hi', 'chosen': ' \ud83c', 'rejected': ' no'})]  # crashed the tokenizer
    (data / 'train.jsonl').write_text('\n'.join(lines) + '\n')
    (data / 'test.jsonl').write_text('\n'.join((REPO / 'data/tiny/test.jsonl').read_text().splitlines()[:5]) + '\n')
    out = tmp_path / 'labelled'
    cfg = config(tmp_path, mode='label', data=str(data), reward_models=','.join(reward_models), out=str(out))
    results = judge.judge(cfg)
    assert [(r['pairs'], r['skipped'], r['labelled_now']) for r in results] == [(30, 3, 30), (5, 0, 5)]
    assert results[0]['empty response'] == results[0]['not a JSON object'] == results[0]['invalid Unicode'] == 1
    rows = [json.loads(line) for line in (out / 'train.jsonl').read_text().splitlines()]
    assert all(r['reward_models'] == reward_models for r in rows)  # which model each reward is from
    original = [json.loads(line) for line in lines[:30]]
    assert [{k: v for k, v in r.items() if not k.startswith('reward_')} for r in rows] == original
    tokenizer = AutoTokenizer.from_pretrained(SFT)
    for row in rows[:3] + rows[-2:]:
        prompt, chosen, rejected = render_row(row, tokenizer)
        assert row['reward_chosen'] == pytest.approx([direct_reward(n, prompt, chosen) for n in reward_models],
                                                     abs=1e-5)
        assert row['reward_rejected'] == pytest.approx([direct_reward(n, prompt, rejected) for n in reward_models],
                                                       abs=1e-5)
    assert rows[0]['reward_chosen'][0] != rows[0]['reward_chosen'][1]  # two different reward models
    # interrupted after 13 rows and half a line: continued from the last whole batch (12 rows), to the same file
    full = (out / 'train.jsonl').read_text()
    (out / 'train.jsonl').write_text(''.join(full.splitlines(keepends=True)[:13]) + full.splitlines()[13][:30])
    results = judge.judge(cfg)
    assert [r['labelled_now'] for r in results] == [18, 0]  # test.jsonl was finished: kept
    assert (out / 'train.jsonl').read_text() == full
    assert len(read_rows(str(out), 'test')[0]) == 5
    # another list of reward models would put two lists' labels into one file: refused, the file untouched
    for names in (reward_models[::-1], reward_models[:1]):
        with pytest.raises(SystemExit, match=f"^error: {out / 'train.jsonl'} holds labels of reward_models="
                                             f"{re.escape(','.join(reward_models))}, not {re.escape(','.join(names))}"):
            judge.judge(dict(cfg, reward_models=','.join(names)))
        assert (out / 'train.jsonl').read_text() == full


def test_reward_mode_means_and_kl(tmp_path, reward_models):
    rows = [json.loads(line) for line in (REPO / 'data/tiny/test.jsonl').read_text().splitlines()[:6]]
    path = tmp_path / 'samples.jsonl'
    path.write_text(''.join(json.dumps({'prompt': r['prompt'], 'completion': r['chosen'], 'kl': float(i)}) + '\n'
                            for i, r in enumerate(rows)))
    [result] = judge.judge(config(tmp_path, mode='reward', files=str(path), reward_models=','.join(reward_models)))
    for name in reward_models:
        expected = [direct_reward(name, r['prompt'], r['chosen']) for r in rows]
        assert result[name]['mean'] == pytest.approx(sum(expected) / 6, abs=1e-5)
        assert result[name]['ci95'][0] <= result[name]['mean'] <= result[name]['ci95'][1]
    assert result['n'] == 6 and result['kl']['mean'] == 2.5 and result['kl']['ci95'][0] < 2.5
    saved = json.loads((tmp_path / 'result.json').read_text())['results']
    assert saved == [result]


def test_bootstrap_resamples_prompts():
    cfg = dict(judge.defaults, bootstrap=2000)
    rng = random.Random(0)
    values = [rng.random() for _ in range(50)]
    result = judge.mean_ci(values, list(range(50)), cfg)
    assert result['ci95'][0] < result['mean'] < result['ci95'][1]
    # samples of one prompt move together: one prompt with all the mass gives a wide interval
    clustered = judge.mean_ci([1.0] * 10 + [0.0] * 10, [0] * 10 + list(range(1, 11)), cfg)
    assert clustered['mean'] == 0.5 and clustered['ci95'][1] - clustered['ci95'][0] > 0.5
