"""SimpleNet with the bundled EfficientNet-Lite0: feature adaptor + noise-trained discriminator.

Embedding: ``'average'`` (jaxad's PatchCore embedding: 3×3 local mean, resize, concat) or
``'unfold'`` (the reference code: flattened 3×3×C neighbourhoods), channels adaptively
average-pooled to ``target_dim`` — 1536 in the paper with WRN50; with stage2 + stage4 of
EfficientNet-Lite0 the taps have only 152 channels, and the smaller size is used.

Schedule. The paper (reference code) trains 40 meta-epochs × 4 epochs = 160 passes over the
training set in batches of 8, e.g. for MVTec bottle (209 images, 188 after the 10 % hold-out,
23 steps per epoch): ``--config.train_steps=3680 --config.validate_every=92`` (one validation per
meta-epoch). The default below is a reduced CPU schedule (about 1-2 minutes of training on
2 cores for ~200 images at 256 px, with hidden_dim 1024).

Noise. The paper's σ = 0.015 is in units of WRN50 features. EfficientNet-Lite0's stage2/stage4
outputs (no ReLU at block outputs) are spread far wider: per-channel std 2-5, smallest principal
std ~0.3 on the synthetic gear images, so 0.015 noise hides inside the normal spread: with it the discriminator never left the
chance-level loss of 1.0, even over the full paper schedule (3520 steps, 200 synthetic gear
images, image AUROC 0.89 from an untrained D). σ = 0.3 learned in ~500 steps and σ = 1.0 in
~200 (image / pixel AUROC 0.999-1.0 / 0.993 on synthetic gear, paper schedule or the default
one); 1.0 is the default, chosen on the synthetic development data only.

Model selection never looks at the test set: ``val_fraction`` of the training images is held out
and ``select='best'`` keeps the heads with the lowest validation hinge loss (held-out normal
patches vs the same plus a fixed noise draw); ``select='last'`` keeps the final heads. Both
values are recorded in ``train_history.json`` and in the state's ``validation`` entry.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "simplenet"
    c.backbone = "efficientnet_lite0"
    c.weights = ""  # empty: the bundled or cached weights of `backbone`; else a .pth/.safetensors path
    c.taps = ("stage2", "stage4")  # stride 8 (40 ch) and stride 16 (112 ch): d = 152
    c.aggregate = 3  # neighbourhood size k of the k×k local mean / unfold
    c.embedding = "average"  # 'average' | 'unfold' (reference code)
    c.target_dim = 1536  # channels after adaptive average pooling; capped at the taps' total
    c.image_size = 256
    c.hidden_dim = 1024  # discriminator hidden width
    c.noise_std = 1.0  # σ of the anomalous-feature noise; the paper's 0.015 is for WRN50 (see above)
    c.margin = 0.5  # th of the truncated hinge loss
    c.dsc_lr = 2e-4  # discriminator: Adam, coupled L2 weight decay
    c.dsc_weight_decay = 1e-5
    c.adaptor_lr = 1e-4  # adaptor: AdamW, decoupled weight decay
    c.adaptor_weight_decay = 0.01
    c.train_batch_size = 8  # images per optimiser step (all their patches)
    c.train_steps = 200
    c.validate_every = 25
    c.checkpoint_every = 100
    c.val_fraction = 0.1
    c.select = "best"  # 'best' (lowest validation loss) | 'last'
    c.blur_sigma = 4.0
    c.batch_size = 16  # images per feature-extraction / prediction batch
    c.seed = 0
    c.num_overlays = 16
    return c
