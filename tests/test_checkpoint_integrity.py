"""Damaged, missing, unwritable and unsafe checkpoint files: each fault made for real on disk."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch

from facescale.backbones import get_model
from facescale.backbones.arcface_torch import read_state_dict
from facescale.cli import main
from facescale.config import Schedule, load_config, set_value
from facescale.distributed import DistEnv
from facescale.errors import UserError
from facescale.export import load_backbone
from facescale.train import checkpoint as ckpt


def run_cli(argv, capsys):
    """Run `facescale ARGV` in-process; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def flip_bytes(path, count=64):
    """Invert ``count`` bytes in the middle of ``path``; its size stays the same."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(data)


def save_step(root, step):
    common = {"backbone": {"w": torch.randn(50_000)}, "step": step}
    return ckpt.save_checkpoint(root, step, common, {"head": torch.randn(50_000)}, rank=0, keep=9)


def test_flipped_bytes_that_torch_loads_silently_fail_the_digest(tmp_path):
    folder = save_step(tmp_path, 1)
    assert ckpt.find_damage(folder) == []
    size = (folder / "common.pt").stat().st_size
    before = torch.load(folder / "common.pt", weights_only=True)["backbone"]["w"]
    flip_bytes(folder / "common.pt")
    assert (folder / "common.pt").stat().st_size == size
    after = torch.load(folder / "common.pt", weights_only=True)["backbone"]["w"]
    assert not torch.equal(before, after)  # the damage is real and torch does not notice it
    assert ckpt.find_damage(folder) == [
        f"{folder / 'common.pt'} has changed since it was written (its SHA-256 differs)"
    ]


def test_truncated_and_missing_files_and_manifest_are_named(tmp_path):
    folder = save_step(tmp_path, 1)
    rank_file = folder / "rank_0.pt"
    size = rank_file.stat().st_size
    rank_file.write_bytes(rank_file.read_bytes()[:1000])
    assert ckpt.find_damage(folder) == [f"{rank_file} has 1000 bytes where {size} were written"]
    rank_file.unlink()
    assert ckpt.find_damage(folder) == [f"{rank_file} is missing"]
    (folder / "manifest.json").unlink()
    assert ckpt.find_damage(folder) == [
        f"{folder / 'manifest.json'} is missing, so the files cannot be checked"
    ]


def _checkpointer(tmp_path) -> ckpt.Checkpointer:
    cfg = load_config(None)
    set_value(cfg, "output", str(tmp_path), "test")
    return ckpt.Checkpointer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))


def test_resume_takes_the_newest_intact_checkpoint_and_says_why(tmp_path, caplog):
    checkpointer = _checkpointer(tmp_path)
    first, second, third = (save_step(checkpointer.root, step) for step in (1, 2, 3))
    flip_bytes(third / "common.pt")
    (second / "rank_0.pt").unlink()
    with caplog.at_level(logging.WARNING, "facescale.train"):
        assert checkpointer.newest_intact() == first
    assert f"{third / 'common.pt'} has changed since it was written" in caplog.text
    assert f"{second / 'rank_0.pt'} is missing" in caplog.text
    flip_bytes(first / "rank_0.pt")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint to resume from") as err:
        checkpointer.newest_intact()
    assert all(name in str(err.value) for name in ("step_000000001", "step_000000003"))


def test_a_missing_shard_is_named_when_the_head_is_re_sharded(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    for rank, start in enumerate((0, 5)):
        head = {"weight": torch.randn(5, 4), "momentum": torch.randn(5, 4)}
        ckpt.atomic_save(ckpt.rank_state(2, start, 5, head, {}), folder / f"rank_{rank}.pt")
    (folder / "rank_1.pt").unlink()
    # rank 1 of a new world of 2 needs rows [5, 10): exactly the lost shard's rows
    with pytest.raises(ckpt.CheckpointError, match=r"rank_1\.pt missing \(the checkpoint was sav"):
        ckpt.load_head_shard(folder, 5, 5, rank=1)


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "model.pt"
    ckpt.atomic_save({"a": torch.ones(3)}, path)
    (tmp_path / "model.pt.tmp").symlink_to("/dev/full")  # every write there fails: ENOSPC
    with pytest.raises(ckpt.FileWriteError) as err:
        ckpt.atomic_save({"a": torch.zeros(100_000)}, path)
    assert isinstance(err.value, UserError)
    assert str(err.value).startswith(f"{path}: cannot be written (no space left on the device)")
    assert not (tmp_path / "model.pt.tmp").is_symlink()
    assert torch.equal(ckpt.safe_load(path)["a"], torch.ones(3))


class Payload:
    def __reduce__(self):
        return (exec, ("raise SystemExit('ran code from the file')",))


@pytest.mark.parametrize("reader", [ckpt.safe_load, read_state_dict])
def test_a_refused_pickle_says_how_to_convert_and_never_to_drop_the_check(tmp_path, reader):
    path = tmp_path / "old.pt"
    path.write_bytes(pickle.dumps({"backbone": Payload()}, protocol=2))
    with pytest.raises(UserError) as err:
        reader(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "(exec)" in message
    assert "torch.save(model.state_dict()" in message
    assert "weights_only" not in message and "\n" not in message


def write_checkpoint(root, network="mbf", embedding_size=64):
    """A one-rank checkpoint of ``network`` as training writes it; the model and the folder."""
    torch.manual_seed(0)
    model = get_model(network, embedding_size).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    identity = {"network": network, "num_classes": 10, "embedding_size": embedding_size}
    schedule = Schedule(1, 8, 8, 1, 1, 0)
    common = ckpt.common_state(identity, schedule, ckpt.Progress(), model, optimizer, None)
    mine = ckpt.rank_state(1, 0, 10, {"weight": torch.randn(10, embedding_size)}, {})
    return model, ckpt.save_checkpoint(root, 1, common, mine, rank=0, keep=1)


def test_export_reads_common_pt_and_names_the_file_or_options_to_use(tmp_path, capsys):
    model, folder = write_checkpoint(tmp_path)
    loaded = load_backbone("mbf", folder / "common.pt", 64)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"give common\.pt from the same folder, or OUTPUT/model"):
        load_backbone("mbf", folder / "rank_0.pt", 64)
    with pytest.raises(ValueError, match="load it with --network mbf --embedding-size 64"):
        load_backbone("r18", folder / "common.pt")
    out = tmp_path / "x.onnx"
    code, _, err = run_cli(["export", "onnx", str(folder / "rank_0.pt"), "--network", "mbf",
                            "--embedding-size", "64", str(out)], capsys)  # fmt: skip
    assert code == 2 and err.startswith(f"facescale export: error: {folder / 'rank_0.pt'}: one")
    assert not out.exists()


def test_export_refuses_a_damaged_common_pt(tmp_path):
    _, folder = write_checkpoint(tmp_path)
    flip_bytes(folder / "common.pt")
    torch.load(folder / "common.pt", weights_only=True)  # torch alone would use it
    with pytest.raises(ckpt.CheckpointError, match=r"common\.pt has changed .*use an older"):
        load_backbone("mbf", folder / "common.pt", 64)
