"""The offline teacher cache: cache → save → load → train without a teacher equals training with the teacher held
locally; a served teacher caches the same values; a cache for other prefixes or another temperature is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, make_dataset
from datasets import load_from_disk

from trl_opd import OPDTrainer
from trl_opd.teacher_cache import CACHE_COLUMNS, LOG_PROBS, cache_teacher_topk
from trl_opd.teacher_server import serve
from trl_opd.toy import build_model


def teacher_model(tokenizer):
    return build_model(tokenizer, hidden_size=48, num_layers=2, seed=1)


def train(tokenizer, tmp_path, teacher, dataset, **settings):
    args = make_config(tmp_path, max_steps=2, prefix_source="dataset", optim="sgd", **settings)
    trainer = OPDTrainer(
        model=build_model(tokenizer, hidden_size=32, num_layers=1, seed=0),
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize(
    "settings",
    [
        {"loss_support": "teacher_topk", "loss_top_k": 8, "loss_add_tail": True, "kl_direction": "mixed"},
        {"loss_support": "sampled_token", "kl_direction": "forward"},
    ],
    ids=["topk-tail", "sampled-token"],
)
def test_training_from_a_saved_cache_equals_the_live_teacher(tokenizer, tmp_path, settings):
    cached = cache_teacher_topk(make_dataset(), teacher_model(tokenizer), tokenizer, top_k=8, max_completion_length=8)
    assert set(CACHE_COLUMNS) <= set(cached.column_names)
    cached.save_to_disk(tmp_path / "cache")
    loaded = load_from_disk(str(tmp_path / "cache"))
    live_losses, live = train(tokenizer, tmp_path / "live", teacher_model(tokenizer), make_dataset(), **settings)
    losses, weights = train(tokenizer, tmp_path / "cached", None, loaded, **settings)
    assert losses == pytest.approx(live_losses, rel=1e-4)
    for name, weight in live.items():
        torch.testing.assert_close(weights[name], weight, rtol=1e-4, atol=1e-5)


def test_a_served_teacher_caches_the_same_top_k(tokenizer):
    model = teacher_model(tokenizer).eval()
    local = cache_teacher_topk(make_dataset(4), model, tokenizer, top_k=5, temperature=0.7)
    server = serve(model, tokenizer, port=0, served_model_name="toy")
    try:
        served = cache_teacher_topk(make_dataset(4), server.url, tokenizer, top_k=5, temperature=0.7)
    finally:
        server.shutdown()
    for row_local, row_served in zip(local, served):
        torch.testing.assert_close(
            torch.tensor(row_served[LOG_PROBS]), torch.tensor(row_local[LOG_PROBS]), atol=1e-5, rtol=0
        )


def test_a_cache_for_other_prefixes_or_another_temperature_is_refused(tokenizer, tmp_path):
    short = cache_teacher_topk(make_dataset(), teacher_model(tokenizer), tokenizer, top_k=4, max_completion_length=2)
    with pytest.raises(ValueError, match="rebuild the cache"):
        train(tokenizer, tmp_path / "short", None, short, loss_support="teacher_topk", loss_top_k=4)
    cached = cache_teacher_topk(make_dataset(), teacher_model(tokenizer), tokenizer, top_k=4, temperature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        train(tokenizer, tmp_path / "warm", None, cached, loss_support="teacher_topk", loss_top_k=4)


def test_no_teacher_and_no_cache_names_the_fix(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="cache_teacher_topk"):
        train(tokenizer, tmp_path, None, make_dataset(), loss_support="teacher_topk")
    cached = cache_teacher_topk(make_dataset(), teacher_model(tokenizer), tokenizer, top_k=4)
    with pytest.raises(ValueError, match="gives only its top-k"):
        train(tokenizer, tmp_path, None, cached, loss_support="full")
