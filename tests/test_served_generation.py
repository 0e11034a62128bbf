"""`ServedTeacher.generate`: teacher-written completions sampled by `trl-opd serve-teacher` (in a thread on loopback),
equal to the same model generating locally under TRL's completion contract, and every malformed answer refused by
name after one request (a real server's response, edited on its way out)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, make_dataset

from trl_opd import OPDTrainer, teacher_server
from trl_opd.served_teacher import ServedTeacher, TeacherServerClient, TeacherServerError
from trl_opd.teacher_engine import TeacherEngine
from trl_opd.teacher_server import serve
from trl_opd.toy import build_model, build_tokenizer

MODEL_ID = "toy-teacher"
GREEDY = 1e-4  # a temperature at which sampling is argmax: logit gaps of 0.01 leave the runner-up e^-100
ROUTE = ("POST", "/v1/completions")


@pytest.fixture(scope="module")
def toy():
    tokenizer = build_tokenizer()
    return tokenizer, build_model(tokenizer, hidden_size=48, num_layers=2, seed=1).eval()


@pytest.fixture(scope="module")
def server(toy):
    tokenizer, model = toy
    running = serve(model, tokenizer, port=0, served_model_name=MODEL_ID)
    yield running
    running.shutdown()


@pytest.fixture
def requests_seen(monkeypatch):
    """The bodies of the /v1/completions requests the server answers from now on."""
    seen: list[dict] = []

    def record(engine, body):
        seen.append(body)
        return TeacherEngine.completion(engine, body)

    monkeypatch.setitem(teacher_server._ROUTES, ROUTE, record)
    return seen


def edit_responses(monkeypatch, edit) -> list[dict]:
    """Make the server answer /v1/completions with `edit(response, body)`; returns the request bodies seen."""
    seen: list[dict] = []

    def edited(engine, body):
        seen.append(body)
        return edit(TeacherEngine.completion(engine, body), body)

    monkeypatch.setitem(teacher_server._ROUTES, ROUTE, edited)
    return seen


def served_teacher(url: str, tokenizer) -> ServedTeacher:
    client = TeacherServerClient(url, timeout=30.0, max_retries=2, backoff=0.01)
    return ServedTeacher(client, tokenizer, len(tokenizer))


def prompts(tokenizer, questions=("1+2?", "13+29=?", "7?", "4+4+4?")) -> list[list[int]]:
    """Chat prompts of different lengths, as the trainer tokenizes them."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for q in questions
    ]


@torch.no_grad()
def local_greedy(model, prompt_ids: list[list[int]], max_tokens: int, eos_ids: list[int]) -> list[list[int]]:
    """What TRL's `_generate_single_turn` returns for greedy HF generation: each completion cut after its first EOS."""
    completions = []
    for ids in prompt_ids:
        out = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos_ids, pad_token_id=0
        )
        completion = out[0, len(ids) :].tolist()
        ends = [t for t, token in enumerate(completion) if token in eos_ids]
        completions.append(completion[: ends[0] + 1] if ends else completion)
    return completions


def test_greedy_generation_equals_the_local_model(server, toy, requests_seen):
    tokenizer, model = toy
    prompt_ids, eos = prompts(tokenizer), [tokenizer.eos_token_id]
    teacher = served_teacher(server.url, tokenizer)
    got = teacher.generate(prompt_ids, 12, GREEDY, eos)
    expected = local_greedy(model, prompt_ids, 12, eos)
    assert got == expected and len(requests_seen) == 1  # one request for the whole batch, in prompt order
    assert len(set(map(tuple, got))) == len(got), "distinct prompts give distinct completions: the order is checked"
    # A token of the first greedy completion made an EOS id: the server stops there (stop_token_ids) and the
    # completion ends with it, as TRL cuts after the first EOS; the others are cut the same way, or run to length.
    stop = next(token for t, token in enumerate(got[0][2:], 2) if token not in got[0][:t])
    got = teacher.generate(prompt_ids, 12, GREEDY, [*eos, stop])
    assert got == local_greedy(model, prompt_ids, 12, [*eos, stop])
    assert got[0][-1] == stop and len(got[0]) < 12
    assert requests_seen[-1]["stop_token_ids"] == sorted({*eos, stop})


def test_sampled_generation_follows_trls_completion_contract(server, toy):
    tokenizer, _ = toy
    prompt_ids, eos = prompts(tokenizer), tokenizer.eos_token_id
    teacher = served_teacher(server.url, tokenizer)
    # With these seeds the (nearly uniform) toy teacher draws its EOS within 64 tokens, or never.
    stopped, cut = (teacher.generate(prompt_ids, 64, 1.0, [eos], seed=seed) for seed in (6, 1))
    for completion in stopped + cut:
        assert completion and eos not in completion[:-1]
    assert all(completion[-1] == eos and len(completion) < 64 for completion in stopped), "ends with the EOS"
    assert all(len(completion) == 64 for completion in cut), "no EOS: cut at max_tokens"
    assert teacher.generate(prompt_ids, 64, 1.0, [eos], seed=6) == stopped, "a seed makes sampling reproducible"
    assert teacher.generate(prompt_ids, 64, 1.0, [eos], seed=4) not in (stopped, cut)


def test_the_request_carries_the_temperature_once_and_the_eos_ids(server, toy, requests_seen):
    tokenizer, _ = toy
    teacher = served_teacher(server.url, tokenizer)
    teacher.generate(prompts(tokenizer)[:2], 5, 0.7, [2, 2, 7], seed=11)
    (body,) = requests_seen
    assert body == {
        "model": MODEL_ID,
        "prompt": prompts(tokenizer)[:2],
        "n": 1,
        "max_tokens": 5,
        "temperature": 0.7,
        "stop_token_ids": [2, 7],
        "return_token_ids": True,
        "seed": 11,
    }


def test_choices_are_read_by_index_and_cut_after_the_first_eos(server, toy, monkeypatch):
    tokenizer, model = toy
    prompt_ids, eos = prompts(tokenizer), tokenizer.eos_token_id
    expected = local_greedy(model, prompt_ids, 6, [eos])

    def reverse_and_plant_eos(response: dict, body: dict) -> dict:
        choices = response["choices"]
        choices[1]["token_ids"] = choices[1]["token_ids"][:2] + [eos] + choices[1]["token_ids"][3:]
        return response | {"choices": choices[::-1]}  # each choice keeps its index

    seen = edit_responses(monkeypatch, reverse_and_plant_eos)
    got = served_teacher(server.url, tokenizer).generate(prompt_ids, 6, GREEDY, [eos])
    assert got == [expected[0], expected[1][:2] + [eos], *expected[2:]] and len(seen) == 1


def first(field: str, value):
    """An edit setting `field` of the first choice to `value`."""
    return lambda response, body: (
        response | {"choices": [response["choices"][0] | {field: value}] + response["choices"][1:]}
    )


@pytest.mark.parametrize(
    "edit, words",
    [
        (first("token_ids", None), "`choices[0].token_ids` is missing or not a list of integers"),
        (first("token_ids", [5, "6"]), "`choices[0].token_ids` is missing or not a list of integers"),
        (lambda response, body: response | {"choices": response["choices"][:1]}, "1 `choices` for 2 sequences"),
        (lambda response, body: response | {"choices": "none"}, "`choices` is missing or not a list"),
        (first("index", 1), "`choices[].index` are [1, 1]"),
        (first("prompt_token_ids", [1, 2, 3]), "`choices[0].prompt_token_ids` is not prompt 0"),
        (first("finish_reason", "abort"), "finish_reason 'abort'"),
        (first("token_ids", []), "an empty completion"),
        (first("token_ids", [5] * 5), "5 tokens for max_tokens=4"),
        (first("finish_reason", "stop"), "which is none of the EOS ids [2]"),
        (first("token_ids", [5, 101]), "outside the student's vocabulary (size 101)"),
        (first("token_ids", [-1]), "outside the student's vocabulary (size 101)"),
    ],
)
def test_malformed_generation_responses_raise_naming_the_field(server, toy, monkeypatch, edit, words):
    tokenizer, _ = toy
    seen = edit_responses(monkeypatch, edit)
    with pytest.raises(TeacherServerError) as error:
        served_teacher(server.url, tokenizer).generate(prompts(tokenizer)[:2], 4, GREEDY, [tokenizer.eos_token_id])
    message = str(error.value)
    assert words in message and server.url in message and "/v1/completions" in message
    assert len(seen) == 1, "a malformed answer is not retried"


def test_a_failing_server_is_retried_then_named(server, toy, monkeypatch):
    tokenizer, model = toy
    prompt_ids, eos = prompts(tokenizer)[:2], [tokenizer.eos_token_id]
    failures = iter([True])

    def flaky(response: dict, body: dict) -> dict:
        if next(failures, False):
            raise RuntimeError("CUDA out of memory")  # answered as vLLM's 500
        return response

    seen = edit_responses(monkeypatch, flaky)
    assert served_teacher(server.url, tokenizer).generate(prompt_ids, 4, GREEDY, eos) == local_greedy(
        model, prompt_ids, 4, eos
    )
    assert len(seen) == 2
    failures = iter([True] * 10)
    with pytest.raises(TeacherServerError, match=r"HTTP 500: CUDA out of memory \(after 3 attempts\)") as error:
        served_teacher(server.url, tokenizer).generate(prompt_ids, 4, GREEDY, eos)
    assert server.url in str(error.value)


def test_arguments_are_checked_before_any_request(server, toy, requests_seen):
    tokenizer, _ = toy
    teacher = served_teacher(server.url, tokenizer)
    assert teacher.generate([], 4, 1.0, [2]) == []
    with pytest.raises(ValueError, match="eos_token_ids"):
        teacher.generate(prompts(tokenizer), 4, 1.0, [])
    with pytest.raises(ValueError, match="max_tokens >= 1 and temperature > 0"):
        teacher.generate(prompts(tokenizer), 0, 1.0, [2])
    with pytest.raises(ValueError, match="max_tokens >= 1 and temperature > 0"):
        teacher.generate(prompts(tokenizer), 4, 0.0, [2])
    assert requests_seen == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_completion_length": None}, "need a `max_completion_length`"),
        ({"top_p": 0.9}, r"sampling settings \['top_p'\]"),
        ({"generation_kwargs": {"do_sample": False}}, r"sampling settings \['do_sample'\]"),
    ],
)
def test_teacher_prefixes_from_a_server_refuse_what_its_request_cannot_carry(tmp_path, settings, message):
    """Checked before any request: the server samples at the teacher temperature with a `max_tokens` cap only."""
    tokenizer = build_tokenizer()
    args = make_config(tmp_path, prefix_source="teacher", loss_support="teacher_topk", **settings)
    with pytest.raises(ValueError, match=message):
        OPDTrainer(build_model(tokenizer), "http://127.0.0.1:9", args, make_dataset(), processing_class=tokenizer)
