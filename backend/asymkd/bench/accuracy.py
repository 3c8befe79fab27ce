"""`asymkd bench accuracy`: teacher on the MS patches, then baseline and distilled students
at several RGB label counts over several seeds, scored on the RGB test set.

The teacher and matcher are trained once (seed 0) and shared by every student run; each
(label count, seed) draws its own labeled RGB subset, pairs it and trains both students.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from ..config import merge, parse_set
from ..events import Events


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="EuroSAT-layout root with ms/, rgb_paired/, rgb_train/, rgb_test/")
    p.add_argument("--out", default=None, help="work folder (default: a folder under /tmp)")
    p.add_argument("--labels", default="270,3000", help="RGB label counts (total over classes)")
    p.add_argument("--seeds", type=int, default=5, help="seeds at the smallest label count")
    p.add_argument("--seeds-large", type=int, default=3, help="seeds at larger label counts")
    p.add_argument("--unlabeled", action="store_true",
                   help="also give the distilled student the rest of rgb_train as unlabeled RGB")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--device", default="auto")


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values) * 100
    sd = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    return f"{mean:5.1f} ± {sd:3.1f}"


def run(args, events: Events) -> int:
    from ..pipeline import resolve_config, step_distill, step_matcher, step_pair, step_teacher
    data = Path(args.data).resolve()
    out = Path(args.out or f"/tmp/asymkd-bench-accuracy-{os.getpid()}")
    out.mkdir(parents=True, exist_ok=True)
    user = parse_set(args.set)
    base = {"data": {"ms": str(data / "ms"), "rgb_paired": str(data / "rgb_paired"),
                     "rgb": str(data / "rgb_train"), "rgb_test": str(data / "rgb_test"), "bands": "sentinel2"},
            "device": args.device}
    shared = out / "shared"
    cfg = resolve_config(shared, None, merge(base, user))
    t0 = time.time()
    if not (shared / "teacher" / "metrics.json").is_file():
        step_teacher(cfg, shared, events)
    if not (shared / "matcher" / "metrics.json").is_file():
        step_matcher(cfg, shared, events)
    teacher = json.loads((shared / "teacher" / "metrics.json").read_text())["summary"]
    matcher = json.loads((shared / "matcher" / "metrics.json").read_text())["summary"]
    print(f"teacher: out-of-fold accuracy on {teacher['ms_samples']} MS patches "
          f"{teacher['out_of_fold_accuracy']:.3f}; matcher top-1 retrieval {matcher['retrieval_top1']:.3f}, "
          f"same class {matcher['retrieval_same_class']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    counts = [int(c) for c in args.labels.split(",")]
    results: dict[str, dict[str, list[float]]] = {}
    for count in counts:
        seeds = args.seeds if count == min(counts) else args.seeds_large
        for seed in range(seeds):
            run_dir = out / f"labels{count}-seed{seed}"
            run_dir.mkdir(exist_ok=True)
            for step in ("teacher", "matcher"):
                link = run_dir / step
                if not link.exists():
                    link.symlink_to((shared / step).resolve())
            per_class = max(count // 10, 1)
            values = merge(base, {"seed": seed, "data": {"rgb_limit_per_class": per_class}})
            if args.unlabeled:
                values["data"]["rgb_rest_unlabeled"] = True
            rcfg = resolve_config(run_dir, None, merge(values, user))
            if not (run_dir / "student" / "metrics.json").is_file():
                step_pair(rcfg, run_dir, events)
            step_distill(rcfg, run_dir, events, skip_done=True)
            for name in ("baseline", "student"):
                m = json.loads((run_dir / name / "metrics.json").read_text())
                r = results.setdefault(f"{count}/{name}", {"oa": [], "f1": []})
                r["oa"].append(m["test"]["overall_accuracy"])
                r["f1"].append(m["test"]["macro_f1"])
            b, s = results[f"{count}/baseline"]["oa"][-1], results[f"{count}/student"]["oa"][-1]
            print(f"labels {count} seed {seed}: baseline OA {b:.4f}  distilled OA {s:.4f}  "
                  f"gain {100 * (s - b):+.1f} points ({time.time() - t0:.0f} s)", flush=True)
    print("\nRGB test set OA and macro-F1 (%), mean ± sd over seeds")
    print(f"{'labels':>7} {'seeds':>5} {'baseline OA':>13} {'distilled OA':>13} {'gain':>6} "
          f"{'baseline F1':>13} {'distilled F1':>13}")
    for count in counts:
        b, s = results[f"{count}/baseline"], results[f"{count}/student"]
        gain = statistics.mean(s["oa"]) - statistics.mean(b["oa"])
        print(f"{count:>7} {len(b['oa']):>5} {_summary(b['oa']):>13} {_summary(s['oa']):>13} "
              f"{100 * gain:+6.1f} {_summary(b['f1']):>13} {_summary(s['f1']):>13}")
    (out / "results.json").write_text(json.dumps({"teacher": teacher, "matcher": matcher,
                                                  "results": results}, indent=2))
    print(f"\nresults: {out / 'results.json'} ({time.time() - t0:.0f} s)")
    return 0
