"""One adapter per latent layout (`hires.families.LatentLayout`): between what a family's denoiser and
pipeline hand around and the (B, C, h, w) latents every hires hook works on.

- spatial (UNets, PixArt, SD3): the denoiser takes (B, C, h, w) itself;
- packed tokens (Flux, Flux.2, Chroma, Qwen-Image): the pipeline packs 2x2 patches into
  (B, h/2 * w/2, 4C) tokens (`pack` / `unpack`); the token grid of a denoiser call is read from its
  `img_ids` (a row and a column id per token, on the axes `LatentLayout.id_axes` names) or its
  `img_shapes` ((frames, rows, cols) per image);
- a negated output (HiDream-I1): the spatial layout, its denoiser's output negated between the model and
  every hires hook (named hooks innermost and outermost), so the hooks see the velocity;
- an output led by text rows (Qwen-Image 2.1, on the call that fills its KV cache): cut to the latent's rows
  by a named hook innermost;
- a list of latents (Z-Image): the transformer takes a list of (C, 1, h, w) latents and the time
  1 - sigma and returns a list of negated velocities; two named hooks around every hires hook
  (`denoiser_view`) present it as a (B, C, h, w) tensor, sigma and the velocity, and hand back the
  pipeline's and the model's own objects when no technique changed them (so a call hires leaves alone
  is bit-identical).
Every adapter also turns a pipeline's output_type="latent" result back into denoiser latents, whether
the pipeline returns them as its denoiser sees them or (Flux.2 [klein]) as the VAE's own latent.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from ..denoiser.outputs import output_tensor, with_tensor
from . import latent_space

FRAME_LIST_HOOK = "hires.frame_list"
NEGATED_OUTPUT_HOOK = "hires.negated_output"
PREFIXED_OUTPUT_HOOK = "hires.latent_rows"


def pack(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/p * w/p, C p p): the packed token layout (row-major tokens, channel-major patches)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of `pack` for a latent grid of height x width."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.reshape(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


class LatentAdapter:
    """The spatial layout; the base of the others. `info`: the pipeline's hires.ModelInfo."""

    def __init__(self, info):
        self.info = info
        self.layout = info.family.layout
        self.patch = info.patch_size

    def to_spatial(self, x: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        """(B, C, h, w) latents of what the denoiser takes or returns for a latent grid of that size."""
        return x

    def from_spatial(self, z: torch.Tensor) -> torch.Tensor:
        """What the denoiser takes (and the scheduler steps) for (B, C, h, w) latents."""
        return z

    def grid(self, arguments: dict) -> tuple[int, int, int]:
        """(latent height, latent width, tokens after the image's own) of a denoiser call's bound arguments."""
        latents = next(v for k, v in arguments.items() if k != "self")
        return int(latents.shape[-2]), int(latents.shape[-1]), 0

    def output_to_spatial(self, output: torch.Tensor, latent_height: int, latent_width: int, vae) -> torch.Tensor:
        """(B, C, h, w) denoiser latents of what the pipeline returned for output_type="latent"."""
        if self.layout.returns_vae_latent:
            return latent_space.from_vae(self.layout, vae, output)
        return self.to_spatial(output, latent_height, latent_width)

    def output_to_latents(self, output: torch.Tensor, vae) -> torch.Tensor:
        """A pipeline's output_type="latent" result as its prepare_latents returns latents."""
        if not self.layout.returns_vae_latent:
            return output
        return self.from_spatial(latent_space.from_vae(self.layout, vae, output)).to(output.dtype)

    def sub_grid_arguments(self, arguments: dict, latent_height: int, latent_width: int) -> dict:
        """The denoiser arguments a call on a latent_height x latent_width part of the latent needs besides
        the part itself (the part's own position ids), beside `arguments` of the whole call."""
        return {}

    def denoiser_view(self):
        """((inner hook, name), (outer hook, name) or None) around every hires hook where the denoiser's own
        inputs or outputs are not the latent's tensors, else None."""
        return None


class PackedByIds(LatentAdapter):
    """Packed 2x2 tokens whose grid the denoiser reads from img_ids (Flux, Flux.2, Chroma)."""

    def to_spatial(self, x, latent_height, latent_width):
        return unpack(x, latent_height, latent_width, self.patch)

    def from_spatial(self, z):
        return pack(z, self.patch)

    def grid(self, arguments):
        ids = arguments["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        own = ids[:, 0] == 0  # Flux.2 appends reference images' tokens at time ids 10, 20, ...
        trailing = int((~own).sum())
        ids = ids[own]
        axes, step = self.layout.id_axes, self.layout.id_step
        rows = int(round(float(ids[:, axes.index("height")].max()) / step)) + 1
        cols = int(round(float(ids[:, axes.index("width")].max()) / step)) + 1
        return rows * self.patch, cols * self.patch, trailing

    def sub_grid_arguments(self, arguments, latent_height, latent_width):
        ids = arguments["img_ids"]
        return {"img_ids": self.ids_for_grid(ids.reshape(-1, ids.shape[-1]), latent_height // self.patch,
                                             latent_width // self.patch)}

    def ids_for_grid(self, template: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Position ids (rows cols, axes) of a rows x cols token grid, row-major as the pipeline packs: the
        height and width axes count rows and columns, the others keep the template's first token's value."""
        ids = template[0].expand(rows * cols, template.shape[-1]).clone()
        axes, step = self.layout.id_axes, self.layout.id_step
        row_ids = torch.arange(rows, device=ids.device, dtype=ids.dtype)
        col_ids = torch.arange(cols, device=ids.device, dtype=ids.dtype)
        if step != 1:
            row_ids, col_ids = row_ids * step, col_ids * step
        ids[:, axes.index("height")] = row_ids.repeat_interleave(cols)
        ids[:, axes.index("width")] = col_ids.repeat(rows)
        return ids


class PackedByShapes(PackedByIds):
    """Packed 2x2 tokens whose grid the denoiser reads from img_shapes (Qwen-Image)."""

    def grid(self, arguments):
        # per batch item (frames, rows, cols), or a list of them led by the image's (ControlNet pipelines
        # pass the bare tuples)
        shape = arguments["img_shapes"][0]
        _, rows, cols = shape[0] if isinstance(shape, list) else shape
        return int(rows) * self.patch, int(cols) * self.patch, 0

    def sub_grid_arguments(self, arguments, latent_height, latent_width):
        raise NotImplementedError("hires builds no img_shapes for a part of "
                                  "the latent (LatentLayout.sub_grids_refused)")

    def ids_for_grid(self, template, rows, cols):
        raise NotImplementedError("img_shapes layouts build no per-grid ids (LatentLayout.sub_grids_refused)")


class PackedByPositionIds(PackedByIds):
    """Packed 2x2 tokens whose grid the denoiser reads from position_ids: one (tokens, axes) tensor of the text
    rows, then the image's (Krea-2)."""

    def grid(self, arguments):
        tokens = next(v for k, v in arguments.items() if k != "self").shape[1]
        ids = arguments["position_ids"][-tokens:]
        axes = self.layout.id_axes
        rows, cols = int(ids[:, axes.index("height")].max()) + 1, int(ids[:, axes.index("width")].max()) + 1
        return rows * self.patch, cols * self.patch, 0

    def sub_grid_arguments(self, arguments, latent_height, latent_width):
        raise NotImplementedError("hires builds no position_ids for a part of "
                                  "the latent (LatentLayout.sub_grids_refused)")

    def ids_for_grid(self, template, rows, cols):
        raise NotImplementedError("position_ids layouts build no per-grid ids (LatentLayout.sub_grids_refused)")


class NegatedOutput(LatentAdapter):
    """A spatial denoiser that returns the negated velocity (HiDream-I1): hooks between the two halves see the
    velocity; a sign flip twice over hands the pipeline its own values bit for bit."""

    def denoiser_view(self):
        return (_Negate(), NEGATED_OUTPUT_HOOK + ".call"), (_Negate(), NEGATED_OUTPUT_HOOK + ".view")


class _Negate(ModelHook):
    def new_forward(self, module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        return with_tensor(output, -output_tensor(output))


class PrefixedOutput(PackedByShapes):
    """Patch-1 tokens whose grid is img_shapes' last image, from a denoiser whose output can lead with rows of its
    text (Qwen-Image 2.1's KV-cache prefill): every hires hook sees the latent's rows only. The pipeline keeps the
    same last rows of the output itself, so the cut hands it its own values."""

    def grid(self, arguments):
        shapes = arguments["img_shapes"][0]
        if len(shapes) > 1:
            raise ValueError(f"img_shapes lists {len(shapes) - 1} condition image(s) before the generated one: hires "
                             "runs this pipeline's text-to-image calls only; call it without image= (or remove "
                             "hires with hires.remove(pipe) for image-conditioned calls)")
        _, rows, cols = shapes[-1]
        return int(rows) * self.patch, int(cols) * self.patch, 0

    def denoiser_view(self):
        return (_LatentRowsOnly(), PREFIXED_OUTPUT_HOOK), None


class _LatentRowsOnly(ModelHook):
    def new_forward(self, module, *args, **kwargs):
        latents = args[0] if args else kwargs["hidden_states"]
        output = self.fn_ref.original_forward(*args, **kwargs)
        return with_tensor(output, output_tensor(output)[:, -latents.shape[1]:])


class FrameList(LatentAdapter):
    """Z-Image: a list of (C, 1, h, w) latents in, a list of negated velocities out, time 1 - sigma."""

    def denoiser_view(self):
        view = _FrameListView()
        inner = (_FrameListCall(view), FRAME_LIST_HOOK + ".call")
        outer = (_FrameListTensorView(view), FRAME_LIST_HOOK + ".view")
        return inner, outer


_PACKED = {"img_ids": PackedByIds, "img_shapes": PackedByShapes, "position_ids": PackedByPositionIds}


def adapter_for(info) -> LatentAdapter:
    """The adapter of `info`'s family's layout."""
    layout = info.family.layout
    kind = FrameList if layout.frame_list else _PACKED.get(layout.packed_grid, LatentAdapter)
    if layout.negated_output:
        kind = NegatedOutput
    if layout.prefixed_output:
        kind = PrefixedOutput
    return kind(info)


class _FrameListView:
    """What the two halves of the frame-list view share during one denoiser call."""

    def __init__(self):
        self.sample = self.time = self.frames = self.model_time = None
        self.velocity = self.raw_output = None


class _FrameListTensorView(ModelHook):
    """The outer half: hooks below this one see (B, C, h, w), sigma and the velocity; an unchanged view is
    handed back as the very objects the pipeline passed or the model returned."""

    def __init__(self, view: _FrameListView):
        super().__init__()
        self.view = view

    def new_forward(self, module, x, t, *args, **kwargs):
        if not isinstance(x, list) or not x or not isinstance(x[0], torch.Tensor):
            return self.fn_ref.original_forward(x, t, *args, **kwargs)  # omni inputs: nothing hires sees
        view = self.view
        view.frames, view.model_time = x, t
        view.sample = torch.stack([frame[:, 0] for frame in x])
        view.time = 1 - t
        view.velocity = view.raw_output = None
        output = self.fn_ref.original_forward(view.sample, view.time, *args, **kwargs)
        velocity = output_tensor(output)
        if velocity is view.velocity:
            return view.raw_output
        return with_tensor(output, [frame[:, None] for frame in (-velocity).unbind(0)])


class _FrameListCall(ModelHook):
    """The inner half: the denoiser's own list form, from the view's tensors (or the originals)."""

    def __init__(self, view: _FrameListView):
        super().__init__()
        self.view = view

    def new_forward(self, module, sample, time, *args, **kwargs):
        view = self.view
        if not isinstance(sample, torch.Tensor) or view.sample is None:
            return self.fn_ref.original_forward(sample, time, *args, **kwargs)
        frames = view.frames if sample is view.sample else [latent[:, None] for latent in sample.unbind(0)]
        model_time = view.model_time if time is view.time else 1 - time
        output = self.fn_ref.original_forward(frames, model_time, *args, **kwargs)
        view.raw_output = output
        view.velocity = -torch.stack([frame[:, 0] for frame in output_tensor(output)])
        return with_tensor(output, view.velocity)
