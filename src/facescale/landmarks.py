"""Five landmarks of a face crop, found by MTCNN's output network, to align unaligned photos.

The output network (ONet) of MTCNN (Zhang et al., 2016) takes a 48x48 view of a face and
returns a face score, a correction of the view's box and the five landmarks that
:func:`facescale.face.align_face` warps to the ArcFace template. Its trained weights come
from the ``mtcnn`` package (MIT licence; the ``align`` extra), read as arrays without
importing that package, which would need TensorFlow. The images are face crops, one face
filling most of the image, as a detector or a photo editor leaves them: the first view is
the image's centred square, and a second view is taken on the box the first one corrects.
Whole photos with small or many faces need a face detector first.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from facescale.data.image import read_rgb
from facescale.extras import require
from facescale.face import align_face

log = logging.getLogger("facescale.landmarks")

VIEW = 48  # the output network's input side, in pixels
VIEWS = 2  # the centred square, then the box it corrects
LOW_SCORE = 0.5  # below this face score the landmarks are a guess on something unlike a face


@dataclass(frozen=True)
class Landmarks:
    """Five (x, y) points ``[5, 2]`` in image pixels (left eye, right eye, nose tip, left and
    right mouth corner) and the network's face score in [0, 1]."""

    points: np.ndarray
    score: float


def weights_path() -> Path:
    """The output network's weights file in the installed ``mtcnn`` package."""
    require("align")
    spec = importlib.util.find_spec("mtcnn")
    assert spec is not None and spec.submodule_search_locations  # require() found it
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "weights" / "onet.lz4"


class OutputNet(nn.Module):
    """MTCNN's ONet: four convolutions with PReLU and max pooling, a 256-unit layer, and three
    heads (box correction, landmarks, face score)."""

    def __init__(self) -> None:
        super().__init__()
        widths = [3, 32, 64, 64, 128]
        kernels = [3, 3, 3, 2]
        self.convs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], kernels[i]) for i in range(4)
        )
        self.acts = nn.ModuleList(nn.PReLU(w) for w in widths[1:])
        self.hidden = nn.Linear(128 * 3 * 3, 256)
        self.hidden_act = nn.PReLU(256)
        self.box = nn.Linear(256, 4)
        self.points = nn.Linear(256, 10)
        self.face = nn.Linear(256, 2)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[N, 3, 48, 48]`` views scaled to [-1, 1] -> box corrections ``[N, 4]`` (x1, y1, x2,
        y2 as fractions of the side), points ``[N, 10]`` (five x, then five y, as fractions)
        and face scores ``[N]``."""
        x = views
        pools = [(3, True), (3, False), (2, True), None]  # (size, ceil) of each stride-2 pool
        for conv, act, pool in zip(self.convs, self.acts, pools, strict=True):
            x = act(conv(x))
            if pool is not None:
                x = F.max_pool2d(x, pool[0], 2, ceil_mode=pool[1])
        # The weights were trained on transposed images: flatten in (width, height, channel) order.
        x = self.hidden_act(self.hidden(x.permute(0, 3, 2, 1).flatten(1)))
        return self.box(x), self.points(x), self.face(x).softmax(dim=1)[:, 1]


def load_output_net() -> OutputNet:
    """The output network with the ``mtcnn`` package's trained weights (Keras layout: kernels
    ``[kh, kw, in, out]``, dense ``[in, out]``)."""
    import joblib

    stored = joblib.load(weights_path())
    arrays = [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in stored]
    net = OutputNet()
    convs = [arrays[3 * i : 3 * i + 3] for i in range(4)]
    for conv, act, (kernel, bias, slope) in zip(net.convs, net.acts, convs, strict=True):
        conv.weight.data.copy_(kernel.permute(3, 2, 0, 1))
        conv.bias.data.copy_(bias)
        act.weight.data.copy_(slope.reshape(-1))
    dense = [(net.hidden, 12), (net.box, 15), (net.points, 17), (net.face, 19)]
    for layer, at in dense:
        layer.weight.data.copy_(arrays[at].T)
        layer.bias.data.copy_(arrays[at + 1])
    net.hidden_act.weight.data.copy_(arrays[14])
    return net.eval()


def _square(box: np.ndarray) -> np.ndarray:
    """The square of a box's longer side around its centre, ``[x1, y1, x2, y2]``."""
    centre = (box[:2] + box[2:]) / 2
    half = (box[2:] - box[:2]).max() / 2
    return np.concatenate([centre - half, centre + half])


def _view(image: np.ndarray, box: np.ndarray) -> torch.Tensor:
    """The box of an HxWx3 uint8 image as a 48x48 view scaled to [-1, 1], black outside."""
    patch = Image.fromarray(image).transform(
        (VIEW, VIEW), Image.Transform.EXTENT, tuple(box), resample=Image.Resampling.BILINEAR
    )
    pixels = torch.from_numpy(np.asarray(patch, dtype=np.float32)).permute(2, 0, 1)
    return (pixels - 127.5) / 128


class LandmarkFinder:
    """Landmarks of face crops (module docstring), by one network loaded once; counts the crops
    it scores low as faces, to say so once at the end."""

    def __init__(self) -> None:
        self.net = load_output_net()
        self.found = 0
        self.low_scores = 0

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Landmarks:
        """The landmarks of an HxWx3 uint8 RGB face crop."""
        height, width = image.shape[:2]
        box = _square(np.array([0.0, 0.0, width, height]))
        for _ in range(VIEWS):
            shift, points, score = (t[0].numpy() for t in self.net(_view(image, box)[None]))
            side = box[2] - box[0]
            found = np.stack([box[0] + points[:5] * side, box[1] + points[5:] * side], axis=1)
            found -= 0.5  # the view's pixel edges are at integers; align_face wants centres
            box = _square(box + shift * side)
        self.found += 1
        self.low_scores += float(score) < LOW_SCORE
        return Landmarks(found.astype(np.float64), float(score))

    def report(self, where: str) -> None:
        """Warn once when some of the crops seen so far scored low as faces."""
        if self.low_scores:
            log.warning(
                "%s: %d of %d images scored below %.1f as faces; each was aligned all the "
                "same by its best-guess landmarks (a profile or a crop with a small face "
                "scores low): look at them if the count is large",
                where,
                self.low_scores,
                self.found,
                LOW_SCORE,
            )


def find_landmarks(paths: Sequence[Path], where: str) -> np.ndarray:
    """``[N, 5, 2]`` landmarks of the face crops in image files, for
    :class:`facescale.eval.align.FaceCrops`; ``where`` names them in the warning of low scores."""
    finder = LandmarkFinder()
    points = np.stack([finder(read_rgb(path)).points for path in paths])
    finder.report(where)
    return points


class FaceAligner:
    """An image to its 112x112 face aligned by its found landmarks, for the converters."""

    def __init__(self) -> None:
        self.finder = LandmarkFinder()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return align_face(image, self.finder(image).points)
