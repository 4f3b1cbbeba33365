"""DemoFusion's dilated sampling: global denoising paths on interleaved sub-lattices of the latent.

Above the base size, a latent of h x w is s_h x s_w interleaved sub-lattices of stride (s_h, s_w):
sub-lattice (i, j) is z[..., i::s_h, j::s_w], a base-size latent whose pixels sit s apart, so the
denoiser sees the whole picture at the scale it was trained on. At each step a hook on the denoiser
1. lets the ordinary full-size call run (the pipeline's own prediction, `full`);
2. blurs the latent the denoiser was given with a Gaussian (kernel 2s - 1 per side, zero padding,
   sigma = sigma0 * (0.99 cosf(t) ** blur_exponent + 0.01), renormalised to the latent's own mean
   and std per sample: DemoFusion's code), so neighbouring sub-lattices share low frequencies and the
   paths do not drift apart;
3. stacks all sub-lattices of the blurred latent along the batch and runs the denoiser once on them
   (every other batched argument repeated to match; `max_batch` splits the call), and puts the
   predictions back on their lattice (`dilated`);
4. returns c dilated + (1 - c) full, c = cosf(t) ** fusion_exponent (DemoFusion's c2 = cosf ** 1).
With `local_windows` the full-size prediction of step 1 is replaced by DemoFusion's local paths
(MultiDiffusion): the mean over overlapping base-size windows at stride `window_stride` x window,
the inner ones shifted each step by up to a quarter of the overlap from a generator derived from the
call's seed, all windows of a sample denoised in one batched call (the full-size call is skipped). This also
runs above the base size where no side's stride reaches 2. SDXL's crop-coordinate conditioning stays
the pipeline's (DemoFusion sets it to each window's offset).
DemoFusion blends the *stepped* latents; schedulers' steps are linear in the model output for a
given sample, so blending the predictions and stepping once is the same for first-order solvers,
and it lets every guidance technique and scheduler act on the blended prediction.

Strides and sizes. s = round(request side / base side) per side, so non-square requests get
different strides per side and non-integer scales the nearest stride (1.5x -> 2: sub-lattices of
0.75 base side; a side whose scale rounds to 1 is not split; with both at 1 the technique does
nothing for that call). A latent side that is not a multiple of s x the family's latent multiple
(patch size for DiTs) is padded at its far end by repeating its edge, and the padding's predictions
are dropped.

Families. The sub-lattices are taken in the latent grid: Flux's packed tokens (2x2 patches) are
unpacked first and each sub-lattice packed again, with position ids of the sub-lattice's own base
grid built from the layout's `id_axes` (hires.sampling.latents); SD3 and PixArt patchify inside the model, so their
spatial latents are split directly and they place a base-size input on their base grid themselves.
During the batched passes `attachment.state` is a copy with the crops' size, so hooks that read
the call's size (RoPE scaling, entropy factors, attention windows) treat them as base-size calls.
ControlNet residuals are full-size feature maps with no sub-lattice of their own: a call carrying
them is refused. cosf(t) is read at the sample's noise level on SDXL's schedule
(`schedules.cosine_factor`), which covers eps, v and flow families alike.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from ...denoiser.outputs import output_tensor, with_tensor
from ...sampling import schedules
from .config import DilatedSamplingConfig

HOOK_NAME = "hires.dilated_sampling"
TECHNIQUE_NAME = "dilated_sampling"
# Denoiser arguments that carry full-size ControlNet features (UNet, SD3, Flux).
_CONTROL_ARGUMENTS = ("down_block_additional_residuals", "mid_block_additional_residual",
                      "down_intrablock_additional_residuals", "block_controlnet_hidden_states",
                      "controlnet_block_samples", "controlnet_single_block_samples")


# -- the math on tensors -------------------------------------------------------------------------
def lattice_strides(height: int, width: int, base_height: int, base_width: int) -> tuple[int, int]:
    """(s_h, s_w): the scale per side rounded half up, at least 1."""
    return (max(1, math.floor(height / base_height + 0.5)), max(1, math.floor(width / base_width + 0.5)))


def blur_sigma(cosine: float, sigma: float, blur_exponent: float) -> float:
    """DemoFusion's sigma * c3, c3 = 0.99 cosf ** blur_exponent + 0.01."""
    return sigma * (0.99 * cosine**blur_exponent + 0.01)


def _kernel_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, strides: tuple[int, int], sigma: float) -> torch.Tensor:
    """Separable Gaussian of kernel (2 s_h - 1, 2 s_w - 1) with zero padding, renormalised to the mean
    and std of each sample of `x` (float32 out)."""
    work = x.float()
    if sigma <= 0 or strides == (1, 1):
        return work
    channels = work.shape[1]
    out = work
    for axis, s in ((2, strides[0]), (3, strides[1])):
        size = 2 * s - 1
        if size == 1:
            continue
        k = _kernel_1d(size, sigma).to(device=work.device, dtype=torch.float32)
        view = (1, 1, size, 1) if axis == 2 else (1, 1, 1, size)
        padding = (size // 2, 0) if axis == 2 else (0, size // 2)
        out = F.conv2d(out, k.view(view).expand(channels, -1, -1, -1), padding=padding, groups=channels)
    dims = tuple(range(1, work.ndim))
    mean, std = work.mean(dim=dims, keepdim=True), work.std(dim=dims, keepdim=True)
    blurred_mean, blurred_std = out.mean(dim=dims, keepdim=True), out.std(dim=dims, keepdim=True)
    return (out - blurred_mean) / blurred_std.clamp_min(1e-12) * std + mean


def padded_size(side: int, stride: int, multiple: int) -> int:
    """The smallest side >= `side` that splits into `stride` sub-lattices of a multiple of `multiple`."""
    unit = stride * multiple
    return math.ceil(side / unit) * unit


def split_lattices(x: torch.Tensor, strides: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B s_h s_w, C, H / s_h, W / s_w); sample b's lattice (i, j) at b s_h s_w + i s_w + j."""
    b, c, h, w = x.shape
    sh, sw = strides
    y = x.reshape(b, c, h // sh, sh, w // sw, sw).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b * sh * sw, c, h // sh, w // sw)


def merge_lattices(y: torch.Tensor, strides: tuple[int, int]) -> torch.Tensor:
    """Inverse of `split_lattices`."""
    sh, sw = strides
    n, c, h, w = y.shape
    b = n // (sh * sw)
    x = y.reshape(b, sh, sw, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c, h * sh, w * sw)


def fuse(full: torch.Tensor, dilated: torch.Tensor, weight: float) -> torch.Tensor:
    """weight dilated + (1 - weight) full, in float32."""
    return weight * dilated.float() + (1 - weight) * full.float()


def _axis_starts(length: int, window: int, stride: int, jitter: int, generator) -> list[int]:
    """Window starts covering [0, length): every `stride`, the last flush with the end; the inner ones
    shifted by up to +-jitter (drawn from `generator`), all kept inside."""
    if window >= length:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    starts = [min(k * stride, length - window) for k in range(count)]
    if jitter:
        shifts = torch.randint(-jitter, jitter + 1, (count,), generator=generator).tolist()
        starts = [s if k in (0, count - 1) else min(max(s + shifts[k], 0), length - window)
                  for k, s in enumerate(starts)]
    return starts


def window_boxes(size: tuple[int, int], window: tuple[int, int], stride_fraction: float,
                 generator) -> tuple[tuple[int, int], ...]:
    """(top, left) of overlapping windows covering a latent of `size`: stride = stride_fraction x window,
    inner windows jittered by up to a quarter of the overlap (DemoFusion: (128 - 64) / 4)."""
    per_axis = []
    for length, side in zip(size, window):
        stride = max(1, int(round(side * stride_fraction)))
        per_axis.append(_axis_starts(length, side, stride, max(0, (side - stride) // 4), generator))
    return tuple((top, left) for top in per_axis[0] for left in per_axis[1])


def gather_windows(x: torch.Tensor, boxes, window: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B len(boxes), C, wh, ww), sample b's windows at b len(boxes) + k."""
    wh, ww = window
    crops = torch.stack([x[:, :, top:top + wh, left:left + ww] for top, left in boxes], dim=1)
    return crops.reshape(-1, *crops.shape[2:])


def average_windows(predicted: torch.Tensor, boxes, window: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `gather_windows` where windows overlap: the mean of every window covering a position."""
    wh, ww = window
    count = len(boxes)
    crops = predicted.reshape(-1, count, *predicted.shape[1:])
    value = predicted.new_zeros(crops.shape[0], crops.shape[2], *size)
    cover = predicted.new_zeros(1, 1, *size)
    for k, (top, left) in enumerate(boxes):
        value[:, :, top:top + wh, left:left + ww] += crops[:, k]
        cover[:, :, top:top + wh, left:left + ww] += 1
    return value / cover


# -- the denoiser hook ---------------------------------------------------------------------------
@dataclasses.dataclass
class DilatedCall:
    """Per-call slot (`state.slot(DilatedCall)`): what the hook did, for `hires.last_call(pipe).notes`."""

    weights: list = dataclasses.field(default_factory=list)  # fusion weight per denoiser call
    windows: list = dataclasses.field(default_factory=list)  # local windows' boxes per step
    generator: torch.Generator | None = None  # the windows' jitter, derived from the call's generator
    windows_step: int | None = None  # the step the last boxes were drawn for


def _expand_batch(value, batch: int, times: int, window: slice):
    """Every per-sample tensor (first dimension = batch) repeated `times` times sample by sample, the
    `window` of that batch; other values as they are (dicts, e.g. added_cond_kwargs, looked into)."""
    if isinstance(value, torch.Tensor):
        return value.repeat_interleave(times, dim=0)[window] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _expand_batch(v, batch, times, window) for k, v in value.items()}
    return value


class DilatedSamplingHook(ModelHook):
    """Runs the sub-lattice pass (and the local windows) and fuses the predictions."""

    def __init__(self, attachment, config: DilatedSamplingConfig):
        super().__init__()
        self.attachment = attachment
        self.config = config
        self.info = attachment.info
        self.signature = inspect.signature(type(attachment.denoiser).forward)
        names = list(self.signature.parameters)
        self.sample_name = names[1]  # the first parameter after self: sample / hidden_states
        self.var_keyword = next((n for n, p in self.signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)

    def new_forward(self, module, *args, **kwargs):
        state = self.attachment.state
        if state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        info, config = self.info, self.config
        strides = lattice_strides(state.height, state.width, info.base_height, info.base_width)
        base_latent = (info.base_height // info.latent_factor, info.base_width // info.latent_factor)
        local = config.local_windows and (state.latent_height > base_latent[0] or state.latent_width > base_latent[1])
        if strides == (1, 1) and not local:
            return self.fn_ref.original_forward(*args, **kwargs)
        arguments = self.signature.bind_partial(module, *args, **kwargs).arguments
        arguments.pop("self", None)
        if self.var_keyword is not None:
            arguments.update(arguments.pop(self.var_keyword, None) or {})
        control = [name for name in _CONTROL_ARGUMENTS if arguments.get(name) is not None]
        if control:
            raise ValueError(f"dilated_sampling cannot split full-size ControlNet features ({', '.join(control)}) "
                             "into sub-lattices or windows; disable dilated_sampling for ControlNet pipelines")
        slot = state.slot(DilatedCall)
        log = state.log.setdefault("log.dilated_sampling", {"strides": strides, "weights": ()})
        if local:
            full, output = self.local_prediction(arguments, state, base_latent, slot)
            log["windows"] = tuple(slot.windows)
        else:
            output = self.fn_ref.original_forward(**arguments)
            full = output_tensor(output)
        if strides == (1, 1):
            return with_tensor(output, full.to(output_tensor(output).dtype))
        timestep = float(torch.as_tensor(arguments["timestep"]).flatten()[0]) / info.family.timestep_input_scale
        cosine = schedules.cosine_factor(self.attachment.pipe.scheduler, info.prediction_type, timestep)
        weight = cosine**config.fusion_exponent
        slot.weights.append(weight)
        log["weights"] = tuple(slot.weights)
        dilated = self.dilated_prediction(arguments, state, strides, cosine)
        dtype = output_tensor(output).dtype
        return with_tensor(output, fuse(full, dilated, weight).to(dtype))

    # -- the batched passes ------------------------------------------------------------------------
    def _spatial_sample(self, arguments: dict, state) -> torch.Tensor:
        return self.attachment.latents.to_spatial(arguments[self.sample_name], state.latent_height, state.latent_width)

    def _run_batched(self, arguments: dict, crops: torch.Tensor, count: int):
        """The denoiser on `crops` (B count, C, h, w: sample b's crops at b count ...), every other
        per-sample argument repeated to match, in calls of at most max_batch crops per sample.
        Returns the spatial predictions (float32) and the output object of the last call."""
        info, config, latents = self.info, self.config, self.attachment.latents
        batch = crops.shape[0] // count
        h, w = crops.shape[-2:]
        inputs = latents.from_spatial(crops.to(arguments[self.sample_name].dtype))
        grid_arguments = latents.sub_grid_arguments(arguments, h, w)  # the crops' own position ids
        chunk = (config.max_batch or count) * batch
        # Hooks that read the call's size (RoPE scaling, entropy factors, windows) see the crops' size.
        state = self.attachment.state
        self.attachment.state = dataclasses.replace(state, height=h * info.latent_factor, width=w * info.latent_factor)
        try:
            outputs, output = self._forward_chunks(arguments, inputs, batch, count, chunk, grid_arguments)
        finally:
            self.attachment.state = state
        return latents.to_spatial(torch.cat(outputs).float(), h, w), output

    def _forward_chunks(self, arguments: dict, inputs: torch.Tensor, batch: int, count: int, chunk: int,
                        grid_arguments: dict):
        outputs, output = [], None
        for start in range(0, inputs.shape[0], chunk):
            window = slice(start, start + chunk)
            piece = {}
            for name, value in arguments.items():
                if name == self.sample_name:
                    continue
                if isinstance(value, torch.Tensor) and value.ndim == 2 and name.endswith("_ids"):
                    piece[name] = value  # per-token position ids (Flux's img_ids / txt_ids), not per sample
                else:
                    piece[name] = _expand_batch(value, batch, count, window)
            piece.update(grid_arguments)
            piece[self.sample_name] = inputs[window]
            output = self.fn_ref.original_forward(**piece)
            outputs.append(output_tensor(output))
        return outputs, output

    def _as_output_layout(self, spatial: torch.Tensor) -> torch.Tensor:
        return self.attachment.latents.from_spatial(spatial)

    def dilated_prediction(self, arguments: dict, state, strides: tuple[int, int], cosine: float) -> torch.Tensor:
        """The denoiser's prediction for every position, each from its sub-lattice (same layout as its output)."""
        info, config = self.info, self.config
        lh, lw = state.latent_height, state.latent_width
        spatial = self._spatial_sample(arguments, state)
        blurred = gaussian_blur(spatial, strides, blur_sigma(cosine, config.sigma, config.blur_exponent))
        multiple = max(1, info.size_multiple // info.latent_factor)
        ph, pw = padded_size(lh, strides[0], multiple), padded_size(lw, strides[1], multiple)
        if (ph, pw) != (lh, lw):
            blurred = F.pad(blurred, (0, pw - lw, 0, ph - lh), mode="replicate")
        predicted, _ = self._run_batched(arguments, split_lattices(blurred, strides), strides[0] * strides[1])
        return self._as_output_layout(merge_lattices(predicted, strides)[:, :, :lh, :lw])

    def local_prediction(self, arguments: dict, state, window: tuple[int, int], slot):
        """MultiDiffusion's average over overlapping base-size windows, jittered per step (replaces the
        full-size call); returns it in the output's layout and the last call's output object."""
        config = self.config
        spatial = self._spatial_sample(arguments, state)
        lh, lw = spatial.shape[-2:]
        wh, ww = min(window[0], lh), min(window[1], lw)
        generator = slot.generator or state.generator(TECHNIQUE_NAME + ".windows")
        slot.generator = generator
        if slot.windows and slot.windows_step == state.step_index:
            # true CFG's second call of the step (Flux, Flux.2 [klein], Chroma): the same windows as the first,
            # so cond and uncond are combined over one layout, as in a batched CFG call
            boxes = slot.windows[-1]
        else:
            boxes = window_boxes((lh, lw), (wh, ww), config.window_stride, generator)
            slot.windows.append(boxes)
            slot.windows_step = state.step_index
        crops = gather_windows(spatial, boxes, (wh, ww))
        predicted, output = self._run_batched(arguments, crops, len(boxes))
        return self._as_output_layout(average_windows(predicted, boxes, (wh, ww), (lh, lw))), output


def install(attachment, config: DilatedSamplingConfig) -> None:
    config.validate_for(attachment.info)
    attachment.add_hook(attachment.denoiser, DilatedSamplingHook(attachment, config), HOOK_NAME)
