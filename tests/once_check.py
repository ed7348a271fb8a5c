"""Run under `torchrun --nproc_per_node=2 tests/once_check.py OUT_DIR MAX_ITERS [--resume=True]`: a TR-DPO run on
data/tiny with 4 pairs a step and no evaluation. Counts, per rank, the fingerprints of inputs and the sha256 of files it
computes while starting, saving, and verifying the checkpoint to resume, and writes them to OUT_DIR.counts.RANK.json
(the run ends its process group)."""
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_tr  # noqa: E402
from data import files  # noqa: E402

counts, phase = Counter(), ['start']


def counted(name, fn):
    def wrapper(*args, **kwargs):
        counts[f'{phase[0]} {name}'] += 1
        return fn(*args, **kwargs)
    return wrapper


def in_phase(name, fn):
    def wrapper(*args, **kwargs):
        phase[0] = name
        try:
            return fn(*args, **kwargs)
        finally:
            phase[0] = 'start'
    return wrapper


train_tr.fingerprint = counted('fingerprint', train_tr.fingerprint)
train_tr.sha256 = files.sha256 = counted('sha256', train_tr.sha256)  # files: the checks of a resume
train_tr.save_checkpoint = in_phase('save', train_tr.save_checkpoint)
train_tr.check_checksums = in_phase('verify', train_tr.check_checksums)
args = [f'--out_dir={sys.argv[1]}', f'--max_iters={sys.argv[2]}', *sys.argv[3:], '--init_from=data/tiny/sft',
        '--data=data/tiny', '--batch_size=4', '--eval_pairs=0', '--device=cpu']
train_tr.train(train_tr.get_config(args))
Path(f'{sys.argv[1]}.counts.{os.environ["RANK"]}.json').write_text(json.dumps(counts))
