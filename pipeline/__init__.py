"""abpipe: a Ray pipeline for visual pre-training with Annotation Bootstrapping."""

__version__ = "0.1.0"
