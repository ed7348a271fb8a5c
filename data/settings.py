"""
The command line of every script (train_tr.py, sample.py, judge.py, data/label.py, ...): module-level defaults or a
`defaults = dict(...)`, each with a comment on its line, overridden by config files and --key=value arguments, listed by
--help, and checked against a table of valid values before any work starts.
"""
import ast
import difflib
import math
import os
import re
from pathlib import Path


def parse_overrides(argv, defaults, source):
    """The defaults, then each argument in order: a config file (`name.py` of `key = value` lines, run as Python; its
    other names are its own) or --key=value (a Python literal, else text; a string setting always takes the text).
    Unknown keys (with the nearest known one), values of another type than the default and anything else stop in one
    `error:` line; -h/--help prints the settings of `source`, the script the defaults belong to."""
    if {'-h', '--help'} & set(argv):
        print(settings_help(source, defaults))
        raise SystemExit(0)
    cfg = dict(defaults)
    for arg in argv:
        if '=' in arg:
            key, value = arg.removeprefix('--').split('=', 1)
            try:
                overrides = {key: value if isinstance(cfg.get(key), str) else ast.literal_eval(value)}
            except (ValueError, SyntaxError):
                overrides = {key: value}  # not a Python literal: text, for the type check to name
        elif not (arg.endswith('.py') and Path(arg).is_file()):  # `train_tr.py data.jsonl` must not run as Python
            raise SystemExit(f'error: {arg}: settings are given as --key=value (--help lists them)' if arg[0] == '-'
                             else f'error: config file {arg} not found' if arg.endswith('.py') else
                             f'error: {arg} is not a config file (a .py file of `key = value` lines); data is given '
                             f'as --data={arg}')
        else:
            namespace = {}
            try:
                exec(Path(arg).read_text(), namespace)
            except Exception as e:
                raise SystemExit(f'error: config file {arg}: {type(e).__name__}: {e}')
            overrides = {k: v for k, v in namespace.items()  # a setting set to None is checked, and refused
                         if k in cfg or (not k.startswith('_') and isinstance(v, (bool, int, float, str)))}
        for key, value in overrides.items():
            if key not in cfg:
                near = difflib.get_close_matches(key, cfg, n=1)
                raise SystemExit(f'error: unknown config key {key!r} (from {arg!r})' +
                                 (f'; did you mean {near[0]}?' if near else f'; known keys: {", ".join(cfg)}'))
            if isinstance(cfg[key], float) and type(value) is int:
                value = float(value)
            if type(value) is not type(cfg[key]):
                raise SystemExit(f'error: {key} must be {type(cfg[key]).__name__}, got {value!r} (from {arg!r})')
            cfg[key] = os.path.expanduser(value) if isinstance(value, str) and value.startswith('~') else value
    return cfg


def settings_help(source, defaults):
    """--help: the first paragraph of the script's docstring, then each setting with its default as written in
    `source` and the comment on its line there (the one place a setting is described)."""
    docstring, _, code = Path(source).read_text().partition('"""')[2].partition('"""')
    written = {}  # setting -> (its default as written, the comment of its line)
    for line in code.split('\n'):
        settings, _, comment = line.partition('  #')
        for key, value in re.findall(r"(\w+)\s*=\s*('[^']*'|[^,\s]+)", settings if comment else ''):
            written.setdefault(key, (value, comment.strip()))
    shown = {k: (v or "''") if isinstance(v, str) else written.get(k, (repr(v),))[0] for k, v in defaults.items()}
    rows = [(f'--{k}={shown[k]}', written.get(k, ('', ''))[1]) for k in defaults]
    width = max(len(flag) for flag, _ in rows)
    return '\n'.join([docstring.strip().split('\n\n')[0], '',
                      f'usage: python {Path(source).name} [config.py ...] [--key=value ...]   (settings, defaults):',
                      *(f'  {flag:<{width}}  {meaning}'.rstrip() for flag, meaning in rows)])


def check_settings(cfg, valid):
    """Stops in one line on a setting outside its valid values: `valid` maps settings to (test, what it must be)."""
    for key, value in cfg.items():
        test, what = valid.get(key, (lambda v: True, ''))
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f'error: {key} must be finite, got {value}')
        if not test(value):
            raise SystemExit(f'error: {key} must be {what}, got {value!r}')


def one_of(*options):
    return lambda v: v in options, 'one of ' + ', '.join(options)
