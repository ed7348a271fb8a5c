"""
What the data preparation scripts share. data/hh/prepare.py and data/tldr/prepare.py: reading raw rows, turning them
into canonical {"prompt", "chosen", "rejected"} rows while counting every skipped row, the per-split summary line, and
writing one JSON object per line. Each script keeps its own parsing rule (a per-row function that returns the canonical
row or a short skip reason), its split naming and its CLI. data/tiny/prepare.py and data/toy/prepare.py: the byte-level
BPE tokenizer with the HH chat template and the randomly initialised 2-layer Llama that their shipped models start from.
"""
import glob
import gzip
import json
import os
from collections import Counter


def convert(rows, to_canonical):
    """Raw rows -> (kept canonical rows, Counter of skip reasons); nothing is dropped without being counted.
    to_canonical(row) returns the canonical row (a dict) or a short skip reason (a str)."""
    kept, skipped = [], Counter()
    for row in rows:
        out = to_canonical(row)
        if isinstance(out, str):
            skipped[out] += 1
        else:
            kept.append(out)
    return kept, skipped


def summary(name, split, kept, skipped):
    """The one line per split that says how many rows survived and why the others did not."""
    total = len(kept) + sum(skipped.values())
    why = ", ".join(f"{n:,} {reason}" for reason, n in skipped.most_common()) or "none"
    return f"{name} {split}: kept {len(kept):,} of {total:,} rows (skipped: {why})"


def expand(paths, suffixes):
    """--raw entries (files, directories, globs) -> list of raw files. Globs are expanded here because the shell
    does not expand a pattern glued to '--raw='; a directory means its own files whose names end in one of suffixes."""
    files = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise SystemExit(f"error: --raw: nothing matches {pattern}")
        for path in matches:
            if os.path.isdir(path):
                files += sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(tuple(suffixes)))
            else:
                files.append(path)
    return files


def read_raw_rows(path):
    """One raw file -> list of rows: .parquet, .json (a list of rows), otherwise JSON lines (gzipped if .gz)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.endswith(".json"):
            return json.load(f)
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_splits(name, splits, to_canonical, out_dir):
    """{split: raw rows} -> out_dir/{split}.jsonl, printing one summary line per split."""
    for split, rows in splits.items():
        kept, skipped = convert(rows, to_canonical)
        print(summary(name, split, kept, skipped))
        write_jsonl(kept, os.path.join(out_dir, f"{split}.jsonl"))


# -----------------------------------------------------------------------------
# tiny models (data/tiny, data/toy): a BPE tokenizer trained on the data's texts and a random 2-layer Llama

EOS = "<|endoftext|>"
PAD = "<|pad|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)


def build_tokenizer(texts, vocab_size=512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # no post_processor: the tokenizer never adds BOS/EOS on its own
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                  model_max_length=512)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    return model


def save_base(tok, model, base_dir):
    model.save_pretrained(base_dir, safe_serialization=True)
    os.chmod(os.path.join(base_dir, "model.safetensors"), 0o644)  # save_pretrained may write it 0600
    tok.save_pretrained(base_dir)
    # name the generic class (not transformers-5's "TokenizersBackend") so older transformers load it too
    cfg_path = os.path.join(base_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
