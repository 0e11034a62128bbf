"""Which checkpoint a resume may trust.

`transformers.Trainer` writes a checkpoint in place — weights, optimizer, RNG states, and `trainer_state.json` last —
so a run killed while saving leaves a `checkpoint-N` directory that `get_last_checkpoint` would pick although it
cannot be resumed from. A checkpoint counts as complete when its `trainer_state.json` parses and names step N.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def is_complete_checkpoint(path: str | Path) -> bool:
    """True if `path` is a `checkpoint-N` directory whose `trainer_state.json` is whole and at step N."""
    path = Path(path)
    match = CHECKPOINT_PATTERN.match(path.name)
    if match is None or not path.is_dir():
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("global_step") == int(match.group(1))


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint under `output_dir`, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    complete = [path for path in output_dir.iterdir() if is_complete_checkpoint(path)]
    return max(complete, key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)), default=None)


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str | Path) -> str | None:
    """Map `Trainer.train(resume_from_checkpoint=...)` to a complete checkpoint, or fail naming one that is.

    `True` means the newest complete checkpoint in `output_dir` (not merely the newest directory); a path must point
    to a complete checkpoint.
    """
    if resume_from_checkpoint in (None, False):
        return None
    last = last_complete_checkpoint(output_dir)
    if resume_from_checkpoint is True:
        if last is None:
            raise ValueError(
                f"`resume_from_checkpoint=True` but `{output_dir}` holds no complete checkpoint (a `checkpoint-N` "
                "directory with a whole `trainer_state.json`). Start without resuming, or pass a checkpoint path."
            )
        return str(last)
    if not is_complete_checkpoint(resume_from_checkpoint):
        hint = f"The newest complete one is `{last}`." if last else "No complete checkpoint exists there."
        raise ValueError(
            f"`{resume_from_checkpoint}` is not a complete checkpoint (missing or unreadable `trainer_state.json`, "
            f"e.g. a save interrupted by a crash). {hint}"
        )
    return str(resume_from_checkpoint)
