"""
judge.py: how often a checkpoint's implicit reward β·log(π/π_ref) ranks the chosen response of held-out pairs above
the rejected one (the "reward accuracy" of the DPO paper), with train_tr.py's data path and log-prob code.

    python judge.py --policy=out --ref=data/tiny/sft
"""
import json
import sys

import torch
from transformers import AutoTokenizer

from train_tr import load_model, load_pairs, make_batch, parse_overrides, resolve_device, sequence_logps

defaults = dict(
    policy='out',           # trained checkpoint (HF directory or hub name)
    ref='data/tiny/sft',    # the model the implicit reward is measured against, usually the SFT model
    data='data/tiny',       # any data source train_tr.py accepts
    split='test',
    num_pairs=200,          # the first this many usable pairs of the split
    beta=0.1,
    batch_size=16,
    max_length=128,
    max_prompt_length=64,
    device='auto',
    out='',                 # JSON output path for the numbers; '' prints only
)


def judge(cfg):
    device = resolve_device(cfg['device'])
    tokenizer = AutoTokenizer.from_pretrained(cfg['policy'])
    policy, ref = (load_model(name).to(device).eval() for name in (cfg['policy'], cfg['ref']))
    pairs = load_pairs(cfg['data'], cfg['split'], tokenizer)[:cfg['num_pairs']]
    margins = []
    with torch.no_grad():
        for start in range(0, len(pairs), cfg['batch_size']):
            batch = make_batch(pairs[start:start + cfg['batch_size']], tokenizer, 'dpo', cfg['max_length'],
                               cfg['max_prompt_length'], device)
            input_ids, labels = batch['input_ids'], batch['labels']
            log_ratio = sequence_logps(policy, input_ids, labels)[0] - sequence_logps(ref, input_ids, labels)[0]
            n = len(log_ratio) // 2
            margins += (cfg['beta'] * (log_ratio[:n] - log_ratio[n:])).tolist()
    result = {'policy': cfg['policy'], 'ref': cfg['ref'], 'pairs': len(margins),
              'accuracy': sum(m > 0 for m in margins) / len(margins), 'mean_margin': sum(margins) / len(margins)}
    print(f"{'policy':<24}{'ref':<24}{'pairs':>7}{'accuracy':>10}{'margin':>10}")
    print(f"{cfg['policy']:<24}{cfg['ref']:<24}{result['pairs']:>7}{result['accuracy']:>10.3f}"
          f"{result['mean_margin']:>10.3f}")
    if cfg['out']:
        with open(cfg['out'], 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    judge(parse_overrides(sys.argv[1:], defaults))
