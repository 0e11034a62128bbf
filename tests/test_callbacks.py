"""Training-time controllers: each one changes what training does, validates its input and survives a resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config, make_dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerControl, TrainerState

from trl_opd import EffOPDCallback, EntropyGatedLengthCurriculum, OPDCallback, OPDTrainer, ScheduleCallback
from trl_opd.callbacks.effopd import ANCHOR_FILE
from trl_opd.callbacks.heldout import sampled_entropy
from trl_opd.callbacks.schedule import schedule_value
from trl_opd.rollouts import tokenize_prompts
from trl_opd.toy import build_model


def build(tokenizer, tmp_path, callbacks=(), student=None, eval_dataset=None, **overrides):
    return OPDTrainer(
        model=student if student is not None else build_model(tokenizer, hidden_size=32, num_layers=1, seed=0),
        teacher_model=build_model(tokenizer, hidden_size=48, num_layers=2, seed=1),
        args=make_config(tmp_path, **overrides),
        train_dataset=make_dataset(),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if "loss" in entry and key in entry]


def completion_widths(trainer):
    """Spy on the generation batches: the padded completion width of each."""
    widths, original = [], trainer._generate_and_score_completions

    def spy(inputs):
        output = original(inputs)
        widths.append(output["completion_ids"].shape[1])
        return output

    trainer._generate_and_score_completions = spy
    return widths


def prompts(n=3):
    return list(make_dataset(n)["prompt"])


# --------------------------------------------------------------------------------------------------------- schedule


def test_schedule_shapes():
    assert schedule_value("linear", 0.2, 1.0, 5, 0, 10) == pytest.approx(0.6)
    assert schedule_value("linear", 0.2, 1.0, 0, 3, 10) == 0.2 and schedule_value("linear", 0.2, 1.0, 99, 0, 10) == 1.0
    assert schedule_value("linear", 0.0, 1.0, 6, 4, 8) == pytest.approx(0.5)  # ramps over [start_step, end_step]
    assert schedule_value("cosine", 1.0, 0.0, 5, 0, 10) == pytest.approx(0.5)
    assert schedule_value("cosine", 1.0, 0.0, 2, 0, 8) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert [schedule_value("step", 0.1, 0.9, s, 0, 3) for s in range(5)] == [0.1, 0.1, 0.1, 0.9, 0.9]
    assert schedule_value("constant", 0.3, 0.3, 7, 0, 10) == 0.3
    top_k = ScheduleCallback("loss_top_k", 4, 64, shape="linear", end_step=4)
    assert [top_k.value_at(s, 100) for s in range(5)] == [4, 19, 34, 49, 64]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(knob="lr", start=0, end=1), r"one of \['forward_kl_weight', 'student_prefix_fraction', 'beta'"),
        (dict(knob="beta", start=0, end=1, shape="exp"), r"one of \['constant', 'linear', 'cosine', 'step'\]"),
        (dict(knob="forward_kl_weight", start=0, end=1.5), r"in \[0, 1\]"),
        (dict(knob="student_prefix_fraction", start=-0.1, end=1), r"in \[0, 1\]"),
        (dict(knob="temperature", start=1.0, end=0.0), "positive"),
        (dict(knob="loss_top_k", start=0, end=8), "at least 1"),
        (dict(knob="beta", start=0.2, end=0.5, shape="constant"), "end=start"),
        (dict(knob="beta", start=0.2, end=0.5, start_step=10, end_step=10), "greater than `start_step`"),
    ],
)
def test_schedule_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleCallback(**kwargs)


@pytest.mark.parametrize(
    "knob,overrides,match",
    [
        ("forward_kl_weight", {"kl_direction": "reverse"}, "no effect with `kl_direction='reverse'`"),
        ("beta", {"kl_direction": "mixed"}, "one of \\['jsd'\\]"),
        ("loss_top_k", {"loss_support": "full"}, "no effect"),
        ("loss_top_k", {"loss_support": "teacher_topk", "loss_top_k": 8}, "above the vocabulary size"),
    ],
)
def test_schedule_of_an_unused_knob_fails_at_train_begin(tokenizer, tmp_path, knob, overrides, match):
    start, end = (8, 4096) if knob == "loss_top_k" else (0.5, 1.0)
    trainer = build(tokenizer, tmp_path, [ScheduleCallback(knob, start, end)], **overrides)
    with pytest.raises(ValueError, match=match):
        trainer.train()


def test_forward_kl_weight_schedule_mixes_the_per_step_loss(tokenizer, tmp_path):
    """With a frozen student every run sees the same batches, so loss_t = w_t·FKL_t + (1 − w_t)·RKL_t exactly."""

    def losses(weight, callbacks=()):
        trainer = build(
            tokenizer,
            tmp_path / str(weight),
            callbacks,
            kl_direction="mixed",
            forward_kl_weight=weight,
            teacher_temperature=0.2,
            learning_rate=0.0,
            max_steps=3,
        )
        trainer.train()
        return trainer, logged(trainer, "loss")

    _, reverse = losses(0.0)
    _, forward = losses(1.0)
    scheduled, mixed = losses(0.5, [ScheduleCallback("forward_kl_weight", 0.0, 1.0)])
    weights = [0.0, 1 / 3, 2 / 3]  # linear over max_steps=3: the value of the step being run
    assert logged(scheduled, "opd/forward_kl_weight") == weights
    expected = [w * f + (1 - w) * r for w, f, r in zip(weights, forward, reverse)]
    assert mixed == pytest.approx(expected, rel=1e-5)
    assert min(abs(f - r) for f, r in zip(forward[1:], reverse[1:])) > 1e-4  # the mix is visible in the loss


def test_temperature_schedule_drives_generation_and_loss(tokenizer, tmp_path):
    trainer = build(
        tokenizer, tmp_path, [ScheduleCallback("temperature", 1.0, 0.05, shape="step", end_step=2)], max_steps=4
    )
    used = []
    original = trainer._generate_single_turn

    def spy(*args, **kwargs):
        output = original(*args, **kwargs)
        used.append((trainer.generation_config.temperature, trainer.generation_kwargs["temperature"]))
        return output

    trainer._generate_single_turn = spy
    trainer.train()
    assert used == [(1.0, 1.0), (1.0, 1.0), (0.05, 0.05), (0.05, 0.05)]
    assert logged(trainer, "opd/temperature") == [1.0, 1.0, 0.05, 0.05]
    entropy = logged(trainer, "entropy")  # the student's entropy in the loss, at args.temperature
    assert max(entropy[2:]) < min(entropy[:2]) - 1.0


# ------------------------------------------------------------------------------------------------------- curriculum


def test_sampled_entropy_is_the_mean_over_sampled_tokens(tokenizer):
    model = build_model(tokenizer, hidden_size=32, num_layers=1, seed=3)
    model.lm_head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():
        model.lm_head.bias[tokenizer.eos_token_id] = 3.0  # ~17% EOS per token: some completions end early
    questions = ["1+2?", "13+27+5?", "4+4?"]
    prompt_ids = tokenize_prompts(tokenizer, [[{"role": "user", "content": q}] for q in questions], None)
    assert len(set(map(len, prompt_ids))) > 1  # left padding is exercised
    total, count = sampled_entropy(model, tokenizer, prompt_ids, max_new_tokens=6, temperature=0.7, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = model.generate(
            **tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt"),
            max_new_tokens=6,
            do_sample=True,
            temperature=0.7,
            top_k=0,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
        )
    width = max(map(len, prompt_ids))
    expected, n = 0.0, 0
    for ids, completion in zip(prompt_ids, out[:, width:]):
        completion = completion.tolist()
        if tokenizer.eos_token_id in completion:
            completion = completion[: completion.index(tokenizer.eos_token_id) + 1]
        with torch.no_grad():
            logits = model(torch.tensor([ids + completion])).logits[0, len(ids) - 1 : -1] / 0.7
        expected += float(torch.distributions.Categorical(logits=logits).entropy().sum())
        n += len(completion)
    assert n < 6 * len(prompt_ids)  # the padding after an EOS is excluded
    assert count == n and total / count == pytest.approx(expected / n, rel=1e-4)


@pytest.mark.parametrize(
    "gate,widths,stages", [("0.5x", [2, 2, 4, 4, 6], [0, 0, 1, 1, 2]), ("2x", [2, 2, 2, 2, 2], [0, 0, 0, 0, 0])]
)
def test_curriculum_follows_the_ladder_only_while_the_gate_passes(tokenizer, tmp_path, gate, widths, stages):
    curriculum = EntropyGatedLengthCurriculum(
        [2, 4, 6], min_entropy=gate, check_every_steps=1, min_steps_per_stage=2, eval_prompts=prompts()
    )
    trainer = build(tokenizer, tmp_path, [curriculum], max_steps=5)
    used = completion_widths(trainer)
    trainer.train()
    assert used == widths  # a random tiny student: ~log|V| nats, never below half, never doubled
    assert logged(trainer, "opd/max_completion_length") == widths
    assert logged(trainer, "opd/curriculum_stage") == stages
    assert 0 < curriculum.baseline_entropy <= math.log(len(tokenizer))
    assert logged(trainer, "opd/heldout_entropy")[-1] == pytest.approx(curriculum.baseline_entropy, rel=0.05)


def test_curriculum_defaults_to_the_eval_dataset_and_checks_the_context(tokenizer, tmp_path):
    student = build_model(tokenizer, hidden_size=32, num_layers=1, max_position_embeddings=64)
    curriculum = EntropyGatedLengthCurriculum([8, 60], min_entropy=1.0)
    trainer = build(tokenizer, tmp_path, [curriculum], student=student, eval_dataset=make_dataset(2))
    prompt_length = max(map(len, tokenize_prompts(tokenizer, prompts(2), None)))
    with pytest.raises(
        ValueError, match=f"longest held-out prompt \\({prompt_length} tokens\\).*at most {64 - prompt_length}"
    ):
        trainer.train()
    trainer = build(tokenizer, tmp_path, [EntropyGatedLengthCurriculum([8, 16], min_entropy=1.0)])
    with pytest.raises(ValueError, match="pass `eval_prompts`.*or give the trainer an `eval_dataset`"):
        trainer.train()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lengths=[8, 8, 16], min_entropy=1.0), "strictly increasing"),
        (dict(lengths=[0, 8], min_entropy=1.0), "positive integers"),
        (dict(lengths=[8, 16], min_entropy="high"), "like '0.8x'"),
        (dict(lengths=[8, 16], min_entropy=-1.0), "≥ 0"),
        (dict(lengths=[8, 16], min_entropy=1.0, check_every_steps=0), "`check_every_steps` must be an integer >= 1"),
        (dict(lengths=[8, 16], min_entropy=1.0, eval_prompts=[]), "empty"),
    ],
)
def test_curriculum_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EntropyGatedLengthCurriculum(**kwargs)


# ----------------------------------------------------------------------------------------------------------- EffOPD


def scripted(scores):
    """A score function returning `scores` in turn, recording each call."""
    calls = []

    def score(model, processing_class):
        calls.append(model.training)
        return scores[len(calls) - 1]

    score.calls = calls
    return score


def run_event(callback, model, tokenizer, tmp_path, step=1):
    """Anchor at train begin, move every parameter as training would, then reach power-of-two step `step`."""
    args, state, control = make_config(tmp_path), TrainerState(), TrainerControl()
    callback.prepare(eval_dataset=None, resume_from_checkpoint=None)
    callback.on_train_begin(args, state, control, model=model, processing_class=tokenizer)
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    state.global_step = step
    callback.on_step_end(args, state, control, model=model, processing_class=tokenizer)
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    return anchor, trained, after


def test_effopd_keeps_candidates_while_the_score_rises(tokenizer, tmp_path):
    model = build_model(tokenizer, hidden_size=32, num_layers=1)
    score = scripted([0.0, 1.0, 2.0, 2.0])  # W, then a=2 and a=4 are better, a=6 is not
    callback = EffOPDCallback(score)
    anchor, trained, after = run_event(callback, model, tokenizer, tmp_path)
    moved = {name for name in after if not torch.equal(after[name], trained[name])}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert moved == {name for name in after if any(f".{m}." in name for m in projections)}
    for name in moved:
        expected = trained[name] + 4.0 * (trained[name] - anchor[name])
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)
    assert callback.metrics(None) == {"opd/effopd_accepted": 2.0, "opd/effopd_alpha": 4.0, "opd/effopd_score": 2.0}
    assert len(score.calls) == 4 and not any(score.calls)  # scored in eval mode
    assert model.training


def test_effopd_restores_the_exact_weights_when_no_candidate_is_better(tokenizer, tmp_path):
    model = build_model(tokenizer, hidden_size=32, num_layers=1)
    callback = EffOPDCallback(scripted([1.0, 1.0]))  # equal is not strictly higher
    _, trained, after = run_event(callback, model, tokenizer, tmp_path)
    assert all(torch.equal(after[name], trained[name]) for name in after)
    assert callback.metrics(None)["opd/effopd_alpha"] == 0.0
    # the next anchor is where training continues from
    assert all(torch.equal(callback._anchor[name], trained[name]) for name in callback._anchor)


def test_effopd_moves_only_lora_adapters(tokenizer, tmp_path):
    model = get_peft_model(
        build_model(tokenizer, hidden_size=32, num_layers=1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    anchor, trained, after = run_event(EffOPDCallback(scripted([0.0, 1.0, 0.0])), model, tokenizer, tmp_path)
    moved = {name for name in after if not torch.equal(after[name], trained[name])}
    assert moved and all(".lora_A." in name or ".lora_B." in name for name in moved)
    assert {name.split(".")[-4] for name in moved} == {"q_proj", "v_proj"}
    for name in moved:
        torch.testing.assert_close(
            after[name], trained[name] + 2.0 * (trained[name] - anchor[name]), rtol=0, atol=1e-6
        )


def test_effopd_runs_at_powers_of_two_only(tokenizer, tmp_path):
    model = build_model(tokenizer, hidden_size=32, num_layers=1)
    score = scripted([0.0] * 100)
    callback = EffOPDCallback(score, max_tries=1)
    args, state, control = make_config(tmp_path), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    events = []
    for step in range(1, 13):
        state.global_step = step
        before = len(score.calls)
        callback.on_step_end(args, state, control, model=model)
        events += [step] if len(score.calls) > before else []
    assert events == [1, 2, 4, 8] and callback.anchor_step == 8


def test_effopd_in_training(tokenizer, tmp_path):
    def final_weights(name, callbacks):
        trainer = build(tokenizer, tmp_path / name, callbacks, max_steps=3)
        trainer.train()
        return trainer, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}

    _, plain = final_weights("plain", [])
    _, rejected = final_weights("rejected", [EffOPDCallback(lambda model, processing_class: 0.0)])
    assert all(torch.equal(plain[name], rejected[name]) for name in plain)  # scoring leaves training untouched
    rising = iter(range(100))
    trainer, accepted = final_weights("rising", [EffOPDCallback(lambda model, processing_class: float(next(rising)))])
    assert any(not torch.equal(plain[name], accepted[name]) for name in plain)
    assert logged(trainer, "opd/effopd_alpha") == [10.0, 10.0, 10.0]


def test_effopd_rejects_bad_input_and_sharded_training(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Pass one of them"):
        EffOPDCallback(lambda model, processing_class: 0.0, eval_prompts=make_dataset(2))
    with pytest.raises(ValueError, match="`max_tries` must be an integer >= 1"):
        EffOPDCallback(max_tries=0)
    model = build_model(tokenizer, hidden_size=32, num_layers=1)
    args, state, control = make_config(tmp_path), TrainerState(), TrainerControl()
    with pytest.raises(ValueError, match="`prompt`, `answer`"):
        EffOPDCallback().on_train_begin(args, state, control, model=model)
    with pytest.raises(ValueError, match="No trainable parameter"):
        EffOPDCallback(scripted([0.0]), target_modules=["c_attn"]).on_train_begin(args, state, control, model=model)

    from accelerate import DistributedType

    class DeepSpeedState:
        distributed_type = DistributedType.DEEPSPEED

    monkeypatch.setattr("trl_opd.callbacks.effopd.PartialState", DeepSpeedState)
    with pytest.raises(ValueError, match="does not support DEEPSPEED"):
        EffOPDCallback(scripted([0.0])).on_train_begin(args, state, control, model=model)


# ----------------------------------------------------------------------------------------------------------- resume


def controllers(direction):
    """Two schedules, the curriculum and EffOPD with a deterministic, weight-dependent score."""

    def score(model, processing_class):
        weight = model.model.layers[0].self_attn.q_proj.weight
        return float((weight * direction).sum())

    return [
        ScheduleCallback("forward_kl_weight", 1.0, 0.0, shape="cosine"),
        ScheduleCallback("temperature", 1.0, 0.7),
        EntropyGatedLengthCurriculum(
            [2, 3, 4, 5], min_entropy="0.5x", check_every_steps=1, min_steps_per_stage=2, eval_prompts=prompts()
        ),
        EffOPDCallback(score, max_tries=2),
    ]


def test_resumed_controllers_continue_where_they_stopped(tokenizer, tmp_path):
    direction = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    # 4 steps per epoch: TRL's sampler restarts its shuffle on resume, so a resume inside the first epoch is the one
    # that replays the uninterrupted run's batches exactly.
    settings = dict(
        max_steps=6, save_strategy="steps", save_steps=3, kl_direction="mixed", per_device_train_batch_size=2
    )
    straight = build(tokenizer, tmp_path / "straight", controllers(direction), **settings)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / ANCHOR_FILE).exists()

    resumed = build(tokenizer, tmp_path / "resumed", controllers(direction), **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    def after_resume(trainer, key):  # the resumed history starts with the checkpoint's entries for steps 1-3
        return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry and entry["step"] > 3}

    exact = (
        "opd/forward_kl_weight",
        "opd/temperature",
        "opd/max_completion_length",
        "opd/curriculum_stage",
        "opd/effopd_alpha",
        "opd/effopd_accepted",
    )
    for key in exact:
        assert list(after_resume(straight, key)) == [4, 5, 6], key
        assert after_resume(resumed, key) == after_resume(straight, key), key
    assert logged(straight, "opd/curriculum_stage") == [0, 0, 1, 1, 2, 2]
    for key in ("opd/heldout_entropy", "opd/effopd_score", "loss"):
        straight_values = after_resume(straight, key)
        assert list(after_resume(resumed, key)) == list(straight_values) == [4, 5, 6], key
        assert list(after_resume(resumed, key).values()) == pytest.approx(list(straight_values.values()), rel=1e-5)


class Counter(OPDCallback):
    state_attributes = ("count",)

    def __init__(self, increment: int) -> None:
        super().__init__()
        self.increment, self.count = increment, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += self.increment


def test_several_instances_of_a_class_get_their_latest_state_back(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, [Counter(1), Counter(2)], max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    fresh = [Counter(1), Counter(2)]
    resumed = build(tokenizer, tmp_path / "again", fresh, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert [counter.count for counter in fresh] == [4, 8]  # not the states saved at step 0 or 2
