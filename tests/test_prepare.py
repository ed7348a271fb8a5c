"""The data preparation scripts: hand-checked outputs on small raw fixtures, the CLIs end to end, and the HH parser on
300 real rows that the repository ships (data/hh/harmless_test_first300.jsonl). CPU only, no network."""
import gzip
import importlib.util
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
HH_SAMPLE = ROOT / "data" / "hh" / "harmless_test_first300.jsonl"  # the first 300 raw rows of HH harmless-base test


def load_script(rel, name):
    """Both scripts are called prepare.py and live outside any package, so import them by path under distinct names."""
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hh = load_script("data/hh/prepare.py", "hh_prepare")
tldr = load_script("data/tldr/prepare.py", "tldr_prepare")


def read_jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


HH_EXPECTED = [
    {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:",
     "chosen": " The capital of France is Paris.",
     "rejected": " I don't know."},
    {"prompt": "\n\nHuman: Can you help me bake bread?\n\nAssistant: Sure, what kind of bread?"
               "\n\nHuman: A simple white loaf.\n\nAssistant:",
     "chosen": " Mix flour, water, yeast and salt, knead, let it rise, then bake at 220C.",
     "rejected": " Buy one at the store."},
    {"prompt": "\n\nHuman: Translate 'thank you' to French and Japanese.\n\nAssistant:",
     "chosen": " French: merci.\nJapanese: ありがとう。",
     "rejected": "  French: merci."},  # the remainder is kept verbatim, double space included
]
HH_SKIPPED = Counter({"empty response": 2, "prompt mismatch": 1, "identical responses": 1, "no assistant turn": 1})

TLDR_EXPECTED = [
    {"prompt": "SUBREDDIT: r/cooking\n\nTITLE: Burnt my first sourdough\n\nPOST: I followed the recipe exactly but the "
               "crust came out black.\nWhat went wrong?\n\nTL;DR:",
     "chosen": " Followed a sourdough recipe, crust burnt black; asking what went wrong.",
     "rejected": " bread bad"},
    {"prompt": "SUBREDDIT: r/relationships\n\nTITLE: Friend keeps cancelling plans\n\nPOST: We have planned dinner "
               "five "
               "times and she cancels every time.\n\nTL;DR:",
     "chosen": " Friend has cancelled dinner five times in a row; should I stop asking?",
     "rejected": " my friend cancels"},
]
TLDR_CNNDM = {"prompt": "TITLE: Storm hits coast\n\nA powerful storm made landfall on Tuesday, knocking out power to "
                        "thousands.\n\nTL;DR:",
              "chosen": " Storm knocks out power to thousands.",
              "rejected": " A storm happened."}
TLDR_SKIPPED = Counter({"cnn/dm": 1, "identical summaries": 1, "empty summary": 1, "non-string field": 1})


def test_hh_fixture():
    kept, skipped = hh.convert(read_jsonl(FIXTURES / "hh_raw_train.jsonl.gz"))
    assert kept == HH_EXPECTED
    assert skipped == HH_SKIPPED


def test_hh_skip_reasons_inline():
    H, A = "\n\nHuman:", "\n\nAssistant:"
    assert hh.hh_to_canonical({"chosen": f"{H} hi", "rejected": f"{H} hi"}) == "no assistant turn"
    assert hh.hh_to_canonical({"chosen": f"{H} a{A} b{H} c{A} d",
                               "rejected": f"{H} a{A} X{H} c{A} e"}) == "prompt mismatch"
    assert hh.hh_to_canonical({"chosen": f"{H} a{A}  \n", "rejected": f"{H} a{A} b"}) == "empty response"
    assert hh.hh_to_canonical({"chosen": f"{H} a{A} b", "rejected": f"{H} a{A}"}) == "empty response"
    assert hh.hh_to_canonical({"chosen": f"{H} a{A} b", "rejected": f"{H} a{A} b"}) == "identical responses"


def test_hh_messages():
    """--messages: the dialogue as alternating user/assistant turns (stripped), each response one assistant turn."""
    H, A = "\n\nHuman:", "\n\nAssistant:"
    row = {"chosen": f"{H} Hi there{A} Hello! How can I help?{H} Name a fruit.{A} An apple.",
           "rejected": f"{H} Hi there{A} Hello! How can I help?{H} Name a fruit.{A} A car."}
    assert hh.hh_to_messages(row) == {
        "prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Name a fruit."}],
        "chosen": [{"role": "assistant", "content": "An apple."}],
        "rejected": [{"role": "assistant", "content": "A car."}]}
    assert hh.hh_to_messages({"chosen": f"{H} a{A} b", "rejected": f"{H} a{A}"}) == "empty response"
    assert hh.hh_to_messages({"chosen": f"{H} a{H} b{A} c", "rejected": f"{H} a{H} b{A} d"}) == "not a dialogue"
    assert hh.hh_to_messages({"chosen": f"intro{H} a{A} c", "rejected": f"intro{H} a{A} d"}) == "not a dialogue"
    assert hh.hh_to_messages({"chosen": f"{H} {A} c", "rejected": f"{H} {A} d"}) == "not a dialogue"  # empty turn


def test_tldr_fixture():
    rows = read_jsonl(FIXTURES / "tldr_raw.jsonl")
    kept, skipped = tldr.convert(rows)
    assert kept == TLDR_EXPECTED
    assert skipped == TLDR_SKIPPED
    kept, skipped = tldr.convert(rows, reddit_only=False)
    assert kept == TLDR_EXPECTED[:2] + [TLDR_CNNDM]
    assert skipped == TLDR_SKIPPED - Counter({"cnn/dm": 1})


def run_script(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout


def test_hh_cli(tmp_path):
    stdout = run_script("data/hh/prepare.py", f"--raw={FIXTURES / 'hh_raw_train.jsonl.gz'}", f"--out_dir={tmp_path}")
    assert stdout.strip() == ("hh train: kept 3 of 8 rows (skipped: 2 empty response, 1 prompt mismatch, "
                              "1 identical responses, 1 no assistant turn)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]
    assert read_jsonl(tmp_path / "train.jsonl") == HH_EXPECTED


def test_hh_cli_directory_and_glob(tmp_path):
    """A directory or a glob glued to --raw= must find the file: the shell will not expand it."""
    raw = tmp_path / "harmless-base"
    raw.mkdir()
    shutil.copy(FIXTURES / "hh_raw_train.jsonl.gz", raw / "train.jsonl.gz")
    run_script("data/hh/prepare.py", f"--raw={raw}", f"--out_dir={tmp_path / 'dir'}")
    run_script("data/hh/prepare.py", f"--raw={FIXTURES / 'hh_*.jsonl.gz'}", f"--out_dir={tmp_path / 'glob'}")
    assert read_jsonl(tmp_path / "dir" / "train.jsonl") == HH_EXPECTED
    assert read_jsonl(tmp_path / "glob" / "train.jsonl") == HH_EXPECTED


def test_hh_test_rows_split_one_file(tmp_path):
    """--test_rows: one raw file (named neither train nor test) gives both splits, its last rows the test split."""
    raw = tmp_path / "hh.jsonl.gz"
    shutil.copy(FIXTURES / "hh_raw_train.jsonl.gz", raw)
    rows = read_jsonl(raw)
    stdout = run_script("data/hh/prepare.py", f"--raw={raw}", "--test_rows=3", f"--out_dir={tmp_path / 'out'}")
    (train, train_skipped), (test, test_skipped) = hh.convert(rows[:-3]), hh.convert(rows[-3:])
    assert stdout.splitlines() == [hh.summary("hh", "train", train, train_skipped),
                                   hh.summary("hh", "test", test, test_skipped)]
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == train and read_jsonl(tmp_path / "out" / "test.jsonl") == test
    assert train and test and train + test == HH_EXPECTED
    for args, message in ([f"--raw={raw}", "--test_rows=8"], "error: --test_rows=8 leaves no training rows: --raw "
                          "holds 8 rows"), (["--test_rows=3"], "error: --test_rows splits local --raw files; the hub's "
                                            "HH has its own test split"), ([f"--raw={raw}"], "error: cannot tell"):
        proc = subprocess.run([sys.executable, "data/hh/prepare.py", *args, f"--out_dir={tmp_path / 'refused'}"],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith(message) and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "refused").exists()


def test_tldr_cli(tmp_path):
    stdout = run_script("data/tldr/prepare.py", f"--raw={FIXTURES / 'tldr_raw.jsonl'}", f"--out_dir={tmp_path}")
    assert stdout.strip() == ("tldr train: kept 2 of 6 rows (skipped: 1 cnn/dm, 1 identical summaries, "
                              "1 empty summary, 1 non-string field)")
    assert read_jsonl(tmp_path / "train.jsonl") == TLDR_EXPECTED
    run_script("data/tldr/prepare.py", f"--raw={FIXTURES / 'tldr_raw.jsonl'}", f"--out_dir={tmp_path}",
               "--reddit_only=False")
    assert read_jsonl(tmp_path / "train.jsonl") == TLDR_EXPECTED[:2] + [TLDR_CNNDM]


def test_tldr_parquet_validation_is_test(tmp_path):
    """HF snapshots ship parquet named validation-*.parquet; that split is written as test.jsonl."""
    require("pyarrow", "pip install pyarrow (datasets, in requirements.txt, installs it)")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(read_jsonl(FIXTURES / "tldr_raw.jsonl")[:2]), tmp_path / "validation-0.parquet")
    run_script("data/tldr/prepare.py", f"--raw={tmp_path / 'validation-0.parquet'}", f"--out_dir={tmp_path / 'out'}")
    assert read_jsonl(tmp_path / "out" / "test.jsonl") == TLDR_EXPECTED


def test_hh_real_rows(tmp_path):
    rows = read_jsonl(HH_SAMPLE)
    kept, skipped = hh.convert(rows)
    print(hh.summary("hh", "test", kept, skipped))
    assert len(kept) + sum(skipped.values()) == 300
    for row in kept:
        assert row["prompt"].startswith("\n\nHuman:") and row["prompt"].endswith("\n\nAssistant:")
        for response in (row["chosen"], row["rejected"]):
            assert response.startswith(" ") and response.strip()
    # measured on this file: row 86's chosen transcript ends in "\n\nAssistant: " (whitespace-only reply)
    assert len(kept) == 299
    assert skipped == Counter({"empty response": 1})
    assert hh.hh_to_canonical(rows[86]) == "empty response"
    stdout = run_script("data/hh/prepare.py", f"--raw={HH_SAMPLE}", f"--out_dir={tmp_path}")
    assert stdout.strip() == "hh test: kept 299 of 300 rows (skipped: 1 empty response)"
    assert read_jsonl(tmp_path / "test.jsonl") == kept
    stdout = run_script("data/hh/prepare.py", f"--raw={HH_SAMPLE}", "--messages", f"--out_dir={tmp_path / 'chat'}")
    chat = read_jsonl(tmp_path / "chat" / "test.jsonl")
    assert stdout.strip() == f"hh test: kept {len(chat)} of 300 rows (skipped: 1 empty response)" and len(chat) == 299
    for row, text in zip(chat, kept):  # the same dialogues: each turn's text is in the HH prompt
        assert row["prompt"][-1]["role"] == "user" and all(t["content"] in text["prompt"] for t in row["prompt"])
    # README's real-model recipe: both splits from this one file, offline
    stdout = run_script("data/hh/prepare.py", f"--raw={HH_SAMPLE}", "--test_rows=40", "--messages",
                        f"--out_dir={tmp_path / 'split'}")
    assert stdout.splitlines() == ["hh train: kept 259 of 260 rows (skipped: 1 empty response)",
                                   "hh test: kept 40 of 40 rows (skipped: none)"]
    assert read_jsonl(tmp_path / "split" / "train.jsonl") + read_jsonl(tmp_path / "split" / "test.jsonl") == chat
