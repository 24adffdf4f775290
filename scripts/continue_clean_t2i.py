"""Train the clean text-to-image model's third stage (`recipes.zoo.CLEAN_STAGE3`) from a pipeline, as the committed
`t2i-clean` was made: from the previous zoo model's fp16 weights and its VAE, 2 threads (about 25 minutes).

    python scripts/continue_clean_t2i.py zoo:t2i-clean OUT_DIR

`sealdiff zoo build` runs the same stage after the first two (from freshly trained weights).
"""

from __future__ import annotations

import argparse
import time

import torch

from sealdiff.cli import quiet_libraries
from sealdiff.models.loading import load_t2i
from sealdiff.recipes.zoo import CLEAN_STAGE3, train_t2i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base", help="the pipeline to continue (directory or zoo:NAME)")
    parser.add_argument("output", help="directory of the continued pipeline (fp16 safetensors)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    start = time.time()
    base = load_t2i(args.base)
    pipe = train_t2i(CLEAN_STAGE3, base.vae, init=base)
    pipe.to(torch.float16).save_pretrained(args.output, safe_serialization=True)
    print(f"wrote {args.output} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
