"""Patch distances: how far a query feature lies from what was seen in training.

Memory-free: :mod:`~jaxad.distances.crd` (collaborative representation), :mod:`~jaxad.distances.mahalanobis`
(Gaussians). With a memory bank: :mod:`~jaxad.distances.knn` (exact nearest neighbour),
:mod:`~jaxad.distances.coreset` (greedy subsampling of the bank), :mod:`~jaxad.distances.windowed`
(CPR's windowed cosine search). Between whole images: :mod:`~jaxad.distances.matching`
(feature-matching counts)."""

from jaxad.distances import crd

__all__ = ["crd"]
