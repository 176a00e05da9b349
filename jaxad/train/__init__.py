"""What the trained methods share: the optimiser loop with resumable orbax checkpoints
(:mod:`~jaxad.train.loop`) and the distillation of a PDN teacher from a pretrained backbone
(:mod:`~jaxad.train.distillation`)."""
