"""Distil an EfficientAD teacher PDN from a backbone on a folder of images.

    python scripts/distill_teacher.py --config.data=DIR[,DIR...] [--config.out=TEACHER] [--config.KEY=VALUE ...]

Writes the TEACHER folder (PDN parameters + target normalisation), to be used as
``python scripts/fit.py --method efficientad --config.teacher=TEACHER``. Interrupted runs resume
from the checkpoints in ``workdir`` (default TEACHER/train). See configs/distill_teacher.py for the
paper's setting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxad import backbones, cli
from jaxad.config import apply_overrides, load_config
from jaxad.data import image_files
from jaxad.errors import ConfigError
from jaxad.train import distillation, loop

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    argv, overrides = cli.split_overrides(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", dest="config_file", type=Path, default=ROOT / "configs" / "distill_teacher.py")
    args = parser.parse_args(argv)
    config = apply_overrides(load_config(args.config_file), overrides)
    if not config.data:
        raise ConfigError("--config.data: give the folder (or comma-separated folders) of images to distil on")
    settings = distillation.Settings(
        pdn=config.pdn, backbone=config.backbone, taps=tuple(config.taps), aggregate=config.aggregate,
        projection=config.projection, image_size=config.image_size, target_size=config.target_size,
        steps=config.steps, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
        grayscale=config.grayscale, stats_images=config.stats_images, seed=config.seed)
    out = Path(config.out)
    distillation.check_new_teacher_folder(out)
    paths = [p for folder in config.data.split(",") if folder.strip() for p in image_files(folder.strip())]
    side = max(config.image_size, config.target_size)
    backbone = backbones.load(config.backbone, config.weights or None, taps=config.taps)
    teacher = distillation.distil(
        settings, backbone, distillation.file_batches(paths, config.batch_size, side, config.seed),
        stats_batches=distillation.file_batches(paths, config.batch_size, side, config.seed + 1),
        checkpoint_dir=Path(config.workdir) if config.workdir else out / "train",
        checkpoint_every=config.checkpoint_every, run=loop.run_identity(config.to_dict(), ("steps",)))
    path = distillation.save_teacher(out, settings, teacher)
    print(f"teacher written to {path} ({len(paths)} images, {config.steps} steps)")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
