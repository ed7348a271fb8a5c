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


@pytest.fixture(scope='session')
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(REPO / 'data/tiny/base')


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh 2-layer Llama with random weights (seed 0), float32, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import train_tr
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                         attn_implementation='sdpa')
    torch.manual_seed(0)
    return train_tr.with_response_outputs(LlamaForCausalLM(config).float().eval())
