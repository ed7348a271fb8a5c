"""Run under `torchrun --nproc_per_node=2`: the shard-local reference update equals the TR formula on the gathered
parameters. Policy and reference start from different weights so the mix is not trivial. Rank 0 prints one JSON line."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_tr  # noqa: E402

rank, world, device = train_tr.setup_distributed('cpu')
mesh = dist.device_mesh.init_device_mesh('cpu', (world,))
options = StateDictOptions(full_state_dict=True, cpu_offload=True)
policy = train_tr.distribute_model(train_tr.load_model('data/tiny/sft'), mesh, bf16=False, reshard_root=None,
                                  shard=True)
ref = train_tr.distribute_model(train_tr.load_model('data/tiny/base'), mesh, bf16=False, reshard_root=True, shard=True)
ids = torch.randint(0, 500, (2, 12))
policy(input_ids=ids).logits.sum().backward()  # leave both models in their post-forward state, as in training
with torch.no_grad():
    ref(input_ids=ids)
result = {'world': world, 'sharded': all(isinstance(p, torch.distributed.tensor.DTensor) for p in ref.parameters())}
for alpha in (0.3, 1.0):
    before_policy = get_model_state_dict(policy, options=options)
    before_ref = get_model_state_dict(ref, options=options)
    train_tr.update_reference(policy, ref, alpha)
    after_ref = get_model_state_dict(ref, options=options)
    if rank == 0:
        result[f'max_err_alpha_{alpha}'] = max(
            (after_ref[k] - (alpha * before_policy[k] + (1 - alpha) * before_ref[k])).abs().max().item() for k in after_ref)
        result[f'changed_alpha_{alpha}'] = any(not torch.equal(after_ref[k], before_ref[k]) for k in after_ref)
if rank == 0:
    print(json.dumps(result))
dist.barrier()  # tear gloo down together: a rank leaving while the other still works can abort at exit
dist.destroy_process_group()
