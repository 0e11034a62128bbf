"""The cells of the distributed test matrix: named feature bundles, and which backend runs which in CI.

A cell is one prefix source × one loss support × a few extras (stabilisers, diagnostics, callbacks, gradient
accumulation). The catalogue has one cell per (backend, support) slot of a 4 × 5 latin square: the prefix of slot
(i, j) is `PREFIXES[(i + j) % 4]`, so the 20 cells cover every valid (prefix, support) pair, and each backend's row of
5 cells covers every prefix, every support and (placed greedily) every extra. Every row also ends with
`SERVED_CELL`: the teacher served over HTTP by one loopback `trl-opd serve-teacher` server that the harness starts
and both ranks share, each scoring its own rows, and `ROUTED_CELL`: two local teachers routed per row, writing the
prefixes of their own rows (every rank takes part in every teacher's generation and forward). CI runs each backend
on its own row; a release (`scripts/distributed_matrix.py`) runs every backend on every cell, the full cross
product.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

BACKENDS = ("ddp", "zero2", "zero3", "fsdp2")
PREFIXES = ("student", "teacher", "dataset", "mixed")
SUPPORTS = ("full", "teacher_topk", "student_topk", "union_topk", "sampled_token")
TOPK = ("teacher_topk", "student_topk", "union_topk")
DIRECTIONS = ("forward", "reverse", "jsd", "mixed")
# Extras, each placed in at least one cell of every backend's CI row. Token diagnostics are on in every cell
# (`diagnostics_max_positions` > 0 and `logging_steps=1`), so they need no slot of their own.
EXTRAS = (  # in the order they are placed: the most constrained first
    "tail",  # loss_add_tail on a top-k support
    "unbounded",  # max_completion_length=None, on dataset prefixes (generation would run to the context length)
    "ref_kl",  # ref_kl_coef > 0 (a frozen copy of the initial student)
    "gold_sft",  # gold_sft_weight > 0
    "eopd",  # eopd_coef > 0
    "skip",  # nonfinite_policy="skip" (no fault injected: must train exactly like "stop")
    "coherence",  # diagnostics_gradient_coherence
    "schedule",  # ScheduleCallback on the knob the cell reads
    "curriculum",  # EntropyGatedLengthCurriculum climbing [4, 8] after step 1
    "grad_accum",  # gradient_accumulation_steps=2 with half the per-device batch
)
FEATURES = (
    *(f"prefix:{p}" for p in PREFIXES),
    *(f"support:{s}" for s in SUPPORTS),
    *EXTRAS,
    "diagnostics",
    "teacher:served",
    "teacher:routed",
)
GLOBAL_BATCH = 4  # completions per optimizer step, whatever the number of processes
MAX_STEPS = 3
SEED = 4  # under "mixed" (fraction 0.5), steps 0, 1, 2 draw student, off-policy, off-policy


@dataclass(frozen=True)
class Cell:
    """One feature bundle: a prefix source, a support, a KL direction and a set of extras."""

    prefix: str
    support: str
    direction: str
    extras: frozenset[str] = field(default_factory=frozenset)  # EXTRAS other than "grad_accum"
    accumulation: int = 1  # gradient_accumulation_steps ("grad_accum" when > 1)
    fault: str | None = None  # "nan_teacher": the teacher's final norm returns NaN on FAULT_RANK at FAULT_STEP
    served: bool = False  # the teacher is the harness's loopback server (`run_matrix.py --teacher_url`)
    routed: bool = False  # two local teachers, each row naming its own (`run_matrix.ROUTED_TEACHERS`)

    @property
    def name(self) -> str:
        extras = [extra for extra in EXTRAS if extra in self.extras]
        accumulation = [f"ga{self.accumulation}"] if self.accumulation > 1 else []
        return "+".join(
            [
                f"{self.prefix}-{self.support}-{self.direction}",
                *extras,
                *accumulation,
                *filter(None, [self.fault]),
                *["served"] * self.served,
                *["routed"] * self.routed,
            ]
        )

    @property
    def features(self) -> set[str]:
        grad_accum = {"grad_accum"} if self.accumulation > 1 else set()
        teachers = {"teacher:served"} if self.served else set()
        teachers |= {"teacher:routed"} if self.routed else set()
        return {
            f"prefix:{self.prefix}",
            f"support:{self.support}",
            *self.extras,
            *grad_accum,
            "diagnostics",
            *teachers,
        }

    def overrides(self, num_processes: int) -> dict[str, Any]:
        """`OPDConfig` keyword arguments: the same global batch of `GLOBAL_BATCH` rows for any process count."""
        per_device = GLOBAL_BATCH // (num_processes * self.accumulation)
        if per_device * num_processes * self.accumulation != GLOBAL_BATCH:
            raise ValueError(f"{GLOBAL_BATCH} rows do not split over {num_processes} processes × {self.accumulation}.")
        settings: dict[str, Any] = {
            "prefix_source": self.prefix,
            "off_policy_source": "teacher" if "gold_sft" in self.extras else "dataset",  # both occur under "mixed"
            "student_prefix_fraction": 0.5,
            "loss_support": self.support,
            "loss_top_k": 8,
            "kl_direction": self.direction,
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": self.accumulation,
        }
        if "tail" in self.extras:
            settings["loss_add_tail"] = True
        if "unbounded" in self.extras:
            settings["max_completion_length"] = None
        if "ref_kl" in self.extras:
            settings["ref_kl_coef"] = 0.5
        if "gold_sft" in self.extras:
            settings["gold_sft_weight"] = 0.01  # NLL ≈ 4.6 against a KL ≈ 0.02: neither term drowns the other
        if "eopd" in self.extras:
            settings["eopd_coef"] = 0.5
            settings["eopd_entropy_threshold"] = 0.0  # the gate is open on every token of an untrained teacher
        if "skip" in self.extras:
            settings["nonfinite_policy"] = "skip"
        if "coherence" in self.extras:
            settings["diagnostics_gradient_coherence"] = True
        return settings

    def schedule(self) -> tuple[str, float, float]:
        """(knob, start, end) of the cell's `ScheduleCallback`: a knob the cell's settings actually read."""
        if self.support in TOPK:
            return "loss_top_k", 8, 4
        if self.direction == "mixed":
            return "forward_kl_weight", 0.8, 0.2
        if self.prefix == "mixed":
            return "student_prefix_fraction", 1.0, 0.0
        if self.direction == "jsd":
            return "beta", 0.9, 0.1
        return "temperature", 1.0, 0.7


def _direction(prefix: str, support: str, index: int) -> str:
    """The KL direction of a slot: sampled-token estimators fix it (reverse on student prefixes, forward on
    teacher/dataset ones); the other supports rotate through all four."""
    if support == "sampled_token":
        return "reverse" if prefix == "student" else "forward"
    return DIRECTIONS[index % len(DIRECTIONS)]


def _admissible(extra: str, prefix: str, support: str, direction: str, extras: set[str]) -> bool:
    """Whether `extra` can join a slot: a tail needs a top-k support; an unbounded length needs dataset prefixes and
    excludes the curriculum (which sets the length)."""
    if extra == "tail":
        return support in TOPK
    if extra == "unbounded":
        return prefix == "dataset" and "curriculum" not in extras
    return extra != "curriculum" or "unbounded" not in extras


def _row(backend_index: int) -> list[Cell]:
    """Backend `i`'s CI row: slot j has support j and prefix (i + j) mod 4; extras go greedily to the admissible
    slot with the fewest extras so far (ties broken in a backend-dependent order)."""
    slots = []
    for j, support in enumerate(SUPPORTS):
        prefix = PREFIXES[(backend_index + j) % len(PREFIXES)]
        if support == "sampled_token" and prefix == "mixed":  # no sampled-token estimator for mixed prefixes
            prefix = "student"
        slots.append([prefix, support, _direction(prefix, support, j + 2 * backend_index), set()])
    order = [(backend_index + j) % len(slots) for j in range(len(slots))]
    for extra in EXTRAS:
        admissible = [j for j in order if _admissible(extra, *slots[j])]
        target = min(admissible, key=lambda j: (len(slots[j][3]), admissible.index(j)))
        slots[target][3].add(extra)
    return [
        Cell(prefix, support, direction, frozenset(extras - {"grad_accum"}), 2 if "grad_accum" in extras else 1)
        for prefix, support, direction, extras in slots
    ]


# The served teacher: on-policy (student prefixes) with the top-k a server gives, both KL directions.
SERVED_CELL = Cell("student", "teacher_topk", "mixed", served=True)
# Several teachers: teacher prefixes written per row's teacher, on the whole vocabulary.
ROUTED_CELL = Cell("teacher", "full", "forward", routed=True)
CI_CELLS: dict[str, list[Cell]] = {backend: [*_row(i), SERVED_CELL, ROUTED_CELL] for i, backend in enumerate(BACKENDS)}
CELLS: dict[str, Cell] = {cell.name: cell for row in CI_CELLS.values() for cell in row}
# The NaN-on-one-rank fault under each `nonfinite_policy`, on dataset prefixes (no generation: only the loss's teacher
# forward runs the hooked norm).
FAULT_CELLS: dict[str, Cell] = {
    "skip": Cell("dataset", "full", "reverse", frozenset({"skip"}), fault="nan_teacher"),
    "stop": Cell("dataset", "full", "reverse", fault="nan_teacher"),
}
FAULT_STEP, FAULT_RANK = 1, 1
# Gradient accumulation k with batch GLOBAL_BATCH/k against accumulation 1 with batch GLOBAL_BATCH, single process:
# dataset prefixes (completions of different lengths, so micro-batches hold different token counts) with the gold-SFT
# term (its own normaliser), and teacher prefixes with a top-k support, EOPD and the reference KL.
ACCUMULATION_BASES = (
    Cell("dataset", "full", "forward", frozenset({"gold_sft"})),
    Cell("teacher", "union_topk", "reverse", frozenset({"tail", "eopd", "ref_kl"})),
)
ACCUMULATION_STEPS = (2, 4)
ACCUMULATION_CELLS: dict[str, Cell] = {
    cell.name: cell
    for base in ACCUMULATION_BASES
    for cell in (base, *(replace(base, accumulation=k) for k in ACCUMULATION_STEPS))
}


def lookup(name: str) -> Cell:
    """A cell of the catalogue, of the fault tests or of the accumulation test, by name."""
    for cells in (CELLS, ACCUMULATION_CELLS, {cell.name: cell for cell in FAULT_CELLS.values()}):
        if name in cells:
            return cells[name]
    raise KeyError(f"Unknown cell {name!r}; known: {sorted(CELLS)}.")


def uncovered(backend: str, cells: list[Cell] | None = None) -> set[str]:
    """The features no cell of `backend`'s CI row exercises (empty by construction)."""
    cells = CI_CELLS[backend] if cells is None else cells
    return set(FEATURES) - set().union(*(cell.features for cell in cells))
