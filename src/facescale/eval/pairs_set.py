"""A pairs file (:mod:`facescale.data.pairs_file`) as a verification set, its images prepared
as ``facescale embed`` prepares them (:class:`facescale.eval.align.FaceCrops`: a 112x112 crop
as it is, any other size scaled to cover and centre-cropped; or aligned by found landmarks),
to check a model on photos of one's own without converting them to a ``.bin``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facescale.data.image import read_rgb
from facescale.data.pairs_file import read_pairs_file
from facescale.errors import InputError
from facescale.eval.align import FaceCrops
from facescale.eval.verification import VerificationSet, distinct


def load_pairs_set(path: str | Path, align: bool = False) -> VerificationSet:
    """Decode the images of a pairs file, each once however many pairs it is in, and with
    ``align`` align each face crop by its found landmarks (:mod:`facescale.landmarks`); a
    missing image is an :class:`InputError` naming the file and line."""
    pairs = read_pairs_file(path)
    if not pairs.paths:
        raise InputError(f"{path}: no pairs; each line is 'image_a image_b same(1/0)'")
    for number, pair in zip(pairs.lines, pairs.paths, strict=True):
        for image in pair:
            if not image.is_file():
                raise InputError(f"{path} line {number}: image {image} not found")
    unique, slots = distinct([image for pair in pairs.paths for image in pair])
    if align:  # each image read once: its landmarks found and the face aligned on them
        from facescale.landmarks import FaceAligner

        aligner = FaceAligner()
        images = np.stack([aligner(read_rgb(image)) for image in unique]).transpose(0, 3, 1, 2)
        aligner.finder.report(str(path))
    else:
        crops = FaceCrops(unique)
        images = np.stack([crops[i].numpy() for i in range(len(unique))])
    return VerificationSet(pairs.name, images, pairs.issame, slots)
