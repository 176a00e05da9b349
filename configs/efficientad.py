"""EfficientAD-S with a teacher distilled from the bundled EfficientNet-Lite0.

Teacher: ``teacher`` is a folder from ``scripts/distill_teacher.py`` (see
``configs/distill_teacher.py`` for the paper's WRN101-2 / ImageNet setting). Empty: fit distils a
small teacher on the category's own training images first (``teacher_steps`` steps, target
``backbone`` taps ``taps``), a CPU-budget stand-in for the paper's ImageNet teacher.

Penalty: ``penalty_dir`` is a folder of generic images (the paper: ImageNet) whose student
outputs are pushed towards 0; "none" drops the penalty (the reproduction's default). The choice
is recorded in the state (``penalty``) and in ``train_history.json``. Reports on MVTec LOCO should
say which was used: the reference numbers need the ImageNet penalty.

Schedule: the paper trains 70,000 steps of batch 1 (``--config.train_steps=70000``). The default
is a CPU schedule: at 256 px one step (student forward/backward on the image and its jittered
copy, teacher and autoencoder) takes about 3 s on a 2-core CPU and a stand-in teacher step
(batch 4) about 4.5 s, so the default 40 steps + 20 teacher steps fit a category in about five
minutes; such a model is far from converged. Use an accelerator for real runs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "efficientad"
    c.backbone = "efficientnet_lite0"  # target of the stand-in teacher distillation (unused with `teacher`)
    c.weights = ""  # empty: the bundled or cached weights of `backbone`
    c.taps = ("stage2", "stage4")  # target taps of the stand-in teacher: stride 8 + 16, 152 channels
    c.aggregate = 3  # k×k local average of each target tap
    c.image_size = 256
    c.pdn = "s"  # "s" (EfficientAD-S) or "m"
    c.teacher = ""  # teacher folder from scripts/distill_teacher.py; empty: distil on the training images
    c.teacher_steps = 20  # stand-in teacher: optimiser steps (paper teacher: 60,000 on ImageNet)
    c.teacher_batch_size = 4
    c.teacher_projection = "random"  # 152 → 384 channels: "random" (fixed Gaussian) or "pool"
    c.penalty_dir = "none"  # folder of generic images for the penalty loss, or "none"
    c.train_steps = 40  # optimiser steps (paper: 70,000); lr ×0.1 at 95 %
    c.train_batch_size = 1
    c.lr = 1e-4
    c.weight_decay = 1e-5  # coupled L2 (torch Adam weight_decay)
    c.hard_quantile = 0.999
    c.q_a = 0.9  # map normalisation quantiles on the validation split
    c.q_b = 0.995
    c.val_fraction = 0.1  # held out from the training images for the map quantiles
    c.checkpoint_every = 1000
    c.log_every = 10
    c.batch_size = 16  # images per prediction batch
    c.seed = 0
    c.num_overlays = 16
    return c
