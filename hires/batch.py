"""Prompt batches: read a prompt file, render each item once, survive kills, share a folder safely.

Files: `.txt` (one prompt a line; blank lines and lines starting with '#' skipped), `.jsonl` (one
object a line with "prompt" and optional overrides), `.csv` (a header row with a "prompt" column
and optional override columns). Every value is type- and range-checked when the file is read, so
a bad line stops the batch before the first render, with the file, line and field in the message.

Resume rule: an item is identified by a key, a hash of everything that decides its pixels (prompt,
negative prompt, seed, size, steps, guidance, model, the weights' identity, dtype, the whole
HiresConfig, hires version).
Each PNG carries its key; a rerun keeps a PNG whose key matches and re-renders one whose key does
not (or that is missing or truncated). The manifest is rebuilt from the PNGs on disk, so it always
says what the PNGs are.

Concurrency: before rendering an item a process claims it with `.NAME.png.claim` (created with
O_EXCL, then held under an flock for as long as the process renders it). A claim whose lock is free
belongs to a killed process and is taken over, so several `hires batch` runs (or accelerate ranks)
on one folder render every item once and lose none.

Failures: an item whose render failed (non-finite output) has no PNG; `.NAME.png.failed` holds its
key and the reason, the manifest lists it as `failed`, and the next run retries it. Leases: each
live batch holds a locked `.hires-batch.PID.*.lease` with the fingerprint of its whole parameter
set; a batch of another set is refused while one is alive, so a folder never mixes two sets.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from .config import closest_names
from .validation import check_strength

# Per-item keys a prompt file may set; anything else is an error naming the line.
OVERRIDE_KEYS = ("prompt", "negative", "size", "steps", "guidance", "seed", "name", "image", "strength")
MANIFEST = "manifest.json"
PNG_JSON_KEY = "hires"
SEED_LIMIT = 2**63  # seeds are in [0, 2**63): what every torch generator accepts
CLAIM_SUFFIX = ".claim"
FAILED_SUFFIX = ".failed"  # `.NAME.png.failed`: why the last render of the item failed (no PNG was written)
LEASE_PREFIX, LEASE_SUFFIX = ".hires-batch.", ".lease"  # a live batch's claim on the whole folder
# A claim file with no owner written yet is taken over only after this long: its creator may be
# between creating it and locking it.
UNWRITTEN_CLAIM_AGE_S = 10.0
CLAIM_POLL_S = 0.05  # how often a claimant looks again at such a claim meanwhile
_HELD, _UNWRITTEN, _FREED = "held", "unwritten", "freed"  # what a claimant finds in an existing claim file


class PromptFileError(ValueError):
    pass


# Bounds that keep every value far from overflow. Guidance scales in use are 1-20; at 1e308 the
# prediction overflows into NaN. No scheduler trains on more than a few thousand timesteps (the
# model's own limit, its scheduler's num_train_timesteps, is checked once its configs are read).
MAX_GUIDANCE = 100.0
MAX_STEPS = 10_000
MAX_SCALE = 256.0  # a factor of the base side: 256x a 1024 px model is a 262144 px side
MAX_SIDE = 2**20  # pixels per side; the decoded image must also fit this machine's RAM


# -- values a request carries: checked the same for command-line options and prompt files -------
def check_steps(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}={value!r} must be a whole number of denoising steps >= 1, e.g. 20")
    if value > MAX_STEPS:
        raise ValueError(f"{where}={value!r} is more denoising steps than any scheduler has timesteps "
                         f"(at most {MAX_STEPS}; the model's scheduler sets its own limit, usually 1000), e.g. 20")
    return value


def check_seed(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{where}={value!r} must be a whole number in [0, 2**63), e.g. 0")
    return value


def check_guidance(value: Any, where: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            or value > MAX_GUIDANCE):
        raise ValueError(f"{where}={value!r} must be a finite number >= 0 and at most {MAX_GUIDANCE:g} "
                         "(classifier-free guidance scale; scales in use are 1 to 20, far larger ones overflow into "
                         "NaN), e.g. 5")
    return float(value)


def check_scale(value: Any, where: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            or value > MAX_SCALE):
        raise ValueError(f"{where}={value!r} must be a finite number > 0 and at most {MAX_SCALE:g} (a factor of the "
                         "model's base side), e.g. 2")
    return float(value)


def parse_size(value: Any, where: str) -> tuple[int, int]:
    """'1024x768' -> (height 768, width 1024): sizes are written width x height, like image editors."""
    parts = value.lower().replace("*", "x").split("x") if isinstance(value, str) else []
    if len(parts) != 2 or not all(re.fullmatch(r"[0-9]+", p.strip()) for p in parts):  # ASCII digits only
        raise ValueError(f"{where}={value!r} must look like WIDTHxHEIGHT in pixels, e.g. 128x128")
    if any(len(p.strip()) > len(str(MAX_SIDE)) for p in parts):  # before int(): a 5000-digit side is refused by int
        raise ValueError(f"{where}={value!r}: a side has more than {MAX_SIDE} pixels; e.g. 4096x4096")
    width, height = (int(p) for p in parts)
    if width < 1 or height < 1:
        raise ValueError(f"{where}={value!r}: width and height must be positive pixel counts, e.g. 128x128")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ValueError(f"{where}={value!r}: a side has more than {MAX_SIDE} pixels; e.g. 4096x4096")
    return height, width


def _whole_number(text: str) -> Any:
    """A CSV cell as an int if it is one, else the text (which the check then rejects by name)."""
    # int() refuses more than 4300 digits; such a cell is no step count or seed anyway
    return int(text) if re.fullmatch(r"[+-]?\d{1,100}", text.strip()) else text


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


# -- prompt files -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchItem:
    index: int  # position in the file (0-based, counting only items)
    line: int  # 1-based line number in the file, for messages
    prompt: str
    overrides: dict[str, Any]
    source: str = ""  # the file, for messages

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def name(self) -> str:
        if "name" in self.overrides:
            return str(self.overrides["name"])
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40] or "prompt"
        return f"{self.index:05d}-{slug}"

    @property
    def filename(self) -> str:
        return f"{self.name}.png"


def _check_overrides(values: dict[str, Any], where: str, from_text: bool) -> dict[str, Any]:
    """Type- and range-check one item. `from_text`: CSV cells, where every value arrives as a string."""
    for key in values:
        if key not in OVERRIDE_KEYS:
            raise PromptFileError(
                f"{where}: unknown override key {key!r}; valid keys are {', '.join(OVERRIDE_KEYS)} "
                f"(closest: {closest_names(str(key), OVERRIDE_KEYS)})"
            )
    # An empty CSV cell means "not given"; in JSON, leave the key out (null is accepted the same way).
    values = {k: v for k, v in values.items() if v is not None and not (from_text and v == "")}
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{where}: needs a non-empty 'prompt' string (got {prompt!r})")
    if from_text:
        for key, convert in (("steps", _whole_number), ("seed", _whole_number), ("guidance", _number),
                             ("strength", _number)):
            if key in values:
                values[key] = convert(values[key])
    checks = {"steps": check_steps, "seed": check_seed, "guidance": check_guidance, "strength": check_strength}
    try:
        for key, check in checks.items():
            if key in values:
                values[key] = check(values[key], key)
        if "size" in values:
            parse_size(values["size"], "size")
        if "negative" in values and not isinstance(values["negative"], str):
            raise ValueError(f"negative={values['negative']!r} must be a string (the negative prompt)")
        if "image" in values and not (isinstance(values["image"], str) and values["image"].strip()):
            raise ValueError(f"image={values['image']!r} must be a picture's path (relative to the prompt file's "
                             "folder, or absolute)")
        if "strength" in values and "image" not in values:
            raise ValueError(f"strength={values['strength']!r} needs an 'image' in the same item: it says how much "
                             "of that picture is redrawn")
    except ValueError as err:
        raise PromptFileError(f"{where}: {err}") from None
    if "name" in values and not (isinstance(values["name"], str) and re.fullmatch(r"[A-Za-z0-9._-]+", values["name"])):
        raise PromptFileError(f"{where}: name={values['name']!r} may contain only letters, digits, '.', '_' and '-'")
    if "name" in values and values["name"].startswith("."):  # hidden, beside hires's own claim and lease files
        suggestion = values['name'].lstrip('.') or 'image'
        raise PromptFileError(f"{where}: name={values['name']!r} must not start with '.'; e.g. {suggestion!r}")
    return values


def read_prompt_file(path: str | Path) -> list[BatchItem]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise PromptFileError(f"prompt file {str(path)!r} must end in .txt, .jsonl or .csv")
    from .io import ReadError, loads_strict, read_text

    try:
        text = read_text(path, "prompt file")
    except ReadError as err:
        raise PromptFileError(str(err)) from None

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
                # NaN, Infinity, 1e309 and repeated keys: refused here, not as a guidance later.
                value = loads_strict(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
            except ValueError as err:
                raise PromptFileError(f"{path}:{number}: {err}") from None
            if not isinstance(value, dict):
                raise PromptFileError(f"{path}:{number}: each line must be a JSON object with a 'prompt'")
            rows.append((number, value))
    else:
        rows = _csv_rows(text, path)

    items = []
    for index, (number, values) in enumerate(rows):
        values = _check_overrides(dict(values), f"{path}:{number}", from_text=suffix == ".csv")
        prompt = values.pop("prompt")
        if "image" in values:  # a picture beside the prompt file is named from its folder
            values["image"] = str(path.parent / Path(values["image"]).expanduser())
        items.append(BatchItem(index=index, line=number, prompt=prompt, overrides=values, source=str(path)))
    names = [item.name.casefold() for item in items]  # "Cat" and "cat" are one file on macOS and Windows
    duplicates = sorted({item.name for item in items if names.count(item.name.casefold()) > 1})
    if duplicates:
        raise PromptFileError(f"{path}: output names repeat ({', '.join(duplicates)}); give each item a unique 'name'")
    if not items:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts")
    return items


def _csv_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(first line, record) of every CSV row; a stray or unterminated quote is an error naming its line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, header, line = [], None, 1
    try:
        for cells in reader:
            start, line = line, reader.line_num + 1  # a quoted cell may span lines: report where the row starts
            if header is None:
                header = [c.strip() for c in cells]
                if "prompt" not in header:
                    hint = ""
                    if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
                        hint = "; the file looks separated by another character than ',': save it as comma-separated"
                    raise PromptFileError(f"{path}:{start}: the header row needs a 'prompt' column "
                                          f"(got {header}){hint}")
                unknown = [c for c in header if c not in OVERRIDE_KEYS]
                if unknown:
                    raise PromptFileError(f"{path}:{start}: unknown column {unknown[0]!r}; valid columns are "
                                          f"{', '.join(OVERRIDE_KEYS)} "
                                          f"(closest: {closest_names(unknown[0], OVERRIDE_KEYS)})")
                repeated = sorted({c for c in header if header.count(c) > 1})
                if repeated:
                    raise PromptFileError(f"{path}:{start}: the header row names {', '.join(map(repr, repeated))} "
                                          "more than once; give each column once")
                continue
            if not cells:
                continue  # a blank line
            if len(cells) > len(header):
                raise PromptFileError(f"{path}:{start}: more fields than header columns ({len(cells)} > "
                                      f"{len(header)}); quote a cell that holds a comma, e.g. \"red, round\"")
            rows.append((start, dict(zip(header, cells))))
    except csv.Error as err:
        raise PromptFileError(f"{path}:{line}: {err} (a quote opened here is never closed, or a quoted cell is "
                              "followed by more text); close the quote, or double a quote inside a quoted cell "
                              '("")') from None
    if header is None:
        raise PromptFileError(f"{path}:1: the header row needs a 'prompt' column (the file is empty)")
    return rows


# -- keys and records ---------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """Strict-JSON form: tuples as lists, non-finite floats as strings ('inf'), dataclasses as dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def dumps(value: Any, **options) -> str:
    """JSON that any reader accepts: never a bare NaN or Infinity."""
    return json.dumps(jsonable(value), allow_nan=False, **options)


def parameters_key(parameters: dict[str, Any]) -> str:
    """The identity of a render: a hash of the parameters that decide its pixels."""
    canonical = dumps(parameters, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


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
    # PIL's ways of saying "not a whole PNG"
    except (OSError, EOFError, SyntaxError, ValueError, KeyError, AttributeError):
        return None


def is_finished(out_dir: Path, item: BatchItem, key: str) -> bool:
    """A complete PNG of exactly these parameters is on disk."""
    record = read_png_record(out_dir / item.filename, verify=True)
    return record is not None and record.get("key") == key


def remove_temporaries(out_dir: Path, item: BatchItem) -> None:
    """Temporary files of a write of `item` that a killed process never finished (call while holding its claim)."""
    for stale in out_dir.glob(f".{glob_escape(item.filename)}.*.tmp"):
        stale.unlink(missing_ok=True)


def has_leftovers(out_dir: Path, item: BatchItem) -> bool:
    """A claim, temporary or failure file beside the item (a killed run's, or one already outdated)."""
    return (claim_path(out_dir, item).exists() or failure_path(out_dir, item).exists()
            or any(out_dir.glob(f".{glob_escape(item.filename)}.*.tmp")))


def clean_leftovers(out_dir: Path, item: BatchItem) -> None:
    """Remove what killed or failed runs left beside a finished item; a live process's claim stays."""
    claim = try_claim(out_dir, item)
    if claim is None:
        return  # a live process holds it
    try:
        remove_temporaries(out_dir, item)
        failure_path(out_dir, item).unlink(missing_ok=True)
    finally:
        claim.release()


# -- failures: an item whose render failed has no PNG, but the manifest says why -------------------
def failure_path(out_dir: Path, item: BatchItem) -> Path:
    return out_dir / f".{item.filename}{FAILED_SUFFIX}"


def record_failure(out_dir: Path, item: BatchItem, key: str, error: str, **extra: Any) -> None:
    """Note that rendering `item` with `key` failed (best effort: a full disk may refuse even this)."""
    from .io import write_text_atomically

    record = {"key": key, "error": error, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
              **extra}
    try:
        write_text_atomically(failure_path(out_dir, item), dumps(record) + "\n")
    except OSError:
        pass


def clear_failure(out_dir: Path, item: BatchItem) -> None:
    failure_path(out_dir, item).unlink(missing_ok=True)


def read_failure(out_dir: Path, item: BatchItem) -> dict[str, Any] | None:
    try:
        record = json.loads(failure_path(out_dir, item).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# -- claims -------------------------------------------------------------------------------------
try:
    import fcntl
except ImportError:  # Windows: claims still exclude, but a killed run's claims must be deleted by hand
    fcntl = None


def _lock(fd: int, blocking: bool) -> bool:
    if fcntl is None:
        return blocking
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


@dataclasses.dataclass
class Claim:
    path: Path
    fd: int

    def release(self) -> None:
        # Unlink while still holding the lock: nobody can take over a claim that is being released.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def claim_path(out_dir: Path, item: BatchItem) -> Path:
    return out_dir / f".{item.filename}{CLAIM_SUFFIX}"


def try_claim(out_dir: Path, item: BatchItem) -> Claim | None:
    """Claim `item` for this process, or None if a live process holds it."""
    path = claim_path(out_dir, item)
    takeovers = 0
    while takeovers < 5:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        except FileExistsError:
            state = _claim_state(path)
            if state == _HELD:
                return None
            if state == _UNWRITTEN:
                # Its creator locks it within moments, or was killed first: then it ages out (bounded wait).
                time.sleep(CLAIM_POLL_S)
            else:
                takeovers += 1
            continue
        try:
            _lock(fd, blocking=True)  # a takeover check may hold it for a moment
            try:
                ours = os.stat(path).st_ino == os.fstat(fd).st_ino  # else: stalled too long and taken over
            except FileNotFoundError:
                ours = False
            if not ours:
                os.close(fd)
                return None
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
            os.fsync(fd)
        except BaseException:  # e.g. Ctrl-C while claiming: leave no claim behind
            Claim(path, fd).release()
            raise
        return Claim(path, fd)
    return None


def _claim_state(path: Path) -> str:
    """Look at an existing claim file: _HELD by a live process, _UNWRITTEN (just created, not locked yet; left
    alone until UNWRITTEN_CLAIM_AGE_S), or _FREED (gone, replaced, or a dead owner's and removed here)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return _FREED  # released meanwhile
    try:
        if fcntl is None:
            return _HELD
        if not _lock(fd, blocking=False):
            return _HELD  # its owner is alive and rendering
        # We hold the lock of this claim file: nobody else decides about it now.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            return _FREED
        if current.st_ino != os.fstat(fd).st_ino:
            return _FREED  # already replaced by a fresh claim: look at that one
        written = os.read(fd, 4096)
        if not written and time.time() - current.st_mtime < UNWRITTEN_CLAIM_AGE_S:
            return _UNWRITTEN
        path.unlink()
        return _FREED
    finally:
        os.close(fd)


def claim_owner(out_dir: Path, item: BatchItem) -> dict[str, Any] | None:
    """Who holds the claim of `item` (pid, host), if a live process does."""
    path = claim_path(out_dir, item)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # nobody holds it: a killed run's leftover, taken over on the next run
            except BlockingIOError:
                pass
        try:
            return json.loads(os.read(fd, 4096) or b"{}")
        except ValueError:
            return {}
    finally:
        os.close(fd)


# -- the manifest -------------------------------------------------------------------------------
def write_manifest(out_dir: Path, entries: list[tuple[BatchItem, str, dict[str, Any]]], source: str) -> dict[str, Any]:
    """Rebuild the manifest from the PNGs on disk, and write it atomically.

    `entries`: each item with its key and resolved request. Writers take an flock on the folder, so
    the last manifest written was read after every PNG before it: concurrent runs end consistent.
    """
    from .io import write_text_atomically

    folder = os.open(out_dir, os.O_RDONLY) if fcntl is not None else None
    try:
        if folder is not None:
            fcntl.flock(folder, fcntl.LOCK_EX)
        items = []
        for item, key, request in entries:
            # Text chunks only: a final name only ever holds a complete file (atomic writes).
            record = read_png_record(out_dir / item.filename)
            failure = read_failure(out_dir, item)
            error = None
            if record is not None and record.get("key") == key:
                status = "done"
            elif claim_owner(out_dir, item) is not None:
                status = "rendering"  # by another process right now
            elif failure is not None and failure.get("key") == key:
                status, error = "failed", failure  # no PNG of these parameters; the next run retries it
            elif record is not None:
                status = "outdated"  # a PNG of other parameters: the next run replaces it
            else:
                status = "pending"
            entry = {"index": item.index, "line": item.line, "prompt": item.prompt, "file": item.filename,
                     "key": key, "status": status, "request": request, "png": record}
            if error is not None:
                entry["error"] = error
            items.append(entry)
        listed = {item.filename for item, _, _ in entries}
        manifest = {
            "source": source,
            "resume": "an item is done when its PNG's key (a hash of its parameters) matches the request's",
            "items": items,
            "done": sum(e["status"] == "done" for e in items),
            "failed": sum(e["status"] == "failed" for e in items),
            "total": len(items),
            "unlisted": sorted(p.name for p in out_dir.glob("*.png") if p.name not in listed),
        }
        write_text_atomically(out_dir / MANIFEST, dumps(manifest, indent=1) + "\n")
        return manifest
    finally:
        if folder is not None:
            os.close(folder)  # releases the lock


# -- one parameter set per folder ---------------------------------------------------------------
class FolderBusy(Exception):
    """Another live batch with other parameters renders into the folder."""


@dataclasses.dataclass
class FolderLease:
    """This process's share of a folder: a file it holds locked while its batch runs."""

    path: Path
    fd: int | None

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)


def parameters_fingerprint(entries: list[tuple[BatchItem, str, dict[str, Any]]]) -> str:
    """The identity of a batch's whole parameter set: every item's file name and key."""
    return parameters_key({"items": sorted([item.filename, key] for item, key, _ in entries)})


def lease_folder(out_dir: Path, fingerprint: str, summary: dict[str, Any]) -> FolderLease:
    """Take a share of `out_dir` for a batch of `fingerprint`, or raise `FolderBusy` naming how a live
    batch's parameters differ. Batches of one parameter set (reruns, accelerate ranks) share a folder;
    two sets would mix images and manifests. A killed batch's lease is free and removed."""
    folder = os.open(out_dir, os.O_RDONLY) if fcntl is not None else None
    try:
        if folder is not None:
            fcntl.flock(folder, fcntl.LOCK_EX)  # one process decides at a time (as write_manifest)
        others = []
        for path in sorted(out_dir.glob(f"{glob_escape(LEASE_PREFIX)}*{LEASE_SUFFIX}")):
            holder = _live_lease(path)
            if holder is not None and holder.get("fingerprint") != fingerprint:
                others.append(holder)
        if others:
            raise FolderBusy(_busy_reason(out_dir, others[0], summary))
        path = out_dir / f"{LEASE_PREFIX}{os.getpid()}.{os.urandom(4).hex()}{LEASE_SUFFIX}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            record = {"fingerprint": fingerprint, "pid": os.getpid(), "host": socket.gethostname(),
                      "since": time.time(), **summary}
            os.write(fd, dumps(record).encode())
            os.fsync(fd)
        except BaseException:
            FolderLease(path, fd).release()
            raise
        return FolderLease(path, fd)
    finally:
        if folder is not None:
            os.close(folder)


def _live_lease(path: Path) -> dict[str, Any] | None:
    """The record of a lease whose batch is alive; a dead batch's lease is removed (None)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if fcntl is None:
            return None  # no way to tell a live lease here: share the folder, as before leases
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.read(fd, 1 << 20) or b"{}")
            except ValueError:
                return {}
        path.unlink(missing_ok=True)  # its batch is gone (we hold the folder's lock: nobody else decides)
        return None
    finally:
        os.close(fd)


def _busy_reason(out_dir: Path, holder: dict[str, Any], summary: dict[str, Any]) -> str:
    theirs, ours = holder.get("options") or {}, summary.get("options") or {}
    differences = [f"{key} {json.dumps(theirs.get(key))} there, {json.dumps(ours.get(key))} here"
                   for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]
    since = holder.get("since")
    since = time.strftime("%H:%M:%S", time.localtime(since)) if isinstance(since, float) else "?"
    what = "; ".join(differences) if differences else "its prompt file holds other items"
    return (f"--out {str(out_dir)!r} is being rendered by another batch with other parameters (pid "
            f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since {since}: {what}); one folder holds one "
            "parameter set at a time, or its images and manifest would mix. Wait for that batch to finish, or give "
            "this one another --out (the same parameters share a folder)")
