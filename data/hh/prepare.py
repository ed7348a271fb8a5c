"""
Anthropic HH-RLHF -> canonical preference rows {"prompt", "chosen", "rejected"}, one JSON object per line.

The split follows the DPO paper's code (extract_anthropic_prompt): the prompt is the text of `chosen` up to and
including its last "\n\nAssistant:" (rfind, no trailing space), and each response is what follows the prompt, so it
keeps its leading space (" I think..."), which GPT-2/Pythia BPE attaches to the next word. Unlike the DPO code we
check the row instead of trusting it, and skip and count rows that
  - have no "\n\nAssistant:" at all                       (no assistant turn)
  - whose `rejected` does not start with that prompt      (prompt mismatch: the dialogues diverge in an earlier turn)
  - whose chosen or rejected response is empty/whitespace (empty response)
  - whose two responses are identical                     (identical responses: no preference signal)
With --messages the rows are chat-message lists for models with a chat template (TRL's conversational format): the
prompt is the dialogue as alternating {"role": "user"|"assistant", "content"} turns (stripped), each response one
assistant turn; a prompt that does not alternate Human/Assistant from a Human turn is skipped (not a dialogue).

Usage (from the repo root):
  python data/hh/prepare.py                               # HF Anthropic/hh-rlhf, default config (all four subsets)
  python data/hh/prepare.py --data_dir=helpful-base       # one subset, passed through to load_dataset
  python data/hh/prepare.py --raw=path/to/harmless-base   # local raw files: a directory, a glob, or several paths
  python data/hh/prepare.py --raw a/train.jsonl.gz b/test.jsonl.gz --out_dir=/tmp/hh
  python data/hh/prepare.py --data_dir=harmless-base --messages --out_dir=data/hh_chat    # for chat models
  python data/hh/prepare.py --raw=hh.jsonl --test_rows=40     # both splits from one file: its last 40 rows are test
Local files are the raw *.jsonl.gz / *.jsonl of the anthropics/hh-rlhf repo; the split comes from the file name
("train" or "test"), or with --test_rows from the rows' order. Writes data/hh/train.jsonl and data/hh/test.jsonl (or
into --out_dir).

Raw counts, HF default config: train 160,800 / test 8,552 (helpful-base alone: 43,835 / 2,354).
Kept counts on the full data: not measured here (no network). On the first 300 rows of harmless-base test:
  hh test: kept 299 of 300 rows (skipped: 1 empty response)
"""
import argparse
import os
import re
import sys

# prepare_common.py sits in data/, which is no package: put data/ on the path so this runs from any working directory
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare_common  # noqa: E402
from prepare_common import expand, read_raw_rows, summary, write_splits  # noqa: E402,F401  (summary: for the tests)

SEARCH = "\n\nAssistant:"


def hh_to_canonical(row):
    """One raw HH row -> {"prompt", "chosen", "rejected"}, or a short skip reason so the caller can count it."""
    chosen, rejected = row["chosen"], row["rejected"]
    idx = chosen.rfind(SEARCH)
    if idx == -1:
        return "no assistant turn"
    prompt = chosen[: idx + len(SEARCH)]
    if not rejected.startswith(prompt):
        return "prompt mismatch"
    chosen_resp, rejected_resp = chosen[len(prompt):], rejected[len(prompt):]
    if not chosen_resp.strip() or not rejected_resp.strip():
        return "empty response"
    if chosen_resp == rejected_resp:
        return "identical responses"
    return {"prompt": prompt, "chosen": chosen_resp, "rejected": rejected_resp}


def hh_to_messages(row):
    """One raw HH row -> {"prompt": [turns], "chosen": [assistant turn], "rejected": [assistant turn]}, or a reason."""
    canonical = hh_to_canonical(row)
    if isinstance(canonical, str):
        return canonical
    # "\n\nHuman: a\n\nAssistant: b ... \n\nAssistant:" -> ['', 'Human', ' a', 'Assistant', ' b', ..., 'Assistant', '']
    parts = re.split(r"\n\n(Human|Assistant):", canonical["prompt"])
    speakers, texts = parts[1:-2:2], [t.strip() for t in parts[2:-2:2]]
    n = len(speakers)
    if parts[0] or n % 2 == 0 or speakers != (["Human", "Assistant"] * n)[:n] or not all(texts):
        return "not a dialogue"
    prompt = [{"role": "user" if s == "Human" else "assistant", "content": t} for s, t in zip(speakers, texts)]
    return {"prompt": prompt, **{k: [{"role": "assistant", "content": canonical[k].strip()}]
                                 for k in ("chosen", "rejected")}}


def convert(rows, messages=False):
    """Raw rows -> (kept canonical rows, Counter of skip reasons); nothing is dropped without being counted."""
    return prepare_common.convert(rows, hh_to_messages if messages else hh_to_canonical)


def split_of(path):
    """The anthropics/hh-rlhf files are named train.jsonl.gz / test.jsonl.gz; refuse to guess for anything else."""
    name = os.path.basename(path)
    if ("train" in name) == ("test" in name):
        raise SystemExit(f"error: cannot tell train from test in file name {name} (--test_rows splits any file)")
    return "train" if "train" in name else "test"


def load_splits(raw, data_dir, test_rows=0):
    """{split: raw rows} from local files, or from the HF hub when no --raw is given. With test_rows, the local files'
    rows, in the order given, make both splits whatever the files are called: the last test_rows are the test split
    (a fixed held-out part, so that the same files give the same splits), the rest the train split."""
    if not raw:
        if test_rows:
            raise SystemExit("error: --test_rows splits local --raw files; the hub's HH has its own test split")
        from datasets import load_dataset
        ds = load_dataset("Anthropic/hh-rlhf", data_dir=data_dir)
        return {split: ds[split] for split in ("train", "test")}
    files = expand(raw, (".jsonl", ".jsonl.gz"))
    if test_rows:
        rows = [row for path in files for row in read_raw_rows(path)]
        if test_rows >= len(rows):
            raise SystemExit(f"error: --test_rows={test_rows} leaves no training rows: --raw holds {len(rows)} rows")
        return {"train": rows[:-test_rows], "test": rows[-test_rows:]}
    splits = {}
    for path in files:
        splits.setdefault(split_of(path), []).extend(read_raw_rows(path))
    return splits


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", nargs="+", action="extend", help="local raw files, directories or globs")
    parser.add_argument("--data_dir", default=None, help="HF subset, e.g. harmless-base (default: all four)")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--messages", action="store_true", help="chat-message lists instead of HH text")
    parser.add_argument("--test_rows", type=int, default=0,
                        help="with --raw: the last this many raw rows are the test split, the rest train")
    args = parser.parse_args()
    if args.test_rows < 0:
        raise SystemExit(f"error: --test_rows must be >= 0, got {args.test_rows}")
    splits = load_splits(args.raw, args.data_dir, args.test_rows)
    os.makedirs(args.out_dir, exist_ok=True)
    write_splits("hh", splits, hh_to_messages if args.messages else hh_to_canonical, args.out_dir)
