"""facescale: train ArcFace-family face-recognition models on millions of identities."""

__version__ = "0.1.0"
