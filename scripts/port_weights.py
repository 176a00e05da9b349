"""Convert a backbone's torchvision/timm weights to jaxad's format once, for every later run.

    python scripts/port_weights.py wide_resnet50_2 --from ~/Downloads/wide_resnet50_2-95faca4d.pth
    python scripts/port_weights.py densenet201      # looks in $TORCH_HOME/hub/checkpoints

Without --from, torchvision's canonical file (e.g. densenet201-c1103571.pth) is looked up in torch's
download cache; a hash prefix in a file's name is checked against its contents. The converted
weights go to $JAXAD_CACHE (default ~/.cache/jaxad) and become NAME's default weights.
"""

from __future__ import annotations

import argparse

from jaxad import backbones, cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"backbone: {', '.join(backbones.names())}")
    parser.add_argument("--from", dest="source", help=".pth or .safetensors file (default: torch's cache)")
    args = parser.parse_args()
    path = backbones.install_weights(args.name, args.source)
    print(f"{args.name}: converted weights saved to {path}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
