"""
What the data preparation scripts (data/hh/prepare.py, data/tldr/prepare.py) share: reading raw rows, turning them
into canonical {"prompt", "chosen", "rejected"} rows while counting every skipped row, the per-split summary line, and
writing one JSON object per line. Each script keeps its own parsing rule (a per-row function that returns the canonical
row or a short skip reason), its split naming and its CLI.
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
            raise SystemExit(f"--raw: nothing matches {pattern}")
        for path in matches:
            if os.path.isdir(path):
                files += sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(tuple(suffixes)))
            else:
                files.append(path)
    return files


def read_rows(path):
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
