"""`python -m lightning_meddpo build-pairs` as a real subprocess: lexicon and image pairs from a LLaVA-Med
question file over real images, and the LLM rewriter against a real local HTTP server (tests/llm_server.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from skimage import data as skdata

from lightning_meddpo.data.images import corrupt, load_image
from lightning_meddpo.data.records import read_preference_file
from tests.conftest import run_cli, run_program
from tests.llm_server import FakeLLMServer


def first_user(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


@pytest.fixture()
def vqa(tmp_path):
    """A LLaVA-Med question file (JSONL) over real images: a 16-bit CT slice, a fundus photo, an IHC slide;
    one record with a missing image and one unperturbable answer."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    ct = pydicom.dcmread(os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "CT_small.dcm"))
    Image.fromarray(ct.pixel_array.astype(np.uint16)).save(root / "images" / "ct16.png")
    Image.fromarray(skdata.retina()[::16, ::16]).save(root / "images" / "retina.png")
    Image.fromarray(skdata.immunohistochemistry()[::8, ::8]).save(root / "images" / "ihc.jpg")
    rows = [
        {"question_id": "q1", "image": "images/ct16.png", "text": "Where is the nodule?",
         "answer": "A nodule in the left lung.", "answer_type": "OPEN"},
        {"question_id": "q2", "image": "images/retina.png", "text": "Is the image abnormal?", "answer": "Yes.",
         "answer_type": "CLOSED"},
        {"question_id": "q3", "image": "images/ihc.jpg", "text": "What stain?",
         "gpt4_answer": "Immunohistochemistry with DAB.", "answer_type": "OPEN"},
        {"question_id": "q4", "image": "images/gone.png", "text": "Where?", "answer": "Right kidney."},
    ]
    src = root / "vqa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src, root


def test_cli_lexicon_and_image_pairs(vqa, tmp_path):
    src, root = vqa
    out = tmp_path / "pairs.json"
    proc = run_cli("build-pairs", "--input", str(src), "--image-root", str(root), "--out", str(out),
                   "--mode", "both", "--corruption", '{"type": "diffusion", "t": 400}', "--seed", "3",
                   "--error-types", "laterality,presence", "anatomy")
    text = proc.stdout
    assert "4 source records read; 5 pairs written" in text
    assert "text-rejected pairs: 2" in text and "image-rejected pairs: 3" in text
    assert "skipped 1: image file not found (e.g. q4)" in text
    assert "skipped 1: text: no lexicon term" in text and "q3" in text
    assert "build pairs" in proc.stderr  # the tqdm progress bar
    recs = json.loads(out.read_text())
    assert {r["id"] for r in recs} == {"q1-text", "q2-text", "q1-image", "q2-image", "q3-image"}
    q1 = next(r for r in recs if r["id"] == "q1-text")
    assert q1["error_type"] == "laterality" and "right lung" in q1["rejected_conversations"][-1]["value"]
    img = next(r for r in recs if r["id"] == "q1-image")
    assert img["corruption"]["spec"]["t"] == 400 and img["corruption"]["type"] == "diffusion"
    redo, _ = corrupt(load_image(root / img["image"]), img["corruption"]["spec"], img["corruption"]["seed"])
    assert np.array_equal(np.asarray(Image.open(out.parent / img["rejected_image"]).convert("RGB")), np.asarray(redo))
    assert not (root / "rejected_images").exists()  # nothing written into the source image folder
    # the training loader reads the output with the roots the summary prints
    assert f"--data.init_args.image_root={root} --data.init_args.rejected_image_root={out.parent}" in text
    records, report = read_preference_file(out, root, rejected_image_root=out.parent)
    assert report.read == 5 and not report.skipped


def test_cli_llm_rewriter_over_http(vqa, tmp_path, monkeypatch):
    src, root = vqa
    out = tmp_path / "rw.jsonl"
    cache = tmp_path / "llm-cache"

    def responder(body):
        msg = first_user(body)  # the question and answer (a retry adds a corrective turn after it)
        if "Immunohistochemistry" in msg:
            return "Immunohistochemistry with DAB."  # unchanged every time: this record is skipped, counted
        if "left lung" in msg:
            return "Rewritten answer: A nodule in the right lung."
        return '"No."'

    args = ["build-pairs", "--input", str(src), "--image-root", str(root), "--out", str(out), "--mode", "text",
            "--rewriter-url", None, "--rewriter-model", "fake-rewriter", "--rewriter-api-key-env",
            "MEDDPO_TEST_REWRITER_KEY", "--rewriter-cache-dir", str(cache), "--rewriter-max-attempts", "2"]
    monkeypatch.setenv("MEDDPO_TEST_REWRITER_KEY", "sk-test-123")
    with FakeLLMServer(responder) as srv:
        args[args.index(None)] = srv.url
        proc = run_cli(*args)
        n = srv.count
        assert n == 4  # q1, q2 once; q3 twice (retry in the same conversation); q4 has no image
        assert all(r["model"] == "fake-rewriter" for r in srv.requests)
        assert all(h.get("Authorization") == "Bearer sk-test-123" for h in srv.headers)
        assert "2 pairs written" in proc.stdout and "error_type rewriter: 2" in proc.stdout
        assert "skipped 1: text: rewriter gave no rewrite that differs from the answer (e.g. q3)" in proc.stdout
        assert "4 requests" in proc.stdout
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert {r["id"]: r["rejected_conversations"][-1]["value"] for r in recs} == {
            "q1-text": "A nodule in the right lung.", "q2-text": "No."}
        # a rerun (in process, same flags) is served from the cache: no request reaches the server
        out2 = tmp_path / "rw2.jsonl"
        summary = run_program("build-pairs", [str(out2) if a == str(out) else a for a in args[1:]] + ["--no-progress"])
        assert srv.count == n and summary.written == {"text": 2}
    assert out2.read_text() == out.read_text()


def test_cli_errors_are_clear(vqa, tmp_path, capsys):
    src, root = vqa
    bad = tmp_path / "bad.jsonl"
    bad.write_text(src.read_text() + '{"question_id": "q9", "image": "images/retina.png", "text": "Q"\n')
    with pytest.raises(SystemExit) as e:
        run_program("build-pairs", ["--input", str(bad), "--image-root", str(root), "--out", str(tmp_path / "o.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and f"{bad}:5" in err and "malformed JSON" in err and "--skip-invalid" in err
    s = run_program("build-pairs", ["--input", str(bad), "--image-root", str(root), "--out", str(tmp_path / "o.json"), "--no-progress",
              "--skip-invalid", "--mode", "text"])
    assert s.skipped["invalid record: field <line>"] == 1 and "invalid record" in capsys.readouterr().out
    for argv, msg in [(["--corruption", "blur"], "unknown corruption 'blur'"),
                      (["--corruption", '{"type": "crop", "area": 2}'], "unknown parameter"),
                      (["--error-types", "colour"], "unknown error type"),
                      (["--mode", "image", "--rewriter-url", "http://127.0.0.1:9/v1"], "no effect with --mode image"),
                      (["--rewriter-cache-dir", str(tmp_path)], "needs --rewriter-url")]:
        with pytest.raises(SystemExit) as e:
            run_program("build-pairs", ["--input", str(src), "--out", str(tmp_path / "o.json"), *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_rewriter_against_a_flaky_server_killed_and_rerun(tmp_path):
    """The server fails now and then (a 500, a 429, a non-chat HTTP 200); the job is killed mid-way and
    rerun: every reply finished before the kill comes from the cache (never requested again), the output
    is complete, and the API key is in no cache entry, output or log line."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from tests.conftest import REPO

    (tmp_path / "images").mkdir()
    Image.fromarray(skdata.retina()[::16, ::16]).save(tmp_path / "images" / "retina.png")
    rows = [{"question_id": f"q{i}", "image": "images/retina.png", "text": f"Question {i}?", "answer": f"Answer {i}."}
            for i in range(12)]
    src = tmp_path / "vqa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, cache, secret = tmp_path / "pairs.json", tmp_path / "cache", "sk-secret-4f1c9a"
    lock, calls, answered = threading.Lock(), [0], []

    def responder(body):
        question = first_user(body).split("Question ")[1].split("?")[0]
        with lock:
            calls[0] += 1
            n = calls[0]
        time.sleep(0.15)  # slow enough to be killed mid-way
        if n % 7 == 3:
            return 500, {"error": f"overloaded (your key {secret} is fine)"}  # echoes the key: must be masked
        if n % 7 == 5:
            return 200, "<html>proxy error</html>"
        with lock:
            answered.append(question)
        return f"Rewritten answer {question}, changed."

    cmd = [sys.executable, "-m", "lightning_meddpo", "build-pairs", "--input", str(src), "--out", str(out),
           "--mode", "text", "--rewriter-url", None, "--rewriter-cache-dir", str(cache), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": secret}
    with FakeLLMServer(responder) as srv:
        cmd[cmd.index(None)] = srv.url
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while len(answered) < 4 and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        time.sleep(0.3)  # a reply in flight when the job died may still finish server-side
        before = set(answered)
        assert 4 <= len(before) < 12 and not out.exists()
        cached = {q for q in before if any(f"Question {q}?" in p.read_text() for p in cache.rglob("*.json"))}
        requested_before = srv.count
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        again = [first_user(b).split("Question ")[1].split("?")[0] for b in srv.requests[requested_before:]]
    assert len(cached) >= 3 and not cached & set(again)  # replies finished before the kill: never requested again
    pairs = json.loads(out.read_text())
    assert len(pairs) == 12 and all(p["rejected_conversations"][-1]["value"].startswith("Rewritten") for p in pairs)
    everything = [p.read_text() for p in cache.rglob("*") if p.is_file()] + [out.read_text(), rerun.stdout, rerun.stderr]
    assert not any(secret in text for text in everything)


def test_options_file_round_trips_through_the_one_parser(vqa, tmp_path, capsys):
    """build-pairs is a subcommand of the CLI's one jsonargparse parser: `--print_config` writes its options,
    `--config` reads them back, and the build from the file equals the build from the flags. A program seeds
    nothing and builds no model or trainer (LightningCLI's part of the run is skipped)."""
    import random

    from lightning_meddpo.cli import main

    src, root = vqa
    flags = ["--input", str(src), "--image-root", str(root), "--mode", "text", "--seed", "5", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(["build-pairs", *flags, "--out", str(tmp_path / "a.json"), "--print_config"])
    assert e.value.code == 0
    options = tmp_path / "opts.yaml"
    options.write_text(capsys.readouterr().out)
    assert "seed: 5" in options.read_text() and "mode: text" in options.read_text()
    random.seed(123)
    cli = main(["build-pairs", "--config", str(options)])
    assert random.random() == random.Random(123).random()  # no seed_everything for a program
    assert not hasattr(cli, "trainer") and not hasattr(cli, "model")
    from_flags = run_program("build-pairs", [*flags, "--out", str(tmp_path / "b.json")])
    assert cli.result.written == from_flags.written == {"text": 2}
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_unknown_subcommand_names_the_choices(capsys):
    from lightning_meddpo.cli import main

    with pytest.raises(SystemExit) as e:
        main(["build-pair", "--input", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "build-pairs" in err and "fit" in err, err
