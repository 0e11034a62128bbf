"""`OPDTrainer` end to end on tiny offline models: prefixes, losses, checkpoints and bad input."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import make_config, make_dataset
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from trl_opd import OPDTrainer
from trl_opd.losses import per_token_divergence
from trl_opd.prefixes import draw_prefix_source
from trl_opd.trainer import NonFiniteLossError

PREFIX_SOURCES = ("student", "teacher", "dataset", "mixed")
DIRECTIONS = ("forward", "reverse", "jsd", "mixed")


def build(student, teacher, tokenizer, tmp_path, dataset=None, **overrides):
    if overrides.get("kl_direction") == "jsd":
        overrides.setdefault("beta", 0.5)
    args = make_config(tmp_path, **overrides)
    return OPDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=make_dataset() if dataset is None else dataset,
        processing_class=tokenizer,
    )


def capture_batches(trainer):
    """Record every generation batch the trainer builds (what the loss is computed on)."""
    batches = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        output = original(inputs)
        batches.append({"inputs": inputs, **output})
        return output

    trainer._generate_and_score_completions = spy
    return batches


def constant_teacher(tokenizer, token: str, seed: int = 1) -> Qwen2ForCausalLM:
    """A teacher whose head puts ~all its mass on `token` whatever the context."""
    from trl_opd.toy import build_model

    teacher = build_model(tokenizer, hidden_size=48, num_layers=1, seed=seed)
    head = torch.nn.Linear(48, len(tokenizer), bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.fill_(-20.0)
        head.bias[tokenizer.convert_tokens_to_ids(token)] = 20.0
    teacher.lm_head = head
    return teacher


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("prefix_source,kl_direction", list(itertools.product(PREFIX_SOURCES, DIRECTIONS)))
def test_every_objective_trains_and_writes_a_loadable_checkpoint(
    student, teacher, tokenizer, tmp_path, prefix_source, kl_direction
):
    before = weights(student)
    trainer = build(
        student,
        teacher,
        tokenizer,
        tmp_path,
        prefix_source=prefix_source,
        kl_direction=kl_direction,
        save_strategy="steps",
        save_steps=3,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = weights(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    checkpoint = tmp_path / "checkpoint-3"
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, after[name])
    assert (checkpoint / "trainer_state.json").exists()


def test_teacher_prefixes_are_sampled_by_the_teacher(student, tokenizer, tmp_path):
    teacher = constant_teacher(tokenizer, "7")
    trainer = build(student, teacher, tokenizer, tmp_path, prefix_source="teacher", max_steps=1)
    batches = capture_batches(trainer)
    trainer.train()
    seven = tokenizer.convert_tokens_to_ids("7")
    completion = batches[0]["completion_ids"]
    assert completion.shape[1] == 8 and (completion == seven).all()


def test_student_prefixes_are_sampled_by_the_student(student, tokenizer, tmp_path):
    teacher = constant_teacher(tokenizer, "7")
    trainer = build(student, teacher, tokenizer, tmp_path, prefix_source="student", max_steps=1)
    batches = capture_batches(trainer)
    trainer.train()
    seven = tokenizer.convert_tokens_to_ids("7")
    assert (batches[0]["completion_ids"] != seven).float().mean() > 0.5


def test_teacher_temperature_drives_teacher_sampling(student, tokenizer, tmp_path):
    teacher = constant_teacher(tokenizer, "7")
    trainer = build(
        student, teacher, tokenizer, tmp_path, prefix_source="teacher", max_steps=1, teacher_temperature=1e3
    )
    batches = capture_batches(trainer)
    trainer.train()
    seven = tokenizer.convert_tokens_to_ids("7")
    assert (batches[0]["completion_ids"] != seven).float().mean() > 0.5  # near-uniform at T = 1000


@pytest.mark.parametrize("conversational", [True, False])
def test_dataset_prefixes_are_the_completion_column(student, teacher, tokenizer, tmp_path, conversational):
    dataset = make_dataset(conversational=conversational)
    trainer = build(student, teacher, tokenizer, tmp_path, dataset=dataset, prefix_source="dataset", max_steps=1)
    batches = capture_batches(trainer)
    trainer.train()
    batch = batches[0]
    for row, ids, mask in zip(batch["inputs"], batch["completion_ids"], batch["completion_mask"]):
        text = row["completion"][0]["content"] if conversational else row["completion"]
        assert tokenizer.decode(ids[mask.bool()]) == text + tokenizer.eos_token


def test_mixed_draws_follow_the_seeded_schedule(student, teacher, tokenizer, tmp_path):
    trainer = build(
        student,
        teacher,
        tokenizer,
        tmp_path,
        prefix_source="mixed",
        off_policy_source="dataset",
        student_prefix_fraction=0.5,
        max_steps=8,
        per_device_train_batch_size=2,
    )
    batches = capture_batches(trainer)
    trainer.train()
    expected = [draw_prefix_source("mixed", "dataset", 0.5, 0, step) == "student" for step in range(8)]
    logged = [entry["opd/student_prefix"] == 1.0 for entry in trainer.state.log_history if "loss" in entry]
    assert logged == expected and 0 < sum(expected) < 8
    eos = tokenizer.eos_token_id
    for batch, is_student in zip(batches, expected):
        ends_with_gold = all(
            tokenizer.decode(ids[mask.bool()]) == row["completion"][0]["content"] + tokenizer.decode([eos])
            for row, ids, mask in zip(batch["inputs"], batch["completion_ids"], batch["completion_mask"])
        )
        assert ends_with_gold != is_student


@pytest.mark.parametrize(
    "support,direction",
    [
        ("full", "reverse"),
        ("full", "forward"),
        ("full", "jsd"),
        ("full", "mixed"),
        ("teacher_topk", "reverse"),
        ("student_topk", "mixed"),
        ("union_topk", "forward"),
        ("sampled_token", "reverse"),
    ],
)
def test_student_equal_to_teacher_gives_zero_loss(student, tokenizer, tmp_path, support, direction):
    trainer = build(
        student,
        copy.deepcopy(student),
        tokenizer,
        tmp_path,
        kl_direction=direction,
        loss_support=support,
        loss_top_k=8,
        max_steps=2,
        learning_rate=0.0,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert max(abs(loss) for loss in losses) < 1e-5


@pytest.mark.parametrize(
    "support,direction,extra",
    [
        ("full", "reverse", {}),
        ("full", "mixed", {"forward_kl_weight": 0.3}),
        ("full", "jsd", {"beta": 0.4}),
        ("full", "forward", {"teacher_temperature": 0.7, "temperature": 1.3}),
        ("teacher_topk", "reverse", {"loss_add_tail": True}),
        ("union_topk", "jsd", {"beta": 0.5}),
        ("sampled_token", "reverse", {}),
    ],
)
def test_trainer_loss_equals_the_reference_on_explicit_logits(
    student, teacher, tokenizer, tmp_path, support, direction, extra
):
    trainer = build(
        student,
        teacher,
        tokenizer,
        tmp_path,
        kl_direction=direction,
        loss_support=support,
        loss_top_k=6,
        max_steps=1,
        **extra,
    )
    batches = capture_batches(trainer)
    trainer.train()
    batch = {k: v for k, v in batches[0].items() if k != "inputs"}
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        width = batch["completion_ids"].shape[1]
        student_logits = model(input_ids, attention_mask=attention).logits[:, -width - 1 : -1]
        teacher_logits = teacher(input_ids, attention_mask=attention).logits[:, -width - 1 : -1]
    mask = batch["loss_mask"].bool()
    args = trainer.args
    reference = per_token_divergence(
        student_logits[mask],
        teacher_logits[mask],
        kl_direction=direction,
        loss_support=support,
        loss_top_k=6,
        loss_add_tail=args.loss_add_tail,
        beta=args.beta,
        forward_kl_weight=args.forward_kl_weight,
        temperature=args.temperature,
        teacher_temperature=args.teacher_temperature,
        sampled_token_ids=batch["completion_ids"][mask],
    ).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_special_tokens_are_masked_and_the_answer_eos_only_with_mask_eos(student, teacher, tokenizer, tmp_path):
    dataset = make_dataset(4).map(
        lambda row: {
            "completion": [{"role": "assistant", "content": "<think>1</think>" + row["completion"][0]["content"]}]
        }
    )
    for mask_special, mask_eos in ((True, False), (False, False), (True, True)):
        trainer = build(
            student,
            teacher,
            tokenizer,
            tmp_path,
            dataset=dataset,
            prefix_source="dataset",
            max_steps=1,
            max_completion_length=32,
            mask_special_tokens=mask_special,
            mask_eos=mask_eos,
        )
        batches = capture_batches(trainer)
        trainer.train()
        batch = batches[0]
        ids, loss_mask = batch["completion_ids"], batch["loss_mask"].bool()
        think = torch.isin(ids, torch.tensor(tokenizer.convert_tokens_to_ids(["<think>", "</think>"])))
        eos = ids == tokenizer.eos_token_id
        assert think.sum() == 8 and eos.sum() == 4
        assert (loss_mask[think] == (not mask_special)).all()
        assert (loss_mask[eos] == (not mask_eos)).all()
        assert batch["num_items_in_batch"] == loss_mask.sum()


def test_same_seed_gives_the_same_first_losses(tokenizer, tmp_path):
    from trl_opd.toy import build_model

    runs = []
    for run in range(2):
        trainer = build(
            build_model(tokenizer, hidden_size=32, num_layers=1, seed=0),
            build_model(tokenizer, hidden_size=48, num_layers=2, seed=1),
            tokenizer,
            tmp_path / str(run),
            prefix_source="mixed",
            kl_direction="mixed",
        )
        trainer.train()
        runs.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert runs[0] == runs[1]


def _nan_teacher(teacher):
    with torch.no_grad():
        teacher.model.norm.weight.fill_(float("nan"))
    return teacher


def test_nonfinite_teacher_stops_with_step_and_batch(student, teacher, tokenizer, tmp_path):
    trainer = build(student, _nan_teacher(teacher), tokenizer, tmp_path, max_steps=1)
    with pytest.raises(NonFiniteLossError, match="teacher hidden states at global step 0, micro-batch 0"):
        trainer.train()


def test_nonfinite_teacher_can_be_skipped(student, teacher, tokenizer, tmp_path):
    before = weights(student)
    trainer = build(student, _nan_teacher(teacher), tokenizer, tmp_path, max_steps=2, nonfinite_policy="skip")
    with pytest.warns(UserWarning, match="Skipped"):
        trainer.train()
    after = weights(trainer.model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_vocabulary_mismatch_fails_at_construction(student, tokenizer, tmp_path):
    from trl_opd.toy import build_model

    other = build_model(tokenizer, hidden_size=32, num_layers=1)
    other.resize_token_embeddings(len(tokenizer) + 7)
    with pytest.raises(ValueError, match=f"{len(tokenizer)} entries but the teacher's has {len(tokenizer) + 7}"):
        build(student, other, tokenizer, tmp_path)


def test_tokenizer_beyond_the_vocabulary_fails_at_construction(student, teacher, tokenizer, tmp_path):
    grown = copy.deepcopy(tokenizer)
    grown.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    with pytest.raises(ValueError, match=r"'<tool>': 101.*resize_token_embeddings"):
        OPDTrainer(student, teacher, make_config(tmp_path), make_dataset(), processing_class=grown)


@pytest.mark.parametrize(
    "dataset_edit,overrides,match",
    [
        (lambda d: d.rename_column("prompt", "question"), {}, "no `prompt` column"),
        (lambda d: d.remove_columns("completion"), {"prefix_source": "dataset"}, "no `completion` column"),
        (lambda d: d.remove_columns("completion"), {"prefix_source": "mixed"}, "off_policy_source='teacher'"),
        (lambda d: d, {"loss_support": "teacher_topk", "loss_top_k": 500}, "exceeds the vocabulary size"),
    ],
)
def test_bad_input_fails_fast(student, teacher, tokenizer, tmp_path, dataset_edit, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(student, teacher, tokenizer, tmp_path, dataset=dataset_edit(make_dataset()), **overrides)


def test_args_must_be_an_opd_config(student, teacher, tokenizer, tmp_path):
    from trl import DistillationConfig

    with pytest.raises(TypeError, match="OPDConfig"):
        OPDTrainer(
            student,
            teacher,
            DistillationConfig(str(tmp_path), report_to=[], bf16=False),
            make_dataset(),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="teacher_model"):
        OPDTrainer(student, None, make_config(tmp_path), make_dataset(), processing_class=tokenizer)


def test_unbounded_completion_length_trains(student, teacher, tokenizer, tmp_path):
    """`max_completion_length=None` (generation stops at EOS or the model's own limit) is accepted and trains."""
    student.generation_config.max_length = 40
    trainer = build(student, teacher, tokenizer, tmp_path, max_steps=1, max_completion_length=None)
    trainer.train()
    rates = [entry["opd/truncation_rate"] for entry in trainer.state.log_history if "opd/truncation_rate" in entry]
    assert rates and 0.0 <= rates[0] <= 1.0


def test_streamed_dataset_without_known_columns_is_accepted(student, teacher, tokenizer, tmp_path):
    """A generator-backed `IterableDataset` has `column_names` None until read; TRL accepts it and so does OPD."""
    from datasets import IterableDataset

    rows = make_dataset(8).to_list()
    streamed = IterableDataset.from_generator(lambda: iter(rows))
    assert streamed.column_names is None
    trainer = build(student, teacher, tokenizer, tmp_path, dataset=streamed, max_steps=1, prefix_source="dataset")
    trainer.train()
    assert trainer.state.global_step == 1
