"""Prompt batches: read a prompt file, render each item once, survive kills, shard over processes.

Files: `.txt` (one prompt a line; blank lines and lines starting with '#' skipped), `.jsonl` (one
object a line with "prompt" and optional overrides), `.csv` (a header row with a "prompt" column
and optional override columns). Every finished image is a PNG written atomically (temporary file,
then rename) that carries its own parameters, so the PNGs are the record of what is done: the
manifest is rebuilt from them, a rerun skips them and redoes everything else.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from .config import closest_names

# Per-item keys a prompt file may set; anything else is an error naming the line.
OVERRIDE_KEYS = ("prompt", "negative", "size", "steps", "guidance", "seed", "name")
MANIFEST = "manifest.json"
PNG_JSON_KEY = "hires"


class PromptFileError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class BatchItem:
    index: int  # position in the file (0-based, counting only items)
    line: int  # 1-based line number in the file, for messages
    prompt: str
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        if "name" in self.overrides:
            return str(self.overrides["name"])
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40] or "prompt"
        return f"{self.index:05d}-{slug}"

    @property
    def filename(self) -> str:
        return f"{self.name}.png"


def _check_overrides(values: dict[str, Any], where: str) -> dict[str, Any]:
    for key in values:
        if key not in OVERRIDE_KEYS:
            raise PromptFileError(
                f"{where}: unknown override key {key!r}; valid keys are {', '.join(OVERRIDE_KEYS)} "
                f"(closest: {closest_names(key, OVERRIDE_KEYS)})"
            )
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{where}: needs a non-empty 'prompt' (got {prompt!r})")
    for key, kind in (("steps", int), ("seed", int), ("guidance", float)):
        if key in values and values[key] not in (None, ""):
            try:
                values[key] = kind(values[key])
            except (TypeError, ValueError):
                raise PromptFileError(f"{where}: {key}={values[key]!r} must be a {kind.__name__}") from None
    if "name" in values and not re.fullmatch(r"[A-Za-z0-9._-]+", str(values["name"])):
        raise PromptFileError(f"{where}: name={values['name']!r} may contain only letters, digits, '.', '_' and '-'")
    return {k: v for k, v in values.items() if v not in (None, "")}


def read_prompt_file(path: str | Path) -> list[BatchItem]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise PromptFileError(f"prompt file {str(path)!r} must end in .txt, .jsonl or .csv")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PromptFileError(f"cannot read prompt file {str(path)!r}: {err}") from None

    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".txt":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append((number, {"prompt": line.strip()}))
    elif suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(value, dict):
                raise PromptFileError(f"{path}:{number}: each line must be a JSON object with a 'prompt'")
            rows.append((number, value))
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise PromptFileError(f"{path}:1: the header row needs a 'prompt' column (got {reader.fieldnames})")
        for record in reader:
            if None in record:
                raise PromptFileError(f"{path}:{reader.line_num}: more fields than header columns")
            rows.append((reader.line_num, dict(record)))

    items = []
    for index, (number, values) in enumerate(rows):
        values = _check_overrides(dict(values), f"{path}:{number}")
        prompt = values.pop("prompt")
        items.append(BatchItem(index=index, line=number, prompt=prompt, overrides=values))
    names = [item.name for item in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PromptFileError(f"{path}: output names repeat ({', '.join(duplicates)}); give each item a unique 'name'")
    if not items:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts")
    return items


def read_png_record(path: Path, verify: bool = False) -> dict[str, Any] | None:
    """The parameters a finished PNG carries, or None if it is not a hires PNG.

    Text chunks precede the image data, so opening reads them; `verify` also decodes the pixels.
    """
    from PIL import Image

    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            if verify:
                image.load()  # a truncated file raises here
            return json.loads(image.text[PNG_JSON_KEY])
    except Exception:
        return None


def is_finished(out_dir: Path, item: BatchItem) -> bool:
    return read_png_record(out_dir / item.filename, verify=True) is not None


def remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files of writes a killed run never finished."""
    for stale in out_dir.glob(".*.png.*.tmp"):
        stale.unlink(missing_ok=True)


def write_manifest(out_dir: Path, items: list[BatchItem], source: str) -> dict[str, Any]:
    """Rebuild the manifest from the PNGs on disk, and write it atomically."""
    from .io import write_text_atomically

    entries = []
    for item in items:
        record = read_png_record(out_dir / item.filename)
        entries.append({
            "index": item.index,
            "line": item.line,
            "prompt": item.prompt,
            "file": item.filename,
            "status": "done" if record is not None else "pending",
            "parameters": record,
        })
    manifest = {
        "source": source,
        "items": entries,
        "done": sum(e["status"] == "done" for e in entries),
        "total": len(entries),
    }
    write_text_atomically(out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest
