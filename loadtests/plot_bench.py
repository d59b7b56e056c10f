"""The plots in BENCHMARKS.md, drawn from the raw JSON in docs/bench-data/.

Only matplotlib is needed (not parallm, not mlx), so a throwaway venv will do:

  python3 -m venv /tmp/plotvenv && /tmp/plotvenv/bin/pip install matplotlib
  /tmp/plotvenv/bin/python loadtests/plot_bench.py            # rewrites the PNGs in docs/img/

Each figure names its raw file, machine and model. bench_serving.py draws its own runs with
plot_serving, so a fresh sweep looks like the one in the report.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "bench-data"
IMG = ROOT / "docs" / "img"

# bench_serving's target names -> legend labels; the anchor is drawn in grey
SERVER_LABELS = {"parallm": "parallm serve (HTTP)", "mlx_lm": "mlx_lm.server (anchor)",
                 "engine": "parallm engine, no HTTP", "server": "server under test"}
SERVER_STYLE = {"parallm": dict(color="tab:blue", marker="o"),
                "mlx_lm": dict(color="tab:gray", marker="s"),
                "engine": dict(color="tab:green", marker="^", linestyle="--")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_target(levels: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """target -> concurrency -> its levels (more than one with --reps)."""
    out: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for lv in levels:
        out[lv["server"]][lv["concurrency"]].append(lv)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plot_serving(levels: list[dict], path: Path, title: str, ttft_target_ms: float | None = None) -> Path:
    """Output tokens/s and TTFT p99 over concurrency, one line per target (the mean where a level
    ran more than once); each level where requests failed is labelled with how many."""
    plt = _pyplot()
    fig, (ax_tok, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.6))
    for server, by_conc in sorted(_by_target(levels).items(), key=lambda kv: kv[0] != "parallm"):
        conc = sorted(by_conc)
        style = dict(SERVER_STYLE.get(server, dict(marker="o")))
        label = SERVER_LABELS.get(server, server)
        tok = [_mean([lv["throughput_tok_s"] for lv in by_conc[c]]) for c in conc]
        p99 = [_mean([1e3 * (lv["ttft_p99"] or 0) for lv in by_conc[c]]) for c in conc]
        ax_tok.plot(conc, tok, label=label, **style)
        ax_ttft.plot(conc, p99, label=label, **style)
        for c, y in zip(conc, tok):
            failed = sum(lv["failures"] for lv in by_conc[c])
            if failed:
                asked = sum(lv["requests"] for lv in by_conc[c])
                ax_tok.annotate(f"{failed}/{asked} failed", (c, y), textcoords="offset points", xytext=(0, 8),
                                ha="center", fontsize=8, color=style.get("color", "black"))
    ax_tok.set_ylabel("output tokens/s (all clients)")
    ax_tok.set_title("throughput (higher is better)")
    ax_ttft.set_ylabel("TTFT p99 (ms)")
    ax_ttft.set_yscale("log")
    ax_ttft.yaxis.set_major_formatter(_plain_ticks())
    ax_ttft.yaxis.set_minor_formatter(_plain_ticks())
    ax_ttft.set_title("time to first token, p99 (lower is better)")
    if ttft_target_ms:
        ax_ttft.axhline(ttft_target_ms, color="tab:red", linestyle=":", linewidth=1,
                        label=f"target at 64 clients: p99 <= {ttft_target_ms:g} ms")
    levels_conc = sorted({lv["concurrency"] for lv in levels})
    for ax in (ax_tok, ax_ttft):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels_conc)
        ax.set_xlim(levels_conc[0] / 1.3, levels_conc[-1] * 1.3)
        ax.get_xaxis().set_major_formatter(_plain_ticks())
        ax.set_xlabel("concurrent streaming clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_tok.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plain_ticks():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def plot_engine(panels: list[tuple[str, dict]], path: Path, title: str) -> Path:
    """One panel per bench_engine.py JSON: generated tokens/s over batch size, parallm's engine
    against mlx-lm's BatchGenerator (same process, same prompts), the ratio written above each point."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    for ax, (panel_title, result) in zip(axes[0], panels):
        rows = sorted(result["rows"], key=lambda r: r["batch"])
        batch = [r["batch"] for r in rows]
        ax.plot(batch, [r["parallm_tok_s"] for r in rows], label="parallm engine", color="tab:blue", marker="o")
        ax.plot(batch, [r["mlx_lm_tok_s"] for r in rows], label="mlx-lm BatchGenerator (anchor)",
                color="tab:gray", marker="s")
        for r in rows:
            ax.annotate(f"{r['ratio']:.2f}x", (r["batch"], r["parallm_tok_s"]), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=9, color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch)
        ax.get_xaxis().set_major_formatter(_plain_ticks())
        ax.set_xlim(min(batch) / 1.4, max(batch) * 1.4)
        ax.set_ylim(0, 1.15 * max(max(r["parallm_tok_s"], r["mlx_lm_tok_s"]) for r in rows))
        ax.set_xlabel("batch (sequences submitted together)")
        ax.set_ylabel("generated tokens/s")
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def report_figures(out_dir: Path) -> list[Path]:
    """The figures BENCHMARKS.md embeds (a raw file that is missing skips its figure)."""
    paths = []
    serving = _load("h200-serving-1b-ninth.json")
    paths.append(plot_serving(
        serving["levels"], out_dir / "serving-gpu-1b.png",
        "Serving on one NVIDIA H200: random Llama-1B shape, bf16, 128 prompt / 128 output tokens\n"
        "(bench_serving.py --compare --engine-baseline; docs/bench-data/h200-serving-1b-ninth.json)",
        ttft_target_ms=500))
    paths.append(plot_engine(
        [("Llama-1B shape (h200-engine-1b-kernels.json)", _load("h200-engine-1b-kernels.json")),
         ("Llama-8B shape (h200-engine-8b-kernels.json)", _load("h200-engine-8b-kernels.json"))],
        out_dir / "engine-gpu-h200.png",
        "Engine vs mlx-lm BatchGenerator on one NVIDIA H200: random-weight Llama, bf16, "
        "prompts 16-128 tokens, 128 generated"))
    cpu = [(t, n) for t, n in (
        ("SmolLM2-135M-Instruct, f32 (cpu-engine-default-f32.json)", "cpu-engine-default-f32.json"),
        ("tiny random Llama: per-step overhead (cpu-engine-tiny.json)", "cpu-engine-tiny.json"))
        if (DATA / n).exists()]
    if cpu:
        paths.append(plot_engine(
            [(t, _load(n)) for t, n in cpu], out_dir / "engine-cpu.png",
            "Engine vs mlx-lm BatchGenerator on the CPU (2-vCPU VM, OpenBLAS): greedy, "
            "prompts 16-128 tokens and 32 generated (tiny model: 8-32 and 64)"))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=IMG, help="where the PNGs go (default docs/img)")
    args = p.parse_args(argv)
    for path in report_figures(args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
