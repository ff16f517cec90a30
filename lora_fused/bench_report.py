"""The benchmark's figures and how they are shown: the Result record, speedups, the console table, a
Markdown summary to share, and the PNG plot of speedup against M (lora_fused.bench writes them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

MODES = ["fwd", "bwd", "fwdbwd"]
BASELINE_ORDER = ["torch", "base_gemm", "peft", "bitsandbytes"]


@dataclass
class Result:
    op: str
    mode: str
    provider: str
    M: int
    k: int
    d: int
    r: int
    dtype: str
    ms: Optional[float] = None
    status: str = "ok"  # ok | WRONG | error | skipped
    detail: str = ""
    rel_err: Optional[float] = None
    tbps: Optional[float] = None
    tflops: Optional[float] = None
    speedup: dict = field(default_factory=dict)


def add_speedups(results: list[Result]) -> None:
    """speedup[p] = time of provider p / time of lora_fused, for the same case."""
    ours = {(r.op, r.mode, r.M, r.k, r.d, r.r): r for r in results if r.provider == "lora_fused"}
    for key, mine in ours.items():
        if mine.ms is None:
            continue
        for r in results:
            if (r.op, r.mode, r.M, r.k, r.d, r.r) == key and r.provider != "lora_fused" and r.ms is not None:
                mine.speedup[r.provider] = r.ms / mine.ms


def format_table(results: list[Result], ceilings: dict) -> str:
    lines = []
    if ceilings:
        lines.append(
            f"ceilings measured here: copy {ceilings['copy_TBps']:.2f} TB/s, bf16 GEMM {ceilings['bf16_gemm_TFLOPs']:.0f} TFLOP/s"
        )
    header = f"{'op':<15}{'mode':<7}{'k->d':>12}{'M':>7}{'r':>4}  {'provider':<13}{'ms':>9}  {'rate':>14}  {'status / speedup of lora_fused':<40}"
    lines += [header, "-" * len(header)]
    order = {"lora_fused": 0}
    for r in sorted(results, key=lambda r: (r.op, r.k, r.d, r.r, r.M, MODES.index(r.mode), order.get(r.provider, 1))):
        rate = ""
        if r.tbps is not None:
            frac = f" ({100 * r.tbps / ceilings['copy_TBps']:.0f}%)" if ceilings else ""
            rate = f"{r.tbps:.2f} TB/s{frac}"
        elif r.tflops is not None:
            frac = f" ({100 * r.tflops / ceilings['bf16_gemm_TFLOPs']:.0f}%)" if ceilings else ""
            rate = f"{r.tflops:.3g} TF/s{frac}"
        ms = f"{r.ms:.4f}" if r.ms is not None else "-"
        if r.status != "ok":
            note = f"{r.status}: {r.detail}"
        else:
            note = "  ".join(f"vs {p} {s:.2f}x" for p, s in r.speedup.items())
            if r.detail:
                note = f"[{r.detail}] {note}"
        lines.append(f"{r.op:<15}{r.mode:<7}{f'{r.k}->{r.d}':>12}{r.M:>7}{r.r:>4}  {r.provider:<13}{ms:>9}  {rate:>14}  {note}")
    return "\n".join(lines)


def _baselines(results: list[Result], op: str) -> list[str]:
    found = {r.provider for r in results if r.op == op and r.provider != "lora_fused"}
    return [p for p in BASELINE_ORDER if p in found] + sorted(found - set(BASELINE_ORDER))


def _plot_rank(results: list[Result], op: str) -> int:
    """The rank a plot shows for op: 16 where measured (the issue's reference), else the smallest."""
    ranks = sorted({r.r for r in results if r.op == op})
    return 16 if 16 in ranks else ranks[0]


def write_markdown(results: list[Result], ceilings: dict, meta: dict, path: str, ranks: Optional[set] = None) -> str:
    """A Markdown summary to paste or share: per op, one row per case with lora_fused's time and
    each baseline's time over it; `ranks` keeps only those LoRA ranks (0 = no LoRA: nf4 ops)."""
    lines = [f"# lora_fused benchmark on {meta.get('device_name', '?')}", ""]
    versions = ", ".join(f"{k} {meta[k]}" for k in ("peft", "bitsandbytes", "triton") if meta.get(k))
    lines.append(
        f"{meta.get('date', '?')}: torch {meta.get('torch', '?')}, CUDA {meta.get('cuda') or '-'}, lora_fused "
        f"{meta.get('lora_fused', '?')} (commit {meta.get('commit', '?')}){'; ' + versions if versions else ''}."
    )
    if ceilings:
        lines.append(
            f"Ceilings measured in the run: copy {ceilings['copy_TBps']:.2f} TB/s, bf16 GEMM "
            f"{ceilings['bf16_gemm_TFLOPs']:.0f} TFLOP/s."
        )
    lines += ["", "Columns `vs X`: X's time / lora_fused's time (> 1: lora_fused is faster). Device-event medians.", ""]
    ours = [r for r in results if r.provider == "lora_fused" and (ranks is None or r.r in ranks)]
    for op in sorted({r.op for r in ours}, key=lambda o: ["lora_linear", "nf4_linear", "qlora_linear"].index(o)
                     if o in ("lora_linear", "nf4_linear", "qlora_linear") else 9):
        base = _baselines(results, op)
        lines += [f"## {op}", "", "| mode | k->d | M | r | lora_fused ms | " + " | ".join(f"vs {p}" for p in base) + " |",
                  "|---" * (5 + len(base)) + "|"]
        rows = sorted((r for r in ours if r.op == op), key=lambda r: (r.k, r.d, r.r, r.M, MODES.index(r.mode)))
        for r in rows:
            if r.status != "ok":
                cells = [r.status] * len(base)
                ms = "-"
            else:
                cells = [f"{r.speedup[p]:.2f}x" if p in r.speedup else "-" for p in base]
                ms = f"{r.ms:.4f}"
            lines.append(f"| {r.mode} | {r.k}->{r.d} | {r.M} | {r.r} | {ms} | " + " | ".join(cells) + " |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return f"Markdown summary written to {path}"


def write_plot(results: list[Result], path: str) -> str:
    """Speedup of lora_fused over each baseline against M: a row per layer op, a column per mode,
    one line per (baseline, layer shape) at one rank (16 where measured)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    ours = [r for r in results if r.provider == "lora_fused" and r.op in ("lora_linear", "nf4_linear", "qlora_linear")]
    ops = [o for o in ("lora_linear", "nf4_linear", "qlora_linear") if any(r.op == o for r in ours)]
    modes = [m for m in MODES if any(r.mode == m for r in ours)]
    if not ops:
        return "no layer op measured: no plot"
    from matplotlib.lines import Line2D

    shapes = sorted({(r.k, r.d) for r in ours})
    colors = {shape: plt.get_cmap("tab10")(i % 10) for i, shape in enumerate(shapes)}
    styles = {"torch": "-", "base_gemm": "--", "peft": ":", "bitsandbytes": "-."}
    fig, axes = plt.subplots(len(ops), len(modes), figsize=(5.5 * len(modes), 4.2 * len(ops)), squeeze=False)
    for row, op in zip(axes, ops):
        rank = _plot_rank(results, op)
        for ax, mode in zip(row, modes):
            series: dict = {}
            for r in ours:
                if r.op == op and r.mode == mode and r.r == rank:
                    for p, s in r.speedup.items():
                        series.setdefault((p, r.k, r.d), []).append((r.M, s))
            for (p, k, d), pts in sorted(series.items()):
                pts.sort()
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, color=colors[(k, d)],
                        linestyle=styles.get(p, (0, (1, 3))))
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("time(baseline) / time(lora_fused)")
            ax.set_title(f"{op} {mode}" + (f", r = {rank}" if rank else ""))
            # Colour = layer shape, line style = baseline.
            handles = [Line2D([], [], color=colors[sh], label=f"{sh[0]}->{sh[1]}") for sh in shapes]
            handles += [Line2D([], [], color="k", linestyle=styles.get(p, (0, (1, 3))), label=f"vs {p}")
                        for p in sorted({key[0] for key in series}, key=lambda p: BASELINE_ORDER.index(p) if p in BASELINE_ORDER else 9)]
            ax.legend(handles=handles, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
