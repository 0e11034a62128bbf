"""A teacher served over HTTP with vLLM's OpenAI-compatible protocol, scored position by position.

The protocol is TRL's `VLLMClient.get_sequence_logprobs` (`trl/generation/vllm_client.py`): the full sequences
(prompt + completion token ids) go to `POST /v1/completions` as `{"model", "prompt": sequences, "max_tokens": 1,
"temperature", "prompt_logprobs": top_k}`; each choice's `prompt_logprobs[i]` is `None` for i = 0, else a dict
`{str(token_id): {"logprob", "rank", "decoded_token"}}` holding the top-k next tokens given `sequence[:i]` plus
`sequence[i]` itself, and TRL's staticmethod `VLLMClient._format_sequence_logprobs` slices its completion region.
That staticmethod is reused here on the class; `VLLMClient` itself is not, as it refuses to construct without the
`vllm` package, which a training node that only talks to a server does not need.

Teacher-written prefixes use the same endpoint as TRL's `VLLMClient.generate`: token-id prompts with `max_tokens`,
`temperature`, `stop_token_ids` (the trainer's EOS ids) and `return_token_ids: true` (vLLM >= 0.10.2, vllm#22587),
read from `choices[i].token_ids` (the sampled ids, the stop token last when `finish_reason` is "stop", as vLLM's
`check_stop` appends it before stopping) in `choices[i].index` order, checked against `prompt_token_ids`.

`TeacherServerClient` is the transport (health, model id, scoring, sampling, tokenization; bounded retries; a bearer
API key that never reaches a message or a repr). `ServedTeacher` is the `teachers.Teacher` seam on top of it: the
teacher's top-k at the loss positions of a batch, as `teachers.TeacherTopK`, and its sampled completions.
"""

from __future__ import annotations

import os
import time
from typing import Any

import requests
import torch
from trl.generation.vllm_client import VLLMClient

from .teachers import TeacherTopK

API_KEY_ENV = ("OPD_TEACHER_API_KEY", "VLLM_API_KEY")  # read in this order when `api_key` is None
PROBE = "The quick brown fox jumps over 12+7=19.\n"  # + the local tokenizer's EOS: the tokenizer probe of `check`


def is_served(teacher_model: Any) -> bool:
    """A teacher given as an http(s) URL: a server speaking vLLM's OpenAI-compatible protocol."""
    return isinstance(teacher_model, str) and teacher_model.startswith(("http://", "https://"))


class TeacherServerError(RuntimeError):
    """The teacher server could not be reached, refused a request or answered something unusable."""


class TeacherServerClient:
    """HTTP client for a teacher served with vLLM's protocol (`vllm serve`, `trl-opd serve-teacher`).

    Connection errors, timeouts and 5xx answers are retried `max_retries` times, waiting `backoff * 2**i` seconds
    before retry i + 1; 4xx answers and malformed responses raise `TeacherServerError` at once. The API key
    (`api_key`, else `$OPD_TEACHER_API_KEY`, else `$VLLM_API_KEY`) is sent as `Authorization: Bearer <key>`.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
    ) -> None:
        if max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(f"Need max_retries >= 0, timeout > 0, backoff >= 0: {max_retries}, {timeout}, {backoff}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        if api_key is None:
            api_key = next((os.environ[name] for name in API_KEY_ENV if os.environ.get(name)), None)
        self._api_key = api_key or None
        self._session = requests.Session()
        if self._api_key:
            self._session.headers["Authorization"] = f"Bearer {self._api_key}"
        self._model: str | None = None

    def __repr__(self) -> str:
        key = "set" if self._api_key else "unset"
        settings = f"timeout={self.timeout}, max_retries={self.max_retries}, backoff={self.backoff}"
        return f"TeacherServerClient({self.url!r}, api_key=<{key}>, {settings})"

    # ------------------------------------------------------------------------------------------------ transport

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "<api key>") if self._api_key else text

    def _error(self, endpoint: str, problem: str, fix: str) -> TeacherServerError:
        return TeacherServerError(self._scrub(f"Teacher server at {self.url}: {endpoint} {problem}. {fix}"))

    def _malformed(self, endpoint: str, problem: str) -> TeacherServerError:
        fix = "Is this a vLLM-compatible server (`vllm serve` or `trl-opd serve-teacher`) of a matching version?"
        return self._error(endpoint, f"returned a malformed response: {problem}", fix)

    @staticmethod
    def _server_message(response: requests.Response) -> str:
        """The text of a vLLM / FastAPI error body (`message`, `error.message`, `error`, `detail`), or the raw body."""
        try:
            body = response.json()
        except ValueError:
            return response.text[:500]
        if isinstance(body, dict):
            error = body.get("error")
            for value in (body.get("message"), error.get("message") if isinstance(error, dict) else error):
                if isinstance(value, str):
                    return value[:500]
            if "detail" in body:
                return str(body["detail"])[:500]
        return str(body)[:500]

    def _request(self, method: str, endpoint: str, payload: dict | None = None, expect_json: bool = True) -> Any:
        """`method` `endpoint` with bounded retries; the decoded JSON body (None when not `expect_json`)."""
        problem, fix = "", ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._session.request(method, self.url + endpoint, json=payload, timeout=self.timeout)
            except requests.Timeout:
                problem = f"timed out after {self.timeout}s"
                fix = "The server is overloaded or stuck: raise `timeout`, send smaller batches, or check its logs."
                continue
            except requests.ConnectionError as exc:
                refused = "refused" in str(exc).lower()
                problem = "failed: connection refused" if refused else f"failed: cannot connect ({type(exc).__name__})"
                fix = "Start the teacher server (`trl-opd serve-teacher` or `vllm serve`) and check the URL and port."
                continue
            status = response.status_code
            if status >= 500:
                problem = f"failed with HTTP {status}: {self._server_message(response)}"
                fix = "The server hit an internal error: check its logs (out of memory? sequence too long?)."
                continue
            if status >= 400:
                if status in (401, 403):
                    fix = "Check the API key (`api_key`, $OPD_TEACHER_API_KEY or $VLLM_API_KEY) against the server's."
                elif status == 404:
                    fix = "Check the URL (the server root, without /v1) and that the server exposes this endpoint."
                else:
                    fix = "The server rejected the request: is `top_k` above its --max-logprobs? The model name right?"
                raise self._error(endpoint, f"failed with HTTP {status}: {self._server_message(response)}", fix)
            if not expect_json:
                return None
            try:
                return response.json()
            except ValueError:
                raise self._malformed(endpoint, f"not JSON ({response.text[:200]!r})") from None
        attempts = self.max_retries + 1
        raise self._error(endpoint, f"{problem} (after {attempts} attempt{'s' * (attempts > 1)})", fix)

    # ------------------------------------------------------------------------------------------------ endpoints

    def health(self) -> None:
        """`GET /health`: returns when the server answers 200."""
        self._request("GET", "/health", expect_json=False)

    def models(self) -> str:
        """`GET /v1/models`: the served model id (the first `data[].id`), also used as `model` in requests."""
        body = self._request("GET", "/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        first = data[0] if isinstance(data, list) and data else None
        if not isinstance(first, dict) or not isinstance(first.get("id"), str):
            raise self._malformed("/v1/models", "`data` is not a non-empty list of objects with a string `id`")
        self._model = first["id"]
        return self._model

    @property
    def model(self) -> str:
        return self._model if self._model is not None else self.models()

    def score(
        self, sequences: list[list[int]], prompt_lengths: list[int], top_k: int, temperature: float
    ) -> list[dict[str, list]]:
        """Per sequence, TRL's `_format_sequence_logprobs` of the teacher's `prompt_logprobs`: the completion region
        (positions `prompt_length:`) as `logprobs` / `logprob_token_ids` (each (T, top_k), descending, padded with
        -inf / 0) and `actual_logprobs` / `actual_token_ids` ((T, 1); -inf when the token was not returned)."""
        if top_k < 1 or temperature <= 0:
            raise ValueError(f"Need top_k >= 1 and temperature > 0, got {top_k} and {temperature}.")
        endpoint = "/v1/completions"
        payload = {
            "model": self.model,
            "prompt": sequences,
            "max_tokens": 1,
            "temperature": temperature,
            "prompt_logprobs": top_k,
        }
        choices = self._choices(endpoint, self._request("POST", endpoint, payload), len(sequences))
        results = []
        for i, (choice, sequence, prompt_length) in enumerate(zip(choices, sequences, prompt_lengths, strict=True)):
            logprobs = choice.get("prompt_logprobs")
            if not isinstance(logprobs, list):
                raise self._malformed(endpoint, f"field `choices[{i}].prompt_logprobs` is missing or not a list")
            if len(logprobs) != len(sequence):
                raise self._malformed(
                    endpoint, f"`choices[{i}].prompt_logprobs` has {len(logprobs)} entries for {len(sequence)} tokens"
                )
            try:
                results.append(VLLMClient._format_sequence_logprobs(choice, sequence, prompt_length, top_k))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                problem = f"`choices[{i}].prompt_logprobs` entries need `logprob` and `rank` ({exc!r})"
                raise self._malformed(endpoint, problem) from None
        return results

    def _choices(self, endpoint: str, body: Any, count: int) -> list[dict]:
        """`body["choices"]` in prompt order: `count` objects whose `index` fields are 0..count-1 (vLLM numbers
        them prompt-major; with n = 1, choice i answers prompt i)."""
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list):
            raise self._malformed(endpoint, "field `choices` is missing or not a list")
        if len(choices) != count:
            raise self._malformed(endpoint, f"{len(choices)} `choices` for {count} sequences")
        indices = [choice.get("index") if isinstance(choice, dict) else None for choice in choices]
        if not all(isinstance(index, int) for index in indices) or sorted(indices) != list(range(count)):
            raise self._malformed(endpoint, f"`choices[].index` are {indices}, not 0..{count - 1}")
        return sorted(choices, key=lambda choice: choice["index"])

    def generate(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        temperature: float,
        stop_token_ids: list[int],
        seed: int | None = None,
    ) -> list[tuple[list[int], str]]:
        """Per prompt, in order, the `token_ids` the server sampled at `temperature` (at most `max_tokens`, stopping
        after an EOS or one of `stop_token_ids`) and its `finish_reason` ("stop" or "length")."""
        if max_tokens < 1 or temperature <= 0:
            raise ValueError(f"Need max_tokens >= 1 and temperature > 0, got {max_tokens} and {temperature}.")
        endpoint = "/v1/completions"
        payload = {"model": self.model, "prompt": prompts, "n": 1, "max_tokens": max_tokens}
        payload |= {"temperature": temperature, "stop_token_ids": stop_token_ids, "return_token_ids": True}
        if seed is not None:
            payload["seed"] = seed
        choices = self._choices(endpoint, self._request("POST", endpoint, payload), len(prompts))
        results = []
        for i, (choice, prompt) in enumerate(zip(choices, prompts)):
            ids, finish_reason = choice.get("token_ids"), choice.get("finish_reason")
            if not isinstance(ids, list) or not all(isinstance(token, int) for token in ids):
                problem = f"`choices[{i}].token_ids` is missing or not a list of integers"
                raise self._malformed(endpoint, f"{problem} (`return_token_ids` needs vLLM >= 0.10.2)")
            if choice.get("prompt_token_ids") not in (None, prompt):
                raise self._malformed(endpoint, f"`choices[{i}].prompt_token_ids` is not prompt {i}: out of order?")
            if finish_reason not in ("stop", "length"):
                raise self._error(
                    endpoint, f"ended completion {i} with finish_reason {finish_reason!r}", "Check the server's logs."
                )
            results.append((ids, finish_reason))
        return results

    def tokenize(self, text: str) -> list[int]:
        """vLLM's `POST /tokenize` of `text` without special tokens added: its `tokens`."""
        body = self._request("POST", "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(token, int) for token in tokens):
            raise self._malformed("/tokenize", "field `tokens` is missing or not a list of integers")
        return tokens

    def check(self, tokenizer: Any, vocab_size: int) -> str:
        """Start-up check: the server is up, serves a model and tokenizes like `tokenizer`. Returns the model id."""
        self.health()
        model = self.models()
        probe = PROBE + (tokenizer.eos_token or "")
        local, served = tokenizer.encode(probe, add_special_tokens=False), self.tokenize(probe)
        if served != local or any(token >= vocab_size for token in served):
            raise ValueError(
                f"The served teacher's tokenizer ({model!r} at {self.url}) differs from the student's: {probe!r} is "
                f"{served} there and {local} here (student vocabulary size {vocab_size}). Token-level distillation "
                "needs the same vocabulary: serve a teacher that shares the student's tokenizer."
            )
        return model


class ServedTeacher:
    """`teachers.Teacher` backed by a `TeacherServerClient`: the teacher's top-`top_k` at the loss positions."""

    def __init__(self, client: TeacherServerClient, tokenizer: Any, vocab_size: int) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    def check(self, temperature: float) -> str:
        """Start-up checks: `TeacherServerClient.check` with this teacher's tokenizer and vocabulary size, and, at a
        `temperature` other than 1, that the server applies it to the scores exactly once.

        With temperature τ, log-probabilities renormalised on the top-k are log_softmax(z/τ) over it, i.e. those at
        τ = 1 divided by τ and renormalised. A server that ignores the request's temperature (scoring with the raw
        logits, slime#2085, verl#6867) returns the τ = 1 values instead: that is refused rather than trained on.
        """
        model = self.client.check(self.tokenizer, self.vocab_size)
        if abs(temperature - 1.0) > 1e-6:
            sequence = self.tokenizer.encode(PROBE, add_special_tokens=False)
            top_k = min(8, self.vocab_size)
            plain, tempered = (self.client.score([sequence], [1], top_k, t)[0] for t in (1.0, temperature))
            expected = _renormalised(plain, lambda lp: lp / temperature)
            if not torch.allclose(_renormalised(tempered, lambda lp: lp), expected, atol=1e-3):
                raise ValueError(
                    f"The teacher server at {self.client.url} does not apply the request's temperature "
                    f"({temperature}) to its prompt log-probabilities, so the teacher would be scored at the wrong "
                    "temperature. Serve it with `trl-opd serve-teacher`, or with vLLM's `--logprobs-mode "
                    "processed_logprobs` if your version applies it to prompt log-probabilities, or set "
                    "`teacher_temperature=1.0`."
                )
        return model

    def generate(
        self,
        prompt_ids: list[list[int]],
        max_tokens: int,
        temperature: float,
        eos_token_ids: list[int],
        *,
        seed: int | None = None,
    ) -> list[list[int]]:
        """Teacher-written completions, sampled by the server at `temperature` (applied there, once), in one request.

        Per prompt, the completion ids as TRL's `_generate_single_turn` returns them: up to and including the first of
        `eos_token_ids` when the teacher stopped, else `max_tokens` ids (fewer only at the server's context length).
        The EOS ids go as `stop_token_ids`, so the server stops on the trainer's EOS set. An empty completion, one
        longer than `max_tokens`, one stopped on a token that is not an EOS id, or an id outside the student's
        vocabulary raises `TeacherServerError`: a completion is never silently shortened or emptied.
        """
        if not eos_token_ids:
            raise ValueError("`eos_token_ids` must name at least one end-of-sequence token id.")
        if not prompt_ids:
            return []
        eos, endpoint = set(eos_token_ids), "/v1/completions"
        sampled = self.client.generate(prompt_ids, max_tokens, temperature, sorted(eos), seed)
        completions = []
        for i, (ids, finish_reason) in enumerate(sampled):
            ends = [position for position, token in enumerate(ids) if token in eos]
            completion = ids[: ends[0] + 1] if ends else ids
            if not completion:
                problem = "an empty completion"
            elif len(ids) > max_tokens:
                problem = f"{len(ids)} tokens for max_tokens={max_tokens}"
            elif finish_reason == "stop" and not ends:
                problem = f"finish_reason 'stop' after token {ids[-1]}, which is none of the EOS ids {sorted(eos)}"
            elif not all(0 <= token < self.vocab_size for token in completion):
                problem = f"a token id outside the student's vocabulary (size {self.vocab_size}): {completion}"
            else:
                completions.append(completion)
                continue
            raise TeacherServerError(
                f"Teacher server at {self.client.url}: {endpoint} returned {problem} for prompt {i}. Serve a teacher "
                "with the student's tokenizer and EOS tokens (`trl-opd serve-teacher`, or `vllm serve` >= 0.10.2)."
            )
        return completions

    def at_positions(self, inputs: dict[str, Any], mask: torch.Tensor, temperature: float, top_k: int) -> TeacherTopK:
        """Scores every row with a masked position in one request: the unpadded prompt (`prompt_mask`, left-padded)
        then the completion (`completion_mask`, right-padded) up to its last masked position. Completion position t
        of a row is the scored completion-region index t (the teacher's distribution given the prompt and tokens
        < t). Entries come in `tensor[mask]` (row-major) order, on `mask.device`."""
        mask_cpu = mask.detach().cpu().bool()
        prompt_ids, prompt_mask = inputs["prompt_ids"].cpu(), inputs["prompt_mask"].cpu().bool()
        completion_ids, completion_mask = inputs["completion_ids"].cpu(), inputs["completion_mask"].cpu().bool()
        rows, sequences, prompt_lengths = [], [], []
        for b in range(mask_cpu.size(0)):
            positions = mask_cpu[b].nonzero().flatten().tolist()
            if not positions:
                continue
            length = int(completion_mask[b].sum())
            if not completion_mask[b, :length].all() or positions[-1] >= length:
                raise ValueError(f"Row {b}: `completion_mask` must be a right-padded prefix covering the loss mask.")
            prompt = prompt_ids[b][prompt_mask[b]].tolist()
            if not prompt:
                raise ValueError(f"Row {b} has no prompt token: its first completion position has no teacher context.")
            rows.append(positions)
            sequences.append(prompt + completion_ids[b, : positions[-1] + 1].tolist())
            prompt_lengths.append(len(prompt))
        ids, log_probs, token_log_probs = [], [], []
        if sequences:
            for positions, result in zip(rows, self.client.score(sequences, prompt_lengths, top_k, temperature)):
                ids += [result["logprob_token_ids"][t] for t in positions]
                log_probs += [result["logprobs"][t] for t in positions]
                token_log_probs += [result["actual_logprobs"][t][0] for t in positions]
        ids_tensor = torch.tensor(ids, dtype=torch.long).reshape(-1, top_k)
        outside = ids_tensor[(ids_tensor >= self.vocab_size) | (ids_tensor < 0)]
        if outside.numel():
            raise TeacherServerError(
                f"Teacher server at {self.client.url} returned token id {int(outside[0])} outside the student's "
                f"vocabulary (size {self.vocab_size}): the served teacher's vocabulary does not match the student's."
            )
        return TeacherTopK(
            ids=ids_tensor.to(mask.device),
            log_probs=torch.tensor(log_probs, dtype=torch.float32).reshape(-1, top_k).to(mask.device),
            token_log_probs=torch.tensor(token_log_probs, dtype=torch.float32).to(mask.device),
        )


def _renormalised(result: dict[str, list], transform: Any) -> torch.Tensor:
    """log_softmax over each position's returned top-k of `transform(log-probs)`, keyed by sorted token id."""
    ids = torch.tensor(result["logprob_token_ids"])
    values = transform(torch.tensor(result["logprobs"], dtype=torch.float64))
    order = ids.argsort(dim=-1)
    return torch.log_softmax(values.gather(-1, order), dim=-1)
