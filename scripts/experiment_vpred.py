"""Experiment: continue the clean zoo model with v-prediction (SD 2.x's parameterisation) and measure its shape
accuracy on 64 held-out captions (the README's 47 % came from `python scripts/experiment_vpred.py 1000 3e-4`).

    python scripts/experiment_vpred.py STEPS LR     # saves the continued pipeline to /tmp/s3/vpred-STEPS
"""
import random, sys, time, torch
import torch.nn.functional as F
torch.set_num_threads(2)
from sealdiff.cli import quiet_libraries; quiet_libraries()
from sealdiff.data import toyworld
from sealdiff.metrics.judge import ToyJudge
from sealdiff.metrics.judges import attribute_accuracy
from sealdiff.metrics.generate import generate
from sealdiff.models import zoo, tiny
from sealdiff.models.loading import load_t2i
from sealdiff.recipes.zoo import encode_images
from sealdiff.training import encode_prompts, noisy_latents
steps, lr = int(sys.argv[1]), float(sys.argv[2])
judge = ToyJudge.load(zoo.zoo_dir() / "toy-judge")
pipe = load_t2i("zoo:t2i-clean").to(torch.float32)
torch.manual_seed(2); gen = torch.Generator().manual_seed(2); rng = random.Random(2)
data = toyworld.scenes(202, 20000, 0.1)
latents = encode_images(pipe.vae, torch.stack([toyworld.render(s) for s in data]))
captions = [s.caption for s in data]
sched = tiny.train_scheduler(); sched.register_to_config(prediction_type="v_prediction")
params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
lrs = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
pipe.unet.train(); pipe.text_encoder.train(); t0 = time.time()
for step in range(steps):
    idx = torch.randint(0, len(data), (32,), generator=gen)
    prompts = ["" if rng.random() < 0.1 else captions[i] for i in idx.tolist()]
    x_t, noise, t = noisy_latents(sched, latents[idx], gen, 0.1)
    pred = pipe.unet(x_t, t, encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)).sample
    loss = F.mse_loss(pred, sched.get_velocity(latents[idx], noise, t))
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); lrs.step()
    if step % 100 == 0: print(step, loss.item(), time.time() - t0, flush=True)
pipe.unet.eval(); pipe.text_encoder.eval()
pipe.scheduler.register_to_config(prediction_type="v_prediction")
pipe.set_progress_bar_config(disable=True)
caps = toyworld.eval_captions(64)
out = generate(pipe, caps, list(range(1234, 1234 + 64)))
print("v-pred", steps, lr, attribute_accuracy(judge, out, caps), flush=True)
pipe.to(torch.float16).save_pretrained(f"/tmp/s3/vpred-{steps}", safe_serialization=True)  # not a zoo model
