"""
The command line of every script (train_tr.py, sample.py, judge.py, data/label.py, ...): module-level defaults or a
`defaults = dict(...)`, each with a comment on its line, overridden by config files and --key=value arguments, listed by
--help, and checked against a table of valid values before any work starts; and the rules of every script's outputs:
none is one of its inputs, and one run at a time writes it (a lock).
"""
import ast
import difflib
import fcntl
import math
import os
import re
from pathlib import Path

AT_LEAST_1, NOT_NEGATIVE = (lambda v: v >= 1, '>= 1'), (lambda v: v >= 0, '>= 0')
DEVICES = ('auto', 'cpu', 'cuda')


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


def check_unused(cfg, defaults, applies):
    """Stops in one line on a setting changed from its default that does nothing in this run: `applies` maps settings
    to (test of the config: does the setting act, what it applies to). A value that is ignored is a mistake, or an
    expectation the run does not meet."""
    for key, (acts, what) in applies.items():
        if cfg[key] != defaults[key] and not acts(cfg):
            raise SystemExit(f'error: {key}= applies to {what} only, and does nothing in this run; leave it out')


def check_outputs(outputs, inputs):
    """Stops in one line, before any work, when a run would write over what it reads: an output path (resolved) that
    is an input, or a file among an input folder's top-level files (a model folder's fingerprint, data/pairs.py,
    covers them: a model's own samples or cache written there would change it), or two outputs that are one file.
    outputs and inputs are (setting, path) pairs; '' is no path. Data folders are given as the split files read."""
    resolved = [(setting, path, Path(path).resolve()) for setting, path in inputs if path]
    written = {}
    for setting, path in outputs:
        if not path:
            continue
        out = Path(path).resolve()
        if out in written:
            raise SystemExit(f'error: {setting} would write {path}, which {written[out]} also writes; give each its '
                             'own path')
        written[out] = setting
        for name, given, source in resolved:
            if out == source or (out.parent == source and source.is_dir()):
                what = 'is' if out == source else 'is a file in the folder of'
                raise SystemExit(f'error: {setting} would write {path}, which {what} {name}={given}, an input of '
                                 f'this run: it would change what it reads; use another {setting}=')


class OutputLock:
    """An exclusive lock on a run's output, held until release() (or the end of a with block, or of the process,
    even by kill -9): flock on the file `path`, which exists while the lock is held and is removed on release. A second
    run is refused in one line naming the file; it creates nothing (the lock file and its folder are the holder's).
    release() also removes the folders that the lock created and that are still empty, so a run refused after taking
    it leaves nothing behind. A lock file left by a killed run is taken over by the next one."""
    def __init__(self, path, what, setting):
        self.path = Path(path)
        self.created = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        while True:  # until the locked file is the one at `path` (a holder may remove it between open and flock)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a file where a folder should be, a read-only or full disk
                self.remove_created()
                raise SystemExit(f'error: cannot write {what} ({setting}): {e.strerror or e}')
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                self.remove_created()
                raise SystemExit(f'error: another run is writing {what} (it holds {self.path}); wait for it to end, '
                                 f'or use another {setting}=')
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    return
            except FileNotFoundError:
                pass
            os.close(self.fd)

    def remove_created(self):
        for folder in self.created:  # innermost first; a folder someone wrote into stays
            try:
                folder.rmdir()
            except OSError:
                return

    def release(self):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before the lock goes: a later run then makes its own file
            os.close(self.fd)
            self.fd = None
            self.remove_created()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
