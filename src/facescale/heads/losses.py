"""The losses by the names the config uses: the ArcFace family from ``margin_list``, and
AdaFace, MagFace and CurricularFace with their papers' defaults."""

from __future__ import annotations

from collections.abc import Sequence

from facescale.errors import ConfigError

from .adaface import AdaFace
from .curricularface import CurricularFace
from .magface import MagFace
from .margins import ArcFace, CombinedMargin, CosFace, Margin

LOSS_NAMES = ("arcface", "cosface", "combined", "adaface", "magface", "curricularface")


def build_margin(loss: str, scale: float, margin_list: Sequence[float]) -> Margin:
    """The margin of config key ``loss`` at softmax scale ``scale``.

    'combined' is ``cos(m1 * theta + m2) - m3`` with ``margin_list = (m1, m2, m3)``;
    'arcface' and 'cosface' take ``margin_list`` of their shape, ``(1, m, 0)`` and
    ``(1, 0, m)``; the other losses ignore ``margin_list``.
    """
    m1, m2, m3 = margin_list
    if loss == "combined":
        return CombinedMargin(scale, m1, m2, m3)
    if loss == "arcface":
        _require_shape(loss, margin_list, m1 == 1 and m3 == 0, "(1.0, m, 0.0)")
        return ArcFace(scale, m2)
    if loss == "cosface":
        _require_shape(loss, margin_list, m1 == 1 and m2 == 0, "(1.0, 0.0, m)")
        return CosFace(scale, m3)
    if loss == "adaface":
        return AdaFace(scale)
    if loss == "magface":
        return MagFace(scale)
    if loss == "curricularface":
        return CurricularFace(scale)
    raise ConfigError(f"loss={loss!r}: use one of {', '.join(LOSS_NAMES)}")


def _require_shape(loss: str, margin_list: Sequence[float], fits: bool, shape: str) -> None:
    if not fits:
        raise ConfigError(
            f"loss={loss!r} takes margin_list = {shape}, got {tuple(margin_list)}; set "
            "margin_list to that shape, or loss='combined' for any (m1, m2, m3)"
        )
