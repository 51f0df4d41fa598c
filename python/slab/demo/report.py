"""The demo's outputs: the printed table, the JSON file, the PNG plot."""

from __future__ import annotations

import json
from typing import Optional


def table(result: dict) -> str:
    task = result["task"]
    base = next((m for m in result["models"] if m["name"] == "baseline"), None)
    if task == "vision":
        head = (
            "model",
            "test acc",
            f"ms/image (batch {result.get('latency_batch', '?')})",
            "speed vs baseline",
            "agrees w/ float",
        )
    else:
        head = ("model", "perplexity", "ms/token (forward)", "speed vs baseline", "")
    rows = []
    for m in result["models"]:
        metric = f"{100 * m['accuracy']:.2f}%" if task == "vision" else f"{m['perplexity']:.3f}"
        speed = "" if base is None or m is base else f"{base['latency_ms'] / m['latency_ms']:.2f}x"
        agree = f"{100 * m['agreement_with_float']:.1f}%" if "agreement_with_float" in m else ""
        rows.append((m["name"], metric, f"{m['latency_ms']:.4f}", speed, agree))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
    for m in result["models"]:
        if m.get("note"):
            out.append(f"  {m['name']}: {m['note']}")
    if task == "lm" and result.get("decode"):
        out.append("")
        out.append("decode (greedy, batch 1): context | slab SLA O(1) tokens/s | softmax + KV cache tokens/s")
        for d in result["decode"]:
            out.append(f"  {d['context']:>6} | {d['slab_tokens_per_s']:10.1f} | {d['softmax_kv_tokens_per_s']:10.1f}")
    out.append(f"train_seconds (SLAB float): {result['train_seconds']:.1f}")
    scope = " (the full run's target: --quick trains a few steps only)" if result.get("quick") else ""
    for name, ok in result.get("targets", {}).items():
        out.append(f"  target {name}: {'met' if ok else 'NOT met'}{scope}")
    return "\n".join(out)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def check_plot_available() -> Optional[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install slab-kernels[plot]"
    return None


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for name, hist in result.get("history", {}).items():
        if hist:
            ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=f"{name} loss")
    lam = result.get("history", {}).get("slab", [])
    if lam and "lam" in lam[0]:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in lam], [h["lam"] for h in lam], "k--", label="PRepBN lam")
        ax2.set_ylabel("lam")
        ax2.legend(loc="center right")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(loc="upper right")
    ax.set_title(f"{result['task']}: training")
    ax = axes[1]
    names = [m["name"] for m in result["models"]]
    lat = [m["latency_ms"] for m in result["models"]]
    ax.bar(names, lat, color="tab:blue")
    ax.set_ylabel("latency (ms per image)" if result["task"] == "vision" else "latency (ms per token)")
    ax3 = ax.twinx()
    if result["task"] == "vision":
        ax3.plot(names, [100 * m["accuracy"] for m in result["models"]], "ro-")
        ax3.set_ylabel("test accuracy (%)", color="r")
    else:
        ax3.plot(names, [m["perplexity"] for m in result["models"]], "ro-")
        ax3.set_ylabel("perplexity", color="r")
    ax.set_title("per model variant")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
