"""Train the text-to-image part of the zoo (judge, VAE, clean model) and save it under zoo/ in fp16."""
import argparse, logging, time
from pathlib import Path
import torch
from sealdiff.recipes import zoo

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="zoo")
parser.add_argument("--scale", type=float, default=1.0, help="multiply all step counts (0.01 for a smoke run)")
args = parser.parse_args()
torch.set_num_threads(2)
logging.basicConfig(level=logging.INFO)
out = Path(args.out)
t0 = time.time()
judge = zoo.train_judge(zoo.JudgeRecipe(steps=max(40, int(1500 * args.scale))))
judge.save(out / "toy-judge")
print("judge done", time.time() - t0, flush=True)
vae = zoo.train_vae(zoo.VaeRecipe(lr=2e-3, steps=max(40, int(800 * args.scale))))
print("vae done", time.time() - t0, "scaling", vae.config.scaling_factor, flush=True)
recipe = zoo.T2IRecipe(steps=max(40, int(4000 * args.scale)), dataset_size=max(64, int(30000 * min(1, args.scale * 10))))
pipe = zoo.train_t2i(recipe, vae)
pipe.to(torch.float16).save_pretrained(out / "t2i-clean", safe_serialization=True)
print("t2i done", time.time() - t0, flush=True)
