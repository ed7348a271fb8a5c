"""
The command line of every script (train_tr.py, sample.py, judge.py, data/label.py, ...). A script's settings are its
annotated module-level globals, one line each, the way nanoGPT's config block reads:

    beta: need('beta > 0') = 0.1              # KL strength β

the name, its check (need below; a plain `str` or `bool` annotation checks nothing), the default and, after `#`, what
it means (--help prints that comment and any comment lines right below it). Config files and --key=value arguments
override the defaults, and every value is checked before any work starts. And the rules of every script's outputs:
none is one of its inputs (check_outputs), and one run at a time writes it (OutputLock). train_tr.py ends through
exit_process.
"""
import ast
import atexit
import difflib
import fcntl
import importlib.util
import math
import os
import re
import sys
from collections import namedtuple
from pathlib import Path

# A setting's check. condition: a Python expression over the settings (their names are variables; the script's
# globals are visible) that every value must satisfy. only: an expression under which the setting does anything at
# all; another value than the default is refused where it is false, since it would be silently ignored. resumable:
# train_tr.py --resume=True may change it. why: the error's wording, when the condition itself would not say it.
Rule = namedtuple('Rule', 'condition only resumable why')


def need(condition='True', only=None, resumable=False, why=None):
    return Rule(condition, only, resumable, why)


def one_of(*options, **kwargs):  # a setting that takes one of a few names ({name}: the setting, bound by `declared`)
    return need(f'{{name}} in {options!r}', **kwargs)


# checks that several scripts share
RESUMABLE = need(resumable=True)
DEVICE = one_of('auto', 'cpu', 'cuda', resumable=True)  # where a run computes: a resume may move it
PROMPT_FITS = need('0 < max_prompt_length < max_length')  # the prompt keeps its last tokens, the response the rest
NOT_A_FOLDER = need("not ({name} and Path({name}).is_dir())", why='is a folder; give a file path')


def importable(module):
    return importlib.util.find_spec(module) is not None


def declared(namespace):
    """{name: (default, Rule)} of a script's settings: its annotated globals, in the order they are written."""
    settings = {}
    for name, note in namespace['__annotations__'].items():
        note = note if isinstance(note, Rule) else need()
        settings[name] = namespace[name], note._replace(condition=note.condition.replace('{name}', name),
                                                          only=note.only and note.only.replace('{name}', name))
    return settings


def defaults_of(namespace):
    return {name: default for name, (default, _) in declared(namespace).items()}


def check_settings(cfg, namespace):
    """Stops in one line on a setting outside its rule, or set to something other than its default where it does
    nothing (its rule's `only`). The rules are evaluated with the script's globals and the settings as variables."""
    scope = {'Path': Path, 'importable': importable, **namespace}
    for key, (default, note) in declared(namespace).items():
        value = cfg[key]
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f'error: {key} must be finite, got {value}')
        if not eval(note.condition, scope, dict(cfg)):
            raise SystemExit(f'error: {key}={value!r}: {note.why or "need " + note.condition}')
    for key, (default, note) in declared(namespace).items():
        if note.only and cfg[key] != default and not eval(note.only, scope, dict(cfg)):
            raise SystemExit(f'error: {key}={cfg[key]!r} does nothing unless {note.only}; leave it at its default '
                             f'({default!r})')


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
    `source` and its comment there (the comment of its line, and comment lines right below it)."""
    text = Path(source).read_text()
    lines, written = text.split('\n'), {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in defaults:
            comment = [lines[node.end_lineno - 1].partition('  #')[2]]
            for line in lines[node.end_lineno:]:  # indented comment lines go on (a section's header starts a line)
                if not re.match(r'\s+#', line):
                    break
                comment.append(line.strip()[1:])
            meaning = ' '.join(c.strip() for c in comment if c)
            written[node.target.id] = ast.get_source_segment(text, node.value), meaning
    shown = {k: (v or "''") if isinstance(v, str) else written[k][0] for k, v in defaults.items()}  # text as typed
    rows = [(f'--{k}={shown[k]}', written[k][1]) for k in defaults]
    width = max(len(flag) for flag, _ in rows)
    return '\n'.join([ast.get_docstring(ast.parse(text)).strip().split('\n\n')[0], '',
                      f'usage: python {Path(source).name} [config.py ...] [--key=value ...]   (settings, defaults):',
                      *(f'  {flag:<{width}}  {meaning}'.rstrip() for flag, meaning in rows)])


def check_outputs(outputs, inputs):
    """Stops in one line, before any work, when a run would write over what it reads: an output path (resolved) that
    is an input path, or two outputs that are one file. outputs: (setting, path); inputs: (setting, value given,
    paths it reads: the value itself and, for a folder, its files, data/pairs.py input_paths); '' is no path."""
    written = {}
    for setting, path in outputs:
        if not path:
            continue
        out = Path(path).resolve()
        if out in written:
            raise SystemExit(f'error: {setting} would write {path}, which {written[out]} also writes; give each its '
                             'own path')
        written[out] = setting
        for name, given, paths in inputs:
            if out in {Path(p).resolve() for p in paths if p}:
                what = f'{name}={given}' if out == Path(given).resolve() else f'a file of {name}={given}'
                raise SystemExit(f'error: {setting} would write {path}, which is {what}, an input of this run: it '
                                 f'would change what it reads; use another {setting}=')


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


def exit_process(code):
    """Ends the process as `raise SystemExit(code)` would, less the interpreter's teardown. torch keeps a process group
    that DTensor used alive past destroy_process_group, with its gloo/NCCL worker threads; one that drops a finished
    collective's tensors while the interpreter tears down aborts a run that completed ('terminate called without an
    active exception', SIGABRT; tests/exit_check.py). atexit's handlers run as usual (W&B's finish among them)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
    atexit._run_exitfuncs()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(1 if isinstance(code, str) else code or 0)
