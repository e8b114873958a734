import itertools
import math

import pytest
import torch

from facescale.train import checkpoint as ckpt
from facescale.train.schedule import lr_at, lr_at_share


def test_lr_schedule_warmup_then_polynomial_decay():
    lrs = [lr_at(s, 0.1, total_steps=100, warmup_steps=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert lrs[10] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[55] == pytest.approx(0.1 * (1 - 45 / 90) ** 2)
    assert lr_at(100, 0.1, 100, 10) == 0.0
    assert lr_at(0, 0.1, 100, 0) == 0.1


def test_lr_over_a_time_budget_warms_up_then_decays_to_zero_at_its_end():
    shares = [i / 100 for i in range(101)]
    lrs = [lr_at_share(share, 0.1, warmup_share=0.2) for share in shares]
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(0.05) and lrs[20] == pytest.approx(0.1)
    assert all(a < b for a, b in itertools.pairwise(lrs[:21]))
    assert all(a > b for a, b in itertools.pairwise(lrs[20:]))
    assert lrs[60] == pytest.approx(0.1 * (1 - 0.4 / 0.8) ** 2)
    assert lrs[100] == 0.0 and lr_at_share(1.5, 0.1, 0.2) == 0.0
    assert lr_at_share(0.5, 0.1, 0.0) == pytest.approx(0.1 * 0.25)


def _shard(num_classes, rank, world):
    base, extra = divmod(num_classes, world)
    return base * rank + min(rank, extra), base + (rank < extra)


def _write_shards(folder, full, momentum, world):
    folder.mkdir()
    for rank in range(world):
        start, count = _shard(len(full), rank, world)
        head = {
            "weight": full[start : start + count].clone(),
            "momentum": momentum[start : start + count].clone(),
            "steps": torch.tensor(7),
            "sampler_seed": 100 + rank,
        }
        ckpt.atomic_save(ckpt.rank_state(world, start, count, head, {}), folder / f"rank_{rank}.pt")


@pytest.mark.parametrize("old_world", [1, 2, 3])
@pytest.mark.parametrize("new_world", [1, 2, 3])
def test_head_shards_repartition_to_any_world(tmp_path, old_world, new_world):
    full, momentum = torch.randn(10, 4), torch.randn(10, 4)
    _write_shards(tmp_path / "ck", full, momentum, old_world)
    weights, moments = [], []
    for rank in range(new_world):
        start, count = _shard(10, rank, new_world)
        state = ckpt.load_head_shard(tmp_path / "ck", start, count, rank)
        assert state["steps"].item() == 7
        expected_seed = 100 + rank if rank < old_world else 100
        assert state["sampler_seed"] == expected_seed
        weights.append(state["weight"])
        moments.append(state["momentum"])
    assert torch.equal(torch.cat(weights), full)
    assert torch.equal(torch.cat(moments), momentum)


def test_atomic_save_crash_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    ckpt.atomic_save({"a": torch.ones(3)}, path)

    def crash(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt.safe_load(path)["a"], torch.ones(3))


def test_interrupted_checkpoint_is_ignored_and_old_ones_pruned(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(root, step, {"s": step}, {"r": step}, rank=0, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000000003", "step_000000004"]

    def crash(obj, path):
        raise OSError("killed")

    monkeypatch.setattr(ckpt, "atomic_save", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(root, 5, {"s": 5}, {"r": 5}, rank=0, keep=2)
    monkeypatch.undo()
    latest = ckpt.list_checkpoints(root)[-1]
    assert latest.name == "step_000000004"
    assert ckpt.safe_load(latest / "common.pt") == {"s": 4}


def test_checkpoint_load_refuses_code_and_names_the_file(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    path = tmp_path / "common.pt"
    path.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ckpt.CheckpointError, match=r"common\.pt"):
        ckpt.safe_load(path)


def test_mismatched_checkpoint_names_the_field(tmp_path):
    saved = {"network": "r50", "num_classes": 100, "embedding_size": 512}
    with pytest.raises(ckpt.CheckpointError, match="num_classes=100 but the config has num_cl"):
        ckpt.check_compatible(saved, dict(saved, num_classes=200), tmp_path)
    ckpt.check_compatible(saved, dict(saved), tmp_path)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    first = (torch.rand(2), np.random.rand(2), random.random())
    ckpt.set_rng_state(state)
    again = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all()
    assert math.isclose(first[2], again[2])
