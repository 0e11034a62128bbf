"""Several teachers routed per row (`teacher_model={name: teacher}`): each row is distilled from, and with teacher
prefixes written by, the teacher it names; the loss per teacher equals the single-teacher loss on its rows; a row
naming no teacher fails fast."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config
from datasets import Dataset

from trl_opd import OPDTrainer
from trl_opd.heads import OutputHead, Positions
from trl_opd.losses import Divergence, divergence_of_logits
from trl_opd.objective import TERMS, LossBatch, Objective
from trl_opd.teacher_server import serve
from trl_opd.teachers import RoutedAnswer
from trl_opd.toy import build_model

FAVOURITE = {"alpha": "a", "beta": "b"}  # the token each teacher puts nearly all its mass on


def biased_teacher(tokenizer, token: str, seed: int):
    """A toy model whose head ignores the hidden state and puts ~all mass on `token` (bias 20, zero weight)."""
    model = build_model(tokenizer, hidden_size=32, num_layers=1, seed=seed)
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids(token)] = 20.0
    model.lm_head = head
    return model.eval()


def routed_dataset(n: int = 8) -> Dataset:
    """Prompts 'x<i>?' routed alternately to teachers 'alpha' and 'beta', with a fixed gold completion."""
    names = ["alpha" if i % 2 == 0 else "beta" for i in range(n)]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"x{i}?"}] for i in range(n)],
            "completion": [[{"role": "assistant", "content": "ok then"}] for _ in range(n)],
            "teacher": names,
        }
    )


def teachers(tokenizer) -> dict:
    return {name: biased_teacher(tokenizer, token, seed) for seed, (name, token) in enumerate(FAVOURITE.items())}


def test_objective_routes_each_position_to_its_own_teacher():
    """The routed divergence at each position equals the reference divergence against that position's teacher."""
    torch.manual_seed(0)
    n, hidden, vocab = 10, 8, 12
    student_head = OutputHead(torch.randn(vocab, hidden, requires_grad=True))
    heads = [OutputHead(torch.randn(vocab, hidden)), OutputHead(torch.randn(vocab, hidden))]
    student_hidden, teacher_hidden = torch.randn(n, hidden), torch.randn(n, hidden)
    owner = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 0])
    parts = tuple(
        (name, (owner == k).nonzero().flatten(), Positions(teacher_hidden[owner == k], heads[k]))
        for k, name in enumerate(("alpha", "beta"))
    )
    token_ids = torch.randint(vocab, (n,))
    divergence = Divergence(kl_direction="mixed", forward_kl_weight=0.3)
    objective = Objective(divergence, ((TERMS[0], 1.0),), 1.0)  # the divergence term alone
    batch = LossBatch(Positions(student_hidden, student_head), RoutedAnswer(parts), token_ids)
    value = objective.evaluate(batch)

    student_logits = student_head.logits(student_hidden)
    expected = torch.stack(
        [
            divergence_of_logits(
                student_logits[i : i + 1],
                heads[owner[i]].logits(teacher_hidden[i : i + 1]),
                divergence,
                token_ids[i : i + 1],
            )[0]
            for i in range(n)
        ]
    )
    torch.testing.assert_close(value.per_position, expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(value.per_position.sum(), student_head.weight)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student_head.weight)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_rows_learn_their_own_teachers_favourite_token(tokenizer, tmp_path):
    """Two teachers that want different tokens: after training, the student continues alpha's prompts with 'a' and
    beta's with 'b' (a single teacher, or rows sent to the wrong one, cannot give both)."""
    args = make_config(tmp_path, max_steps=25, prefix_source="dataset", kl_direction="forward", learning_rate=3e-2)
    student = build_model(tokenizer, hidden_size=32, num_layers=1, seed=5)
    dataset = routed_dataset()
    trainer = OPDTrainer(student, teachers(tokenizer), args, dataset, processing_class=tokenizer)
    trainer.train()

    model = trainer.model.eval()
    for row in dataset:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)
        ids = torch.tensor([prompt["input_ids"]])
        with torch.no_grad():
            next_token = model(ids).logits[0, -1].argmax().item()
        assert tokenizer.convert_ids_to_tokens(next_token) == FAVOURITE[row["teacher"]], row

    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"opd/loss/alpha", "opd/loss/beta", "opd/overlap_ratio/alpha", "opd/overlap_ratio/beta"} <= logged
    final = trainer.state.log_history[-2]
    assert final["opd/loss/alpha"] < trainer.state.log_history[0]["opd/loss/alpha"]


def test_teacher_prefixes_are_written_by_each_rows_teacher(tokenizer, tmp_path):
    """With teacher prefixes, alpha's rows are continued by alpha ('a'…) and beta's by beta ('b'…), one of them
    served: every batch row's completion is its own teacher's favourite token repeated."""
    routed = teachers(tokenizer)
    server = serve(routed["beta"], tokenizer, port=0, served_model_name="beta")
    try:
        args = make_config(tmp_path, max_steps=1, prefix_source="teacher", loss_support="teacher_topk", loss_top_k=4)
        trainer = OPDTrainer(
            build_model(tokenizer, hidden_size=32, num_layers=1, seed=5),
            {"alpha": routed["alpha"], "beta": server.url},
            args,
            routed_dataset(),
            processing_class=tokenizer,
        )
        seen = []
        compute_loss = trainer._compute_loss

        def spy(model, inputs, num_items_in_batch):
            seen.append((inputs["completion_ids"].clone(), inputs["teacher_index"].clone()))
            return compute_loss(model, inputs, num_items_in_batch)

        trainer._compute_loss = spy
        trainer.train()
    finally:
        server.shutdown()
    completions, owners = seen[0]
    names = trainer.teacher.names
    for ids, owner in zip(completions, owners):
        favourite = tokenizer.convert_tokens_to_ids(FAVOURITE[names[owner]])
        assert ids.tolist() == [favourite] * args.max_completion_length


@pytest.mark.parametrize(
    ("column", "teacher_column", "message"),
    [
        (["alpha", "gamma"] * 4, "teacher", "names teacher 'gamma' in column 'teacher', but the teachers are"),
        (["alpha"] * 8, "source", "must name its teacher in column 'source'"),
    ],
)
def test_a_row_without_a_valid_teacher_fails_fast_naming_the_teachers(
    tokenizer, tmp_path, column, teacher_column, message
):
    dataset = routed_dataset().remove_columns("teacher").add_column("teacher", column)
    args = make_config(tmp_path, teacher_column=teacher_column)
    with pytest.raises(ValueError, match=message) as error:
        OPDTrainer(build_model(tokenizer), teachers(tokenizer), args, dataset, processing_class=tokenizer)
    if "gamma" in message:
        assert "['alpha', 'beta']" in str(error.value)


@pytest.mark.parametrize(
    ("teacher_model", "message"),
    [({}, "empty dict"), ({"a/b": "x"}, "without '/'"), ({"alpha": None}, "is NoneType")],
)
def test_malformed_teacher_dicts_are_refused(tokenizer, tmp_path, teacher_model, message):
    with pytest.raises(ValueError, match=message):
        OPDTrainer(
            build_model(tokenizer), teacher_model, make_config(tmp_path), routed_dataset(), processing_class=tokenizer
        )


def test_a_streamed_row_naming_no_teacher_fails_at_its_batch(tokenizer):
    """An `IterableDataset` is not read at construction: the router checks each batch's rows."""
    from trl_opd.teacher_routing import TeacherRouter

    router = TeacherRouter({"alpha": object(), "beta": object()}, "teacher")
    assert router.indices([{"teacher": "beta"}, {"teacher": "alpha"}]) == [1, 0]
    with pytest.raises(ValueError, match=r"names teacher None in column 'teacher', but the teachers are \['alpha'"):
        router.indices([{"teacher": "alpha"}, {"prompt": "no teacher"}])


def test_one_served_teacher_writes_the_teacher_prefixes(tokenizer, tmp_path):
    """`prefix_source='teacher'` with a served teacher: the completions are sampled by the server."""
    server = serve(biased_teacher(tokenizer, "b", seed=1), tokenizer, port=0, served_model_name="beta")
    try:
        args = make_config(tmp_path, max_steps=1, prefix_source="teacher", loss_support="teacher_topk", loss_top_k=4)
        trainer = OPDTrainer(
            build_model(tokenizer, hidden_size=32, num_layers=1, seed=5),
            server.url,
            args,
            routed_dataset(),
            processing_class=tokenizer,
        )
        seen = []
        compute_loss = trainer._compute_loss
        trainer._compute_loss = lambda model, inputs, n: (
            seen.append(inputs["completion_ids"]) or compute_loss(model, inputs, n)
        )
        trainer.train()
    finally:
        server.shutdown()
    favourite = tokenizer.convert_tokens_to_ids("b")
    assert seen[0].tolist() == [[favourite] * args.max_completion_length] * len(seen[0])


@pytest.mark.parametrize("support", ["full", "teacher_topk", "sampled_token"])
def test_a_teacher_without_positions_on_this_rank_still_runs_its_kernels(monkeypatch, support):
    """Under ZeRO-3 every kernel's backward gathers the heads collectively, so a rank holding no position of some
    teacher (or none at all) must run as many kernels, forward and backward, as a rank holding some: it evaluates a
    zero-weighted stand-in. The loss and gradients are those of the positions alone."""
    from trl_opd import chunked

    calls = []
    original = chunked.maybe_gather_lm_head_ctx
    monkeypatch.setattr(chunked, "maybe_gather_lm_head_ctx", lambda *p: calls.append(len(p)) or original(*p))
    torch.manual_seed(0)
    hidden, vocab = 8, 12
    student_head = OutputHead(torch.randn(vocab, hidden, requires_grad=True))
    heads = [OutputHead(torch.randn(vocab, hidden)), OutputHead(torch.randn(vocab, hidden))]
    divergence = Divergence(kl_direction="forward", loss_support=support, loss_top_k=4)
    objective = Objective(divergence, ((TERMS[0], 1.0),), 1.0)

    def evaluate(owner: list[int]) -> tuple[torch.Tensor, int]:
        calls.clear()
        owner_tensor = torch.tensor(owner, dtype=torch.long)
        n = len(owner)
        student_hidden, teacher_hidden = torch.randn(n, hidden), torch.randn(n, hidden)
        parts = tuple(
            (name, (owner_tensor == k).nonzero().flatten(), Positions(teacher_hidden[owner_tensor == k], heads[k]))
            for k, name in enumerate(("alpha", "beta"))
        )
        batch = LossBatch(
            Positions(student_hidden, student_head), RoutedAnswer(parts), torch.zeros(n, dtype=torch.long)
        )
        value = objective.evaluate(batch).per_position
        value.sum().backward()
        return value, len(calls)

    both_value, both_calls = evaluate([0, 1, 0])
    alpha_value, alpha_calls = evaluate([0, 0, 0])
    none_value, none_calls = evaluate([])
    assert both_calls == alpha_calls == none_calls > 0
    assert alpha_value.shape == (3,) and none_value.shape == (0,) and none_value.requires_grad
