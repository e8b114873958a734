"""Evaluation: verification sets (10-fold), IJB-B/C templates, million-scale TAR@FAR."""

from facescale.eval.align import FaceCrops
from facescale.eval.embedding import embed_batches, l2_normalize
from facescale.eval.ijb import IJBResult, evaluate_ijb, read_ijb_meta, save_roc_plot
from facescale.eval.tar_far import (
    TarAtFar,
    tar_at_far,
    tar_at_far_all_pairs,
    tar_at_far_probe_gallery,
)
from facescale.eval.verification import (
    VerificationResult,
    VerificationSet,
    evaluate_verification,
    load_verification_set,
    verification_metrics,
)
from facescale.face import ARCFACE_TEMPLATE, align_face, similarity_transform

__all__ = [
    "ARCFACE_TEMPLATE",
    "FaceCrops",
    "IJBResult",
    "TarAtFar",
    "VerificationResult",
    "VerificationSet",
    "align_face",
    "embed_batches",
    "evaluate_ijb",
    "evaluate_verification",
    "l2_normalize",
    "load_verification_set",
    "read_ijb_meta",
    "save_roc_plot",
    "similarity_transform",
    "tar_at_far",
    "tar_at_far_all_pairs",
    "tar_at_far_probe_gallery",
    "verification_metrics",
]
