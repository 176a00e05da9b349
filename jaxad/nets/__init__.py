"""Small trainable networks that methods train from scratch (not pretrained feature extractors)."""

from jaxad.nets.pdn import PDN, Autoencoder, imagenet_normalise, pdn_m, pdn_s, pdn_output_size

__all__ = ["PDN", "Autoencoder", "imagenet_normalise", "pdn_m", "pdn_s", "pdn_output_size"]
