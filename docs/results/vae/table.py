"""Print the Markdown table of docs/vae.md from examples/vae.py results files.

    python docs/results/vae/table.py docs/results/vae/*.json
"""

from __future__ import annotations

import json
import sys

ORDER = {"none": 0, "planar": 1, "iaf": 2, "sylvester": 3, "ffjord": 4}


def row(r: dict) -> str:
    unit = r["unit"]
    is_nll = "n/a" if r["test_nll_is"] is None else f"{r['test_nll_is']:.3f} ± {r['test_nll_is_se']:.3f}"
    flow = r["flow"] + (f" ({r['args'].get('ffjord_config')})" if r["flow"] == "ffjord" else "")
    data = r["dataset"] + (f" (first {r['args']['subset']:,})" if r["args"].get("subset") else "")
    return (f"| {data} | {flow} | {r['test_neg_elbo']:.3f} ± {r['test_neg_elbo_se']:.3f} | {is_nll} "
            f"| {unit} | {r['params']:,} | {r['params_flow']:,} | {r['seconds_per_epoch']:.1f} "
            f"| {r['epochs_trained']} (best {r['best_epoch']}) | {r['eval_s']:.0f} |")


def main(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    runs.sort(key=lambda r: (r["dataset"], r["epochs"], ORDER.get(r["flow"], 9)))
    print("| data | flow | test −ELBO | IS-NLL | unit | params | flow params | s/epoch | epochs | eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(row(r))


if __name__ == "__main__":
    main(sys.argv[1:])
