"""Rules the layout of hires/ keeps, read from the source with `ast` (each shown to catch a planted case):

- a technique's modules import no other technique (they meet through the record's relations, the stage
  engine's per-stage settings and the shared mechanisms below them);
- nothing outside hires/families.py compares a family's name or a string fact of a family or latent
  layout (`family.guidance_layout == "batched"`, `layout.packed_grid == "img_ids"`, `info.name == "flux"`):
  such facts are read through the family's properties and the layout's adapter (hires.sampling.latents).
Upward imports are test_layers.py's.
"""

from __future__ import annotations

import ast
import dataclasses
import typing

from test_layers import PACKAGE, all_modules, imports_of

import hires.families as families
from hires.techniques import BUILT_IN

TECHNIQUES = sorted({record.config_type.__module__.split(".")[2] for record in BUILT_IN})
_COMPARISONS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


def technique_of(module: str) -> str | None:
    """The technique package a module belongs to (hires.techniques.<name>...), or None."""
    parts = module.split(".")
    return parts[2] if len(parts) >= 3 and parts[:2] == ["hires", "techniques"] else None


def cross_technique_imports(name: str, targets: set[str]) -> list[str]:
    own = technique_of(name)
    if own is None:
        return []
    return sorted(f"{name} imports {target}" for target in targets
                  if technique_of(target) not in (None, own))


# Fields that name things to look up (a pipeline attribute, a call argument), not facts to branch on.
_NAMES = {"name", "denoiser_attr", "denoiser_class", "guidance_scale_name", "cfg_switch", "timestep_argument"}


def _string_facts() -> set[str]:
    """Attribute names of the str-valued fields of the family records."""
    names = set()
    for cls in (families.Family, families.LatentLayout, families.VAEKind):
        hints = typing.get_type_hints(cls)
        names.update(f.name for f in dataclasses.fields(cls) if hints[f.name] in (str, typing.Optional[str]))
    return names - _NAMES


STRING_FACTS = _string_facts()
FAMILY_NAMES = {family.name for family in families.FAMILIES}


def fact_comparisons(source: str) -> list[str]:
    """`line: text` of every comparison of a family name or of a string fact of a family / layout."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare) or not any(isinstance(op, _COMPARISONS) for op in node.ops):
            continue
        sides = [node.left, *node.comparators]
        constants = {v.value for side in sides for v in ast.walk(side)
                     if isinstance(v, ast.Constant) and isinstance(v.value, str)}
        facts = {side.attr for side in sides if isinstance(side, ast.Attribute) and side.attr in STRING_FACTS}
        if constants & FAMILY_NAMES or facts:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_fact_tables_are_what_the_rules_read():
    assert {"guidance_layout", "architecture", "packed_grid", "position_encoding", "shift_rule"} <= STRING_FACTS
    assert {"sd15", "flux", "qwenimage", "zimage"} <= FAMILY_NAMES
    assert len(TECHNIQUES) == len({r.name for r in BUILT_IN}) - 1  # the memory package holds two records


def test_no_technique_module_imports_another_technique():
    modules = all_modules()
    found = []
    for name, path in modules.items():
        found += cross_technique_imports(name, imports_of(name, path, modules))
    assert not found, "techniques importing each other:\n" + "\n".join(found)


def test_a_planted_cross_technique_import_is_found(tmp_path):
    modules = all_modules()
    source = "from ..apg import combiner\nfrom ...sampling import stages\nfrom . import config\n"
    name = "hires.techniques.window_attention.probe"
    targets = imports_of(name, tmp_path / "probe.py", modules, source)
    assert cross_technique_imports(name, targets) == [f"{name} imports hires.techniques.apg.combiner"]
    # the catalogue lists every technique; it is no technique itself
    assert cross_technique_imports("hires.techniques", {"hires.techniques.apg"}) == []


def test_no_family_or_layout_string_is_compared_outside_families():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "families.py" or "assets" in path.parts:
            continue
        found += [f"{path.relative_to(PACKAGE.parent)}:{hit}" for hit in fact_comparisons(path.read_text("utf-8"))]
    assert not found, "family / layout strings compared outside hires/families.py:\n" + "\n".join(found)


def test_planted_family_and_layout_comparisons_are_found():
    planted = '''
if info.family.guidance_layout == "batched":
    pass
if family.layout.packed_grid != "img_ids":
    pass
if info.name in ("flux", "chroma"):
    pass
ok = family.layout.packed and info.prediction_type == "flow" and side == "height"
'''
    assert [hit.split(":")[0] for hit in fact_comparisons(planted)] == ["2", "4", "6"]
