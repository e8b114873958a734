"""One typed config for every facescale command.

Config files are arcface_torch-style Python modules that define ``config`` (an EasyDict or
dict). They are layered on typed defaults, then ``--set key=value`` overrides; every value
is checked against its field's type and allowed range. Derived quantities (global batch,
step counts) are computed in one place: :meth:`Config.schedule`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.resources
import importlib.util
import json
import logging
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facescale.errors import ConfigError

log = logging.getLogger(__name__)

# Keys that arcface_torch configs carry but facescale does not need, with the reason.
IGNORED_KEYS: dict[str, str] = {
    "dali": "facescale reads records sequentially with its own loader; DALI is not used",
    "dali_aug": "augmentation is set with `augment`",
    "save_all_states": "facescale checkpoints always hold every state needed to resume",
    "wandb_log_all": "the logged figures are global (the same on every rank), so rank 0 alone "
    "logs them to Weights & Biases",
}


def _check(predicate: Callable[[Any], bool], allowed: str | Callable[[], str]) -> dict[str, Any]:
    return {"check": predicate, "allowed": allowed}


def _backbone_names() -> list[str]:
    from facescale.backbones import list_models  # imported on first use: it loads torch

    return list_models()


def _loss_names() -> tuple[str, ...]:
    from facescale.heads.losses import LOSS_NAMES  # imported on first use: it loads torch

    return LOSS_NAMES


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(value: Any) -> float:
    """Seconds from a number of seconds or a text such as '90s', '45m', '2h' or '1h30m'
    ('' and 0 give 0); ValueError for anything else or a negative number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(value)
        return float(value)
    if not isinstance(value, str):
        raise ValueError(value)
    text = value.strip().lower()
    if not text:
        return 0.0
    try:
        return parse_duration(float(text))
    except ValueError:
        pass
    match = DURATION.fullmatch(text)
    if match is None or not any(match.groups()):
        raise ValueError(value)
    return sum(
        float(amount) * DURATION_UNITS[unit]
        for amount, unit in zip(match.groups(), "hms", strict=True)
        if amount is not None
    )


@dataclass
class Config:
    """Every setting of a facescale run; names follow arcface_torch's config keys."""

    # model
    network: str = field(
        default="r50",
        metadata=_check(
            lambda v: v in _backbone_names(), lambda: "one of " + ", ".join(_backbone_names())
        ),
    )
    embedding_size: int = field(default=512, metadata=_check(_positive, "an integer > 0"))
    dropout: float = field(default=0.0, metadata=_check(lambda v: 0 <= v < 1, "in [0, 1)"))
    # None: the network's default (on for r2060, vit_b, vit_l)
    gradient_checkpointing: bool | None = None
    # None: on when training on a CPU (oneDNN's faster layout there), off on a GPU
    channels_last: bool | None = None
    margin_list: tuple[float, float, float] = field(
        default=(1.0, 0.5, 0.0),
        metadata=_check(
            lambda v: len(v) == 3 and v[0] > 0,
            "three numbers (m1, m2, m3) for cos(m1*theta + m2) - m3, with m1 > 0",
        ),
    )
    scale: float = field(default=64.0, metadata=_check(_positive, "a number > 0"))
    # the margin softmax: 'combined' is margin_list's cos(m1*theta + m2) - m3 ('arcface' and
    # 'cosface' take margin_list of their shape); the others use their papers' defaults
    loss: str = field(
        default="combined",
        metadata=_check(lambda v: v in _loss_names(), lambda: "one of " + ", ".join(_loss_names())),
    )
    # sub-center ArcFace: K centers per class, a class's logit its best one's (the paper: 3)
    num_subcenters: int = field(
        default=1, metadata=_check(_positive, "an integer >= 1 (1: one center per class)")
    )
    interclass_filtering_threshold: float = field(
        default=0.0, metadata=_check(lambda v: 0 <= v < 1, "a number in [0, 1); 0 disables")
    )
    head: str = field(
        default="partial_fc",
        metadata=_check(
            lambda v: v in ("partial_fc", "data_parallel"),
            "'partial_fc' (sharded centers; sample_rate < 1 samples them) or 'data_parallel' "
            "(replicated baseline for speed comparisons)",
        ),
    )
    sample_rate: float = field(
        default=1.0, metadata=_check(lambda v: 0 < v <= 1, "a number in (0, 1]")
    )
    # MiB per rank the Partial FC head may keep a step's softmax in, to skip recomputing the
    # logits in its update (a quarter of the head's matmuls); 0 always recomputes
    head_cache_mib: int = field(default=512, metadata=_check(_non_negative, "an integer >= 0"))
    # dtype of the head's logit matmuls; softmax statistics, margin and update stay float32.
    # 'auto': the backbone's (fp16 / bf16 when set), else fp32
    head_logits_dtype: str = field(
        default="auto",
        metadata=_check(
            lambda v: v in ("auto", "fp32", "fp16", "bf16"), "'auto', 'fp32', 'fp16' or 'bf16'"
        ),
    )
    # storage of the Partial FC head's class centers and of their optimizer state (momentum,
    # Adam's moments); every chunk computes in float32, writes round stochastically
    center_dtype: str = field(
        default="fp32",
        metadata=_check(lambda v: v in ("fp32", "bf16", "fp16"), "'fp32', 'bf16' or 'fp16'"),
    )
    center_state_dtype: str = field(
        default="fp32",
        metadata=_check(
            lambda v: v in ("fp32", "bf16", "int8"),
            "'fp32', 'bf16' or 'int8' (one byte per entry and a float32 scale per class)",
        ),
    )
    # classes per chunk of the head's softmax; 0: sized from the device (4096 on CPU, from a
    # memory budget on a GPU)
    head_chunk_size: int = field(
        default=0, metadata=_check(_non_negative, "an integer >= 0 (0: sized for the device)")
    )
    # data
    rec: str | list[str] = field(
        default="synthetic",
        metadata=_check(
            bool,
            "a dataset folder, a .rec, shards (a .tar pattern, a list of .tar addresses, a "
            "manifest.json), an image folder or 'synthetic'",
        ),
    )
    num_classes: int = field(default=93431, metadata=_check(_positive, "an integer > 0"))
    num_image: int = field(default=5179510, metadata=_check(_positive, "an integer > 0"))
    num_workers: int = field(default=2, metadata=_check(_non_negative, "an integer >= 0"))
    data_order: str = field(
        default="auto",
        metadata=_check(
            lambda v: v in ("auto", "sequential", "random"), "'auto', 'sequential' or 'random'"
        ),
    )
    shuffle_buffer: int = field(
        default=8192, metadata=_check(_positive, "an integer > 0 (records per worker)")
    )
    augment: str = field(
        default="flip",
        metadata=_check(lambda v: v in ("none", "flip", "strong"), "'none', 'flip' or 'strong'"),
    )
    # zoom each training image by 1 +- r and shift it by up to r of its side (0: off)
    random_crop: float = field(default=0.0, metadata=_check(lambda v: 0 <= v < 0.5, "in [0, 0.5)"))
    # turn each training image by up to this many degrees either way (0: off)
    random_rotation: float = field(
        default=0.0, metadata=_check(lambda v: 0 <= v <= 45, "degrees in [0, 45]")
    )
    # hide a random rectangle of a training image behind noise with this probability (0: off)
    random_erase: float = field(default=0.0, metadata=_check(lambda v: 0 <= v <= 1, "in [0, 1]"))
    skip_bad_records: bool = False
    val_targets: list[str] = field(default_factory=lambda: ["lfw", "cfp_fp", "agedb_30"])
    # optimisation
    optimizer: str = field(
        default="sgd", metadata=_check(lambda v: v in ("sgd", "adamw"), "'sgd' or 'adamw'")
    )
    lr: float = field(default=0.1, metadata=_check(_positive, "a number > 0"))
    momentum: float = field(default=0.9, metadata=_check(lambda v: 0 <= v < 1, "in [0, 1)"))
    weight_decay: float = field(default=5e-4, metadata=_check(_non_negative, "a number >= 0"))
    # evaluate and save an exponential moving average of the backbone's weights (0: off)
    ema_decay: float = field(default=0.0, metadata=_check(lambda v: 0 <= v < 1, "in [0, 1)"))
    batch_size: int = field(default=128, metadata=_check(_positive, "an integer > 0"))
    gradient_acc: int = field(default=1, metadata=_check(_positive, "an integer > 0"))
    num_epoch: int = field(default=20, metadata=_check(_positive, "an integer > 0"))
    warmup_epoch: float = field(default=0.0, metadata=_check(_non_negative, "a number >= 0"))
    fp16: bool = False
    # 'auto': bf16 where the device computes it natively (a CPU with AVX512-BF16 or AMX, a
    # GPU from Ampere on) unless fp16 is set, else float32
    bf16: bool | str = field(
        default=False,
        metadata=_check(lambda v: isinstance(v, bool) or v == "auto", "true, false or 'auto'"),
    )
    max_grad_norm: float = field(
        default=5.0, metadata=_check(_non_negative, "a number >= 0 (0 disables clipping)")
    )
    max_nonfinite_steps: int = field(
        default=20, metadata=_check(_positive, "an integer > 0 (non-finite losses in a row)")
    )
    seed: int = 2048
    # torch's deterministic algorithms (and cuDNN's): bit-exact repeats on a GPU, slower
    deterministic: bool = False
    # torch.compile the backbone's training call (the head keeps its own chunked kernels);
    # 'auto': where the device can (on a CPU: with a C++ compiler at hand)
    compile: bool | str = field(
        default=False,
        metadata=_check(lambda v: isinstance(v, bool) or v == "auto", "true, false or 'auto'"),
    )
    # run
    output: str | None = None
    resume: bool = False
    verbose: int = field(default=2000, metadata=_check(_positive, "an integer > 0 (steps)"))
    frequent: int = field(default=10, metadata=_check(_positive, "an integer > 0 (steps)"))
    checkpoint_every: int = field(
        default=2000, metadata=_check(_non_negative, "an integer >= 0 (steps; 0: epochs only)")
    )
    keep_checkpoints: int = field(
        default=3, metadata=_check(_non_negative, "an integer >= 0 (0: write no checkpoints)")
    )
    stop_step: int = field(
        default=0, metadata=_check(_non_negative, "an integer >= 0 (0: run the whole schedule)")
    )
    # seconds the loop may train, across resumes (0: off); the LR and its warm-up then follow
    # the elapsed share of it instead of the steps, and epochs run until it is spent
    time_budget: float = field(
        default=0.0,
        metadata={
            **_check(_non_negative, "seconds >= 0"),
            "parse": parse_duration,
            "format": "seconds (2700) or a duration such as '90s', '45m', '2h' or '1h30m'; "
            "0 or '' turns it off",
        },
    )
    # Weights & Biases (arcface_torch's keys; needs `pip install facescale[wandb]`)
    using_wandb: bool = False
    wandb_key: str | None = None  # an API key to log in with; never logged itself
    wandb_entity: str | None = None
    wandb_project: str | None = None
    wandb_resume: bool = False
    suffix_run_name: str | None = None  # appended to the run's name (its start time)
    notes: str = ""
    save_artifacts: bool = False  # upload model.pt as a model artifact at the end

    def schedule(self, world_size: int, batches_per_rank: int | None = None) -> Schedule:
        """Batch sizes and step counts of this config when run on ``world_size`` ranks, whose
        data gives ``batches_per_rank`` batches an epoch (None: as ``num_image`` implies)."""
        return Schedule.of(self, world_size, batches_per_rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"{k:<{width}} : {v!r}" for k, v in self.to_dict().items())

    def save(self, folder: str | Path) -> Path:
        """Write the resolved config as ``config.json`` into ``folder``."""
        path = Path(folder) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


@dataclass(frozen=True)
class Schedule:
    """Derived sizes: an optimizer step consumes ``samples_per_step`` images."""

    world_size: int
    global_batch: int
    samples_per_step: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, cfg: Config, world_size: int, batches_per_rank: int | None = None) -> Schedule:
        global_batch = cfg.batch_size * world_size
        samples_per_step = global_batch * cfg.gradient_acc
        steps_per_epoch = cfg.num_image // samples_per_step
        if steps_per_epoch == 0:
            raise ConfigError(
                f"num_image={cfg.num_image} is smaller than one optimizer step "
                f"(batch_size {cfg.batch_size} x {world_size} ranks x gradient_acc "
                f"{cfg.gradient_acc} = {samples_per_step}); lower batch_size or gradient_acc"
            )
        if batches_per_rank is not None and batches_per_rank // cfg.gradient_acc == 0:
            raise ConfigError(
                f"{cfg.rec}: {batches_per_rank} batches per rank cannot make one optimizer step "
                f"of gradient_acc={cfg.gradient_acc} micro-batches; lower batch_size or "
                "gradient_acc"
            )
        if batches_per_rank is not None and batches_per_rank // cfg.gradient_acc < steps_per_epoch:
            steps_per_epoch = batches_per_rank // cfg.gradient_acc
            log.warning(
                "the data gives %d batches per rank per epoch, fewer than num_image=%d implies; "
                "an epoch is %d optimizer steps",
                batches_per_rank,
                cfg.num_image,
                steps_per_epoch,
            )
        return cls(
            world_size=world_size,
            global_batch=global_batch,
            samples_per_step=samples_per_step,
            steps_per_epoch=steps_per_epoch,
            total_steps=steps_per_epoch * cfg.num_epoch,
            warmup_steps=round(steps_per_epoch * cfg.warmup_epoch),
        )


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


def _field_type(name: str) -> Any:
    return typing.get_type_hints(Config)[name]


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = _describe(args[0]) if args else "value"
        count = f"{len(args)} " if origin is tuple and Ellipsis not in args else ""
        return f"a list of {count}{inner}s"
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(
        tp, "None" if tp is type(None) else str(tp)
    )


def _coerce(tp: Any, value: Any) -> Any:
    """Convert ``value`` to type ``tp`` or raise TypeError; never guess across kinds."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        if origin is tuple and Ellipsis not in args and len(value) != len(args):
            raise TypeError
        items = [v if inner is Any else _coerce(inner, v) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise TypeError
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        if isinstance(value, float) and not value.is_integer():
            raise TypeError
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        if not math.isfinite(value):
            raise TypeError
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError


def _list_items(text: str) -> list[str]:
    """The items of a list written 'a,b', '[a, b]', "['a','b']", '(1,0.5,0)' or '[]'.

    Quotes around an item are dropped; an item cannot itself contain a comma.
    """
    body = text.strip()
    if body[:1] + body[-1:] in ("[]", "()"):
        body = body[1:-1]
    items = [part.strip() for part in body.split(",") if part.strip()]
    return [i[1:-1] if len(i) > 1 and i[0] == i[-1] and i[0] in "'\"" else i for i in items]


def _item_type(tp: Any, index: int) -> Any:
    """The declared type of item ``index`` of a list or tuple type."""
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    return args[min(index, len(args) - 1)] if args else Any


def _parse_text(tp: Any, text: str) -> Any:
    """Read a ``--set`` value typed from the field: 'true', '0.1', 'none', or a list in any
    form :func:`_list_items` reads, each item typed from the field."""
    is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if is_union and text.strip().lower() in ("none", "null"):
        return None
    base = next(a for a in typing.get_args(tp) if a is not type(None)) if is_union else tp
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        items = [_parse_text(_item_type(base, i), t) for i, t in enumerate(_list_items(text))]
        return tuple(items) if origin is tuple else items
    if base is str:
        return text
    if base is bool:
        low = text.strip().lower()
        return {"true": True, "yes": True, "on": True, "1": True}.get(
            low, {"false": False, "no": False, "off": False, "0": False}.get(low, text)
        )
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _allowed(key: str) -> str:
    allowed = FIELDS[key].metadata["allowed"]
    return allowed() if callable(allowed) else allowed


def set_value(cfg: Config, key: str, value: Any, source: str) -> None:
    """Check ``value`` for ``key`` (type and range) and store it; ``source`` names its origin."""
    tp, metadata = _field_type(key), FIELDS[key].metadata
    if "parse" in metadata:
        try:
            typed = metadata["parse"](value)
        except ValueError:
            raise ConfigError(
                f"{source}: {key}={value!r} is not understood; write {metadata['format']}"
            ) from None
    else:
        try:
            typed = _coerce(tp, value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{source}: {key}={value!r} has the wrong type; expected {_describe(tp)}"
            ) from None
    check = metadata.get("check")
    if check is not None and typed is not None and not check(typed):
        raise ConfigError(f"{source}: {key}={typed!r} is out of range; allowed: {_allowed(key)}")
    setattr(cfg, key, typed)


def apply_mapping(cfg: Config, values: Mapping[str, Any], source: str) -> None:
    """Layer a config mapping onto ``cfg``; unknown keys warn, ignored keys say why."""
    for key, value in values.items():
        if key in FIELDS:
            set_value(cfg, key, value, source)
        elif key in IGNORED_KEYS:
            log.info("%s: key %r has no effect: %s", source, key, IGNORED_KEYS[key])
        else:
            log.warning("%s: unknown config key %r is ignored (check its spelling)", source, key)


def shipped_configs_folder() -> Path:
    """The folder of configs installed inside the facescale package, found as package data."""
    folder = importlib.resources.files("facescale") / "configs"
    if not isinstance(folder, Path):
        raise ConfigError(
            f"facescale's shipped configs are at {folder}, not in a folder on disk; "
            "install facescale with pip (which unpacks it) or give a config file's path"
        )
    return folder


def shipped_config_names() -> list[str]:
    """Names of the shipped configs to run; files starting with '_' are shared parts of them."""
    names = (path.stem for path in shipped_configs_folder().glob("*.py"))
    return sorted(name for name in names if not name.startswith("_"))


def resolve_path(name: str | Path) -> Path:
    """Find a config by path, path without '.py', or the name of a shipped config.

    A file at the given path wins over a shipped config of the same name.
    """
    path = Path(name)
    candidates = [path, path.with_name(path.name + ".py")]
    candidates.append(shipped_configs_folder() / f"{path.stem}.py")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config {str(name)!r} not found (tried {', '.join(str(c) for c in candidates)}); "
        f"give a path to a .py file that defines `config`, or a shipped config's name: "
        f"{', '.join(shipped_config_names())}"
    )


def _forget_imports_from(folders: list[Path], before: set[str]) -> None:
    """Drop the modules imported since ``before`` whose top-level package lies directly in
    one of ``folders``, so that the next config file imports its own neighbours, not these."""

    def lies_in_folders(name: str) -> bool:
        top = sys.modules.get(name.partition(".")[0])
        places = [getattr(top, "__file__", None), *(getattr(top, "__path__", None) or [])]
        return any(place is not None and Path(place).parent in folders for place in places)

    for name in [name for name in set(sys.modules) - before if lies_in_folders(name)]:
        del sys.modules[name]


def _read_module(path: Path) -> Mapping[str, Any]:
    """Execute a config file and return its ``config`` mapping.

    The file's folder and that folder's parent are importable while it runs, so both
    ``from base import config`` and arcface_torch's ``from configs.base import config`` work;
    what it imports from them is forgotten afterwards.
    """
    module_name = f"_facescale_config_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    folders = [path.parent.resolve(), path.parent.parent.resolve()]
    before = set(sys.modules)
    sys.path[:0] = [str(folder) for folder in folders]
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ConfigError(f"{path}: failed to execute config file: {err!r}") from err
    finally:
        for folder in folders:
            sys.path.remove(str(folder))
        _forget_imports_from(folders, before)
    values = getattr(module, "config", None)
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}: defines no `config` dict (an EasyDict or dict is expected)")
    return dict(values)


def load_config(name: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then ``base.py`` beside the file (as arcface_torch), the file, then overrides."""
    cfg = Config()
    if name is not None:
        path = resolve_path(name)
        base = path.parent / "base.py"
        if base.is_file() and base.resolve() != path.resolve():
            apply_mapping(cfg, _read_module(base), str(base))
        apply_mapping(cfg, _read_module(path), str(path))
        if cfg.output is None:
            cfg.output = str(Path("work_dirs") / path.stem)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--set {item!r}: expected key=value (a config path goes before --set, "
                "which reads every word after it as a key=value pair)"
            )
        if key not in FIELDS:
            close = [k for k in FIELDS if k.startswith(key[:3])]
            hint = f"; similar keys: {', '.join(close)}" if close else ""
            raise ConfigError(f"--set {item!r}: unknown config key {key!r}{hint}")
        set_value(cfg, key, _parse_text(_field_type(key), text), f"--set {key}")
    if cfg.output is None:
        cfg.output = str(Path("work_dirs") / "default")
    check_combinations(cfg)
    return cfg


def check_combinations(cfg: Config) -> None:
    """Refuse keys that are valid one by one but not together (fp16 with bf16, a loss with
    a margin_list of another shape or with a head that cannot keep its running state)."""
    # imported on first use: they load torch
    from facescale.heads.losses import build_margin
    from facescale.precision import check_exclusive

    check_exclusive(cfg.fp16, cfg.bf16)
    margin = build_margin(cfg.loss, cfg.scale, cfg.margin_list)
    if cfg.head == "data_parallel" and margin.running_state:
        raise ConfigError(
            f"loss={cfg.loss!r} keeps running state over the global batch, which "
            "head='data_parallel' does not; use head='partial_fc'"
        )
