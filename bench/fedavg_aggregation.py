#!/usr/bin/env python3
"""FedAvg aggregation of a 25M-parameter model from 20 clients: how long, in how much memory?

Each measurement runs in a fresh process (so peak resident memory is its own):
Flower's ``FedAvg.aggregate_train`` (the message-API strategy the reference app
uses) over 20 simulated client replies, each an ``ArrayRecord`` of a 25M-parameter
model (float32, ~100 MB) with its example count; next to it, the floor — the same
weighted mean as one NumPy pass over the same arrays. The inputs themselves
(20 × 100 MB) are part of both peaks; the column "over inputs" is what aggregation
adds. A benchmark: it prints a table, it does not pass or fail.

    .venv/bin/python bench/fedavg_aggregation.py [--params 25000000] [--clients 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def _model(params: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Layers shaped like a mid-size CNN/ViT head: a few large matrices and small vectors."""
    shapes = [(4096, 4096), (4096, 1024), (1024, 1024), (4096,), (1024,)]
    layers: dict[str, np.ndarray] = {}
    left = params
    i = 0
    while left > 0:
        shape = shapes[i % len(shapes)]
        size = int(np.prod(shape))
        if size > left:
            shape, size = (left,), left
        layers[f"layer{i}"] = rng.standard_normal(shape, dtype=np.float32)
        left -= size
        i += 1
    return layers


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, params: int, clients: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    base = _model(params, rng)
    examples = [int(rng.integers(50, 500)) for _ in range(clients)]
    before_inputs = _rss_mb()
    if kind == "flower":
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
        from flwr.serverapp.strategy import FedAvg
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

        replies = []
        for n in range(clients):
            arrays = {k: v + np.float32(n) for k, v in base.items()}
            ask = Message(
                RecordDict({"config": ConfigRecord({})}), dst_node_id=n + 1, message_type="train"
            )
            reply = Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                        "metrics": MetricRecord({"num-examples": examples[n]}),
                    }
                ),
                reply_to=ask,
            )
            replies.append(reply)
        del arrays
        inputs = _rss_mb()
        strategy = FedAvg(min_train_nodes=clients, min_available_nodes=clients)
        started = time.perf_counter()
        arrays_out, _ = strategy.aggregate_train(1, replies)
        seconds = time.perf_counter() - started
        assert arrays_out is not None
        check = float(arrays_out["layer0"].numpy().ravel()[0])  # type: ignore[union-attr]
    else:
        stacks = [{k: v + np.float32(n) for k, v in base.items()} for n in range(clients)]
        inputs = _rss_mb()
        started = time.perf_counter()
        total = float(sum(examples))
        out = {
            k: sum(stacks[n][k] * np.float32(examples[n] / total) for n in range(clients))
            for k in base
        }
        seconds = time.perf_counter() - started
        check = float(out["layer0"].ravel()[0])
    expected = float(base["layer0"].ravel()[0]) + sum(n * e for n, e in enumerate(examples)) / sum(
        examples
    )
    return {
        "seconds": seconds,
        "peak_mb": _rss_mb(),
        "inputs_mb": inputs - before_inputs,
        "inputs_rss_mb": inputs,
        "error": abs(check - expected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=["flower", "numpy"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.params, args.clients)))
        return
    rows: dict[str, list[dict[str, float]]] = {"flower": [], "numpy": []}
    for _ in range(args.repeat):
        for kind in rows:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    kind,
                    "--params",
                    str(args.params),
                    "--clients",
                    str(args.clients),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    model_mb = args.params * 4 / 1e6
    print(
        f"FedAvg aggregation: {args.params / 1e6:.0f}M parameters (float32, {model_mb:.0f} MB), "
        f"{args.clients} clients, median of {args.repeat} fresh processes\n"
    )
    print(
        f"{'aggregator':<34} {'seconds':>8} {'x floor':>8} {'peak MB':>9} {'over inputs MB':>15} "
        f"{'max error':>10}"
    )
    floor = sorted(r["seconds"] for r in rows["numpy"])[len(rows["numpy"]) // 2]
    for kind, label in (
        ("flower", "Flower FedAvg.aggregate_train"),
        ("numpy", "NumPy weighted mean (floor)"),
    ):
        runs = sorted(rows[kind], key=lambda r: r["seconds"])
        mid = runs[len(runs) // 2]
        over = mid["peak_mb"] - mid["inputs_rss_mb"]
        print(
            f"{label:<34} {mid['seconds']:>8.2f} {mid['seconds'] / floor:>8.2f} "
            f"{mid['peak_mb']:>9.0f} {over:>15.0f} {max(r['error'] for r in runs):>10.2g}"
        )


if __name__ == "__main__":
    main()
