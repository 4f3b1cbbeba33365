"""Techniques: each module holds its math as pure functions and the hooks that apply it (see DESIGN.md)."""
