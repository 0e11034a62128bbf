"""The TRL/transformers contract of trl-opd: every internal it relies on, pinned by one small test each.

Run `pytest tests/test_trl_contract.py` after changing the `trl` (or `transformers`) pin: it pins every
TRL/transformers internal trl-opd relies on. That is the hooks `OPDTrainer` overrides (their signatures and how TRL
calls them), the methods and attributes it calls, reads or mutates, and the kernels and helpers it imports. A failure
names the internal that moved and where trl-opd uses it (the `USED_IN` dict below: edit it when trl-opd's code moves).
Everything runs on the toy tokenizer and tiny random Qwen2 models of `trl_opd.toy`, on CPU, in seconds.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import make_config, make_dataset
from transformers import GenerationConfig, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from trl import DistillationConfig, DistillationTrainer
from trl.trainer.utils import RepeatSampler

from trl_opd import hidden_states
from trl_opd.toy import build_model

# Where trl-opd relies on each internal: the one place to edit when trl-opd's own code moves.
USED_IN = {
    # Hooks trl-opd overrides (TRL calls them; their signatures and results must stay as pinned).
    "DistillationTrainer._generate_and_score_completions": (
        "trl_opd/trainer.py (OPDTrainer._generate_and_score_completions: calls super(), reads and extends its output)"
    ),
    "DistillationTrainer._prepare_inputs": (
        "trl_opd/trainer.py (OPDTrainer._generate_and_score_completions adds `loss_mask`/`gold_*`/`teacher_index` "
        "entries that TRL's `_prepare_inputs` must shuffle and split along with the batch)"
    ),
    "DistillationTrainer._generate_single_turn": (
        "trl_opd/trainer.py (OPDTrainer._generate_single_turn) and trl_opd/prefixes.py (PrefixWriter.write: dataset "
        "and teacher prefixes)"
    ),
    "DistillationTrainer._compute_loss": "trl_opd/trainer.py (OPDTrainer._compute_loss)",
    "DistillationTrainer.compute_loss": (
        "trl_opd/trainer.py (OPDTrainer.compute_loss wraps it; OPDTrainer._compute_loss returns what it consumes and "
        "OPDTrainer._generate_and_score_completions sets the `num_items_in_batch` it divides by)"
    ),
    "DistillationTrainer._get_train_sampler": (
        "trl_opd/trainer.py (OPDTrainer._get_train_sampler) and trl_opd/train_sampler.py "
        "(EpochSeededRepeatSampler.like)"
    ),
    "DistillationTrainer.log": "trl_opd/trainer.py (OPDTrainer.log) and trl_opd/telemetry.py (MetricBuffer.flush)",
    "transformers.Trainer._load_callback_state": "trl_opd/trainer.py (OPDTrainer._load_callback_state)",
    "transformers.TrainerState.stateful_callbacks": (
        "trl_opd/trainer.py (OPDTrainer._load_callback_state) and trl_opd/callbacks/base.py (OPDCallback.state)"
    ),
    "transformers.Trainer -> sampler.set_epoch": "trl_opd/train_sampler.py (EpochSeededRepeatSampler.set_epoch)",
    # Internals trl-opd calls, reads or mutates.
    "DistillationTrainer._get_last_hidden_state": (
        "trl_opd/hidden_states.py (HiddenStates, and MULTIMODAL_KEYS derived from its signature)"
    ),
    "DistillationTrainer._forward_redirection": "trl_opd/hidden_states.py (HiddenStates.frozen)",
    "DistillationTrainer._metrics": (
        "trl_opd/trainer.py (OPDTrainer.compute_loss, _all_ranks_finite, _generate_and_score_completions)"
    ),
    "DistillationTrainer._step": "trl_opd/trainer.py (OPDTrainer._compute_loss, _all_ranks_finite)",
    "DistillationTrainer.__init__ attributes": (
        "trl_opd/prefixes.py (PrefixWriter, dataset_completions), trl_opd/trainer.py (OPDTrainer.__init__, "
        "_loss_masked_token_ids), trl_opd/reference.py (InitialStudent)"
    ),
    "DistillationTrainer._generate_single_turn attribute reads": (
        "trl_opd/prefixes.py (PrefixWriter._teacher_generates swaps these attributes to generate with the teacher; "
        "PrefixWriter.sync_generation_knobs updates them)"
    ),
    "VLLMGeneration": (
        "trl_opd/prefixes.py (PrefixWriter.sync_generation_knobs sets `vllm_generation.temperature` and "
        "`vllm_generation.max_completion_length`)"
    ),
    "trl.trainer.utils.pad": "trl_opd/prefixes.py (padded_completions)",
    "trl.trainer.utils.maybe_gather_lm_head_ctx": (
        "trl_opd/heads.py (OutputHead.logits/logits_at), trl_opd/chunked.py (token_log_probs, "
        "divergence_from_hidden), "
        "trl_opd/objective.py (Objective.evaluate), trl_opd/nonfinite.py (skipped_loss)"
    ),
    "trl.trainer.utils.RepeatSampler": "trl_opd/train_sampler.py (EpochSeededRepeatSampler)",
    "trl.models.prepare_deepspeed": (
        "trl_opd/reference.py (InitialStudent), trl_opd/teacher_loading.py (load_local_teacher)"
    ),
    "DistillationTrainer.__init__ teacher loading": (
        "trl_opd/teacher_loading.py (load_local_teacher loads and prepares each local teacher of a dict as TRL does "
        "its single one, with trl.trainer.utils.create_model_from_path)"
    ),
    "trl.kernels.chunked_divergence.ChunkedDivergenceFunction": "trl_opd/chunked.py (full_divergence)",
    "trl.kernels.chunked_logprob.ChunkedLogProbFunction": "trl_opd/chunked.py (token_log_probs)",
    "trl.trainer.distillation_trainer._chunked_divergence_loss": "benchmarks/bench_loss.py (the `trl_full` path)",
    "DistillationConfig.beta": "trl_opd/config.py (DEFAULT_BETA, the `beta` check of OPDConfig)",
}

# The multimodal keyword arguments of `_get_last_hidden_state`, which TRL's `_compute_loss` forwards from the batch.
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
OUTPUT_KEYS = {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "num_items_in_batch"}
PER_DEVICE_BATCH, ACCUMULATION, MAX_COMPLETION = 2, 2, 6


def broke(internal: str, change: str) -> str:
    """The failure message: which internal changed, how, and where trl-opd must be updated."""
    owner = "transformers" if internal.startswith("transformers.") else "TRL"
    return f"{owner} changed `{internal}`: {change}. trl-opd relies on it in {USED_IN[internal]}; update it there."


def parameters(function) -> list[str]:
    """Parameter names in order (through decorators that use `functools.wraps`)."""
    return list(inspect.signature(function).parameters)


def self_attributes(function, context: type[ast.expr_context]) -> set[str]:
    """The `self.<name>` attributes that `function`'s source loads (`ast.Load`) or assigns (`ast.Store`)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and isinstance(node.ctx, context)
    }


def make_args(output_dir, **overrides) -> DistillationConfig:
    settings = dict(
        max_steps=1,
        per_device_train_batch_size=PER_DEVICE_BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_completion_length=MAX_COMPLETION,
    )
    return make_config(output_dir, DistillationConfig, **{**settings, **overrides})


def make_models(tokenizer):
    student = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    teacher = build_model(tokenizer, hidden_size=24, num_layers=1, num_heads=2, seed=1)
    return student, teacher


@pytest.fixture(scope="module")
def trainer(tokenizer, tmp_path_factory):
    """A plain `DistillationTrainer` (generation batch of 4 rows = 2 per device × 2 accumulation steps)."""
    student, teacher = make_models(tokenizer)
    trainer = DistillationTrainer(
        student,
        teacher,
        make_args(tmp_path_factory.mktemp("contract")),
        make_dataset(8),
        processing_class=tokenizer,
    )
    trainer.model.train()
    return trainer


@pytest.fixture
def rows():
    """A generation batch: four conversational prompts (with a `completion` column, as dataset prefixes need)."""
    dataset = make_dataset(PER_DEVICE_BATCH * ACCUMULATION)
    return [dataset[i] for i in range(len(dataset))]


def prompt_token_ids(tokenizer, rows) -> list[list[int]]:
    return [
        list(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"])
        for row in rows
    ]


def token_lists(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


# ---------------------------------------------------------------------------------------------- overridden hooks


def test_generate_and_score_completions_signature():
    internal = "DistillationTrainer._generate_and_score_completions"
    found = parameters(DistillationTrainer._generate_and_score_completions)
    assert found == ["self", "inputs"], broke(
        internal, f"its signature is now {found}; trl-opd overrides it as (self, inputs) and calls super() with inputs"
    )


def test_generate_and_score_completions_output(trainer, tokenizer, rows):
    internal = "DistillationTrainer._generate_and_score_completions"
    output = trainer._generate_and_score_completions(rows)
    missing = OUTPUT_KEYS - output.keys()
    assert not missing, broke(internal, f"its output dict no longer has {sorted(missing)}; trl-opd reads them")
    for ids_key, mask_key in (("prompt_ids", "prompt_mask"), ("completion_ids", "completion_mask")):
        ids, mask = output[ids_key], output[mask_key]
        assert ids.ndim == 2 and ids.shape[0] == len(rows) and mask.shape == ids.shape, broke(
            internal, f"`{ids_key}`/`{mask_key}` are no longer (batch, length) tensors of one shape"
        )
    assert bool((output["prompt_mask"][:, -1] == 1).all()), broke(
        internal, "`prompt_ids` are no longer left-padded; trl-opd concatenates prompt and completion ids"
    )
    assert bool((output["completion_mask"].diff(dim=1) <= 0).all()), broke(
        internal, "`completion_ids` are no longer right-padded; trl-opd concatenates prompt and completion ids"
    )
    assert token_lists(output["prompt_ids"], output["prompt_mask"]) == prompt_token_ids(tokenizer, rows), broke(
        internal,
        "output row i is no longer the chat-templated prompt of input row i; trl-opd pairs output rows with `inputs` "
        "(gold completions, dataset prefixes)",
    )
    count = output["num_items_in_batch"]
    assert isinstance(count, torch.Tensor) and count.ndim == 0, broke(
        internal, "`num_items_in_batch` is no longer a 0-dim tensor (trl-opd replaces it with one of the same kind)"
    )
    assert int(count) == int(output["completion_mask"].sum()), broke(
        internal, "`num_items_in_batch` no longer counts the completion tokens of the batch"
    )


def test_generate_and_score_completions_tool_mask(trainer, rows, monkeypatch):
    """With tools, `_generate` returns a per-token tool mask (0 on tool-output tokens): it must become `tool_mask`."""
    internal = "DistillationTrainer._generate_and_score_completions"
    generate = trainer._generate

    def generate_with_tool_mask(prompts):
        prompt_ids, completion_ids, _, images, tool_images = generate(prompts)
        return prompt_ids, completion_ids, [[0] + [1] * (len(c) - 1) for c in completion_ids], images, tool_images

    monkeypatch.setattr(trainer, "_generate", generate_with_tool_mask)
    try:
        output = trainer._generate_and_score_completions(rows)
    except Exception as error:  # any failure means the injection path moved
        pytest.fail(broke(internal, f"injecting a tool mask as `_generate`'s 3rd output failed ({error!r})"))
    assert "tool_mask" in output, broke(internal, "a tool mask no longer reaches the output as `tool_mask`")
    tool_mask, completion_mask = output["tool_mask"], output["completion_mask"]
    assert tool_mask.shape == completion_mask.shape and bool((tool_mask[:, 0] == 0).all()), broke(
        internal, "`tool_mask` is no longer a (batch, completion length) tensor with 0 on tool tokens"
    )
    assert int(output["num_items_in_batch"]) == int((completion_mask * tool_mask).sum()), broke(
        internal, "`num_items_in_batch` no longer counts completion_mask * tool_mask (trl-opd's loss mask too)"
    )


def test_prepare_inputs_splits_added_entries(trainer, rows, monkeypatch):
    """TRL's `_prepare_inputs` calls `_generate_and_score_completions` once per accumulation window, then shuffles
    and splits every (batch, ...) tensor of its output together and passes 0-dim tensors through."""
    internal = "DistillationTrainer._prepare_inputs"
    generate_and_score = trainer._generate_and_score_completions
    calls, generated_completions = [], []

    def with_added_entries(inputs):
        calls.append(len(inputs))
        output = generate_and_score(inputs)
        generated_completions.append(output["completion_ids"].clone())
        output["contract_mask"] = output["completion_ids"].clone()
        output["contract_count"] = torch.tensor(7)
        output["contract_rows"] = torch.arange(len(inputs))
        return output

    monkeypatch.setattr(trainer, "_generate_and_score_completions", with_added_entries)
    monkeypatch.setattr(trainer, "_step", 0)
    monkeypatch.setattr(trainer, "_buffered_inputs", None)
    micro_batch = trainer._prepare_inputs(rows)
    assert calls == [len(rows)], broke(
        internal, "it no longer calls `_generate_and_score_completions` with the whole generation batch"
    )
    assert micro_batch["completion_ids"].shape[0] == PER_DEVICE_BATCH, broke(
        internal, "it no longer splits the generation batch into per-device micro-batches"
    )
    assert torch.equal(micro_batch.get("contract_mask"), micro_batch["completion_ids"]), broke(
        internal, "an added (batch, length) entry is no longer shuffled and split with `completion_ids`"
    )
    first_row = micro_batch["contract_rows"][0]  # which generation-batch row landed first in this micro-batch
    assert micro_batch["contract_rows"].shape == (PER_DEVICE_BATCH,), broke(
        internal, "an added (batch,) entry is no longer split with the batch"
    )
    assert torch.equal(micro_batch["completion_ids"][0], generated_completions[0][first_row]), broke(
        internal, "an added (batch,) entry is no longer shuffled together with `completion_ids`"
    )
    assert int(micro_batch.get("contract_count")) == 7, broke(
        internal, "an added 0-dim tensor (like `num_items_in_batch`) is no longer passed through unchanged"
    )


def test_generate_single_turn_signature():
    internal = "DistillationTrainer._generate_single_turn"
    signature = inspect.signature(DistillationTrainer._generate_single_turn)
    found = list(signature.parameters)
    expected = ["self", "prompt_ids", "images", "multimodal_fields", "has_tool_images"]
    assert found == expected, broke(internal, f"its signature is now {found}; trl-opd overrides it as {expected}")
    assert signature.parameters["has_tool_images"].default is False, broke(
        internal, "`has_tool_images` no longer defaults to False"
    )


def test_generate_single_turn_returns_token_lists(trainer, tokenizer, rows):
    internal = "DistillationTrainer._generate_single_turn"
    completions = trainer._generate_single_turn(prompt_token_ids(tokenizer, rows), None, {})
    assert isinstance(completions, list) and len(completions) == len(rows), broke(
        internal, "it no longer returns one completion per prompt as a list"
    )
    for completion in completions:
        assert isinstance(completion, list) and all(isinstance(i, int) for i in completion), broke(
            internal, "a completion is no longer a list of token ids (trl-opd's dataset prefixes return that)"
        )
        assert len(completion) <= MAX_COMPLETION, broke(internal, "completions exceed `max_completion_length`")
        assert not set(completion[:-1]) & set(trainer.eos_token_ids), broke(
            internal, "completions are no longer cut after their first EOS (trl-opd's dataset prefixes mimic that)"
        )


def test_generate_calls_generate_single_turn(trainer, tokenizer, rows, monkeypatch):
    internal = "DistillationTrainer._generate_single_turn"
    digits = tokenizer.convert_tokens_to_ids(list("1234"))
    fixed = [digits[: i + 1] for i in range(len(rows))]
    calls = []

    def single_turn(prompt_ids, images, multimodal_fields, has_tool_images=False):
        calls.append((prompt_ids, images, multimodal_fields))
        return copy.deepcopy(fixed)

    monkeypatch.setattr(trainer, "_generate_single_turn", single_turn)
    output = trainer._generate_and_score_completions(rows)
    assert len(calls) == 1, broke(
        internal, f"`_generate` called it {len(calls)} times per batch; overriding it must change the completions"
    )
    prompt_ids, images, multimodal_fields = calls[0]
    assert [list(ids) for ids in prompt_ids] == prompt_token_ids(tokenizer, rows), broke(
        internal, "`prompt_ids` are no longer the tokenised prompts of the batch, one per input row and in order"
    )
    assert images is None and multimodal_fields == {}, broke(
        internal, "text-only batches no longer pass images=None and empty multimodal_fields"
    )
    assert token_lists(output["completion_ids"], output["completion_mask"]) == fixed, broke(
        internal, "the completions it returns are no longer the batch's `completion_ids`"
    )


def test_compute_loss_signatures():
    found = parameters(DistillationTrainer._compute_loss)
    expected = ["self", "unwrapped_student", "inputs", "num_items_in_batch"]
    assert found == expected, broke(
        "DistillationTrainer._compute_loss", f"its signature is now {found}; trl-opd overrides it as {expected}"
    )
    found = parameters(DistillationTrainer.compute_loss)
    expected = ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]
    assert found == expected, broke(
        "DistillationTrainer.compute_loss", f"its signature is now {found}; trl-opd overrides it as {expected}"
    )


def test_compute_loss_returns_loss_entropy_count(trainer, rows):
    internal = "DistillationTrainer._compute_loss"
    inputs = trainer._generate_and_score_completions(rows)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    result = trainer._compute_loss(unwrapped, inputs, None)
    assert isinstance(result, tuple) and len(result) == 3, broke(
        internal, "it no longer returns (loss, entropy_sum, num_valid_tokens)"
    )
    loss, entropy_sum, count = result
    assert loss.ndim == 0 and loss.requires_grad and entropy_sum.ndim == 0, broke(
        internal, "it no longer returns a scalar loss with gradient and a scalar entropy sum"
    )
    assert int(count) == int(inputs["completion_mask"].sum()), broke(
        internal, "its 3rd output is no longer the number of loss tokens"
    )


def test_compute_loss_calls_compute_loss_through_forward_redirection(trainer, rows, monkeypatch):
    internal = "DistillationTrainer.compute_loss"
    inputs = trainer._generate_and_score_completions(rows)
    inputs["num_items_in_batch"] = torch.tensor(5.0)  # trl-opd recounts it over its own loss mask
    received, redirected = [], []

    def fake_compute_loss(unwrapped_student, batch, num_items_in_batch):
        received.append((unwrapped_student, batch, num_items_in_batch))
        return torch.tensor(0.5, requires_grad=True) * 1.0, torch.tensor(6.0), torch.tensor(3)

    redirect = trainer._forward_redirection

    def recording_redirect(wrapper, original, method, *args, **kwargs):
        redirected.append(method)
        return redirect(wrapper, original, method, *args, **kwargs)

    monkeypatch.setattr(trainer, "_compute_loss", fake_compute_loss)
    monkeypatch.setattr(trainer, "_forward_redirection", recording_redirect)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    assert redirected == [fake_compute_loss], broke(
        internal, "it no longer runs `self._compute_loss` (once) through `self._forward_redirection`"
    )
    unwrapped, batch, num_items = received[0]
    assert unwrapped is trainer.accelerator.unwrap_model(trainer.model) and batch is inputs, broke(
        internal, "`_compute_loss` no longer receives (unwrapped student, inputs, num_items_in_batch)"
    )
    assert float(num_items) == 5.0 / trainer.accelerator.num_processes, broke(
        internal, "in training it no longer divides by the batch's `num_items_in_batch` (over the process count)"
    )
    assert float(loss.detach()) == 0.5, broke(
        internal, "it no longer returns `_compute_loss`'s first output as the loss"
    )
    assert trainer._metrics["train"].get("entropy") == [2.0], broke(
        internal, "it no longer logs `entropy` as `_compute_loss`'s entropy_sum / num_valid_tokens"
    )
    trainer._metrics["train"].clear()


def test_get_train_sampler(trainer):
    internal = "DistillationTrainer._get_train_sampler"
    signature = inspect.signature(DistillationTrainer._get_train_sampler)
    assert list(signature.parameters) == ["self", "dataset"] and signature.parameters["dataset"].default is None, (
        broke(internal, f"its signature is now {list(signature.parameters)}; trl-opd overrides it as (self, dataset)")
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, RepeatSampler), broke(internal, "it no longer returns a `RepeatSampler`")
    expected = {
        "data_source": trainer.train_dataset,
        "mini_repeat_count": 1,
        "batch_size": PER_DEVICE_BATCH * ACCUMULATION * trainer.accelerator.num_processes,
        "repeat_count": ACCUMULATION,
        "shuffle": True,
        "seed": trainer.args.seed,
    }
    for name, value in expected.items():
        assert getattr(sampler, name, "missing") is value or getattr(sampler, name, "missing") == value, broke(
            internal, f"the sampler's `{name}` is now {getattr(sampler, name, 'missing')!r}, not {value!r}"
        )
    assert isinstance(getattr(sampler, "generator", None), torch.Generator), broke(
        internal, "the shuffling sampler no longer has a `generator` (trl-opd's set_epoch reseeds it)"
    )
    other = make_dataset(4)
    assert trainer._get_train_sampler(other).data_source is other, broke(
        internal, "it no longer samples the `dataset` it is given"
    )


def test_log_signature():
    found = parameters(DistillationTrainer.log)
    assert found == ["self", "logs", "start_time"], broke(
        "DistillationTrainer.log", f"its signature is now {found}; trl-opd overrides it as (self, logs, start_time)"
    )


def test_load_callback_state_signature_and_fields():
    internal = "transformers.Trainer._load_callback_state"
    found = parameters(Trainer._load_callback_state)
    assert found == ["self"], broke(internal, f"its signature is now {found}; trl-opd overrides it as (self)")
    assert "restore_callback_states_from_checkpoint" in TrainingArguments.__dataclass_fields__, broke(
        internal, "`TrainingArguments.restore_callback_states_from_checkpoint` is gone (trl-opd's override reads it)"
    )


class StepCounter(TrainerCallback, ExportableState):
    """A stateful callback: `count` grows by `increment` every optimizer step."""

    def __init__(self, increment: int = 1) -> None:
        self.increment, self.count = increment, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += self.increment

    def state(self) -> dict:
        return {"args": {"increment": self.increment}, "attributes": {"count": self.count}}


def test_trainer_state_stateful_callbacks():
    internal = "transformers.TrainerState.stateful_callbacks"
    single = TrainerState(stateful_callbacks=[StepCounter(1), TrainerControl()]).stateful_callbacks
    assert single.get("StepCounter") == StepCounter(1).state(), broke(
        internal, "one instance of a class no longer maps its class name to its `state()`"
    )
    double = TrainerState(stateful_callbacks=[StepCounter(1), StepCounter(10)]).stateful_callbacks
    assert double.get("StepCounter") == [StepCounter(1).state(), StepCounter(10).state()], broke(
        internal, "several instances of a class no longer map its class name to the list of their states, in order"
    )


class SetEpochRecorder(RepeatSampler):
    calls: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        SetEpochRecorder.calls.append(epoch)


class RecordingTrainer(DistillationTrainer):
    """Records `_load_callback_state` calls and the sampler's `set_epoch` calls."""

    loaded_states: list[dict] = []

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        names = ("data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed")
        return SetEpochRecorder(**{name: getattr(sampler, name) for name in names})

    def _load_callback_state(self) -> None:
        RecordingTrainer.loaded_states.append(copy.deepcopy(self.state.stateful_callbacks))
        super()._load_callback_state()


@pytest.fixture(scope="module")
def resumed_run(tokenizer, tmp_path_factory):
    """Train one step (saving checkpoint-1) with two `StepCounter`s, then resume from it for a second step."""
    output_dir = tmp_path_factory.mktemp("resume")
    SetEpochRecorder.calls.clear()
    RecordingTrainer.loaded_states.clear()
    runs = {}
    for max_steps, resume in ((1, None), (2, str(output_dir / "checkpoint-1"))):
        args = make_args(
            output_dir,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=1,
            restore_callback_states_from_checkpoint=True,
        )
        trainer = RecordingTrainer(
            *make_models(tokenizer),
            args,
            make_dataset(8),
            processing_class=tokenizer,
            callbacks=[StepCounter(1), StepCounter(10)],
        )
        set_epoch_calls = len(SetEpochRecorder.calls)
        trainer.train(resume_from_checkpoint=resume)
        runs[max_steps] = (trainer, SetEpochRecorder.calls[set_epoch_calls:], list(RecordingTrainer.loaded_states))
    return output_dir, runs


def test_load_callback_state_called_on_resume(resumed_run):
    internal = "transformers.Trainer._load_callback_state"
    _, runs = resumed_run
    loaded = runs[2][2]
    assert len(loaded) == 1, broke(internal, f"resuming called it {len(loaded)} times instead of once")
    assert "StepCounter" in loaded[0], broke(
        internal, "`state.stateful_callbacks` no longer holds the checkpoint's states when it is called"
    )


def test_saved_stateful_callbacks_append_latest_states(resumed_run):
    """`OPDTrainer._load_callback_state` takes the last `len(instances)` saved states of a class as the latest."""
    internal = "transformers.TrainerState.stateful_callbacks"
    output_dir, _ = resumed_run
    state = json.loads(Path(output_dir, "checkpoint-1", "trainer_state.json").read_text())
    saved = state.get("stateful_callbacks", {}).get("StepCounter")
    assert isinstance(saved, list) and len(saved) >= 2, broke(
        internal, f"two instances of a class no longer save a list of states (got {saved!r})"
    )
    counts = [entry.get("attributes", {}).get("count") for entry in saved[-2:]]
    assert counts == [1, 10], broke(
        internal, f"the last two saved states are no longer the instances' states at the save, in order: {counts}"
    )


def test_trainer_calls_sampler_set_epoch(resumed_run):
    _, runs = resumed_run
    assert runs[1][1][:1] == [0], broke(
        "transformers.Trainer -> sampler.set_epoch",
        f"training no longer calls the train sampler's `set_epoch(epoch)` at each epoch start (calls: {runs[1][1]})",
    )


# ---------------------------------------------------------------------------------- called, read and mutated


def test_get_last_hidden_state_signature_and_multimodal_keys():
    internal = "DistillationTrainer._get_last_hidden_state"
    signature = inspect.signature(DistillationTrainer._get_last_hidden_state)
    names = list(signature.parameters)
    positional = ["self", "unwrapped_model", "input_ids", "attention_mask", "logits_to_keep"]
    assert names[:5] == positional, broke(
        internal,
        f"its signature is now {names}; trl-opd passes (unwrapped_model, input_ids, attention_mask, logits_to_keep, "
        "**multimodal)",
    )
    # trl-opd derives its multimodal keys as the parameters after `logits_to_keep`.
    derived = tuple(names[5:])
    assert hidden_states.MULTIMODAL_KEYS == derived
    assert derived == MULTIMODAL_KEYS, broke(
        internal,
        f"its multimodal keyword parameters are now {derived}, not {MULTIMODAL_KEYS} (the batch keys trl-opd "
        "forwards to it; once TRL's `_compute_loss` forwards the same ones, update MULTIMODAL_KEYS in this test)",
    )
    assert all(signature.parameters[name].default is None for name in derived), broke(
        internal, "its multimodal parameters no longer all default to None (trl-opd passes only those present)"
    )
    tree = ast.parse(textwrap.dedent(inspect.getsource(DistillationTrainer._compute_loss)))
    forwarded = [
        tuple(element.value for element in node.value.elts)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(target, ast.Name) and target.id == "multimodal_keys" for target in node.targets)
        and isinstance(node.value, ast.Tuple)
    ]
    assert forwarded, broke(
        internal,
        "TRL's `_compute_loss` no longer lists the batch keys it forwards in a `multimodal_keys` tuple; check by hand "
        "that they are still the parameters after `logits_to_keep`, then update this test",
    )
    assert set(forwarded[0]) == set(derived), broke(
        internal,
        f"TRL's `_compute_loss` forwards {forwarded[0]} but the parameters after `logits_to_keep` are {derived}",
    )


def test_get_last_hidden_state_values(trainer):
    internal = "DistillationTrainer._get_last_hidden_state"
    model = trainer.accelerator.unwrap_model(trainer.model)
    input_ids = torch.randint(5, 60, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        hidden = trainer._get_last_hidden_state(model, input_ids, attention_mask, 3)
        expected = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, -4:-1]
    assert hidden.shape == (2, 3, model.config.hidden_size) and torch.allclose(hidden, expected, atol=1e-6), broke(
        internal,
        "it no longer returns the backbone's last hidden states at the `logits_to_keep` positions that predict the "
        "last `logits_to_keep` tokens, shape (batch, logits_to_keep, hidden)",
    )


def test_forward_redirection_calls_function(trainer):
    internal = "DistillationTrainer._forward_redirection"
    received = []

    def method(*args, **kwargs):
        received.append((args, kwargs))
        return "result"

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    result = trainer._forward_redirection(trainer.model, unwrapped, method, 1, 2, key=3)
    assert received == [((1, 2), {"key": 3})] and result == "result", broke(
        internal, "`_forward_redirection(model, unwrapped, fn, *args, **kwargs)` no longer returns fn(*args, **kwargs)"
    )


def test_metrics_structure_and_log(trainer):
    internal = "DistillationTrainer._metrics"
    metrics = trainer._metrics
    assert set(metrics) == {"train", "eval"} and all(
        isinstance(m, defaultdict) and m.default_factory is list for m in metrics.values()
    ), broke(internal, 'it is no longer {"train": defaultdict(list), "eval": defaultdict(list)}')
    trainer.model.train()
    metrics["train"].clear()
    metrics["train"]["contract/x"] += [1.0, 3.0]
    trainer.log({"loss": 0.5})
    assert trainer.state.log_history[-1].get("contract/x") == 2.0, broke(
        "DistillationTrainer.log", "it no longer logs the mean of each `_metrics['train']` list"
    )
    assert not metrics["train"], broke("DistillationTrainer.log", "it no longer clears `_metrics['train']`")
    trainer.model.eval()
    try:
        metrics["eval"]["contract/y"] += [2.0, 4.0]
        trainer.log({"eval_loss": 1.0})
    finally:
        trainer.model.train()
    assert trainer.state.log_history[-1].get("eval_contract/y") == 3.0, broke(
        "DistillationTrainer.log",
        "in evaluation it no longer logs the `_metrics['eval']` means with an `eval_` prefix",
    )
    assert not metrics["eval"], broke("DistillationTrainer.log", "it no longer clears `_metrics['eval']`")


def test_step_counts_micro_batches(trainer, rows, monkeypatch):
    internal = "DistillationTrainer._step"
    generations = []
    generate_and_score = trainer._generate_and_score_completions

    def counting(inputs):
        generations.append(trainer._step)
        return generate_and_score(inputs)

    monkeypatch.setattr(trainer, "_generate_and_score_completions", counting)
    monkeypatch.setattr(trainer, "_step", 0)
    monkeypatch.setattr(trainer, "_buffered_inputs", None)
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", ACCUMULATION, raising=False)
    for _ in range(ACCUMULATION):
        trainer.training_step(trainer.model, rows, None)
    trainer.model.zero_grad(set_to_none=True)
    assert trainer._step == ACCUMULATION, broke(
        internal, f"`training_step` no longer adds 1 per micro-batch ({ACCUMULATION} calls gave {trainer._step})"
    )
    assert generations == [0], broke(
        internal,
        f"generation no longer happens once per window, at `_step % gradient_accumulation_steps == 0` "
        f"(it happened at _step {generations})",
    )


def test_init_attributes(trainer, tokenizer):
    internal = "DistillationTrainer.__init__ attributes"
    args = trainer.args
    expected_types = {
        "model_wrapped": torch.nn.Module,
        "teacher_model": torch.nn.Module,
        "use_vllm": bool,
        "is_deepspeed_enabled": bool,
        "generation_config": GenerationConfig,
        "generation_kwargs": dict,
        "chat_template_kwargs": dict,
        "eos_token_ids": list,
    }
    for name, kind in expected_types.items():
        assert isinstance(getattr(trainer, name, None), kind), broke(
            internal, f"`self.{name}` is no longer set to a {kind.__name__} in `__init__`"
        )
    assert trainer._tokenizer is tokenizer, broke(internal, "`self._tokenizer` is no longer the processing class")
    assert tokenizer.eos_token_id in trainer.eos_token_ids, broke(
        internal, "`self.eos_token_ids` no longer includes the tokenizer's EOS"
    )
    assert trainer.temperature == args.temperature and trainer.max_completion_length == args.max_completion_length, (
        broke(internal, "`self.temperature`/`self.max_completion_length` no longer copy `args`")
    )
    config, kwargs = trainer.generation_config, trainer.generation_kwargs
    assert config.temperature == args.temperature and config.max_new_tokens == args.max_completion_length, broke(
        internal, "`self.generation_config` no longer carries `temperature` and `max_new_tokens` from `args`"
    )
    assert kwargs.get("temperature") == args.temperature and kwargs.get("max_new_tokens") == MAX_COMPLETION, broke(
        internal, "`self.generation_kwargs` no longer has `temperature` and `max_new_tokens` from `args`"
    )


def test_generate_single_turn_reads_attributes():
    internal = "DistillationTrainer._generate_single_turn attribute reads"
    read = self_attributes(DistillationTrainer._generate_single_turn, ast.Load)
    missing = {"model_wrapped", "use_vllm", "generation_config", "generation_kwargs", "vllm_generation"} - read
    assert not missing, broke(internal, f"it no longer reads `self.{'`, `self.'.join(sorted(missing))}`")


def test_generate_single_turn_generates_with_model_wrapped_and_config(trainer, tokenizer, rows, monkeypatch):
    """What `_teacher_generates` relies on: swapping these attributes makes another model generate, at other settings.

    (`self.generation_kwargs` only matter below transformers 5, where TRL copies them onto the generating model's own
    generation config; the source check above pins that they are still read.)
    """
    internal = "DistillationTrainer._generate_single_turn attribute reads"
    other = trainer.teacher_model
    generate = other.generate
    seen = []

    def recording_generate(*args, **kwargs):
        seen.append(kwargs.get("generation_config"))
        return generate(*args, **kwargs)

    config = copy.deepcopy(trainer.generation_config)
    config.temperature, config.max_new_tokens = 0.37, 2
    monkeypatch.setattr(other, "generate", recording_generate)
    monkeypatch.setattr(trainer, "model_wrapped", other)
    monkeypatch.setattr(trainer, "generation_config", config)
    monkeypatch.setattr(trainer, "generation_kwargs", {**trainer.generation_kwargs, "temperature": 0.37})
    trainer.generation_kwargs["max_new_tokens"] = 2
    completions = trainer._generate_single_turn(prompt_token_ids(tokenizer, rows), None, {})
    assert len(seen) == 1, broke(internal, "the HF path no longer generates with `self.model_wrapped`")
    assert seen[0] is config, broke(
        internal, "`generate` no longer receives `self.generation_config` as its `generation_config`"
    )
    assert all(len(completion) <= 2 for completion in completions), broke(
        internal, "the completions no longer follow `max_new_tokens` of `self.generation_config`"
    )


def test_generate_single_turn_uses_vllm_when_use_vllm(trainer, tokenizer, rows, monkeypatch):
    internal = "DistillationTrainer._generate_single_turn attribute reads"
    digit = tokenizer.convert_tokens_to_ids("7")

    class FakeVLLM:
        def sync_weights(self):
            pass

        def generate(self, prompts, **kwargs):
            return prompts, [[digit]] * len(prompts), None, None

    monkeypatch.setattr(trainer, "use_vllm", True)
    monkeypatch.setattr(trainer, "vllm_generation", FakeVLLM(), raising=False)
    monkeypatch.setattr(trainer, "_last_loaded_step", trainer.state.global_step, raising=False)
    try:
        completions = trainer._generate_single_turn(prompt_token_ids(tokenizer, rows), None, {})
    except Exception as error:  # any failure means the vLLM path moved
        pytest.fail(broke(internal, f"with `use_vllm` the path through `self.vllm_generation` failed ({error!r})"))
    assert completions == [[digit]] * len(rows), broke(
        internal, "with `self.use_vllm` True it no longer generates with `self.vllm_generation`"
    )


def test_vllm_generation_settings_attributes():
    internal = "VLLMGeneration"
    from trl.generation.vllm_generation import VLLMGeneration

    knobs = {"temperature", "max_completion_length"}
    missing = knobs - self_attributes(VLLMGeneration.__init__, ast.Store)
    assert not missing, broke(internal, f"`__init__` no longer sets `self.{'`, `self.'.join(sorted(missing))}`")
    missing = knobs - self_attributes(VLLMGeneration.generate, ast.Load)
    assert not missing, broke(
        internal, f"`generate` no longer reads `self.{'`, `self.'.join(sorted(missing))}` (so setting them is moot)"
    )
    assert "vllm_generation" in self_attributes(DistillationTrainer.__init__, ast.Store), broke(
        internal, "`DistillationTrainer.__init__` no longer stores its `VLLMGeneration` as `self.vllm_generation`"
    )


# ------------------------------------------------------------------------------------------ imported helpers


def test_pad():
    from trl.trainer.utils import pad

    internal = "trl.trainer.utils.pad"
    tensors = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    right = pad(tensors, padding_value=9, padding_side="right")
    left = pad(tensors, padding_value=9, padding_side="left")
    assert right.tolist() == [[1, 2, 3], [4, 9, 9]] and left.tolist() == [[1, 2, 3], [9, 9, 4]], broke(
        internal, "`pad(tensors, padding_value=..., padding_side=...)` no longer pads to one (batch, length) tensor"
    )


def test_maybe_gather_lm_head_ctx():
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    internal = "trl.trainer.utils.maybe_gather_lm_head_ctx"
    kinds = [p.kind for p in inspect.signature(maybe_gather_lm_head_ctx).parameters.values()]
    assert kinds == [inspect.Parameter.VAR_POSITIONAL], broke(
        internal, "it no longer takes the parameters to gather as *params"
    )
    weight = torch.nn.Parameter(torch.ones(3, 2))
    with maybe_gather_lm_head_ctx(weight, None, weight, None):  # a null context without DeepSpeed ZeRO-3
        pass


def test_repeat_sampler():
    internal = "trl.trainer.utils.RepeatSampler"
    found = parameters(RepeatSampler.__init__)
    expected = ["self", "data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"]
    assert found == expected, broke(internal, f"its constructor is now {found}; trl-opd builds it as {expected}")
    sampler = RepeatSampler(list(range(16)), mini_repeat_count=1, batch_size=4, repeat_count=2, shuffle=True, seed=0)
    for name in expected[1:]:
        assert hasattr(sampler, name), broke(internal, f"it no longer keeps `{name}` as an attribute")
    sampler.generator.manual_seed(5)
    first = list(sampler)
    sampler.generator.manual_seed(5)
    assert list(sampler) == first, broke(
        internal, "iteration no longer shuffles with `self.generator` at iteration time (trl-opd reseeds it per epoch)"
    )
    assert first[:8] == [first[0], first[1], first[2], first[3]] * 2, broke(
        internal, "it no longer repeats each batch of `batch_size` indices `repeat_count` times"
    )


def test_prepare_deepspeed():
    from trl.models import prepare_deepspeed

    found = parameters(prepare_deepspeed)
    assert found == ["model", "accelerator"], broke(
        "trl.models.prepare_deepspeed", f"its signature is now {found}; trl-opd calls it as (model, accelerator)"
    )


def test_teacher_loading_matches_load_local_teacher(tokenizer, tmp_path):
    """`load_local_teacher` (each local teacher of a dict) must load and prepare a teacher path as TRL's `__init__`
    does its `teacher_model`: same class, dtype, device, weights and evaluation mode."""
    from trl.trainer.utils import create_model_from_path

    from trl_opd.teacher_loading import load_local_teacher

    internal = "DistillationTrainer.__init__ teacher loading"
    assert parameters(create_model_from_path)[:1] == ["model_id"], broke(
        internal, f"`create_model_from_path` now takes {parameters(create_model_from_path)}"
    )
    student, teacher = make_models(tokenizer)
    teacher.save_pretrained(tmp_path / "teacher")
    args = make_args(tmp_path / "out", teacher_model_init_kwargs={"dtype": "float32"})
    trainer = DistillationTrainer(
        student, str(tmp_path / "teacher"), args, make_dataset(8), processing_class=tokenizer
    )
    ours = load_local_teacher(trainer, str(tmp_path / "teacher"))
    theirs = trainer.teacher_model
    assert type(ours) is type(theirs) and ours.dtype == theirs.dtype and ours.device == theirs.device, broke(
        internal, f"TRL now gives {type(theirs).__name__} {theirs.dtype} on {theirs.device}"
    )
    assert ours.training == theirs.training, broke(internal, "the prepared teacher's train/eval mode changed")
    for (name, mine), (_, trl_parameter) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(mine, trl_parameter), broke(internal, f"the loaded teacher's {name} differs")


def transformed_logits(hidden, weight, bias, logit_scale, softcap, temperature):
    """The reference logit transform: softcap(scale · (W h + b)) / T, in float64."""
    z = (hidden.double() @ weight.double().t() + bias.double()) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def random_heads(seed: int = 0, n: int = 5, vocab: int = 40):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_(True)

    return (tensor(n, 6), tensor(vocab, 6), tensor(vocab)), (tensor(n, 8), tensor(vocab, 8), tensor(vocab))


def test_chunked_divergence_function_signature():
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    found = parameters(ChunkedDivergenceFunction.forward)[1:]  # after ctx
    expected = [
        "student_hidden",
        "student_weight",
        "student_bias",
        "teacher_hidden",
        "teacher_weight",
        "teacher_bias",
        "beta",
        "temperature",
        "student_logit_scale",
        "student_final_logit_softcapping",
        "teacher_logit_scale",
        "teacher_final_logit_softcapping",
    ]
    assert found == expected, broke(
        "trl.kernels.chunked_divergence.ChunkedDivergenceFunction",
        f"`forward`'s parameters are now {found}; trl-opd passes them positionally as {expected}",
    )


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_chunked_divergence_function_values(beta):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    internal = "trl.kernels.chunked_divergence.ChunkedDivergenceFunction"
    (s_hidden, s_weight, s_bias), (t_hidden, t_weight, t_bias) = random_heads()
    temperature, s_scale, s_cap, t_scale, t_cap = 1.5, 0.7, 5.0, 1.3, 8.0
    divergence, entropy = ChunkedDivergenceFunction.apply(
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, beta, temperature, s_scale, s_cap, t_scale, t_cap
    )
    log_q = transformed_logits(s_hidden, s_weight, s_bias, s_scale, s_cap, temperature).log_softmax(-1)
    log_p = transformed_logits(t_hidden, t_weight, t_bias, t_scale, t_cap, temperature).log_softmax(-1).detach()

    def kl(log_a, log_b):
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if beta == 0.0:
        reference = kl(log_p, log_q)  # forward KL(p_T || q)
    elif beta == 1.0:
        reference = kl(log_q, log_p)  # reverse KL(q || p_T)
    else:  # generalized JSD with mixture (1 - beta) q + beta p_T
        log_m = ((1 - beta) * log_q.exp() + beta * log_p.exp()).log()
        reference = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    reference_entropy = -(log_q.exp() * log_q).sum(-1)
    assert torch.allclose(divergence.double(), reference, atol=1e-5), broke(
        internal, f"with beta={beta} it no longer returns the per-position divergence its docstring defines"
    )
    assert torch.allclose(entropy.double(), reference_entropy.detach(), atol=1e-5), broke(
        internal, "its 2nd output is no longer the student's per-position entropy"
    )
    grads = torch.autograd.grad(divergence.sum(), (s_hidden, s_weight, s_bias))
    expected = torch.autograd.grad(reference.sum(), (s_hidden, s_weight, s_bias))
    assert all(torch.allclose(g.double(), e.double(), atol=1e-5) for g, e in zip(grads, expected)), broke(
        internal, "its gradient to the student's hidden states, head weight and bias no longer matches the divergence"
    )


def test_chunked_log_prob_function():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    internal = "trl.kernels.chunked_logprob.ChunkedLogProbFunction"
    found = parameters(ChunkedLogProbFunction.forward)[1:]  # after ctx
    expected = [
        "hidden",
        "weight",
        "bias",
        "targets",
        "temperature",
        "chunk_size",
        "final_logit_softcapping",
        "logit_scale",
        "outputs",
    ]
    assert found == expected, broke(
        internal, f"`forward`'s parameters are now {found}; trl-opd passes them positionally as {expected}"
    )
    (hidden, weight, bias), _ = random_heads(seed=1)
    targets = torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=torch.Generator().manual_seed(2))
    temperature, chunk, softcap, scale = 1.5, 16, 5.0, 0.7
    log_probs, entropy, *rest = ChunkedLogProbFunction.apply(
        hidden, weight, bias, targets, temperature, chunk, softcap, scale, ("entropy",)
    )
    reference = transformed_logits(hidden, weight, bias, scale, softcap, temperature).log_softmax(-1)
    assert torch.allclose(log_probs.double(), reference.gather(-1, targets[:, None])[:, 0], atol=1e-5), broke(
        internal, "its 1st output is no longer log_softmax(softcap(scale · (W h + b)) / T) at the targets"
    )
    assert entropy is not None and torch.allclose(
        entropy.double(), -(reference.exp() * reference).sum(-1).detach(), atol=1e-5
    ), broke(internal, 'with outputs=("entropy",) its 2nd output is no longer the per-position entropy')
    assert all(value is None for value in rest), broke(internal, "outputs that were not asked for are now computed")
    grads = torch.autograd.grad(log_probs.sum(), (hidden, weight, bias))
    expected_grads = torch.autograd.grad(reference.gather(-1, targets[:, None]).sum(), (hidden, weight, bias))
    assert all(torch.allclose(g.double(), e.double(), atol=1e-5) for g, e in zip(grads, expected_grads)), broke(
        internal, "its log-prob gradient to the hidden states, head weight and bias is no longer exact"
    )


def test_chunked_divergence_loss():
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    internal = "trl.trainer.distillation_trainer._chunked_divergence_loss"
    found = parameters(_chunked_divergence_loss)[:6]
    expected = [
        "student_hidden_states",
        "teacher_hidden_states",
        "student_lm_head_weight",
        "teacher_lm_head_weight",
        "completion_mask",
        "beta",
    ]
    assert found == expected, broke(internal, f"its leading parameters are now {found}, not {expected}")
    generator = torch.Generator().manual_seed(3)
    s_hidden, t_hidden = torch.randn(1, 4, 6, generator=generator), torch.randn(1, 4, 6, generator=generator)
    s_weight, t_weight = torch.randn(40, 6, generator=generator), torch.randn(40, 6, generator=generator)
    result = _chunked_divergence_loss(s_hidden, t_hidden, s_weight, t_weight, torch.ones(1, 4), beta=1.0)
    assert isinstance(result, tuple) and len(result) == 3, broke(
        internal, "it no longer returns (loss, entropy_sum, num_valid_tokens)"
    )
    log_q, log_p = (s_hidden[0] @ s_weight.t()).log_softmax(-1), (t_hidden[0] @ t_weight.t()).log_softmax(-1)
    reverse = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    assert torch.allclose(result[0], reverse, atol=1e-5), broke(
        internal, "with beta=1 and no `num_items_in_batch` its loss is no longer the mean reverse KL"
    )


def test_distillation_config_beta_default():
    default = DistillationConfig.__dataclass_fields__["beta"].default
    assert default == 1.0, broke("DistillationConfig.beta", f"its default is now {default}, not 1.0")
