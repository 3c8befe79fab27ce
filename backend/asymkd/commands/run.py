from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .. import layout
from ..config import merge
from ..fileio import read_json
from ..layout import RunFolder
from ..pipeline import resolve_config, run_all
from ..scores import held_out, split_name
from ..train import distributed
from ._options import add_run_options, config_with_outputs, overrides, run_folder_lock, use_threads


def add_arguments(p) -> None:
    add_run_options(p, run_required=False)
    p.add_argument("--out", dest="out", metavar="DIR", help="run folder (same as --run)")
    p.add_argument("--demo", action="store_true",
                   help="the embedded default: generate the synthetic world and run every step on it")


def run(args, events) -> int:
    from ..errors import ConfigError
    run_dir = Path(args.run or args.out or "")
    if not (args.run or args.out):
        raise ConfigError("no run folder given", "pass --out DIR (e.g. --out runs/demo)")
    if not args.config and not args.demo and not RunFolder(run_dir).config.is_file():
        raise ConfigError("nothing to run: give --config FILE, or --demo for the synthetic world")
    _check_config(args, run_dir)
    # under torchrun: data-parallel over the ranks, rank 0 holds the run folder and writes
    with distributed.session(), run_folder_lock(run_dir, args._command):
        main, events = distributed.is_main(), distributed.rank_events(events)
        with events.copy_to(RunFolder(run_dir).events) if main else contextlib.nullcontext():
            report, outputs = _run_steps(args, run_dir, events)
    if not main:
        return 0
    print(f"report: {report.resolve()}")
    for name, path in outputs.items():
        print(f"{name}: {Path(path).resolve()}")
    print(result_lines(run_dir))
    return 0


def _check_config(args, run_dir: Path) -> None:
    """Refuse a bad config before the run folder is made or locked (the steps resolve it
    again under the lock)."""
    values = overrides(args)
    if args.demo:
        from ..demo import DEMO_CONFIG
        values = merge(DEMO_CONFIG, values)
    resolve_config(run_dir, args.config, values, write=False)


def _run_steps(args, run_dir: Path, events) -> tuple[Path, dict]:
    values = overrides(args)
    if args.demo:
        from ..demo import DEMO_CONFIG, demo_world
        world = distributed.on_main(demo_world, run_dir, events)  # rank 0 writes the world, then
        world = world or demo_world(run_dir, events)                # the others find it there
        values = merge(merge(DEMO_CONFIG, {"data": world}), values)
    cfg = resolve_config(run_dir, args.config, values, write=False)
    use_threads(cfg)
    if args.resume:
        check_finished_steps(run_dir)
    with config_with_outputs(run_dir, cfg):
        report = run_all(cfg, run_dir, events, resume=args.resume)
    outputs = {}
    if args.demo and distributed.is_main():
        from ..demo import demo_classify
        outputs = demo_classify(run_dir, events)
    return report, outputs


def check_finished_steps(run_dir: Path) -> None:
    """`run --resume` skips a step whose metrics.json exists: each such file must be one the
    step wrote (a DataError naming it and the step to run again, before any work)."""
    for step in layout.STEP_FOLDERS:
        path = RunFolder(run_dir).metrics(step)
        if os.path.lexists(path):
            read_json(path.parent, path.name)


def result_lines(run_dir: Path) -> str:
    """The run's result in words: baseline and distilled scores on the test (or validation)
    set and the gain, the last thing a user reads."""
    scores = {}
    ms_rows = 0
    for name in (layout.BASELINE, layout.STUDENT):
        path = RunFolder(run_dir).metrics(name)
        if path.is_file():
            doc = read_json(path.parent, path.name)
            found = held_out(doc)
            if found is not None:
                split, part = found
                scores[name] = (part["overall_accuracy"], part["macro_f1"], split_name(split))
            if name == layout.STUDENT:
                ms_rows = (doc.get("summary") or {}).get("ms_rows") or 0
    lines = [f"{'distilled' if n == layout.STUDENT else n:>9}: {s[2]} "
             f"OA {100 * s[0]:5.1f} %, macro-F1 {100 * s[1]:5.1f} %"
             for n, s in sorted(scores.items())]
    if len(scores) == 2:
        gain = 100 * (scores[layout.STUDENT][0] - scores[layout.BASELINE][0])
        source = f"the MS teacher and its {ms_rows} samples as RGB rows" if ms_rows else "the MS teacher"
        lines.append(f"     gain: {gain:+.1f} OA points from {source}")
    return "\n".join(lines)
