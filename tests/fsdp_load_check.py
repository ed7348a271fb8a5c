"""Run under `torchrun --nproc_per_node=2`: load_models reads weights on rank 0 only (the other ranks call no
from_pretrained: they build the models on the meta device and receive their shards), and the sharded models hold exactly
the weights and buffers of a plain load in one process: full fine-tuning (policy and a copy as reference, or ref_from)
and LoRA (base, adapters and reference adapters). Rank 0 prints one JSON line."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_tr  # noqa: E402

reads = []  # the models this rank read with from_pretrained
from_pretrained = transformers.AutoModelForCausalLM.from_pretrained
transformers.AutoModelForCausalLM.from_pretrained = lambda name, **kwargs: reads.append(str(name)) or \
    from_pretrained(name, **kwargs)


def max_difference(got, expected):
    assert set(got) ^ set(expected) <= {'lm_head.weight'}, set(got) ^ set(expected)  # a tied head, named or not
    return max((got[k].float() - expected[k].float()).abs().max().item() for k in set(got) & set(expected))


rank, world, device = train_tr.setup_distributed('cpu')
options = StateDictOptions(full_state_dict=True, cpu_offload=True)
result = {'world': world}
for run, args in [('full', []), ('ref_from', ['--ref_from=data/tiny/base']), ('lora', ['--lora_rank=4'])]:
    cfg = train_tr.get_config(['--init_from=data/tiny/sft', '--data=data/tiny', '--device=cpu', *args])
    torch.manual_seed(cfg['seed'])
    reads.clear()
    policy, ref, _ = train_tr.load_models(cfg, device, world)
    counts = [None] * world
    dist.all_gather_object(counts, len(reads))
    got = get_model_state_dict(policy, options=options)
    got_ref = get_model_state_dict(ref, options=options) if isinstance(ref, torch.nn.Module) else None
    buffers = dict(policy.named_buffers())
    # what one process loads: the same calls after the same seed (the adapters' initialization draws from it)
    torch.manual_seed(cfg['seed'])
    plain = train_tr.load_model('data/tiny/sft', dtype=torch.float32)
    if cfg['lora_rank']:
        train_tr.add_lora(plain, cfg['lora_rank'], cfg['lora_alpha'], reference=True)
    plain_ref = train_tr.load_model(cfg['ref_from']) if cfg['ref_from'] else plain
    buffer_errors = [None] * world
    dist.all_gather_object(buffer_errors, max((b - buffers[n]).abs().max().item() for n, b in plain.named_buffers()))
    if rank == 0:
        result[run] = {'reads': counts, 'policy_error': max_difference(got, plain.state_dict()),
                       'ref_error': max_difference(got_ref, plain_ref.state_dict()) if got_ref else None,
                       'buffer_errors': buffer_errors, 'buffers': len(buffers)}
if rank == 0:
    print(json.dumps(result))
dist.barrier()  # tear gloo down together: a rank leaving while the other still works can abort at exit
dist.destroy_process_group()
