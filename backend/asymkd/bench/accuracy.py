"""`asymkd bench accuracy`: teacher on the MS patches, then baseline and distilled students
at several RGB label counts over several seeds, scored on the RGB test set.

The teacher and matcher are trained once (seed 0) and shared by every student run; each
(label count, seed) draws its own labeled RGB subset, pairs it and trains both students.
`--unlabeled` gives both students the rest of rgb_train as unlabeled RGB (the same
semi-supervised recipe, with and without the teacher); `--ablation` adds the method's parts
one at a time at the smallest label count.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from .. import layout
from ..config import from_dict, merge, parse_set
from ..data.patches import scan_folder
from ..errors import ConfigError, DataError
from ..events import Events
from ..layout import RunFolder
from . import record

# name -> (work folder, config overrides of the distilled student), each row adding one part
# of the method to the one above; the first row is the baseline (RGB alone, ground truth)
ABLATION: dict[str, tuple[str, dict[str, Any]]] = {
    "+ MS samples as RGB rows (ground truth only)": (
        "ablation-msrows", {"distill": {"w_pseudo": 0.0, "w_feat": 0.0, "repair_every": -1}}),
    "+ soft labels, random same-class partner": (
        "ablation-random", {"pairing": {"method": "random"}, "distill": {"repair_every": -1, "w_feat": 0.0}}),
    "+ matcher pairing (balanced)": ("ablation-matcher", {"distill": {"repair_every": -1, "w_feat": 0.0}}),
    "+ re-pairing": ("ablation-repair", {"distill": {"w_feat": 0.0}}),
    "+ attention and domain term (full)": ("main", {}),
    "full, nearest pairing": ("ablation-nearest", {"pairing": {"method": "nearest"}}),
}


def add_arguments(p) -> None:
    p.add_argument("--data", required=True,
                   help="root with ms/, rgb_train/, rgb_test/ and optionally rgb_paired/ (same-target RGB)")
    p.add_argument("--out", default=None, help="work folder (default: a folder under /tmp); finished runs are reused")
    p.add_argument("--ms", default=None, metavar="DIR", help="the MS folder (default: DATA/ms)")
    p.add_argument("--labels", default="270,3000",
                   help="RGB label counts, total over the classes of rgb_train (e.g. 40 = 5 a class of 8)")
    p.add_argument("--seeds", type=int, default=5, help="seeds at the smallest label count")
    p.add_argument("--seeds-large", type=int, default=3, help="seeds at larger label counts")
    p.add_argument("--unlabeled", action="store_true",
                   help="also give both students the rest of rgb_train as unlabeled RGB")
    p.add_argument("--ablation", action="store_true",
                   help="one table of the method's parts at the smallest label count")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--device", default="auto")


def _folder(path: Path, given: str | None) -> Path:
    """`given`, else `path`; a link stored as a plain file (its text the target, as a checkout
    without symbolic links leaves it) is followed."""
    if given:
        return Path(given).resolve()
    if path.is_file() and path.stat().st_size < 4096:
        target = (path.parent / path.read_text().strip()).resolve()
        if target.is_dir():
            return target
    return path


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values) * 100
    sd = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    return f"{mean:5.1f} ± {sd:3.1f}"


class _Bench:
    """Shared teacher and matcher, one run folder per (variant, label count, seed)."""

    def __init__(self, args, events: Events):
        self.data = Path(args.data).resolve()
        self.out = Path(args.out or f"/tmp/asymkd-bench-accuracy-{os.getpid()}")
        self.out.mkdir(parents=True, exist_ok=True)
        self.user = parse_set(args.set)
        data: dict[str, Any] = {"ms": str(_folder(self.data / "ms", args.ms)), "rgb": str(self.data / "rgb_train"),
                                "rgb_test": str(self.data / "rgb_test"), "bands": "sentinel2"}
        if (self.data / "rgb_paired").is_dir():  # same-target RGB is optional (none across sensors)
            data["rgb_paired"] = str(self.data / "rgb_paired")
        self.base = {"data": data, "device": args.device}
        self.rgb_classes = len(scan_folder(self.data / "rgb_train")[0])
        self.unlabeled = args.unlabeled
        self.events = events
        self.reused = self.runs = 0  # student runs, and those found finished in the work folder
        self.started = time.time()

    def shared(self) -> dict[str, Any]:
        from ..pipeline import resolve_config, step_matcher, step_teacher
        shared = RunFolder(self.out / "shared")
        cfg = resolve_config(shared.root, None, merge(self.base, self.user))
        if not shared.metrics(layout.TEACHER).is_file():
            step_teacher(cfg, shared.root, self.events)
        if not shared.metrics(layout.MATCHER).is_file():
            step_matcher(cfg, shared.root, self.events)
        teacher = json.loads(shared.metrics(layout.TEACHER).read_text())["summary"]
        matcher = json.loads(shared.metrics(layout.MATCHER).read_text())["summary"]
        print(f"teacher: out-of-fold accuracy on {teacher['ms_samples']} MS patches "
              f"{teacher['out_of_fold_accuracy']:.3f}; matcher top-1 retrieval {matcher['retrieval_top1']:.3f}, "
              f"same class {matcher['retrieval_same_class']:.3f} ({self.elapsed()})", flush=True)
        return {"teacher": teacher, "matcher": matcher}

    def elapsed(self) -> str:
        return f"{time.time() - self.started:.0f} s"

    def run(self, name: str, count: int, seed: int, variant: dict[str, Any], baseline: bool) -> dict[str, Any]:
        """Pair and train in RUN = out/name[-unlabeled]/labels{count}-seed{seed}; metrics of student
        (and baseline)."""
        from ..pipeline import resolve_config, step_distill, step_pair
        run_dir = self.out / (name + ("-unlabeled" if self.unlabeled else "")) / f"labels{count}-seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        for step in (layout.TEACHER, layout.MATCHER):
            link = run_dir / step
            if not link.exists():
                link.symlink_to((self.out / "shared" / step).resolve())
        per_class = max(count // max(self.rgb_classes, 1), 1)
        values = merge(self.base, {"seed": seed, "data": {"rgb_limit_per_class": per_class,
                                                          "rgb_rest_unlabeled": self.unlabeled},
                                   "distill": {"baseline": baseline}})
        overrides = merge(merge(values, variant), self.user)
        run = RunFolder(run_dir)
        names = (layout.STUDENT, layout.BASELINE) if baseline else (layout.STUDENT,)
        if any(run.metrics(n).is_file() for n in names):
            _check_same_config(run_dir, resolve_config(run_dir, None, overrides, write=False))
        cfg = resolve_config(run_dir, None, overrides)
        self.runs += 1
        self.reused += all(run.metrics(n).is_file() for n in names)
        if not run.metrics(layout.STUDENT).is_file():
            step_pair(cfg, run_dir, self.events)
        step_distill(cfg, run_dir, self.events, skip_done=True)
        return {n: json.loads(run.metrics(n).read_text())["test"] for n in names}


def _check_same_config(run_dir: Path, wanted: Any) -> None:
    """A finished run is reused only when it was trained with the configuration asked for now."""
    from dataclasses import asdict

    from ..config import read_file
    stored = from_dict(read_file(run_dir / layout.CONFIG))
    differ = sorted(_differences(asdict(stored), asdict(wanted)))
    if differ:
        raise ConfigError(f"the work folder's finished run {run_dir} was trained with other settings "
                          f"({', '.join(differ[:4])})", "give another --out, or delete that run folder")


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in a.keys() | b.keys():
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def _record(results: dict[str, dict[str, list[float]]], key: str, test: dict[str, Any]) -> None:
    r = results.setdefault(key, {"oa": [], "f1": []})
    r["oa"].append(test["overall_accuracy"])
    r["f1"].append(test["macro_f1"])


def _main_table(bench: _Bench, counts: list[int], args) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for count in counts:
        for seed in range(args.seeds if count == min(counts) else args.seeds_large):
            tests = bench.run("main", count, seed, {}, baseline=True)
            for name, test in tests.items():
                _record(results, f"{count}/{name}", test)
            b, s = tests[layout.BASELINE]["overall_accuracy"], tests[layout.STUDENT]["overall_accuracy"]
            print(f"labels {count} seed {seed}: baseline OA {b:.4f}  distilled OA {s:.4f}  "
                  f"gain {100 * (s - b):+.1f} points ({bench.elapsed()})", flush=True)
    what = "labeled + the rest of rgb_train unlabeled" if args.unlabeled else "labeled only"
    print(f"\nRGB test set OA and macro-F1 (%), mean ± sd over seeds ({what})")
    print(f"{'labels':>7} {'seeds':>5} {'baseline OA':>13} {'distilled OA':>13} {'gain':>6} "
          f"{'baseline F1':>13} {'distilled F1':>13}  per-seed gains")
    for count in counts:
        b, s = results[f"{count}/baseline"], results[f"{count}/student"]
        gains = [100 * (x - y) for x, y in zip(s["oa"], b["oa"], strict=True)]
        print(f"{count:>7} {len(b['oa']):>5} {_summary(b['oa']):>13} {_summary(s['oa']):>13} "
              f"{statistics.mean(gains):+6.1f} {_summary(b['f1']):>13} {_summary(s['f1']):>13}  "
              + " ".join(f"{g:+.1f}" for g in gains))
    return results


def _ablation_table(bench: _Bench, count: int, seeds: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for seed in range(seeds):
        _record(results, "GT only (baseline)", bench.run("main", count, seed, {}, baseline=True)[layout.BASELINE])
        for name, (folder, variant) in ABLATION.items():
            _record(results, name, bench.run(folder, count, seed, variant, baseline=folder == "main")[layout.STUDENT])
        print(f"ablation seed {seed} done ({bench.elapsed()})", flush=True)
    print(f"\nAblation at {count} RGB labels, RGB test set (%), mean ± sd over {seeds} seeds")
    print(f"{'variant':<44} {'OA':>13} {'macro-F1':>13}")
    for name, r in results.items():
        print(f"{name:<44} {_summary(r['oa']):>13} {_summary(r['f1']):>13}")
    return results


def _pct(values: list[float]) -> str:
    return _summary(values).replace("  ", " ").strip()


def _markdown_main(results: dict[str, dict[str, list[float]]], counts: list[int], unlabeled: bool) -> str:
    what = "labeled + the rest of rgb_train unlabeled" if unlabeled else "labeled only"
    rows = []
    for count in counts:
        b, s = results[f"{count}/baseline"], results[f"{count}/student"]
        gains = [100 * (x - y) for x, y in zip(s["oa"], b["oa"], strict=True)]
        rows.append([str(count), str(len(b["oa"])), _pct(b["oa"]), _pct(s["oa"]), f"{statistics.mean(gains):+.1f}",
                     _pct(b["f1"]), _pct(s["f1"]), " ".join(f"{g:+.1f}" for g in gains)])
    return (f"RGB test set, % mean ± sd over seeds ({what}):\n\n"
            + record.markdown_table(["labels", "seeds", "baseline OA", "distilled OA", "gain", "baseline F1",
                                     "distilled F1", "per-seed gains"], rows))


def _markdown_ablation(results: dict[str, dict[str, list[float]]], count: int, seeds: int) -> str:
    rows = [[name, _pct(r["oa"]), _pct(r["f1"])] for name, r in results.items()]
    return (f"Ablation at {count} RGB labels, % mean ± sd over {seeds} seeds:\n\n"
            + record.markdown_table(["variant", "OA", "macro-F1"], rows))


def label_counts(text: str) -> list[int]:
    """`--labels 270,3000` as positive whole numbers."""
    counts = []
    for part in str(text).split(","):
        try:
            count = int(part.strip())
        except ValueError:
            count = 0
        if count < 1:
            raise ConfigError(f"--labels must be positive whole numbers separated by commas, not {text!r}",
                              "e.g. --labels 270,3000 (RGB labels in all, over the classes of rgb_train)")
        counts.append(count)
    return counts


def check_arguments(args) -> list[int]:
    """Every argument and data folder checked before any training; the label counts."""
    counts = label_counts(args.labels)
    for flag, value in (("--seeds", args.seeds), ("--seeds-large", args.seeds_large)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, not {value}", f"e.g. {flag} 3")
    data = Path(args.data)
    if not data.is_dir():
        raise DataError(f"the data folder {data} (--data) does not exist",
                        "give a folder with ms/, rgb_train/ and rgb_test/ (and optionally rgb_paired/)")
    folders = {"ms/ (or --ms)": _folder(data / "ms", args.ms), "rgb_train/": data / "rgb_train",
               "rgb_test/": data / "rgb_test"}
    missing = [name for name, path in folders.items() if not path.is_dir()]
    if missing:
        raise DataError(f"the data folder {data} (--data) lacks {', '.join(missing)}",
                        "give a folder with ms/, rgb_train/ and rgb_test/ (and optionally rgb_paired/)")
    from_dict(merge({"device": args.device}, parse_set(args.set)))  # --set and --device as a run checks them
    return counts


def run(args, events: Events) -> int:
    counts = check_arguments(args)
    bench = _Bench(args, events)
    doc: dict[str, Any] = bench.shared()
    doc["results"] = _main_table(bench, counts, args)
    if args.ablation:
        doc["ablation"] = _ablation_table(bench, min(counts), args.seeds)
    doc["wall_seconds"] = round(time.time() - bench.started)
    reused = (f"\n\n{bench.reused} of {bench.runs} runs were found finished in the work folder and reused "
              "(their numbers come from the code that trained them)." if bench.reused else "")
    record.table(_markdown_main(doc["results"], counts, args.unlabeled) + reused)
    if args.ablation:
        record.table(_markdown_ablation(doc["ablation"], min(counts), args.seeds))
    doc["reused_runs"] = bench.reused
    (bench.out / "results.json").write_text(json.dumps(doc, indent=2))
    if bench.reused:  # their numbers come from the code that trained them
        print(f"\n{bench.reused} of {bench.runs} runs were found finished in {bench.out} and reused")
    print(f"\nresults: {bench.out / 'results.json'} (wall time {bench.elapsed()})")
    return 0
