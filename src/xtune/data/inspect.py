"""`xtune data inspect`: what the data stage makes of a run's datasets, without training."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from xtune.config.schema import RunSpec
from xtune.data.loader import PackedData
from xtune.data.multimodal import IMG_CONTEXT
from xtune.data.types import IGNORE_INDEX

HIST_BINS = 10
BAR = 40


def length_histogram(lengths: np.ndarray, bins: int = HIST_BINS) -> list:
    """[(low, high, count)] over `bins` equal-width bins of the sample lengths."""
    if len(lengths) == 0:
        return []
    counts, edges = np.histogram(lengths, bins=bins)
    return [(int(edges[i]), int(edges[i + 1]), int(c)) for i, c in enumerate(counts)]


# Around trained spans when colour cannot show them (a pipe, a log file, CI).
TRAINED_OPEN, TRAINED_CLOSE = "«", "»"


def render_sample(tokenizer, ids, labels, delimiters: bool = False) -> Text:
    """The sample's text, trained tokens highlighted (a token is trained when the previous label names it);
    with `delimiters` each trained span is also written between « and ».

    Runs of image tokens are shown as one `<IMG_CONTEXT>xN` marker.
    """
    out = Text()
    ids = [int(t) for t in ids]
    trained = [False] + [int(x) != IGNORE_INDEX for x in labels[:-1]]
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT) if IMG_CONTEXT in tokenizer.get_vocab() else None

    def kind(i):
        return "img" if ids[i] == ctx else trained[i]

    # Decode runs of one kind together so multi-byte characters stay whole.
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or kind(i) != kind(start):
            if kind(start) == "img":
                out.append(f"{IMG_CONTEXT}x{i - start}", style="magenta")
            else:
                piece = tokenizer.decode(ids[start:i])
                if delimiters and trained[start]:
                    piece = TRAINED_OPEN + piece + TRAINED_CLOSE
                out.append(piece, style="bold green" if trained[start] else "dim")
            start = i
    return out


def _spec_format(spec: RunSpec, name: str) -> str:
    return next((d.format for d in spec.data.datasets if d.name == name), "messages")


def inspect_data(spec: RunSpec, tokenizer, console: Console | None = None, *, sample_index: int = 0) -> PackedData:
    """Print per dataset its counts and length histogram, the packing efficiency and one rendered sample."""
    console = console or Console()
    data = PackedData(spec.data.datasets, spec, tokenizer, shuffle=True, verbose=False)
    table = Table(title="datasets")
    for col in ("name", "format", "records", "samples", "tokens", "trained", "truncated", "dropped", "skipped"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for ds, st in zip(data.datasets, data.stats.datasets):
        dropped = st["dropped_image_cut"] + st["dropped_no_loss"]
        fmt = ds.format + (" (auto)" if _spec_format(spec, ds.name) == "auto" else "")
        table.add_row(st["name"], fmt, str(st["records"]), str(st["samples"]), str(st["tokens"]),
                      str(st["trained_tokens"]), str(st["truncated"]), str(dropped), str(st["skipped"]))
    console.print(table)
    for ds, st in zip(data.datasets, data.stats.datasets):
        hist = length_histogram(ds.lengths)
        console.print(f"[bold]{ds.name}[/bold] sample lengths (tokens):")
        peak = max((c for _, _, c in hist), default=1) or 1
        for lo, hi, c in hist:
            console.print(f"  {lo:>7}-{hi:<7} {'#' * round(BAR * c / peak):<{BAR}} {c}")
        if st["skipped"]:
            kinds = ", ".join(f"{n} {kind}" for kind, n in st["skipped_kinds"].items())
            console.print(f"  [red]skipped[/red] {st['skipped']} bad record(s) (data.on_error=skip): {kinds}")
        for e in st["errors"]:  # as Text: a message may hold brackets that are not markup
            console.print(Text("  skipped ", style="red") + Text(e))
    s = data.stats
    console.print(
        f"packing [bold]{spec.data.pack}[/bold]: {s.samples} samples -> {s.rows} rows of "
        f"{spec.data.pack_max_length} tokens, efficiency [bold]{100 * s.packing_efficiency:.1f}%[/bold]"
    )
    if s.samples:
        k = min(sample_index, s.samples - 1)
        d, i = data.items[k]
        # A preference pair is two documents: chosen, then rejected (the prompt untrained in both).
        plain = not console.is_terminal or console.no_color
        legend = f"trained {TRAINED_OPEN}between these{TRAINED_CLOSE}" if plain else \
            "[bold green]trained[/bold green] / [dim]not trained[/dim]"
        for half in range(data.group):
            ids, labels, images = data.item(k * data.group + half)
            source = data.datasets[d].sources[i * data.group + half]
            what = ("chosen ", "rejected ")[half] if data.group == 2 else ""
            console.print(f"{what}sample {source} ({len(ids)} tokens, {len(images)} image(s)); {legend}:")
            console.print(render_sample(tokenizer, ids, labels, delimiters=plain))
    return data
