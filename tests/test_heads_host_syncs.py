"""A training step of the lean head (Partial FC or model parallel), and the loop's optimizer
step, never wait for the device."""

import pytest
import torch
from host_syncs import HostSyncs
from train_utils import NUM_CLASSES, ArrayLoader, make_faces, small_vit, train_config

from facescale.distributed import init_distributed
from facescale.heads import AdaFace, ArcFace, CurricularFace, LeanPartialFC, MagFace, native
from facescale.train.trainer import Trainer


def test_the_probe_sees_syncing_calls():
    t = torch.randn(4)
    with HostSyncs() as syncs:
        t.sum().item()
        t[t > 0]
        bool(t[0] > 0)
        t.tolist()
        t[torch.tensor([1])] = 2.0
    assert syncs.calls == ["item", "__getitem__", "__bool__", "tolist", "__setitem__"]


@pytest.mark.parametrize("rate", [1.0, 0.5])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("cache_bytes", [0, 2**20])
def test_a_lean_head_step_never_waits(rate, optimizer, cache_bytes):
    # rate 0.5 samples 20 classes, more than the batch: its distinct positives are not read
    head = LeanPartialFC(40, 16, ArcFace(64.0, 0.5), rate, chunk_size=8, cache_bytes=cache_bytes)
    head.configure_optimizer(optimizer, 0.1)
    x = torch.randn(12, 16, requires_grad=True)
    labels = torch.randint(0, 40, (12,))
    for _ in range(2):
        with HostSyncs() as syncs:
            head(x, labels, sizes=[12]).backward()
            head.grad_norm_sq()
            head.step(torch.tensor(0.1), torch.tensor(0.5), skip=torch.tensor(0.0))
        assert syncs.calls == []


@pytest.mark.parametrize(("center_dtype", "state_dtype"), [("bf16", "bf16"), ("fp16", "int8")])
def test_a_narrow_head_step_never_waits(center_dtype, state_dtype, monkeypatch):
    # the torch path, as on a GPU (the C kernel reads the rate as a number, on a CPU); the
    # rounding noise's step number is the host's own count: no skip flag to read
    monkeypatch.setattr(native, "narrow_store", lambda: None)
    head = LeanPartialFC(
        40, 16, ArcFace(), 0.5, chunk_size=8, center_dtype=center_dtype,
        center_state_dtype=state_dtype,
    )  # fmt: skip
    head.configure_optimizer("sgd", 0.1)
    x = torch.randn(12, 16, requires_grad=True)
    for _ in range(2):
        with HostSyncs() as syncs:
            head(x, torch.randint(0, 40, (12,)), sizes=[12]).backward()
            head.step(torch.tensor(0.1), torch.tensor(0.5))
        assert syncs.calls == []
    assert head.optimizer_steps == 2


@pytest.mark.parametrize(
    ("margin", "subcenters"),
    [(AdaFace(), 1), (MagFace(64.0, l_a=2.0, u_a=4.0), 1), (CurricularFace(), 1), (ArcFace(), 3)],
    ids=["adaface", "magface", "curricularface", "subcenters"],
)
def test_each_losss_sampled_step_never_waits(margin, subcenters):
    head = LeanPartialFC(40, 16, margin, 0.5, chunk_size=8, num_subcenters=subcenters)
    head.configure_optimizer("sgd", 0.1)
    x = torch.randn(12, 16, requires_grad=True)
    with HostSyncs() as syncs:
        head(x, torch.randint(0, 40, (12,)), sizes=[12]).backward()
        head.grad_norm_sq()
        head.step(torch.tensor(0.1), torch.tensor(0.5), skip=torch.tensor(0.0))
    assert syncs.calls == []


def test_the_public_call_still_checks_its_inputs():
    head = LeanPartialFC(40, 16, ArcFace(64.0, 0.5))
    with pytest.raises(ValueError, match="label 40 at batch position 1 is outside"):
        head(torch.randn(2, 16), torch.tensor([3, 40]))


def test_the_loops_step_never_waits(tmp_path):
    cfg = train_config(tmp_path, max_grad_norm=1.0)  # sampled: see the head test above
    images, labels = make_faces(NUM_CLASSES, 8)
    trainer = Trainer(cfg, init_distributed(), ArrayLoader(images, labels, 8, 0, 1), small_vit())
    trainer._checked_sizes = [8]  # the labels are in range: the head need not check them
    trainer._count_from(0, 10)
    batches = iter(trainer.parts.loader)
    for _ in range(2):
        images, labels = next(batches)
        with HostSyncs() as syncs:
            loss = trainer._micro_batch(images, labels, sync=True)
            trainer._optimizer_step(loss)
        assert syncs.calls == []
        trainer._look(10)  # the loop looks at each step here (frequent=1)
    assert trainer.progress.step == 2
