"""A plain LoRA training loop on a family's tiny model, outside t2i-train: does the model learn the caption?

The four solid-colour squares of tests/test_train_families.py, peft's LoRA on every Linear of the denoiser, AdamW,
the rectified-flow loss (target noise - x0, uniform sigma), nothing of t2i-train but each family's adapter
(`encode`: the pipeline's own `encode_prompt`; `latents_from`: the VAE and scaling; `predict`: the denoiser call).
Every quarter of the run it prints, per caption, the x0 error of the prediction from pure noise (sigma = 1) beside
the error of predicting the four images' mean: a model that ignores the caption cannot go below the latter.

    python bench/probe_memorisation.py sd3 --steps 800 --lr 3e-3
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    from runner.models.tiny import ensure_tiny
    from runner.train.families import SPECS, make_adapter, target_modules

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)

    # 1. The tiny model, the four images' latents (posterior means) and their captions' conditioning.
    torch.manual_seed(0)
    pipe = DiffusionPipeline.from_pretrained(str(ensure_tiny(args.family)))
    ad = make_adapter(args.family, pipe, "cpu", torch.float32)
    colors = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    with torch.no_grad():
        cond = ad.collate([ad.encode([f"a {c} square"]) for c in colors])
        px = torch.stack([torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32) / 127.5 - 1
                          for rgb in colors.values()])
        x0 = ad.latents_from(ad.vae_params(px), torch.Generator().manual_seed(0))
    mean_err = float((x0 - x0.mean(0)).pow(2).mean())

    # 2. LoRA on every Linear of the denoiser (peft), the only trained weights.
    net = ad.denoiser
    net.requires_grad_(False)
    names = target_modules(SPECS[args.family], "all_linear", None, net)  # t2i-train's preset: every Linear
    net.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=names))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    # 3. Train the whole batch each step; report the sigma = 1 prediction on fixed noise.
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % max(1, args.steps // 4) == 0:
            with torch.no_grad():
                x0_hat = probe - ad.predict(probe, torch.ones(len(colors)), cond)
            err = [round(float(e), 3) for e in (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))]
            print(f"{args.family} step {step}: x0 error at sigma 1 per caption {err}, predicting the mean "
                  f"{mean_err:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if step == args.steps:
            break
        sigma = torch.rand(len(colors), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        with torch.enable_grad():  # main() may be called where grad is off (a test process, a notebook)
            loss = (ad.predict((1 - s) * x0 + s * noise, sigma, cond) - (noise - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
