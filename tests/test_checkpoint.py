"""save_checkpoint is atomic file by file: an interrupted save leaves the previous checkpoint loadable."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_tr

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path):
    """A 1-rank process group, a plain (unsharded) tiny model and optimizer, and a first checkpoint at iteration 1."""
    train_tr.setup_distributed('cpu')
    policy = train_tr.load_model(REPO / 'data/tiny/sft')
    optimizer = torch.optim.AdamW(policy.parameters())
    tokenizer = AutoTokenizer.from_pretrained(REPO / 'data/tiny/sft')
    train_tr.save_checkpoint(tmp_path, policy, None, optimizer, tokenizer, 1, {'note': 'first'}, master=True)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)  # what the next save would write differs everywhere
    yield tmp_path, policy, optimizer, tokenizer
    torch.distributed.destroy_process_group()


def files(directory):
    return {f.name: f.read_bytes() for f in directory.iterdir() if f.is_file()}


def test_failure_while_writing_leaves_previous_checkpoint(saved, monkeypatch):
    out_dir, policy, optimizer, tokenizer = saved
    before = files(out_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt('killed while writing state.pt')
    monkeypatch.setattr(train_tr.torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 2, {}, master=True)
    assert files(out_dir) == before
    assert torch.load(out_dir / 'state.pt', weights_only=True)['iter'] == 1


def test_failure_while_moving_leaves_every_file_whole(saved, monkeypatch):
    """Killed after the new weights were moved in but before state.pt: the HF model is the new one, whole; state.pt
    is the old one, whole; a later save completes and cleans up."""
    out_dir, policy, optimizer, tokenizer = saved
    real_replace = train_tr.os.replace

    def crash_on_state(src, dst):
        if Path(src).name == 'state.pt':
            raise KeyboardInterrupt('killed before state.pt was moved')
        real_replace(src, dst)
    monkeypatch.setattr(train_tr.os, 'replace', crash_on_state)
    with pytest.raises(KeyboardInterrupt):
        train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 2, {}, master=True)
    assert torch.load(out_dir / 'state.pt', weights_only=True)['iter'] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    torch.testing.assert_close(reloaded.model.norm.weight, policy.model.norm.weight)
    monkeypatch.setattr(train_tr.os, 'replace', real_replace)
    train_tr.save_checkpoint(out_dir, policy, None, optimizer, tokenizer, 3, {}, master=True)
    assert torch.load(out_dir / 'state.pt', weights_only=True)['iter'] == 3
    assert not (out_dir / '.tmp_checkpoint').exists()
