"""Optional extras (``pip install "facescale[NAME]"``): whether their packages are installed
here, and the one error that names the extra to install, raised before a command starts its
work."""

from __future__ import annotations

import importlib.util

from facescale.errors import UserError

# Extra -> what it enables, and its packages as {distribution name: module name}; the
# distribution names are those of pyproject.toml's optional-dependencies.
EXTRAS: dict[str, tuple[str, dict[str, str]]] = {
    "onnx": (
        "ONNX export",
        {
            "onnx": "onnx",
            "onnxruntime": "onnxruntime",
            "onnxscript": "onnxscript",
            "onnxconverter-common": "onnxconverter_common",
        },
    ),
    "shards": (
        "reading WebDataset shards by URL or brace pattern",
        {"fsspec": "fsspec", "aiohttp": "aiohttp", "braceexpand": "braceexpand"},
    ),
    "wandb": ("logging to Weights & Biases (using_wandb=True)", {"wandb": "wandb"}),
    "align": ("face alignment (--align)", {"mtcnn": "mtcnn", "joblib": "joblib", "lz4": "lz4"}),
}


def missing(extra: str, *modules: str) -> list[str]:
    """The modules of ``extra`` (all of them, or just ``modules``) that are not installed; found
    without importing them (``mtcnn`` would import TensorFlow, which facescale does not need)."""
    _, packages = EXTRAS[extra]
    wanted = modules or tuple(packages.values())
    unknown = set(wanted) - set(packages.values())
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not packages of the {extra!r} extra")
    return [module for module in wanted if importlib.util.find_spec(module) is None]


def available(extra: str, *modules: str) -> bool:
    """Whether every module of ``extra`` (or just ``modules``) is installed."""
    return not missing(extra, *modules)


def install_hint(extra: str, *modules: str) -> str:
    """What is missing for ``extra`` and the command that installs it; empty when nothing is."""
    absent = missing(extra, *modules)
    if not absent:
        return ""
    purpose, _ = EXTRAS[extra]
    return (
        f"{purpose} needs {', '.join(absent)}, from the optional extra {extra!r}; "
        f'install it with: pip install "facescale[{extra}]"'
    )


def require(extra: str, *modules: str) -> None:
    """Raise a ``UserError`` naming the extra to install unless ``modules`` of ``extra`` (all
    of them when none are named) are installed."""
    hint = install_hint(extra, *modules)
    if hint:
        raise UserError(hint)
