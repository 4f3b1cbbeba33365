"""Prompt files, resumable batches that survive SIGKILL, and sharding over two processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from hires import batch
from hires.cli import main

FAST = ["--steps", "2", "--size", "64x64", "--quiet"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_three_formats_with_per_line_overrides(tmp_path):
    txt = batch.read_prompt_file(write(tmp_path, "p.txt", "a red circle\n\n# comment\na blue square\n"))
    assert [(i.prompt, i.line, i.overrides) for i in txt] == [("a red circle", 1, {}), ("a blue square", 4, {})]
    jsonl = batch.read_prompt_file(write(tmp_path, "p.jsonl",
                                         '{"prompt": "a red circle", "seed": 7, "size": '
                                         '"128x64"}\n\n{"prompt": "x", "name": "mine"}\n'))
    assert jsonl[0].overrides == {"seed": 7, "size": "128x64"} and jsonl[1].filename == "mine.png"
    csv_items = batch.read_prompt_file(write(tmp_path, "p.csv", "prompt,seed,guidance\na red circle,3,\nb,,2.5\n"))
    assert csv_items[0].overrides == {"seed": 3} and csv_items[1].overrides == {"guidance": 2.5}
    assert csv_items[0].filename == "00000-a-red-circle.png"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "bad",\n', r"p.jsonl:2: not valid JSON"),
        ("p.jsonl", '{"prompt": "ok", "sede": 3}\n', r"p.jsonl:1: unknown override key 'sede'.*closest: 'seed'"),
        ("p.jsonl", '["a list"]\n', r"p.jsonl:1: each line must be a JSON object"),
        ("p.jsonl", '{"prompt": "ok", "steps": "many"}\n',
         r"p.jsonl:1: steps='many' must be a whole number of denoising steps >= 1"),
        ("p.csv", "text,seed\na,1\n", r"p.csv:1: the header row needs a 'prompt' column"),
        ("p.csv", "prompt,seed\na,1\nb,2,extra\n", r"p.csv:3: more fields than header columns"),
        ("p.txt", "\n# only comments\n", r"holds no prompts"),
        ("p.yaml", "prompt: x\n", r"must end in .txt, .jsonl or .csv"),
        ("p.jsonl", '{"prompt": "a", "name": "x"}\n{"prompt": "b", "name": "x"}\n', r"output names repeat \(x\)"),
    ],
)
def test_malformed_prompt_files_name_the_line_and_the_remedy(tmp_path, name, text, message):
    with pytest.raises(batch.PromptFileError, match=message):
        batch.read_prompt_file(write(tmp_path, name, text))


def test_unreadable_prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(batch.PromptFileError, match="is UTF-16-encoded .*save it as UTF-8"):
        batch.read_prompt_file(path)
    with pytest.raises(batch.PromptFileError, match="cannot read prompt file"):
        batch.read_prompt_file(tmp_path / "missing.txt")


def test_batch_renders_each_item_once_and_a_rerun_skips_finished_ones(tmp_path, capsys):
    prompts = write(tmp_path, "p.jsonl",
                    '{"prompt": "a red circle"}\n{"prompt": "a blue square", "seed": 5, "size": "128x64"}\n')
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), *FAST]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["done"], manifest["total"]) == (2, 2)
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["00000-a-red-circle.png", "00001-a-blue-square.png"]
    second = Image.open(out / files[1])
    assert second.size == (128, 64)
    record = json.loads(second.text["hires"])
    assert record["seed"] == 5 and record["prompt"] == "a blue square"
    assert "Seed: 5" in second.text["parameters"]

    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    assert main(["batch", str(prompts), "--out", str(out), *FAST]) == 0
    assert {f: (out / f).stat().st_mtime_ns for f in files} == stamps


def test_batch_errors(tmp_path, capsys):
    prompts = write(tmp_path, "p.jsonl", '{"prompt": "a", "size": "100x64"}\n')
    blocker = write(tmp_path, "file.txt", "not a folder")
    assert main(["batch", str(prompts), "--out", str(blocker / "sub"), *FAST]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["batch", str(prompts), "--out", str(tmp_path / "o"), "--steps", "2", "--quiet"]) == 2
    assert "p.jsonl:1: size 100x64: width=100 is not a multiple of 8" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err
    good = write(tmp_path, "g.txt", "a\n")
    assert main(["batch", str(good), "--out", str(tmp_path / "o"), *FAST, "--enable", "entropy_scalin"]) == 2
    assert "closest: 'entropy_scaling'" in capsys.readouterr().err


def test_a_batch_killed_mid_image_resumes_to_exactly_one_valid_png_per_item(tmp_path):
    prompts = write(tmp_path, "p.txt", "a red circle\na blue square\na green triangle\n")
    out = tmp_path / "out"
    slow = ["--steps", "60", "--size", "192x192", "--quiet"]
    command = [sys.executable, "-m", "hires", "batch", str(prompts), "--out", str(out), *slow]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("0000*.png")) and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.stdout.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(out.glob("0000*.png"))
    assert 1 <= len(finished) < 3, "the kill must land mid-batch"
    for path in finished:  # whatever carries a final name is complete
        assert batch.read_png_record(path, verify=True) is not None

    rerun = subprocess.run(command, check=False, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000-a-red-circle.png", "00001-a-blue-square.png",
                     "00002-a-green-triangle.png", "manifest.json"]
    for name in files[:3]:
        assert batch.read_png_record(out / name, verify=True) is not None
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest["items"]] == ["done"] * 3
    assert [e["file"] for e in manifest["items"]] == files[:3]


def test_two_processes_split_a_batch_into_disjoint_complete_shards(tmp_path):
    prompts = write(tmp_path, "p.txt", "".join(f"prompt number {i}\n" for i in range(5)))
    out = tmp_path / "out"
    with socket.socket() as probe:  # a free port: parallel test runs must not meet on a fixed one
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "hires", "batch", str(prompts), "--out", str(out), *FAST]
    result = subprocess.run(command, check=False, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [batch.read_png_record(p, verify=True) for p in sorted(out.glob("*.png"))]
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3, 4]
    by_process = {}
    for record in records:
        by_process.setdefault(record["process"], set()).add(record["index"])
    assert set(by_process) == {0, 1}
    assert not (by_process[0] & by_process[1])
    assert json.loads((out / "manifest.json").read_text())["done"] == 5
