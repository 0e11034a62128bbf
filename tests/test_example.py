"""The main job's script runs end to end with each objective knob and prints its table and eval.json.

The toy pair is replaced by a tiny one (the script's wiring is under test here, not the pair's quality, which
docs/benchmarks.md reports); everything else is the script as users run it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import TINY_PAIR, load_example

from trl_opd.teacher_server import serve
from trl_opd.toy import build_toy_pair

SMALL = [
    "--max_steps", "2",
    "--per_device_train_batch_size", "4",
    "--n_train_problems", "8",
    "--n_eval_problems", "4",
    "--eval_k", "2",
    "--eval_batch_size", "4",
    "--max_completion_length", "12",
    "--logging_steps", "1",
    "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip
METRICS = {"accuracy", "avg_at_k", "pass_at_k", "k", "mean_length", "truncation_rate", "n_problems"}


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return build_toy_pair(tmp_path_factory.mktemp("toy"), TINY_PAIR, progress=False)


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--prefix_source", "teacher"],
        ["--kl_direction", "forward"],
        ["--kl_direction", "reverse", "--prefix_source", "mixed"],
        ["--loss_support", "teacher_topk", "--loss_top_k", "4"],
        ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"],
    ],
    ids=["default", "teacher-prefixes", "forward", "reverse-mixed-prefixes", "teacher-topk", "peft"],
)
def test_example_prints_its_table_and_writes_eval_json(flags, tiny_pair, tmp_path, monkeypatch, capsys):
    example = load_example(monkeypatch)
    monkeypatch.setattr(example, "build_toy_pair", lambda cache_dir=None, config=None: copy.deepcopy(tiny_pair))
    example.main(*example.parse([*SMALL, *flags, "--output_dir", str(tmp_path)]))
    printed = capsys.readouterr().out
    rows = ("teacher", "student_before", "student_after", "gap recovery (avg@2)", "reverse_kl", "forward_kl")
    for row in (*rows, "student_entropy", "mean_length"):
        assert row in printed, f"the table lost its {row!r} row:\n{printed}"
    report = json.loads((tmp_path / "eval.json").read_text())
    for name in ("teacher", "student_before", "student_after"):
        assert METRICS <= set(report[name]), f"{name} misses {METRICS - set(report[name])}"
        assert report[name]["n_problems"] == 4 and report[name]["k"] == 2
    assert "gap_recovery" in report
    for phase in ("before", "after"):
        divergence = report["heldout_kl"][phase]
        assert divergence["n_tokens"] > 0 and divergence["reverse_kl"] >= 0 and divergence["forward_kl"] >= 0
        assert divergence["mean_length"] == divergence["n_tokens"] / divergence["n_problems"]
        assert 0 < divergence["mean_length"] <= 12 and divergence["student_entropy"] >= 0
    if "--use_peft" in flags:
        assert (tmp_path / "adapter_config.json").exists(), "--use_peft must save a LoRA adapter"


def test_two_teachers_one_of_them_served_on_the_toy_world(tiny_pair, tmp_path, monkeypatch, capsys):
    """`--teachers short=preset long=URL`: short problems from the in-process teacher, long ones from a served copy;
    the loss is logged per teacher and the in-process teacher stays the bar of the report."""
    example = load_example(monkeypatch)
    monkeypatch.setattr(example, "build_toy_pair", lambda cache_dir=None, config=None: copy.deepcopy(tiny_pair))
    teacher, _, tokenizer = tiny_pair
    server = serve(copy.deepcopy(teacher), tokenizer, port=0, served_model_name="toy-teacher")
    try:
        flags = ["--teachers", "short=preset", f"long={server.url}", "--loss_support", "teacher_topk"]
        example.main(*example.parse([*SMALL, *flags, "--loss_top_k", "4", "--output_dir", str(tmp_path)]))
    finally:
        server.shutdown()
    printed = capsys.readouterr().out
    assert "opd/loss/short" in printed and "opd/loss/long" in printed, printed
    report = json.loads((tmp_path / "eval.json").read_text())
    assert {"teacher", "student_before", "student_after", "gap_recovery"} <= set(report)


def test_teacher_cache_is_built_once_then_trained_from_without_a_teacher(tiny_pair, tmp_path, monkeypatch, capsys):
    """`--teacher_cache DIR`: the first run caches the teacher's top-k into DIR and trains from it; a second run
    finds DIR and does not score again (the cache builder is replaced by one that fails)."""
    example = load_example(monkeypatch)
    monkeypatch.setattr(example, "build_toy_pair", lambda cache_dir=None, config=None: copy.deepcopy(tiny_pair))
    cache = tmp_path / "cache"
    flags = [*SMALL, "--prefix_source", "dataset", "--loss_support", "teacher_topk", "--loss_top_k", "4"]
    example.main(*example.parse([*flags, "--teacher_cache", str(cache), "--output_dir", str(tmp_path / "a")]))
    assert (cache / "dataset_info.json").exists()
    monkeypatch.setattr(example, "cache_teacher_topk", lambda *args, **kwargs: pytest.fail("cache rebuilt"))
    example.main(*example.parse([*flags, "--teacher_cache", str(cache), "--output_dir", str(tmp_path / "b")]))
    report = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert {"teacher", "student_after", "gap_recovery"} <= set(report)


@pytest.mark.parametrize("preset", ["toy", "smollm2-pruned"])
def test_model_names_with_an_in_process_pair_fail_with_the_fix(preset, tmp_path, monkeypatch):
    example = load_example(monkeypatch)
    arguments = ["--preset", preset, "--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct", "--report_to", "none"]
    with pytest.raises(ValueError, match="drop them, or pass --dataset_name"):
        example.main(*example.parse([*arguments, "--output_dir", str(tmp_path)]))


def test_a_finished_run_is_kept_unless_overwriting_is_asked_for(tiny_pair, tmp_path, monkeypatch, capsys):
    example = load_example(monkeypatch)
    monkeypatch.setattr(example, "build_toy_pair", lambda cache_dir=None, config=None: copy.deepcopy(tiny_pair))
    (tmp_path / "eval.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        example.main(*example.parse([*SMALL, "--output_dir", str(tmp_path)]))
    assert json.loads((tmp_path / "eval.json").read_text()) == {}, "the finished run's report was touched"
    example.main(*example.parse([*SMALL, "--output_dir", str(tmp_path), "--overwrite_output_dir"]))
    assert "student_after" in json.loads((tmp_path / "eval.json").read_text())


def test_each_objective_gets_its_own_output_dir_unless_one_is_given(tmp_path, monkeypatch):
    example = load_example(monkeypatch)
    root = Path(example.PRESETS["horizon"]["output_dir"])
    runs = {}
    for flags in (["--kl_direction", "forward"], ["--kl_direction", "reverse"], ["--use_peft"]):
        script_args, args, model_args = example.parse(flags)
        assert Path(args.output_dir) == root / (args.objective_name + ("-lora" if model_args.use_peft else ""))
        runs[args.output_dir] = flags
    assert len(runs) == 3, f"objectives share an output directory: {runs}"
    assert example.parse(["--output_dir", str(tmp_path)])[1].output_dir == str(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'from-file'}\n")
    assert example.parse(["--config", str(config)])[1].output_dir == str(tmp_path / "from-file")


def _help(example, flags: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        example.parse(flags)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_leads_with_the_script_and_opd_flags_and_names_preset_values(monkeypatch, capsys):
    example = load_example(monkeypatch)
    short, full = _help(example, ["--help"], capsys), _help(example, ["--help-all"], capsys)
    assert len(short.splitlines()) * 3 < len(full.splitlines()), "--help is not much shorter than --help-all"
    for flag in ("--preset", "--overwrite_output_dir", "--model_name_or_path", "--kl_direction", "--loss_support",
                 "--max_steps", "--help-all"):  # fmt: skip
        assert f"  {flag}" in short, f"--help lost {flag}"
    assert "--adam_beta1" not in short and "--adam_beta1" in full, "--help-all must list every TrainingArguments flag"
    words = " ".join(short.split())
    assert "--kl_direction" in words and "(default: reverse, from preset horizon; OPDConfig default: reverse)" in words
    assert "(default: 256, from preset horizon; OPDConfig default: 512)" in words
    toy = " ".join(_help(example, ["--preset", "toy", "--help"], capsys).split())
    assert "(default: mixed, from preset toy; OPDConfig default: reverse)" in toy
    assert "(default: 0.8, from preset toy; OPDConfig default: 0.5)" in toy
    gsm8k = " ".join(_help(example, ["--preset", "gsm8k", "--help"], capsys).split())
    assert "(default: reverse, from preset gsm8k; OPDConfig default: reverse)" in gsm8k


@pytest.mark.parametrize("preset", ["horizon", "toy", "smollm2-pruned"])
def test_a_short_run_keeps_the_presets_schedule_shape_and_says_what_to_expect(preset, monkeypatch, capsys):
    """Cut to a tenth of the steps its schedule is tuned for, the toy preset left the student worse than it started
    without a word: the warmup is now a share of the run, and the script says what to expect and what to change."""
    example = load_example(monkeypatch)
    values = example.PRESETS[preset]
    full = example.parse(["--preset", preset])[1]
    assert not capsys.readouterr().err, "a run of the preset's length needs no note"
    steps = max(1, values["max_steps"] // 10)
    short = example.parse(["--preset", preset, "--max_steps", str(steps)])[1]
    assert short.get_warmup_steps(steps) < full.get_warmup_steps(values["max_steps"]), "warmup is not a share"
    note = capsys.readouterr().err
    assert f"tuned for {values['max_steps']} steps" in note and "--learning_rate" in note
    assert short.learning_rate == values["learning_rate"]
    example.parse(["--preset", preset, "--max_steps", str(steps), "--learning_rate", "0.01"])
    example.parse(["--preset", preset, "--max_steps", str(2 * values["max_steps"])])
    assert not capsys.readouterr().err, "a chosen learning rate or a longer run needs no note"
