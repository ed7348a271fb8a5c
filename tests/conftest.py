"""Shared fixtures for the train_tr.py tests: the tiny tokenizer shipped in data/tiny/base and a tiny random Llama.
Everything is local: nothing is downloaded."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `import train_tr` from the tests
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import train_tr  # noqa: E402


@pytest.fixture(scope='session')
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(REPO / 'data/tiny/base')


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh 2-layer Llama with random weights (seed 0), float32, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                         attn_implementation='sdpa')
    torch.manual_seed(0)
    return train_tr.with_response_outputs(LlamaForCausalLM(config).float().eval())


def plain_logps(model, prompt, response):
    """Σ_t log π(response_t | prompt, response_<t) from one unpadded forward of prompt + response, token by token."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    return sum(torch.log_softmax(logits[len(prompt) + t - 1], dim=-1)[token] for t, token in enumerate(response))


def padded_logps(model, sequences, pad_id=1):
    """The plain padded path (the DPO repository's): one right-padded row per (prompt, response), no attention mask,
    the full logits, summed over the response positions."""
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.tensor([p + r + [pad_id] * (width - len(p) - len(r)) for p, r in sequences])
    logps = model(input_ids=input_ids).logits[:, :-1].float().log_softmax(-1)
    return torch.stack([logps[i, len(p) - 1:len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None]).sum()
                        for i, (p, r) in enumerate(sequences)])
