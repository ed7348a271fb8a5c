"""
A two-process run that completed and then aborted at exit (rank 1: 'terminate called without an active exception',
SIGABRT; one CI run of the suite): a gloo worker thread dropped a finished collective's tensors while the interpreter
tore down. torch keeps a process group that DTensor used (FSDP's parameters) alive past destroy_process_group, so its
worker threads outlive it. Each trial here: DTensor used, rank 0 leaves a collective in flight, destroys the group and
ends; rank 1 joins the collective D later, D swept over 0-40 ms (the interpreter's teardown). Counts rank 0's aborts
when it ends by `raise SystemExit` (train_tr.py until this check) and by data/settings.exit_process (train_tr.py now).
Exits 1 if exit_process ever aborted.

    python tests/exit_check.py [trials per way, default 20]
"""
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(way, delay):
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor
    sys.path.insert(0, str(REPO))
    from data.settings import exit_process
    dist.init_process_group('gloo')
    distribute_tensor(torch.ones(4, 4), dist.device_mesh.init_device_mesh('cpu', (2,)), [Shard(0)])
    if dist.get_rank() == 1:
        time.sleep(delay)
    work = dist.all_reduce(torch.ones(1000), async_op=True)  # its tensor: a Python one, held by gloo's worker thread
    if dist.get_rank() == 1:
        work.wait()
        time.sleep(1)  # rank 1 is not the one measured: it ends after rank 0
    del work
    dist.destroy_process_group()
    if way == 'exit_process':
        exit_process(0)
    raise SystemExit(0)


def trials(way, n):
    aborted = 0
    for i in range(n):
        delay = 0.04 * i / max(n - 1, 1)
        proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                               __file__, '--worker', way, str(delay)], cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=120)
        aborted += 'terminate called' in proc.stderr or 'local_rank: 0' in proc.stderr and 'SIGABRT' in proc.stderr
    return aborted


if __name__ == '__main__':
    if sys.argv[1:2] == ['--worker']:
        worker(sys.argv[2], float(sys.argv[3]))
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    counts = {way: trials(way, n) for way in ('SystemExit', 'exit_process')}
    for way, aborted in counts.items():
        print(f'{way:>12}: rank 0 aborted in {aborted} of {n} trials')
    sys.exit(1 if counts['exit_process'] else 0)
