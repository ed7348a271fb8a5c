"""
The data path of train_tr.py, sample.py, judge.py and data/label.py: preference rows from files, folders or HF
datasets, checked (bad rows skipped and counted), rendered (text or chat messages through the tokenizer's chat
template), tokenized once and truncated; and the batches of the prompt-sharing layout the models read.

The rules, each in the function that applies it:
- A row is {"prompt", "chosen", "rejected"}, each text or a list of chat messages (sft needs no "rejected";
  distillation also reads "reward_chosen"/"reward_rejected", one number per reward model, which data/label.py
  writes). `data=` is a .jsonl, .json or .parquet file (the train split), a folder with train.* and test.*, or a HF
  dataset name (its test split, else validation, is the held-out one). Files are UTF-8 (a byte-order mark is fine),
  and a JSONL line ends at '\n' only.
- Messages go through the tokenizer's chat template; a message-list response is what the template adds after the
  prompt (TRL's rule), so prompt ids + response ids are the template's own tokens of the whole conversation. A
  plain-text response ends with EOS (not doubled); a chat response ends where the template ends the turn.
- A too-long pair loses the start of its prompt, keeping its last max_prompt_length tokens, then the ends of its
  responses (the DPO repository's rule); a chat prompt first drops whole exchanges, oldest first, so that its system
  turn and last user turn stay. One function, fit_example, applies it for every job: training, reward labels
  (data/label.py), reward scores of samples (judge.py) and sample.py's prompts.
- Bad rows are skipped and counted in one line: not JSON, missing keys, non-text, invalid Unicode, empty or
  identical responses (also once truncated), messages without a chat template or that the template refuses, and an
  empty prompt (with a tokenizer that adds no BOS nothing would predict the response's first token). Bad files
  (not UTF-8, broken JSON arrays, damaged parquet, a link to nothing) and bad reward labels (missing, not numbers,
  NaN, beyond the float range) stop the run in one `error:` line naming the file and row.
- Fingerprints (sha256 of the files behind a path) let every output say what it was made from, and a resume or a
  cache refuse what changed under the same path.
"""
import hashlib
import json
import math
import re
from collections import Counter, namedtuple
from functools import lru_cache
from pathlib import Path

import torch

DATA_SUFFIXES = ('.jsonl', '.json', '.parquet')  # in any case: .JSONL too
# what train_tr.py keeps beside a model, not the model (state.pt: the resume state of nanoTR before state/)
RUN_STATE = ('state', 'state.pt', 'metrics.jsonl', 'checkpoint.json')


def sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprinted_files(source, splits=False):
    """The files whose bytes fingerprint(source, splits) reads (none for a hub name)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    return sorted(
        f for f in path.iterdir() if f.is_file() and f.name not in RUN_STATE and not f.name.startswith('.')
        and (not splits or f.stem in ('train', 'test') and f.suffix.lower() in DATA_SUFFIXES)) if path.is_dir() else []


def input_paths(setting, source, splits=False):
    """(setting, source, paths a run reads from it: the source and fingerprinted_files) for data/settings.py
    check_outputs; '' reads nothing."""
    return setting, source, [source, *fingerprinted_files(source, splits)] if source else []


def fingerprint(source, splits=False):
    """A short sha256 of what a path holds, so that an output made from it can tell when it changed: a file's bytes,
    or a folder's top-level files (names and bytes; hidden files and the run state beside a model left out; with
    splits=True only the data files of its splits, train.* and test.*). Anything else, a hub name, is taken by its
    name."""
    files = fingerprinted_files(source, splits)
    digest = hashlib.sha256(b'' if files else f'name:{source}'.encode())
    for f in files:
        digest.update(f'{f.name}:{sha256(f)}\n'.encode())
    return digest.hexdigest()[:16]


def read_text(path):
    """A UTF-8 file's text, without the byte-order mark some editors write (it would make the first row unreadable).
    A file in another encoding, or binary, stops the run, naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise SystemExit(f'error: {path} is not UTF-8 text ({e.reason} at line {line}, byte {e.start}); '
                         'save it as UTF-8')


def jsonl_lines(text):
    """JSONL lines end at '\\n' only: str.splitlines() also cuts at U+2028, U+2029, U+0085 and other characters
    that json.dumps(ensure_ascii=False) writes raw inside strings."""
    return text.split('\n')


def read_jsonl(path):
    """The complete JSON lines of a file (a line cut short by a kill, or not JSON, is left out); [] if it does not
    exist."""
    if not Path(path).exists():
        return []
    rows = []
    for line in jsonl_lines(read_text(path))[:-1]:  # the last piece follows the last newline: empty, or cut short
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def read_rows(source, split):
    """(rows, name) of one split; rows is None when the source has no such split, and name then says what was
    looked for. Unparseable lines become None rows."""
    path = Path(source)
    if path.is_dir():
        found = sorted(path.glob(f'{split}.*'))
        files = [f for f in found if f.suffix.lower() in DATA_SUFFIXES]
        if len(files) > 1:  # which one is meant cannot be guessed
            raise SystemExit(f'error: {path} has {" and ".join(f.name for f in files)}: keep one {split} file')
        if not files:
            ignored = f' ({", ".join(f.name for f in found)} not read: the name must end in .jsonl, .json or .parquet)'
            return None, f'no {split}.jsonl, {split}.json or {split}.parquet in {path}' + (ignored if found else '')
        path = files[0]
        if not path.is_file():  # a link to nothing: found by its name, unreadable
            raise SystemExit(f'error: {path} is a broken link (to {path.readlink()}) or not a file')
    elif path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise SystemExit(f'error: {path}: a data file must end in .jsonl (one JSON object per line), .json or '
                             '.parquet')
        if split != 'train':
            return None, f'no {split} split in {path} (a single file is the train split)'
    elif path.suffix.lower() in DATA_SUFFIXES + ('.txt',) or source.startswith(('.', '/', '~')):
        raise SystemExit(f'error: data file not found: {path}')
    else:  # a Hugging Face dataset name: its test split, or its validation split for evaluation
        import datasets
        try:
            splits = datasets.load_dataset(source)
        except Exception as e:  # the hub's many error types; what matters is the one line
            raise SystemExit(f'error: data={source} is no file or folder here, and datasets.load_dataset failed: '
                             f'{" ".join(str(e).split())}')
        names = [split] if split == 'train' else [split, 'validation']
        name = next((n for n in names if n in splits), None)
        return (None if name is None else splits[name].to_list()), f'{source}[{name or split}]'
    if path.suffix.lower() == '.parquet':
        import datasets
        try:
            return datasets.Dataset.from_parquet(str(path)).to_list(), str(path)
        except Exception as e:  # pyarrow's errors for a damaged or foreign file
            raise SystemExit(f'error: {path} is not a readable parquet file ({type(e).__name__}: '
                             f'{" ".join(str(e).split())[:200]})')
    text = read_text(path)
    if path.suffix.lower() == '.json' and text.lstrip().startswith('['):
        try:
            return json.loads(text), str(path)
        except json.JSONDecodeError as e:
            raise SystemExit(f'error: {path} is not a valid JSON array: {e}')
    rows = []
    for line in jsonl_lines(text):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
    return rows, str(path)


def check_model_path(name, setting, reward_model=None):
    """Stops in one line on a model that is neither an HF model folder here nor loadable from the hub (transformers
    would report a missing folder as 'Repo id must be in the form ...'), or that is not of the kind the setting needs:
    reward_model=True, a reward model (a sequence classifier with one output, as train_tr.py --loss=rm saves; any
    other model would get a random score head); False, a language model (a reward model has no log-probs: loaded as
    a causal LM it would get a random head in place of its score)."""
    from transformers import AutoConfig
    if not Path(name).exists() and (name.startswith('.') or not re.fullmatch(r'[\w.-]+(/[\w.-]+)?', name)):
        raise SystemExit(f'error: {setting}={name} not found (no such folder)')
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = 'the folder is not an HF model' if Path(name).exists() else \
            'no such folder, and not loadable from the hub'
        raise SystemExit(f'error: {setting}={name}: {where} ({" ".join(str(e).split())})')
    classifier = any(a.endswith('ForSequenceClassification') for a in config.architectures or [])
    if reward_model and not (classifier and config.num_labels == 1):
        raise SystemExit(f'error: {setting}={name} is not a reward model (a sequence classifier with one output; its '
                         f'config has architectures {config.architectures}, num_labels {config.num_labels}); train '
                         'one with train_tr.py --loss=rm')
    if reward_model is False and classifier:
        raise SystemExit(f'error: {setting}={name} is a reward model (architectures {config.architectures}): it scores '
                         'responses and has no log-probs; give a language model (an SFT or train_tr.py checkpoint)')


def load_tokenizer(name, setting):
    """The model's tokenizer, which must define EOS (every response ends with it); one line if there is none."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"error: {setting}={name} has no usable tokenizer ({' '.join(str(e).split())})")
    if tokenizer.eos_token_id is None:
        raise SystemExit(f'error: the tokenizer of {setting}={name} has no EOS token')
    return tokenizer


def check_vocabulary(tokenizer, name, setting):
    """Stops in one line when the model `name` (a reference; '' is none) has another vocabulary than init_from's
    tokenizer: its log-probs of the same token ids would be those of other text."""
    if name and load_tokenizer(name, setting).get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f'error: {setting}={name} has another vocabulary than init_from: its log-probs of the same '
                         'token ids would be those of other text (log-ratios and KL would compare different text)')


def is_messages(value):
    return (isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str) for m in value))


def render_response(tokenizer, prompt, prompt_text, response):
    """A response as text. A message-list response is what the chat template adds after the prompt (TRL's rule)."""
    if isinstance(response, str):
        return response
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(prompt_text):
        raise ChatTemplateMismatch('the chat template does not render prompt+response as an extension of the prompt')
    return full[len(prompt_text):]


class ChatTemplateMismatch(ValueError):
    pass


def render(tokenizer, prompt, responses):
    """(prompt_text, [response_text, ...]) of a prompt and responses, each text or chat messages; raises what the
    chat template raises (Llama-2's and Mistral's: roles that do not alternate) and ChatTemplateMismatch."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) \
        if isinstance(prompt, list) else prompt
    return prompt_text, [render_response(tokenizer, prompt, prompt_text, r) for r in responses]


def is_valid_unicode(text):
    """False for text holding a lone surrogate (valid JSON, e.g. "\\ud83c" from a cut emoji): no tokenizer takes it."""
    return not re.search('[\ud800-\udfff]', text)


def render_row(row, tokenizer, need_rejected=True):
    """(prompt_text, chosen_text, rejected_text or None), or a short reason why the row is unusable."""
    if not isinstance(row, dict):
        return 'not a JSON object'
    keys = ('prompt', 'chosen', 'rejected') if need_rejected else ('prompt', 'chosen')
    if any(row.get(k) is None for k in keys):
        return 'missing key'
    prompt = row['prompt']
    if not (isinstance(prompt, str) or is_messages(prompt)):
        return 'non-text field'
    responses = [row[k] for k in keys[1:]]
    if not all(isinstance(r, str) or (is_messages(r) and isinstance(prompt, list)) for r in responses):
        return 'non-text field'
    if isinstance(prompt, list) and not tokenizer.chat_template:
        return 'messages without a chat template'
    try:
        prompt_text, texts = render(tokenizer, prompt, responses)
    except ChatTemplateMismatch:
        return 'chat template mismatch'
    except Exception:
        return 'chat template error'
    if not all(is_valid_unicode(t) for t in (prompt_text, *texts)):
        return 'invalid Unicode'
    if not all(t.strip() for t in texts):
        return 'empty response'
    if need_rejected and texts[0] == texts[1]:
        return 'identical responses'
    return prompt_text, texts[0], texts[1] if need_rejected else None


def end_of_turn(tokenizer):
    """What the chat template writes after an assistant message's text ('<|im_end|>\\n' for ChatML), or '' when it
    writes nothing that ends a turn (no template, or a plain-text one like data/toy's)."""
    if not tokenizer.chat_template:
        return ''
    marker = '\x00nanotr\x00'
    try:
        text = tokenizer.apply_chat_template(
            [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': marker}], tokenize=False)
    except Exception:  # a template that takes no such conversation marks no end of turn we could use
        return ''
    return text[text.rfind(marker) + len(marker):] if marker in text else ''


def tokenize_prompt(tokenizer, prompt):
    """Prompt ids with BOS exactly where the model expects one: the tokenizer adds it for models that use it
    (Llama) and not for others (Pythia); a chat template that already wrote it into the text is not doubled."""
    prompt_ids = tokenizer(prompt).input_ids
    if len(prompt_ids) > 1 and prompt_ids[0] == prompt_ids[1] == tokenizer.bos_token_id:
        prompt_ids = prompt_ids[1:]
    return prompt_ids


def tokenize_response(tokenizer, text, turn_end=''):
    """Response ids ending the sequence: EOS is appended to plain text, unless the text already ends with EOS or
    with the chat template's end of turn (a message-list response ends with it, and TRL appends nothing after it)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if (turn_end.strip() and text.endswith(turn_end)) or ids[-1:] == [tokenizer.eos_token_id]:
        return ids
    return ids + [tokenizer.eos_token_id]


def tokenize_pair(tokenizer, prompt, chosen, rejected, max_length, max_prompt_length, turn_end=''):
    """Token ids (prompt, chosen, rejected or nothing) of rendered texts; too-long pairs are truncated."""
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    responses = [tokenize_response(tokenizer, r, turn_end) for r in (chosen, rejected) if r is not None]
    prompt_ids, responses = truncate(prompt_ids, responses, max_length, max_prompt_length)
    return prompt_ids, *responses


def truncate(prompt_ids, responses, max_length, max_prompt_length):
    """A too-long example first loses the prompt's start (keeping its last max_prompt_length tokens), then the
    responses' ends (the DPO repository's rule: a dialogue's end matters most, and each response keeps its start)."""
    if len(prompt_ids) + max(map(len, responses)) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    return prompt_ids, [r[:max_length - len(prompt_ids)] for r in responses]


def without_oldest_exchange(messages, k=1):
    """The conversation minus its k first user turns and the assistant turns that answer them (system turns before
    the first user turn stay), or None when fewer than k + 1 user turns are left."""
    users = [i for i, m in enumerate(messages) if m['role'] == 'user']
    if len(users) < k + 1:
        return None
    return messages[:users[0]] + messages[users[k]:]


# A tokenized example: prompt and response ids (int32; rejected is None for sft), and for reward-labelled data the
# margins Δr_i = r_i(y_w) − r_i(y_l) of its k reward models.
Pair = namedtuple('Pair', 'prompt chosen rejected reward_margins', defaults=(None, None))
# An example fitted to max_length: the prompt kept (a chat prompt without the exchanges it dropped), its text, and the
# token ids [prompt, *responses] after truncation.
Fitted = namedtuple('Fitted', 'prompt prompt_text ids')


def fit_example(tokenizer, prompt, responses, max_length, max_prompt_length, turn_end='', rendered=None):
    """The one truncation rule of every script (training, reward labels, reward scoring, the prompts of sample.py),
    as a Fitted example. Prompt and responses are text or chat messages. When the prompt and its longest response
    exceed max_length, a chat prompt drops whole exchanges, oldest first, until the prompt is within
    max_prompt_length or the whole example fits, so that its system turn, the template's opening and its last user
    turn stay intact (cutting tokens off its start would drop those); then truncate() cuts what is still too long:
    the prompt's start (a last user turn that alone is over max_prompt_length is cut like text), then the responses'
    ends. Raises what the chat template raises. `rendered`: render(tokenizer, prompt, responses), if the caller has it.

    The number of exchanges to drop is the smallest that fits (prompts only shrink as exchanges go): found by an
    exponential search from the last exchange, then bisection, so a long conversation costs a few renders of its
    kept end, not one render per dropped exchange (2,000 exchanges took 98 s that way)."""
    def encode(k):  # the example with its k oldest exchanges dropped
        kept = without_oldest_exchange(prompt, k) if k else prompt
        prompt_text, texts = rendered if rendered and not k else render(tokenizer, kept, responses)
        return Fitted(kept, prompt_text, list(tokenize_pair(tokenizer, prompt_text, *texts, *[None] * (2 - len(texts)),
                                                            max_length=10**9, max_prompt_length=10**9,
                                                            turn_end=turn_end)))

    def too_long(fitted):
        prompt_ids, *response_ids = fitted.ids
        return len(prompt_ids) + max(map(len, response_ids)) > max_length and len(prompt_ids) > max_prompt_length
    fitted = encode(0)
    if isinstance(prompt, list) and too_long(fitted):
        tried = {0: fitted}
        low, high = 0, sum(m['role'] == 'user' for m in prompt) - 1  # too long / the most that can go (or fits)
        step = 1
        while high - step > low:  # back from the end until an example is too long
            tried[high - step] = encode(high - step)
            if too_long(tried[high - step]):
                low = high - step
                break
            high, step = high - step, step * 2
        while high - low > 1:
            middle = (low + high) // 2
            tried[middle] = encode(middle)
            low, high = (middle, high) if too_long(tried[middle]) else (low, middle)
        fitted = tried.get(high) or encode(high)
    prompt_ids, responses_ids = truncate(fitted.ids[0], fitted.ids[1:], max_length, max_prompt_length)
    return fitted._replace(ids=[prompt_ids, *responses_ids])


def fit_row(row, tokenizer, max_length, max_prompt_length, need_rejected=True, turn_end=''):
    """A usable row as a Fitted example (fit_example's rule), or a short reason why it is unusable: render_row's,
    an empty prompt, or responses identical after truncation."""
    texts = render_row(row, tokenizer, need_rejected)
    if isinstance(texts, str):
        return texts
    responses = [row['chosen'], row['rejected']] if need_rejected else [row['chosen']]
    try:  # the template took the whole conversation; a shorter one it could still refuse
        fitted = fit_example(tokenizer, row['prompt'], responses, max_length, max_prompt_length, turn_end,
                             rendered=(texts[0], [t for t in texts[1:] if t is not None]))
    except ChatTemplateMismatch:
        return 'chat template mismatch'
    except Exception:
        return 'chat template error'
    if not fitted.ids[0]:  # a tokenizer without BOS gives an empty prompt no token to predict the response's first from
        return 'empty prompt'
    if need_rejected and fitted.ids[1] == fitted.ids[2]:  # chosen == rejected: nothing left to prefer
        return 'identical after truncation'
    return fitted


def encode_row(row, tokenizer, max_length, max_prompt_length, need_rejected=True, turn_end=''):
    """(prompt_text, token ids) of a usable row, fitted by fit_row, or why it is unusable."""
    fitted = fit_row(row, tokenizer, max_length, max_prompt_length, need_rejected, turn_end)
    return fitted if isinstance(fitted, str) else (fitted.prompt_text, fitted.ids)


def reward_margins(row, name, index, k):
    """Δr_i = reward_chosen[i] − reward_rejected[i] of a labelled row (a number counts as a list of one). Rows are
    never skipped for their rewards: a missing or malformed label stops the run, naming the row."""
    where = f'{name} row {index + 1}'
    if 'reward_chosen' not in row or 'reward_rejected' not in row:
        raise SystemExit(f'error: {where} has no reward_chosen/reward_rejected; distillation losses train on pairs '
                         'labelled by reward models (python data/label.py)')
    chosen, rejected = (r if isinstance(r, list) else [r] for r in (row['reward_chosen'], row['reward_rejected']))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in chosen + rejected) \
            or not chosen or len(chosen) != len(rejected):
        raise SystemExit(f'error: {where}: reward_chosen and reward_rejected must be lists of numbers of equal length')
    if k is not None and len(chosen) != k:
        raise SystemExit(f'error: {where} has {len(chosen)} rewards per response, earlier rows have {k}')
    try:
        values = [float(v) for v in chosen + rejected]
    except OverflowError:  # an integer beyond the float range
        values = [math.inf]
    margins = tuple(c - r for c, r in zip(values[:len(chosen)], values[len(chosen):]))
    if not all(map(math.isfinite, values + list(margins))):
        raise SystemExit(f'error: {where} has a NaN or infinite reward (or one so large that its margin is)')
    return margins


def load_pairs(source, split, tokenizer, max_length, max_prompt_length, need_rejected=True, verbose=True,
               required=True, need_rewards=False, texts=False):
    """The split's usable rows tokenized once, as Pairs (with texts=True, (prompt, prompt_text, Pair) tuples: the prompt
    kept, a chat prompt without the exchanges it dropped, and its text); bad rows are skipped and counted. A missing
    split is an error, or None when not required (the held-out split)."""
    rows, name = read_rows(source, split)
    if rows is None:
        if required:
            hint = ' (a data/<name> folder is filled by its prepare.py)' if Path(source).is_dir() else ''
            raise SystemExit(f'error: {name}{hint}')
        if verbose:
            print(name)
        return None
    pairs, skipped, turn_end, k = [], Counter(), end_of_turn(tokenizer), None
    for index, row in enumerate(rows):
        fitted = fit_row(row, tokenizer, max_length, max_prompt_length, need_rejected, turn_end)
        if isinstance(fitted, str):
            skipped[fitted] += 1
            continue
        margins = reward_margins(row, name, index, k) if need_rewards else None
        k = len(margins) if margins else None
        pair = Pair(*(torch.tensor(ids, dtype=torch.int32) for ids in fitted.ids), reward_margins=margins)
        pairs.append((fitted.prompt, fitted.prompt_text, pair) if texts else pair)
    if verbose:
        why = ', '.join(f'{n} {reason}' for reason, n in sorted(skipped.items()))
        skip_note = f' (skipped {sum(skipped.values()):,} rows: {why})' if skipped else ''
        print(f'{name}: {len(pairs):,} pairs{skip_note}')
    if not pairs:
        raise SystemExit(f'error: no usable preference rows in {name} ({len(rows)} rows read; '
                         'each needs "prompt", "chosen"' + (', "rejected"' if need_rejected else '') + ' as text)')
    return pairs


def padding_id(tokenizer):
    """The id batches are padded with: the tokenizer's pad token, else EOS (Pythia and Llama define no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# Rows are padded to a multiple of 32 tokens: a bounded set of shapes. On a CPU, oneDNN builds and caches kernels per
# shape for bf16, and with free widths a SmolLM2 run grew by 1.7 GB in 50 steps (measured; 0.3 GB padded).
PAD_MULTIPLE = 32


def layout(rows, pad_id, device='cpu'):
    """The batch tensors of rows [(prompt_ids, [response_ids, ...])]: each row is one sequence, the prompt followed by
    all its responses, right-padded. Prompt sharing (Wang & Hegde 2024): a response token attends to the prompt and to
    its own response only, and its positions continue from the prompt's end, so each response sees exactly what it
    would see after the prompt alone (the same log-probs, tested) while the prompt is computed once. Responses are
    numbered response-major: response 0 of every row (the chosen ones), then response 1 (the rejected ones).
        predict  flat index (row·width + column) of the hidden state that predicts each response token: the prompt's
                 last position for the first token, then the response's own positions
        labels   the response tokens, in that order;  lengths: tokens per response (owner: the response of each token)
        last     flat index of each response's last token that is not padding (a reward model reads its score there)
        n_tokens the real tokens of the batch (each prompt counted once)
    """
    n_rows, n_responses = len(rows), len(rows[0][1])
    width = -(-max(len(p) + sum(map(len, rs)) for p, rs in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment = torch.full((n_rows, width), -1)  # 0 prompt, j + 1 response j, -1 padding
    starts = []
    for b, (prompt, responses) in enumerate(rows):
        n = len(prompt) + sum(map(len, responses))
        input_ids[b, :n] = torch.cat([prompt, *responses])
        position_ids[b, :n] = torch.cat([torch.arange(len(prompt))] + [torch.arange(len(r)) + len(prompt)
                                                                       for r in responses])
        segment[b, :n] = torch.cat([torch.zeros(len(prompt))] + [torch.full((len(r),), j + 1)
                                                                 for j, r in enumerate(responses)])
        starts.append([len(prompt) + sum(map(len, responses[:j])) for j in range(n_responses)])
    predict, last = [], []
    for j in range(n_responses):
        for b, (prompt, responses) in enumerate(rows):
            start, response = starts[b][j], responses[j]
            predict.append(b * width + torch.cat([torch.tensor([len(prompt) - 1]),
                                                  torch.arange(start, start + len(response) - 1)]))
            real = (response != pad_id).nonzero()  # with pad = EOS, the token before the final EOS (as transformers)
            last.append(b * width + (start + real[-1, 0].item() if len(real) else len(prompt) - 1))
    lengths = torch.tensor([len(rs[j]) for j in range(n_responses) for _, rs in rows])
    column = torch.arange(width)
    visible = (segment[:, None, :] == 0) | (segment[:, :, None] == segment[:, None, :])  # [row, query, key]
    batch = {'input_ids': input_ids, 'position_ids': position_ids,
             'attention_mask': (visible & (column[None, :] <= column[:, None]))[:, None],
             'predict': torch.cat(predict), 'labels': torch.cat([rs[j] for j in range(n_responses) for _, rs in rows]),
             'owner': torch.arange(len(lengths)).repeat_interleave(lengths), 'lengths': lengths,
             'last': torch.tensor(last), 'n_tokens': (segment >= 0).sum().float()}
    return {k: v.to(device, torch.long if k == 'labels' else None) for k, v in batch.items()}


def make_batch(pairs, with_rejected, pad_id, device='cpu'):
    """One micro-batch of Pairs: a row per pair, [prompt, chosen, rejected] (with_rejected=False, sft: [prompt,
    chosen]), and for labelled pairs their reward margins [n, k]."""
    batch = layout([(p.prompt, [p.chosen, p.rejected] if with_rejected else [p.chosen]) for p in pairs], pad_id, device)
    if pairs[0].reward_margins is not None:
        batch['reward_margins'] = torch.tensor([p.reward_margins for p in pairs], device=device)
    return batch


def derived_seed(*numbers):
    """A generator seed for a tuple of numbers ((seed, epoch), (seed, batch)), hashed so that different tuples give
    unrelated streams: seeding with seed + epoch gave seed 2 the order of seed 1 one epoch later."""
    return int.from_bytes(hashlib.sha256('/'.join(map(str, numbers)).encode()).digest()[:8], 'little')


@lru_cache(maxsize=2)
def epoch_order(n_pairs, seed, epoch):
    return torch.randperm(n_pairs, generator=torch.Generator().manual_seed(derived_seed(seed, epoch))).tolist()


def step_pair_indices(n_pairs, done, batch_size, seed):
    """Indices of the pairs of the iteration after `done` iterations: consecutive slices of a stream of seeded
    per-epoch permutations, so the data position of a run is just its iteration number."""
    indices, start = [], done * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), n_pairs)
        indices += epoch_order(n_pairs, seed, epoch)[offset:offset + batch_size - len(indices)]
    return indices


def note_evaluation(pairs, eval_pairs, global_micro):
    """Says why train_tr.py will never evaluate, if it will not: it evaluates whole global micro-batches only."""
    n = 0 if pairs is None else min(len(pairs), eval_pairs)
    if n < global_micro:
        why = 'no test split' if pairs is None else 'eval_pairs=0' if eval_pairs == 0 else \
            f'{len(pairs)} held-out pairs, eval_pairs={eval_pairs}: fewer than one micro-batch of {global_micro} ' \
            'over all processes'
        print(f'note: no evaluation ({why}); checkpoints are still saved every eval_interval steps')
