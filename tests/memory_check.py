"""Memory of a checkpoint save and of gradient accumulation on 2 CPU processes (gloo), the path that 8 GPUs take:
SmolLM2-135M-Instruct (data/smollm2/prepare.py), TR-DPO in float32 on data/toy's pairs, one optimizer step (then the
optimizer holds its state) and the checkpoint after it.

    python tests/memory_check.py      # prints a line per run; tests/test_distributed.py asserts on the figures

Per rank: the peak RSS (VmHWM) up to the save, and with grad_accum=1 its growth during the save (the peak is reset
through /proc/self/clear_refs before it; the run with grad_accum=4 skips its save). Each micro-step takes one pair
per rank. glibc's malloc serves every allocation over 1 MB (every tensor that matters) from its own mapping, returned
when freed (MALLOC_MMAP_THRESHOLD_): by default it keeps freed tensors of up to 32 MB in its heap, whose RSS then
grows with each micro-step and hides what is alive. RSS is what a busy machine changes least (times are not
measured here). Linux only.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / 'data/smollm2/model'


def status_gb(key):  # a line of /proc/self/status, in GB
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key + ':')) / 2 ** 20


def worker(out_dir, data, grad_accum):
    sys.path.insert(0, str(REPO))
    import train_tr
    figures, save = {}, train_tr.save_checkpoint

    def measured_save(*args, **kwargs):
        figures['peak_gb'] = status_gb('VmHWM')
        if grad_accum == 1:
            Path('/proc/self/clear_refs').write_text('5')  # the peak starts again from the current RSS
            before = status_gb('VmRSS')
            save(*args, **kwargs)
            figures['save_growth_gb'] = status_gb('VmHWM') - before
    train_tr.save_checkpoint = measured_save
    train_tr.train(train_tr.get_config([
        f'--init_from={MODEL}', f'--data={data}', f'--out_dir={out_dir}', '--device=cpu', '--dtype=float32',
        f'--grad_accum={grad_accum}', f'--batch_size={2 * grad_accum}', '--max_length=64', '--max_prompt_length=32',
        '--max_iters=1', '--eval_pairs=0', '--ref_update=soft', '--tr_tau=1']))
    Path(f"{out_dir}.{os.environ['RANK']}.json").write_text(json.dumps(figures))


def measure(grad_accum):
    """[rank 0's figures, rank 1's] of one 2-process run."""
    with tempfile.TemporaryDirectory() as tmp:
        out, data = Path(tmp) / 'run', Path(tmp) / 'pairs.jsonl'
        data.write_text(''.join((REPO / 'data/toy/train.jsonl').read_text().splitlines(keepends=True)[:8]))
        proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                               __file__, str(out), str(data), str(grad_accum)], cwd=REPO, capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1',
                                                               MALLOC_MMAP_THRESHOLD_=str(2 ** 20)))
        if proc.returncode:
            raise SystemExit(f'error: the grad_accum={grad_accum} run failed:\n{proc.stderr[-3000:]}')
        return [json.loads(Path(f'{out}.{rank}.json').read_text()) for rank in (0, 1)]


def main():
    results = {grad_accum: measure(grad_accum) for grad_accum in (1, 4)}
    for grad_accum, ranks in results.items():
        print(f'grad_accum={grad_accum}: ' + ', '.join(f"rank {r}: peak {f['peak_gb']:.2f} GB" + (
            f", +{f['save_growth_gb']:.2f} GB while saving" if 'save_growth_gb' in f else '')
            for r, f in enumerate(ranks)))
    return results


if __name__ == '__main__':
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3])) if len(sys.argv) == 4 else main()
