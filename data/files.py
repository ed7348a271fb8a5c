"""
File helpers of train_tr.py that know nothing of models or runs: a safetensors file written one tensor at a time (the
checkpoint of a model too large to hold twice), a folder copied whole or not at all, and a JSONL log cut back to a step.
"""
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from data.pairs import read_jsonl

SAFETENSORS_DTYPES = {torch.float32: 'F32', torch.bfloat16: 'BF16', torch.float16: 'F16', torch.int64: 'I64',
                      torch.int32: 'I32', torch.bool: 'BOOL'}


def write_safetensors(path, entries, writer=True):
    """A safetensors file of entries [(name, shape, dtype, get)], streamed: the header first, from the shapes, then
    each tensor as get() returns it, so that one tensor at a time is held. Every caller calls every get() (in a
    distributed save each one gathers a tensor), only the writer writes: it raises a write error after the last get(),
    so that no other process is left waiting in one. Returns the sha256 of the file, hashed as it is written (the
    writer; None elsewhere)."""
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, shape, dtype, _ in entries:
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {'dtype': SAFETENSORS_DTYPES[dtype], 'shape': list(shape), 'data_offsets': [offset, end]}
        offset = end
    header = json.dumps(header, separators=(',', ':')).encode()
    header += b' ' * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    digest, f, error = hashlib.sha256(), None, None

    def write(data):
        f.write(data)
        digest.update(data)
    if writer:
        try:
            Path(path).parent.mkdir(exist_ok=True)
            f = open(path, 'wb')
            write(len(header).to_bytes(8, 'little') + header)
        except OSError as e:
            error = e
    for *_, get in entries:
        tensor = get()
        if f is not None and error is None:
            try:
                write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            except OSError as e:
                error = e
    if f is not None:
        try:
            f.close()
        except OSError as e:
            error = error or e
    if error:
        raise error
    return digest.hexdigest() if f is not None else None


def copy_folder(source, target, skip):
    """Copies source (without its top-level entries named in skip(names)) to target, whole or not at all: into a
    hidden folder beside target, renamed at the end, replacing an earlier target. On an error (a full disk) the partial
    copy is deleted and the error raised."""
    tmp = Path(target).with_name('.tmp_' + Path(target).name)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=lambda folder, names: skip(names) if Path(folder) == Path(source) else [])
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_metrics(path, resume_iter):
    """A JSONL log of records {'iter': ...}, open for appending. A resumed run (resume_iter: the step of its checkpoint)
    keeps the lines up to its checkpoint: lines an interrupted run logged after it, and a line cut short by a kill,
    are dropped, so each step appears once. A fresh run starts it empty."""
    kept = [r for r in read_jsonl(path) if isinstance(r, dict) and isinstance(r.get('iter'), int)  # foreign lines: out
            and r['iter'] <= resume_iter] if resume_iter is not None else []
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(json.dumps(r) + '\n' for r in kept))
    os.replace(tmp, path)  # a kill while rewriting leaves the old file
    return open(path, 'a')
