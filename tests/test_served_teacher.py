"""`ServedTeacher` / `TeacherServerClient` against a fake vLLM-shaped server on loopback, scoring with a real tiny
model: the top-k at the loss positions match the local model's, and every failure mode names its cause."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import make_config, make_dataset

from trl_opd import OPDTrainer
from trl_opd.served_teacher import ServedTeacher, TeacherServerClient, TeacherServerError
from trl_opd.teacher_server import serve
from trl_opd.teachers import TeacherTopK
from trl_opd.toy import build_model, build_tokenizer

MODEL_ID = "toy-teacher"
KEY = "sk-secret-0123456789"


@pytest.fixture(scope="module")
def toy():
    tokenizer = build_tokenizer()
    return tokenizer, build_model(tokenizer, hidden_size=48, num_layers=2, seed=1).eval()


@torch.no_grad()
def prompt_logprobs(model, sequence: list[int], top_k: int, temperature: float) -> list:
    """vLLM's `prompt_logprobs` of `sequence`: None, then the top-k of each next-token distribution plus the token."""
    log_probs = torch.log_softmax(model(torch.tensor([sequence])).logits[0].float() / temperature, dim=-1)
    entries = [None]
    for position in range(1, len(sequence)):
        row, token = log_probs[position - 1], sequence[position]
        top = torch.topk(row, top_k).indices.tolist()
        entry = {}
        for token_id in [*top, token]:
            rank = int((row > row[token_id]).sum()) + 1
            entry[str(token_id)] = {"logprob": float(row[token_id]), "rank": rank, "decoded_token": "?"}
        entries.append(entry)
    return entries


class FakeServer:
    """Answers /health, /v1/models, /tokenize and /v1/completions like vLLM; `state` scripts its failures."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model, self.lock = tokenizer, model, threading.Lock()
        self.calls = 0  # POST /v1/completions requests received
        self.fail_first = 0  # answer 503 to the first `fail_first` completions requests
        self.sleep = 0.0  # seconds to wait before answering completions
        self.api_key: str | None = None  # required bearer token
        self.mutate = None  # edits the completions body before it is sent
        self.tokenize_offset = 0  # added to every /tokenize id (a different tokenizer)
        self.ignore_temperature = False  # score at temperature 1 whatever the request says (raw logits)

    def answer(self, method: str, path: str, headers, body: dict | None) -> tuple[int, object]:
        if self.api_key is not None and path != "/health":
            given = headers.get("Authorization", "")
            if given != f"Bearer {self.api_key}":
                return 401, {"error": f"Unauthorized: got {given!r}"}  # echoes the key, as a careless server might
        if method == "GET" and path == "/health":
            return 200, None
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]}
        if method == "POST" and path == "/tokenize":
            tokens = self.tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
            return 200, {"tokens": [token + self.tokenize_offset for token in tokens], "count": len(tokens)}
        if method == "POST" and path == "/v1/completions":
            with self.lock:
                self.calls += 1
                failing = self.calls <= self.fail_first
            time.sleep(self.sleep)
            if failing:
                return 503, {"object": "error", "message": "engine overloaded", "code": 503}
            choices = [
                {
                    "index": i,
                    "text": "",
                    "prompt_logprobs": prompt_logprobs(
                        self.model,
                        seq,
                        body["prompt_logprobs"],
                        1.0 if self.ignore_temperature else body["temperature"],
                    ),
                }
                for i, seq in enumerate(body["prompt"])
            ]
            out = {"object": "text_completion", "model": body["model"], "choices": choices}
            return 200, self.mutate(out) if self.mutate else out
        return 404, {"detail": "Not Found"}

    def __enter__(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, payload = fake.answer(method, self.path, self.headers, body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode() if payload else b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply("GET")

            def do_POST(self):
                self._reply("POST")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False  # `server_close` joins the handlers still running (a timed-out one)
        self.httpd.handle_error = lambda request, address: None  # the timed-out client hung up: nothing to report
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(toy):
    with FakeServer(*toy) as fake:
        yield fake


def client(url: str, **kwargs) -> TeacherServerClient:
    return TeacherServerClient(url, **{"timeout": 5.0, "max_retries": 2, "backoff": 0.01, **kwargs})


def batch(tokenizer) -> tuple[dict, torch.Tensor]:
    """Left-padded prompts of lengths 3, 5, 2, 4, right-padded completions of 4, 6, 1, 3; a loss mask with holes
    (and a row without any loss position)."""
    generator = torch.Generator().manual_seed(0)
    pad, first, vocab = tokenizer.pad_token_id, 5, len(tokenizer)

    def padded(lengths, width, left):
        ids, mask = torch.full((len(lengths), width), pad), torch.zeros(len(lengths), width, dtype=torch.long)
        for row, length in enumerate(lengths):
            span = slice(width - length, width) if left else slice(0, length)
            ids[row, span] = torch.randint(first, vocab, (length,), generator=generator)
            mask[row, span] = 1
        return ids, mask

    prompt_ids, prompt_mask = padded([3, 5, 2, 4], 5, left=True)
    completion_ids, completion_mask = padded([4, 6, 1, 3], 6, left=False)
    loss_mask = torch.tensor(
        [[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.long
    )
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids)
    inputs.update(completion_mask=completion_mask, loss_mask=loss_mask)
    return inputs, loss_mask.bool()


def test_at_positions_matches_the_local_model(server, toy):
    tokenizer, model = toy
    top_k, temperature = 5, 0.7
    inputs, mask = batch(tokenizer)
    teacher = ServedTeacher(client(server.url), tokenizer, len(tokenizer))
    assert teacher.check(1.0) == MODEL_ID
    got = teacher.at_positions(inputs, mask, temperature, top_k)
    assert isinstance(got, TeacherTopK) and server.calls == 1  # one request for the whole batch

    ids, log_probs, token_log_probs = [], [], []
    with torch.no_grad():
        for b in range(mask.size(0)):
            prompt = inputs["prompt_ids"][b][inputs["prompt_mask"][b].bool()]
            completion = inputs["completion_ids"][b][inputs["completion_mask"][b].bool()]
            logits = model(torch.cat([prompt, completion])[None]).logits[0]
            rows = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]  # predicting completion t
            for t in mask[b].nonzero().flatten().tolist():
                top = torch.topk(rows[t], top_k)
                ids.append(top.indices), log_probs.append(top.values), token_log_probs.append(rows[t, completion[t]])
    assert got.ids.shape == (int(mask.sum()), top_k) and got.ids.dtype == torch.long
    assert torch.equal(got.ids, torch.stack(ids))
    torch.testing.assert_close(got.log_probs, torch.stack(log_probs), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.token_log_probs, torch.stack(token_log_probs), atol=1e-5, rtol=0)
    assert got.ids.device == mask.device


def test_prefix_token_outside_the_top_k(server, toy):
    """k=1: the prefix token is mostly outside the top-1, yet vLLM returns it; TRL keeps it out of the top-k."""
    tokenizer, _ = toy
    inputs, mask = batch(tokenizer)
    got = ServedTeacher(client(server.url), tokenizer, len(tokenizer)).at_positions(inputs, mask, 1.0, 1)
    assert got.ids.shape == (int(mask.sum()), 1)
    assert torch.isfinite(got.token_log_probs).all() and (got.token_log_probs <= got.log_probs[:, 0] + 1e-6).all()
    server.mutate = lambda out: {**out, "choices": [{**c, "prompt_logprobs": drop_actual(c)} for c in out["choices"]]}
    got = ServedTeacher(client(server.url), tokenizer, len(tokenizer)).at_positions(inputs, mask, 1.0, 3)
    assert torch.isneginf(got.token_log_probs).any() and torch.isfinite(got.log_probs).all()


def drop_actual(choice: dict) -> list:
    """Keep only the top-3 (rank <= 3): the prefix token is then missing where it ranks lower."""
    return [None] + [{k: v for k, v in e.items() if v["rank"] <= 3} for e in choice["prompt_logprobs"][1:]]


def test_retries_transient_503_then_succeeds(server, toy):
    tokenizer, _ = toy
    server.fail_first = 2
    result = client(server.url, max_retries=2).score([[5, 6, 7]], [1], 2, 1.0)
    assert server.calls == 3 and len(result[0]["logprobs"]) == 2


def test_persistent_503_raises_after_max_retries_plus_one(server):
    server.fail_first = 100
    with pytest.raises(TeacherServerError) as error:
        client(server.url, max_retries=3).score([[5, 6, 7]], [1], 2, 1.0)
    assert server.calls == 4
    message = str(error.value)
    assert server.url in message and "503" in message and "engine overloaded" in message and "4 attempts" in message


def test_connection_refused_names_the_url_quickly():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(TeacherServerError, match="connection refused") as error:
        client(url, max_retries=1).health()
    assert url in str(error.value) and "Start the teacher server" in str(error.value)
    assert time.monotonic() - start < 10


def test_timeout_says_timed_out(server):
    server.sleep = 1.5
    with pytest.raises(TeacherServerError, match=r"timed out after 0.5s"):
        client(server.url, timeout=0.5, max_retries=0).score([[5, 6]], [1], 2, 1.0)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda out: b"<html>bad gateway</html>", "not JSON"),
        (lambda out: {"object": "text_completion"}, "`choices`"),
        (lambda out: {**out, "choices": out["choices"][:1]}, "1 `choices` for 2 sequences"),
        (
            lambda out: {"choices": [{k: v for k, v in c.items() if k != "prompt_logprobs"} for c in out["choices"]]},
            "prompt_logprobs",
        ),
        (
            lambda out: {"choices": [{**c, "prompt_logprobs": c["prompt_logprobs"][:-1]} for c in out["choices"]]},
            "entries for",
        ),
        (
            lambda out: {
                "choices": [{**c, "prompt_logprobs": [None, {"5": {"logprob": -1.0}}, None]} for c in out["choices"]]
            },
            "rank",
        ),
    ],
)
def test_malformed_responses_raise_naming_the_field(server, mutate, field):
    server.mutate = mutate
    with pytest.raises(TeacherServerError, match="malformed") as error:
        client(server.url).score([[5, 6, 7], [8, 9, 10]], [1, 2], 2, 1.0)
    assert field in str(error.value) and server.calls == 1  # no retry on a malformed answer


def test_api_key_is_sent_and_never_shown(server, monkeypatch):
    server.api_key = KEY
    assert client(server.url, api_key=KEY).models() == MODEL_ID
    monkeypatch.setenv("OPD_TEACHER_API_KEY", KEY)
    wrong = "sk-wrong-9876543210"
    env_client = client(server.url)
    assert env_client.models() == MODEL_ID and KEY not in repr(env_client)
    bad = client(server.url, api_key=wrong)
    with pytest.raises(TeacherServerError, match="401") as error:
        bad.models()
    assert wrong not in str(error.value) and wrong not in repr(bad) and "API key" in str(error.value)
    assert server.calls == 0


def test_tokenizer_mismatch_fails_the_check(server, toy):
    tokenizer, _ = toy
    server.tokenize_offset = 1
    with pytest.raises(ValueError, match="tokenizer .* differs from the student's"):
        ServedTeacher(client(server.url), tokenizer, len(tokenizer)).check(1.0)


def test_ids_outside_the_vocabulary_raise(server, toy):
    tokenizer, _ = toy
    inputs, mask = batch(tokenizer)
    with pytest.raises(TeacherServerError, match="vocabulary"):
        ServedTeacher(client(server.url), tokenizer, 10).at_positions(inputs, mask, 1.0, 4)


def test_a_server_that_ignores_the_temperature_is_refused_at_start_up(toy):
    tokenizer, model = toy
    with FakeServer(tokenizer, model) as server:
        assert ServedTeacher(client(server.url), tokenizer, len(tokenizer)).check(0.7) == MODEL_ID
        server.ignore_temperature = True
        with pytest.raises(ValueError, match="does not apply the request's temperature"):
            ServedTeacher(client(server.url), tokenizer, len(tokenizer)).check(0.7)


@pytest.mark.parametrize(
    "settings",
    [
        {"loss_support": "teacher_topk", "loss_top_k": 8, "kl_direction": "mixed"},
        {"loss_support": "teacher_topk", "loss_top_k": 8, "loss_add_tail": True, "kl_direction": "reverse"},
        {"loss_support": "sampled_token", "kl_direction": "forward", "teacher_temperature": 0.8},
    ],
    ids=["topk", "topk-tail", "sampled-token"],
)
def test_training_with_a_served_teacher_equals_the_same_teacher_held_locally(toy, tmp_path, settings):
    """`trl-opd serve-teacher`'s server (in a thread) against the same teacher held locally. Dataset prefixes make
    both runs see the same batches; the losses and the trained weights (plain SGD, so
    that Adam does not magnify float noise in tiny gradients) must agree."""
    tokenizer, model = toy
    runs = {}
    server = serve(model, tokenizer, port=0, served_model_name=MODEL_ID)
    try:
        for name, teacher in (
            ("local", build_model(tokenizer, hidden_size=48, num_layers=2, seed=1)),
            ("served", server.url),
        ):
            args = make_config(tmp_path / name, max_steps=2, prefix_source="dataset", optim="sgd", **settings)
            trainer = OPDTrainer(
                model=build_model(tokenizer, hidden_size=32, num_layers=1, seed=0),
                teacher_model=teacher,
                args=args,
                train_dataset=make_dataset(),
                processing_class=tokenizer,
            )
            trainer.train()
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            runs[name] = losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    finally:
        server.shutdown()
    assert runs["served"][0] == pytest.approx(runs["local"][0], rel=1e-4)
    for name, weight in runs["local"][1].items():
        torch.testing.assert_close(runs["served"][1][name], weight, rtol=1e-4, atol=1e-5)


def test_served_teacher_refuses_supports_that_need_the_whole_distribution(toy, tmp_path):
    tokenizer, _ = toy
    args = make_config(tmp_path, loss_support="full")
    with pytest.raises(ValueError, match="gives only its top-k.*teacher_topk"):
        OPDTrainer(
            model=build_model(tokenizer, hidden_size=32, num_layers=1, seed=0),
            teacher_model="http://127.0.0.1:9",
            args=args,
            train_dataset=make_dataset(),
            processing_class=tokenizer,
        )
