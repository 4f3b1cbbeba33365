"""Save the tiny sd15 test pipeline (random weights) as the embedded default model.

It exists so that `hires generate` runs on a fresh machine with no download; it draws no meaningful
picture. The coherence testbed's trained model replaces it.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tiny_models  # noqa: E402

if __name__ == "__main__":
    out = ROOT / "hires" / "assets" / "random_sd15"
    tiny_models.build("sd15").save_pretrained(out, safe_serialization=True)
    print(f"saved {out}")
