"""CPR-Faster: cascade patch retrieval with an EfficientNet backbone and 16-wide local descriptors.

The bundled EfficientNet-Lite0 has the stages of the reference code's torchvision EfficientNet-B0
taps (``features.2`` = stage1: stride 4, 24 ch; ``features.3`` = stage2: stride 8, 40 ch).
Variants of one config: ``configs/cpr.py`` (width 384, DenseNet201 in the paper) and
``configs/cpr_fast.py`` (width 64) change only ``lrb_width`` (and ``search_chunk`` for CPR).

Categories: objects keep ``use_feb=True``; for textures pass ``--config.texture=true
--config.use_feb=false`` (always texture sources, remote negatives weighted 0, paper: 500 steps).
Scales: the paper's stride-4 and stride-8 maps. Defects much larger than a few feature cells (the
magnetic tile's ``uneven`` regions and frays) are better seen one stage deeper:
``--config.taps="('stage2','stage4')"`` (strides 8 and 16; BENCHMARKS.md, cpr-magnetic_tile-cpu).
``aggregate`` (not in the paper) averages each backbone cell with its k×k in-image neighbours
before every branch. On magnetic tile it raises the untrained cascade's pixel AP a lot and the
trained one's a little, at some cost in image AUROC (BENCHMARKS.md, cpr-magnetic_tile-aggregate-cpu).

Schedule. The paper trains 40,000 steps × 32 pairs for objects and 500 steps for textures:
``--config.train_steps=40000 --config.train_batch_size=32 --config.validate_every=1000``.
The default is a reduced CPU schedule: 400 steps × 8 pairs at 320 px, validated every 50 steps,
about 18 minutes of fitting on 2 CPU cores for MVTec bottle (BENCHMARKS.md, section
cpr-mvtec_bottle-cpu, gives the measured fit time). It is the shortest schedule tried at which the trained local branch
beats raw backbone features there; at 60 steps it did not. Model selection on a held-out 10 % of
the TRAINING images with fixed synthetic anomalies (pixel AUROC of the local scores), never the
test set. For a quick smoke run: ``--config.train_steps=20 --config.validate_every=10``.

Ablations: ``use_grb`` (False: search all training images), ``use_lrb`` (False: raw backbone
features, no training), ``use_feb``, ``multi_scale`` (False: stride-4 scale only),
``remote_weighting`` (False: remote negatives weighted 1).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "cpr"
    c.backbone = "efficientnet_lite0"
    c.weights = ""  # empty: the bundled or cached weights of `backbone`; else a .pth/.safetensors path
    c.taps = ("stage1", "stage2")  # stride 4 (GRB, FEB, fine search) and stride 8
    c.windows = (3, 1)  # r×r search window per tap
    c.aggregate = 1  # k×k in-image mean of the backbone maps before every branch (1: the paper)
    c.image_size = 320
    c.lrb_width = 16  # CPR 384, CPR-Fast 64, CPR-Faster 16
    # ablation switches
    c.use_grb = True
    c.use_lrb = True
    c.use_feb = True  # objects; off for textures
    c.multi_scale = True
    c.remote_weighting = True
    c.texture = False  # texture category: texture sources only, remote weight 0
    # global retrieval branch
    c.clusters = 12
    c.kmeans_samples = 50_000
    c.kmeans_restarts = 10
    c.blocks = 5  # S×S blocks of the histogram grid
    c.drop_blocks = 5  # τ largest block divergences dropped
    c.top_k = 10
    c.exclude_self = True  # a training image used as query does not retrieve itself
    # foreground estimation branch
    c.foreground_classifier = "lda"  # 'lda' (reference code) | 'logistic' (optax-trained 1×1 conv)
    c.foreground_samples = 15_000  # per class
    c.foreground_steps = 300  # Adam steps of the logistic alternative
    # local branch training
    c.train_steps = 400
    c.train_batch_size = 8
    c.pairs_per_type = 300  # Γ
    c.remote_distance = 5.656854  # θ = 4√2 px at 320 px (scaled with the image)
    c.margin_pos = 0.8
    c.margin_neg = -0.2
    c.power = 3.0
    c.learning_rate = 1e-3
    c.weight_decay = 1e-2
    c.p_anomaly = 0.9
    c.p_texture = 0.5
    c.p_augment = 0.3
    c.texture_dir = ""  # folder of texture images (e.g. DTD); empty: built-in procedural textures
    c.max_textures = 256  # images read from texture_dir
    c.procedural_textures = 64  # textures generated when texture_dir is empty
    c.val_fraction = 0.1
    c.val_refs = 3  # references per validation query
    c.validate_every = 50
    c.select = "best"  # 'best' (validation pixel AUROC) | 'last'
    c.checkpoint_every = 100
    # inference
    c.search_chunk = 2  # references per step of the windowed search (memory vs speed)
    c.blur_sigma = 4.0
    c.top_pixels = 512  # image score = sum of the top T map values
    c.batch_size = 16
    c.seed = 0
    c.num_overlays = 16
    return c
