"""judge.py and data/label.py: the HTTP judge against a real chat-completions server on 127.0.0.1 (retries, malformed
answers, cache, redirects, a trickled answer, the API key kept secret), order randomization, verdict parsing, criteria,
templates, settings, the local HF judge, and reward scoring and labelling with tiny reward models. CPU, no network."""
import functools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import judge
from data import judge_client
from data import label
from data.pairs import fingerprint, read_rows, render_row, tokenize_pair
from train_tr import load_model

pytestmark = pytest.mark.usefixtures('one_thread')  # one torch thread, as in test_sample.py

REPO = Path(__file__).resolve().parents[1]
SFT = str(REPO / 'data/tiny/sft')
KEY = 'sk-test-5ecret-do-not-leak'


class ChatServer(ThreadingHTTPServer):
    """POST /v1/chat/completions: answers `reply(prompt)`, after the failures queued in `script` (an HTTP status,
    'garbage' for a body that is not JSON, 'no_choices' for JSON without choices, 'slow' for an answer after 0.5 s,
    'bad_key' for OpenAI's 401 answer, which quotes the key, 'echo_reason' for a 500 whose status line quotes it,
    (code, url) for a redirect, 'trickle' / 'trickle_head' for an answer / a status line sent a byte every 0.05 s,
    {'status': code, 'headers': {...}} for an error with those headers, 'endless' for a 200 whose body goes on for
    64 MiB). Counts requests (and the bytes of endless bodies sent) and keeps the Authorization headers it got."""
    daemon_threads = True

    def __init__(self):
        super().__init__(('127.0.0.1', 0), ChatHandler)
        self.hits, self.script, self.auth, self.prompts, self.lock = 0, [], set(), [], threading.Lock()
        self.proxy_auth, self.sent = set(), 0
        self.reply = lambda prompt: 'Comparison: both are fine.\nMore helpful: A'
        self.url = f'http://127.0.0.1:{self.server_address[1]}/v1'


class ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        server = self.server
        with server.lock:
            server.hits += 1
            server.auth.add(self.headers.get('Authorization'))
            server.proxy_auth.add(self.headers.get('Proxy-Authorization'))
            server.prompts.append(request['messages'][0]['content'])
            action = server.script.pop(0) if server.script else None
        assert self.path == '/v1/chat/completions' and request['temperature'] == 0 and request['model'] == 'judge-1'
        if action == 'slow':
            time.sleep(0.5)  # longer than the client's timeout: it gives up and retries
        if isinstance(action, tuple):  # a redirect, possibly to another server
            self.send_response(action[0])
            self.send_header('Location', action[1])
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        if isinstance(action, dict):
            self.send_response(action['status'])
            for name, value in action['headers'].items():
                self.send_header(name, value)
            self.send_header('Content-Length', '2')
            self.end_headers()
            self.wfile.write(b'{}')
            return
        if action == 'endless':  # no Content-Length: the body ends when the connection does
            self.send_response(200)
            self.end_headers()
            chunk = b'x' * 2**16
            for _ in range(2**10):
                self.wfile.write(chunk)
                server.sent += len(chunk)
            return
        if action == 'echo_reason':
            key = self.headers.get('Authorization', '').removeprefix('Bearer ')
            self.send_response(500, f'Internal Error with key {key}')
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        if action in ('trickle', 'trickle_head'):
            body = json.dumps({'choices': [{'message': {'content': 'More helpful: A'}}]}).encode()
            head = f'HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n'.encode()
            slow, fast = (head, body) if action == 'trickle_head' else (body, head)
            if action == 'trickle':
                self.wfile.write(fast)
            for i in range(len(slow)):  # far longer in all than the client's timeout, though every byte is prompt
                self.wfile.write(slow[i:i + 1])
                self.wfile.flush()
                time.sleep(0.05)
            if action == 'trickle_head':
                self.wfile.write(fast)
            return
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


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch):
    """The machine's proxy settings would send the tests' requests to 127.0.0.1 through its proxy."""
    for name in ('http_proxy', 'https_proxy', 'no_proxy', 'all_proxy', 'REQUEST_METHOD'):
        for variable in (name, name.upper()):
            monkeypatch.delenv(variable, raising=False)


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
    """judge.py's settings for a test, only those that act in its run (judge.py refuses the others): an HTTP judge at
    the server's URL (or one that no request reaches, in a test without a server), a local judge and reward models on
    the CPU, a cache and out in tmp_path."""
    cfg = {**judge.defaults, 'out': str(tmp_path / 'result.json'), 'bootstrap': 200, **overrides}
    if judge.asks(cfg):
        cfg['judge_model'] = overrides.get('judge_model', 'judge-1')
        cfg['cache'] = overrides.get('cache', str(tmp_path / 'cache.jsonl'))
        if cfg['judge'] == 'http':
            cfg.update({'base_url': server.url if server else 'http://127.0.0.1:9/v1', 'backoff': 0.01, **overrides})
    if cfg['mode'] == 'reward' or cfg['judge'] == 'hf':
        cfg.update({'batch_size': 4, 'device': 'cpu', **overrides})
    return cfg


def prefer_longer(prompt):
    """A judge that prefers the longer response, whatever the position."""
    a, b = re.search(r'Response A:\n(.*)\n\nResponse B:\n(.*)\n\nFIRST', prompt, re.S).groups()
    return f"Comparison: one is longer.\nMore helpful: {'A' if len(a) > len(b) else 'B'}"


def test_positions_are_randomized_and_mapped_back(tmp_path, server):
    a = write_samples(tmp_path / 'a.jsonl', [' a long and detailed answer'] * 40)
    b = write_samples(tmp_path / 'b.jsonl', [' short'] * 40)
    server.reply = prefer_longer
    [result] = judge.evaluate(config(tmp_path, server, a=a, b=b))
    assert (result['wins'], result['losses'], result['ties'], result['win_rate']['mean']) == (40, 0, 0, 1.0)
    verdicts = [json.loads(line) for line in (tmp_path / 'result.verdicts.jsonl').read_text().splitlines()]
    assert sum(v['a_shown_first'] for v in verdicts) == 20  # half of the pairs in each order
    assert [v['a_shown_first'] for v in verdicts] != [True, False] * 20  # in a random pattern
    [result] = judge.evaluate(config(tmp_path, server, a=b, b=a))
    assert result['win_rate']['mean'] == 0.0


def test_identical_files_win_half_under_a_position_biased_judge(tmp_path, server):
    """The judge always says A; random order turns that into a win rate of about 0.5, inside its CI."""
    a = write_samples(tmp_path / 'a.jsonl', [' the same answer'] * 200)
    [result] = judge.evaluate(config(tmp_path, server, a=a, b=a, bootstrap=1000))
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
    [result] = judge.evaluate(cfg)
    assert result['wins'] == 6 and server.hits == 6 + 5
    assert server.auth == {f'Bearer {KEY}'}
    [again] = judge.evaluate(cfg)  # a rerun is answered from the cache
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
        judge.evaluate(config(tmp_path, server, a=a, b=a, retries=2))
    server.script, hits = ['bad_key'], server.hits
    with pytest.raises(SystemExit) as info:  # not retried: it cannot succeed
        judge.evaluate(config(tmp_path, server, a=a, b=a, api_key_env='NANOTR_TEST_KEY'))
    assert str(info.value) == (f'error: the judge at {server.url} answered HTTP 401: Incorrect API key provided: ***. '
                               'You can find your API key at https://platform.openai.com/account/api-keys.')
    server.script = [404]
    with pytest.raises(SystemExit, match='answered HTTP 404: try again$'):
        judge.evaluate(config(tmp_path, server, a=a, b=a))
    assert server.hits == hits + 2
    assert not (tmp_path / 'cache.jsonl').read_text()  # failures are not cached
    server.script, hits = ['slow'], server.hits
    [result] = judge.evaluate(config(tmp_path, server, a=a, b=a, timeout=0.1))  # a timeout is retried
    assert result['n'] == 1 and server.hits == hits + 2


def test_a_failure_that_stops_the_run_sends_nothing_more(tmp_path, server):
    """The queued requests went out after the failure, until the pool was shut down (most runs of 300)."""
    a = write_samples(tmp_path / 'a.jsonl', [f' answer {i}' for i in range(20)])
    server.script = [404]
    with pytest.raises(SystemExit, match='answered HTTP 404: try again$'):
        judge.evaluate(config(tmp_path, server, a=a, b=a, concurrency=1))
    time.sleep(0.2)  # time for a stray request to arrive
    assert server.hits == 1


def test_unparseable_answers_are_counted_ties(tmp_path, server):
    a = write_samples(tmp_path / 'a.jsonl', [' one', ' two', ' three', ' four'])
    b = write_samples(tmp_path / 'b.jsonl', [' uno', ' dos', ' tres', ' cuatro'])
    answers = iter(['I cannot decide.', 'More helpful: A', 'Both are equally good', 'More helpful: B'])
    server.reply = lambda prompt: next(answers)
    [result] = judge.evaluate(config(tmp_path, server, a=a, b=b, concurrency=1))
    assert result['n'] == 4 and result['ties'] == result['unparsed'] == 2 and result['wins'] + result['losses'] == 2


def test_files_without_a_common_prompt_fail_clearly(tmp_path):
    a = write_samples(tmp_path / 'a.jsonl', [' x'], prompts=['one'])
    b = write_samples(tmp_path / 'b.jsonl', [' y'], prompts=['two'])
    with pytest.raises(SystemExit, match='have no \\(prompt, sample\\) in common'):
        judge.evaluate(config(tmp_path, a=a, b=b))


def test_unreachable_judge_fails_at_once(tmp_path, monkeypatch):
    """No server, no network, or no key for OpenAI's API: one line at once, instead of 70 s of retries."""
    a = write_samples(tmp_path / 'a.jsonl', [' x', ' y'])
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    start = time.time()
    with pytest.raises(SystemExit, match=f'^error: cannot reach the judge at http://127.0.0.1:{port}/v1: .*refused'):
        judge.evaluate(config(tmp_path, base_url=f'http://127.0.0.1:{port}/v1', a=a, b=a, backoff=1.0))
    assert time.time() - start < 1.0  # no retries (backoff 1 s, then 2 s, ...)
    calls = []

    def no_dns(url, body, headers, timeout):
        calls.append(url)
        raise socket.gaierror(-3, 'Temporary failure in name resolution')
    monkeypatch.setattr(judge_client, 'post', no_dns)
    with pytest.raises(SystemExit, match='cannot reach the judge at https://judge.example/v1: .*name resolution'):
        judge.evaluate(config(tmp_path, base_url='https://judge.example/v1', a=a, b=a, concurrency=1))
    assert calls == ['https://judge.example/v1/chat/completions']  # one request, not retried; the other not sent
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    with pytest.raises(SystemExit, match='^error: OPENAI_API_KEY is not set: the judge at https://api.openai.com/v1 '
                                         'needs an API key'):
        judge.evaluate(config(tmp_path, base_url=judge.defaults['base_url'], a=a, b=a))
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
    [result] = judge.evaluate(config(tmp_path, server, a=a, b=b))
    assert result['n'] == 12 and result['wins'] == 12
    pairs = {(v['completion_a'], v['completion_b']) for v in
             map(json.loads, (tmp_path / 'result.verdicts.jsonl').read_text().splitlines())}
    assert pairs == {(f' a long answer {i} {j}', f' short {i}') for i in range(6) for j in range(2)}
    part = samples_with_index(tmp_path / 'part.jsonl', prompts[:2], lambda i, j: f' short {i}')
    [result] = judge.evaluate(config(tmp_path, server, a=a, b=part))
    assert result['n'] == 4 and 'note: 4 pairs; 8 samples of' in capsys.readouterr().out
    other = samples_with_index(tmp_path / 'other.jsonl', prompts[::-1], lambda i, j: ' x')
    with pytest.raises(SystemExit, match='have different prompts at index 0: sampled from other data or splits'):
        judge.evaluate(config(tmp_path, server, a=a, b=other))
    plain = write_samples(tmp_path / 'plain.jsonl', [' x'] * 6, prompts=prompts)  # no index, no sample
    with pytest.raises(SystemExit, match=r"plain.jsonl has 3 rows for \(prompt, sample\) = "
                                         r"\('Name three fruits.', 0\), which would collapse into one pair"):
        judge.evaluate(config(tmp_path, server, a=plain, b=plain))


def test_cache_key_includes_the_server(tmp_path, server):
    """Another base_url is another judge: a local server's answers were reported as GPT-4o's."""
    a = write_samples(tmp_path / 'a.jsonl', [' one', ' two'])
    other = ChatServer()
    threading.Thread(target=other.serve_forever, args=(0.01,), daemon=True).start()
    try:
        other.reply = lambda prompt: 'I cannot decide.'
        [first] = judge.evaluate(config(tmp_path, server, a=a, b=a))
        [second] = judge.evaluate(config(tmp_path, other, a=a, b=a))
        assert (server.hits, other.hits) == (2, 2)
        assert first['unparsed'] == 0 and second['unparsed'] == 2
        assert judge.evaluate(config(tmp_path, other, a=a, b=a)) == [second] and other.hits == 2  # cached per server
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
@pytest.mark.parametrize('mode', ['pairwise', 'criteria', 'reward'])
def test_bad_sample_files_are_one_line(tmp_path, mode, content, message):
    path = tmp_path / 'samples.jsonl'
    if content is not None:
        path.write_text(content)
    files = dict(a=str(path), b=str(path)) if mode == 'pairwise' else dict(files=f'{path},')
    models = dict(reward_models=SFT) if mode == 'reward' else {}
    with pytest.raises(SystemExit, match='^error: ' + re.escape(message.format(path=path)).replace(r'\$', '$')):
        judge.evaluate(config(tmp_path, mode=mode, **models, **files))


@pytest.mark.parametrize('mode, needs', [('pairwise', 'a= and b='), ('criteria', 'files='), ('reward', 'files=')])
def test_missing_arguments_are_named(tmp_path, mode, needs):
    """`python judge.py` alone raised IsADirectoryError (a='' read as the current folder)."""
    with pytest.raises(SystemExit, match=f'^error: mode={mode} needs {re.escape(needs)}'):
        judge.evaluate(dict(judge.defaults, mode=mode))
    with pytest.raises(SystemExit, match="^error: reward_models='': needs one or more reward models"):
        label.label(dict(label.defaults, out=str(tmp_path / 'labels')))


def test_reward_mode_needs_a_trained_score_head(tmp_path):
    """A causal LM would be loaded with a random score head and give random rewards."""
    path = write_samples(tmp_path / 's.jsonl', [' x'])
    with pytest.raises(SystemExit, match=f'^error: reward_models={re.escape(SFT)} is not a reward model .*ForCausalLM'):
        judge.evaluate(config(tmp_path, mode='reward', files=path, reward_models=SFT))


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
    results = judge.evaluate(config(tmp_path, server, mode='criteria', files=f'{good},{bad}'))
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
    [result] = judge.evaluate(cfg)
    assert result['n'] == 3 == result['wins'] + result['ties'] + result['losses']
    cache = (tmp_path / 'cache.jsonl').read_text().splitlines()
    assert len(cache) == 3
    assert judge.evaluate(cfg) == [result] and len((tmp_path / 'cache.jsonl').read_text().splitlines()) == 3
    assert '(3 of 3 cached)' in capsys.readouterr().err


def test_a_local_judge_retrained_at_the_same_path_is_asked_again(tmp_path, capsys):
    """The cache served a local judge's old answers after that model was retrained in its folder: the key holds its
    files' fingerprint, as sample.py's rows do."""
    from safetensors.torch import load_file, save_file
    model = tmp_path / 'judge_model'
    shutil.copytree(SFT, model)
    a = write_samples(tmp_path / 'a.jsonl', [' one', ' two'])
    cfg = config(tmp_path, judge='hf', judge_model=str(model), a=a, b=a, max_tokens=8)
    judge.evaluate(cfg)
    weights = load_file(model / 'model.safetensors')
    save_file({k: v + 0.05 for k, v in weights.items()}, model / 'model.safetensors', metadata={'format': 'pt'})
    capsys.readouterr()
    judge.evaluate(cfg)
    assert '(0 of 2 cached)' in capsys.readouterr().err
    assert len((tmp_path / 'cache.jsonl').read_text().splitlines()) == 4


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


def labelled_data(tmp_path):
    """A data folder: 30 tiny pairs and 3 unusable rows in train, 5 pairs in test."""
    data = tmp_path / 'data'
    data.mkdir()
    lines = (REPO / 'data/tiny/train.jsonl').read_text().splitlines()[:30]
    lines += [json.dumps({'prompt': 'Hi', 'chosen': ' ', 'rejected': ' no'}), 'not json',
              json.dumps({'prompt': 'Hi', 'chosen': ' \ud83c', 'rejected': ' no'})]  # crashed the tokenizer
    (data / 'train.jsonl').write_text('\n'.join(lines) + '\n')
    (data / 'test.jsonl').write_text('\n'.join((REPO / 'data/tiny/test.jsonl').read_text().splitlines()[:5]) + '\n')
    return data, lines


def label_config(data, reward_models, out, **overrides):
    return {**label.defaults, **dict(data=str(data), reward_models=','.join(reward_models), out=str(out),
                                     batch_size=4, device='cpu'), **overrides}


def test_label_writes_rewards_and_resumes(tmp_path, reward_models, capsys):
    data, lines = labelled_data(tmp_path)
    out = tmp_path / 'labelled'
    cfg = label_config(data, reward_models, out)
    results = label.label(cfg)
    assert [(r['pairs'], r['skipped'], r['labelled_now']) for r in results] == [(30, 3, 30), (5, 0, 5)]
    assert results[0]['empty response'] == results[0]['not a JSON object'] == results[0]['invalid Unicode'] == 1
    assert (f"{data / 'train.jsonl'}: 30 pairs labelled in {out / 'train.jsonl'} (30 now; skipped 3 rows, 1 empty "
            'response, 1 invalid Unicode, 1 not a JSON object)') in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / 'train.jsonl').read_text().splitlines()]
    assert all(r['reward_models'] == reward_models for r in rows)  # which model each reward is from
    assert rows[0]['reward_provenance'] == dict(
        reward_model_fingerprints=[fingerprint(n) for n in reward_models],
        data_fingerprint=fingerprint(data / 'train.jsonl'), max_length=128, max_prompt_length=64, batch_size=4,
        scoring=label.SCORING)
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
    results = label.label(cfg)
    assert [r['labelled_now'] for r in results] == [18, 0]  # test.jsonl was finished: kept
    assert (out / 'train.jsonl').read_text() == full
    assert len(read_rows(str(out), 'test')[0]) == 5
    # another list of reward models would put two lists' labels into one file: refused, the file untouched
    for names in (reward_models[::-1], reward_models[:1]):
        with pytest.raises(SystemExit, match=f"^error: {out / 'train.jsonl'} holds labels of reward_models="
                                             f"{re.escape(','.join(reward_models))}, not {re.escape(','.join(names))}"):
            label.label(dict(cfg, reward_models=','.join(names)))
        assert (out / 'train.jsonl').read_text() == full


def test_label_refuses_what_other_data_models_or_settings_made(tmp_path, reward_models):
    """A label file records what made it; a rerun that would mix other labels into it refuses in one line, the file
    untouched: the split's data changed (labels of other data were kept), a reward model retrained (same folder, other
    weights), a setting that changes the numbers."""
    data, lines = labelled_data(tmp_path)
    models = [reward_models[0], str(tmp_path / 'rm')]
    shutil.copytree(reward_models[1], models[1])
    out = tmp_path / 'labelled'
    cfg = label_config(data, models, out)
    label.label(cfg)
    full = (out / 'train.jsonl').read_text()
    old = fingerprint(data / 'train.jsonl')
    (data / 'train.jsonl').write_text('\n'.join(lines[1:] + lines[:1]) + '\n')  # the same rows, reordered
    with pytest.raises(SystemExit, match=f"^error: {re.escape(str(out / 'train.jsonl'))} holds labels of "
                                         f"data_fingerprint={old}, not {fingerprint(data / 'train.jsonl')}; use "
                                         'another out= or delete it$'):
        label.label(cfg)
    (data / 'train.jsonl').write_text('\n'.join(lines) + '\n')
    with pytest.raises(SystemExit, match='holds labels of max_length=128, not 96; use another out='):
        label.label(dict(cfg, max_length=96))
    with pytest.raises(SystemExit, match='holds labels of batch_size=4, not 8; use another out='):
        label.label(dict(cfg, batch_size=8))
    before = [fingerprint(m) for m in models]
    torch.manual_seed(3)
    load_model(SFT, reward_model=True).save_pretrained(models[1])  # retrained: other weights, the same folder
    after = [fingerprint(m) for m in models]
    with pytest.raises(SystemExit, match=re.escape(f"holds labels of reward_model_fingerprints={','.join(before)}, "
                                                   f"not {','.join(after)}; use another out=")):
        label.label(cfg)
    assert (out / 'train.jsonl').read_text() == full
    shutil.rmtree(models[1])
    shutil.copytree(reward_models[1], models[1])  # the original weights again: resumed, nothing to do
    assert [r['labelled_now'] for r in label.label(cfg)] == [0, 0] and (out / 'train.jsonl').read_text() == full


@pytest.mark.parametrize('edit, line', [
    (lambda rows: rows[:4] + ['not json'] + rows[5:], 5),  # a garbage line inside the file
    (lambda rows: rows[:4] + ['[1, 2]'] + rows[5:], 5),  # JSON, but no row
    (lambda rows: rows[:4] + rows[5:], 5),  # a row missing: every later row would be one off
    (lambda rows: rows + rows[:1], 31),  # more lines than pairs
    (lambda rows: [json.dumps({**json.loads(rows[0]), 'prompt': 'other'})] + rows[1:], 1),  # another row
])
def test_label_refuses_foreign_or_garbled_lines(tmp_path, reward_models, edit, line):
    """A resume kept the file's parsable lines and counted on their positions: a garbage line dropped a row and shifted
    every later one. Each line must be the labelled copy of the pair at its position, else one line, file untouched."""
    data, _ = labelled_data(tmp_path)
    out = tmp_path / 'labelled'
    cfg = label_config(data, reward_models, out)
    label.label(cfg)
    path = out / 'train.jsonl'
    path.write_text('\n'.join(edit(path.read_text().splitlines())) + '\n')
    garbled = path.read_text()
    with pytest.raises(SystemExit, match=f'^error: {re.escape(str(path))} line {line} is not the labelled pair {line} '
                                         'of this data; use another out= or delete it$'):
        label.label(cfg)
    assert path.read_text() == garbled
    path.write_text(''.join(row + '\n' for row in (data / 'train.jsonl').read_text().splitlines()[:3]))
    with pytest.raises(SystemExit, match='holds labels of reward_models=\\(not recorded\\), not '):  # the data itself
        label.label(cfg)


@pytest.mark.parametrize('setting, value, message', [
    ('batch_size', 0, 'batch_size=0: need batch_size >= 1'),
    ('max_length', 64, 'max_prompt_length=64: need 0 < max_prompt_length < max_length'),
    ('max_prompt_length', 0, 'max_prompt_length=0: need 0 < max_prompt_length < max_length'),
    ('device', 'gpu', "device='gpu': need device in ('auto', 'cpu', 'cuda')"),
    ('out', '', "out='': needs a folder (for train.jsonl and test.jsonl), not a file"),
    ('out', 'FILE', "out='FILE': needs a folder (for train.jsonl and test.jsonl), not a file"),
    ('reward_models', ',', "reward_models=',': needs one or more reward models, comma-separated"),
    ('data', '', "data='': needs a data source (a file, a folder, a HF dataset name)"),
])
def test_label_settings_are_checked_before_any_work(tmp_path, setting, value, message):
    (tmp_path / 'FILE').write_text('x')
    path = str(tmp_path / 'FILE')
    cfg = {**label_config(tmp_path / 'no-data', ['no/such-model'], tmp_path / 'labels'),
           setting: path if value == 'FILE' else value}
    with pytest.raises(SystemExit, match='^error: ' + re.escape(message.replace('FILE', path))):
        label.label(cfg)
    assert not (tmp_path / 'labels').exists()


def test_label_runs_from_any_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / 'data/label.py'), '--help'], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == label.__doc__.strip().split('\n')[0]
    settings = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith('  --')]
    assert [flag.split('=')[0] for flag in settings] == [f'--{k}' for k in label.defaults]
    assert '--data=data/toy' in settings and '--batch_size=16' in settings


def test_reward_mode_means_and_kl(tmp_path, reward_models):
    rows = [json.loads(line) for line in (REPO / 'data/tiny/test.jsonl').read_text().splitlines()[:6]]
    path = tmp_path / 'samples.jsonl'
    path.write_text(''.join(json.dumps({'prompt': r['prompt'], 'completion': r['chosen'], 'kl': float(i)}) + '\n'
                            for i, r in enumerate(rows)))
    [result] = judge.evaluate(config(tmp_path, mode='reward', files=str(path), reward_models=','.join(reward_models)))
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


# -----------------------------------------------------------------------------
# settings and templates: checked before any file is read or request sent
@pytest.mark.parametrize('setting, value, message', [
    ('mode', 'gold', "mode='gold': need mode in ('pairwise', 'criteria', 'reward')"),
    ('judge', 'vllm', "judge='vllm': need judge in ('http', 'hf')"),
    ('bootstrap', 0, 'bootstrap=0: need bootstrap >= 1'),
    ('retries', -1, 'retries=-1: need retries >= 0'),
    ('concurrency', 0, 'concurrency=0: need concurrency >= 1'),
    ('timeout', 0.0, 'timeout=0.0: need timeout > 0'),
    ('timeout', float('inf'), 'timeout must be finite, got inf'),
    ('backoff', -0.5, 'backoff=-0.5: need backoff >= 0'),
    ('max_tokens', 0, 'max_tokens=0: need max_tokens >= 1'),
    ('seed', -1, 'seed=-1: need 0 <= seed < 2**64'),
    ('base_url', 'ftp://example.com/v1', 'base_url must be an http:// or https:// URL without user, query or fragment'),
    ('base_url', 'https://user:key@example.com/v1', "base_url must be an http:// or https:// URL without user, query "
                                                     "or fragment, got 'https://***@example.com/v1'"),
    ('base_url', 'localhost:8000/v1', 'base_url must be an http:// or https:// URL'),
    ('out', 'FOLDER', "out='FOLDER': is a folder; give a file path"),
    ('cache', 'FOLDER', "cache='FOLDER': is a folder; give a file path"),
])
def test_bad_settings_stop_before_any_work(tmp_path, server, setting, value, message):
    (tmp_path / 'FOLDER').mkdir()
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    folder = str(tmp_path / 'FOLDER')
    cfg = config(tmp_path, server, a=a, b=a, **{setting: folder if value == 'FOLDER' else value})
    with pytest.raises(SystemExit, match='^error: ' + re.escape(message.replace('FOLDER', folder))) as info:
        judge.evaluate(cfg)
    assert '\n' not in str(info.value) and server.hits == 0 and not (tmp_path / 'result.json').exists()


@pytest.mark.parametrize('text, message', [
    ('Which is better, {a} or {b}?', "has the fields ['a', 'b'], not ['a', 'b', 'prompt']"),  # no prompt
    ('{prompt}\n{a}\n{b}\n{response}', "has the fields ['a', 'b', 'prompt', 'response'], not ['a', 'b', 'prompt']"),
    ('{prompt}\n{a}\n{b}\nAnswer as {winner}.', "has the fields ['a', 'b', 'prompt', 'winner']"),  # a typo'd field
    ('{prompt} {0} {a} {b}', "has the fields ['0', 'a', 'b', 'prompt']"),  # str.format's positional field
])
def test_template_fields_are_checked(tmp_path, server, text, message):
    path = tmp_path / 'template.txt'
    path.write_text(text)
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    with pytest.raises(SystemExit, match=f'^error: template {re.escape(str(path))} {re.escape(message)}'):
        judge.evaluate(config(tmp_path, server, a=a, b=a, template=str(path)))
    assert server.hits == 0
    with pytest.raises(SystemExit, match='^error: template=nosuch: neither a file nor .*judge_templates/nosuch.txt'):
        judge.evaluate(config(tmp_path, server, a=a, b=a, template='nosuch'))


def test_braces_in_a_template_and_in_samples_are_text(tmp_path, server):
    """str.format failed on a literal brace (a JSON example in the instructions) and could read attributes
    ({a.__class__}); only the fields are filled, and a sample's own braces are never filled in."""
    path = tmp_path / 'template.txt'
    path.write_text('Answer as {"winner": "A"} or { }.\n{prompt}\nA: {a}\nB: {b}\n')
    a = write_samples(tmp_path / 'a.jsonl', [' {b} and {prompt}'], prompts=['Q {a}?'])
    judge.evaluate(config(tmp_path, server, a=a, b=a, template=str(path)))
    assert server.prompts == ['Answer as {"winner": "A"} or { }.\nQ {a}?\nA: {b} and {prompt}\nB: {b} and {prompt}\n']


# -----------------------------------------------------------------------------
# the API key: sent to base_url only, and in nothing printed, raised or written
@pytest.mark.parametrize('code', [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_with_the_key(tmp_path, server, monkeypatch, code):
    """urllib followed a 301/302/303 to any host with the Authorization header: the key went to whoever the server
    (or a man in the middle of plain http) named. A redirect stops the run in one line, and nothing is sent on."""
    monkeypatch.setenv('NANOTR_TEST_KEY', KEY)
    other = ChatServer()
    threading.Thread(target=other.serve_forever, args=(0.01,), daemon=True).start()
    try:
        server.script = [(code, f'{other.url}/chat/completions?stolen={KEY}')]
        a = write_samples(tmp_path / 'a.jsonl', [' x'])
        with pytest.raises(SystemExit) as info:
            judge.evaluate(config(tmp_path, server, a=a, b=a, api_key_env='NANOTR_TEST_KEY'))
        assert str(info.value) == (f'error: the judge at {server.url} answered HTTP {code}, a redirect, not followed '
                                   f'(if you trust that server, make it base_url): {other.url}/chat/completions?***')
        assert server.hits == 1 and server.auth == {f'Bearer {KEY}'}  # not retried
        assert other.hits == 0 and not other.auth
    finally:
        other.shutdown()
        other.server_close()


def test_the_key_is_redacted_wherever_a_server_echoes_it(tmp_path, server, monkeypatch, capsys):
    """A server may quote the key in its status line, an error body or the answer itself (a proxy's error page, a
    judge told to repeat its input): it reaches no message, cache, verdicts or results file."""
    monkeypatch.setenv('NANOTR_TEST_KEY', KEY)
    a = write_samples(tmp_path / 'a.jsonl', [' x', ' y'])
    cfg = config(tmp_path, server, a=a, b=a, api_key_env='NANOTR_TEST_KEY', retries=1, concurrency=1)
    server.script = ['echo_reason'] * 2
    with pytest.raises(SystemExit) as info:
        judge.evaluate(cfg)
    assert str(info.value) == (f'error: the judge at {server.url} failed 2 times, last with HTTPError: HTTP Error 500: '
                               'Internal Error with key ***')
    server.script = ['bad_key']
    with pytest.raises(SystemExit, match=r'answered HTTP 401: Incorrect API key provided: \*\*\*\. You can find'):
        judge.evaluate(cfg)
    server.reply = lambda prompt: f'My key is {KEY}.\nMore helpful: A'
    [result] = judge.evaluate(cfg)
    assert result['wins'] + result['losses'] == 2  # the verdict is still read from the redacted answer
    verdicts = (tmp_path / 'result.verdicts.jsonl').read_text()
    assert 'My key is ***.' in verdicts
    for path in tmp_path.iterdir():
        assert KEY not in path.read_text(), path
    assert KEY not in ''.join(capsys.readouterr())
    # a cache written before answers were redacted: what it holds is redacted on the way out
    (tmp_path / 'cache.jsonl').write_text((tmp_path / 'cache.jsonl').read_text().replace('***', KEY))
    assert judge.evaluate(cfg) == [result] and KEY not in (tmp_path / 'result.verdicts.jsonl').read_text()


# -----------------------------------------------------------------------------
# timeouts: one deadline for the whole request
@pytest.mark.parametrize('action', ['trickle', 'trickle_head'])
def test_a_trickled_answer_times_out_after_the_timeout(tmp_path, server, action):
    """A socket timeout bounds each read only: a server that sends a byte every 0.05 s held a request with
    timeout=0.5 for as long as it liked. The whole request now ends at the timeout, and is retried."""
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    server.script = [action]
    start = time.monotonic()
    with pytest.raises(SystemExit, match=f'^error: the judge at {server.url} failed 1 times, last with TimeoutError: '
                                         r'no whole answer within timeout=0.5 s$'):
        judge.evaluate(config(tmp_path, server, a=a, b=a, timeout=0.5, retries=0))
    assert 0.5 <= time.monotonic() - start < 1.5  # the answer would take 2 s or more
    server.script = [action]
    [result] = judge.evaluate(config(tmp_path, server, a=a, b=a, timeout=0.5, retries=1))  # the retry succeeds
    assert result['n'] == 1 and server.hits == 3


# -----------------------------------------------------------------------------
# the cache: lines that are not its answers are ignored
def test_foreign_and_garbled_cache_lines_are_ignored(tmp_path, server):
    a = write_samples(tmp_path / 'a.jsonl', [' one', ' two'])
    cfg = config(tmp_path, server, a=a, b=a)
    [first] = judge.evaluate(cfg)
    good = (tmp_path / 'cache.jsonl').read_text().splitlines()
    garbage = ['not json', '[1, 2]', '"text"', 'null', '{"key": 1, "answer": "x"}', '{"key": "k"}',
               '{"key": "k", "answer": ["A"]}', '{"other": "tool"}', '\x00\x01']
    (tmp_path / 'cache.jsonl').write_text('\n'.join(garbage[:5] + good[:1] + garbage[5:]) + '\n{"key": "cut sh')
    assert judge.evaluate(cfg) == [first] and server.hits == 3  # one answer kept, the other asked again
    assert judge.evaluate(dict(cfg, cache=str(tmp_path / 'new/cache.jsonl'))) == [first]  # in a folder made for it
    (tmp_path / 'cache.jsonl').write_bytes(b'\xff\xfe garbage\n')
    with pytest.raises(SystemExit, match=r'^error: .*cache.jsonl is not UTF-8 text'):  # one line, not a traceback
        judge.evaluate(cfg)
