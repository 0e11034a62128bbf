"""Fail-fast checks on what `OPDTrainer` is given, each error naming the fix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .chunked import TEACHER_TOPK_SUPPORTS
from .config import TOPK_SUPPORTS, OPDConfig
from .served_teacher import is_served
from .teacher_cache import has_cache
from .teacher_routing import check_teacher_column


def vocab_size(model: PreTrainedModel) -> int:
    """The number of rows of the model's output head (its text config's `vocab_size`)."""
    return model.config.get_text_config().vocab_size


def validate_prompt_dataset(dataset: Dataset | IterableDataset | None, name: str, needs_completion: bool) -> None:
    """Fail fast on a dataset the trainer cannot use, with the fix in the message.

    A streamed dataset whose columns are unknown until read (`column_names` None) is accepted, as TRL accepts it; a
    missing `completion` then fails at the first batch that needs it.
    """
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, split in dataset.items():
            validate_prompt_dataset(split, f"{name}[{key!r}]", needs_completion)
        return
    columns = dataset.column_names
    if columns is None:
        return
    if "prompt" not in columns:
        raise ValueError(
            f"`{name}` has no `prompt` column (columns: {columns}). Rename the column holding the prompts, e.g. "
            f"`{name} = {name}.rename_column('question', 'prompt')`."
        )
    if needs_completion and "completion" not in columns:
        raise ValueError(
            f"`prefix_source` uses dataset completions, but `{name}` has no `completion` column (columns: "
            f"{columns}). Add one (gold solutions, as in TRL's prompt-completion format), or use "
            "`prefix_source='student'`/'teacher' (or `off_policy_source='teacher'` under 'mixed')."
        )
    if not isinstance(dataset, Dataset):
        return
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: give it at least one row with a `prompt`.")
    if any(not prompt for prompt in dataset["prompt"]):
        raise ValueError(f"`{name}` has empty prompts; drop them, e.g. `{name}.filter(lambda row: row['prompt'])`.")


def validate_inputs(
    args: OPDConfig,
    model: Any,
    teacher_model: Any,
    train_dataset: Any,
    eval_dataset: Any,
    tools: list | None,
) -> None:
    """What can be checked before TRL loads anything: the teacher(s), the datasets' columns, tools, vocabularies."""
    if isinstance(teacher_model, Mapping):
        validate_teacher_dict(args, teacher_model, train_dataset, eval_dataset)
    cached = teacher_model is None
    if cached and not (has_cache(train_dataset) and args.prefix_source == "dataset"):
        raise ValueError(
            "OPDTrainer needs a `teacher_model` (a model, a model id/path or an http(s) URL of a served teacher), "
            "or, with `prefix_source='dataset'`, a train dataset carrying a cached teacher top-k "
            "(`trl_opd.teacher_cache.cache_teacher_topk`)."
        )
    if cached and eval_dataset is not None and not has_cache(eval_dataset):
        raise ValueError("Without a `teacher_model`, the eval dataset needs a cached teacher top-k too.")
    uses_dataset = args.uses_dataset_prefixes
    needs_completion = uses_dataset or args.gold_sft_weight > 0
    validate_prompt_dataset(train_dataset, "train_dataset", needs_completion=needs_completion)
    validate_prompt_dataset(eval_dataset, "eval_dataset", needs_completion=needs_completion)
    teacher_prefixes = args.uses_teacher_prefixes
    if tools and teacher_prefixes and isinstance(teacher_model, Mapping):
        raise ValueError(
            "Tool calling with teacher-written prefixes needs one teacher: with several, use "
            "`prefix_source='student'`."
        )
    if tools and uses_dataset:
        raise ValueError(
            "Tool calling needs generated completions; with tools use `prefix_source` 'student'/'teacher'."
        )
    teachers = teacher_model if isinstance(teacher_model, Mapping) else {None: teacher_model}
    for name, teacher in teachers.items():
        if isinstance(model, PreTrainedModel) and isinstance(teacher, PreTrainedModel):
            check_vocabularies(model, teacher)
        if is_served(teacher):
            described = f"the served teacher {name + ' ' if name else ''}at {teacher}"
            validate_topk_teacher(args, described)
            if teacher_prefixes:
                validate_served_prefixes(args, described)
    if cached:
        validate_topk_teacher(args, "the cached teacher")


def validate_teacher_dict(args: OPDConfig, teachers: Mapping[Any, Any], train_dataset: Any, eval_dataset: Any) -> None:
    """Several teachers: string names, each a model, id/path or URL, and every row naming one of them."""
    if not teachers:
        raise ValueError("`teacher_model` is an empty dict: give {name: model | id/path | URL} for each teacher.")
    for name, teacher in teachers.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(
                f"Teacher names must be non-empty strings without '/' (they name metrics `opd/loss/<name>`), got "
                f"{name!r}."
            )
        if teacher is None or isinstance(teacher, Mapping):
            raise ValueError(
                f"Teacher {name!r} is {type(teacher).__name__}: each teacher of the dict is a model, a model id/path "
                "or the http(s) URL of a served teacher (a cached top-k serves one teacher: `teacher_model=None`)."
            )
    names = list(teachers)
    check_teacher_column(train_dataset, args.teacher_column, names, "train")
    evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
    for split, dataset in evals:
        check_teacher_column(dataset, args.teacher_column, names, str(split))


def validate_topk_teacher(args: OPDConfig, teacher: str) -> None:
    """A served or cached teacher gives only its top-k and the prefix token's log-prob: refuse what needs more."""
    if args.loss_support not in TEACHER_TOPK_SUPPORTS:
        raise ValueError(
            f"{teacher.capitalize()} gives only its top-k log-probabilities, so `loss_support="
            f"{args.loss_support!r}` cannot be computed. Use `loss_support` in {list(TEACHER_TOPK_SUPPORTS)} "
            "(`teacher_topk` with or without `loss_add_tail`), or a local teacher."
        )
    if args.eopd_coef > 0:
        raise ValueError(
            f"`eopd_coef > 0` gates on the teacher's full-vocabulary entropy, which {teacher} does not give. Set "
            "`eopd_coef=0`, or use a local teacher."
        )


SAMPLING_DEFAULTS = {"top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0}  # `DistillationConfig`'s


def validate_served_prefixes(args: OPDConfig, teacher: str) -> None:
    """Teacher prefixes sampled by a server: a length cap to send, and no sampling knob the request cannot carry."""
    if args.max_completion_length is None:
        raise ValueError(
            f"Teacher prefixes from {teacher} need a `max_completion_length` (the server's `max_tokens`); set one."
        )
    unsent = sorted(set(args.generation_kwargs or {}) - {"temperature", "max_new_tokens"})
    unsent += [knob for knob, plain in SAMPLING_DEFAULTS.items() if getattr(args, knob) != plain]
    if unsent:
        raise ValueError(
            f"The sampling settings {unsent} would apply to the student's samples but not to those of {teacher}, "
            "which samples at the teacher temperature alone. Drop them, or use `prefix_source='student'` or a local "
            "teacher."
        )


def check_vocabularies(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """Student and teacher must share one vocabulary: token-level divergences compare distributions over it."""
    student_vocab, teacher_vocab = vocab_size(student), vocab_size(teacher)
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"The student's vocabulary has {student_vocab} entries but the teacher's has {teacher_vocab}. "
            "Token-level distillation compares next-token distributions over one vocabulary: use a teacher from "
            "the student's model family (same tokenizer), or resize one embedding to match if the extra rows are "
            "unused padding."
        )


def validate_prepared(args: OPDConfig, tokenizer: PreTrainedTokenizerBase, vocabulary: int) -> None:
    """What needs the loaded student: the tokenizer must address only rows both models have, special tokens
    included, and top-k supports need k ≤ V."""
    outside = {
        token: index
        for token, index in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)
        if index is None or index >= vocabulary
    }
    if len(tokenizer) > vocabulary or outside:
        raise ValueError(
            f"The tokenizer ({len(tokenizer)} tokens; special tokens beyond the vocabulary: {outside or 'none'}) "
            f"does not fit the models' vocabulary of {vocabulary}. Use the student's own tokenizer, or call "
            "`resize_token_embeddings(len(tokenizer))` on both models after adding tokens."
        )
    if args.loss_support in TOPK_SUPPORTS and args.loss_top_k > vocabulary:
        raise ValueError(
            f"`loss_top_k={args.loss_top_k}` exceeds the vocabulary size ({vocabulary}). Lower `loss_top_k` "
            "(Li et al. find k between 4 and 64 equivalent)."
        )
