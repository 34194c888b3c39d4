"""`dtml train`: its options are built from TrainConfig's fields (training/config.py: OPTION_HELP), so
each default, type and choice has one home: the dataclass."""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from dtml_deploy.cli.common import choices, echo_err, fail, user_errors
from dtml_deploy.config import NORMS
from dtml_training.config import OPTION_HELP, TrainConfig
from dtml_training.losses import ConsistencyConfig
from dtml_training.recipes import RECIPES
from dtml_training.recipes import recipe as make_recipe

RecipeName = choices("RecipeName", tuple(RECIPES))
_CHOICES = {"norm": NORMS}  # str fields whose values are a tuple of the core rather than a Literal


def core_default(name: str) -> Any:
    """The default of the TrainConfig (or ConsistencyConfig) field an option sets."""
    for cls in (TrainConfig, ConsistencyConfig):
        for f in fields(cls):
            if f.name == name:
                return f.default
    raise KeyError(name)


def _option_type(name: str, hint: Any) -> Any:
    """The option's type: the field's, without None; Literal fields and NORMS become choices."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        return choices(f"{name.title()}Choice", typing.get_args(hint))
    if name in _CHOICES:
        return choices(f"{name.title()}Choice", _CHOICES[name])
    return hint


def _shown_default(name: str) -> str | bool:
    """What --help shows: the field's default, marked where recipes set their own (None: nothing, the help
    says what None means)."""
    default = core_default(name)
    if default is None:
        return False
    if isinstance(default, bool):  # as click shows a flag's default
        shown = ("" if default else "no-") + name.replace("_", "-")
    else:
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else str(default)
    return f"recipe's; dtml: {shown}" if any(name in r for r in RECIPES.values()) else shown


def _config_options() -> list[inspect.Parameter]:
    """One option per OPTION_HELP key; None (the default) keeps the recipe's value."""
    hints = {**typing.get_type_hints(ConsistencyConfig), **typing.get_type_hints(TrainConfig)}
    params = []
    for name, help_text in OPTION_HELP.items():
        option = typer.Option(help=help_text, show_default=_shown_default(name))
        annotation = Annotated[_option_type(name, hints[name]) | None, option]  # type: ignore[operator]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return params


def _keyword(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _run_options() -> tuple[list[inspect.Parameter], list[inspect.Parameter]]:
    """The options that are not TrainConfig fields: where the data and the run live, how it runs."""
    first = [
        _keyword("data", Annotated[Path, typer.Option(help="Data root: LA2018 layout, UA-MT h5 layout, or images "
                                                           "folder")]),
        _keyword("out", Annotated[Path, typer.Option(help="Run folder: bundle/, checkpoint/, train_log.jsonl")]),
        _keyword("recipe", Annotated[RecipeName, typer.Option(help="A row of the paper's tables")],
                 RecipeName(core_default("recipe"))),
        _keyword("labels", Annotated[Path | None, typer.Option(help="Labels folder (generic image/label folder "
                                                                    "pair)")], None),
        _keyword("case_list", Annotated[Path | None, typer.Option(help="File listing case ids, one per line")],
                 None),
    ]
    last = [
        _keyword("resume", Annotated[bool, typer.Option(help="Continue from OUT/checkpoint")], False),
        _keyword("overwrite", Annotated[bool, typer.Option(help="Replace a previous run in OUT (else refused)")],
                 False),
        _keyword("progress", Annotated[bool, typer.Option(help="Show a progress bar")], True),
        _keyword("tensorboard", Annotated[bool, typer.Option(
            help="Also log every scalar to OUT/tensorboard (optional: only when the tensorboard package is "
                 "installed, else skipped silently). OUT/training_curves.png is drawn at the end with dtml[viz]")],
            True),
    ]
    return first, last


def make_config(recipe: str, given: dict[str, Any]) -> TrainConfig:
    """The recipe's TrainConfig with every option the user gave (None: not given) applied."""
    given = {k: v.value if hasattr(v, "value") else v for k, v in given.items() if v is not None}
    consistency = {k: given.pop(k) for k in [f.name for f in fields(ConsistencyConfig)] if k in given}
    if "patch" in given:
        given["patch"] = tuple(given["patch"])
    cfg = make_recipe(recipe, **given)
    if consistency:
        cfg = replace(cfg, consistency_cfg=replace(cfg.consistency_cfg, **consistency))
    return cfg


def train(**options: Any) -> None:
    """Train a DTML pair and write a bundle to OUT/bundle."""
    run = {k: options.pop(k) for k in ("data", "out", "recipe", "labels", "case_list", "resume", "overwrite",
                                         "progress", "tensorboard")}
    with user_errors():
        from dtml_deploy.io.datasets import make_split, open_source
        from dtml_training.divergence import TrainingDiverged
        from dtml_training.run_visuals import is_main_process, run_visuals
        from dtml_training.trainer import Trainer

        cfg = make_config(run["recipe"].value, options)
        source = open_source(run["data"], labels_dir=run["labels"], list_file=run["case_list"])
        for note in source.notes if is_main_process() else ():
            echo_err(note)
        split = make_split(source, cfg.labeled, cfg.unlabeled, cfg.val_cases)
        out = run["out"]
        with run_visuals(out, run["tensorboard"], echo_err):
            try:
                result = Trainer(cfg, split, out, resume=run["resume"], overwrite=run["overwrite"],
                                 show_progress=run["progress"]).run()
            except TrainingDiverged as e:  # the run itself failed, not its input: exit 1
                raise fail(str(e), 1) from None
        s, main = result.summary, is_main_process()  # under torchrun rank 0 reports for all ranks
        if result.interrupted:
            if main:
                typer.echo(f"interrupted at iteration {result.iterations}; checkpoint in {out / 'checkpoint'} "
                           f"(continue with --resume)", err=True)
            raise typer.Exit(130)
        if main:
            typer.echo(f"trained {s['iterations']} iterations in {s['wall_seconds']:.1f} s "
                       f"({s['it_per_s']:.2f} it/s on {s['device']}); bundle: {result.bundle}")


_first, _last = _run_options()
train.__signature__ = inspect.Signature([*_first, *_config_options(), *_last])  # type: ignore[attr-defined]
