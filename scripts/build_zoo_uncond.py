"""Train the unconditional part of the zoo (clean DDPM / NCSN / LDM, and their backdoored variants) and register
each model in zoo/manifest.json (fp16 safetensors, sha256). One model at a time (--threads, default 1).

    python scripts/build_zoo_uncond.py                     # every model not yet in the zoo
    python scripts/build_zoo_uncond.py --only uncond-ddpm-clean --force
    python scripts/build_zoo_uncond.py --scale 0.01 --out /tmp/zoo   # smoke run
"""
import argparse
import logging
import time
from pathlib import Path

import torch

from sealdiff.models import zoo
from sealdiff.recipes import uncond_zoo

parser = argparse.ArgumentParser()
parser.add_argument("--out", default=str(zoo.zoo_dir()))
parser.add_argument("--scale", type=float, default=1.0, help="multiply all step counts (0.01 for a smoke run)")
parser.add_argument("--only", nargs="*", help="names to build (default: all)")
parser.add_argument("--force", action="store_true", help="rebuild models already in the zoo")
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)
logging.basicConfig(level=logging.INFO, format="%(message)s")
root = Path(args.out)
names = args.only or list(uncond_zoo.ENTRIES)
unknown = [n for n in names if n not in uncond_zoo.ENTRIES]
if unknown:
    raise SystemExit(f"unknown zoo entries {unknown}; valid: {', '.join(uncond_zoo.ENTRIES)}")
for name in names:
    present = (root / zoo.MANIFEST).is_file() and name in zoo.load_manifest(root)["models"]
    if present and not args.force:
        logging.info("%s is in the zoo already (--force rebuilds it)", name)
        continue
    t0 = time.time()
    uncond_zoo.build_entry(uncond_zoo.ENTRIES[name], root, args.scale)
    logging.info("%s built in %.0f s", name, time.time() - t0)
