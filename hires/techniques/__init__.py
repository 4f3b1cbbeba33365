"""Techniques: each one is pure math plus the module patch that uses it, installed by hires.apply."""
