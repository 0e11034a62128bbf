"""`OPDConfig`: TRL's `DistillationConfig` plus the two independent axes of on-policy distillation.

Axis 1, the prefix source (who writes the completions the loss is computed on), and axis 2, the token-level
divergence and its support (how the student's and teacher's next-token distributions are compared there).
See `docs/concepts.md` for every objective and its source.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from trl import DistillationConfig

PREFIX_SOURCES = ("student", "teacher", "dataset", "mixed")
OFF_POLICY_SOURCES = ("dataset", "teacher")
KL_DIRECTIONS = ("forward", "reverse", "jsd", "mixed")
LOSS_SUPPORTS = ("full", "teacher_topk", "student_topk", "union_topk", "sampled_token")
TOPK_SUPPORTS = ("teacher_topk", "student_topk", "union_topk")
NONFINITE_POLICIES = ("stop", "skip")
DEFAULT_BETA = 1.0  # `DistillationConfig.beta`'s default
# transformers 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` and warns whenever only the old name
# is set, which TRL 1.16's default (`gradient_checkpointing=True`) always did: every config warned although nobody had
# asked for anything. OPDConfig leaves the old name unset and turns checkpointing on under the name this transformers
# reads; a value the user passes under either name still goes through transformers (with its warning for the old one).
CHECKPOINTING_FIELD = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in fields(DistillationConfig)}
    else "gradient_checkpointing"
)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}. It is a probability/weight: clip it yourself.")


def check_sampled_token_pairing(kl_direction: str, prefix_source: str) -> None:
    """Reject sampled-token estimators whose sampled token does not come from the distribution they assume.

    The reverse estimator E_{y~q_θ}[(log q_θ − log p_T)(y) ∇log q_θ(y)] needs y sampled by the student; the forward
    one E_{y~p_T}[−∇log q_θ(y)] needs y sampled by the teacher (or the dataset standing in for it). Anything else is a
    biased estimator of neither divergence (docs/concepts.md).
    """
    if kl_direction not in ("forward", "reverse"):
        raise ValueError(
            f"`loss_support='sampled_token'` estimates a single KL from the sampled token; it is defined for "
            f"`kl_direction` 'reverse' (student prefixes) or 'forward' (teacher/dataset prefixes), not "
            f"{kl_direction!r}. Use a top-k or 'full' support for 'jsd' and 'mixed'."
        )
    if kl_direction == "reverse" and prefix_source != "student":
        raise ValueError(
            f"`loss_support='sampled_token'` with `kl_direction='reverse'` needs tokens sampled by the student, but "
            f"`prefix_source={prefix_source!r}`. Set `prefix_source='student'`, or use `kl_direction='forward'` on "
            "teacher/dataset prefixes, or a top-k/'full' support."
        )
    if kl_direction == "forward" and prefix_source not in ("teacher", "dataset"):
        raise ValueError(
            f"`loss_support='sampled_token'` with `kl_direction='forward'` needs tokens written by the teacher (or "
            f"the dataset), but `prefix_source={prefix_source!r}`. Set `prefix_source` to 'teacher' or 'dataset', "
            "or use `kl_direction='reverse'` on student prefixes."
        )


@dataclass
class OPDConfig(DistillationConfig):
    r"""
    Configuration for [`OPDTrainer`]: everything of [`trl.DistillationConfig`] plus the prefix source and the
    token-level divergence as independent knobs.

    The four classic objectives (docs/concepts.md, arXiv 2605.16826):

    | `prefix_source` \ `kl_direction` | `"forward"` KL(p_T‖q_θ) | `"reverse"` KL(q_θ‖p_T) |
    |---|---|---|
    | `"teacher"` / `"dataset"` | SFT on teacher soft targets | offline-RL-style distillation |
    | `"student"` | DAgger-style on-policy SFT | on-policy distillation (OPD) |

    TRL's `beta` is used only with `kl_direction="jsd"` (generalized JSD, GKD); `temperature` is the student's
    sampling and loss temperature, `teacher_temperature` the teacher's.
    """

    restore_callback_states_from_checkpoint: bool = field(
        default=True,
        metadata={
            "help": "Restore the state of stateful callbacks (schedules, curriculum, EffOPD) on resume. Defaults to "
            "True, unlike `TrainingArguments`: a resumed run must not restart its schedules."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Trade compute for memory by recomputing activations in the backward pass. None: on, as in TRL, "
            "set as `activation_checkpointing` where transformers has that name (5.23 on; this one is then its "
            "deprecated alias)."
        },
    )
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={
            "help": "Pin the batches in page-locked memory for faster copies to the accelerator. None: only when "
            "there is one (on a CPU there is nothing to copy to, and torch warns that pinning is ignored)."
        },
    )
    prefix_source: str = field(
        default="student",
        metadata={
            "help": "Who writes the completions the loss is computed on: 'student' (on-policy samples), 'teacher' "
            "(teacher samples, same generation settings at `teacher_temperature`), 'dataset' (the dataset's "
            "`completion` column) or 'mixed' (per generation batch: student with probability "
            "`student_prefix_fraction`, else `off_policy_source`).",
            "choices": list(PREFIX_SOURCES),
        },
    )
    off_policy_source: str = field(
        default="dataset",
        metadata={
            "help": "What `prefix_source='mixed'` mixes with student samples: 'dataset' or 'teacher'.",
            "choices": list(OFF_POLICY_SOURCES),
        },
    )
    student_prefix_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Probability in [0, 1] that a generation batch uses student prefixes under "
            "`prefix_source='mixed'` (GKD's lambda). Drawn once per generation batch, identically on every rank, "
            "from a generator seeded by (`seed`, step) so a resumed run draws the same sources."
        },
    )
    kl_direction: str = field(
        default="reverse",
        metadata={
            "help": "Token-level divergence: 'forward' KL(p_T||q), 'reverse' KL(q||p_T), 'jsd' (TRL's generalized "
            "JSD with `beta`) or 'mixed' (`forward_kl_weight`*forward + (1-`forward_kl_weight`)*reverse).",
            "choices": list(KL_DIRECTIONS),
        },
    )
    forward_kl_weight: float = field(
        default=0.5,
        metadata={"help": "Forward-KL share w in [0, 1] under `kl_direction='mixed'`: w*FKL + (1-w)*RKL per token."},
    )
    loss_support: str = field(
        default="full",
        metadata={
            "help": "Where the divergence is evaluated: 'full' vocabulary (TRL's chunked kernel), the top-k set of "
            "the teacher ('teacher_topk'), of the student ('student_topk') or their union ('union_topk') with both "
            "distributions renormalised on it, or only the sampled token ('sampled_token', the log-ratio estimator).",
            "choices": list(LOSS_SUPPORTS),
        },
    )
    loss_top_k: int = field(
        default=32,
        metadata={"help": "k of the top-k supports (Fu et al. use 32 for the teacher, Li et al. 16 for the student)."},
    )
    loss_add_tail: bool = field(
        default=False,
        metadata={
            "help": "Top-k supports only: instead of renormalising, add one bucket holding each distribution's mass "
            "outside the support, so a truncated KL stays a true KL (never negative)."
        },
    )
    teacher_temperature: float | None = field(
        default=None,
        metadata={
            "help": "Teacher softmax temperature for the loss and for teacher sampling. None: same as `temperature`."
        },
    )
    mask_special_tokens: bool = field(
        default=True,
        metadata={
            "help": "Exclude completion positions whose target token is a special/template token (end-of-turn "
            "markers other than the EOS that ends the answer, think tags, ...) from the loss (Fu et al.)."
        },
    )
    mask_eos: bool = field(
        default=False,
        metadata={
            "help": "With `mask_special_tokens`, also exclude the EOS that ends the answer. Off by default: the "
            "student must still learn when to stop."
        },
    )
    nonfinite_policy: str = field(
        default="stop",
        metadata={
            "help": "What to do when the teacher's or student's hidden states, or the loss, are NaN/inf on any rank "
            "(decided collectively): 'stop' raises on every rank, naming the step, micro-batch and ranks; 'skip' "
            "warns and every rank takes a zero loss for that micro-batch.",
            "choices": list(NONFINITE_POLICIES),
        },
    )

    teacher_column: str = field(
        default="teacher",
        metadata={
            "help": "Several teachers (`teacher_model` a dict {name: model | id/path | URL}) only: the dataset column "
            "in which each row names its teacher. Rows of one batch may name different teachers."
        },
    )
    teacher_request_timeout: float = field(
        default=60.0,
        metadata={
            "help": "Served teacher (`teacher_model` given as an http(s) URL) only: seconds to wait for each scoring "
            "request before retrying. The API key comes from the environment (`OPD_TEACHER_API_KEY`, else "
            "`VLLM_API_KEY`), never from the config, so it is not saved in checkpoints or reports."
        },
    )
    teacher_max_retries: int = field(
        default=3,
        metadata={
            "help": "Served teacher only: retries of a request that timed out, could not connect or got a 5xx, with "
            "exponential backoff; then training stops with an error naming the URL (the last checkpoint resumes)."
        },
    )
    diagnostics_top_k: int = field(
        default=16,
        metadata={"help": "k of the top-k overlap diagnostics (`opd/overlap_ratio`, `opd/overlap_mass_*`)."},
    )
    diagnostics_max_positions: int = field(
        default=256,
        metadata={
            "help": "Token diagnostics (overlap, entropies, log-ratio) use at most this many loss positions, once per "
            "logging step. 0 turns them off (completion-level rates are always logged)."
        },
    )
    diagnostics_gradient_coherence: bool = field(
        default=False,
        metadata={
            "help": "Also log `opd/gradient_coherence`: ‖Σ_t G_t‖ / Σ_t ‖G_t‖ over per-position loss gradients w.r.t. "
            "the lm_head on up to 64 of the diagnostic positions. Costs one extra (64, V) projection with gradient "
            "per logging step; off by default."
        },
    )
    repetition_tail_chars: int | None = field(
        default=None,
        metadata={
            "help": "RepRate looks at the last this-many characters of each completion (Luo et al. use 10,000). "
            "None: 4 characters per token of `max_completion_length`, at most 10,000."
        },
    )
    repetition_threshold: float | None = field(
        default=None,
        metadata={
            "help": "A completion tail is repetitive when its zlib compression ratio exceeds this. None: Luo et al.'s "
            "10 at 10,000 characters, scaled linearly to `repetition_tail_chars`, at least 3."
        },
    )
    ref_kl_coef: float = field(
        default=0.0,
        metadata={
            "help": "Stable-OPD (Luo et al.): add ref_kl_coef * KL(q_θ || q_ref) per token, q_ref the initial student "
            "(with PEFT: the base model with the adapter disabled, no second copy). 0 turns it off."
        },
    )
    gold_sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Stable-OPD (Luo et al.): add gold_sft_weight * NLL of the dataset's `completion` (gold "
            "solutions) given the prompt. Needs a `completion` column. 0 turns it off."
        },
    )
    eopd_coef: float = field(
        default=0.0,
        metadata={
            "help": "EOPD (Jin et al., arXiv 2603.07079): add eopd_coef * 1[H(p_T) > eopd_entropy_threshold] * "
            "forward KL on the teacher's top-`loss_top_k` support, per token. 0 turns it off."
        },
    )
    eopd_entropy_threshold: float = field(
        default=1.0,
        metadata={
            "help": "Teacher entropy (nats) above which EOPD's forward-KL term applies. Not published: start near "
            "the median of the logged `opd/teacher_entropy`."
        },
    )

    def __post_init__(self) -> None:
        if self.gradient_checkpointing is None and getattr(self, CHECKPOINTING_FIELD) is None:
            setattr(self, CHECKPOINTING_FIELD, True)
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.accelerator.is_available()
        super().__post_init__()
        _check_choice("prefix_source", self.prefix_source, PREFIX_SOURCES)
        _check_choice("off_policy_source", self.off_policy_source, OFF_POLICY_SOURCES)
        _check_choice("kl_direction", self.kl_direction, KL_DIRECTIONS)
        _check_choice("loss_support", self.loss_support, LOSS_SUPPORTS)
        _check_choice("nonfinite_policy", self.nonfinite_policy, NONFINITE_POLICIES)
        _check_unit_interval("student_prefix_fraction", self.student_prefix_fraction)
        _check_unit_interval("forward_kl_weight", self.forward_kl_weight)
        if isinstance(self.loss_top_k, bool) or not isinstance(self.loss_top_k, int) or self.loss_top_k < 1:
            raise ValueError(f"`loss_top_k` must be an integer >= 1, got {self.loss_top_k!r}.")
        minimums = {
            "diagnostics_top_k": 1,
            "diagnostics_max_positions": 0,
            "repetition_tail_chars": 1,
            "teacher_max_retries": 0,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        for name in ("ref_kl_coef", "gold_sft_weight", "eopd_coef", "eopd_entropy_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0 (0 turns it off), got {getattr(self, name)}.")
        if self.teacher_request_timeout <= 0:
            raise ValueError(f"`teacher_request_timeout` must be > 0 seconds, got {self.teacher_request_timeout}.")
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if self.teacher_temperature is not None and self.teacher_temperature <= 0:
            raise ValueError(
                f"`teacher_temperature` must be > 0 (or None to reuse `temperature`), got {self.teacher_temperature}."
            )
        if self.kl_direction != "jsd" and self.beta != DEFAULT_BETA:
            raise ValueError(
                f"`beta={self.beta}` only applies to `kl_direction='jsd'`, but `kl_direction={self.kl_direction!r}`. "
                "Set `kl_direction='jsd'` to use the generalized JSD, or leave `beta` at its default."
            )
        if self.loss_add_tail and self.loss_support not in TOPK_SUPPORTS:
            raise ValueError(
                f"`loss_add_tail=True` adds an outside-the-support bucket to a top-k support, but `loss_support="
                f"{self.loss_support!r}`. Use one of {list(TOPK_SUPPORTS)} or set `loss_add_tail=False`."
            )
        if self.loss_support == "sampled_token":
            check_sampled_token_pairing(self.kl_direction, self.prefix_source)
        if self.prefix_source in ("teacher", "dataset") and self.use_vllm:
            raise ValueError(
                f"`use_vllm=True` generates with the student, but `prefix_source={self.prefix_source!r}` never "
                "samples from the student. Set `use_vllm=False`, or use `prefix_source='student'`/'mixed'."
            )

    @property
    def resolved_repetition_tail_chars(self) -> int:
        """`repetition_tail_chars`, or 4 characters per completion token capped at Luo et al.'s 10,000."""
        if self.repetition_tail_chars is not None:
            return self.repetition_tail_chars
        return min(10_000, 4 * (self.max_completion_length or 2_500))

    @property
    def uses_dataset_prefixes(self) -> bool:
        """True when some generation batches take the dataset's `completion` column as their prefixes."""
        return self.prefix_source == "dataset" or (
            self.prefix_source == "mixed" and self.off_policy_source == "dataset"
        )

    @property
    def uses_teacher_prefixes(self) -> bool:
        """True when some generation batches are written by the teacher."""
        return self.prefix_source == "teacher" or (
            self.prefix_source == "mixed" and self.off_policy_source == "teacher"
        )

    @property
    def resolved_teacher_temperature(self) -> float:
        """The teacher's softmax temperature: `teacher_temperature`, or `temperature` when unset."""
        return self.temperature if self.teacher_temperature is None else self.teacher_temperature

    @property
    def objective_name(self) -> str:
        """The objective in a few path-safe words, e.g. 'student-mixed-fkl0.8' or 'mixed0.5-dataset-jsd-beta0.5'.

        Prefix source, divergence, support and the added terms, each with the values that set it apart, so that two
        objectives never share a name: scripts use it as a run directory under a common root.
        """
        prefixes = self.prefix_source
        if prefixes == "mixed":
            prefixes = f"mixed{self.student_prefix_fraction:g}-{self.off_policy_source}"
        divergence = {
            "mixed": f"mixed-fkl{self.forward_kl_weight:g}",
            "jsd": f"jsd-beta{self.beta:g}",
        }.get(self.kl_direction, self.kl_direction)
        parts = [prefixes, divergence]
        if self.loss_support in TOPK_SUPPORTS:
            parts.append(f"{self.loss_support}{self.loss_top_k}" + ("-tail" if self.loss_add_tail else ""))
        elif self.loss_support != "full":
            parts.append(self.loss_support)
        terms = {"refkl": self.ref_kl_coef, "goldsft": self.gold_sft_weight, "eopd": self.eopd_coef}
        parts += [f"{name}{value:g}" for name, value in terms.items() if value > 0]
        return "-".join(parts)
