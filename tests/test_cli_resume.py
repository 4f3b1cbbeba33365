"""Batch resume by resolved parameters, claims, concurrent runs on one folder, Ctrl-C."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from hires import batch, cli
from hires.cli import main

FAST = ["--steps", "2", "--size", "64x64", "--quiet"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def strict_json(text):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def stamps(out):
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}


def test_a_rerun_renders_exactly_what_changed(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    lines = ['{"prompt": "a red circle", "seed": 1}', '{"prompt": "a blue square", "seed": 2}',
             '{"prompt": "a green triangle", "seed": 3}']
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), *FAST]) == 0
    first = stamps(out)
    assert len(first) == 3

    lines[1] = '{"prompt": "a blue square", "seed": 22}'
    prompts.write_text("\n".join(lines) + "\n")
    time.sleep(0.01)
    assert main(["batch", str(prompts), "--out", str(out), *FAST]) == 0
    second = stamps(out)
    changed = sorted(name for name in first if second[name] != first[name])
    assert changed == ["00001-a-blue-square.png"]
    manifest = strict_json((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest["items"]] == ["done"] * 3
    for entry in manifest["items"]:  # the manifest says what the PNGs are
        record = batch.read_png_record(out / entry["file"], verify=True)
        assert entry["png"]["key"] == record["key"] == entry["key"]
        assert record["seed"] == entry["request"]["seed"]
    assert manifest["items"][1]["png"]["seed"] == 22

    # A global option is part of every item's parameters: all three are redone.
    time.sleep(0.01)
    assert main(["batch", str(prompts), "--out", str(out), "--steps", "3", "--size", "64x64", "--quiet"]) == 0
    assert all(t != second[n] for n, t in stamps(out).items())
    assert {batch.read_png_record(p)["steps"] for p in out.glob("*.png")} == {3}
    # Nothing changed: nothing rendered, and no weights are loaded to find that out.
    before = stamps(out)
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded with nothing to do"))
    assert main(["batch", str(prompts), "--out", str(out), "--steps", "3", "--size", "64x64"]) == 0
    assert stamps(out) == before
    assert "3/3 items done" in capsys.readouterr().out


def test_the_manifest_reports_outdated_pngs_and_writes_strict_json(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), *FAST]) == 0
    png = next(out.glob("*.png"))
    items = batch.read_prompt_file(prompts)
    manifest = batch.write_manifest(out, [(items[0], "another-key", {"seed": 0})], str(prompts))
    assert manifest["items"][0]["status"] == "outdated" and manifest["done"] == 0
    (out / "stray.png").write_bytes(png.read_bytes())
    manifest = batch.write_manifest(out, [(items[0], "k", {"guidance": math.inf, "x": (1, 2)})], str(prompts))
    assert manifest["unlisted"] == ["stray.png"]
    assert strict_json((out / "manifest.json").read_text())["items"][0]["request"] == {"guidance": "inf", "x": [1, 2]}


def test_files_keep_the_users_umask(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    old = os.umask(0o027)
    try:
        assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), *FAST]) == 0
        assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "g.png"), *FAST]) == 0
    finally:
        os.umask(old)
    for path in [*(tmp_path / "out").iterdir(), tmp_path / "g.png"]:
        assert path.stat().st_mode & 0o777 == 0o640, path


# -- claims -------------------------------------------------------------------------------------
def item(tmp_path, name="x"):
    return batch.BatchItem(index=0, line=1, prompt=name, overrides={"name": name}, source="p.txt")


def test_a_claim_excludes_other_claimants_until_released(tmp_path):
    thing = item(tmp_path)
    first = batch.try_claim(tmp_path, thing)
    assert first is not None
    assert batch.try_claim(tmp_path, thing) is None  # another open file description: excluded as another process
    assert batch.claim_owner(tmp_path, thing)["pid"] == os.getpid()
    first.release()
    assert not batch.claim_path(tmp_path, thing).exists()
    again = batch.try_claim(tmp_path, thing)
    assert again is not None
    again.release()


CLAIM_AND_WAIT = """
import sys, time
from hires import batch
from pathlib import Path
claim = batch.try_claim(Path(sys.argv[1]), batch.BatchItem(0, 1, "x", {"name": "x"}))
print("claimed" if claim else "refused", flush=True)
time.sleep(600)
"""


def test_a_killed_processs_claim_is_taken_over(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", CLAIM_AND_WAIT, str(tmp_path)], env=_env(),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "claimed"
        assert batch.try_claim(tmp_path, item(tmp_path)) is None  # alive: respected
        assert batch.claim_owner(tmp_path, item(tmp_path))["pid"] == owner.pid
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert batch.claim_path(tmp_path, item(tmp_path)).exists()  # a killed process leaves it behind
    assert batch.claim_owner(tmp_path, item(tmp_path)) is None
    taken = batch.try_claim(tmp_path, item(tmp_path))
    assert taken is not None
    taken.release()


def test_an_empty_claim_is_waited_for_and_left_to_its_creator_once_it_locks_it(tmp_path, monkeypatch):
    import fcntl
    import threading

    monkeypatch.setattr(batch, "UNWRITTEN_CLAIM_AGE_S", 30.0)
    path = batch.claim_path(tmp_path, item(tmp_path))
    path.write_bytes(b"")  # created by a live process that has not locked it yet
    creator = os.open(path, os.O_RDWR)
    locker = threading.Timer(0.3, fcntl.flock, (creator, fcntl.LOCK_EX))
    started = time.monotonic()
    locker.start()
    try:
        assert batch.try_claim(tmp_path, item(tmp_path)) is None
        assert 0.3 <= time.monotonic() - started < 10  # it waited for the creator, not for the whole age
    finally:
        locker.join()
        os.close(creator)


def test_an_empty_claim_nobody_locks_is_taken_once_it_ages_out(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "UNWRITTEN_CLAIM_AGE_S", 0.5)
    path = batch.claim_path(tmp_path, item(tmp_path))
    path.write_bytes(b"")  # its creator was killed between creating and locking it
    started = time.monotonic()
    taken = batch.try_claim(tmp_path, item(tmp_path))
    assert taken is not None
    assert time.monotonic() - started >= 0.4  # not at once: its creator might still have locked it
    assert batch.claim_owner(tmp_path, item(tmp_path))["pid"] == os.getpid()
    taken.release()
    old = time.time() - batch.UNWRITTEN_CLAIM_AGE_S - 1
    path.write_bytes(b"")
    os.utime(path, (old, old))  # already old: taken without waiting
    started = time.monotonic()
    taken = batch.try_claim(tmp_path, item(tmp_path))
    assert taken is not None and time.monotonic() - started < 0.4
    taken.release()


def test_a_rerun_right_after_a_kill_between_claiming_and_locking_renders_that_item(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(batch, "UNWRITTEN_CLAIM_AGE_S", 1.0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), *FAST]) == 0
    (out / "00001-a-blue-square.png").unlink()
    (out / ".00001-a-blue-square.png.claim").write_bytes(b"")  # what such a kill leaves
    capsys.readouterr()
    assert main(["batch", str(prompts), "--out", str(out), "--steps", "2", "--size", "64x64"]) == 0
    assert "2/2 items done" in capsys.readouterr().out
    assert batch.read_png_record(out / "00001-a-blue-square.png", verify=True) is not None
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert [e["status"] for e in strict_json((out / "manifest.json").read_text())["items"]] == ["done"] * 2


def test_two_concurrent_batches_on_one_folder_render_each_item_once(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(6)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hires", "batch", str(prompts), "--out", str(out), "--steps", "30",
               "--size", "64x64"]
    runs = [subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [run.communicate(timeout=600) for run in runs]
    for run, (stdout, stderr) in zip(runs, results):
        assert run.returncode == 0, stderr[-3000:]
    counts = [int(stdout.split("(rendered ")[1].split()[0]) for stdout, _ in results]
    assert sum(counts) == 6, counts  # nothing twice, nothing lost
    records = [batch.read_png_record(p, verify=True) for p in sorted(out.glob("*.png"))]
    assert sorted(r["index"] for r in records) == list(range(6))
    by_pid = {}
    for record in records:
        by_pid[record["pid"]] = by_pid.get(record["pid"], 0) + 1
    assert sorted(by_pid.values()) == sorted(c for c in counts if c)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no claim or temporary left
    assert strict_json((out / "manifest.json").read_text())["done"] == 6


def test_ctrl_c_exits_130_with_one_line_and_keeps_finished_pngs(tmp_path):
    prompts = tmp_path / "p.txt"
    # five prompts: after the first finished PNG (whichever it is) there is still work to interrupt
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow circle\na red square\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hires", "batch", str(prompts), "--out", str(out), "--steps", "60",
               "--size", "128x128", "--quiet"]
    # a parent started in the background may ignore SIGINT, and Python keeps an inherited SIG_IGN: restore it
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("[0-9]*.png")) and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hires batch: interrupted;") and "resumes" in lines[0], stderr
    kept = sorted(out.glob("[0-9]*.png"))
    assert 1 <= len(kept) < 5
    assert all(batch.read_png_record(p, verify=True) for p in kept)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    manifest = strict_json((out / "manifest.json").read_text())
    assert manifest["done"] == len(kept)
