"""Train the coherence testbed: a tiny VAE, a tiny SD1.5-style UNet and a tiny Flux transformer.

All three learn one synthetic data set (64x64, one coloured shape, caption "a red circle"; see
testbed_common.py) so that, sampled above 64x64, they show the repetition hires exists to fix.

    python scripts/train_testbed.py vae  --out /tmp/hires_testbed/vae
    python scripts/train_testbed.py sd15 --vae /tmp/hires_testbed/vae --out hires/assets/testbed_sd15
    python scripts/train_testbed.py flux --vae /tmp/hires_testbed/vae --out hires/assets/testbed_flux

Deterministic: every random draw of step `s` comes from a generator seeded with (seed, s), so a
run resumed from a checkpoint draws exactly what an uninterrupted run would. Arguments, final
losses and a loss curve go to `training.json` next to the weights; rerun the first N steps with
`--reproduce <training.json> --stop-after N` to compare against the recorded curve.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testbed_common as tc

LOSS_WINDOW = 25  # steps per logged mean loss


# ---------------------------------------------------------------- builders (all in code)


def build_tokenizer(max_length: int):
    """Word-level tokenizer over the caption vocabulary; appends </s>, pads with <pad>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tc.SPECIAL_TOKENS + tc.CAPTION_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )


def build_clip(seed: int, vocab_size: int, max_length: int, hidden: int = 64):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, projection_dim=hidden,
    )
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def build_t5(seed: int, vocab_size: int, d_model: int = 64):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, dropout_rate=0.0,
    )
    return T5EncoderModel(cfg).eval().requires_grad_(False)


def build_vae(args):
    from diffusers import AutoencoderKL

    n = len(args.vae_channels)
    torch.manual_seed(args.seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=args.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(args.vae_channels), layers_per_block=args.vae_layers, norm_num_groups=16,
        sample_size=tc.IMAGE_SIZE, mid_block_add_attention=args.vae_attention,
    )


def build_unet(args, cross_dim: int, latent_channels: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(args.seed)
    ch = tuple(args.unet_channels)
    # SD1.5 layout in miniature, except no attention at the full-resolution level: 16x there
    # would mean 4096-token attention, too slow for the CPU eval. Mid block keeps attention.
    n = len(ch)
    down = ["CrossAttnDownBlock2D"] * n
    down[0] = down[-1] = "DownBlock2D"
    up = ["CrossAttnUpBlock2D"] * n
    up[0] = up[-1] = "UpBlock2D"
    return UNet2DConditionModel(
        sample_size=args.latent_size, in_channels=latent_channels, out_channels=latent_channels, block_out_channels=ch,
        down_block_types=tuple(down), up_block_types=tuple(up),
        layers_per_block=args.layers_per_block, cross_attention_dim=cross_dim,
        attention_head_dim=args.unet_heads, norm_num_groups=16,
    )


def build_flux(args, joint_dim: int, pooled_dim: int, latent_channels: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(args.seed)
    head = args.flux_head_dim
    rope = (head // 4, 3 * head // 8, 3 * head // 8)  # (text/time axis, y, x) sums to head dim
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=args.flux_double, num_single_layers=args.flux_single,
        attention_head_dim=head, num_attention_heads=args.flux_heads, joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=False, axes_dims_rope=rope,
    )


# ---------------------------------------------------------------- training loop plumbing


def mixed_precision(args):
    # bf16 autocast of the forward pass: about 1.35x faster steps on this CPU (avx512_bf16); weights stay fp32.
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def init_record(args) -> dict | None:
    """Training record of the exported pipeline that --init-from continues (None when training from scratch)."""
    return json.loads((Path(args.init_from) / "training.json").read_text()) if args.init_from else None


def draws_offset(args) -> int:
    """Steps already taken by the --init-from model, so a continuation draws batches it has not seen."""
    rec = init_record(args)
    return rec["steps_done"] + rec.get("draws_offset", 0) if rec else 0


def load_init_weights(model, args, subfolder: str) -> list[str]:
    """Start from the weights of an exported pipeline instead of random ones. Tensors whose shape differs (the
    latent-facing layers, when the new VAE has another latent channel count) keep their fresh init and are
    returned by name; any other difference in the state dict is an error."""
    if not args.init_from:
        return []
    from safetensors.torch import load_file

    loaded = load_file(Path(args.init_from) / subfolder / "diffusion_pytorch_model.safetensors")
    own = model.state_dict()
    if set(loaded) != set(own):
        raise SystemExit(f"--init-from {args.init_from!r}: {subfolder} has other tensors than this architecture "
                         f"(missing {sorted(set(own) - set(loaded))[:4]}, extra {sorted(set(loaded) - set(own))[:4]})")
    fresh = sorted(k for k in own if loaded[k].shape != own[k].shape)
    model.load_state_dict({k: (own[k] if k in fresh else v) for k, v in loaded.items()})
    if fresh:
        print(f"kept fresh (shape differs from --init-from): {fresh}", flush=True)
    return fresh


class Trainer:
    """AdamW + EMA + checkpoints; draws nothing itself, so determinism lives in step_generator."""

    def __init__(self, model, args, work: Path):
        self.model, self.args, self.work = model, args, work
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.step, self.losses, self.window = 0, [], []
        self.start_step = 0
        # training seconds of earlier invocations, carried by the checkpoint (None: an older one lacks them)
        self.seconds_before, self.t_start = 0.0, time.time()
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / "checkpoint.pt"
        if ckpt.exists() and not args.no_resume:
            state = torch.load(ckpt, weights_only=False)
            now = vars_for_record(args)
            # Options added to the script later are absent from old checkpoints; compare the rest.
            if {k: now.get(k) for k in state["args"]} != state["args"]:
                raise ValueError(f"checkpoint {ckpt} was made with other arguments; use --no-resume")
            model.load_state_dict(state["model"])
            self.ema = state["ema"]
            self.opt.load_state_dict(state["opt"])
            self.step, self.losses = state["step"], state["losses"]
            self.seconds_before = state.get("seconds")
            self.start_step = self.step
            print(f"resumed from {ckpt} at step {self.step}", flush=True)

    def lr_at(self, step: int) -> float:
        warm = self.args.warmup
        if step < warm:
            return self.args.lr * (step + 1) / warm
        frac = (step - warm) / max(1, self.args.steps - warm)
        return self.args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine to 10%

    def update(self, loss: torch.Tensor):
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        # EMA with warm-up so early steps are not frozen at initialisation.
        decay = min(self.args.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    self.ema[k].copy_(v)
        self.step += 1
        self.window.append(float(loss.detach()))
        if len(self.window) == LOSS_WINDOW:
            self.losses.append(float(np.mean(self.window)))
            self.window = []
            print(f"step {self.step} loss {self.losses[-1]:.5f} lr {self.lr_at(self.step - 1):.2e}", flush=True)
        if self.step % self.args.ckpt_every == 0:
            self.save_checkpoint()

    def save_checkpoint(self):
        # Only at window boundaries so the curve resumes exactly; and never from a run that made
        # no step (e.g. exporting a running job's checkpoint with --stop-after), so it cannot
        # overwrite a newer checkpoint.
        if self.window or self.step == self.start_step:
            return
        tmp = self.work / "checkpoint.pt.tmp"
        torch.save(
            {"model": self.model.state_dict(), "ema": self.ema, "opt": self.opt.state_dict(),
             "step": self.step, "losses": self.losses, "args": vars_for_record(self.args),
             "seconds": self.total_seconds()},
            tmp,
        )
        os.replace(tmp, self.work / "checkpoint.pt")

    def total_seconds(self) -> float | None:
        """Training seconds over every invocation of this run, resumes included."""
        return None if self.seconds_before is None else self.seconds_before + time.time() - self.t_start

    def ema_model(self):
        self.model.load_state_dict(self.ema)
        return self.model.eval()


def vars_for_record(args) -> dict:
    skip = {"out", "work_dir", "no_resume", "reproduce", "stop_after", "threads"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def vae_record(vae: Path) -> dict:
    """The VAE's training record: its own folder's, or, for a pipeline's vae/ folder, the one the
    pipeline's record carries."""
    own = vae / "training.json"
    if own.exists():
        return json.loads(own.read_text())
    return json.loads((vae.parent / "training.json").read_text())["vae_record"]


def write_record(out: Path, args, trainer: Trainer, seconds: float, extra: dict):
    rec = {
        "stage": args.stage,
        "args": vars_for_record(args),
        "steps_done": trainer.step,
        "loss_window_steps": LOSS_WINDOW,
        "loss_curve": trainer.losses,
        "stopped_after": args.stop_after,
        "final_loss": float(np.mean(trainer.losses[-4:])) if trainer.losses else None,
        "train_seconds_this_run": round(seconds, 1),
        # over every invocation, resumes included; absent when an older checkpoint did not keep it
        **({} if (total := trainer.total_seconds()) is None else {"train_seconds_training_run": round(total, 1)}),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        **extra,
    }
    if args.stage != "vae":  # the shared VAE's own record travels with each pipeline
        rec["vae_record"] = vae_record(Path(args.vae))
    if args.init_from:  # a continuation carries the record of the run it continues
        rec["draws_offset"] = draws_offset(args)
        rec["init_record"] = {k: v for k, v in init_record(args).items() if k != "vae_record"}
    (out / "training.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k != "loss_curve"}, indent=1))


def finished(trainer, args) -> bool:
    return trainer.step >= (args.stop_after or args.steps)


# ---------------------------------------------------------------- stages


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def texture_survival(vae, n: int = 96) -> dict:
    """Texture power the VAE keeps through its round trip (encode to the latent mean, decode) on held-out
    drawn pictures (testbed_metrics.texture_retention: 1.0 = kept; a bicubic-upscaled base keeps ~0.02).
    The texture's period is a few pixels at latent factor 4, so the round trip must be checked."""
    import testbed_metrics as tm

    pics = tc.drawn_pictures(n)
    x = images_to_tensor(np.stack([p.image for p in pics]))
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    back = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    kept = tm.texture_retention([p.image for p in pics], back, [p.colour for p in pics])
    return {
        "round_trip_pictures": n,
        **{f"recon_texture_{k}": v for k, v in kept.items()},
        "recon_mse": float(F.mse_loss(recon, x)),
        "recon_one_object_share": float(np.mean([tc.count_objects(im, p.colour).n_objects == 1
                                                 for im, p in zip(back, pics)])),
        "recon_colour_correct_share": float(np.mean([tm.colour_correct(im, p.colour) for im, p in zip(back, pics)])),
    }


ROUND_TRIP_SIZES = {64: 24, 128: 12, 256: 6, 512: 3}  # side -> drawn pictures: the sizes the eval decodes


def round_trip_by_size(vae) -> dict:
    """Halo, clipped share, colour and texture of round trips of drawn pictures at each of the eval's
    sizes, beside the drawn pictures' own: a VAE that only works at its training size would put its
    own halo and colour drift into every large sample."""
    import testbed_metrics as tm

    out = {}
    for size, n in ROUND_TRIP_SIZES.items():
        pics = tc.drawn_pictures(n, size=size)
        back = []
        for p in pics:  # one at a time: a 512 px picture's activations are large
            with torch.no_grad():
                y = vae.decode(vae.encode(images_to_tensor(p.image[None])).latent_dist.mean).sample
            back.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()[0])
        kept = tm.texture_retention([p.image for p in pics], back, [p.colour for p in pics])
        out[str(size)] = {
            "n": n,
            "halo_drawn": tm.nanmean(tm.halo(p.image, p.colour) for p in pics),
            "halo": tm.nanmean(tm.halo(b, p.colour) for b, p in zip(back, pics)),
            "clipped_drawn": float(np.mean([tm.clipped(p.image) for p in pics])),
            "clipped": float(np.mean([tm.clipped(b) for b in back])),
            "hue_error_drawn": tm.nanmean(tm.colour_drift(p.image, p.colour)[0] for p in pics),
            "hue_error": tm.nanmean(tm.colour_drift(b, p.colour)[0] for b, p in zip(back, pics)),
            "colour_correct": float(np.mean([tm.colour_correct(b, p.colour) for b, p in zip(back, pics)])),
            **{f"texture_{k}": v for k, v in kept.items()},
        }
    return out


def ring_gain(size: int, period: float, sigma: float = 0.35) -> torch.Tensor:
    """The log-Gabor ring of testbed_metrics.ring_filter as an FFT-domain gain (size x size)."""
    f = torch.fft.fftfreq(size)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).clamp_min(1e-9)
    gain = torch.exp(-torch.log(radius * period) ** 2 / (2 * sigma**2))
    gain[0, 0] = 0.0
    return gain


def texture_band_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error in the textures' rings (OBJECT_PERIOD and BACKGROUND_PERIOD), scaled so a white
    error scores its MSE: the band that the per-pixel losses leave to the last decimals."""
    size = x.shape[-1]
    gain = torch.maximum(ring_gain(size, tc.OBJECT_PERIOD), ring_gain(size, tc.BACKGROUND_PERIOD))
    err = torch.fft.fft2(rec - x)
    return (gain * err.abs() ** 2).mean() / (gain.mean() * size * size)


LARGE_POOL_BYTES = 48e6  # per size: 1024 pictures at 128 px, 244 at 256, 64 at 512


def large_pictures(args) -> list[torch.Tensor]:
    """Drawn pictures larger than the training size (uint8 NCHW, one tensor per --large-sizes entry).
    GroupNorm normalises over the whole picture, and a larger scene has fewer edge pixels per area:
    a VAE trained at 64 px alone (or on 64 px crops) overshoots edges and texture in whole larger
    pictures, so some steps train on those."""
    pools = []
    for k, size in enumerate(args.crop_sizes if args.crop_share > 0 and args.crop_sizes else args.large_sizes):
        n = min(args.n_data // 8, max(64, int(LARGE_POOL_BYTES // (3 * size * size))))
        pools.append(torch.from_numpy(tc.make_dataset(args.seed + 2 + k, n, size)[0]).permute(0, 3, 1, 2))
    return pools


def bicubic_upscaled(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pictures in [-1, 1] upscaled as structure guidance upscales a base image, through uint8 as a PNG."""
    side = x.shape[-1] * factor
    up = F.interpolate((x + 1) * 127.5, size=(side, side), mode="bicubic").clamp(0, 255).round()
    return up.div(127.5).sub(1.0)


def upscaled_batch(x_all: torch.Tensor, args, g: torch.Generator) -> torch.Tensor:
    """Training pictures bicubic-upscaled by one of --upscale-factors, as many as hold about a batch's pixels."""
    factor = args.upscale_factors[int(torch.randint(0, len(args.upscale_factors), (1,), generator=g))]
    n = max(1, round(args.batch_size / factor**2))
    return bicubic_upscaled(x_all[torch.randint(0, len(x_all), (n,), generator=g)], factor)


def upscaled_border_shift(vae, n: int = 6) -> dict:
    """Largest channel shift (levels) of the mean colour of each 4 px border strip through a round trip of
    held-out pictures bicubic-upscaled by 2 and 4, averaged over pictures (tests/test_testbed.py checks it)."""
    x = images_to_tensor(np.stack([p.image for p in tc.drawn_pictures(n, stride=5)]))
    strips = {"top": np.s_[..., :4, :], "bottom": np.s_[..., -4:, :], "left": np.s_[..., :4], "right": np.s_[..., -4:]}
    out = {}
    for factor in (2, 4):
        up = bicubic_upscaled(x, factor)
        with torch.no_grad():
            back = vae.decode(vae.encode(up).latent_dist.mean).sample.clamp(-1, 1)
        shift = ((back + 1) * 127.5).round() - ((up + 1) * 127.5).round()
        out[str(factor)] = {name: float(shift[sl].mean((2, 3)).abs().amax(1).mean()) for name, sl in strips.items()}
    return out


def vae_batch(x_all: torch.Tensor, pools: list[torch.Tensor], args, g: torch.Generator) -> torch.Tensor:
    """The step's batch: training pictures, or with probability --large-share whole pictures of one of
    --large-sizes, as many as hold about the same number of pixels (at least one). With --crop-share
    instead, that share of every batch is 64 px crops of the larger pictures (kept for the records of
    runs made so)."""
    if pools and args.crop_share > 0:
        n_crop = round(args.batch_size * args.crop_share)
        parts = [x_all[torch.randint(0, len(x_all), (args.batch_size - n_crop,), generator=g)]]
        for _ in range(n_crop):
            pool = pools[int(torch.randint(0, len(pools), (1,), generator=g))]
            i = int(torch.randint(0, len(pool), (1,), generator=g))
            y0, x0 = torch.randint(0, pool.shape[-1] - tc.IMAGE_SIZE + 1, (2,), generator=g).tolist()
            crop = pool[i, :, y0 : y0 + tc.IMAGE_SIZE, x0 : x0 + tc.IMAGE_SIZE]
            parts.append(crop[None].float().div(127.5).sub(1.0))
        return torch.cat(parts)
    if pools and float(torch.rand(1, generator=g)) < args.large_share:
        pool = pools[int(torch.randint(0, len(pools), (1,), generator=g))]
        n = max(1, round(args.batch_size * (tc.IMAGE_SIZE / pool.shape[-1]) ** 2))
        return pool[torch.randint(0, len(pool), (n,), generator=g)].float().div(127.5).sub(1.0)
    return x_all[torch.randint(0, len(x_all), (args.batch_size,), generator=g)]


def latent_means(vae, x: torch.Tensor) -> torch.Tensor:
    """The encoder's latent means of pictures x, 256 at a time."""
    with torch.no_grad():
        return torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])


def train_vae(args, out: Path, work: Path):
    images, _ = tc.make_dataset(args.seed, args.n_data)
    x_all = images_to_tensor(images)
    pools = large_pictures(args) if args.large_share > 0 or args.crop_share > 0 else []
    vae = build_vae(args)
    load_init_weights(vae, args, "")
    reference = None
    if args.encoder_only:
        # The decoder (what turns every generated latent into a picture) stays as trained, and so do the
        # latent normalisation and, by --hold-weight, the drawn pictures' latents: models trained on this
        # VAE's latents keep working with the new encoder.
        reference = copy.deepcopy(vae).eval().requires_grad_(False)
        vae.decoder.requires_grad_(False)
        vae.post_quant_conv.requires_grad_(False)
    vae.train()
    tr = Trainer(vae, args, work)
    offset = draws_offset(args)
    t0 = time.time()
    while not finished(tr, args):
        g = step_generator(args.seed, offset + tr.step)
        upscaled = args.upscaled_share > 0 and float(torch.rand(1, generator=g)) < args.upscaled_share
        x = upscaled_batch(x_all, args, g) if upscaled else vae_batch(x_all, pools, args, g)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.kl_weight * kl
        if args.texture_weight:
            loss = loss + args.texture_weight * texture_band_loss(rec, x)
        if reference is not None and args.hold_weight and not upscaled:
            with torch.no_grad():
                held = reference.encode(x).latent_dist.mean
            loss = loss + args.hold_weight * F.mse_loss(post.mean, held) / held.var()
        tr.update(loss)
    tr.save_checkpoint()
    vae = tr.ema_model()
    z = latent_means(vae, x_all[:2048])
    extra = {}
    if reference is None:  # latent normalisation in the config, as SD/Flux VAEs carry it
        vae.register_to_config(scaling_factor=float(1.0 / z.std()), shift_factor=float(z.mean()))
    else:  # bit for bit the init's (the EMA's arithmetic rounds even tensors that never trained)
        vae.decoder.load_state_dict(reference.decoder.state_dict())
        vae.post_quant_conv.load_state_dict(reference.post_quant_conv.state_dict())
        init = json.loads((Path(args.init_from) / "config.json").read_text())
        vae.register_to_config(scaling_factor=init["scaling_factor"], shift_factor=init["shift_factor"])
        z_ref = latent_means(reference, x_all[:2048])
        extra["latent_drift_vs_init"] = float((z - z_ref).pow(2).mean() / z_ref.var())  # relative MSE
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)
    write_record(out, args, tr, time.time() - t0, {
        **texture_survival(vae),
        "round_trip_by_size": round_trip_by_size(vae),
        "upscaled_border_shift": upscaled_border_shift(vae),
        "latent_mean": float(z.mean()), "latent_std": float(z.std()),
        "latent_channel_std": [round(float(v), 4) for v in z.std(dim=(0, 2, 3))],
        **extra,
    })


def encode_dataset(vae, args):
    """Latent means of the training images (cached beside the work dir; sd15 and flux share it)."""
    prompts = [p for p, _, _ in tc.all_prompts()]
    vae_file = Path(args.vae) / "diffusion_pytorch_model.safetensors"
    key = {"vae": str(Path(args.vae).resolve()), "vae_bytes": vae_file.stat().st_size,
           "vae_mtime": vae_file.stat().st_mtime, "seed": args.seed + 1, "n": args.n_data}
    cache = args.work_dir.parent / f"latents_seed{args.seed + 1}_n{args.n_data}.pt"
    if cache.exists():
        c = torch.load(cache, weights_only=False)
        if c["key"] == key:
            return c["z"], c["cap_idx"], prompts
    images, caps = tc.make_dataset(args.seed + 1, args.n_data)  # data seed differs from the VAE's
    z = latent_means(vae, images_to_tensor(images))
    cap_idx = torch.tensor([prompts.index(c) for c in caps])
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "z": z, "cap_idx": cap_idx}, cache.with_suffix(".tmp"))
    os.replace(cache.with_suffix(".tmp"), cache)
    return z, cap_idx, prompts


def train_sd15(args, out: Path, work: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    tok = build_tokenizer(args.max_length)
    te = build_clip(args.seed + 7, len(tok), args.max_length)
    betas = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    unet = build_unet(args, te.config.hidden_size, vae.config.latent_channels)
    fresh = load_init_weights(unet, args, "unet")
    # Sampling starts at t = 999 ("trailing"): from the 15-step default's t = 934 the v3 UNet left pure noise
    # as background in about half its 1x samples (one object 0.42 -> 0.79, n = 24).
    sched = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    z_all, cap_idx, prompts = encode_dataset(vae, args)
    z_all = z_all * vae.config.scaling_factor  # SD pipelines divide by scaling_factor, no shift
    with torch.no_grad():
        cond, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        uncond, _ = pipe.encode_prompt([""], "cpu", 1, False)
    noise_sched = DDPMScheduler(**betas)
    unet.train()
    tr = Trainer(unet, args, work)
    offset = draws_offset(args)
    print(f"unet params {sum(p.numel() for p in unet.parameters())/1e6:.2f}M", flush=True)
    t0 = time.time()
    while not finished(tr, args):
        g = step_generator(args.seed, offset + tr.step)
        idx = torch.randint(0, len(z_all), (args.batch_size,), generator=g)
        x0 = z_all[idx]
        drop = torch.rand(args.batch_size, generator=g) < args.cond_dropout
        ctx = torch.where(drop[:, None, None], uncond.expand(args.batch_size, -1, -1), cond[cap_idx[idx]])
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch_size,), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        with mixed_precision(args):
            pred = unet(xt, t, encoder_hidden_states=ctx).sample
        tr.update(F.mse_loss(pred.float(), noise))
    tr.save_checkpoint()
    pipe.unet = tr.ema_model()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    write_record(out, args, tr, time.time() - t0, {"params_unet": sum(p.numel() for p in unet.parameters()),
                                                   **({"init_fresh": fresh} if fresh else {})})


def train_flux(args, out: Path, work: Path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    tok, tok2 = build_tokenizer(args.max_length), build_tokenizer(args.max_length)
    te = build_clip(args.seed + 7, len(tok), args.max_length)
    te2 = build_t5(args.seed + 11, len(tok2))
    tf = build_flux(args, te2.config.d_model, te.config.hidden_size, vae.config.latent_channels)
    fresh = load_init_weights(tf, args, "transformer")
    n_tok = (args.latent_size // 2) ** 2
    # Real Flux shifts sigmas by image size; the same rule here, anchored at the training size.
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=n_tok, max_image_seq_len=16 * n_tok,
    )
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2, transformer=tf)
    z_all, cap_idx, prompts = encode_dataset(vae, args)
    z_all = (z_all - vae.config.shift_factor) * vae.config.scaling_factor
    with torch.no_grad():
        cond, pooled, txt_ids = pipe.encode_prompt(prompts, None, max_sequence_length=args.max_length)
        uncond, upooled, _ = pipe.encode_prompt([""], None, max_sequence_length=args.max_length)
    c, h, w = vae.config.latent_channels, args.latent_size, args.latent_size
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    tf.train()
    tr = Trainer(tf, args, work)
    offset = draws_offset(args)
    print(f"flux params {sum(p.numel() for p in tf.parameters())/1e6:.2f}M", flush=True)
    t0 = time.time()
    B = args.batch_size
    while not finished(tr, args):
        g = step_generator(args.seed, offset + tr.step)
        idx = torch.randint(0, len(z_all), (B,), generator=g)
        x0 = z_all[idx]
        drop = torch.rand(B, generator=g) < args.cond_dropout
        ctx = torch.where(drop[:, None, None], uncond.expand(B, -1, -1), cond[cap_idx[idx]])
        pool = torch.where(drop[:, None], upooled.expand(B, -1), pooled[cap_idx[idx]])
        noise = torch.randn(x0.shape, generator=g)
        # Half uniform, half logit-normal sigmas: the ends stay covered, the middle gets more.
        u = torch.rand(B, generator=g)
        ln = torch.sigmoid(torch.randn(B, generator=g))
        sigma = torch.where(torch.rand(B, generator=g) < 0.5, u, ln)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        packed = FluxPipeline._pack_latents(xt, B, c, h, w)
        target = FluxPipeline._pack_latents(noise - x0, B, c, h, w)
        with mixed_precision(args):
            pred = tf(hidden_states=packed, timestep=sigma, pooled_projections=pool, encoder_hidden_states=ctx,
                      txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        tr.update(F.mse_loss(pred.float(), target))
    tr.save_checkpoint()
    pipe.transformer = tr.ema_model()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    write_record(out, args, tr, time.time() - t0, {
        "params_transformer": sum(p.numel() for p in tf.parameters()),
        "max_sequence_length": args.max_length,
        **({"init_fresh": fresh} if fresh else {}),
    })


# ---------------------------------------------------------------- CLI

DEFAULTS = {
    "vae": {"steps": 4000, "batch_size": 32, "lr": 1e-3, "warmup": 100, "n_data": 8192},
    "sd15": {"steps": 2000, "batch_size": 64, "lr": 1e-3, "warmup": 100, "n_data": 16384},
    "flux": {"steps": 3000, "batch_size": 64, "lr": 5e-4, "warmup": 100, "n_data": 16384},
}


# Options a record made before they existed ran with (its args lack them).
LEGACY = {"latent_channels": 4, "vae_layers": 1, "texture_weight": 0.0, "vae_attention": True, "large_share": 0.0,
          "large_sizes": [128, 256, 512], "crop_share": 0.0, "crop_sizes": None, "encoder_only": False,
          "upscaled_share": 0.0, "upscale_factors": [2, 4], "hold_weight": 0.0}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(DEFAULTS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vae", type=str, help="trained VAE folder (sd15, flux)")
    p.add_argument("--work-dir", type=Path, help="checkpoints; default /tmp/hires_testbed/work_<stage>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--n-data", type=int)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32, 32])
    p.add_argument("--vae-layers", type=int, default=1, help="VAE resnet layers per block")
    p.add_argument("--latent-channels", type=int, default=16)
    p.add_argument("--texture-weight", type=float, default=1.0, help="weight of the texture-band loss (VAE)")
    p.add_argument("--vae-attention", action=argparse.BooleanOptionalAction, default=False,
                   help="attention in the VAE's mid block (v2 had it; without it the VAE is convolutional only)")
    p.add_argument("--large-share", type=float, default=0.5, help="share of VAE steps on whole larger pictures")
    p.add_argument("--large-sizes", type=int, nargs="+", default=[128, 256, 512], help="sides of those pictures")
    p.add_argument("--crop-share", type=float, default=0.0,
                   help="share of every VAE batch cropped (64 px) from larger pictures instead (overrides --large-share)")
    p.add_argument("--crop-sizes", type=int, nargs="+", help="sides of the pictures cropped from (with --crop-share)")
    p.add_argument("--encoder-only", action="store_true",
                   help="VAE: train the encoder alone (with --init-from); decoder and latent normalisation kept")
    p.add_argument("--upscaled-share", type=float, default=0.0,
                   help="share of VAE steps on training pictures bicubic-upscaled (what structure guidance encodes)")
    p.add_argument("--upscale-factors", type=int, nargs="+", default=[2, 4], help="factors of those pictures")
    p.add_argument("--hold-weight", type=float, default=0.0,
                   help="with --encoder-only: weight of keeping drawn pictures' latents where the init encoder put them")
    p.add_argument("--latent-size", type=int, default=16)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--unet-heads", type=int, default=4, help="diffusers' attention_head_dim: head count")
    p.add_argument("--flux-head-dim", type=int, default=32)
    p.add_argument("--flux-heads", type=int, default=4)
    p.add_argument("--flux-double", type=int, default=2)
    p.add_argument("--flux-single", type=int, default=4)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the denoiser's forward (sd15, flux)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--init-from", type=str,
                   help="exported VAE or pipeline (sd15, flux) whose weights to continue training; its batches are not redrawn")
    p.add_argument("--reproduce", type=Path, help="training.json whose args to rerun and compare")
    p.add_argument("--stop-after", type=int, help="stop after this many steps (for --reproduce)")
    args = p.parse_args(argv)
    if args.reproduce:
        rec = json.loads(args.reproduce.read_text())
        cli_vae = args.vae  # the recorded VAE path may be gone; each pipeline ships a copy in vae/
        for k, v in {**LEGACY, **rec["args"]}.items():
            setattr(args, k, v)
        args.vae = cli_vae or args.vae
        args.no_resume = True
    for k, v in DEFAULTS[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.stage != "vae" and not args.vae:
        p.error(f"--vae is required for stage {args.stage}")
    if args.init_from and not (Path(args.init_from) / "training.json").exists():
        p.error(f"--init-from {args.init_from!r}: needs an exported folder of this stage (a VAE, or an sd15/flux "
                "pipeline) with its training.json")
    if args.encoder_only and not (args.stage == "vae" and args.init_from):
        p.error("--encoder-only trains an existing VAE's encoder: it needs stage vae and --init-from")
    if args.work_dir is None:
        args.work_dir = Path(f"/tmp/hires_testbed/work_{args.stage}")
    return args


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, work = args.out, args.work_dir
    if args.reproduce:
        work = work.with_name(work.name + "_reproduce")
        for f in work.glob("checkpoint.pt*"):
            f.unlink()
    {"vae": train_vae, "sd15": train_sd15, "flux": train_flux}[args.stage](args, out, work)
    if args.reproduce:
        rec = json.loads(args.reproduce.read_text())
        mine = json.loads((out / "training.json").read_text())["loss_curve"]
        ref = rec["loss_curve"][: len(mine)]
        diff = float(np.max(np.abs(np.array(mine) - np.array(ref)))) if mine else float("nan")
        print(json.dumps({"windows_compared": len(mine), "recorded": ref, "rerun": mine, "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
