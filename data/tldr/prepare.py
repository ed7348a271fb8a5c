"""
TL;DR summarization preferences (trl-lib/tldr-preference layout) -> canonical rows {"prompt", "chosen", "rejected"},
one JSON object per line.

Source layout: columns prompt, chosen, rejected. Reddit prompts are
  "SUBREDDIT: r/...\n\nTITLE: ...\n\nPOST: ...\n\nTL;DR:"
CNN/DM prompts are "TITLE: ...\n\n<article>\n\nTL;DR:". The source script neither adds nor strips whitespace around
the summaries, so each response is normalized to exactly one leading space (" " + text.strip()); the prompt ends in
"TL;DR:" and BPE attaches that space to the first word. Rows are skipped and counted when
  - prompt, chosen or rejected is not a string                 (non-string field)
  - the prompt does not start with "SUBREDDIT:" and --reddit_only (CNN/DM; about 2,284 of validation)
  - a summary is empty or whitespace-only                      (empty summary)
  - the two summaries are equal after normalization            (identical summaries: no preference signal)

Usage (from the repo root):
  python data/tldr/prepare.py                                  # HF trl-lib/tldr-preference: train, validation
  python data/tldr/prepare.py --reddit_only=False              # keep the CNN/DM rows
  python data/tldr/prepare.py --raw=dir/train.parquet --raw=dir/validation.parquet --out_dir=/tmp/tldr
Local files may be .jsonl, .json (a list of rows) or .parquet; a file whose name contains "test" or "valid" is the
test split, any other file is train. Writes data/tldr/train.jsonl and data/tldr/test.jsonl (HF validation -> test).

Raw counts, trl-lib/tldr-preference: train 92,858 / validation 86,086 (83,802 Reddit + 2,284 CNN/DM).
Kept counts: not measured here (no network).
"""
import argparse
import functools
import os
import sys

# prepare_common.py sits in data/, which is no package: put data/ on the path so this runs from any working directory
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare_common  # noqa: E402
from prepare_common import expand, read_raw_rows, write_splits  # noqa: E402


def tldr_to_canonical(row, reddit_only=True):
    """One source row -> {"prompt", "chosen", "rejected"} with " "-prefixed summaries, or a short skip reason."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        return "non-string field"
    if reddit_only and not prompt.startswith("SUBREDDIT:"):
        return "cnn/dm"
    if not chosen.strip() or not rejected.strip():
        return "empty summary"
    chosen, rejected = " " + chosen.strip(), " " + rejected.strip()
    if chosen == rejected:
        return "identical summaries"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def convert(rows, reddit_only=True):
    """Source rows -> (kept canonical rows, Counter of skip reasons); nothing is dropped without being counted."""
    return prepare_common.convert(rows, functools.partial(tldr_to_canonical, reddit_only=reddit_only))


def split_of(path):
    """HF names the held-out split "validation"; we write it as test, like HH."""
    name = os.path.basename(path)
    return "test" if "test" in name or "valid" in name else "train"


def load_splits(raw, name):
    """{split: source rows} from local files, or from the HF hub when no --raw is given."""
    if raw:
        splits = {}
        for path in expand(raw, (".jsonl", ".json", ".parquet")):
            splits.setdefault(split_of(path), []).extend(read_raw_rows(path))
        return splits
    from datasets import load_dataset
    ds = load_dataset(name)
    return {"train": ds["train"], "test": ds["validation"]}


def parse_bool(s):
    """argparse's type=bool would read "False" as True."""
    if s.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {s}")
    return s.lower() == "true"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", nargs="+", action="extend", help="local .jsonl/.json/.parquet files, directories or globs")
    parser.add_argument("--name", default="trl-lib/tldr-preference", help="HF dataset name when no --raw is given")
    parser.add_argument("--reddit_only", type=parse_bool, default=True, help="drop CNN/DM rows (True/False)")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    to_canonical = functools.partial(tldr_to_canonical, reddit_only=args.reddit_only)
    write_splits("tldr", load_splits(args.raw, args.name), to_canonical, args.out_dir)
