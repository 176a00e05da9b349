"""Parts of CPR (cascade patch retrieval), composed by :mod:`jaxad.methods.cpr`.

- :mod:`~jaxad.cpr.retrieval`: global retrieval branch (k-means codebook, block bag-of-words
  histograms, robust KL, top-K training images).
- :mod:`~jaxad.cpr.local`: local retrieval branch (the modified inception block) and the windowed
  cosine search against the retrieved reference maps.
- :mod:`~jaxad.cpr.foreground`: foreground estimation (2-means pseudo-labels, linear discriminant).
- :mod:`~jaxad.cpr.anomalies`: synthetic anomalies (Perlin masks, procedural textures, tile shuffles).
- :mod:`~jaxad.cpr.train`: contrastive training of the local branch on synthetic pairs.
"""
