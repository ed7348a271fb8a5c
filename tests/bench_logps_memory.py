"""Benchmark (not a test): peak memory of the log-prob computation, forward and backward, on a 2-layer Llama with a
50k vocabulary: train_tr.sequence_logps (shared prompt, log-probs from the hidden state at response positions only, in
chunks) against the DPO repository's form (a [2B, T, V] float32 log_softmax of right-padded [chosen; rejected] rows).
Each variant runs in its own process; peak RSS is read from getrusage, so the numbers include the model and Python
(the same in both).

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
PAIRS, PROMPT, RESPONSE, VOCAB = 8, 128, 128, 50_304  # 8 pairs of 128 + 128 tokens, Pythia's vocabulary


def naive_logps(model, prompts, chosen, rejected):
    """One right-padded row per (prompt, response), the full logits, one float32 log_softmax, then gather."""
    input_ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])
    logits = model(input_ids=input_ids, use_cache=False).logits[:, PROMPT - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, input_ids[:, PROMPT:, None]).squeeze(-1).sum(-1)


def measure(variant):
    import train_tr
    from data import pairs as data_pairs
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = train_tr.with_response_outputs(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, attn_implementation='sdpa')))
    prompts, chosen, rejected = (torch.randint(0, VOCAB, (PAIRS, n)) for n in (PROMPT, RESPONSE, RESPONSE))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    if variant == 'shared':
        batch = data_pairs.layout([(p, [c, r]) for p, c, r in zip(prompts, chosen, rejected)], pad_id=0)
        logps = train_tr.sequence_logps(model, batch)[0]
    else:
        logps = naive_logps(model, prompts, chosen, rejected)
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
        logits_gb = 2 * PAIRS * (PROMPT + RESPONSE) * VOCAB * 4 / 2**30
        print(f'{PAIRS} pairs of {PROMPT} + {RESPONSE} tokens, vocabulary {VOCAB}: float32 logits of the padded '
              f'[chosen; rejected] rows are {logits_gb:.2f} GB')
        for variant in ('naive', 'shared'):
            subprocess.run([sys.executable, __file__, variant], check=True)
