"""
The HTTP client of judge.py's LLM judge (judge=http): one chat completion from any OpenAI-compatible server, on the
networks users have. HTTP_PROXY, HTTPS_PROXY and NO_PROXY (either case) are honoured as urllib honours them: https
through a CONNECT tunnel, http with the absolute URI, the proxy's credentials sent to the proxy alone. One deadline per
request; an answer of at most MAX_BODY bytes; retries with backoff where retrying can help (a 429 or 503 that says
Retry-After is waited for, within the retries' budget); at once one line where it cannot (another 4xx, a refused
connection, an unknown host, a TLS failure such as a plain-http server at an https:// URL); no redirects, so the API
key goes to base_url and nowhere else. Every form of the key and of the proxy's password, and every URL's user,
query and fragment, are replaced by *** in all that is printed, raised or written.
"""
import base64
import email.utils
import http.client
import json
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from contextlib import suppress

MAX_BODY = 16 * 2**20  # bytes of an answer read at most: a chat completion is kilobytes; a longer body fails its try
# a URL and its parts: scheme, user (up to the last @), host and path, query, fragment
URL = re.compile(r'''(\b[a-zA-Z][\w+.-]*://)([^\s"'<>?#]*@)?([^\s"'<>?#]*)(\?[^\s"'<>#]*)?(#[^\s"'<>]*)?''')


def redact_url(text):
    """The text with the user part, query and fragment of every URL in it replaced by *** (keys and tokens are put
    there: https://user:key@host, ?api-key=...)."""
    return URL.sub(lambda m: m[1] + ('***@' if m[2] else '') + m[3] + ('?***' if m[4] else '')
                   + ('#***' if m[5] else ''), text)


def secrets(cfg):
    """Every form in which a secret of this client could come back: the API key as set, stripped, and escaped as
    repr() and JSON write it (a key read from a file ends with a newline); a proxy's password, user:password and the
    Basic credentials sent to it, as written and percent-decoded. Longest first, so none is left in part."""
    raw = os.environ.get(cfg['api_key_env'], '')
    values = {raw, raw.strip()}
    for name, proxy in urllib.request.getproxies_environment().items():
        parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
        if name != 'no' and parts.password:
            values |= {parts.password, urllib.parse.unquote(parts.password), f'{parts.username}:{parts.password}',
                       basic_credentials(parts)}
    forms = {form for v in values for form in (v, repr(v)[1:-1], json.dumps(v)[1:-1]) if form.strip()}
    return sorted(forms, key=len, reverse=True)


def redact(text, cfg):
    """The text with every secret (secrets()) and every URL's user, query and fragment replaced by ***, at every exit:
    a server or proxy may echo them anywhere it answers."""
    for secret in secrets(cfg):
        text = text.replace(secret, '***')
    return redact_url(text)


def api_key(cfg):
    """The API key, without the whitespace around it, or None when unset or blank. A key with a character inside
    that no header can carry stops the run in one line (http.client would raise with the header's repr: the key)."""
    key = os.environ.get(cfg['api_key_env'], '').strip()
    if not key.isprintable():
        raise SystemExit(f"error: {cfg['api_key_env']} holds a line break or another control character inside the "
                         'key: not a usable API key')
    return key or None


def basic_credentials(proxy):
    user, password = (urllib.parse.unquote(v or '') for v in (proxy.username, proxy.password))
    return 'Basic ' + base64.b64encode(f'{user}:{password}'.encode()).decode()


def proxy_for(url):
    """The proxy (a split URL) that urllib would use for url: HTTPS_PROXY or HTTP_PROXY by its scheme, unless
    NO_PROXY names its host; None for none. The proxy is spoken to in plain HTTP, as urllib does; another scheme
    (socks5://) stops the run in one line."""
    parts, proxies = urllib.parse.urlsplit(url), urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass_environment(parts.netloc, proxies):
        return None
    proxy = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
    if proxy.scheme != 'http' or not proxy.hostname:
        raise SystemExit(f'error: the {parts.scheme} proxy {redact_url(proxy.geturl())} (from {parts.scheme}_proxy) '
                         'is not an http:// proxy, which is all this client speaks to')
    return proxy


def post(url, body, headers, timeout):
    """(status, reason, headers, body) of a POST that takes `timeout` seconds at most in all: at the deadline a timer
    shuts the socket down, so a server that trickles its answer cannot hold the request (a socket timeout bounds each
    read only). A body over MAX_BODY bytes fails. Through proxy_for(url)'s proxy, if any. http.client follows no
    redirect, so the key goes to `url` (and the proxy's credentials to the proxy) and nowhere else."""
    parts, proxy = urllib.parse.urlsplit(url), proxy_for(url)
    https = parts.scheme == 'https'
    connection = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
        *((proxy.hostname, proxy.port or 80) if proxy else (parts.hostname, parts.port)), timeout=timeout)
    target = url.split(parts.netloc, 1)[1]
    if proxy:
        credentials = {'Proxy-Authorization': basic_credentials(proxy)} if proxy.username else {}
        if https:  # a tunnel: the proxy sees the host, never the request or the key
            connection.set_tunnel(parts.hostname, parts.port or 443, headers=credentials)
        else:
            target, headers = url, {**headers, **credentials}
    deadline = time.monotonic() + timeout

    def shut_down():  # whatever socket the request is on: the proxy's, the server's, in its TLS handshake
        with suppress(OSError, AttributeError):
            connection.sock.shutdown(socket.SHUT_RDWR)
    timer = threading.Timer(timeout, shut_down)
    timer.daemon = True  # a Ctrl-C'd run does not wait for the timers of the requests in flight
    timer.start()
    try:
        connection.request('POST', target, body, headers)
        response = connection.getresponse()
        data = response.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise ValueError(f'an answer over MAX_BODY = {MAX_BODY} bytes (not read further)')
        if response.length:  # read(n) returns what came before the connection ended (read() would raise this)
            raise http.client.IncompleteRead(data, response.length)
        return response.status, response.reason, response.headers, data
    except Exception:
        if time.monotonic() < deadline:
            raise
        raise TimeoutError(f'no whole answer within timeout={timeout} s') from None
    finally:
        timer.cancel()
        connection.close()


def retry_after(headers):
    """The seconds a 429 or 503 asks to wait (OpenAI's retry-after-ms, Retry-After in seconds or as a date), or None."""
    with suppress(TypeError, ValueError):
        if headers.get('retry-after-ms'):
            return max(0.0, float(headers['retry-after-ms']) / 1000)
        value = headers.get('retry-after', '').strip()
        if re.fullmatch(r'\d+(\.\d+)?', value):
            return float(value)
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


def http_answer(prompt, cfg):
    """One chat completion, retried with exponential backoff (backoff, 2·backoff, ...) after a 429, a 5xx, a timeout,
    a dropped connection or a malformed or oversized body; a 429 or 503 with Retry-After waits as long as it asks,
    within the retries' budget: the backoff's waits added up, backoff·(2^retries − 1) seconds, so that no server holds
    a request longer than (retries + 1)·timeout plus that. The last failure stops the run in one line, and so does at
    once a failure that retrying cannot change: a redirect, another 4xx (with the server's message), a refused
    connection, an unknown host, a TLS failure, a proxy that refuses the tunnel."""
    key = api_key(cfg)  # sent, never printed or written
    headers = {'Content-Type': 'application/json', **({'Authorization': f'Bearer {key}'} if key else {})}
    body = json.dumps({'model': cfg['judge_model'], 'messages': [{'role': 'user', 'content': prompt}],
                       'temperature': 0, 'max_tokens': cfg['max_tokens']}).encode()
    url, where = cfg['base_url'].rstrip('/') + '/chat/completions', f"the judge at {cfg['base_url']}"
    proxy = proxy_for(url)
    through = f' through the proxy {redact_url(proxy.geturl())}' if proxy else ''
    budget = cfg['backoff'] * (2 ** cfg['retries'] - 1)
    for attempt in range(cfg['retries'] + 1):
        wait = cfg['backoff'] * 2 ** attempt
        try:
            status, reason, answer_headers, data = post(url, body, headers, cfg['timeout'])
            if 300 <= status < 400:  # following it would send the key wherever it points
                raise SystemExit(f'error: {where} answered HTTP {status}, a redirect, not followed (if you trust that '
                                 f"server, make it base_url): {answer_headers.get('Location')}")
            if 400 <= status < 500 and status != 429:  # 400, 401, 404: retrying cannot help
                try:  # OpenAI's {"error": {"message": ...}}, else the body
                    message = json.loads(data)['error']
                    message = message.get('message', message) if isinstance(message, dict) else message
                except (ValueError, KeyError, TypeError):
                    message = data.decode('utf-8', 'replace') or reason
                # on one line, redacted before it is cut (which could leave a part of the key)
                raise SystemExit(f'error: {where} answered HTTP {status}: '
                                 + ' '.join(redact(str(message), cfg).split())[:500])
            error = f'HTTPError: HTTP Error {status}: {reason}'  # a 429 or a 5xx, retried
            asked = retry_after(answer_headers) if status in (429, 503) else None
            if asked is not None:
                wait = max(wait, asked)
                error += f' (Retry-After {asked:g} s)'
            if status < 300:
                content = json.loads(data)['choices'][0]['message']['content']
                if isinstance(content, str):
                    return content
                error = 'TypeError: malformed answer: the message content is not text'
        except (ConnectionRefusedError, socket.gaierror) as e:  # no server, or no network
            raise SystemExit(f'error: cannot reach {where}{through}: {e}')
        except ssl.SSLError as e:
            if isinstance(e, ssl.SSLEOFError):  # a connection dropped in TLS: as any dropped connection
                error = f'{type(e).__name__}: {e}'
            else:  # a certificate or protocol failure, at once: a plain-http server answers an https:// URL so
                plain = ' (a plain-http server? then base_url is http://)' if 'VERSION' in str(e).upper() else ''
                raise SystemExit(f"error: no TLS connection to {where}{through}: {' '.join(str(e).split())}{plain}")
        except OSError as e:
            if str(e).startswith('Tunnel connection failed: 4'):  # the proxy refuses: 403, 407
                raise SystemExit(f'error: cannot reach {where}{through}: {e}')
            error = f'{type(e).__name__}: {e}'
        except Exception as e:  # timeouts, dropped connections, bodies that are not chat completions
            error = f'{type(e).__name__}: {e}'
        if attempt < cfg['retries']:
            wait = min(wait, budget)
            budget -= wait
            time.sleep(wait)
    raise SystemExit(f"error: {where} failed {cfg['retries'] + 1} times, last with {' '.join(error.split())}")
