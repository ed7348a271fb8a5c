"""data/judge_client.py on the networks users have: HTTP(S)_PROXY and NO_PROXY (a CONNECT tunnel for https, the
absolute URI for http, the proxy's credentials sent to it alone and never shown), Retry-After within the retries'
budget, a cap on an answer's size, a TLS failure at once, and the API key in any form (a trailing newline from a
file, in base_url) in no message or file. Local servers and a tiny proxy on 127.0.0.1, threads of this process."""
import base64
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.parse
from contextlib import suppress

import pytest

import judge
from data import judge_client
from test_judge import KEY, ChatServer, config, no_proxy_settings, server, write_samples  # noqa: F401

PROXY_PASSWORD = 'pr0xy-p@ss-S3CRET'
PROXY_USERINFO = f"puser:{urllib.parse.quote(PROXY_PASSWORD, safe='')}"


class Proxy(socketserver.ThreadingTCPServer):
    """A tiny HTTP proxy: CONNECT host:port opens a tunnel, an absolute-URI request is sent on to its host; or, with
    `refuse`, every request gets that status line. Keeps each request's line and headers."""
    daemon_threads = allow_reuse_address = True

    def __init__(self, refuse=None):
        super().__init__(('127.0.0.1', 0), ProxyHandler)
        self.requests, self.refuse = [], refuse
        self.url = f'http://{PROXY_USERINFO}@127.0.0.1:{self.server_address[1]}'
        threading.Thread(target=self.serve_forever, args=(0.01,), daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


def relay(client, upstream):
    """Copies bytes both ways until each side has said all it will."""
    def pump(source, target):
        with suppress(OSError):
            while data := source.recv(2**16):
                target.sendall(data)
        with suppress(OSError):
            target.shutdown(socket.SHUT_WR)
    thread = threading.Thread(target=pump, args=(client, upstream), daemon=True)
    thread.start()
    pump(upstream, client)
    thread.join(5)
    upstream.close()


class ProxyHandler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline().decode().strip()
        headers = {}
        while (header := self.rfile.readline().decode()).strip():
            name, value = header.split(':', 1)
            headers[name.strip().lower()] = value.strip()
        self.server.requests.append((line, headers))
        if self.server.refuse:
            self.wfile.write(f'HTTP/1.1 {self.server.refuse}\r\nContent-Length: 0\r\n\r\n'.encode())
            return
        method, target, version = line.split()
        if method == 'CONNECT':
            host, port = target.rsplit(':', 1)
            upstream = socket.create_connection((host, int(port)))
            self.wfile.write(b'HTTP/1.1 200 Connection established\r\n\r\n')
        else:
            parts = urllib.parse.urlsplit(target)
            upstream = socket.create_connection((parts.hostname, parts.port))
            body = self.rfile.read(int(headers.get('content-length', 0)))
            sent = ''.join(f'{k}: {v}\r\n' for k, v in headers.items() if k != 'proxy-authorization')
            upstream.sendall(f'{method} {parts.path} {version}\r\n{sent}\r\n'.encode() + body)
        relay(self.connection, upstream)


@pytest.fixture
def proxy():
    proxy = Proxy()
    yield proxy
    proxy.close()


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """The chat server over TLS, with a self-signed certificate for 127.0.0.1 that the client trusts
    (SSL_CERT_FILE)."""
    if shutil.which('openssl') is None:
        pytest.skip('the openssl command is needed to make a certificate')
    cert, key = tmp_path / 'cert.pem', tmp_path / 'key.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert,
                    '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'], check=True,
                   capture_output=True)
    monkeypatch.setenv('SSL_CERT_FILE', str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ChatServer()
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.url = server.url.replace('http://', 'https://')
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def basic(userinfo):
    user, password = (urllib.parse.unquote(v) for v in userinfo.split(':'))
    return 'Basic ' + base64.b64encode(f'{user}:{password}'.encode()).decode()


def test_http_goes_through_http_proxy_unless_no_proxy_names_the_host(tmp_path, server, proxy, monkeypatch, capsys):
    """The client ignored HTTP_PROXY: on a network whose only way out is a proxy it could not reach the judge."""
    monkeypatch.setenv('NANOTR_TEST_KEY', KEY)
    monkeypatch.setenv('HTTP_PROXY', proxy.url)
    a = write_samples(tmp_path / 'a.jsonl', [' x', ' y'])
    [result] = judge.evaluate(config(tmp_path, server, a=a, b=a, api_key_env='NANOTR_TEST_KEY', concurrency=1))
    assert result['n'] == 2 and server.hits == 2 and len(proxy.requests) == 2
    line, headers = proxy.requests[0]
    assert line == f'POST {server.url}/chat/completions HTTP/1.1'  # the absolute URI
    assert headers['proxy-authorization'] == basic(PROXY_USERINFO)  # the proxy's credentials, to the proxy only
    assert server.auth == {f'Bearer {KEY}'} and server.proxy_auth == {None}
    monkeypatch.setenv('NO_PROXY', 'example.com,127.0.0.1')
    judge.evaluate(config(tmp_path, server, a=a, b=a, cache=''))
    assert server.hits == 4 and len(proxy.requests) == 2  # NO_PROXY: straight to the server
    assert PROXY_PASSWORD not in ''.join(capsys.readouterr())


def test_https_goes_through_a_connect_tunnel(tmp_path, tls_server, proxy, monkeypatch):
    """HTTPS_PROXY (here lowercase): CONNECT host:port, then TLS to the server inside the tunnel, so the proxy sees
    neither the request nor the key."""
    monkeypatch.setenv('NANOTR_TEST_KEY', KEY)
    monkeypatch.setenv('https_proxy', proxy.url)
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    [result] = judge.evaluate(config(tmp_path, tls_server, a=a, b=a, api_key_env='NANOTR_TEST_KEY'))
    assert result['n'] == 1 and tls_server.hits == 1 and tls_server.auth == {f'Bearer {KEY}'}
    [(line, headers)] = proxy.requests
    port = urllib.parse.urlsplit(tls_server.url).port
    assert line.startswith(f'CONNECT 127.0.0.1:{port} HTTP/1.') and 'authorization' not in headers
    assert headers['proxy-authorization'] == basic(PROXY_USERINFO)


@pytest.mark.parametrize('scheme', ['https', 'http'])
def test_a_proxy_that_refuses_stops_at_once_without_showing_its_password(tmp_path, tls_server, server, monkeypatch,
                                                                         scheme):
    """A 407 from the proxy is not retried, and its message (here echoing the credentials) shows none of them."""
    proxy = Proxy(refuse=f'407 Proxy Authentication Required for {PROXY_USERINFO} {PROXY_PASSWORD}')
    try:
        monkeypatch.setenv(f'{scheme.upper()}_PROXY', proxy.url)
        a = write_samples(tmp_path / 'a.jsonl', [' x'])
        start = time.monotonic()
        with pytest.raises(SystemExit) as info:
            judge.evaluate(config(tmp_path, tls_server if scheme == 'https' else server, a=a, b=a, backoff=1.0))
        assert time.monotonic() - start < 1.0 and len(proxy.requests) == 1
        message = str(info.value)
        assert message.startswith('error: ') and '407' in message and '\n' not in message
        assert PROXY_PASSWORD not in message and urllib.parse.quote(PROXY_PASSWORD, safe='') not in message
    finally:
        proxy.close()


def test_a_proxy_of_another_kind_is_refused_in_one_line(tmp_path, server, monkeypatch):
    monkeypatch.setenv('HTTP_PROXY', f'socks5://{PROXY_USERINFO}@127.0.0.1:1080')
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    with pytest.raises(SystemExit, match=r'^error: the http proxy socks5://\*\*\*@127.0.0.1:1080 .* is not an '
                                         r'http:// proxy') as info:
        judge.evaluate(config(tmp_path, server, a=a, b=a))
    assert 'p@ss' not in str(info.value) and server.hits == 0


def test_retry_after_is_waited_for_within_the_retries_budget(tmp_path, server):
    """A 429 or 503 that says how long to wait was retried after the backoff (0.01 s here) and failed again; now
    it waits as asked, as long as the retries' budget, backoff·(2^retries − 1), allows."""
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    for headers, wait in [({'Retry-After': '0.5'}, 0.5), ({'retry-after-ms': '400'}, 0.4)]:
        server.script = [{'status': 429 if 'Retry-After' in headers else 503, 'headers': headers}]
        start = time.monotonic()
        [result] = judge.evaluate(config(tmp_path, server, a=a, b=a, cache='', retries=6))  # budget 0.63 s
        assert result['n'] == 1 and wait <= time.monotonic() - start < wait + 1.0
    server.script = [{'status': 429, 'headers': {'Retry-After': '100'}}] * 3
    start = time.monotonic()
    with pytest.raises(SystemExit, match=f'^error: the judge at {server.url} failed 3 times, last with HTTPError: '
                                         r'HTTP Error 429: Too Many Requests \(Retry-After 100 s\)$'):
        judge.evaluate(config(tmp_path, server, a=a, b=a, cache='', retries=2, backoff=0.1))  # budget 0.3 s
    assert 0.3 <= time.monotonic() - start < 1.5


def test_an_endless_answer_fails_its_try_at_the_size_cap(tmp_path, server, monkeypatch):
    """An answer without end was read until the deadline: 2.5 GB in 3 s. At most MAX_BODY bytes are read (16 MiB;
    1 MiB here), then that try fails and the next one is sent."""
    assert judge_client.MAX_BODY == 16 * 2**20
    monkeypatch.setattr(judge_client, 'MAX_BODY', 2**20)
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    server.script = ['endless']
    with pytest.raises(SystemExit, match=f'^error: the judge at {server.url} failed 1 times, last with ValueError: an '
                                         f'answer over MAX_BODY = {2**20} bytes'):
        judge.evaluate(config(tmp_path, server, a=a, b=a, cache='', retries=0, timeout=30.0))
    assert server.sent < 16 * 2**20  # the client stopped reading (the server had 64 MiB to send)
    server.script = ['endless']
    [result] = judge.evaluate(config(tmp_path, server, a=a, b=a, cache='', retries=1, timeout=30.0))
    assert result['n'] == 1


def test_a_plain_http_server_at_an_https_url_fails_at_once(tmp_path, server):
    """The TLS handshake's failure was retried like a dropped connection: 34 s of backoff for a wrong URL."""
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    https = server.url.replace('http://', 'https://')
    start = time.monotonic()
    with pytest.raises(SystemExit, match=f'^error: no TLS connection to the judge at {https}: .*WRONG_VERSION_NUMBER.* '
                                         r'\(a plain-http server\? then base_url is http://\)$'):
        judge.evaluate(config(tmp_path, server, a=a, b=a, base_url=https, retries=3, backoff=0.5))
    assert time.monotonic() - start < 0.5 and server.hits == 0


@pytest.mark.parametrize('value', [KEY + '\n', f'  {KEY}\r\n'])
def test_a_key_read_from_a_file_is_sent_stripped_and_shown_in_no_form(tmp_path, server, monkeypatch, capsys, value):
    """A key with a trailing newline made http.client raise with the header's repr, and that escaped key was printed
    (redaction knew only the raw form). The key is stripped; no form of it reaches any message or file."""
    monkeypatch.setenv('NANOTR_TEST_KEY', value)
    a = write_samples(tmp_path / 'a.jsonl', [' x', ' y'])
    cfg = config(tmp_path, server, a=a, b=a, api_key_env='NANOTR_TEST_KEY', retries=1, concurrency=1)
    server.script = ['bad_key']
    with pytest.raises(SystemExit) as info:
        judge.evaluate(cfg)
    assert server.auth == {f'Bearer {KEY}'} and 'provided: ***.' in str(info.value)
    server.reply = lambda prompt: f'Your key is {value!r}, {KEY}.\nMore helpful: A'
    judge.evaluate(cfg)
    messages = [str(info.value), *capsys.readouterr()] + [p.read_text() for p in tmp_path.iterdir()]
    assert not any(KEY in text for text in messages)


def test_a_key_that_no_header_can_carry_is_one_line_without_it(tmp_path, server, monkeypatch):
    monkeypatch.setenv('NANOTR_TEST_KEY', f'{KEY}\nsecond-line')
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    with pytest.raises(SystemExit, match='^error: NANOTR_TEST_KEY holds a line break or another control character '
                                         'inside the key: not a usable API key$'):
        judge.evaluate(config(tmp_path, server, a=a, b=a, api_key_env='NANOTR_TEST_KEY'))
    assert server.hits == 0


@pytest.mark.parametrize('url', [f'https://user:{KEY}@example.com/v1', f'https://example.com/v1?api-key={KEY}',
                                 f'https://example.com/v1#{KEY}', f'https://user:{KEY}/x@example.com/v1'])
def test_a_key_in_base_url_is_not_printed_in_the_refusal(tmp_path, url):
    a = write_samples(tmp_path / 'a.jsonl', [' x'])
    with pytest.raises(SystemExit, match='^error: base_url must be an http:// or https:// URL without user, query or '
                                         r"fragment, got 'https://.*\*\*\*") as info:
        judge.evaluate(config(tmp_path, a=a, b=a, base_url=url))
    assert KEY not in str(info.value)
