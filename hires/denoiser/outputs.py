"""A denoiser's (or block's) output in any of the forms diffusers returns: the prediction and a copy with another."""

from __future__ import annotations

import dataclasses

import torch


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
