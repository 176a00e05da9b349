"""EfficientAD-S with the frozen pretrained EfficientNet-Lite0 as its teacher, on a CPU schedule.

Teacher: ``teacher`` is "backbone" (default: the pretrained ``backbone``'s taps ``taps``, k×k
averaged with ``aggregate``, resized to the student's grid and standardised per channel on the
training images; the student and autoencoder get its channel count, 152 for Lite0 stage2+stage4),
a folder from ``scripts/distill_teacher.py`` (a distilled PDN, the paper's teacher; see
``configs/distill_teacher.py``), or "distil" (a PDN distilled during fit for ``teacher_steps``
steps: plumbing for tests, not a teacher).

Penalty: ``penalty_dir`` is a folder of generic images (the paper: ImageNet) whose student
outputs are pushed towards 0; "none" drops the penalty (the reproduction's default). The choice
is recorded in the state (``penalty``) and in ``train_history.json``. Reports on MVTec LOCO should
say which was used: the reference numbers need the ImageNet penalty.

Schedule: the paper trains 70,000 steps of batch 1 at 256 px (``--config.train_steps=70000
--config.image_size=256``). The default 128 px, 400 steps, lr 3e-4 is a CPU schedule chosen on the
validation curve of bottle (held-out training images with synthetic anomalies, never the test set):
best validation image + pixel AUROC, ties to the cheaper, over 128 px × lr {1e-4, 3e-4} × every
100th of 600 steps (section ``efficientad-schedule-bottle-cpu`` of BENCHMARKS.md)::

    python scripts/bench.py --method efficientad --data-root ../shared/data/mvtec_bottle \
        --schedule image_size=128 lr=1e-4,3e-4 --steps 600 --validate-every 100 \
        --section efficientad-schedule-bottle-cpu

The 400 steps were read off a 600-step run, whose lr drop (×0.1 at 95 %) had not yet come.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "efficientad"
    c.backbone = "efficientnet_lite0"  # the teacher (teacher="backbone") or the distillation target
    c.weights = ""  # empty: the bundled or cached weights of `backbone`
    c.taps = ("stage2", "stage4")  # stride 8 + 16, 152 channels
    c.aggregate = 3  # k×k local average of each tap
    c.image_size = 128
    c.pdn = "s"  # student architecture: "xs" (a quarter of PDN-S's widths), "s" (EfficientAD-S) or "m"
    c.teacher = "backbone"  # "backbone", a folder from scripts/distill_teacher.py, or "distil"
    c.teacher_steps = 20  # teacher="distil" only: optimiser steps
    c.teacher_batch_size = 4  # teacher="distil" only
    c.teacher_projection = "random"  # teacher="distil" only: 152 → 384 channels, "random" or "pool"
    c.penalty_dir = "none"  # folder of generic images for the penalty loss, or "none"
    c.train_steps = 400  # optimiser steps (paper: 70,000); lr ×0.1 at 95 %
    c.train_batch_size = 1
    c.lr = 3e-4
    c.weight_decay = 1e-5  # coupled L2 (torch Adam weight_decay)
    c.hard_quantile = 0.999
    c.q_a = 0.9  # map normalisation quantiles on the validation split
    c.q_b = 0.995
    c.val_fraction = 0.1  # held out from the training images: validation curve and map quantiles
    c.validate_every = 100  # steps between validation AUROCs (synthetic anomalies on the held-out images)
    c.checkpoint_every = 1000
    c.batch_size = 16  # images per prediction batch
    c.seed = 0
    c.num_overlays = 16
    return c
