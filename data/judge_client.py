"""
The HTTP client of judge.py's LLM judge (judge=http): one chat completion from any OpenAI-compatible server, with one
deadline per request, retries with backoff where retrying can help, no redirects (the API key goes to base_url and
nowhere else) and the key replaced by *** in everything that is printed, raised or written.
"""
import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from contextlib import suppress


def redact(text, cfg):
    """The text with the API key replaced by ***, at every exit: a server may echo the key anywhere it answers."""
    key = os.environ.get(cfg['api_key_env'])
    return text.replace(key, '***') if key else text


def post(url, body, headers, timeout):
    """(status, reason, Location, body) of a POST that takes `timeout` seconds at most in all: at the deadline a timer
    shuts the socket down, so a server that trickles its answer cannot hold the request (a socket timeout bounds each
    read only). http.client follows no redirect, so the key goes to `url` and nowhere else."""
    parts = urllib.parse.urlsplit(url)
    connection = (http.client.HTTPSConnection if parts.scheme == 'https' else http.client.HTTPConnection)(
        parts.hostname, parts.port, timeout=timeout)
    deadline = time.monotonic() + timeout
    connection.connect()
    sock = connection.sock

    def shut_down():  # unless the request ended as the timer fired: then the socket may be closed
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    timer = threading.Timer(deadline - time.monotonic(), shut_down)
    timer.start()
    try:
        connection.request('POST', url.split(parts.netloc, 1)[1], body, headers)
        response = connection.getresponse()
        return response.status, response.reason, response.getheader('Location'), response.read()
    except Exception:
        if time.monotonic() < deadline:
            raise
        raise TimeoutError(f'no whole answer within timeout={timeout} s') from None
    finally:
        timer.cancel()
        connection.close()


def http_answer(prompt, cfg):
    """One chat completion, retried with exponential backoff after a 429, a 5xx, a timeout or a malformed body; the
    last failure stops the run in one line, and so does at once a failure that retrying cannot change: a redirect,
    another 4xx (with the server's message), a refused connection, an unknown host."""
    key = os.environ.get(cfg['api_key_env'])  # sent, never printed or written
    headers = {'Content-Type': 'application/json', **({'Authorization': f'Bearer {key}'} if key else {})}
    body = json.dumps({'model': cfg['judge_model'], 'messages': [{'role': 'user', 'content': prompt}],
                       'temperature': 0, 'max_tokens': cfg['max_tokens']}).encode()
    url, where = cfg['base_url'].rstrip('/') + '/chat/completions', f"the judge at {cfg['base_url']}"
    for attempt in range(cfg['retries'] + 1):
        try:
            status, reason, location, data = post(url, body, headers, cfg['timeout'])
            if 300 <= status < 400:  # following it would send the key wherever it points
                raise SystemExit(f'error: {where} answered HTTP {status}, a redirect to {location}: not followed; if '
                                 'you trust that server, make it base_url')
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
            if status < 300:
                content = json.loads(data)['choices'][0]['message']['content']
                if isinstance(content, str):
                    return content
                error = 'TypeError: malformed answer: the message content is not text'
        except (ConnectionRefusedError, socket.gaierror) as e:  # no server, or no network
            raise SystemExit(f'error: cannot reach {where}: {e}')
        except Exception as e:  # timeouts, dropped connections, bodies that are not chat completions
            error = f'{type(e).__name__}: {e}'
        time.sleep(cfg['backoff'] * 2 ** attempt if attempt < cfg['retries'] else 0)
    raise SystemExit(f"error: {where} failed {cfg['retries'] + 1} times, last with {' '.join(error.split())}")
