"""`ScriptParser`: a `TrlParser` for training scripts with presets, whose `--help` fits on a few screens.

`TrlParser` makes every field of `OPDConfig`, `TrainingArguments` and `ModelConfig` a flag: over a thousand lines of
`--help`, the distillation knobs after seven hundred lines of `TrainingArguments`, and a preset's values printed as
plain defaults next to README tables that give the dataclass's. `ScriptParser` prints, under `--help`, only the
sections the script names (its own options, `OPDConfig`'s knobs, ...) plus every field the preset sets, each preset
value marked as such beside the dataclass default; `--help-all` prints every flag. It also tells which fields a
command line set explicitly (`given`), which `short_run_note` needs to tell a user who cut a preset short what to
expect.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments
from trl import TrlParser


class _FullHelpAction(argparse.Action):
    """`--help-all`: print every flag, then exit (argparse's `-h` does the same with the short help)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self, parser: ScriptParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None
    ) -> None:
        print(parser.format_full_help(), end="")
        parser.exit()


def _is_help(action: argparse.Action) -> bool:
    """Whether `action` is `-h` or `--help-all`."""
    return isinstance(action, (argparse._HelpAction, _FullHelpAction))


class ScriptParser(TrlParser):
    """A `TrlParser` whose `--help` shows `sections` (title → field names) and the preset's fields, `--help-all`
    every flag.

    Abbreviated flags are refused (`allow_abbrev=False`): among a thousand flags a prefix silently picks one, and
    `given` must know exactly which fields a command line sets.
    """

    def __init__(self, dataclass_types: Iterable[type], sections: Mapping[str, Sequence[str]], **kwargs: Any) -> None:
        kwargs.setdefault("usage", "%(prog)s [--config FILE.yaml] [--FIELD VALUE ...]")
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)
        self.sections = {title: list(names) for title, names in sections.items()}
        self.preset: tuple[str, list[str]] | None = None
        self.add_argument("--help-all", "--help_all", action=_FullHelpAction, help="Show every flag and exit.")
        for action in self._actions:
            if isinstance(action, argparse._HelpAction):
                action.help = "Show the flags below and exit."

    def _primary_actions(self) -> dict[str, argparse.Action]:
        """The first action of each destination: `--x`, not its `--no_x` complement."""
        actions: dict[str, argparse.Action] = {}
        for action in self._actions:
            actions.setdefault(action.dest, action)
        return actions

    def apply_preset(self, name: str, values: Mapping[str, Any]) -> None:
        """Make `values` the defaults, each flag's help giving the preset's value and the dataclass's beside it."""
        owners = {field.name: dtype.__name__ for dtype in self.dataclass_types for field in dataclasses.fields(dtype)}
        actions = self._primary_actions()
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise ValueError(f"Preset {name!r} sets {unknown}, which are not fields of this script's parser.")
        for key in values:
            action = actions[key]
            original = str(action.default).replace("%", "%%")
            note = f"(default: %(default)s, from preset {name}; {owners.get(key, 'the')} default: {original})"
            action.help = f"{action.help} {note}" if action.help else note
        self.set_defaults(**values)
        self.preset = (name, list(values))

    def given(self, argv: Sequence[str]) -> set[str]:
        """The fields `argv` sets itself, on the command line or in its `--config` file (not by default or preset)."""
        actions = self._option_string_actions
        names = {actions[token.split("=", 1)[0]].dest for token in argv if token.split("=", 1)[0] in actions}
        if "--config" in argv:
            config = yaml.safe_load(Path(argv[list(argv).index("--config") + 1]).read_text()) or {}
            names |= set(config) - {"env"}
        return names

    def format_help(self) -> str:
        """The short help: usage, description, the script's sections, the preset's fields, how to see every flag."""
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        formatter.add_text(self.description)
        formatter.start_section("help")
        formatter.add_arguments([action for action in self._actions if _is_help(action)])
        formatter.end_section()
        actions = {name: action for name, action in self._primary_actions().items() if not _is_help(action)}
        sections = dict(self.sections)
        if self.preset is not None:
            sections[f"set by preset {self.preset[0]}"] = self.preset[1]
        shown: set[str] = set()
        for title, names in sections.items():
            new = [name for name in names if name in actions and name not in shown]
            shown.update(new)
            formatter.start_section(title)
            formatter.add_arguments([self._short(actions[name]) for name in new])
            formatter.end_section()
        classes = ", ".join(dtype.__name__ for dtype in self.dataclass_types)
        formatter.add_text(
            f"Every field of {classes} is a flag: --help-all lists all {len(actions)} of them. Flags can also "
            "go in a YAML file passed with --config."
        )
        return formatter.format_help()

    def format_full_help(self) -> str:
        """argparse's help: every flag, in the order of the dataclasses."""
        return super().format_help()

    @staticmethod
    def _short(action: argparse.Action) -> argparse.Action:
        """`action` under its first flag only (`--loss_top_k`, not also `--loss-top-k`)."""
        short = copy.copy(action)
        short.option_strings = action.option_strings[:1]
        return short


def short_run_note(name: str, preset: Mapping[str, Any], args: TrainingArguments, given: set[str]) -> str | None:
    """What to tell a user whose `max_steps` cuts a preset's schedule short, or None.

    A preset's learning rate and schedule are tuned for its `max_steps`. Cut short, a run stops in the phase where
    that learning rate has moved the student away from where it started without yet bringing it near the teacher,
    and can end worse than it began. Scaling the learning rate down by the share of steps does not fix that: the
    short run then barely moves, and a medium one loses most of its gain (measured on the toy preset, see
    docs/quickstart.md). So the run keeps the preset's learning rate (its warmup, given as a share of the run,
    `warmup_steps` < 1, scales by itself) and the note says what to expect and what to change. A learning rate the
    command line sets (`given`, see `ScriptParser.given`) means the user has chosen: no note.
    """
    tuned = preset.get("max_steps")
    if tuned is None or "learning_rate" in given or not 0 < args.max_steps < tuned:
        return None
    return (
        f"preset {name}: its learning_rate {args.learning_rate:g} and schedule are tuned for {tuned} steps; cut to "
        f"{args.max_steps}, the student may end worse than it started. Give it more --max_steps, or a smaller "
        "--learning_rate to change it less."
    )
