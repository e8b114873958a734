"""End-to-end training on spawned gloo ranks: learning, 1 vs N ranks, exact resume, re-sharding."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dist_utils import run_ranks
from train_utils import (
    NUM_CLASSES,
    ArrayLoader,
    assert_same_model,
    full_head,
    make_faces,
    small_vit,
    train_config,
    train_rank,
)

from facescale.backbones import get_model
from facescale.distributed import init_distributed
from facescale.train.schedule import lr_at
from facescale.train.trainer import Trainer, train

NARROW = {"center_dtype": "bf16", "center_state_dtype": "int8"}  # centers and momentum stored


@pytest.mark.parametrize("storage", [{}, NARROW], ids=["fp32", "narrow"])
def test_two_ranks_learn(tmp_path, storage):
    results = run_ranks(train_rank, 2, tmp_path, {"num_epoch": 6, "lr": 0.05, **storage}, 16)
    losses = [
        float(line.split('"loss": ')[1].split(",")[0])
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert len(losses) == results[0]["summary"]["final_step"] == 36
    assert sum(losses[-6:]) / 6 < 0.7 * sum(losses[:6]) / 6
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "tensorboard").is_dir()
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved.keys() == results[0]["backbone"].keys()


def test_one_and_two_ranks_give_the_same_weights(tmp_path):
    # float32 sums in another order: agreement to 1e-4 after 4 steps
    values = {"num_epoch": 1, "gradient_acc": 2, "max_grad_norm": 1.0}
    one = run_ranks(train_rank, 1, tmp_path / "one", values, 16)
    two = run_ranks(train_rank, 2, tmp_path / "two", values, 16)
    assert one[0]["summary"]["final_step"] == two[0]["summary"]["final_step"] == 3
    assert_same_model(one, two, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("storage", [{}, NARROW], ids=["fp32", "narrow"])
def test_resume_continues_exactly(tmp_path, storage):
    straight = run_ranks(train_rank, 2, tmp_path / "straight", storage, 16)
    run_ranks(train_rank, 2, tmp_path / "split", {"stop_step": 5, **storage}, 16)
    resumed = run_ranks(train_rank, 2, tmp_path / "split", storage, 16, True)
    assert resumed[0]["summary"]["steps"] == straight[0]["summary"]["final_step"] - 5
    assert_same_model(straight, resumed, rtol=0, atol=0)


def test_checkpoints_without_manifest_or_samples_still_resume(tmp_path):
    # the format before checkpoints carried a manifest and their step's samples
    straight = run_ranks(train_rank, 1, tmp_path / "straight", {}, 16)
    run_ranks(train_rank, 1, tmp_path / "split", {"stop_step": 5}, 16)
    for folder in (tmp_path / "split" / "checkpoints").iterdir():
        (folder / "manifest.json").unlink()
        common = torch.load(folder / "common.pt", weights_only=True)
        del common["samples_per_step"]
        torch.save(common, folder / "common.pt")
    resumed = run_ranks(train_rank, 1, tmp_path / "split", {}, 16, True)
    assert resumed[0]["summary"]["steps"] == straight[0]["summary"]["final_step"] - 5
    assert_same_model(straight, resumed, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("before", "after", "storage"), [(2, 1, {}), (1, 3, {}), (2, 3, NARROW)], ids=str
)
def test_resume_on_another_number_of_ranks(tmp_path, before, after, storage):
    straight = run_ranks(train_rank, after, tmp_path / "straight", storage, 24)
    stopped = run_ranks(train_rank, before, tmp_path / "split", {"stop_step": 3, **storage}, 24)
    # the re-partitioned centers equal the saved ones before any further step
    reloaded = run_ranks(
        train_rank, after, tmp_path / "split", {"stop_step": 3, **storage}, 24, True
    )
    assert torch.equal(full_head(reloaded), full_head(stopped))
    resumed = run_ranks(train_rank, after, tmp_path / "split", storage, 24, True)
    assert_same_model(straight, resumed, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sub_centers_and_running_state_resume_on_another_number_of_ranks(tmp_path):
    values = {"loss": "curricularface", "num_subcenters": 3, "stop_step": 3}
    stopped = run_ranks(train_rank, 2, tmp_path, values, 24)
    reloaded = run_ranks(train_rank, 1, tmp_path, values, 24, True)
    assert full_head(stopped).shape[0] == 3 * NUM_CLASSES
    assert torch.equal(full_head(reloaded), full_head(stopped))
    (t,) = {r["margin"]["t"].item() for r in stopped}  # the same on every rank
    assert t != 0 and reloaded[0]["margin"]["t"].item() == t


def test_mismatched_checkpoint_is_refused(tmp_path):
    run_ranks(train_rank, 1, tmp_path, {"stop_step": 2}, 8)
    cfg = train_config(tmp_path, embedding_size=16, resume=True)
    images, labels = make_faces(NUM_CLASSES, 8)
    loader = ArrayLoader(images, labels, 8, 0, 1)
    trainer = Trainer(cfg, init_distributed(), loader, get_model("vit_t", 16, depth=2, dim=64))
    with pytest.raises(
        RuntimeError, match="embedding_size=32 but the config has embedding_size=16"
    ):
        trainer.resume()


def test_non_finite_losses_skip_then_stop(tmp_path, caplog):
    cfg = train_config(tmp_path, max_nonfinite_steps=3)
    images, labels = make_faces(NUM_CLASSES, 8)
    images[:] = float("nan")
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        train(cfg, init_distributed(), ArrayLoader(images, labels, 8, 0, 1), small_vit())
    assert caplog.text.count("non-finite loss nan, step skipped") == 3


def _write_pairs(path, num_pairs):
    from facescale.data import write_verification_bin
    from facescale.data.image import encode_jpeg

    images, labels = make_faces(NUM_CLASSES, 4, seed=1)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    pairs, issame = [], []
    for p in range(num_pairs):
        a, b = (2 * p) % len(labels), (2 * p + 1 + 4 * (p % 2)) % len(labels)
        pairs += [encode_jpeg(pixels[a]), encode_jpeg(pixels[b])]
        issame.append(bool(labels[a] == labels[b]))
    write_verification_bin(path, pairs, issame)


def test_verification_during_training_matches_single_process(tmp_path):
    from facescale.eval import evaluate_verification, load_verification_set

    _write_pairs(tmp_path / "pairs.bin", 40)
    values = {"rec": str(tmp_path), "val_targets": ["pairs", "missing"], "verbose": 3}
    results = run_ranks(train_rank, 2, tmp_path / "out", values, 16)
    logged = [
        r for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").open()) if "val/pairs" in r
    ]
    assert [r["step"] for r in logged] == [3, 6, 9, 12]
    assert results[0]["summary"]["best"]["pairs"] == max(r["val/pairs"] for r in logged)
    model = small_vit()
    model.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True))
    direct = evaluate_verification(model, load_verification_set(tmp_path / "pairs.bin"))
    assert logged[-1]["val/pairs"] == pytest.approx(direct.accuracy, abs=1 / 40)


def test_data_parallel_baseline_trains_like_partial_fc(tmp_path):
    values = {"num_epoch": 1, "max_grad_norm": 1.0}
    sharded = run_ranks(train_rank, 2, tmp_path / "pfc", values, 16)
    replicated = run_ranks(train_rank, 2, tmp_path / "dp", {**values, "head": "data_parallel"}, 16)
    torch.testing.assert_close(replicated[0]["head"], full_head(sharded), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(replicated[1]["head"], replicated[0]["head"], rtol=0, atol=0)
    for key, value in sharded[0]["backbone"].items():
        torch.testing.assert_close(replicated[0]["backbone"][key], value, rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # 2 micro-batches of 8 average to the step one batch of 16 takes; the LR moves per step
    values = {"num_epoch": 1, "max_grad_norm": 1.0, "warmup_epoch": 0.5}
    big = run_ranks(train_rank, 1, tmp_path / "big", values, 16)
    accumulated = run_ranks(train_rank, 1, tmp_path / "acc", {**values, "gradient_acc": 2}, 8)
    assert big[0]["summary"]["final_step"] == accumulated[0]["summary"]["final_step"] == 6
    assert_same_model(big, accumulated, rtol=1e-4, atol=1e-5)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "acc" / "metrics.jsonl").open())]
    assert lrs == [lr_at(step, 0.02, total_steps=6, warmup_steps=3) for step in range(6)]


def test_keep_checkpoints_zero_writes_none(tmp_path):
    run_ranks(train_rank, 1, tmp_path, {"num_epoch": 1, "keep_checkpoints": 0}, 16)
    assert (tmp_path / "model.pt").is_file()
    assert not (tmp_path / "checkpoints").exists()


def test_bf16_autocast_trains_on_cpu(tmp_path):
    results = run_ranks(train_rank, 1, tmp_path, {"num_epoch": 1, "bf16": True}, 16)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open())]
    assert len(losses) == results[0]["summary"]["final_step"] == 6
    assert all(map(math.isfinite, losses))


def _compiled_rank(rank, world, output, values, global_batch, resume=False):
    """``train_rank``, also counting the graphs torch.compile made in this process."""
    from torch._dynamo.utils import counters

    result = train_rank(rank, world, output, values, global_batch, resume)
    return {**result, "graphs": counters["stats"]["unique_graphs"]}


def test_compile_trains_like_eager_and_keeps_checkpoints_plain(tmp_path):
    # evaluation every 2 steps (eval mode, no_grad, another batch size) adds no graph; the
    # checkpoint resumes and model.pt loads into an uncompiled model
    _write_pairs(tmp_path / "pairs.bin", 40)
    values = {"num_epoch": 1, "max_grad_norm": 1.0, "rec": str(tmp_path), "verbose": 2}
    values["val_targets"] = ["pairs"]
    eager = run_ranks(train_rank, 2, tmp_path / "eager", values, 16)
    compiled = {**values, "compile": True}
    run_ranks(_compiled_rank, 2, tmp_path / "compiled", {**compiled, "stop_step": 3}, 16)
    resumed = run_ranks(_compiled_rank, 2, tmp_path / "compiled", compiled, 16, True)
    assert resumed[0]["summary"]["steps"] == 3
    assert [r["graphs"] for r in resumed] == [1, 1]
    assert_same_model(eager, resumed, rtol=1e-3, atol=1e-4)
    model = small_vit()
    model.load_state_dict(torch.load(tmp_path / "compiled" / "model.pt", weights_only=True))
