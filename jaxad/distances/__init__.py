"""Patch distances: how far a query feature lies from what was seen in training."""

from jaxad.distances import crd

__all__ = ["crd"]
