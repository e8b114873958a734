"""Narrow storage of the lean head's centers and optimizer state (heads/storage.py).

Rounding lands on a neighbour of the fp32 value and is unbiased (many tiny updates keep
their sum), its noise is fixed by (seed, table, step, class, column), a narrow head's step is
the fp32 step rounded, and its state resumes, re-shards and converts between storage kinds.
"""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from heads_cases import make_problem

from facescale.heads import ArcFace, build_head, native, partial_fc
from facescale.heads.rows import Scratch, scatter_rows
from facescale.heads.shards import init_centers
from facescale.heads.storage import (
    NOISE_BITS,
    RoundingNoise,
    RowTable,
    center_table,
    noise_terms,
    round_bf16_,
    round_fp16_,
    rounding_noise,
    row_bytes,
    state_tables,
)
from facescale.train import checkpoint as ckpt

MARGIN = ArcFace(64, 0.5)
DIM = 16
NARROW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _noise(rows, step=1, seed=0, dim=DIM):
    return rounding_noise(seed, step, torch.arange(rows), dim)


def _neighbours(values, dtype):
    """The nearest values of ``dtype`` below and above each fp32 value."""
    near = values.to(dtype)
    up = torch.nextafter(near.float(), torch.tensor(float("inf"))).to(dtype)
    below = torch.where(near.float() > values, torch.nextafter(near, -up.abs() - 1), near)
    above = torch.where(near.float() < values, torch.nextafter(near, up.abs() + 1), near)
    return below.float(), above.float()


def _unit(table, state, values):
    """An upper bound of the spacing of ``table``'s stored values at ``values``."""
    if table.kind == "int8":
        return state[table.scale_name][:, None].expand_as(values) * 1.001
    if table.kind == "bf16":
        return values.abs() * 2.0**-7
    if table.kind == "fp16":
        return torch.clamp(values.abs() * 2.0**-10, min=2.0**-24)
    return torch.zeros_like(values)


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_rounding_lands_on_a_neighbour_with_the_right_odds(kind):
    g = torch.Generator().manual_seed(0)
    # normal values, fp16 subnormals (below 2**-14) and values between the grid points
    values = torch.cat([torch.randn(4, 4096, generator=g) * 0.01, torch.rand(4, 4096) * 1e-5])
    below, above = _neighbours(values, NARROW[kind])
    ups = torch.zeros_like(values)
    trials = 200
    round_ = round_bf16_ if kind == "bf16" else round_fp16_
    for step in range(trials):
        rounded = round_(values.clone(), _noise(len(values), step, dim=values.shape[1]))
        assert torch.equal(rounded.to(NARROW[kind]).float(), rounded)  # on the narrow grid
        assert ((rounded == below) | (rounded == above)).all()
        ups += (rounded == above) & (above != below)
    gap = (above - below).clamp(min=1e-30)
    odds = torch.where(above != below, (values - below) / gap, 0.0)
    # per entry, the share of rounding up is the position between the neighbours: binomial
    # spread (about 0.023 mean absolute at 200 trials; nearest rounding would give 0.25)
    # and no bias over all entries
    deviation = ups / trials - odds
    assert deviation.abs().mean() < 0.03 and deviation.mean().abs() < 0.002


def test_fp16_saturates_instead_of_overflowing():
    values = torch.tensor([[7e4, -1e6, 65504.0, 1.0]])
    rounded = round_fp16_(values.clone(), _noise(1, dim=4))
    assert torch.isfinite(rounded.to(torch.float16)).all()
    assert rounded[0, :3].abs().tolist() == [65504.0] * 3


def test_noise_depends_on_seed_step_and_class_not_on_chunks():
    classes = torch.arange(100, 300)
    whole = rounding_noise(7, 5, classes, DIM)
    parts = torch.cat([rounding_noise(7, 5, c, DIM) for c in classes.split(64)])
    assert torch.equal(whole, parts)
    assert torch.equal(whole[10:20], rounding_noise(7, 5, classes[10:20], DIM))
    for other in (rounding_noise(8, 5, classes, DIM), rounding_noise(7, 6, classes, DIM)):
        assert (other != whole).float().mean() > 0.99
    many = rounding_noise(7, 5, torch.arange(20_000), DIM)
    assert many.min() >= 0 and many.max() < 2**NOISE_BITS
    assert many.float().mean().item() == pytest.approx(2 ** (NOISE_BITS - 1), rel=0.01)


@pytest.mark.parametrize("kind", ["bf16", "fp16", "int8"])
def test_many_tiny_updates_keep_their_sum(kind):
    """A step far below one unit in the last place, 1000 times: the stored values move as
    fp32 arithmetic does (round to nearest would not move them at all)."""
    table = RowTable("weight", kind) if kind != "int8" else state_tables(("m",), "int8")[0]
    module = torch.nn.Module()
    table.register(module, 256, 64, torch.device("cpu"))
    start = torch.randn(256, 64, generator=torch.Generator().manual_seed(1)) * 0.01
    start[:, 0] = 0.05  # int8: the row's scale stays put, the other entries are tiny steps off
    for name, value in table.encode(start).items():
        getattr(module, name).copy_(value)
    first = table.decode(dict(module.named_buffers())).clone()
    exact = first.clone().double()
    scratch, delta, steps = Scratch(), 2e-7, 1000
    for step in range(1, steps + 1):
        block = table.read(module, slice(0, 256), scratch).clone()
        block.add_(delta)
        exact += delta
        noise = RoundingNoise(*noise_terms(0, step, torch.arange(256), 64))
        table.write(module, slice(0, 256), block, noise)
    moved = (table.decode(dict(module.named_buffers())).double() - first.double())[:, 1:]
    assert moved.mean().item() == pytest.approx(steps * delta, rel=0.05)
    nearest = table.encode((first.double() + steps * delta).float())
    assert not torch.equal(nearest[table.name], table.encode(first)[table.name])


def _awkward_values(rows, dim, seed):
    """Normal values of many magnitudes, fp16's subnormals and beyond its range, zeros of both
    signs."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, dim, generator=g) * 10.0 ** torch.randint(
        -9, 6, (rows, 1), generator=g
    )
    values[0, :4] = torch.tensor([0.0, -0.0, 7e4, -1e6])
    values[1] = 0.0  # an int8 row of zeros keeps scale 0
    return values


@pytest.mark.parametrize(
    ("kind", "nonnegative"), [("bf16", False), ("fp16", False), ("int8", False), ("int8", True)]
)
@pytest.mark.parametrize("ids", [False, True])
def test_the_one_pass_store_stores_the_torch_paths_bits(kind, nonnegative, ids, monkeypatch):
    if native.narrow_store() is None:
        pytest.skip("no C compiler: the torch path is the only one")
    table = RowTable("exp_avg_sq" if nonnegative else "weight", kind, nonnegative)
    rows = torch.tensor([9, 2, 31, 4, 17, 0]) if ids else slice(3, 9)
    values = _awkward_values(6, 40, seed=5)
    if nonnegative:
        values = values.square()
    noise = RoundingNoise(*noise_terms(4, 11, torch.tensor([5, 8, 1, 30, 2, 7]), 40))
    stored = []
    for build in (native.narrow_store, lambda: None):
        monkeypatch.setattr(native, "narrow_store", build)
        module = torch.nn.Module()
        table.register(module, 32, 40, torch.device("cpu"))
        table.write(module, rows, values.clone(), RoundingNoise(noise.rows, noise.columns))
        stored.append(dict(module.named_buffers()))
    fused, torch_path = stored
    assert fused.keys() == torch_path.keys()
    for name, value in fused.items():
        assert torch.equal(value.view(torch.uint8), torch_path[name].view(torch.uint8)), name
    assert fused[table.name].any()


def test_without_a_compiler_the_torch_path_stores(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.narrow_store.cache_clear()
    try:
        with caplog.at_level("INFO", logger="facescale.heads"):
            assert native.narrow_store() is None
        assert "the one-pass store is not built" in caplog.text
        head = _head("bf16", "int8")
        _train(head, 2)
        assert head.weight.dtype == torch.bfloat16 and head.weight.isfinite().all()
    finally:
        native.narrow_store.cache_clear()


def test_the_store_is_built_once_into_the_cache(monkeypatch, tmp_path):
    if native.narrow_store() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.narrow_store.cache_clear()
    try:
        assert native.narrow_store() is not None
        (library,) = (tmp_path / "facescale").iterdir()  # no temporary left beside it
        assert library.name.startswith("narrow_store-") and library.suffix == ".so"
    finally:
        native.narrow_store.cache_clear()


def test_int8_codes_stay_within_one_level():
    g = torch.Generator().manual_seed(2)
    signed, square = state_tables(("exp_avg", "exp_avg_sq"), "int8")
    values = torch.randn(64, DIM, generator=g)
    values[3] = 0.0  # a row never updated keeps scale 0
    stored = signed.encode(values)
    assert stored["exp_avg"].dtype == torch.int8 and stored["exp_avg_scale"][3] == 0
    error = (signed.decode(stored) - values).abs()
    assert (error <= stored["exp_avg_scale"][:, None] / 2 + 1e-7).all()
    v = values.square() * 1e-4
    kept = square.encode(v)
    assert kept["exp_avg_sq"].dtype == torch.uint8
    root_error = (square.decode(kept).sqrt() - v.sqrt()).abs()
    assert (root_error <= kept["exp_avg_sq_scale"][:, None] / 2 + 1e-7).all()


def test_row_bytes_of_each_kind():
    assert [row_bytes(k, 512) for k in ("fp32", "bf16", "fp16", "int8")] == [2048, 1024, 1024, 516]


def _head(center_dtype="fp32", state_dtype="fp32", kind="sgd", rate=1.0, classes=40, momentum=0.9):
    head = build_head(
        "partial_fc",
        classes,
        DIM,
        MARGIN,
        rate,
        lean=True,
        chunk_size=7,
        center_dtype=center_dtype,
        center_state_dtype=state_dtype,
    )
    head.configure_optimizer(kind, lr=0.1, momentum=momentum)
    return head


def _train(head, steps, first=0, norm_first=False):
    """``steps`` SGD steps; with ``norm_first`` each takes the gradient norm first (as clipping
    does), so the step receives the raw rows' gradient that the norm kept."""
    for step in range(first, first + steps):
        embeddings, labels, _ = make_problem(100 + step, 12, head.num_classes, DIM)
        head(embeddings.requires_grad_(), labels).backward()
        if norm_first:
            head.grad_norm_sq()
        head.step(0.2 / (step + 1))


@pytest.mark.parametrize(
    ("center", "state", "momentum"),
    [
        ("bf16", "bf16", 0.9),
        ("bf16", "int8", 0.9),
        ("fp16", "int8", 0.9),
        ("fp32", "bf16", 0.9),
        ("fp16", "fp32", 0.9),
        ("bf16", "fp32", 0.0),
    ],
)
@pytest.mark.parametrize("rate", [1.0, 0.5])
@pytest.mark.parametrize("norm_first", [True, False], ids=["raw_grad_kept", "radial_in_kernel"])
def test_the_fused_sgd_step_stores_the_torch_paths_bits(
    center, state, momentum, rate, norm_first, monkeypatch
):
    """Under SGD the kernel reads the rows from their table, updates and stores narrow tables
    in one pass (ranges of rows at rate 1, row ids under sampling). Given the raw rows'
    gradient (kept by the gradient norm) it stores the same bits as torch's update and store;
    forming that gradient itself (sums in another order), neighbouring values at most."""
    if native.narrow_store() is None:
        pytest.skip("no C compiler: the torch path is the only one")
    fused = partial_fc.native_sgd_store
    used = []
    monkeypatch.setattr(
        partial_fc, "native_sgd_store", lambda *a, **k: used.append(fused(*a, **k)) or used[-1]
    )
    trained = []
    for build in (native.narrow_store, lambda: None):
        monkeypatch.setattr(native, "narrow_store", build)
        head = _head(center, state, "sgd", rate, momentum=momentum)
        _train(head, 3, norm_first=norm_first)
        trained.append(head)
    assert used and all(used[: len(used) // 2]) and not any(used[len(used) // 2 :])
    kernel, torch_path = (dict(head.named_buffers()) for head in trained)
    assert kernel.keys() == torch_path.keys()
    assert not torch.equal(kernel["weight"], _head(center, state, "sgd", rate).weight)
    if norm_first:
        for name, value in kernel.items():
            assert torch.equal(value.view(torch.uint8), torch_path[name].view(torch.uint8)), name
        return
    # the sums' order moves an fp32 value by about 1e-6 of itself, and a stored one by one
    # unit where that crosses its rounding point (which sums, and so which values, depends on
    # the CPU's vector width)
    states = [head.state_dict() for head in trained]
    for table in trained[0]._tables:
        got, want = (table.decode(state) for state in states)
        unit = _unit(table, states[1], want)
        assert ((got - want).abs() <= unit + 1e-5 * want.abs() + 1e-7).all(), table.name
        assert ((got - want).abs() > 1e-5 * want.abs() + 1e-7).float().mean() < 0.01, table.name


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_a_block_the_kernel_declines_takes_the_torch_path(rate, monkeypatch):
    """Where the kernel declines a block it was meant to read and turn (it applies only to
    contiguous CPU tensors), the step reads the rows and forms their gradient with torch: the
    torch path's bits."""
    if native.narrow_store() is None:
        pytest.skip("no C compiler: the torch path is the only one")
    monkeypatch.setattr(partial_fc, "native_sgd_store", lambda *args: False)
    declined = _head("bf16", "int8", "sgd", rate)
    _train(declined, 3)
    monkeypatch.setattr(native, "narrow_store", lambda: None)
    torch_path = _head("bf16", "int8", "sgd", rate)
    _train(torch_path, 3)
    for name, value in dict(declined.named_buffers()).items():
        assert torch.equal(value, dict(torch_path.named_buffers())[name]), name


@pytest.mark.parametrize("rows", [slice(3, 9), torch.tensor([0, 4, 5, 11, 12, 19])], ids=str)
@pytest.mark.parametrize("momentum", [None, 0.9])
def test_the_kernel_forms_the_raw_gradient_as_float64_does(rows, momentum):
    """The SGD kernel given the gradient to the normalised rows (fp32 tables: nothing
    rounds) against the float64 autograd of normalisation, update and momentum."""
    if native.narrow_store() is None:
        pytest.skip("no C compiler: the torch path is the only one")
    generator = torch.Generator().manual_seed(7)
    table = torch.randn(20, 37, generator=generator) * 0.1
    grad = torch.randn(6, 37, generator=generator)  # to the normalised rows
    state = torch.randn(20, 37, generator=generator) * 0.01
    lr, decay = 0.3, 5e-4
    w = table[rows].double().requires_grad_()
    (torch.nn.functional.normalize(w, dim=1) * grad.double()).sum().backward()
    step = w.grad + w.detach() * decay
    if momentum is not None:
        step = state[rows].double() * momentum + step
    want = w.detach() - step * lr
    noise = noise_terms(0, 1, torch.arange(6), 37)
    stored = None if momentum is None else ("fp32", state, None)
    ran = native.native_sgd_store(
        None, grad, rows, noise, ("fp32", table), stored, (momentum or 0.0, decay), lr, True
    )
    assert ran
    torch.testing.assert_close(table[rows].double(), want, rtol=1e-6, atol=1e-7)
    if momentum is not None:
        torch.testing.assert_close(state[rows].double(), step, rtol=1e-6, atol=1e-7)


def test_the_kernel_reads_every_finite_fp16_value_exactly():
    """A zero step on an fp16 table holding every finite fp16 value, subnormal ones included,
    stores each back unchanged: the kernel's widening and rounding are exact for them."""
    if native.narrow_store() is None:
        pytest.skip("no C compiler: the torch path is the only one")
    codes = torch.arange(0x7C00, dtype=torch.int32)  # +0 to the largest finite, then negated
    codes = torch.cat([codes, codes | 0x8000]).to(torch.int16)
    table = codes.view(torch.float16).reshape(-1, 512).clone()
    grad = torch.zeros(table.shape, dtype=torch.float32)
    noise = noise_terms(3, 1, torch.arange(len(table)), 512)
    rows = slice(0, len(table))
    assert native.native_sgd_store(None, grad, rows, noise, ("fp16", table), None, (0.0, 0.0), 0.0)
    assert torch.equal(table.view(torch.int16).flatten(), codes)


def test_initial_centers_are_the_fp32_ones_rounded():
    full = init_centers(0, 50, DIM, seed=3)
    for kind, dtype in NARROW.items():
        assert torch.equal(init_centers(0, 50, DIM, 3, dtype=dtype), full.to(dtype))
        assert torch.equal(_head(kind).weight, init_centers(0, 40, DIM, 0).to(dtype))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize(("center", "state"), [("bf16", "bf16"), ("fp16", "int8")])
@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_a_narrow_step_is_the_fp32_step_rounded(kind, center, state, rate):
    """Loaded with the same (narrow-representable) values, a narrow head's step gives, entry
    by entry, a neighbour of the fp32 head's result: the math is fp32, only storage rounds.
    (Both heads are given the raw gradient, which the SGD kernel otherwise forms with sums in
    its own order: then a value next to a rounding point may land one step further.)"""
    narrow, wide = _head(center, state, kind, rate), _head("fp32", "fp32", kind, rate)
    _train(narrow, 2)
    wide.load_checkpoint_state(narrow.checkpoint_state())  # exact widening
    for head in (narrow, wide):
        _train(head, 1, first=2, norm_first=True)
    below, above = _neighbours(wide.weight, NARROW[center])
    assert ((narrow.weight.float() == below) | (narrow.weight.float() == above)).all()
    changed = narrow.weight.float() != wide.weight
    assert changed.any()
    for table in narrow.state_tables:
        got = table.decode(narrow.state_dict())
        want = getattr(wide, table.name)
        if state == "bf16":
            lo, hi = _neighbours(want, torch.bfloat16)
            assert ((got == lo) | (got == hi)).all(), table.name
        else:
            scale = narrow.state_dict()[table.scale_name][:, None]
            if table.nonnegative:
                got, want = got.sqrt(), want.sqrt()
            assert ((got - want).abs() <= scale * 1.001 + 1e-12).all(), table.name


@pytest.mark.parametrize(("center", "state"), [("bf16", "int8"), ("fp16", "bf16")])
def test_resume_from_the_checkpoint_state_is_bit_exact(center, state):
    straight = _head(center, state, "adamw", rate=0.5)
    _train(straight, 6)
    split = _head(center, state, "adamw", rate=0.5)
    _train(split, 3)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in split.checkpoint_state().items()}
    resumed = _head(center, state, "adamw", rate=0.5)
    resumed.load_checkpoint_state(saved)
    _train(resumed, 3, first=3)
    for name, value in straight.state_dict().items():
        if torch.is_tensor(value):
            assert value.dtype == resumed.state_dict()[name].dtype
            assert torch.equal(value, resumed.state_dict()[name]), name


@pytest.mark.parametrize("new_world", [1, 2, 3])
def test_saved_narrow_shards_re_shard_bit_exactly(tmp_path, new_world):
    head = _head("bf16", "int8", "adamw")
    _train(head, 2)
    full = head.checkpoint_state()
    cut = (0, 25, 40)
    for rank, (lo, hi) in enumerate(itertools.pairwise(cut)):
        part = {k: v[lo:hi] if torch.is_tensor(v) else v for k, v in full.items()}
        ckpt.atomic_save(ckpt.rank_state(2, lo, hi - lo, part, {}), tmp_path / f"rank_{rank}.pt")
    base, extra = divmod(40, new_world)
    pieces, start = [], 0
    for rank in range(new_world):
        count = base + (rank < extra)
        pieces.append(ckpt.load_head_shard(tmp_path, start, count, rank))
        start += count
    for name, value in full.items():
        if torch.is_tensor(value):
            joined = torch.cat([p[name] for p in pieces])
            assert joined.dtype == value.dtype and torch.equal(joined, value), name


def test_a_checkpoint_loads_into_another_storage_kind():
    source = _head("bf16", "int8", "adamw")
    _train(source, 2)
    saved = source.checkpoint_state()
    wide = _head("fp32", "fp32", "adamw")
    wide.load_checkpoint_state(saved)
    assert torch.equal(wide.weight, source.weight.float())  # widening is exact
    for table in source.state_tables:
        assert torch.equal(getattr(wide, table.name), table.decode(saved))
    back = _head("bf16", "int8", "adamw")
    back.load_checkpoint_state(wide.checkpoint_state())
    assert torch.equal(back.weight, source.weight)  # bf16 values survive fp32 and back
    half = _head("fp16", "bf16", "adamw")
    half.load_checkpoint_state(wide.checkpoint_state())
    assert torch.equal(half.weight, wide.weight.half())  # narrowing rounds to nearest
    assert torch.equal(half.exp_avg, wide.exp_avg.bfloat16())
    assert not hasattr(half, "exp_avg_scale")


def test_storage_kinds_are_checked():
    with pytest.raises(ValueError, match="center_dtype='int8'"):
        _head("int8")
    with pytest.raises(ValueError, match="center_state_dtype='fp16'"):
        _head("fp32", "fp16")
    with pytest.raises(ValueError, match="lean"):
        build_head("partial_fc", 10, DIM, MARGIN, center_dtype="bf16")
    with pytest.raises(ValueError, match="lean"):
        build_head("data_parallel", 10, DIM, MARGIN, center_state_dtype="int8")
    assert center_table("bf16").dtype == torch.bfloat16


@pytest.mark.parametrize(
    "dtype, width",
    [(torch.int8, 64), (torch.int8, 12), (torch.bfloat16, 16), (torch.float32, 3)],
)
def test_scattered_rows_land_where_indexing_puts_them(dtype, width):
    """Rows whose bytes make 8-byte words move as words, the others entry by entry: either
    way only the chosen rows change, to the given values."""
    g = torch.Generator().manual_seed(3)
    table = torch.randint(-100, 100, (40, width), generator=g).to(dtype)
    rows = torch.tensor([2, 5, 6, 31])
    values = torch.randint(-100, 100, (4, width), generator=g).to(dtype)
    expected = table.clone()
    expected[rows] = values
    scatter_rows(table, rows, values)
    assert torch.equal(table, expected)


def test_the_storage_benchmark_times_every_mode_and_store():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_storage_modes.py"
    modes = "fp32/fp32,bf16/int8,fp16/bf16+torch"
    argv = [sys.executable, str(script), "--classes", "3000", "--batch", "16", "--rounds", "1"]
    done = subprocess.run([*argv, "--modes", modes], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert [line[0] for line in lines] == modes.split(",")
    assert lines[0][1:] == [lines[0][1], "s", "1.000x"] and float(lines[0][1]) > 0
    stores = subprocess.run(
        [*argv, "--dim", "16", "--stores"], capture_output=True, text=True, timeout=300
    )
    assert stores.returncode == 0, stores.stderr
    rows = [line.split("kernel")[0].split() for line in stores.stdout.splitlines()]
    kinds = ["bf16", "fp16", "int8", "int8 sqrt"]
    assert rows == [[*kind.split(), where] for kind in kinds for where in ("range", "scattered")]
