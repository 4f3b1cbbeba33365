"""Bad input gets an error naming the parameter, the value and what would work."""

import pytest

import hires
from tiny_models import build, generate


@pytest.mark.parametrize(
    "family, size, message",
    [
        ("sd15", (100, 64), r"height=100 is not a multiple of 8.*use 96 or 104"),
        ("sdxl", (64, 60), r"width=60 is not a multiple of 8.*use 56 or 64"),
        ("flux", (64, 72), r"width=72 is not a multiple of 16.*flux.*use 64 or 80"),
        ("sd3", (88, 64), r"height=88 is not a multiple of 16.*sd3.*use 80 or 96"),
        ("pixart", (64, 40), r"width=40 is not a multiple of 16.*pixart.*use 32 or 48"),
        ("sd21", (-64, 64), r"height=-64 must be positive"),
        ("qwenimage", (64, 72), r"width=72 is not a multiple of 16.*qwenimage.*use 64 or 80"),
        ("qwenimage", (40, 64), r"height=40 is not a multiple of 16.*qwenimage.*use 32 or 48"),
        # ZImagePipeline has no check_inputs for hires to wrap: its own first check names the multiple
        ("zimage", (64, 72), r"Width must be divisible by 16 \(got 72\)"),
        ("ernie_image", (64, 72), r"Height and width must be divisible by 16"),  # nor has ErnieImagePipeline
        # HiDreamImagePipeline floors sizes to 16 before its check_inputs: hires checks the request first
        ("hidream", (64, 72), r"width=72 is not a multiple of 16.*hidream.*use 64 or 80"),
    ],
)
def test_sizes_the_family_cannot_do(family, size, message):
    pipe = hires.apply(build(family), hires.HiresConfig())
    with pytest.raises(ValueError, match=message):
        generate(pipe, family, size)


def test_krea2_sizes_are_checked_before_the_pipeline_rounds_them_up():
    # Krea2Pipeline rounds a size up to its multiple of 16 (with a warning) before its check_inputs; the ready
    # pipeline checks the request first.
    pipe = hires.HiresKrea2Pipeline.from_pipe(build("krea2"))
    pipe.default_sample_size = 8
    with pytest.raises(ValueError, match=r"width=72 is not a multiple of 16.*krea2.*use 64 or 80"):
        generate(pipe, "krea2", (64, 72), hires_config=hires.HiresConfig())


def test_qwenimage21_sizes_are_checked_before_the_pipeline_floors_them():
    # QwenImage21Pipeline floors a size to its multiple of 32 (with a warning) before anything hires wraps; the
    # ready pipeline checks the request first.
    pipe = hires.HiresQwenImage21Pipeline.from_pipe(build("qwenimage21"))
    with pytest.raises(ValueError, match=r"width=80 is not a multiple of 32.*qwenimage21.*use 64 or 96"):
        generate(pipe, "qwenimage21", (64, 80), hires_config=hires.HiresConfig())


def test_unknown_call_arguments_are_errors_even_where_the_pipeline_swallows_them():
    pipe = hires.apply(build("pixart"), hires.HiresConfig())
    with pytest.raises(TypeError,
                       match=r"unknown keyword argument\(s\) callback_on_step_end=.*valid arguments are:.*callback"):
        generate(pipe, "pixart", 64, callback_on_step_end=lambda *a: {})
    pipe = hires.apply(build("sd15"))
    with pytest.raises(TypeError, match="sharpness_factor"):
        generate(pipe, "sd15", 64, sharpness_factor=1.0)


def test_unknown_config_options_and_wrong_config_types():
    with pytest.raises(TypeError, match=r"unknown option HiresConfig\.sharpness_factor=1.0"):
        hires.HiresConfig.from_dict({"sharpness_factor": 1.0})
    with pytest.raises(TypeError, match="must be a mapping"):
        hires.HiresConfig.from_dict([("a", 1)])
    with pytest.raises(TypeError, match=r"config='fast' must be a hires.HiresConfig"):
        hires.apply(build("sd15"), "fast")
    with pytest.raises(TypeError):
        hires.HiresConfig(sharpness_factor=1.0)


def test_position_options_that_contradict_each_other():
    with pytest.raises(ValueError,
                       match=r"yarn_beta_fast/yarn_beta_slow=\(2.0, None\) "
                             r"act only with rope='yarn' \(got rope='ntk'\)"):
        hires.PositionConfig(rope="ntk", yarn_beta_fast=2.0)
    with pytest.raises(ValueError,
                       match=r"needs yarn_beta_fast > yarn_beta_slow > 0 .*got yarn_beta_fast=0.5, "
                             r"yarn_beta_slow=1.0"):
        hires.PositionConfig(yarn_beta_fast=0.5, yarn_beta_slow=1.0)
    hires.PositionConfig(rope="yarn", yarn_beta_fast=1.25, yarn_beta_slow=0.75)
