"""`trl-opd serve-teacher` speaks vLLM's protocol: a real subprocess on loopback, checked against a vLLM response
fixture (tests/fixtures/README.md), against the same model run locally, and through TRL's own response parser."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from trl.generation.vllm_client import VLLMClient

from trl_opd.teacher_server import serve
from trl_opd.toy import build_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "vllm_completion_prompt_logprobs.json").read_text())
GENERATION = json.loads((ROOT / "tests" / "fixtures" / "vllm_completion_token_ids.json").read_text())
KEY = "test-key-not-a-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 60
# ModelCard and ModelPermission of vllm/entrypoints/serve/engine/protocol.py (see tests/fixtures/README.md).
MODEL_CARD_KEYS = {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}
PERMISSION_KEYS = {"id", "object", "created", "allow_create_engine", "allow_sampling", "allow_logprobs"}
PERMISSION_KEYS |= {"allow_search_indices", "allow_view", "allow_fine_tuning", "organization", "group", "is_blocking"}
SEQUENCES = [[1, 35, 33, 19, 32, 100, 15, 2, 100, 1, 15], [22, 23, 24, 60, 70, 2, 3]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("teacher")
    model = build_model(tokenizer, hidden_size=48, num_layers=2, seed=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model.eval()


@pytest.fixture(scope="module")
def server(saved_teacher):
    """`python -m trl_opd.cli serve-teacher` with the key in $VLLM_API_KEY; its base URL once /health answers."""
    port = free_port()
    env = os.environ | {"VLLM_API_KEY": KEY, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "trl_opd.cli", "serve-teacher", str(saved_teacher[0]), "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited: {process.stdout.read()}"
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        assert KEY not in output, "the server logged its API key"


def post(url: str, path: str, body, headers=AUTH) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(
        f"{url}{path}", data=data, headers=headers | {"Content-Type": "application/json"}, timeout=TIMEOUT
    )


def local_logprobs(model, sequence: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def assert_same_type(ours, theirs, where: str) -> None:
    kind = (
        (lambda value: "number" if isinstance(value, float) else type(value).__name__) if theirs is not None else None
    )
    if kind is not None:
        assert kind(ours) == kind(theirs), f"{where}: {type(ours).__name__} where vLLM has {type(theirs).__name__}"


def test_health_and_model_list(server):
    health = requests.get(f"{server}/health", timeout=TIMEOUT)  # open without the key
    assert health.status_code == 200 and health.content == b""
    models = requests.get(f"{server}/v1/models", headers=AUTH, timeout=TIMEOUT).json()
    assert models["object"] == "list" and len(models["data"]) == 1
    card = models["data"][0]
    assert set(card) == MODEL_CARD_KEYS and set(card["permission"][0]) == PERMISSION_KEYS
    assert card["object"] == "model" and card["owned_by"] == "vllm" and card["parent"] is None
    assert isinstance(card["created"], int) and card["max_model_len"] == 1024 and card["id"] == card["root"]


def test_completion_has_vllms_shape(server, saved_teacher):
    request = FIXTURE["_request"] | {"model": None, "prompt": SEQUENCES}
    response = post(server, "/v1/completions", request)
    assert response.status_code == 200, response.text
    ours = response.json()
    theirs = {key: value for key, value in FIXTURE.items() if not key.startswith("_")}
    assert list(ours) == list(theirs)
    for key in theirs:
        assert_same_type(ours[key], theirs[key], key)
    assert ours["object"] == "text_completion" and ours["id"].startswith("cmpl-")
    assert ours["model"] == str(saved_teacher[0])
    assert list(ours["usage"]) == list(theirs["usage"])
    assert ours["usage"] == {**theirs["usage"], "prompt_tokens": 18, "completion_tokens": 2, "total_tokens": 20}
    their_choice, their_entry = theirs["choices"][0], theirs["choices"][0]["prompt_logprobs"][1]["11"]
    assert len(ours["choices"]) == len(SEQUENCES)
    for index, (choice, sequence) in enumerate(zip(ours["choices"], SEQUENCES)):
        assert list(choice) == list(their_choice) and choice["index"] == index
        for key in their_choice:
            assert_same_type(choice[key], their_choice[key], f"choices[{index}].{key}")
        assert choice["logprobs"] is None and choice["token_ids"] is None and choice["prompt_token_ids"] is None
        positions = choice["prompt_logprobs"]
        assert len(positions) == len(sequence) and positions[0] is None
        for position, entries in enumerate(positions[1:], start=1):
            assert all(key == str(int(key)) for key in entries), "keys are stringified token ids"
            assert str(sequence[position]) in entries, "the actual token is present"
            assert list(entries)[0] == str(sequence[position]), "the actual token comes first, as in vLLM"
            for entry in entries.values():
                assert list(entry) == list(their_entry)
                for key in their_entry:
                    assert_same_type(entry[key], their_entry[key], f"prompt_logprobs[{position}].{key}")
                assert entry["rank"] >= 1
            k, ranks = FIXTURE["_request"]["prompt_logprobs"], sorted(entry["rank"] for entry in entries.values())
            assert ranks[:k] == list(range(1, k + 1)), "the top-k are ranked 1..k"
            assert len(entries) == k or (len(entries) == k + 1 and ranks[-1] > k), "k entries, + the actual if not in"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_the_local_model_and_parse_with_trl(server, saved_teacher, temperature):
    k = 5
    body = {"prompt": SEQUENCES, "max_tokens": 1, "temperature": temperature, "prompt_logprobs": k}
    choices = post(server, "/v1/completions", body).json()["choices"]
    outside_top_k = 0
    for choice, sequence in zip(choices, SEQUENCES):
        expected = local_logprobs(saved_teacher[1], sequence, temperature)
        for position, entries in enumerate(choice["prompt_logprobs"][1:], start=1):
            row, actual = expected[position - 1], sequence[position]
            for token, entry in entries.items():
                assert math.isclose(entry["logprob"], row[int(token)].item(), abs_tol=1e-5)
            assert entries[str(actual)]["rank"] == int((row >= row[actual]).sum())
            top_ids = row.topk(k).indices.tolist()
            assert [int(t) for t, e in sorted(entries.items(), key=lambda item: item[1]["rank"])][:k] == top_ids
            outside_top_k += actual not in top_ids
        prompt_length = 3
        parsed = VLLMClient._format_sequence_logprobs(choice, sequence, prompt_length, k)
        rows = expected[prompt_length - 1 : -1]
        top = rows.topk(k)
        torch.testing.assert_close(torch.tensor(parsed["logprobs"]), top.values, atol=1e-5, rtol=0)
        assert parsed["logprob_token_ids"] == top.indices.tolist()
        targets = torch.tensor(sequence[prompt_length:])
        # The actual token is always in the response (vLLM adds it), so TRL reads its logprob even outside the top-k.
        wanted = rows.gather(-1, targets[:, None])
        torch.testing.assert_close(torch.tensor(parsed["actual_logprobs"]), wanted, atol=1e-5, rtol=0)
        assert parsed["actual_token_ids"] == [[token] for token in sequence[prompt_length:]]
    assert outside_top_k > 0, "the actual token falls outside the top-k somewhere: the rank > k path is exercised"


def test_api_key_guards_v1_only(server):
    body = {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 1}
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
        assert requests.get(f"{server}/v1/models", headers=headers, timeout=TIMEOUT).status_code == 401
        response = post(server, "/v1/completions", body, headers=headers)
        assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}
    assert post(server, "/v1/completions", body).status_code == 200
    assert requests.get(f"{server}/health", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ('{"prompt": [1, 2', 400, None, "not valid JSON"),
        ("[1, 2]", 400, None, "JSON object"),
        ({"max_tokens": 1}, 400, "prompt", "`prompt`"),
        ({"prompt": [[1, 2], [3, 101]], "max_tokens": 1, "prompt_logprobs": 1}, 400, "prompt", "out of vocabulary"),
        ({"prompt": [1, 2], "temperature": 0}, 400, "temperature", "temperature"),
        ({"prompt": [1, 2], "prompt_logprobs": "5"}, 400, "prompt_logprobs", "prompt_logprobs"),
        ({"prompt": [1, 2], "n": 2}, 400, "n", "not supported"),
        ({"prompt": [1, 2], "model": "other"}, 404, "model", "does not exist"),
    ],
)
def test_bad_requests_get_vllms_error_shape(server, body, status, param, words):
    response = post(server, "/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["type"] == ("BadRequestError" if status == 400 else "NotFoundError")
    assert error["param"] == param and words in error["message"]


def test_tokenize_round_trip(server, tokenizer):
    text = "What is 3+5?"
    tokenized = post(server, "/tokenize", {"prompt": text}, headers={}).json()  # open, as in vLLM
    assert tokenized == {"count": len(tokenized["tokens"]), "max_model_len": 1024, "token_strs": None,
                         "tokens": tokenizer(text)["input_ids"]}  # fmt: skip
    messages = [{"role": "user", "content": text}]
    chat = post(server, "/tokenize", {"messages": messages}).json()
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert post(server, "/detokenize", {"tokens": chat["tokens"]}).json() == {"prompt": expected}


def test_serve_in_process_generates_from_token_ids(saved_teacher, tokenizer):
    server = serve(saved_teacher[1], tokenizer, port=0, served_model_name="toy-teacher")
    try:
        assert server.url.startswith("http://127.0.0.1:") and not server.url.endswith(":0")
        assert requests.get(f"{server.url}/v1/models", timeout=TIMEOUT).json()["data"][0]["id"] == "toy-teacher"
        body = {"model": "toy-teacher", "prompt": [[1, 35, 33]], "max_tokens": 4, "temperature": 0.8, "seed": 7}
        body |= {"logprobs": 2, "return_token_ids": True, "return_tokens_as_token_ids": True, "ignore_eos": True}
        first, second = (post(server.url, "/v1/completions", body, headers={}).json() for _ in range(2))
        choice = first["choices"][0]
        assert choice["token_ids"] == second["choices"][0]["token_ids"], "a seed makes sampling reproducible"
        assert len(choice["token_ids"]) == 4 and choice["prompt_token_ids"] == [1, 35, 33]
        assert choice["finish_reason"] == "length" and first["usage"]["completion_tokens"] == 4
        assert choice["text"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=True)
        logprobs = choice["logprobs"]
        assert logprobs["tokens"] == [f"token_id:{token}" for token in choice["token_ids"]]
        assert len(logprobs["token_logprobs"]) == 4 and all(2 <= len(top) <= 3 for top in logprobs["top_logprobs"])
        expected = local_logprobs(saved_teacher[1], [1, 35, 33] + choice["token_ids"], 0.8)
        for step, (token, value) in enumerate(zip(choice["token_ids"], logprobs["token_logprobs"])):
            assert math.isclose(value, expected[2 + step, token].item(), abs_tol=1e-5)
    finally:
        server.shutdown()


def test_generation_has_vllms_shape_and_stop_semantics(server, tokenizer):
    """`ServedTeacher.generate`'s request (the fixture's, on toy ids) answered as vLLM: same keys and types; choices in
    prompt order echoing `prompt_token_ids`; "stop" ends `token_ids` with the stop token, which `text` leaves out
    (`stop_reason` None for the tokenizer's EOS, else the id); "length" gives exactly `max_tokens` ids."""
    prompts, eos = [SEQUENCES[0][:4], SEQUENCES[1][:5]], tokenizer.eos_token_id
    theirs = {key: value for key, value in GENERATION.items() if not key.startswith("_")}
    their_choice = theirs["choices"][0]
    base = GENERATION["_request"] | {"model": None, "prompt": prompts, "max_tokens": 64, "temperature": 1.0}
    # Seeds 6 and 1: the toy teacher draws its EOS within 64 tokens, or never; then a drawn token made a stop id.
    first = post(server, "/v1/completions", base | {"seed": 6, "stop_token_ids": [eos]}).json()
    stop_id = first["choices"][0]["token_ids"][1]
    requests_sent = [base | {"seed": 6, "stop_token_ids": [eos]}, base | {"seed": 1, "stop_token_ids": [eos]}]
    requests_sent.append(base | {"seed": 6, "stop_token_ids": [stop_id]})
    endings = set()
    for request in requests_sent:
        ours = post(server, "/v1/completions", request).json()
        assert list(ours) == list(theirs) and list(ours["usage"]) == list(theirs["usage"])
        for key in theirs:
            assert_same_type(ours[key], theirs[key], key)
        assert ours["usage"]["completion_tokens"] == sum(len(choice["token_ids"]) for choice in ours["choices"])
        for index, (choice, prompt) in enumerate(zip(ours["choices"], prompts, strict=True)):
            assert list(choice) == list(their_choice) and choice["index"] == index
            for key in their_choice:
                assert_same_type(choice[key], their_choice[key], f"choices[{index}].{key}")
            ids, reason = choice["token_ids"], choice["finish_reason"]
            assert choice["prompt_token_ids"] == prompt and all(isinstance(token, int) for token in ids)
            if reason == "stop":
                assert ids[-1] in request["stop_token_ids"] and not set(ids[:-1]) & set(request["stop_token_ids"])
                assert choice["stop_reason"] == (None if ids[-1] == eos else ids[-1])
                assert choice["text"] == tokenizer.decode(ids[:-1], skip_special_tokens=True)
            else:
                assert reason == "length" and len(ids) == 64 and choice["stop_reason"] is None
                assert choice["text"] == tokenizer.decode(ids, skip_special_tokens=True)
            endings.add((reason, choice["stop_reason"]))
    assert endings == {("stop", None), ("length", None), ("stop", stop_id)}, "every ending is exercised"


def test_stop_token_ids_must_be_integers(server):
    response = post(server, "/v1/completions", {"prompt": [1, 2], "stop_token_ids": ["2"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop_token_ids"


@pytest.mark.parametrize("world", ["horizon", "toy"])
def test_serve_teacher_names_an_embedded_worlds_teacher(world, monkeypatch, capsys):
    """`trl-opd serve-teacher horizon|toy` serves that preset's teacher (built or loaded by `build_toy_pair`)."""
    import types

    from trl_opd import cli
    from trl_opd.horizon import HorizonPairConfig
    from trl_opd.toy import ToyPairConfig

    tokenizer = build_tokenizer()
    teacher = build_model(tokenizer, hidden_size=16, num_layers=1, seed=3)
    served = {}

    def fake_serve(model, tok, host, port, **kwargs):
        served.update(model=model, tokenizer=tok, name=kwargs["served_model_name"])
        httpd = types.SimpleNamespace(shutdown=lambda: None)
        return types.SimpleNamespace(url="http://fake", httpd=httpd, wait=lambda: None, shutdown=lambda: None)

    configs = []
    monkeypatch.setattr(cli, "build_toy_pair", lambda config: configs.append(config) or (teacher, None, tokenizer))
    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)
    cli.main(["serve-teacher", world, "--device", "cpu"])
    assert served["model"] is teacher and served["tokenizer"] is tokenizer and served["name"] == world
    assert configs == [{"horizon": HorizonPairConfig(), "toy": ToyPairConfig()}[world]]
