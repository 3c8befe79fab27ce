"""Options shared by the training commands; their setting flags come from the config's declarations."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import config, runlock, settings
from ..config import RunConfig, merge, parse_set, write_config
from ..fileio import written_first
from ..layout import RunFolder

MAX_CONFIG_BYTES = 1 << 20


def config_file(text: str) -> str:
    """A --config path; an existing file that is not UTF-8 text (a binary or an image given
    by mistake) is refused while the arguments are read. A missing file is reported by the
    config reader."""
    path = Path(text)
    if not path.is_file():
        return text
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise argparse.ArgumentTypeError(f"{text} is larger than 1 MiB: not a config file (YAML or TOML)")
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        decoded = "\x00"
    if "\x00" in decoded:
        raise argparse.ArgumentTypeError(f"{text} is not a text file: give a YAML or TOML config file")
    return text


def add_run_options(p: argparse.ArgumentParser, run_required: bool = True) -> None:
    """The options of every training command: the run folder, the config and the top-level settings."""
    p.add_argument("--run", required=run_required, metavar="DIR", help="run folder (created if missing)")
    p.add_argument("--config", metavar="FILE", type=config_file, help="YAML or TOML config file")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", default=[],
                   help="override config keys, e.g. --set distill.epochs=5 teacher.folds=0")
    add_config_flags(p, "")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")


def add_config_flags(p: argparse.ArgumentParser, section: str, *names: str) -> None:
    """The flags of a config section ("" = the top level) as its fields declare them; only
    `names` where given (the data folders a step reads)."""
    settings.add_flags(p, settings.section(settings.entries(config.RunConfig), section, *names))


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides from the setting flags that were given, then --set (which wins)."""
    out: dict[str, Any] = {}
    for key, value in settings.given(args).items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return merge(out, parse_set(args.set))


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """The run folder's lock (`runlock.hold`) for this command. Under torchrun rank 0 holds
    it for the whole job (its ranks never lock each other out), and when another command
    holds it every rank fails alike."""
    from ..errors import StorageError
    from ..train import distributed
    with contextlib.ExitStack() as stack:
        refusal = None
        if distributed.is_main():
            try:
                stack.enter_context(runlock.hold(run_dir, command))
            except StorageError as exc:
                refusal = (exc.message, exc.hint)
        refusal = distributed.from_main(refusal)
        if refusal is not None:
            raise StorageError(*refusal)
        yield


@contextlib.contextmanager
def config_with_outputs(run_dir: str | Path, cfg: RunConfig) -> Iterator[None]:
    """Write RUN/config.yaml right before the block's first output in the run folder, so a
    command refused by its step's checks (a missing data folder, a matcher not trained yet)
    leaves the run's config as it was; under torchrun rank 0 alone writes it."""
    from ..train import distributed
    if not distributed.is_main():
        yield
        return
    with written_first(run_dir, lambda: write_config(RunFolder(Path(run_dir)).config, cfg)):
        yield


def use_threads(cfg: RunConfig) -> None:
    """`workers` torch threads for this process (0 keeps torch's default)."""
    if cfg.workers > 0:
        import torch
        torch.set_num_threads(cfg.workers)


def run_step(args: argparse.Namespace, events: Any, step: Callable[..., Any]) -> Any:
    """Run one pipeline step with the config of the run folder, the file and the flags, holding
    the run folder's lock. Under torchrun the ranks train data-parallel and rank 0 alone writes
    the config; the step's result on rank 0, None on the other ranks (which print nothing)."""
    from ..pipeline import resolve_config
    from ..train import distributed
    values = overrides(args)
    resolve_config(args.run, args.config, values, write=False)  # a refused config creates no run folder
    with distributed.session(), run_folder_lock(args.run, args._command):
        main, events = distributed.is_main(), distributed.rank_events(events)
        cfg = resolve_config(args.run, args.config, values, write=False)  # the run's config.yaml as it is now
        use_threads(cfg)
        with config_with_outputs(args.run, cfg):
            result = step(cfg, args.run, events, args.resume)
    return result if main else None
