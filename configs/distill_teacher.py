"""Teacher distillation for EfficientAD / PUAD (scripts/distill_teacher.py).

Default: a PDN-S regresses the PatchCore-style embedding of the bundled EfficientNet-Lite0
(stage2 + stage4, 3×3 local average, 152 channels mapped to 384 by a fixed random projection) on
the images of ``data`` (any folders, searched recursively). On a CPU keep ``steps`` small; the
result is a stand-in, not the paper's teacher.

The paper's setting (run it on an accelerator; bring the WRN101-2 weights once with
``python scripts/port_weights.py wide_resnet101_2 --from wide_resnet101_2-32ee1156.pth``):

    python scripts/distill_teacher.py --config.data=/path/to/imagenet/train \\
        --config.backbone=wide_resnet101_2 --config.taps="('layer2','layer3')" \\
        --config.projection=pool --config.target_size=512 --config.steps=60000 \\
        --config.batch_size=16 --config.out=teachers/wrn101_pdn_s

(layer2 + layer3 = 1536 channels, average-pooled to 384 as PUAD's code does; 512-px backbone input
gives layer2's 64×64 grid, the padded PDN's output at 256 px.) Use ``--config.pdn=m`` for PDN-M.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = ""  # folder of images (recursive), or several separated by commas; required
    c.out = "teachers/lite0_pdn_s"  # teacher folder written (pass it as --config.teacher to efficientad/puad)
    c.workdir = ""  # checkpoints for resuming; empty: <out>/train
    c.pdn = "s"
    c.backbone = "efficientnet_lite0"
    c.weights = ""
    c.taps = ("stage2", "stage4")
    c.aggregate = 3
    c.projection = "random"  # "pool" (adaptive channel average) or "random"
    c.image_size = 256  # PDN input
    c.target_size = 256  # backbone input (paper: 512)
    c.steps = 200  # paper: 60,000
    c.batch_size = 16
    c.lr = 1e-4
    c.weight_decay = 1e-5
    c.grayscale = 0.1
    c.stats_images = 1000  # images for the target's per-channel mean/std (reference: 10,000)
    c.checkpoint_every = 500
    c.seed = 0
    return c
