"""Small trainable networks that methods train from scratch (not pretrained feature extractors):
EfficientAD's PDN and autoencoder (:mod:`~jaxad.nets.pdn`), CPR's local retrieval branch
(:mod:`~jaxad.nets.cpr_local`), SimpleNet's adaptor and discriminator (:mod:`~jaxad.nets.simplenet`)."""

from jaxad.nets.pdn import (
    PDN,
    PDN_SIZES,
    Autoencoder,
    imagenet_normalise,
    pdn_m,
    pdn_output_size,
    pdn_s,
)

__all__ = ["PDN", "PDN_SIZES", "Autoencoder", "imagenet_normalise", "pdn_m", "pdn_s", "pdn_output_size"]
