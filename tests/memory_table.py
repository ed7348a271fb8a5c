"""Prints a memory table: train_tr.memory_estimate (the estimate each run prints at its start) for Llama models
of 1B, 8B and 70B parameters, full fine-tuning and LoRA, on 1 and 8 GPUs, bf16 compute, with a trust-region reference.
The models are built on the meta device from their configs (written here: no download, no weights, a few seconds).

    python tests/memory_table.py                    # LoRA rank 16, alpha 32 (all attention and MLP projections)
    python tests/memory_table.py --lora_rank=64
"""
import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_tr  # noqa: E402

# the architectures of Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B (their config.json, the fields that size them)
LLAMA = dict(model_type='llama', vocab_size=128256, head_dim=None, rope_parameters={'rope_type': 'default',
                                                                                    'rope_theta': 500000.0})
MODELS = {
    '1B': dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    '8B': dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    '70B': dict(LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, tie_word_embeddings=False),
}


def estimates(config, lora_rank, lora_alpha, worlds):
    """{(method, world): memory_estimate} for one architecture, the models built as train_tr.load_models builds them
    (full: float32 policy and reference; LoRA: a bf16 base with float32 policy and reference adapters)."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / 'config.json').write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        policy = train_tr.load_model(folder, meta=True)
        full = {('full', w): train_tr.memory_estimate(policy, copy.deepcopy(policy), w) for w in worlds}
        base = train_tr.load_model(folder, dtype=torch.bfloat16, meta=True)
        train_tr.add_lora(base, lora_rank, lora_alpha, reference=True)
        ref = train_tr.AdapterReference(base, 'reference')
        return sum(p.numel() for p in policy.parameters()), {**full, **{
            ('LoRA', w): train_tr.memory_estimate(base, ref, w) for w in worlds}}


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--lora_rank', type=int, default=16)
    parser.add_argument('--lora_alpha', type=float, default=32.0)
    args = parser.parse_args()
    print('| model | method | GPUs | weights | gradients | optimizer | reference | total per GPU |')
    print('|---|---|---|---|---|---|---|---|')
    for name, config in MODELS.items():
        n_params, table = estimates(config, args.lora_rank, args.lora_alpha, (1, 8))
        for (method, world), size in table.items():
            gb = [size[k] / 2 ** 30 for k in ('weights', 'gradients', 'optimizer', 'reference')]
            method = 'full' if method == 'full' else f'LoRA R={args.lora_rank}'
            print(f'| {name} ({n_params / 1e9:.2f}B) | {method} | {world} | ' + ' | '.join(f'{v:.2f} GB' for v in gb)
                  + f' | {sum(gb):.1f} GB |')
