"""Benchmark (not a test): peak memory of train_tr.sequence_logps against a batched float32 log_softmax, forward and
backward, on a 2-layer Llama with a 50k vocabulary. Each variant runs in its own process; peak RSS is read from
getrusage, so the numbers include the model and Python (the same in both).

    python tests/bench_logps_memory.py            # prints one line per variant
"""
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROWS, LENGTH, VOCAB = 16, 256, 50_304  # 8 pairs of 256 tokens, Pythia's vocabulary


def naive_logps(model, input_ids, labels):
    """The DPO repository's form: one [2B, T, V] float32 log_softmax, then gather."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != -100
    logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)


def measure(variant):
    import train_tr
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    input_ids = torch.randint(0, VOCAB, (ROWS, LENGTH))
    labels = input_ids.clone()
    labels[:, :LENGTH // 2] = -100  # the prompt half
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    logps, _ = (train_tr.sequence_logps if variant == 'rowwise' else naive_logps)(model, input_ids, labels)
    logps.sum().backward()
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad = model.model.embed_tokens.weight.grad.abs().sum().item()
    print(json.dumps({'variant': variant, 'peak_rss_gb': peak / 2**20, 'added_by_logps_gb': (peak - before) / 2**20,
                      'seconds': round(seconds, 2), 'logps_sum': logps.sum().item(), 'embed_grad_abs_sum': grad}))


if __name__ == '__main__':
    if len(sys.argv) > 1:
        measure(sys.argv[1])
    else:
        logits_gb = ROWS * LENGTH * VOCAB * 4 / 2**30
        print(f'{ROWS} rows x {LENGTH} tokens x {VOCAB} vocab: one float32 [2B, T, V] tensor is {logits_gb:.2f} GB')
        for variant in ('naive', 'rowwise'):
            subprocess.run([sys.executable, __file__, variant], check=True)
