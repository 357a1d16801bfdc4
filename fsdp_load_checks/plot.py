"""Memory over time per rank, phases marked: where the memory went, as a PNG."""

from __future__ import annotations

from pathlib import Path

from fsdp_load_checks.checks import LOADING_RANK_MULTIPLE, NON_LOADING_RANK_FRACTION

MiB = 1 << 20


class PlotUnavailable(RuntimeError):
    pass


def plot_memory(case: str, observations: dict, out_dir: Path, loader: str = "") -> Path:
    """One line per rank (RssAnon, MiB, relative to when from_pretrained began), phase starts as vertical lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("memory plots need matplotlib: pip install 'fsdp-load-checks[plot]'") from None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    model = 0
    for rank, obs in sorted(observations.items()):
        mem = obs.memory
        model = max(model, mem.model_bytes)
        if not mem.trace:
            continue
        loading = mem.phases.get("from_pretrained")
        base = loading.start if loading else mem.trace[0][1]  # the check's zero: memory when loading began
        t = [p[0] for p in mem.trace]
        y = [(p[1] - base) / MiB for p in mem.trace]
        (line,) = ax.plot(t, y, label=f"rank {rank}" + (" (loads)" if mem.local_rank == 0 else ""))
        for when, phase in mem.marks:
            ax.axvline(when, color=line.get_color(), alpha=0.25, linestyle=":")
            if rank == 0:
                ax.annotate(phase, (when, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top", fontsize=8)
    if model:
        ax.axhline(model / MiB, color="grey", linestyle="--", linewidth=1, label=f"model {model / MiB:.0f} MiB")
        ax.axhline(NON_LOADING_RANK_FRACTION * model / MiB, color="red", linestyle="--", linewidth=1,
                   label=f"from_pretrained bound, receiving ranks ({NON_LOADING_RANK_FRACTION:g}x)")
        ax.axhline(LOADING_RANK_MULTIPLE * model / MiB, color="orange", linestyle="--", linewidth=1,
                   label=f"from_pretrained bound, loading rank ({LOADING_RANK_MULTIPLE:g}x)")
    ax.set_xlabel("seconds since the case started on that rank")
    ax.set_ylabel("anonymous memory since from_pretrained began (MiB)")
    ax.set_title(f"{case}: host memory per rank" + (f", loader {loader}" if loader else ""))
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"memory-{case}{'-' + loader if loader else ''}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
