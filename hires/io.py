"""Atomic file writes, and strict readers of the files users write.

Writes: a temporary file in the same folder, fsync, then rename over the final name.

A reader never sees a truncated file under the final name, even if the writer is killed. The file
gets the permissions an ordinary `open()` would give (0o666 minus the umask), not tempfile's 0o600.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def temporary_prefix(name: str) -> str:
    return f".{name}."


# mkstemp adds 8 random characters; ".tmp" follows. Claims (".claim") and failure notes (".failed")
# beside a file are shorter.
_TEMPORARY_EXTRA = 8 + len(".tmp")


def longest_sibling_name(name: str) -> int:
    """Bytes of the longest file name written beside `name` (its temporary file's)."""
    return len(temporary_prefix(name).encode()) + _TEMPORARY_EXTRA


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # Before the rename, so the final name never carries tempfile's private 0o600.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def write_png_atomically(image, path: Path, text: dict[str, str] | None = None) -> None:
    """Save a PIL image as PNG with text chunks (written before the image data)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    write_atomically(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))


# -- reading the files users write (prompt files, --config) ---------------------------------------
class ReadError(ValueError):
    """A file that cannot be read as asked; the message names the file and what to do."""


MAX_TEXT_BYTES = 256 * 2**20  # a prompt file or config beyond this is a mistake, not a workload
_UTF16_32_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
                  b"\xfe\xff": "UTF-16"}


def read_text(path: Path, what: str) -> str:
    """The text of a UTF-8 file (a UTF-8 byte-order mark, as Excel writes, is dropped); any other
    encoding is a `ReadError` that says to save it as UTF-8."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file() and not path.is_dir():  # a device or a pipe: it may never end
            raise ReadError(f"{what} {str(path)!r} is not a regular file; give a file")
        size = path.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise ReadError(f"{what} {str(path)!r} is {size} bytes; text files of more than {MAX_TEXT_BYTES} bytes "
                            "are not read (split it)")
        data = path.read_bytes()
    except OSError as err:
        raise ReadError(f"cannot read {what} {str(path)!r}: {err.strerror or err}") from None
    for bom, name in _UTF16_32_BOMS.items():  # longest first: UTF-32 LE starts like UTF-16 LE
        if data.startswith(bom):
            raise ReadError(f"{what} {str(path)!r} is {name}-encoded (it starts with a {name} byte-order mark); "
                            "save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ReadError(f"{what} {str(path)!r} is not UTF-8: byte 0x{data[err.start]:02x} at line {line}, column "
                        f"{column} is not valid UTF-8 (Latin-1, Windows-1252 or another legacy encoding?); "
                        "save it as UTF-8") from None
    if "\x00" in text:
        raise ReadError(f"{what} {str(path)!r} holds NUL bytes, as UTF-16 text without a byte-order mark does; "
                        "save it as UTF-8")
    return text


class _NonFinite:
    """A JSON number that is not a finite float (NaN, Infinity, or a literal beyond the float range)."""

    def __init__(self, text: str):
        self.text = text


class _Object(dict):
    """A JSON object that remembers the keys it was given more than once."""

    repeated: tuple[str, ...] = ()


def _object_pairs(pairs):
    result = _Object()
    repeated = []
    for key, value in pairs:
        if key in result and key not in repeated:
            repeated.append(key)
        result[key] = value
    result.repeated = tuple(repeated)
    return result


def _float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def loads_strict(text: str, path: str = "") -> Any:
    """JSON as Python values, refusing what Python's reader lets through: NaN, Infinity and numbers
    beyond the float range (`1e309` reads as infinity), and keys given twice in one object (the last
    would win silently). `path` prefixes the key path in messages (e.g. "HiresConfig"). Raises
    `json.JSONDecodeError` for malformed text and `ValueError` naming the key path otherwise."""
    try:
        value = json.loads(text, parse_constant=_NonFinite, parse_float=_float, object_pairs_hook=_object_pairs)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
    return _plain(value, path)


def _plain(value: Any, path: str) -> Any:
    if isinstance(value, _NonFinite):
        where = f"{path}={value.text}" if path else value.text
        if value.text in ("NaN", "Infinity", "-Infinity"):
            raise ValueError(f"{where} is not a number JSON allows; give a finite number")
        raise ValueError(f"{where} is beyond the largest float (about 1.8e308) and would read as infinity; "
                         "give a finite number")
    if isinstance(value, dict):
        repeated = getattr(value, "repeated", ())
        if repeated:
            where = f"{path}: " if path else ""
            raise ValueError(f"{where}key {repeated[0]!r} is given more than once in one object (the last would win "
                             "silently); give each key once")
        return {key: _plain(item, f"{path}.{key}" if path else key) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


# -- the identity of a model's weights (part of every resume key) ---------------------------------
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # what the safetensors format itself allows


def weights_files(folder: Path) -> list[Path]:
    """The weights files of one component folder (sharded, variant and single files alike)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(WEIGHTS_SUFFIXES))


def weights_file_identity(path: Path) -> tuple[int, int, str]:
    """(size, mtime in ns, digest) of a weights file, read cheaply: a safetensors file's digest is its
    header's (tensor names, dtypes, shapes and offsets), any other file's is of its first 64 KiB. A
    damaged file (empty, or a safetensors header that cannot be read) is a `ReadError` naming it."""
    import hashlib

    path = Path(path)
    stat = path.stat()
    if stat.st_size == 0:
        raise ReadError(f"{str(path)!r} is empty (0 bytes): an interrupted download or save; re-download or re-save "
                        "the model")
    if path.name.lower().endswith(".safetensors"):
        header, _ = _safetensors_header(path, stat.st_size)
        digest = hashlib.sha256(header).hexdigest()[:16]
    else:
        with path.open("rb") as handle:
            digest = hashlib.sha256(handle.read(64 * 1024)).hexdigest()[:16]
    return stat.st_size, stat.st_mtime_ns, digest


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from a safetensors file's header alone."""
    path = Path(path)
    _, tensors = _safetensors_header(path, path.stat().st_size)
    return {name: tuple(entry["shape"]) for name, entry in tensors.items() if name != "__metadata__"}


def _safetensors_header(path: Path, size: int) -> tuple[bytes, dict[str, Any]]:
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(_SAFETENSORS_MAX_HEADER, size - 8):
            raise ReadError(f"{str(path)!r} is not a whole safetensors file ({size} bytes, its header cannot be "
                            "read); re-download or re-save the model")
        header = handle.read(length)
    try:
        tensors = json.loads(header)
        end = max((int(t["data_offsets"][1]) for k, t in tensors.items() if k != "__metadata__"), default=0)
        for name, entry in tensors.items():
            if name != "__metadata__":
                tuple(int(n) for n in entry["shape"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ReadError(f"{str(path)!r} is not a whole safetensors file (its header is not one); "
                        "re-download or re-save the model") from None
    if size < 8 + length + end:
        raise ReadError(f"{str(path)!r} is truncated: {size} bytes of the {8 + length + end} its header describes "
                        "(an interrupted download or save); re-download or re-save the model")
    return header, tensors
