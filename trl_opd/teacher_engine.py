"""The model behind `trl-opd serve-teacher`: turns vLLM-shaped request bodies into vLLM-shaped response dicts.

The JSON shapes are vLLM's pydantic models, as stored in `vllm-project/vllm` (the commits are cited in
`tests/fixtures/README.md`):

- `GET /v1/models` -> `ModelList` of one `ModelCard` (`permission=[ModelPermission()]`, as vLLM's `/v1/models`).
- `POST /v1/completions` -> `CompletionResponse`. `prompt` is token ids (`list[int]` or `list[list[int]]`) or text.
  `prompt_logprobs: k` fills `choices[i].prompt_logprobs`: `None` at position 0, then at position `p` a dict
  `{token_id: {"logprob", "rank", "decoded_token"}}` holding the actual token `prompt[p]` first (with its true 1-based
  rank) and the top-k of the distribution predicting position `p`, ranked 1..k (`k=-1`: the whole vocabulary). This is
  `VLLMClient.get_sequence_logprobs`'s scoring call (`max_tokens: 1`). `max_tokens` tokens are then sampled at
  `temperature` (optional `seed`); `logprobs: k` returns their `CompletionLogProbs`, `return_token_ids: true` their
  ids (`token_ids`) and the prompt's (`prompt_token_ids`). Sampling stops on an EOS id (the tokenizer's and the
  generation config's, unless `ignore_eos`) or one of `stop_token_ids`: `finish_reason` "stop", `stop_reason` None
  for the tokenizer's EOS else the token id (vLLM's `check_stop`), and the stop token is the last of `token_ids` but
  not in `text` (vLLM's detokenizer skips it). Otherwise `finish_reason` is "length" after `max_tokens` tokens.
- `POST /tokenize` (`prompt` or chat `messages`) -> `TokenizeResponse`; `POST /detokenize` -> `DetokenizeResponse`.

Logprobs are `log_softmax(logits / temperature)` in float32, clamped at -9999.0 as vLLM's `clamp_prompt_logprobs`.
Errors raise `RequestError`, answered as vLLM's `ErrorResponse` (`{"error": {"message", "type", "param", "code"}}`).
Where this differs from vLLM: sampling knobs beyond temperature and seed are refused rather than ignored (`_NEUTRAL`),
`temperature` must be > 0 (vLLM reads 0 as greedy), there is no `--max-logprobs` cap, and prompts run one at a time,
unbatched, under one lock.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from functools import lru_cache
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

MIN_LOGPROB = -9999.0  # vLLM replaces -inf by this before serializing
# Request fields this server cannot honour, with the values that mean "off" (anything else is refused with a 400).
_NEUTRAL = {
    **dict.fromkeys(["n", "best_of"], (1, None)),
    **dict.fromkeys(["top_p", "repetition_penalty"], (1, None)),
    **dict.fromkeys(["top_k"], (0, -1, None)),
    **dict.fromkeys(["min_p", "presence_penalty", "frequency_penalty"], (0, None)),
    **dict.fromkeys(["stream", "echo", "use_beam_search"], (False, None)),
    **dict.fromkeys(
        ["suffix", "prompt_embeds", "logprob_token_ids", "structured_outputs", "response_format"], (None,)
    ),
    **dict.fromkeys(["logit_bias", "stop"], (None, [], {}, "")),
}


class RequestError(Exception):
    """A client error, answered with vLLM's `ErrorResponse` body."""

    def __init__(self, message: str, param: str | None = None, code: int = 400, err_type: str = "BadRequestError"):
        super().__init__(message)
        self.message, self.param, self.code, self.err_type = message, param, code, err_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(body: dict, name: str, default: int | None, minimum: int, all_is_minus_one: bool = False) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or (value < minimum and not (all_is_minus_one and value == -1)):
        raise RequestError(f"`{name}` must be an integer >= {minimum}, got {value!r}.", param=name)
    return value


class TeacherEngine:
    """The model, its tokenizer and the lock; turns request bodies into vLLM-shaped response dicts."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        served_model_name: str,
        root: str | None = None,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.served_model_name, self.root = served_model_name, root or served_model_name
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length)
        eos = getattr(model.generation_config, "eos_token_id", None)
        # vLLM stops on the tokenizer's EOS and adds the generation config's to the stop ids
        self.eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.lock = threading.Lock()
        self.decode = lru_cache(maxsize=None)(lambda token_id: tokenizer.decode([token_id]))

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    def check_model(self, body: dict) -> None:
        """vLLM's `_check_model`: a request naming another model is a 404."""
        name = body.get("model")
        if name is not None and name != self.served_model_name:
            raise RequestError(f"The model `{name}` does not exist.", "model", 404, "NotFoundError")

    def check_ids(self, ids: list, param: str) -> list[int]:
        if not ids or not all(_is_int(token) for token in ids):
            raise RequestError(f"`{param}` must be a non-empty list of integer token ids.", param.split("[")[0])
        bad = [token for token in ids if not 0 <= token < self.vocab_size]
        if bad:
            message = f"Token id {bad[0]} in `{param}` is out of vocabulary [0, {self.vocab_size})."
            raise RequestError(message, param.split("[")[0])
        return ids

    def model_list(self) -> dict[str, Any]:
        permission = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": int(time.time())}
        permission |= {"allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True}
        permission |= {"allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False}
        permission |= {"organization": "*", "group": None, "is_blocking": False}
        card = {"id": self.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm"}
        card |= {"root": self.root, "parent": None, "max_model_len": self.max_model_len, "permission": [permission]}
        return {"object": "list", "data": [card]}

    def _prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_int(prompt[0])):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("`prompt` must be token ids (list[int] or list[list[int]]) or text.", param="prompt")
        add_special_tokens = body.get("add_special_tokens", True)
        prompts = []
        for i, item in enumerate(prompt):
            if isinstance(item, str):
                item = self.tokenizer(item, add_special_tokens=add_special_tokens)["input_ids"]
            elif not isinstance(item, list):
                raise RequestError(f"`prompt[{i}]` must be a list of token ids or a string.", param="prompt")
            prompts.append(self.check_ids(item, f"prompt[{i}]" if len(prompt) > 1 else "prompt"))
        return prompts

    def _position_logprobs(self, rows: torch.Tensor, targets: list[int], k: int) -> list[dict[int, dict]]:
        """Per row: the target token first (its rank counts the tokens at least as likely), then the top-k."""
        k = rows.shape[-1] if k == -1 else min(k, rows.shape[-1])
        target = torch.tensor(targets, device=rows.device)[:, None]
        target_logprobs = rows.gather(-1, target)
        ranks = (rows >= target_logprobs).sum(-1).tolist()
        top_logprobs, top_ids = rows.topk(k, dim=-1)
        out = []
        rows_data = zip(targets, target_logprobs[:, 0].tolist(), ranks, top_ids.tolist(), top_logprobs.tolist())
        for token, logprob, rank, ids, values in rows_data:
            entries = [(token, logprob, rank)] + [(i, v, r) for r, (i, v) in enumerate(zip(ids, values), start=1)]
            out.append(
                {
                    i: {"logprob": max(v, MIN_LOGPROB), "rank": r, "decoded_token": self.decode(i)}
                    for i, v, r in entries
                }
            )
        return out

    @torch.inference_mode()
    def _complete(self, ids: list[int], body: dict, sampling: dict) -> tuple[dict, int]:
        temperature, max_tokens = sampling["temperature"], sampling["max_tokens"]
        prompt_k, logprobs_k = sampling["prompt_logprobs"], sampling["logprobs"]
        input_ids = torch.tensor([ids], device=self.device)
        keep = 0 if prompt_k is not None else 1  # 0: logits at every position
        out = self.model(input_ids=input_ids, use_cache=max_tokens > 1, logits_to_keep=keep)
        logprobs = torch.log_softmax(out.logits[0].float() / temperature, dim=-1)
        prompt_logprobs = None if prompt_k is None else [None]
        if prompt_k is not None and len(ids) > 1:
            prompt_logprobs += self._position_logprobs(logprobs[:-1], ids[1:], prompt_k)
        seed = body["seed"] if _is_int(body.get("seed")) else secrets.randbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        step, past, generated, steps, finish_reason = logprobs[-1], out.past_key_values, [], [], "length"
        stop_reason = None
        for _ in range(max_tokens):
            token = int(torch.multinomial(step.exp(), 1, generator=generator))
            generated.append(token)
            if logprobs_k is not None:
                steps.append(self._position_logprobs(step[None], [token], logprobs_k)[0])
            if token in sampling["stop_ids"]:
                finish_reason = "stop"
                primary = token == self.tokenizer.eos_token_id and not body.get("ignore_eos")
                stop_reason = None if primary else token
                break
            if len(generated) == max_tokens:
                break
            out = self.model(input_ids=input_ids.new_tensor([[token]]), past_key_values=past, use_cache=True)
            step, past = torch.log_softmax(out.logits[0, -1].float() / temperature, dim=-1), out.past_key_values
        return_ids = bool(body.get("return_token_ids"))
        choice = {
            "index": 0,
            "text": self.tokenizer.decode(
                generated[: len(generated) - (finish_reason == "stop")], skip_special_tokens=True
            ),
            "logprobs": None if logprobs_k is None else self._completion_logprobs(generated, steps, logprobs_k, body),
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
            "token_ids": generated if return_ids else None,
            "prompt_logprobs": prompt_logprobs,
            "prompt_token_ids": ids if return_ids else None,
            "routed_experts": None,
        }
        return choice, len(generated)

    def _completion_logprobs(self, tokens: list[int], steps: list[dict], k: int, body: dict) -> dict[str, Any]:
        """vLLM's `_create_completion_logprobs`: per token its logprob and the first k+1 entries of its dict."""
        as_ids = bool(body.get("return_tokens_as_token_ids"))

        def name(token_id: int) -> str:
            return f"token_id:{token_id}" if as_ids else self.decode(token_id)

        text_offset, offset = [], 0
        for token in tokens:
            text_offset.append(offset)
            offset += len(name(token))
        return {
            "text_offset": text_offset,
            "token_logprobs": [step[token]["logprob"] for token, step in zip(tokens, steps)],
            "tokens": [name(token) for token in tokens],
            "top_logprobs": [
                {name(token_id): entry["logprob"] for token_id, entry in list(step.items())[: k + 1]} for step in steps
            ],
        }

    def completion(self, body: dict) -> dict[str, Any]:
        self.check_model(body)
        for name, neutral in _NEUTRAL.items():
            if name in body and body[name] not in neutral:
                raise RequestError(f"`{name}`={body[name]!r} is not supported by this server.", param=name)
        temperature = body.get("temperature")
        temperature = 1.0 if temperature is None else temperature
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise RequestError(f"`temperature` must be a number > 0, got {temperature!r}.", param="temperature")
        max_tokens = _int_field(body, "max_tokens", 16, 1)
        sampling = {"temperature": float(temperature), "max_tokens": max_tokens}
        sampling |= {name: _int_field(body, name, None, 0, True) for name in ("prompt_logprobs", "logprobs")}
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(map(_is_int, stop_ids)):
            raise RequestError("`stop_token_ids` must be a list of integer token ids.", param="stop_token_ids")
        sampling["stop_ids"] = set(stop_ids) | (set() if body.get("ignore_eos") else self.eos_ids)
        prompts = self._prompts(body)
        if (longest := max(map(len, prompts))) + max_tokens > self.max_model_len:
            message = f"This model's maximum context length is {self.max_model_len} tokens, but {longest} prompt"
            raise RequestError(f"{message} tokens + max_tokens={max_tokens} were requested.", param="prompt")
        choices, completion_tokens = [], 0
        with self.lock:
            for index, ids in enumerate(prompts):
                choice, generated = self._complete(ids, body, sampling)
                choices.append(choice | {"index": index})
                completion_tokens += generated
        prompt_tokens = sum(map(len, prompts))
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens}
        usage |= {"completion_tokens": completion_tokens, "prompt_tokens_details": None}
        usage |= {"completion_tokens_details": None}
        response = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        response |= {"model": self.served_model_name, "choices": choices, "service_tier": None}
        response |= {"system_fingerprint": None, "usage": usage, "kv_transfer_params": None}
        return response | {"ec_transfer_params": None, "metrics": None}

    def tokenize(self, body: dict) -> dict[str, Any]:
        """`TokenizeCompletionRequest` (`prompt`) or `TokenizeChatRequest` (`messages`, through the chat template)."""
        self.check_model(body)
        if isinstance(body.get("messages"), list):
            text = self.tokenizer.apply_chat_template(
                body["messages"],
                tokenize=False,
                add_generation_prompt=body.get("add_generation_prompt", True),
                continue_final_message=body.get("continue_final_message", False),
                **(body.get("chat_template_kwargs") or {}),
            )
            add_special_tokens = body.get("add_special_tokens", False)
        elif isinstance(body.get("prompt"), str):
            text, add_special_tokens = body["prompt"], body.get("add_special_tokens", True)
        else:
            raise RequestError("`prompt` (a string) or `messages` (a list) is required.", param="prompt")
        with self.lock:
            tokens = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        token_strs = self.tokenizer.convert_ids_to_tokens(tokens) if body.get("return_token_strs") else None
        return {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens, "token_strs": token_strs}

    def detokenize(self, body: dict) -> dict[str, Any]:
        self.check_model(body)
        tokens = body.get("tokens")
        if tokens != []:
            tokens = self.check_ids(tokens if isinstance(tokens, list) else [], "tokens")
        with self.lock:
            return {"prompt": self.tokenizer.decode(tokens)}
