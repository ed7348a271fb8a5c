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
import glob
import json
import os
from collections import Counter


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
    kept, skipped = [], Counter()
    for row in rows:
        out = tldr_to_canonical(row, reddit_only)
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


def expand(paths):
    """--raw entries (files, directories, globs) -> list of source files. Globs are expanded here because the shell
    does not expand a pattern glued to '--raw='; a directory means its own .jsonl/.json/.parquet files."""
    files = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise SystemExit(f"--raw: nothing matches {pattern}")
        for path in matches:
            if os.path.isdir(path):
                files += sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith((".jsonl", ".json", ".parquet")))
            else:
                files.append(path)
    return files


def split_of(path):
    """HF names the held-out split "validation"; we write it as test, like HH."""
    name = os.path.basename(path)
    return "test" if "test" in name or "valid" in name else "train"


def read_rows(path):
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            return json.load(f)
        return [json.loads(line) for line in f if line.strip()]


def load_splits(raw, name):
    """{split: source rows} from local files, or from the HF hub when no --raw is given."""
    if raw:
        splits = {}
        for path in expand(raw):
            splits.setdefault(split_of(path), []).extend(read_rows(path))
        return splits
    from datasets import load_dataset
    ds = load_dataset(name)
    return {"train": ds["train"], "test": ds["validation"]}


def write_jsonl(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
    for split, rows in load_splits(args.raw, args.name).items():
        kept, skipped = convert(rows, args.reddit_only)
        print(summary("tldr", split, kept, skipped))
        write_jsonl(kept, os.path.join(args.out_dir, f"{split}.jsonl"))
