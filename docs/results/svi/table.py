"""Print the Markdown tables of docs/svi_guides.md from examples/svi_guide.py's JSON files.

    python docs/results/svi/table.py docs/results/svi/*.json
"""

from __future__ import annotations

import json
import sys


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def table(payload: dict) -> str:
    rows = payload["results"]
    quantiles = "quantile_err_mean" in rows[0]
    head = ["guide", "params", "ms/step", "x AutoNormal", "x zuko NSF", "ELBO"]
    head += ["quantile err (mean / max, sd)", "sd ratio"] if quantiles else ["KL(q‖p)", "KL(p‖q)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["guide"], f"{r['params']:,}", f"{r['ms_per_step']:.1f}", fmt(r["x_autonormal"], ".1f"),
                 fmt(r["x_zuko"], ".2f"), f"{r['elbo']:.3f} ± {r['elbo_se']:.3f}"]
        if quantiles:
            cells += [f"{r['quantile_err_mean']:.3f} / {r['quantile_err_max']:.3f}", f"{r['sd_ratio_mean']:.2f}"]
        else:
            cells += [f"{r['kl_q_p']:.3f} ± {r['kl_q_p_se']:.3f}", f"{r['kl_p_q']:.2f} ± {r['kl_p_q_se']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        payload = json.load(open(path))
        print(f"{payload['target']} ({payload['args']['steps']} steps, lr {payload['args']['lr']}):\n")
        print(table(payload))
        print()
