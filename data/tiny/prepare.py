"""
Build data/tiny, the rule-based fixture of the tests (the default run uses data/toy).

Why: the tests need, offline and in seconds, preference pairs with a clear rule
and a tiny base model + tokenizer that live in the repo. This script makes all
of them, deterministically (same seed -> byte-identical files):

  data/tiny/train.jsonl, data/tiny/test.jsonl
      preference rows {"prompt", "chosen", "rejected"} in Anthropic-HH text
      format: prompt = "\\n\\nHuman: <request>\\n\\nAssistant:", responses start
      with one space. Synthetic tasks with a clear rule (the chosen response
      is correct and polite, the rejected one is wrong or rude):
        - arithmetic:  "What is 3 plus 4?"     " 3 plus 4 is 7."  vs  " 3 plus 4 is 8."
        - sorting:     alphabetical order      vs  a wrong order
        - politeness:  " Sure, happy to help: ..."  vs  " No. Figure it out yourself."
        - repeating:   a word N times          vs  the wrong count
      some prompts are multi-turn (an earlier, correctly answered exchange).
  data/tiny/base/
      a byte-level BPE tokenizer (vocab 512, trained on train.jsonl texts) with
      an HH chat template, and a randomly initialised 2-layer Llama (~140k
      parameters), loadable with AutoTokenizer / AutoModelForCausalLM.
  data/tiny/readme.md

Run (from the repo root):
  python data/tiny/prepare.py            # optional: --seed=1337 --n_train=2000 --n_test=200
"""
import argparse
import os
import random
import sys

# prepare_common.py sits in data/, which is no package: put data/ on the path so this runs from any working directory
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_common import EOS, PAD, build_model, build_tokenizer, save_base, write_jsonl  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

WORDS = ["ant", "bee", "cat", "dog", "egg", "fig", "gum", "hat", "ink", "jam",
         "kit", "log", "map", "net", "owl", "pen", "rug", "sun", "toy", "van",
         "web", "yak", "zip", "box", "cup", "fox", "key", "mug", "pig", "tea"]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

TOPICS = ["my homework", "a recipe", "my resume", "a poem", "my garden", "a birthday card",
          "my code", "a short story", "my budget", "a travel plan", "an email", "my essay",
          "a cover letter", "my diet", "a song", "my bike", "a math problem", "my speech",
          "a shopping list", "my schedule", "a joke", "my taxes", "a letter", "my plants"]

POLITE_ASKS = ["Can you help me with {t}?", "Could you look at {t}?", "Please help me with {t}.",
               "I need help with {t}.", "Will you check {t} for me?"]

MAX_PROMPT_CHARS = 120  # multi-turn prompts are kept short ...
MAX_ROW_CHARS = 150  # ... and so is prompt + longer response: a row stays under ~60 tokens

RUDE = [" No. Figure it out yourself.", " No. Not my problem.", " Ugh, do it yourself."]

# -----------------------------------------------------------------------------
# tasks: each returns (request, chosen, rejected); responses start with a space

def task_arithmetic(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        op, ans = "plus", a + b
    else:
        a, b = max(a, b), min(a, b)
        op, ans = "minus", a - b
    wrong = ans + rng.choice([-2, -1, 1, 2])
    if wrong < 0:
        wrong = ans + rng.choice([1, 2])
    req = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"])
    req = req.format(a=a, op=op, b=b)
    return req, f" {a} {op} {b} is {ans}.", f" {a} {op} {b} is {wrong}."


def task_sort(rng):
    words = rng.sample(WORDS, rng.choice([3, 4]))
    good = sorted(words)
    bad = list(good)
    while bad == good:
        rng.shuffle(bad)
    req = rng.choice(["Sort these words: {w}.", "Put in alphabetical order: {w}."]).format(w=", ".join(words))
    return req, " " + ", ".join(good) + ".", " " + ", ".join(bad) + "."


def task_polite(rng):
    topic = rng.choice(TOPICS)
    req = rng.choice(POLITE_ASKS).format(t=topic)
    theirs = "your " + topic[3:] if topic.startswith("my ") else topic
    chosen = f" Sure, happy to help: let's look at {theirs}."
    return req, chosen, rng.choice(RUDE)


def task_repeat(rng):
    word = rng.choice(WORDS)
    n = rng.randint(2, 5)
    wrong = rng.choice([m for m in range(1, 7) if m != n])
    req = rng.choice(["Say {w} {n} times.", "Repeat the word {w} {n} times."]).format(w=word, n=NUMBER_WORDS[n])
    return req, " " + " ".join([word] * n), " " + " ".join([word] * wrong)


TASKS = [task_arithmetic, task_sort, task_polite, task_repeat]


def make_row(rng, task):
    req, chosen, rejected = task(rng)
    prompt = f"\n\nHuman: {req}\n\nAssistant:"
    if rng.random() < 0.2:
        # multi-turn: an earlier, correctly answered exchange from a short task
        prev_req, prev_ans, _ = rng.choice([task_arithmetic, task_repeat])(rng)
        longer = f"\n\nHuman: {prev_req}\n\nAssistant:{prev_ans}" + prompt
        if len(longer) <= MAX_PROMPT_CHARS and len(longer) + max(len(chosen), len(rejected)) <= MAX_ROW_CHARS:
            prompt = longer
    assert chosen != rejected and chosen.strip() and rejected.strip()
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def make_rows(rng, n, exclude_prompts=(), unique_prompts=False):
    """n distinct rows, tasks drawn uniformly; no prompt from exclude_prompts (the test set)."""
    rows, seen = [], set()
    while len(rows) < n:
        task = rng.choice(TASKS)
        while True:  # redraw within the same task so duplicates do not skew the task mix
            row = make_row(rng, task)
            key = row["prompt"] if unique_prompts else (row["prompt"], row["chosen"], row["rejected"])
            if key not in seen and row["prompt"] not in exclude_prompts:
                break
        seen.add(key)
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# tokenizer + model

def check_base(base_dir, rows):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "\n\nHuman: Hi\n\nAssistant:"
    msgs2 = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert tok.apply_chat_template(msgs2, tokenize=False, add_generation_prompt=True) == \
        "S\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    p, r = "\n\nHuman: What is 3 plus 4?\n\nAssistant:", " 7."
    ids = tok(p)["input_ids"] + tok(r)["input_ids"]
    assert tok.decode(ids) == p + r, repr(tok.decode(ids))
    assert tok.eos_token_id not in tok(p)["input_ids"] and tok.bos_token_id not in tok(p)["input_ids"]
    assert tok.eos_token == tok.bos_token == EOS and tok.pad_token == PAD and tok.model_max_length == 512
    lens = []
    for row in rows:
        for resp in (row["chosen"], row["rejected"]):
            pi, ri = tok(row["prompt"])["input_ids"], tok(resp)["input_ids"]
            assert tok.decode(pi + ri) == row["prompt"] + resp
        lens.append(len(tok(row["prompt"])["input_ids"]) + len(tok(row["chosen"])["input_ids"]))
    x = torch.tensor([tok(p + r)["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        out = model(x, labels=x)
    assert out.logits.shape == (1, x.shape[1], len(tok)) and torch.isfinite(out.loss)
    n_params = sum(p.numel() for p in model.parameters())
    return lens, n_params, out.loss.item()


README = """\
# data/tiny: the tests' rule-based preference pairs, tokenizer and tiny models
Synthetic assistant preference pairs in Anthropic-HH text format (train.jsonl {n_train} rows, test.jsonl {n_test} rows): small arithmetic, sorting 3-4 words, polite help requests and repeating a word N times, some multi-turn.
The rule: the chosen response is correct and polite; the rejected one has a wrong sum, a wrong word order, a wrong count, or is rude.
`base/` is a byte-level BPE tokenizer (vocab 512, HH chat template) plus a randomly initialised 2-layer Llama (~140k parameters); regenerate everything byte-identically with `python data/tiny/prepare.py`.
The SFT checkpoint `data/tiny/sft/` is produced afterwards by train_tr.py with loss=sft on the chosen responses, starting from `data/tiny/base` (init_from=data/tiny/base out_dir=data/tiny/sft).
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--n_train", type=int, default=2000)
    parser.add_argument("--n_test", type=int, default=200)
    parser.add_argument("--out_dir", default=HERE)
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    rng = random.Random(args.seed)
    test = make_rows(rng, args.n_test, unique_prompts=True)
    train = make_rows(rng, args.n_train, exclude_prompts={r["prompt"] for r in test})
    rows = train + test
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(train, os.path.join(args.out_dir, "train.jsonl"))
    write_jsonl(test, os.path.join(args.out_dir, "test.jsonl"))

    texts = [t for r in train for t in (r["prompt"], r["chosen"], r["rejected"])]
    tok = build_tokenizer(texts)
    model = build_model(tok)
    base_dir = os.path.join(args.out_dir, "base")
    save_base(tok, model, base_dir)

    with open(os.path.join(args.out_dir, "readme.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(README.format(n_train=len(train), n_test=len(test)))

    lens, n_params, loss = check_base(base_dir, rows)
    print(f"wrote {len(train)} train / {len(test)} test rows and {base_dir}")
    print(f"vocab {len(tok)}, model params {n_params:,}, initial loss {loss:.3f}")
    print(f"prompt+chosen tokens: max {max(lens)}, mean {sum(lens) / len(lens):.1f}")


if __name__ == "__main__":
    main()
