"""Run under `torchrun --nproc_per_node=2 tests/dist_timeout_check.py MINUTES`: train_tr.setup_distributed with a
timeout of MINUTES, then a barrier of the FSDP mesh's group that rank 1 reaches 8 s late. Each rank prints one line:
whether its barrier passed or timed out. The timeout also bounds how far apart the ranks may start (init_process_group
waits that long for the other), so a timeout of seconds, not a fraction of one, holds on a loaded machine."""
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_tr  # noqa: E402

rank, world, device = train_tr.setup_distributed('cpu', timeout=float(sys.argv[1]))
mesh = dist.device_mesh.init_device_mesh('cpu', (world,))  # as load_models builds it
if rank == 1:
    time.sleep(8)
try:
    dist.barrier(group=mesh.get_group())
    print(f'rank {rank}: passed', flush=True)
except RuntimeError as e:
    print(f'rank {rank}: ' + ('timed out' if 'timed out' in str(e).lower() or 'timeout' in str(e).lower()
                             else f'failed: {e}'), flush=True)
sys.stdout.flush()
os._exit(0)  # a group whose other rank gave up cannot be torn down in order
