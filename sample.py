"""
sample.py: completions from a train_tr.py checkpoint (or any HF causal LM) for the prompts of a dataset split,
read, rendered and tokenized exactly as train_tr.py does.

    python sample.py --init_from=out --num_prompts=4
    python sample.py --init_from=out --data=data/hh --temperature=0.7 --out=samples.jsonl
"""
import json
import sys

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from train_tr import load_pairs, parse_overrides, resolve_device, tokenize_prompt

defaults = dict(
    init_from='out',        # HF checkpoint directory (train_tr.py's out_dir) or hub name
    data='data/tiny',       # any data source train_tr.py accepts
    split='test',
    num_prompts=8,          # the first this many usable prompts of the split
    max_new_tokens=64,
    temperature=1.0,        # 0 = greedy
    top_p=1.0,
    batch_size=8,
    seed=1337,
    device='auto',
    out='',                 # JSONL output path; '' prints the samples
)


def left_pad(sequences, pad_id):
    """(input_ids, attention_mask) with padding on the left, so every prompt ends where generation starts."""
    width = max(map(len, sequences))
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return input_ids, attention_mask


def sample(cfg):
    device = resolve_device(cfg['device'])
    torch.manual_seed(cfg['seed'])
    tokenizer = AutoTokenizer.from_pretrained(cfg['init_from'])
    model = AutoModelForCausalLM.from_pretrained(cfg['init_from']).to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = load_pairs(cfg['data'], cfg['split'], tokenizer, need_rejected=False)
    prompts = [prompt for prompt, _, _ in pairs[:cfg['num_prompts']]]
    settings = dict(do_sample=True, temperature=cfg['temperature'], top_p=cfg['top_p']) if cfg['temperature'] > 0 \
        else dict(do_sample=False)
    rows = []
    for start in tqdm(range(0, len(prompts), cfg['batch_size']), desc='sampling'):
        batch = prompts[start:start + cfg['batch_size']]
        input_ids, attention_mask = left_pad([tokenize_prompt(tokenizer, p) for p in batch], pad_id)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    max_new_tokens=cfg['max_new_tokens'], pad_token_id=pad_id,
                                    eos_token_id=tokenizer.eos_token_id, **settings)
        for prompt, completion in zip(batch, output[:, input_ids.shape[1]:]):
            rows.append({'prompt': prompt, 'completion': tokenizer.decode(completion, skip_special_tokens=True),
                         'model': cfg['init_from'], 'temperature': cfg['temperature'], 'top_p': cfg['top_p'],
                         'max_new_tokens': cfg['max_new_tokens'], 'seed': cfg['seed']})
    if cfg['out']:
        with open(cfg['out'], 'w') as f:
            f.writelines(json.dumps(row) + '\n' for row in rows)
        print(f"wrote {len(rows)} samples to {cfg['out']}")
    else:
        for row in rows:
            print(f"{row['prompt']}\033[1m{row['completion']}\033[0m\n{'-' * 40}")
    return rows


if __name__ == '__main__':
    sample(parse_overrides(sys.argv[1:], defaults))
