"""A short `hires generate` for the command-line check tests (their fixtures no_weights / no_model are in conftest)."""

from hires.cli import main


def generate(tmp_path, *args):
    return main(["generate", "--prompt", "x", "--out", str(tmp_path / "o.png"), "--quiet", *args])
