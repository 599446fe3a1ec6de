"""LLM client, NLI judge and rewriter against a real local HTTP server (tests/llm_server.py)."""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import pytest
import torch

try:
    from tests.llm_server import FakeLLMServer, last_user
except ImportError:  # pragma: no cover - rootdir layout without the tests package on sys.path
    from llm_server import FakeLLMServer, last_user

from lightning_meddpo.commands.rewriter import LLMRewriter, RewriteError, clean_reply
from lightning_meddpo.eval.judge import NLIJudge, NLIScores, parse_label, split_facts
from lightning_meddpo.llm import LLMClient, LLMError, chat


def make_client(server, tmp_path=None, sleeps=None, **kw) -> LLMClient:
    kw.setdefault("max_attempts", 3)
    kw.setdefault("timeout", 5)
    return LLMClient(server.url if hasattr(server, "url") else server, model="judge-test",
                     cache_dir=(tmp_path / "cache") if tmp_path is not None else None,
                     backoff_base=0.001, backoff_max=0.01,
                     sleep=(sleeps.append if sleeps is not None else (lambda s: None)), **kw)


def echo(body):
    return "echo: " + last_user(body)


# ------------------------------------------------------------------ client
def test_request_shape_and_api_key_env(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeLLMServer(echo) as srv:
        client = make_client(srv, api_key_env="MY_JUDGE_KEY")
        assert client.complete(chat("sys", "hello")) == "echo: hello"
        body, headers = srv.requests[0], srv.headers[0]
        assert body["model"] == "judge-test" and body["temperature"] == 0
        assert body["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]
        assert headers["Authorization"] == "Bearer sk-test-123"

        keyless = make_client(srv)  # OPENAI_API_KEY unset: allowed, no Authorization header
        assert keyless.complete(chat(None, "hi")) == "echo: hi"
        assert "Authorization" not in srv.headers[1]


def test_retry_500_then_success_with_exponential_backoff():
    calls = []

    def flaky(body):
        calls.append(1)
        return (500, {"error": "boom"}) if len(calls) <= 2 else "ok"

    sleeps: list[float] = []
    with FakeLLMServer(flaky) as srv:
        client = make_client(srv, sleeps=sleeps, max_attempts=3)
        assert client.complete(chat(None, "q")) == "ok"
        assert srv.count == 3 and client.stats["retries"] == 2
    assert sleeps == [0.001, 0.002]


def test_429_exhausted_names_url_and_status():
    with FakeLLMServer(lambda b: (429, {"error": "slow down"})) as srv:
        client = make_client(srv, max_attempts=2)
        with pytest.raises(LLMError) as ei:
            client.complete(chat(None, "q"))
        assert srv.count == 2
    err = ei.value
    assert err.status == 429 and err.attempts == 2
    assert srv.url + "/chat/completions" in str(err) and "429" in str(err) and "slow down" in str(err)


def test_400_is_not_retried():
    with FakeLLMServer(lambda b: (400, {"error": "bad model"})) as srv:
        with pytest.raises(LLMError, match=r"HTTP 400.*bad model") as ei:
            make_client(srv, max_attempts=5).complete(chat(None, "q"))
        assert srv.count == 1 and ei.value.status == 400


def test_malformed_body_is_a_clear_error():
    with FakeLLMServer(lambda b: (200, "<html>gateway</html>")) as srv:
        with pytest.raises(LLMError, match="not a chat completion") as ei:
            make_client(srv).complete(chat(None, "q"))
    assert ei.value.status == 200 and "chat/completions" in str(ei.value)


def test_network_error_is_retried_then_named():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    sleeps: list[float] = []
    client = make_client(f"http://127.0.0.1:{port}/v1", sleeps=sleeps, max_attempts=3)
    with pytest.raises(LLMError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions.*no HTTP reply") as ei:
        client.complete(chat(None, "q"))
    assert ei.value.status is None and ei.value.attempts == 3 and len(sleeps) == 2


def test_timeout_is_retried():
    calls = []

    def slow_once(body):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.5)
        return "late but fine"

    with FakeLLMServer(slow_once) as srv:
        client = make_client(srv, timeout=0.1, max_attempts=2)
        assert client.complete(chat(None, "q")) == "late but fine"
        assert client.stats["retries"] == 1


def test_cache_rerun_sends_nothing(tmp_path):
    convos = [chat("sys", f"question {i}") for i in range(6)] + [chat("sys", "question 0")]
    with FakeLLMServer(echo) as srv:
        first = make_client(srv, tmp_path).complete_many(convos, max_workers=4)
        assert first == [f"echo: question {i}" for i in range(6)] + ["echo: question 0"]
        sent = srv.count
        assert 6 <= sent <= 7  # the duplicate may race its twin; both write the same entry atomically

        again = make_client(srv, tmp_path)  # a new process would look the same: fresh client, same dir
        assert again.complete_many(convos, max_workers=4) == first
        assert srv.count == sent and again.stats["cache_hits"] == 7

        # The key covers url, model, messages and temperature: a change is a miss.
        other = make_client(srv, tmp_path, temperature=0.7)
        other.complete(convos[0])
        assert srv.count == sent + 1
        # use_cache=False bypasses the cache.
        again.complete(convos[0], use_cache=False)
        assert srv.count == sent + 2

    files = list((tmp_path / "cache").rglob("*"))
    entries = [f for f in files if f.suffix == ".json"]
    assert len(entries) == 7 and not [f for f in files if f.suffix == ".tmp"]
    entry = json.loads(entries[0].read_text())
    assert {"key", "url", "model", "messages", "temperature", "reply"} <= entry.keys()


def test_concurrent_writers_same_key(tmp_path):
    convo = chat(None, "same")
    clients = []
    with FakeLLMServer(echo) as srv:
        threads = []
        for _ in range(8):
            c = make_client(srv, tmp_path)
            clients.append(c)
            threads.append(threading.Thread(target=c.complete, args=(convo,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert make_client(srv, tmp_path).complete(convo) == "echo: same"
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_bad_messages_rejected():
    client = LLMClient("http://127.0.0.1:9/v1")
    with pytest.raises(TypeError):
        client.complete("just a string")
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        client.complete([{"role": "user"}])


# ------------------------------------------------------------------ judge
GOLD = "FINDINGS: The heart is normal in size. There is a 2.5 cm nodule in the right upper lobe.\n" \
       "IMPRESSION: No pneumothorax. Small left pleural effusion."


def judge_responder(malformed_once: set, always_bad: set, seen: dict):
    """Canned judge: label chosen by the fact in the request; some replies malformed."""

    def respond(body):
        user = body["messages"][1]["content"]
        fact = user.split("Fact from the reference report:\n", 1)[1].split("\n\n", 1)[0]
        is_retry = body["messages"][-1]["role"] == "user" and len(body["messages"]) > 2
        seen[fact] = seen.get(fact, 0) + 1
        if fact in always_bad:
            return "I cannot decide."
        if fact in malformed_once and not is_retry:
            return "Hmm, hard to say."
        return {
            "The heart is normal in size.": "Entailment.",
            "There is a 2.5 cm nodule in the right upper lobe.": "**Label:** partial entailment",
            "No pneumothorax.": "contradiction - the report mentions a pneumothorax",
            "Small left pleural effusion.": "NEUTRAL",
        }[fact]

    return respond


def test_split_facts():
    assert split_facts(GOLD) == [
        "The heart is normal in size.",
        "There is a 2.5 cm nodule in the right upper lobe.",
        "No pneumothorax.",
        "Small left pleural effusion.",
    ]
    assert split_facts("1. Lungs clear.\n2. No effusion, e.g. on the left; heart normal.") == [
        "Lungs clear.", "No effusion, e.g. on the left", "heart normal."]
    assert split_facts("  \n") == []


@pytest.mark.parametrize("reply, label", [
    ("Entailment", "entailment"), ("entailment.", "entailment"), ("**Label:** Partial Entailment", "partial_entailment"),
    ("Answer: NEUTRAL", "neutral"), ("Contradiction - it says left", "contradiction"),
    ("The fact is contradicted by the report.", "contradiction"),
    ("Neutral. Not a contradiction.", "neutral"),
    ("Not entailment", None), ("Entailment or Neutral", None), ("I cannot decide.", None), ("", None),
])
def test_parse_label(reply, label):
    assert parse_label(reply) == label


def test_judge_scores_retry_unparsed_and_cache(tmp_path):
    seen: dict = {}
    responder = judge_responder(malformed_once={"Small left pleural effusion."},
                                always_bad={"Lungs are clear."}, seen=seen)
    preds = ["Normal heart. Nodule in the right lung. Pneumothorax on the right.", "Lungs clear."]
    golds = [GOLD, "Lungs are clear. The heart is normal in size."]
    with FakeLLMServer(responder) as srv:
        judge = NLIJudge(make_client(srv, tmp_path), max_parse_attempts=2, max_workers=4)
        out, totals = judge.score(preds, golds)
        sent = srv.count
        # 6 facts + 1 retry for the malformed-once fact + 1 retry for the always-bad fact
        assert sent == 8
        assert seen["Small left pleural effusion."] == 2 and seen["Lungs are clear."] == 2

        r0, r1 = out
        assert r0.labels == ["entailment", "partial_entailment", "contradiction", "neutral"]
        assert r0.completeness == pytest.approx((1 + 0.5) / 4) and r0.hallucination == pytest.approx(1 / 4)
        assert r0.replies[3] == ["Hmm, hard to say.", "NEUTRAL"]
        assert r1.labels == [None, "entailment"]          # unparsed, never silently Neutral
        assert r1.counts["unparsed"] == 1 and r1.counts["neutral"] == 0
        assert r1.completeness == 1.0 and r1.hallucination == 0.0   # over the one parsed fact

        assert totals["unparsed"] == 1 and totals["facts"] == 6 and totals["reports"] == 2
        assert totals["completeness"] == pytest.approx((1.5 / 4 + 1.0) / 2)
        assert totals["completeness_pooled"] == pytest.approx(2.5 / 5)
        assert totals["hallucination_pooled"] == pytest.approx(1 / 5)

        # Rerun with a fresh client on the same cache: identical result, no request sent.
        out2 = NLIJudge(make_client(srv, tmp_path)).judge_many(preds, golds)
        assert [j.labels for j in out2] == [j.labels for j in out] and srv.count == sent


def test_judge_single_attempt_counts_unparsed_without_retry():
    with FakeLLMServer(lambda b: "no idea") as srv:
        j = NLIJudge(make_client(srv), max_parse_attempts=1).judge("pred", "Heart normal. Lungs clear.")
        assert j.labels == [None, None] and srv.count == 2
    assert math.isnan(j.completeness) and math.isnan(j.hallucination)


def test_nli_scores_two_ranks_merge():
    from lightning_meddpo.eval.judge import ReportJudgement

    reports = [
        ReportJudgement(facts=["a", "b"], labels=["entailment", "contradiction"]),
        ReportJudgement(facts=["c", "d", "e"], labels=["partial_entailment", None, "neutral"]),
        ReportJudgement(facts=["f"], labels=[None]),
    ]
    whole = NLIScores()
    whole.update(reports)
    rank0, rank1 = NLIScores(), NLIScores()
    rank0.update(reports[:1])
    rank1.update(reports[1:])
    rank0.merge_state(rank1)
    a, b = whole.compute(), rank0.compute()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], equal_nan=True), k
    assert float(a["completeness"]) == pytest.approx((0.5 + 0.25) / 2)   # report 3 unscored
    assert float(a["reports_unscored"]) == 1 and float(a["unparsed"]) == 2 and float(a["facts"]) == 6


# ------------------------------------------------------------------ rewriter
def rewriter_responder(body):
    user = [m["content"] for m in body["messages"] if m["role"] == "user"]
    answer = user[0].split("Correct answer: ", 1)[1].split("\n", 1)[0]
    if answer == "The nodule is in the left lung.":
        return '"Rewritten answer: The nodule is in the right lung."'
    if answer == "Yes":
        # first the same answer (rejected), then a real rewrite on the corrective turn
        return "yes." if len(user) == 1 else "No"
    return answer  # never changes anything


def test_rewriter(tmp_path):
    with FakeLLMServer(rewriter_responder) as srv:
        rw = LLMRewriter(make_client(srv, tmp_path), max_attempts=2)
        assert rw("Where is the nodule?", "The nodule is in the left lung.") == "The nodule is in the right lung."
        prompt = srv.requests[0]["messages"][-1]["content"]
        for word in ("laterality", "location", "modality", "presence", "size", "rewritten answer only"):
            assert word in prompt

        assert rw("Is there an effusion?", "Yes") == "No"
        assert srv.count == 3  # the equal reply was retried once

        with pytest.raises(RewriteError, match=r"2 attempt\(s\).*'Axial CT'.*last reply 'Axial CT'"):
            rw("Which modality?", "Axial CT")
        assert srv.count == 5

        with pytest.raises(ValueError, match="empty answer"):
            rw("Which modality?", "  ")

        sent = srv.count
        again = LLMRewriter(make_client(srv, tmp_path), max_attempts=2)
        assert again("Is there an effusion?", "Yes") == "No" and srv.count == sent  # cached


def test_clean_reply():
    assert clean_reply("```\nRewritten answer: “Right lung.”\n```") == "Right lung."
    assert clean_reply("**Answer:** MRI") == "MRI"
    assert clean_reply("Left kidney") == "Left kidney"
