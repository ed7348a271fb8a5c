"""
File helpers of train_tr.py's checkpoints: a safetensors file written one tensor at a time (the checkpoint of a model
too large to hold twice), the small files of an HF model folder, JSON sealed with a digest of itself, files checked
against their sha256 by several processes, a staged folder committed file by file, a folder copied whole or not at
all, the lock of a run's folder, and a JSONL log that a resumed run cuts back to its step.
"""
import copy
import fcntl
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from data.pairs import read_jsonl, sha256

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


def seal(content):
    """content (a dict of JSON values) with 'digest', the sha256 of the rest: a sealed dict with anything changed, added
    or removed is not seal(its content) any more."""
    content = {k: v for k, v in content.items() if k != 'digest'}
    return {**content, 'digest': hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()}


def read_sealed(path):
    """A checkpoint's JSON manifest, refused in one line unless it is seal(its content): an entry removed would leave
    its file unchecked, another iteration would resume at another data position."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f'error: {path} is missing or unreadable ({type(e).__name__}); the checkpoint in '
                         f'{path.parent} cannot be verified, so it is not resumed')
    if not isinstance(manifest, dict) or seal(manifest) != manifest:
        raise SystemExit(f'error: {path} is not as it was saved (its digest does not match its content: edited, or '
                         f'written by an older nanoTR); the checkpoint in {path.parent} is not resumed')
    return manifest


def lock_out_dir(out_dir):
    """An exclusive lock on out_dir/.lock, held while the returned file stays open (the OS drops it when the process
    ends, even by kill -9): two runs in one out_dir would write over each other's files."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / '.lock', 'w')
    except OSError as e:  # a file of that name, a read-only or full disk
        raise SystemExit(f'error: cannot use out_dir={out_dir}: {e.strerror or e}')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(f'error: another run is using {out_dir} (it holds {out_dir / ".lock"}); wait for it to end, '
                         'or use another out_dir')
    return lock


def first_mismatch(folder, digests, rank=0, world=1):
    """The first file of digests ({path in folder: sha256}) that is missing or has another sha256, of this rank's
    share: the files go round the ranks from the largest, so each is read once, by one rank. None if all match."""
    size = {name: (folder / name).stat().st_size if (folder / name).is_file() else 0 for name in digests}
    return next((name for name in sorted(digests, key=lambda n: -size[n])[rank::world]
                 if not (folder / name).is_file() or sha256(folder / name) != digests[name]), None)


def files_of(folder):  # the files of a folder and of its folders, sorted
    return sorted(f for f in Path(folder).rglob('*') if f.is_file())


def commit_folder(staged, target, manifest):
    """Moves the staged folder into target file by file, with atomic renames, its manifest (a JSON file whose 'sha256'
    names every file of the folder) last; before that, the files of the subfolders it names that it does not name
    are deleted (what an earlier commit left there). A staged folder without its manifest is incomplete: it is
    deleted. Called again after a kill, it finishes the move, so target never stays a mix of two commits."""
    staged, target = Path(staged), Path(target)
    if not (staged / manifest).is_file():
        shutil.rmtree(staged, ignore_errors=True)
        return
    listed = json.loads((staged / manifest).read_text())['sha256']
    for f in files_of(staged):
        if f.name != manifest:
            (target / f.relative_to(staged)).parent.mkdir(exist_ok=True)
            os.replace(f, target / f.relative_to(staged))
    for folder in {Path(name).parts[0] for name in listed if len(Path(name).parts) > 1}:
        for f in files_of(target / folder):
            if str(f.relative_to(target)) not in listed:
                f.unlink()
    os.replace(staged / manifest, target / manifest)
    shutil.rmtree(staged)  # its empty folders


def write_model_files(folder, model, tokenizer, settings, lora_config, digests):
    """The small files of an HF model folder beside its weights, as save_pretrained writes them: config.json (saying
    float32, the architecture without FSDP's prefix), generation_config.json, the tokenizer, nanotr_config.json (the
    run's settings) and a PEFT adapter/adapter_config.json. Returns digests ({file: sha256} of the weights) with the
    sha256 of every other file of folder but state/ (each rank hashes its own)."""
    if lora_config:
        (folder / 'adapter' / 'adapter_config.json').write_text(json.dumps(lora_config, indent=2))
    config = copy.deepcopy(model.config)
    config.dtype, config.architectures = 'float32', [type(model).__name__.removeprefix('FSDP')]
    config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / 'nanotr_config.json').write_text(json.dumps(settings, indent=2))
    others = [f.relative_to(folder) for f in files_of(folder)]  # relative paths; state/ is each rank's to hash
    return {**{str(f): sha256(folder / f) for f in others if f.parts[0] != 'state' and str(f) not in digests},
            **digests}


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


def open_log(path, resume_iter, wandb_init=None):
    """log(record): a line appended to the JSONL file at path, in an open of its own (a kill loses no line), and a
    point sent to W&B with wandb_init (wandb.init's arguments). A resumed run (resume_iter: the step of its checkpoint)
    keeps the lines up to its checkpoint: lines an interrupted run logged after it, and a line cut short by a kill,
    are dropped, so each step appears once. A fresh run (None) starts the file empty. A failed write stops the run."""
    kept = [r for r in read_jsonl(path) if isinstance(r, dict) and isinstance(r.get('iter'), int)  # foreign lines: out
            and r['iter'] <= resume_iter] if resume_iter is not None else []
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(json.dumps(r) + '\n' for r in kept))
    os.replace(tmp, path)  # a kill while rewriting leaves the old file
    wandb = __import__('wandb') if wandb_init is not None else None
    if wandb is not None:
        wandb.init(**wandb_init)

    def log(record):
        try:
            with open(path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:  # a full disk
            raise SystemExit(f'error: cannot write {path} ({e.strerror or e}); the last checkpoint beside it is whole')
        if wandb is not None:
            wandb.log(record, step=record['iter'])
    return log
