"""Config parsing and the data path of train_tr.py: rendering rows, loading files, tokenizing, batching and the order
of pairs. Expected values are written out by hand (the tiny tokenizer is only used as the ground truth for ids)."""
import copy
import importlib
import json
import re

import pytest
import torch

import train_tr
from data import pairs as data_pairs
from conftest import plain_logps, round_off
from data.pairs import load_pairs, make_batch, read_rows, render_row, step_pair_indices, tokenize_pair
from train_tr import get_config

PAD, EOS = 1, 0  # data/tiny/base: <|pad|> = 1, <|endoftext|> = 0 (also BOS, which this tokenizer does not add)


# -----------------------------------------------------------------------------
# get_config
def test_config_defaults_and_overrides():
    # the defaults are the module's settings (their values are still being tuned, so they are not pinned here)
    assert get_config([]) == {k: getattr(train_tr, k) for k in train_tr.__annotations__}
    cfg = get_config(['--beta=0.2', '--max_iters=7', '--loss=ipo', '--ipo_normalize=False',
                      '--init_from=EleutherAI/pythia-2.8b'])
    assert cfg['beta'] == 0.2 and cfg['max_iters'] == 7 and cfg['loss'] == 'ipo'
    assert cfg['ipo_normalize'] is False
    assert cfg['init_from'] == 'EleutherAI/pythia-2.8b'  # a bare string that is no Python literal


def test_config_int_for_float_is_accepted():
    cfg = get_config(['--beta=1', '--lr=0'])
    assert cfg['beta'] == 1.0 and type(cfg['beta']) is float
    assert cfg['lr'] == 0.0 and type(cfg['lr']) is float


@pytest.mark.parametrize('arg', ['--max_iters=abc', '--max_iters=1.5', '--max_iters=True', '--ipo_normalize=1',
                                 '--beta=True', '--beta=fast'])
def test_config_wrong_type_is_rejected(arg):
    with pytest.raises(SystemExit, match=f"error: {arg[2:].split('=')[0]} must be"):
        get_config([arg])


def test_config_string_settings_keep_their_text():
    cfg = get_config(['--out_dir=3', '--init_from=2024', "--data='quoted'"])
    assert (cfg['out_dir'], cfg['init_from'], cfg['data']) == ('3', '2024', "'quoted'")


def test_config_without_dashes():
    cfg = get_config(['beta=0.3', 'tr_tau=4', 'ref_update=hard'])
    assert (cfg['beta'], cfg['tr_tau'], cfg['ref_update']) == (0.3, 4, 'hard')


def test_config_unknown_key_is_named():
    with pytest.raises(SystemExit, match="unknown config key 'bta'"):
        get_config(['--bta=0.2'])


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / 'my_config.py'
    path.write_text("# a comment\nbeta = 0.2\nloss = 'kto'\n_helper = 3\nmax_iters = 2 * 5\n")
    cfg = get_config([str(path)])
    assert (cfg['beta'], cfg['loss'], cfg['max_iters']) == (0.2, 'kto', 10)
    cfg = get_config([str(path), '--beta=0.05'])  # arguments apply in order: the later one wins
    assert cfg['beta'] == 0.05 and cfg['loss'] == 'kto'
    computed = tmp_path / 'computed.py'
    computed.write_text('import math\nbeta = math.sqrt(0.01)\nlr = [b * 1e-3 for b in (beta,)][0]\n')
    cfg = get_config([str(computed)])  # imports and comprehensions work; modules are not config keys
    assert cfg['beta'] == pytest.approx(0.1) and cfg['lr'] == pytest.approx(1e-4)
    bad = tmp_path / 'bad.py'
    bad.write_text('betta = 0.2\n')
    with pytest.raises(SystemExit, match="unknown config key 'betta'"):
        get_config([str(bad)])


@pytest.mark.parametrize('arg, word', [('--loss=simpo', 'loss'), ('--ref_update=sometimes', 'ref_update'),
                                      ('--tr_alpha=1.5', 'tr_alpha'), ('--tr_tau=0', 'tr_tau'),
                                      ('--beta=0', 'beta'), ('--label_smoothing=0.5', 'label_smoothing'),
                                      ('--max_prompt_length=128', 'max_prompt_length'),
                                      ('--grad_clip=-1', 'grad_clip'), ('--warmup_iters=-3', 'warmup_iters'),
                                      ('--warmup_iters=-1', 'warmup_iters'), ('--eval_pairs=-1', 'eval_pairs'),
                                      ('--lr=1e999', 'lr must be finite'), ('--lr=-1e-4', 'lr'),
                                      ('--beta=-1e999', 'beta must be finite'), ('--weight_decay=-0.1', 'weight_decay'),
                                      ('--kto_desirable_weight=-1', 'kto'), ('--kto_undesirable_weight=-0.5', 'kto'),
                                      ('--device=gpu', 'device')])
def test_config_bad_values_raise(arg, word):
    with pytest.raises(SystemExit, match=f'^error: .*{word}'):
        get_config([arg])


def test_config_file_setting_of_another_type_is_an_error(tmp_path):
    """A setting the file assigns is checked whatever its type (None and lists were ignored); names that are not
    settings and not plain data (imports, helpers) are the file's own."""
    for line, message in [('lr = None', 'lr must be float, got None'),
                          ('warmup_iters = [10]', 'warmup_iters must be int, got [10]'),
                          ("beta = float('nan')", 'beta must be finite')]:
        path = tmp_path / 'config.py'
        path.write_text(f'import math\ntaus = [1, 2]\n{line}\n')
        with pytest.raises(SystemExit, match=re.escape(message)):
            get_config([str(path)])
    path.write_text('beta = (\n')  # a broken file is one line naming it, not a traceback
    with pytest.raises(SystemExit, match=f'error: config file {re.escape(str(path))}: SyntaxError'):
        get_config([str(path)])


def test_positional_argument_must_be_a_config_file(tmp_path):
    """`python train_tr.py mydata.jsonl` used to execute the data as Python and train on the default data."""
    data = write_jsonl(tmp_path / 'mydata.jsonl', [json.dumps(GOOD_ROWS[0])])
    with pytest.raises(SystemExit, match=f'error: {re.escape(str(data))} is not a config file.*--data='):
        get_config([str(data)])
    with pytest.raises(SystemExit, match='error: config file .*missing.py not found'):
        get_config([str(tmp_path / 'missing.py')])
    with pytest.raises(SystemExit, match='error: --resume: settings are given as --key=value'):
        get_config(['--resume'])


@pytest.mark.parametrize('script', ['train_tr', 'sample', 'judge'])
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_every_setting_with_its_default_and_meaning(script, flag, capsys):
    module = importlib.import_module(script)
    defaults = train_tr.get_config([]) if script == 'train_tr' else module.defaults
    with pytest.raises(SystemExit) as info:
        train_tr.parse_overrides(['--beta=0.3', flag], defaults, module.__file__)
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == module.__doc__.strip().split('\n')[0]
    settings = {line.split()[0].split('=')[0][2:]: line for line in lines if line.startswith('  --')}
    assert list(settings) == list(defaults)
    for key, line in settings.items():
        assert len(line.split(None, 1)) == 2, f'{key} has no meaning'  # every setting has its comment
    if script == 'train_tr':
        assert settings['beta'].split() == ['--beta=0.1', 'KL', 'strength', 'β', '(TR-DPO', 'paper:', '0.05', 'on',
                                            'HH', 'and', 'TL;DR)']
        assert settings['lr'].split()[0] == '--lr=2e-4' and settings['ref_from'].split()[0] == "--ref_from=''"
    if script == 'judge':
        assert 'environment variable' in settings['api_key_env'] and 'endpoint' in settings['base_url']


# -----------------------------------------------------------------------------
# render_row
def test_render_text_row(tokenizer):
    row = {'prompt': '\n\nHuman: Hi\n\nAssistant:', 'chosen': ' Hello', 'rejected': ' Go away', 'extra': 1}
    assert render_row(row, tokenizer) == ('\n\nHuman: Hi\n\nAssistant:', ' Hello', ' Go away')


def test_render_message_row(tokenizer):
    """The HH template renders a user turn as '\\n\\nHuman: ' + content and the generation prompt as
    '\\n\\nAssistant:'; an assistant turn is '\\n\\nAssistant: ' + content, so what it adds after the prompt is
    ' ' + content."""
    row = {'prompt': [{'role': 'user', 'content': 'Hi'}],
           'chosen': [{'role': 'assistant', 'content': 'Hello'}],
           'rejected': [{'role': 'assistant', 'content': 'Go away'}]}
    assert render_row(row, tokenizer) == ('\n\nHuman: Hi\n\nAssistant:', ' Hello', ' Go away')
    # a message-list prompt with text responses
    row = {'prompt': [{'role': 'system', 'content': 'Be nice.'}, {'role': 'user', 'content': 'Hi'}],
           'chosen': ' Hello', 'rejected': ' Bye'}
    assert render_row(row, tokenizer) == ('Be nice.\n\nHuman: Hi\n\nAssistant:', ' Hello', ' Bye')


GOOD = {'prompt': 'P', 'chosen': ' a', 'rejected': ' b'}


@pytest.mark.parametrize('row, reason', [
    (None, 'not a JSON object'),
    ([1, 2], 'not a JSON object'),
    ('prompt', 'not a JSON object'),
    ({'prompt': 'P', 'chosen': ' a'}, 'missing key'),
    ({'chosen': ' a', 'rejected': ' b'}, 'missing key'),
    ({**GOOD, 'chosen': None}, 'missing key'),
    ({**GOOD, 'chosen': 5}, 'non-text field'),
    ({**GOOD, 'prompt': 3.5}, 'non-text field'),
    ({**GOOD, 'rejected': {'text': ' b'}}, 'non-text field'),
    ({**GOOD, 'prompt': ['Hi', 'there']}, 'non-text field'),
    ({**GOOD, 'chosen': [' a', ' b']}, 'non-text field'),
    ({**GOOD, 'prompt': [{'role': 'user'}]}, 'non-text field'),
    ({**GOOD, 'prompt': []}, 'non-text field'),
    ({**GOOD, 'chosen': ''}, 'empty response'),
    ({**GOOD, 'rejected': ' \n\t '}, 'empty response'),
    ({**GOOD, 'rejected': ' a'}, 'identical responses'),
])
def test_render_bad_rows(tokenizer, row, reason):
    assert render_row(row, tokenizer) == reason


def test_render_identical_after_rendering(tokenizer):
    """A message response 'Hello' renders as ' Hello', the same text as the other response."""
    row = {'prompt': [{'role': 'user', 'content': 'Hi'}], 'chosen': [{'role': 'assistant', 'content': 'Hello'}],
           'rejected': ' Hello'}
    assert render_row(row, tokenizer) == 'identical responses'


def test_render_without_rejected(tokenizer):
    row = {'prompt': 'P', 'chosen': ' a'}
    assert render_row(row, tokenizer, need_rejected=False) == ('P', ' a', None)
    assert render_row({**row, 'rejected': 7}, tokenizer, need_rejected=False) == ('P', ' a', None)  # not read
    assert render_row({'prompt': 'P'}, tokenizer, need_rejected=False) == 'missing key'
    assert render_row({'prompt': 'P', 'chosen': ' '}, tokenizer, need_rejected=False) == 'empty response'


# -----------------------------------------------------------------------------
# load_pairs
GOOD_ROWS = [{'prompt': 'Q1', 'chosen': ' yes', 'rejected': ' no'},
             {'prompt': 'Q2', 'chosen': ' up', 'rejected': ' down'},
             {'prompt': [{'role': 'user', 'content': 'Q3'}], 'chosen': [{'role': 'assistant', 'content': 'A'}],
              'rejected': [{'role': 'assistant', 'content': 'B'}]}]
GOOD_TEXTS = [('Q1', ' yes', ' no'), ('Q2', ' up', ' down'), ('\n\nHuman: Q3\n\nAssistant:', ' A', ' B')]


def token_lists(pairs):
    """load_pairs' Pairs as lists of ids (prompt, chosen[, rejected])."""
    return [[ids.tolist() for ids in pair[:3] if ids is not None] for pair in pairs]


@pytest.fixture
def good_pairs(tokenizer):
    """GOOD_TEXTS tokenized as load_pairs tokenizes short pairs: the ids of each text, EOS after each response."""
    return [[tokenizer(p).input_ids] + [tokenizer(r, add_special_tokens=False).input_ids + [EOS] for r in rs]
            for p, *rs in GOOD_TEXTS]


def write_jsonl(path, lines):
    path.write_text(''.join(line + '\n' for line in lines))
    return path


def test_load_pairs_mixed_jsonl(tmp_path, tokenizer, capsys, good_pairs):
    lines = [json.dumps(GOOD_ROWS[0]),
             '{"prompt": "Q", "chosen": " x"',                          # invalid JSON
             json.dumps({'prompt': 'Q', 'chosen': ' x'}),              # missing key
             json.dumps(GOOD_ROWS[1]),
             '',                                                       # blank lines are not rows
             json.dumps({'prompt': 'Q', 'chosen': ' x', 'rejected': ' x'}),  # identical
             json.dumps([1, 2, 3]),                                    # not an object
             json.dumps({'prompt': 'Q', 'chosen': 1, 'rejected': ' x'}),     # non-text
             json.dumps(GOOD_ROWS[2])]
    path = write_jsonl(tmp_path / 'mixed.jsonl', lines)
    assert token_lists(load_pairs(str(path), 'train', tokenizer, 128, 64)) == good_pairs
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    line = out[0]
    assert line.startswith(f'{path}: 3 pairs')
    assert 'skipped 5 rows' in line
    for part in ('2 not a JSON object', '1 missing key', '1 identical responses', '1 non-text field'):
        assert part in line
    # quiet mode prints nothing
    assert token_lists(load_pairs(str(path), 'train', tokenizer, 128, 64, verbose=False)) == good_pairs
    assert capsys.readouterr().out == ''


def test_load_pairs_clean_file_prints_no_skips(tmp_path, tokenizer, capsys, good_pairs):
    path = write_jsonl(tmp_path / 'clean.jsonl', [json.dumps(r) for r in GOOD_ROWS])
    assert token_lists(load_pairs(str(path), 'train', tokenizer, 128, 64)) == good_pairs
    assert capsys.readouterr().out.strip() == f'{path}: 3 pairs'


def test_load_pairs_only_bad_rows_exits(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / 'all_bad.jsonl', ['not json', json.dumps({'prompt': 'Q'}), '[]'])
    with pytest.raises(SystemExit) as info:
        load_pairs(str(path), 'train', tokenizer, 128, 64, verbose=False)
    assert str(path) in str(info.value) and '3 rows' in str(info.value)


def test_load_pairs_need_rejected_false(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / 'sft.jsonl', [json.dumps({'prompt': 'Q', 'chosen': ' A'})])
    pairs = load_pairs(str(path), 'train', tokenizer, 128, 64, need_rejected=False, verbose=False)
    assert token_lists(pairs) == [[tokenizer('Q').input_ids, tokenizer(' A', add_special_tokens=False).input_ids + [EOS]]]
    assert pairs[0].rejected is None
    with pytest.raises(SystemExit):
        load_pairs(str(path), 'train', tokenizer, 128, 64, need_rejected=True, verbose=False)


def test_load_pairs_json_array(tmp_path, tokenizer, good_pairs):
    path = tmp_path / 'rows.json'
    path.write_text(json.dumps(GOOD_ROWS + [{'prompt': 'Q'}], indent=2))
    assert token_lists(load_pairs(str(path), 'train', tokenizer, 128, 64, verbose=False)) == good_pairs
    path.write_text(json.dumps(GOOD_ROWS)[:-5])  # a cut-off array is an error naming the file, not a traceback
    with pytest.raises(SystemExit, match='rows.json is not a valid JSON array'):
        load_pairs(str(path), 'train', tokenizer, 128, 64, verbose=False)


def test_render_chat_template_mismatch_is_a_bad_row(tokenizer, monkeypatch):
    row = {'prompt': [{'role': 'user', 'content': 'Hi'}], 'chosen': [{'role': 'assistant', 'content': 'A'}],
           'rejected': [{'role': 'assistant', 'content': 'B'}]}
    real = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, 'apply_chat_template', lambda messages, **kw: ('X' if len(messages) > 1 else '')
                        + real(messages, **kw))  # a template whose full rendering does not extend the prompt
    assert render_row(row, tokenizer) == 'chat template mismatch'


def test_read_rows_from_a_hub_dataset_name(monkeypatch):
    """A name that is neither a file nor a folder goes to datasets.load_dataset; evaluation falls back to the
    validation split when there is no test split."""
    import datasets
    hub = datasets.DatasetDict({'train': datasets.Dataset.from_list(GOOD_ROWS[:1]),
                                'validation': datasets.Dataset.from_list(GOOD_ROWS[1:2])})
    monkeypatch.setattr(datasets, 'load_dataset', lambda name: hub if name == 'org/prefs' else None)
    assert read_rows('org/prefs', 'train') == (GOOD_ROWS[:1], 'org/prefs[train]')
    assert read_rows('org/prefs', 'test') == (GOOD_ROWS[1:2], 'org/prefs[validation]')


def test_load_pairs_parquet(tmp_path, tokenizer, good_pairs):
    import datasets
    rows = [r for r in GOOD_ROWS if isinstance(r['prompt'], str)] + [{'prompt': 'Q3', 'chosen': ' c', 'rejected': ' c'}]
    path = tmp_path / 'rows.parquet'
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert token_lists(load_pairs(str(path), 'train', tokenizer, 128, 64, verbose=False)) == good_pairs[:2]


def test_load_pairs_folder_and_missing_split(tmp_path, tokenizer, good_pairs):
    write_jsonl(tmp_path / 'train.jsonl', [json.dumps(r) for r in GOOD_ROWS])
    (tmp_path / 'test.txt').write_text('not a data file')
    assert token_lists(load_pairs(str(tmp_path), 'train', tokenizer, 128, 64, verbose=False)) == good_pairs
    assert load_pairs(str(tmp_path), 'test', tokenizer, 128, 64, verbose=False, required=False) is None
    with pytest.raises(SystemExit, match='no test.jsonl, test.json or test.parquet in'):
        load_pairs(str(tmp_path), 'test', tokenizer, 128, 64, verbose=False)  # required by default
    # a single file has no test split
    assert load_pairs(str(tmp_path / 'train.jsonl'), 'test', tokenizer, 128, 64, verbose=False, required=False) is None
    with pytest.raises(SystemExit, match='data file not found'):
        load_pairs(str(tmp_path / 'missing.jsonl'), 'train', tokenizer, 128, 64)


def test_jsonl_lines_end_at_newline_only(tmp_path, tokenizer, capsys):
    """U+2028, U+2029 and U+0085 inside strings, written raw by json.dumps(ensure_ascii=False), are not line ends."""
    rows = [{'prompt': f'Q{i}{sep}more', 'chosen': f' a{sep}b', 'rejected': ' c'}
            for i, sep in enumerate(['\u2028', '\u2029', '\x85', '\x0b', '\x0c', '\x1c', '\r'])]
    path = tmp_path / 'seps.jsonl'
    path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows), encoding='utf-8', newline='')
    assert token_lists(load_pairs(str(path), 'train', tokenizer, 128, 64)) == [
        list(tokenize_pair(tokenizer, r['prompt'], r['chosen'], r['rejected'], 128, 64)) for r in rows]
    assert capsys.readouterr().out.strip() == f'{path}: 7 pairs'  # nothing skipped
    path.write_bytes(path.read_bytes().replace(b'\n', b'\r\n'))  # Windows line ends are fine too
    assert len(load_pairs(str(path), 'train', tokenizer, 128, 64, verbose=False)) == 7


def test_byte_order_mark_is_accepted(tmp_path, tokenizer, good_pairs):
    path = tmp_path / 'bom.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in GOOD_ROWS), encoding='utf-8-sig')
    assert path.read_bytes().startswith(b'\xef\xbb\xbf')
    assert token_lists(load_pairs(str(path), 'train', tokenizer, 128, 64, verbose=False)) == good_pairs  # the first row too
    array = tmp_path / 'bom.json'
    array.write_text(json.dumps(GOOD_ROWS), encoding='utf-8-sig')
    assert token_lists(load_pairs(str(array), 'train', tokenizer, 128, 64, verbose=False)) == good_pairs


@pytest.mark.parametrize('content, where', [
    (f'{json.dumps(GOOD_ROWS[0])}\n{{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}}\n'.encode('latin-1'),
     'line 2'),
    (b'\x89PNG\r\x1a\x00' + bytes(range(128, 256)), 'line 1'),  # binary, no newline
], ids=['latin-1', 'binary'])
def test_file_that_is_not_utf8_is_named(tmp_path, tokenizer, content, where):
    path = tmp_path / 'train.jsonl'
    path.write_bytes(content)
    with pytest.raises(SystemExit, match=f'error: {re.escape(str(path))} is not UTF-8 text .*{where}'):
        load_pairs(str(path), 'train', tokenizer, 128, 64)


def test_data_file_names(tmp_path, tokenizer, good_pairs):
    """Suffixes in any case; a file of another kind, or a missing file, is one line saying what is accepted."""
    lines = [json.dumps(r) for r in GOOD_ROWS]
    upper = write_jsonl(tmp_path / 'data.JSONL', lines)
    assert token_lists(load_pairs(str(upper), 'train', tokenizer, 128, 64, verbose=False)) == good_pairs
    folder = tmp_path / 'folder'
    folder.mkdir()
    write_jsonl(folder / 'train.JSONL', lines)
    assert token_lists(load_pairs(str(folder), 'train', tokenizer, 128, 64, verbose=False)) == good_pairs
    text = write_jsonl(tmp_path / 'data.txt', lines)
    with pytest.raises(SystemExit, match=r'data.txt: a data file must end in .jsonl .*, .json or .parquet'):
        load_pairs(str(text), 'train', tokenizer, 128, 64)
    only_txt = tmp_path / 'only_txt'
    only_txt.mkdir()
    write_jsonl(only_txt / 'train.txt', lines)
    with pytest.raises(SystemExit, match=r'no train.jsonl, train.json or train.parquet in .*only_txt \(train.txt not '
                                         r'read: the name must end in .jsonl, .json or .parquet\)'):
        load_pairs(str(only_txt), 'train', tokenizer, 128, 64)
    for missing in ('missing.jsonl', 'missing.txt', './missing_folder'):
        with pytest.raises(SystemExit, match='data file not found'):
            load_pairs(str(tmp_path / missing) if missing[0] != '.' else missing, 'train', tokenizer, 128, 64)


def test_json_and_jsonl_of_one_split_is_an_error(tmp_path, tokenizer):
    write_jsonl(tmp_path / 'train.jsonl', [json.dumps(r) for r in GOOD_ROWS])
    (tmp_path / 'train.json').write_text(json.dumps(GOOD_ROWS[:1]))
    with pytest.raises(SystemExit, match=r'has train.json and train.jsonl: keep one train file'):
        load_pairs(str(tmp_path), 'train', tokenizer, 128, 64)


def test_hub_dataset_that_fails_to_load_is_one_line(monkeypatch, tokenizer):
    import datasets

    def fail(name):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub\nor cannot be accessed.")
    monkeypatch.setattr(datasets, 'load_dataset', fail)
    with pytest.raises(SystemExit, match="error: data=org/nothing is no file or folder here, and "
                                         "datasets.load_dataset failed: Dataset 'org/nothing' doesn't exist on the Hub "
                                         "or cannot be accessed.$"):
        load_pairs('org/nothing', 'train', tokenizer, 128, 64)


def test_lone_surrogates_are_bad_rows(tmp_path, tokenizer, capsys, good_pairs):
    """A lone surrogate is valid JSON but no text a tokenizer takes: the row is skipped and counted at load time
    instead of crashing the step whose batch holds it."""
    bad = [{'prompt': 'Q', 'chosen': ' broken \ud83c emoji', 'rejected': ' b'},
           {'prompt': '\udfff', 'chosen': ' a', 'rejected': ' b'},
           {'prompt': [{'role': 'user', 'content': 'Hi \ud83c'}], 'chosen': ' a', 'rejected': ' b'}]
    path = write_jsonl(tmp_path / 'surrogates.jsonl', [json.dumps(r) for r in GOOD_ROWS + bad])
    assert '\\ud83c' in path.read_text()  # what json.dumps writes: valid JSON
    pairs = load_pairs(str(path), 'train', tokenizer, 128, 64)
    assert token_lists(pairs) == good_pairs
    assert capsys.readouterr().out.strip() == f'{path}: 3 pairs (skipped 3 rows: 3 invalid Unicode)'
    assert make_batch(pairs, True, PAD)['input_ids'].shape[0] == 3  # tokenized at load time, all of them


def test_messages_without_a_chat_template_are_bad_rows(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, 'chat_template', None)
    assert render_row(GOOD_ROWS[2], tokenizer) == 'messages without a chat template'
    assert render_row({**GOOD_ROWS[0]}, tokenizer) == GOOD_TEXTS[0]  # text rows need no template


@pytest.mark.parametrize('n_pairs, eval_pairs, note', [
    (None, 200, 'no test split'),
    (3, 200, '3 held-out pairs, eval_pairs=200: fewer than one micro-batch of 16 over all processes'),
    (40, 10, '40 held-out pairs, eval_pairs=10: fewer than one micro-batch of 16 over all processes'),
    (40, 0, 'eval_pairs=0'),
    (16, 200, None),
])
def test_note_when_evaluation_never_runs(capsys, n_pairs, eval_pairs, note):
    pairs = None if n_pairs is None else GOOD_TEXTS[:1] * n_pairs
    data_pairs.note_evaluation(pairs, eval_pairs, 16)
    out = capsys.readouterr().out
    assert out == (f'note: no evaluation ({note}); checkpoints are still saved every eval_interval steps\n'
                   if note else '')


def test_model_paths_that_cannot_load_are_one_line(tmp_path):
    """A missing folder was reported as 'Repo id must be in the form ...'."""
    train_tr.check_model_path(str(train_tr.Path(__file__).parents[1] / 'data/tiny/sft'), 'init_from')  # fine
    for name in (str(tmp_path / 'no' / 'such' / 'model'), './missing'):
        with pytest.raises(SystemExit, match=f'^error: init_from={re.escape(name)} not found \\(no such folder\\)$'):
            train_tr.check_model_path(name, 'init_from')
    with pytest.raises(SystemExit, match='^error: ref_from=.*: the folder is not an HF model'):
        train_tr.check_model_path(str(tmp_path), 'ref_from')
    with pytest.raises(SystemExit, match=r'^error: init_from=out/missing-model: no such folder, and not loadable '
                                         r'from the hub \(.*\)$') as info:  # a hub-like name, offline in the tests
        train_tr.check_model_path('out/missing-model', 'init_from')
    assert '\n' not in str(info.value)


def test_device_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match='^error: device=cuda, but this torch .* sees no CUDA device'):
        train_tr.resolve_device('cuda')
    assert train_tr.resolve_device('auto') == torch.device('cpu')
    with pytest.raises(SystemExit, match=r"^error: device='gpu': need device in \('auto', 'cpu', 'cuda'\)"):
        get_config(['--device=gpu'])


# -----------------------------------------------------------------------------
# tokenize_pair
PROMPT = '\n\nHuman: Repeat the word sun five times.\n\nAssistant:'   # 15 tokens
SHORT = ' sun sun sun sun sun'                                         # 5 tokens
LONG = ' one two three four five six seven eight nine ten'            # 24 tokens


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_tokenizer_lengths(tokenizer):
    """Preconditions of the hand-made lengths below; the tiny tokenizer adds no BOS."""
    assert tokenizer(PROMPT).input_ids == ids(tokenizer, PROMPT)
    assert (len(ids(tokenizer, PROMPT)), len(ids(tokenizer, SHORT)), len(ids(tokenizer, LONG))) == (15, 5, 24)
    assert tokenizer.eos_token_id == EOS and tokenizer.pad_token_id == PAD


def test_tokenize_short_pair_untouched(tokenizer):
    """15 + (5 + EOS) = 21 ≤ max_length 21: nothing is cut, each response ends with EOS, once."""
    prompt, chosen, rejected = tokenize_pair(tokenizer, PROMPT, SHORT, ' cat', max_length=21, max_prompt_length=8)
    assert prompt == ids(tokenizer, PROMPT)
    assert chosen == ids(tokenizer, SHORT) + [EOS] and rejected == ids(tokenizer, ' cat') + [EOS]
    assert chosen.count(EOS) == 1 and rejected.count(EOS) == 1


def test_tokenize_without_rejected(tokenizer):
    out = tokenize_pair(tokenizer, PROMPT, SHORT, None, max_length=128, max_prompt_length=64)
    assert len(out) == 2 and out[1] == ids(tokenizer, SHORT) + [EOS]


def test_tokenize_long_pair_truncates_prompt_start_then_responses(tokenizer):
    """15 + (24 + EOS) = 40 > 20: the prompt keeps its last 8 tokens, then each response is cut to 20 − 8 = 12:
    the short one (6 with EOS) is whole, the long one loses its end and its EOS."""
    prompt, chosen, rejected = tokenize_pair(tokenizer, PROMPT, SHORT, LONG, max_length=20, max_prompt_length=8)
    assert prompt == ids(tokenizer, PROMPT)[7:]
    assert len(prompt) == 8
    assert chosen == ids(tokenizer, SHORT) + [EOS]
    assert rejected == ids(tokenizer, LONG)[:12] and EOS not in rejected
    assert len(prompt) + len(rejected) == 20


def test_tokenize_one_token_over_triggers_truncation(tokenizer):
    """15 + 6 = 21 > 20: the prompt is cut to its last 8 tokens although the chosen response alone would fit."""
    prompt, chosen, rejected = tokenize_pair(tokenizer, PROMPT, SHORT, ' cat', max_length=20, max_prompt_length=8)
    assert prompt == ids(tokenizer, PROMPT)[-8:]
    assert chosen == ids(tokenizer, SHORT) + [EOS] and rejected == ids(tokenizer, ' cat') + [EOS]


def test_tokenize_response_cut_when_prompt_already_short(tokenizer):
    """Prompt ' cat' (1 token) + LONG (25 with EOS) = 26 > 10: the prompt is kept (1 ≤ 4), LONG is cut to 10 − 1 = 9."""
    prompt, chosen, rejected = tokenize_pair(tokenizer, ' cat', LONG, SHORT, max_length=10, max_prompt_length=4)
    assert prompt == ids(tokenizer, ' cat')
    assert chosen == ids(tokenizer, LONG)[:9]
    assert rejected == ids(tokenizer, SHORT) + [EOS]


# -----------------------------------------------------------------------------
# the end of a response: EOS after plain text, nothing after a chat template's end of turn
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture
def chatml(tokenizer):
    """The tiny tokenizer with a ChatML-style template (its markers are plain text to this tokenizer)."""
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHATML
    return chat


def test_end_of_turn(tokenizer, chatml):
    assert data_pairs.end_of_turn(tokenizer) == ''  # the HH template ends a turn with nothing
    assert data_pairs.end_of_turn(chatml) == '<|im_end|>\n'
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert data_pairs.end_of_turn(plain) == ''


def test_eos_after_plain_text_once(tokenizer):
    assert data_pairs.tokenize_response(tokenizer, ' Hello') == ids(tokenizer, ' Hello') + [EOS]
    ending_with_eos = data_pairs.tokenize_response(tokenizer, ' Hello<|endoftext|>')
    assert ending_with_eos == ids(tokenizer, ' Hello') + [EOS]  # the text's own EOS, not doubled


def test_no_eos_after_the_template_end_of_turn(chatml):
    """A message-list response renders as 'Hello<|im_end|>\\n': those ids exactly, as the template wrote them."""
    row = {'prompt': [{'role': 'user', 'content': 'Hi'}], 'chosen': [{'role': 'assistant', 'content': 'Hello'}],
           'rejected': [{'role': 'assistant', 'content': 'Bye'}]}
    prompt_text, chosen, rejected = render_row(row, chatml)
    assert chosen == 'Hello<|im_end|>\n'
    text, (prompt_ids, chosen_ids, rejected_ids) = data_pairs.encode_row(row, chatml, 128, 64,
                                                                       turn_end=data_pairs.end_of_turn(chatml))
    full = chatml.apply_chat_template(row['prompt'] + row['chosen'], tokenize=False)
    assert text == prompt_text and prompt_ids + chosen_ids == chatml(full).input_ids
    assert chosen_ids == ids(chatml, 'Hello<|im_end|>\n') and EOS not in chosen_ids + rejected_ids
    # the same text as a plain string row ends with the end of turn too: no EOS after it either
    assert data_pairs.tokenize_response(chatml, 'Hello<|im_end|>\n', '<|im_end|>\n') == ids(chatml, 'Hello<|im_end|>\n')


# -----------------------------------------------------------------------------
# a too-long chat prompt loses whole exchanges, oldest first
def turns(*texts):
    return [{'role': 'user' if i % 2 == 0 else 'assistant', 'content': t} for i, t in enumerate(texts)]


def test_without_oldest_exchange():
    system = [{'role': 'system', 'content': 'S'}]
    assert data_pairs.without_oldest_exchange(system + turns('u1', 'a1', 'u2', 'a2', 'u3')) \
        == system + turns('u2', 'a2', 'u3')
    assert data_pairs.without_oldest_exchange(turns('u1', 'a1', 'u2')) == [{'role': 'user', 'content': 'u2'}]
    assert data_pairs.without_oldest_exchange(system + turns('u1')) is None


def test_long_chat_prompt_drops_oldest_turns(chatml):
    """A system turn and three user turns, 216 tokens; without the first exchange 146. With max_length 180 and
    max_prompt_length 160 the first exchange is dropped whole, the system turn and the last user turn stay, and
    nothing is cut inside a turn."""
    system = [{'role': 'system', 'content': 'Be brief.'}]
    long = ' '.join(['word'] * 8)
    prompt = system + turns(f'first {long}', f'answer {long}', f'second {long}', f'reply {long}', 'third?')
    row = {'prompt': prompt, 'chosen': [{'role': 'assistant', 'content': 'Yes.'}],
           'rejected': [{'role': 'assistant', 'content': 'No.'}]}
    everything = len(chatml(chatml.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)).input_ids)
    kept = system + turns(f'second {long}', f'reply {long}', 'third?')
    kept_ids = chatml(chatml.apply_chat_template(kept, tokenize=False, add_generation_prompt=True)).input_ids
    assert (len(kept_ids), everything) == (146, 216)
    text, (prompt_ids, chosen_ids, _) = data_pairs.encode_row(row, chatml, 180, 160, turn_end='<|im_end|>\n')
    assert prompt_ids == kept_ids and text.startswith('<|im_start|>system\nBe brief.') and 'first' not in text
    assert chosen_ids == ids(chatml, 'Yes.<|im_end|>\n')
    # a pair that fits max_length keeps its whole prompt, however long (as for text prompts)
    assert data_pairs.encode_row(row, chatml, 1000, 160, turn_end='<|im_end|>\n')[1][0] == chatml(
        chatml.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)).input_ids
    # a single user turn (64 tokens) over max_prompt_length is cut like text: it keeps its last tokens
    alone = {**row, 'prompt': turns(f'only {long} {long} {long}')}
    full = chatml(chatml.apply_chat_template(alone['prompt'], tokenize=False, add_generation_prompt=True)).input_ids
    assert len(full) == 64 and data_pairs.encode_row(alone, chatml, 60, 40, turn_end='<|im_end|>\n')[1][0] == full[-40:]


# -----------------------------------------------------------------------------
# make_batch
PAIRS = [('\n\nHuman: Say box two times.\n\nAssistant:', ' box box', ' box box box box box'),
         ('\n\nHuman: Hi\n\nAssistant:', ' Hello there, how can I help?', ' Go away.'),
         ('\n\nHuman: What is 4 plus 1?\n\nAssistant:', ' 4 plus 1 is 5.', ' 6')]


def tokenized(tokenizer, texts):
    return [data_pairs.Pair(*(torch.tensor(x, dtype=torch.int32) for x in tokenize_pair(tokenizer, *t, 128, 64)))
            for t in texts]


def test_make_batch_dpo_layout(tokenizer):
    """One row per pair: prompt, chosen + EOS, rejected + EOS, right-padded; labels are the chosen responses of every
    row, then the rejected ones."""
    batch = make_batch(tokenized(tokenizer, PAIRS), True, PAD)
    rows = [(ids(tokenizer, p), ids(tokenizer, c) + [EOS], ids(tokenizer, r) + [EOS]) for p, c, r in PAIRS]
    width = 64  # the longest row, 36 tokens, padded to a multiple of data_pairs.PAD_MULTIPLE
    assert max(len(p + c + r) for p, c, r in rows) == 36 and data_pairs.PAD_MULTIPLE == 32
    assert batch['input_ids'].tolist() == [p + c + r + [PAD] * (width - len(p + c + r)) for p, c, r in rows]
    assert batch['labels'].tolist() == sum([c for _, c, _ in rows] + [r for _, _, r in rows], [])
    assert batch['lengths'].tolist() == [len(c) for _, c, _ in rows] + [len(r) for _, _, r in rows]
    assert batch['n_tokens'] == sum(len(p + c + r) for p, c, r in rows)
    assert batch['labels'].dtype == batch['input_ids'].dtype == torch.long


def test_make_batch_sft_has_chosen_only(tokenizer):
    expected = [ids(tokenizer, p) + ids(tokenizer, c) + [EOS] for p, c, _ in PAIRS]
    for pairs in (tokenized(tokenizer, [(p, c, None) for p, c, _ in PAIRS]), tokenized(tokenizer, PAIRS)):
        batch = make_batch(pairs, False, PAD)  # with rejected responses present, sft (with_rejected=False) ignores them
        assert [row[:len(e)] for row, e in zip(batch['input_ids'].tolist(), expected)] == expected
        assert batch['lengths'].tolist() == [len(ids(tokenizer, c)) + 1 for _, c, _ in PAIRS]


def test_kto_baseline_hand_value(tokenizer, tiny_model):
    """z = max(0, mean over i of the log-ratios of (x_i, y_w,i+1) and (x_i, y_l,i+1)), from plain forwards; swapping
    policy and reference negates the mean, so one order is clamped to 0 and the other is not."""
    train_tr.setup_distributed('cpu')
    pairs = tokenized(tokenizer, PAIRS)
    other = train_tr.with_response_outputs(copy.deepcopy(tiny_model))
    generator = torch.Generator().manual_seed(0)  # the same other model whatever ran before
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
        logps = [(plain_logps(tiny_model, pairs[i].prompt.tolist(), r.tolist()),
                  plain_logps(other, pairs[i].prompt.tolist(), r.tolist()))
                 for i in range(3) for r in (pairs[(i + 1) % 3].chosen, pairs[(i + 1) % 3].rejected)]
        mean = sum(a - b for a, b in logps) / 6
        cfg = {'max_length': 128, 'max_prompt_length': 64}
        z, tokens = train_tr.kto_baseline(tiny_model, other, pairs, 2, PAD, cfg, 'cpu')
        z_swapped = train_tr.kto_baseline(other, tiny_model, pairs, 2, PAD, cfg, 'cpu')[0]
    assert abs(mean) > 1e-3
    # each prompt once with both responses of the next pair: the tokens that tokens/s and MFU count
    assert tokens == sum(len(pairs[i].prompt) + len(pairs[(i + 1) % 3].chosen) + len(pairs[(i + 1) % 3].rejected)
                         for i in range(3))
    # micro-batches of 2 against one sequence at a time: equal to the round-off of the log-probs it subtracts
    tol = round_off(max(abs(float(v)) for pair in logps for v in pair), 1)
    assert z.item() == pytest.approx(max(0.0, mean.item()), abs=tol)
    assert z_swapped.item() == pytest.approx(max(0.0, -mean.item()), abs=tol)


def test_load_pairs_truncates_at_load_time(tmp_path, tokenizer):
    """PROMPT (15) + LONG (25 with EOS) > 20: the prompt keeps its last 8 tokens and LONG is cut to 12."""
    path = write_jsonl(tmp_path / 'long.jsonl', [json.dumps({'prompt': PROMPT, 'chosen': SHORT, 'rejected': LONG})])
    [pair] = load_pairs(str(path), 'train', tokenizer, 20, 8, verbose=False)
    assert pair.prompt.tolist() == ids(tokenizer, PROMPT)[-8:]
    assert pair.chosen.tolist() == ids(tokenizer, SHORT) + [EOS] and pair.rejected.tolist() == ids(tokenizer, LONG)[:12]


# -----------------------------------------------------------------------------
# step_pair_indices
def test_step_indices_deterministic_and_in_range():
    a = [step_pair_indices(20, it, 4, seed=3) for it in range(12)]
    b = [step_pair_indices(20, it, 4, seed=3) for it in range(12)]
    assert a == b
    assert all(len(s) == 4 and all(0 <= i < 20 for i in s) for s in a)


def test_step_indices_one_epoch_is_a_permutation():
    """n = 20, batch 4: steps 0-4 are epoch 0; consecutive steps share no index and together cover 0..19 once."""
    steps = [step_pair_indices(20, it, 4, seed=3) for it in range(5)]
    for s, s_next in zip(steps, steps[1:]):
        assert not set(s) & set(s_next)
    flat = [i for s in steps for i in s]
    assert sorted(flat) == list(range(20))
    # the next epoch is again a permutation, in a different order
    epoch1 = [i for it in range(5, 10) for i in step_pair_indices(20, it, 4, seed=3)]
    assert sorted(epoch1) == list(range(20)) and epoch1 != flat


def test_step_indices_cross_epoch_boundary():
    """n = 10, batch 4: step 2 covers stream positions 8..11 = the last 2 of epoch 0, then the first 2 of epoch 1;
    step 3 continues with positions 12..15 = epoch 1 entries 2..5."""
    epoch0 = [i for it in (0, 1) for i in step_pair_indices(10, it, 4, seed=5)]   # positions 0..7
    step2 = step_pair_indices(10, 2, 4, seed=5)
    step3 = step_pair_indices(10, 3, 4, seed=5)
    step4 = step_pair_indices(10, 4, 4, seed=5)                                    # positions 16..19
    assert sorted(epoch0 + step2[:2]) == list(range(10))                          # epoch 0 complete
    epoch1 = step2[2:] + step3 + step4                                            # epoch 1 positions 0..9
    assert sorted(epoch1) == list(range(10))
    # a batch larger than the data set spans several epochs, each a permutation
    big = step_pair_indices(3, 0, 7, seed=5)
    assert len(big) == 7 and sorted(big[:3]) == sorted(big[3:6]) == [0, 1, 2]


def test_step_indices_depend_on_seed():
    a = [i for it in range(5) for i in step_pair_indices(20, it, 4, seed=1)]
    b = [i for it in range(5) for i in step_pair_indices(20, it, 4, seed=2)]
    assert a != b and sorted(a) == sorted(b) == list(range(20))


def test_seeds_share_no_epoch_order():
    """Every (seed, epoch) has its own order: with seed + epoch as the generator's seed, seed 2 read seed 1's stream
    one epoch later and seed 3 two epochs later, so runs 'over 3 seeds' shared most of their pairs' order."""
    n, epochs = 50, 4
    orders = {tuple(data_pairs.epoch_order(n, seed, epoch)) for seed in (1, 2, 3) for epoch in range(epochs)}
    assert len(orders) == 3 * epochs
    streams = {seed: [i for it in range(epochs * n // 10) for i in step_pair_indices(n, it, 10, seed)]
               for seed in (1, 2, 3)}
    for a, b in ((1, 2), (1, 3), (2, 3)):
        assert not any(streams[a][shift * n:] == streams[b][:len(streams[a]) - shift * n] for shift in range(1, epochs))


def test_step_indices_are_slices_of_one_stream():
    """The data position is the step number times the batch size: batches of 2, 4 and 6 over n = 10 read the same
    stream of indices (epochs 0, 1, 2, ... one after the other), so their concatenations agree over 24 positions."""
    streams = {b: [i for it in range(24 // b) for i in step_pair_indices(10, it, b, seed=9)] for b in (2, 3, 4, 6)}
    assert streams[2] == streams[3] == streams[4] == streams[6]
    stream = streams[2]
    assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10))
