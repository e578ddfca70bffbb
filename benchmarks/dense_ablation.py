"""Loss-term ablation of the two-level dense encoder: short runs with each term switched off,
each evaluated by `ace eval`'s protocols on held-out phantoms (standard and hard) and real images.

    python benchmarks/dense_ablation.py --steps 600 --out runs/ablation \
        --train data/train-phantoms --train data/train-phantoms-hard \
        --eval data/phantoms-eval --eval data/phantoms-eval-hard

Prints one markdown table (median % of the diagonal, share within 2 % and 5 %) per variant and
data set; finished runs are reused (delete runs/ablation/<variant> to retrain one).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ace_model.encoder import load_encoder
from training.dense_train import DenseTrainConfig, export_dense, train_dense
from training.evaluate import EvalOptions, run_evaluation

VARIANTS = {  # name -> weights switched off
    "all terms": (), "no xsubj": ("xsubj",), "no global": ("global",), "no coarse": ("coarse",),
    "no xsubj, no global": ("xsubj", "global"),
}


def train_variant(name: str, off: tuple[str, ...], args: argparse.Namespace) -> Path:
    base = DenseTrainConfig()
    weights = {k: (0.0 if k in off else v) for k, v in base.weights.items()}
    cfg = replace(base, steps=args.steps, weights=weights, seed=args.seed)
    run = args.out / name.replace(" ", "-").replace(",", "")
    artifact = run / "encoder"
    if not (artifact / "encoder.json").is_file():
        state = train_dense(args.train, run, cfg)
        export_dense(state, artifact, 224, {"ablation": name, "steps": args.steps})
    return artifact


def evaluate(artifact: Path, data: Path, args: argparse.Namespace, real: bool) -> dict[str, Any]:
    options = EvalOptions(data=data, encoders=(("enc", artifact),), max_pairs=args.pairs, real=real,
                          real_transforms=1, seed=0)
    report = run_evaluation(options, [("enc", load_encoder(artifact))]).report
    out = {"landmarks": report["landmarks"]["enc"]["overall"]}
    if real:
        out["real"] = report["real"]["methods"]["enc"]["overall"]
    return out


def cells(summary: dict[str, float]) -> str:
    return (f"{summary['median_pct']:.2f} / {100 * summary['success_2pct']:.1f} / "
            f"{100 * summary['success_5pct']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=100, help="landmark pairs per eval set")
    parser.add_argument("--train", type=Path, action="append", required=True)
    parser.add_argument("--eval", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.variants.split(","):
        artifact = train_variant(name, VARIANTS[name], args)
        results = [evaluate(artifact, data, args, real=i == 0) for i, data in enumerate(args.eval)]
        rows.append((name, results))
        print(json.dumps({name: results}), flush=True)
    header = " | ".join(f"{d.name}: median % / ≤2 % / ≤5 %" for d in args.eval)
    print(f"\n| variant ({args.steps} steps) | {header} | real images: median % / ≤2 % / ≤5 % |")
    print("|---" * (len(args.eval) + 2) + "|")
    for name, results in rows:
        marks = " | ".join(cells(r["landmarks"]) for r in results)
        print(f"| {name} | {marks} | {cells(results[0]['real'])} |")


if __name__ == "__main__":
    main()
