"""Subject-driven generation (DreamBooth) with a Stable Diffusion UNet and LieRA (the paper's Stable Diffusion
subject-driven generation experiment).

Targets: the subject-driven generation results (Stable Diffusion fine-tuned on a few images of one subject,
DreamBooth protocol) of "Generalized Tensor-based Parameter-Efficient Fine-Tuning via Lie Group
Transformations" (LieRA; Si et al., ICCV 2025, arXiv 2504.00851). That experiment is judged on generated images
(fidelity / text alignment); this script trains and saves the adapter and reports denoising losses. Sampling
images with the adapter is ordinary diffusers use: load the UNet, ``liera.LieRAModel.from_pretrained(unet,
"<out>/adapter")`` (or ``.merge_and_unload()`` for a plain UNet) and put it into a StableDiffusionPipeline.

Method: LieRA (Taylor map, W + W*D) on the UNet's convolutions and attention projections: to_q, to_k, to_v,
to_out.0 (self- and cross-attention), proj_in / proj_out (1x1 convs in SD 1.x), the ResNet convs conv1, conv2,
conv_shortcut and the down/up-sampler convs (``--targets`` to change). Loss: the DDPM denoising MSE
(epsilon or v-prediction, from the scheduler config) at uniformly drawn timesteps; with --class-data also
DreamBooth's prior-preservation loss (weight --prior-loss-weight) on class latents.

Hyper-parameters (the usual DreamBooth-LoRA settings; assumptions, verify against the paper): AdamW, lr 1e-4,
batch 1, 500 steps, constant learning rate, r=8, alpha=16, prior-loss weight 1.0.

Inputs, all local (no VAE or text encoder needed here):
  --unet       a UNet2DConditionModel folder (e.g. <stable-diffusion-v1-5>/unet)
  --scheduler  a DDPMScheduler folder (e.g. <stable-diffusion-v1-5>/scheduler)
  --data       .pt (torch.save of a dict) or .npz with
                 latents                (N, 4, H/8, W/8) float: VAE latents already times vae.config.scaling_factor
                 encoder_hidden_states  (N, 77, D), or (77, D) / (1, 77, D) shared by all images: text-encoder
                                        output for the instance prompt ("a photo of sks dog")
                 latents_std            optional, same shape as latents: the VAE posterior std; with it a fresh
                                        latent mean + std * noise is drawn every step, as DreamBooth does
  --class-data the same format for the class images and prompt ("a photo of dog"), for prior preservation

Producing --data (run once, where the VAE and text encoder are available):

    import numpy as np, torch
    from PIL import Image
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer
    sd = "/models/stable-diffusion-v1-5"
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae")
    tok = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder")
    imgs = [Image.open(p).convert("RGB").resize((512, 512)) for p in image_paths]
    x = torch.stack([torch.from_numpy(np.asarray(i)).permute(2, 0, 1).float() / 127.5 - 1 for i in imgs])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        ids = tok(["a photo of sks dog"], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        emb = te(ids)[0]                                             # (1, 77, 768)
    s = vae.config.scaling_factor
    torch.save({"latents": dist.mean * s, "latents_std": dist.std * s, "encoder_hidden_states": emb}, "sks_dog.pt")

    python examples/dreambooth_sd_unet.py --unet /models/sd15/unet --scheduler /models/sd15/scheduler \
        --data sks_dog.pt --class-data dog_class.pt --out runs/sks-dog
    python examples/dreambooth_sd_unet.py --smoke --out /tmp/db-smoke     # tiny random UNet, seconds

Writes ``<out>/metrics.json`` (final training loss, prior loss, fixed-noise denoising loss before/after) and the
adapter (``<out>/adapter``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

import liera
from liera.apps.progress import progress

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
           "downsamplers.0.conv", "upsamplers.0.conv"]
# DreamBooth-LoRA defaults (assumed; verify against the paper)
LR = 1e-4
MAX_STEPS = 500
BATCH_SIZE = 1
RANK = 8
ALPHA = 16.0
PRIOR_LOSS_WEIGHT = 1.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", help="local UNet2DConditionModel folder")
    p.add_argument("--scheduler", help="local DDPMScheduler folder")
    p.add_argument("--data", help=".pt/.npz with latents + encoder_hidden_states (see header)")
    p.add_argument("--class-data", help="same format, class images: enables prior preservation")
    p.add_argument("--prior-loss-weight", type=float, default=PRIOR_LOSS_WEIGHT)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=MAX_STEPS)
    p.add_argument("--epochs", type=int, default=None, help="passes over the instance latents (instead of --max-steps)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--r", type=int, default=RANK)
    p.add_argument("--alpha", type=float, default=ALPHA)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--exp-map", choices=list(liera.group.EXP_MAPS), default=liera.group.TAYLOR)
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated module names or suffixes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base UNet dtype (adapters: float32)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-timesteps", type=int, default=10, help="timesteps of the fixed-noise denoising loss")
    p.add_argument("--smoke", action="store_true", help="tiny random UNet, synthetic latents; seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_steps, args.epochs, args.batch_size, args.r, args.alpha = 2, None, 2, 2, 4.0
        args.device, args.dtype, args.log_every, args.eval_timesteps = "cpu", "float32", 1, 2
    elif not (args.unet and args.scheduler and args.data):
        p.error("--unet, --scheduler and --data are required (or --smoke)")
    return args


# ---------------------------------------------------------------------------------------------- data
class Latents:
    """Instance (or class) latents and their text embeddings; draws batches."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        if path.suffix == ".npz":
            raw = {k: torch.from_numpy(v) for k, v in np.load(path).items()}
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("latents", "encoder_hidden_states") if k not in raw]
        if missing:
            raise ValueError(f"{str(path)!r} lacks {missing}; it has {sorted(raw)} (see the script header)")
        self.mean = raw["latents"].float()
        if self.mean.dim() != 4:
            raise ValueError(f"latents of {str(path)!r} must be (N, C, h, w), got {tuple(self.mean.shape)}")
        self.std = raw["latents_std"].float() if "latents_std" in raw else None
        emb = raw["encoder_hidden_states"].float()
        emb = emb.unsqueeze(0) if emb.dim() == 2 else emb
        if emb.shape[0] == 1:
            emb = emb.expand(len(self.mean), -1, -1)
        if emb.shape[0] != len(self.mean):
            raise ValueError(f"{str(path)!r}: {emb.shape[0]} text embeddings for {len(self.mean)} latents")
        self.emb = emb

    def __len__(self):
        return len(self.mean)

    def batch(self, idx, gen):
        x = self.mean[idx]
        if self.std is not None:
            x = x + self.std[idx] * torch.randn(x.shape, generator=gen)
        return x, self.emb[idx]


def smoke_files(out: Path):
    """Synthetic latents (instance: .pt with latents_std; class: .npz), shaped like a tiny UNet's inputs."""
    g = torch.Generator().manual_seed(0)
    inst = {"latents": torch.randn(4, 4, 8, 8, generator=g), "latents_std": 0.1 * torch.ones(4, 4, 8, 8),
            "encoder_hidden_states": torch.randn(1, 6, 32, generator=g)}
    torch.save(inst, out / "smoke_instance.pt")
    np.savez(out / "smoke_class.npz", latents=torch.randn(4, 4, 8, 8, generator=g).numpy(),
             encoder_hidden_states=torch.randn(4, 6, 32, generator=g).numpy())
    return str(out / "smoke_instance.pt"), str(out / "smoke_class.npz")


def build(args):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if args.smoke:
        torch.manual_seed(args.seed)
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=32)
        return unet, DDPMScheduler(num_train_timesteps=1000)
    unet = UNet2DConditionModel.from_pretrained(args.unet, torch_dtype=DTYPES[args.dtype])
    return unet, DDPMScheduler.from_pretrained(args.scheduler)


# ---------------------------------------------------------------------------------------------- loss
def denoise_loss(model, scheduler, latents, emb, noise, t, dtype):
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    elif scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported here")
    pred = model(noisy.to(dtype), t, encoder_hidden_states=emb.to(dtype)).sample
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def fixed_noise_loss(model, scheduler, data: Latents, args, dtype, limit=8) -> float:
    """Denoising MSE at fixed noise and evenly spaced timesteps on (up to) 8 instance latents: comparable
    before/after training and across runs with the same data."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    x, emb = data.mean[:limit], data.emb[:limit]
    T, n_t = scheduler.config.num_train_timesteps, args.eval_timesteps
    total = 0.0
    for t in torch.linspace(0, T - 1, n_t).long():
        noise = torch.randn(x.shape, generator=g)
        tt = t.repeat(len(x))
        total += denoise_loss(model, scheduler, x.to(args.device), emb.to(args.device), noise.to(args.device),
                              tt.to(args.device), dtype).item()
    return total / n_t


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    data_path, class_path = smoke_files(out) if args.smoke else (args.data, args.class_data)
    inst = Latents(data_path)
    cls = Latents(class_path) if class_path else None
    print(f"[data] {len(inst)} instance latents {tuple(inst.mean.shape[1:])}"
          + (f", {len(cls)} class latents (prior preservation, weight {args.prior_loss_weight:g})" if cls else ""))

    unet, scheduler = build(args)
    config = liera.LieRAConfig(r=args.r, alpha=args.alpha, target_modules=args.targets.split(","),
                               exp_map=args.exp_map, dropout=args.dropout)
    model = liera.get_liera_model(unet, config).to(args.device)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()  # passes through to the UNet
    kinds = {}
    for _, owner, _ in model.adapted_weights():
        kinds[type(owner).__name__] = kinds.get(type(owner).__name__, 0) + 1
    print(f"[liera] adapted weights by layer type: {kinds}")
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    dtype = DTYPES[args.dtype]
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(args.device)

    before = fixed_noise_loss(model, scheduler, inst, args, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * math.ceil(len(inst) / args.batch_size) if args.epochs else args.max_steps
    gen = torch.Generator().manual_seed(args.seed)
    T = scheduler.config.num_train_timesteps
    losses, prior_losses = [], []
    start = time.perf_counter()
    def sampled_loss(data):
        """Denoising loss on a random batch of `data` at random timesteps (instance or prior-class images)."""
        idx = torch.randint(0, len(data), (args.batch_size,), generator=gen)
        x, emb = data.batch(idx, gen)
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, T, (len(x),), generator=gen)
        return denoise_loss(model, scheduler, x.to(args.device), emb.to(args.device), noise.to(args.device),
                            t.to(args.device), dtype)

    model.train()
    for step in progress(range(1, total_steps + 1), desc="train", total=total_steps):
        loss = sampled_loss(inst)
        total_loss = loss
        if cls is not None:
            prior = sampled_loss(cls)
            total_loss = loss + args.prior_loss_weight * prior
            prior_losses.append(prior.item())
        opt.zero_grad(set_to_none=True)
        total_loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == total_steps:
            msg = f"[train] step {step}/{total_steps} loss {np.mean(losses[-args.log_every:]):.4f}"
            if prior_losses:
                msg += f" prior {np.mean(prior_losses[-args.log_every:]):.4f}"
            print(msg, flush=True)
    train_time = time.perf_counter() - start
    after = fixed_noise_loss(model, scheduler, inst, args, dtype)
    print(f"[eval] fixed-noise denoising loss on the instance latents: {before:.4f} -> {after:.4f}")
    model.save_pretrained(out / "adapter")
    k = min(10, len(losses))
    metrics = {
        "recipe": "dreambooth_sd_unet", "final_loss": float(np.mean(losses[-k:])),
        "final_prior_loss": float(np.mean(prior_losses[-k:])) if prior_losses else None,
        "fixed_noise_loss_before": before, "fixed_noise_loss_after": after, "losses": losses,
        "prior_losses": prior_losses, "steps": total_steps, "train_time_s": train_time,
        "trainable_params": trainable, "total_params": total, "adapted_weights": kinds,
        "prediction_type": scheduler.config.prediction_type,
        "hparams": {k_: v for k_, v in vars(args).items() if k_ != "device"},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"[done] metrics -> {out / 'metrics.json'}, adapter -> {out / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
