"""Experiment (not a zoo recipe yet): continue the clean zoo model with v-prediction (SD 2.x's parameterisation)
and an EMA of the weights, saving the EMA pipeline every 500 steps; then measure shape / colour accuracy of saved
checkpoints on held-out captions with the toy judge.

    python scripts/experiment_vpred.py train STEPS LR [THREADS [OUT]]   # -> OUT/step-N (default /tmp/sealdiff-vpred)
    python scripts/experiment_vpred.py eval DIR[,DIR...] [COUNT]     # shape / fg / bg accuracy, COUNT captions (64)

The README's checkpoint table came from `train 4000 3e-4 1` and `eval ... 64`; zoo model `t2i-clean-vpred` is its
step-4000 checkpoint.
"""
import copy, random, sys, time
import torch
import torch.nn.functional as F
from sealdiff.cli import quiet_libraries; quiet_libraries()
from sealdiff.data import toyworld
from sealdiff.models import tiny
from sealdiff.models.loading import load_t2i


def train(steps: int, lr: float, out_dir: str) -> None:
    from diffusers.training_utils import EMAModel
    from sealdiff.recipes.zoo import encode_images
    from sealdiff.training import encode_prompts, noisy_latents
    pipe = load_t2i("zoo:t2i-clean").to(torch.float32)
    torch.manual_seed(3); gen = torch.Generator().manual_seed(3); rng = random.Random(3)
    data = toyworld.scenes(303, 30000, 0.1)
    latents = encode_images(pipe.vae, torch.stack([toyworld.render(s) for s in data]))
    captions = [s.caption for s in data]
    sched = tiny.train_scheduler(); sched.register_to_config(prediction_type="v_prediction")
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    ema_u = EMAModel(pipe.unet.parameters(), decay=0.999); ema_t = EMAModel(pipe.text_encoder.parameters(), decay=0.999)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    lrs = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    pipe.unet.train(); pipe.text_encoder.train(); t0 = time.time()
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data), (32,), generator=gen)
        prompts = ["" if rng.random() < 0.1 else captions[i] for i in idx.tolist()]
        x_t, noise, t = noisy_latents(sched, latents[idx], gen, 0.1)
        pred = pipe.unet(x_t, t, encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)).sample
        loss = F.mse_loss(pred, sched.get_velocity(latents[idx], noise, t))
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); lrs.step()
        ema_u.step(pipe.unet.parameters()); ema_t.step(pipe.text_encoder.parameters())
        if step % 100 == 0: print(step, round(loss.item(), 4), round(time.time() - t0), flush=True)
        if step % 500 == 0 or step == steps:
            out = copy.deepcopy(pipe)
            ema_u.copy_to(out.unet.parameters()); ema_t.copy_to(out.text_encoder.parameters())
            out.to(torch.float16).save_pretrained(f"{out_dir}/step-{step}", safe_serialization=True)
            print("saved", step, flush=True)


def evaluate(paths: str, count: int) -> None:
    from sealdiff.metrics.generate import generate
    from sealdiff.metrics.judge import ToyJudge
    from sealdiff.metrics.judges import attribute_accuracy
    from sealdiff.models import zoo
    judge = ToyJudge.load(zoo.zoo_dir() / "toy-judge")
    captions = toyworld.eval_captions(count)
    for path in paths.split(","):
        pipe = load_t2i(path).to(torch.float32)
        pipe.set_progress_bar_config(disable=True)
        images = generate(pipe, captions, list(range(1234, 1234 + count)))
        print(path, pipe.scheduler.config.prediction_type, attribute_accuracy(judge, images, captions), flush=True)


if sys.argv[1] == "train":
    torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    train(int(sys.argv[2]), float(sys.argv[3]), sys.argv[5] if len(sys.argv) > 5 else "/tmp/sealdiff-vpred")
else:
    torch.set_num_threads(1)
    evaluate(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 64)
