"""The embedded toy world: a character-level chat tokenizer, tiny Qwen2 models, toy math data and a trained pair.

Nothing here touches a model hub. The tokenizer is built in-process with the `tokenizers` library and carries a
ChatML chat template (the one Qwen uses), so TRL's conversational code paths run unchanged on it. The data are chained
single-digit additions with a step-by-step solution ("What is 3+5+2?" -> "3+5=8\\n8+2=10\\n#### 10"), enumerated
exhaustively and split into train and eval by a hash of the prompt. `build_toy_pair` trains a teacher that solves the
eval problems and a smaller, clearly weaker student on them, and caches both on disk.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import psutil
import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, THINK_START, THINK_END]
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with ChatML special tokens and chat template (left padding, as TRL expects).

    Vocabulary: the five special tokens, then one id per printable ASCII character; `<|im_end|>` is the EOS that
    ends an assistant turn and `<|endoftext|>` pads.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, THINK_START, THINK_END],
        padding_side="left",
        truncation_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM over `tokenizer`'s vocabulary (float32, untied head)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


MIN_OPERANDS = 2
MAX_OPERANDS = 4
EVAL_BUCKETS = 10  # a problem belongs to the "eval" split iff the hash of its prompt is 0 modulo EVAL_BUCKETS
SPLITS = ("train", "eval")


def solve(digits: Sequence[int]) -> tuple[str, int]:
    """The step-by-step solution of `digits[0]+digits[1]+...` (one `a+b=c` line per partial sum, then the answer line
    `#### <sum>`) and the sum."""
    total = digits[0]
    lines = []
    for digit in digits[1:]:
        lines.append(f"{total}+{digit}={total + digit}")
        total += digit
    lines.append(f"#### {total}")
    return "\n".join(lines), total


def split_of(prompt: str) -> str:
    """The split ("train" or "eval") of a prompt, fixed by a hash of its text so that the splits never overlap."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


@lru_cache(maxsize=len(SPLITS))
def problem_pool(split: str) -> tuple[tuple[str, str, int], ...]:
    """Every problem of `split` as (prompt, solution, answer), in a fixed order: the whole space of chains of
    `MIN_OPERANDS` to `MAX_OPERANDS` digits is enumerated (11,100 problems; about 1,100 of them in "eval")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    pool = []
    for num_operands in range(MIN_OPERANDS, MAX_OPERANDS + 1):
        for digits in itertools.product(range(10), repeat=num_operands):
            prompt = f"What is {'+'.join(map(str, digits))}?"
            if split_of(prompt) == split:
                pool.append((prompt, *solve(digits)))
    return tuple(pool)


def make_dataset(n: int, seed: int = 0, split: str = "train") -> Dataset:
    """`n` distinct problems of `split`, drawn reproducibly with `seed`, as a conversational prompt-completion dataset.

    Columns: `prompt` ([user message]), `completion` ([assistant message holding the step-by-step solution]) and
    `answer` (the sum as a string, for `trl_opd.evaluation`). Raises `ValueError` if the split has fewer than `n`
    problems.
    """
    return draw_dataset(problem_pool(split), n, seed, split)


def draw_dataset(pool: Sequence[tuple[str, str, int]], n: int, seed: int, split: str) -> Dataset:
    """`n` distinct (prompt, solution, answer) problems of `pool` (the `split` of some toy world), drawn reproducibly
    with `seed`, in `make_dataset`'s layout."""
    if not 0 <= n <= len(pool):
        raise ValueError(f"The {split!r} split has {len(pool)} problems; cannot draw {n}.")
    problems = random.Random(seed).sample(pool, n)
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": prompt}] for prompt, _, _ in problems],
            "completion": [[{"role": "assistant", "content": solution}] for _, solution, _ in problems],
            "answer": [str(answer) for _, _, answer in problems],
        }
    )


@lru_cache(maxsize=len(SPLITS))
def encode_pool(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every `split` problem, tokenized for SFT by `encode_solutions` with nothing masked in the solutions. Computed
    once per process (tokenizing the train split takes a few seconds)."""
    return encode_solutions([(prompt, solution, []) for prompt, solution, _ in problem_pool(split)])


def encode_solutions(
    rows: Sequence[tuple[str, str, Sequence[tuple[int, int]]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, solution, masked character spans of the solution) rows in chat format, tokenized by the toy
    tokenizer: right-padded token ids, their lengths, and SFT labels that keep the solution and its closing
    `<|im_end|>` (so that the model learns to stop) and mask the prompt, the padding and the spans (one token per
    character of a solution, so character spans are token spans)."""
    tokenizer = build_tokenizer()
    conversations = [[{"role": "user", "content": prompt}] for prompt, _, _ in rows]
    prompts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    prompt_lengths = tokenizer(prompts, add_special_tokens=False, return_length=True)["length"]
    texts = [prompt + solution + tokenizer.eos_token for prompt, (_, solution, _) in zip(prompts, rows)]
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"].bool()
    keep = attention_mask.clone()
    for row, (length, (_, _, spans)) in enumerate(zip(prompt_lengths, rows)):
        keep[row, :length] = False
        for begin, end in spans:
            keep[row, length + begin : length + end] = False
    return input_ids, attention_mask.sum(dim=1), input_ids.masked_fill(~keep, -100)


def train_sft(
    model: Qwen2ForCausalLM,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    warmup_ratio: float = 0.05,
    progress: bool = True,
    description: str = "toy SFT",
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    until: Callable[[int, Qwen2ForCausalLM], bool] | None = None,
    check_every: int = 50,
) -> tuple[Qwen2ForCausalLM, int]:
    """Train `model` (built over the toy tokenizer) in place on the gold solutions of the train split; return it in
    eval mode with the number of steps taken.

    A plain torch loop (AdamW, linear warm-up then cosine decay to zero, gradient clipping at 1) rather than
    `trl.SFTTrainer`: on two CPU cores the Trainer's per-step overhead is a large share of a 0.1-0.2 s step, and a loop
    that samples batches from its own seeded generator is reproducible run to run on a given machine. `data` replaces
    the gold solutions with other (input ids, lengths, labels) in `encode_pool`'s layout (another world's, say).
    `until(step, model)`, asked every `check_every` steps with the model in eval mode, ends training early when it
    returns True (the schedule stays the one planned for `steps`).
    """
    input_ids, lengths, labels = encode_pool("train") if data is None else data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, int(warmup_ratio * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    bar = tqdm(range(1, steps + 1), desc=description, disable=not progress)
    for step in bar:
        rows = torch.randint(len(input_ids), (batch_size,), generator=generator)
        width = int(lengths[rows].max())
        # Right padding under a causal mask: no real token attends to a pad, so no attention mask is needed (and
        # passing one makes the step several times slower on CPU).
        loss = model(input_ids=input_ids[rows, :width], labels=labels[rows, :width]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if until is not None and step % check_every == 0 and step < steps:
            if until(step, model.eval()):
                return model, step
            model.train()
    return model.eval(), steps


TOY_VERSION = 1  # bump when the data or the training recipe change, so that cached pairs are rebuilt


@dataclass(frozen=True)
class ToyPairConfig:
    """How the toy teacher and student are built; the cache key is a hash of these fields and `TOY_VERSION`.

    Both models share the tokenizer and are trained by SFT on the gold solutions of the train split, each with its own
    size, initialisation and batch-sampling seed, and number of steps. With the defaults the teacher (4 layers) solves
    ~99% of eval problems and the student (2 layers, trained briefly) ~20-25%, both sampled at temperature 1: the
    regime where on-policy distillation visibly helps, whereas from a near-hopeless (~10%) student reverse-KL
    distillation stalls. A smaller student is also cheaper to sample from, which is most of a distillation step.
    """

    teacher_hidden_size: int = 128
    teacher_num_layers: int = 4
    teacher_steps: int = 600
    teacher_seed: int = 0
    student_hidden_size: int = 128
    student_num_layers: int = 2
    student_steps: int = 200
    student_seed: int = 1
    num_heads: int = 4
    batch_size: int = 32
    learning_rate: float = 2e-3

    def training_data(self, role: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the `role` ("teacher" or "student") model is trained on, in `encode_pool`'s layout: here, for both,
        the gold solutions of the train split (another world overrides this)."""
        return encode_pool("train")

    def stop_rule(
        self, role: str, tokenizer: PreTrainedTokenizerFast
    ) -> Callable[[int, Qwen2ForCausalLM], bool] | None:
        """When the `role` model's SFT may end before its planned steps (`train_sft`'s `until`): here, never."""
        return None

    def key(self) -> str:
        """A short hash of the settings (and of `TOY_VERSION`) that names the pair's cache folder."""
        settings = json.dumps({**asdict(self), "toy_version": TOY_VERSION}, sort_keys=True)
        return hashlib.sha256(settings.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """`$TRL_OPD_CACHE/toy`, where `TRL_OPD_CACHE` (trl_opd's cache root) defaults to `~/.cache/trl_opd`."""
    return Path(os.environ.get("TRL_OPD_CACHE", Path.home() / ".cache" / "trl_opd")) / "toy"


def _train(
    tokenizer: PreTrainedTokenizerFast, config: ToyPairConfig, role: str, progress: bool
) -> tuple[Qwen2ForCausalLM, int]:
    """Initialise and SFT-train the `role` ("teacher" or "student") model of `config`; return it with its steps."""
    settings = {name: getattr(config, f"{role}_{name}") for name in ("hidden_size", "num_layers", "steps", "seed")}
    model = build_model(
        tokenizer,
        hidden_size=settings["hidden_size"],
        num_layers=settings["num_layers"],
        num_heads=config.num_heads,
        seed=settings["seed"],
    )
    return train_sft(
        model,
        steps=settings["steps"],
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=settings["seed"],
        progress=progress,
        description=f"toy {role} SFT",
        data=config.training_data(role),
        until=config.stop_rule(role, tokenizer),
    )


def build_toy_pair(
    cache_dir: str | os.PathLike | None = None, config: ToyPairConfig | None = None, *, progress: bool = True
) -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """The toy (teacher, student, tokenizer): trained on first use (under 3 minutes on two CPU cores), then loaded.

    The pair lives in `cache_dir/<config.key()>/{teacher,student}` in `save_pretrained` format, with the settings, the
    steps each model took (`<role>_steps_taken`, fewer than planned when `config.stop_rule` ended one early) and the
    build time in `settings.json`; `cache_dir` defaults to `default_cache_dir()`. Changed settings get a new key,
    hence a new build. A build writes into a hidden temporary folder renamed into place at the end, so a half-written
    pair is never loaded and concurrent builders (e.g. launched processes) end up sharing one complete copy. Both are
    returned in eval mode, in float32, on the CPU.
    """
    config = config or ToyPairConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = root / config.key()
    tokenizer = build_tokenizer()
    if not (directory / "settings.json").exists():
        logger.info("Building the toy teacher/student pair into %s (only once for these settings).", directory)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=root))
        threads = torch.get_num_threads()
        # One process builds while any others wait (`accelerate launch` also pins each process to one thread).
        torch.set_num_threads(max(threads, psutil.cpu_count(logical=False) or 1))
        try:
            steps_taken = {}
            for role in ("teacher", "student"):
                model, steps_taken[f"{role}_steps_taken"] = _train(tokenizer, config, role, progress)
                model.save_pretrained(staging / role)
            settings = {
                **asdict(config),
                **steps_taken,
                "toy_version": TOY_VERSION,
                "build_seconds": time.perf_counter() - start,
            }
            (staging / "settings.json").write_text(json.dumps(settings, indent=2))
            try:
                staging.rename(directory)
            except OSError:  # another process completed the same build first
                if not (directory / "settings.json").exists():
                    raise
        finally:
            torch.set_num_threads(threads)
            shutil.rmtree(staging, ignore_errors=True)
    teacher = Qwen2ForCausalLM.from_pretrained(directory / "teacher")
    student = Qwen2ForCausalLM.from_pretrained(directory / "student")
    return teacher.eval(), student.eval(), tokenizer
