"""A denoiser's (or block's) output in any of the forms diffusers returns: the prediction, a copy with another,
and the hook that changes a call's prediction."""

from __future__ import annotations

import dataclasses
import inspect

import torch
from diffusers.hooks import ModelHook


def output_tensor(output):
    """The prediction in `output`: the tensor itself, the first item of a tuple, or a BaseOutput's `sample`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def with_tensor(output, tensor):
    """`output` in its own form with `tensor` in the prediction's place (a new object; `output` is left as it is)."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    return dataclasses.replace(output, sample=tensor)


class PredictionHook(ModelHook):
    """A denoiser hook that may change a call's prediction, knowing the latent and timestep it was made
    from. A subclass says when (`wanted(state)`: what `change` needs, or None to leave the call alone) and
    how (`change(prediction, sample, timestep, state, wanted)`: the new prediction)."""

    def __init__(self, attachment):
        super().__init__()
        self.attachment = attachment
        self.signature = inspect.signature(type(attachment.denoiser).forward)
        self.pending = None

    def wanted(self, state):
        return None

    def change(self, prediction, sample, timestep, state, wanted):
        return prediction

    def pre_forward(self, module, *args, **kwargs):
        self.pending = None
        state = self.attachment.state
        wanted = self.wanted(state) if state is not None else None
        if wanted is None:
            return args, kwargs
        bound = self.signature.bind_partial(module, *args, **kwargs).arguments
        sample = next(v for k, v in bound.items() if k != "self")
        self.pending = (sample, bound[self.attachment.info.family.timestep_argument], state, wanted)
        return args, kwargs

    def post_forward(self, module, output):
        if self.pending is None:
            return output
        sample, timestep, state, wanted = self.pending
        self.pending = None
        return with_tensor(output, self.change(output_tensor(output), sample, timestep, state, wanted))
