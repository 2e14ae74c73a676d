"""The `xtune` command line: a thin Typer layer over config -> launch.

Only typer (and xtune.errors) is imported at module level so that `xtune --help` answers at once; Hydra, torch and
the engine are imported inside the commands that need them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from xtune.errors import XtuneError

app = typer.Typer(
    name="xtune",
    help="Fine-tune language and vision-language models from declarative YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the composed configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect datasets: counts, lengths, packing and the label mask.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

OVERRIDES = typer.Argument(None, help="Hydra overrides: recipe=NAME|path.yaml, group=option, key=value ...")
CONFIG_DIR = typer.Option(
    None, "--config-dir", "-cd", help="Extra folder with config groups (model/, data/, ...) and recipes/."
)


def _fail(error: BaseException) -> None:
    # lazy: keeps `xtune --help` fast
    from rich.console import Console
    from rich.markup import escape

    # The message is text, not markup: "[width, height]" in it must print as it is.
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, markup=True,
                               soft_wrap=True)
    raise typer.Exit(getattr(error, "exit_code", 2))


def _guarded(fn):
    """Run a command body; a user's mistake becomes one message and a non-zero exit, never a traceback."""
    try:
        return fn()
    except XtuneError as e:
        _fail(e)


def _training_command(name: str, doc: str):
    """Register `xtune <name>`: the training commands differ only in the primary config they compose."""

    def command(
        overrides: list[str] | None = OVERRIDES,
        multirun: bool = typer.Option(False, "--multirun", "-m", help="Run one job per point of the sweep."),
        cfg: str | None = typer.Option(None, "--cfg", "-c", help="Print the config (job|hydra|all) and exit."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Compose, validate and print the plan; build nothing."),
        config_dir: list[str] | None = CONFIG_DIR,
    ):
        # lazy: keeps `xtune --help` fast
        from xtune.commands import train_command

        code = _guarded(
            lambda: train_command(name, list(overrides or []), multirun=multirun, cfg=cfg, dry_run=dry_run,
                                  config_dirs=list(config_dir or []))
        )
        raise typer.Exit(code or 0)

    command.__doc__ = doc
    command.__name__ = name
    return app.command(name=name, context_settings={"allow_extra_args": False})(command)


sft = _training_command("sft", "Supervised fine-tuning: compose the recipe and overrides, validate, and train.")
dpo = _training_command("dpo", "Preference tuning (DPO, IPO, SimPO, ORPO; see pref.*) on chosen/rejected pairs: "
                               "compose, validate, and train.")
grpo = _training_command("grpo", "Online RL (GRPO, Dr. GRPO, DAPO, GSPO, RLOO; see grpo.*): sample completions of "
                                 "prompts, score them with rewards, and train on them: compose, validate, and train.")


@app.command()
def recipes(config_dir: list[str] | None = CONFIG_DIR):
    """List the recipes: model, data and a one-line description."""
    # lazy: keeps `xtune --help` fast
    from xtune.commands import recipes_table

    _guarded(lambda: recipes_table(list(config_dir or [])))


@config_app.command("show")
def config_show(overrides: list[str] | None = OVERRIDES, config_dir: list[str] | None = CONFIG_DIR):
    """Print the resolved configuration."""
    # lazy: keeps `xtune --help` fast
    from xtune.commands import show_config

    _guarded(lambda: show_config(list(overrides or []), list(config_dir or [])))


@data_app.command("inspect")
def data_inspect(overrides: list[str] | None = OVERRIDES, config_dir: list[str] | None = CONFIG_DIR):
    """Per dataset: samples, tokens, truncated/dropped, length histogram; packing; one labelled sample."""
    # lazy: keeps `xtune --help` fast
    from xtune.commands import inspect_data

    _guarded(lambda: inspect_data(list(overrides or []), list(config_dir or [])))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder, e.g. work_dirs/demo/<run>/checkpoints/step-100"),
    out: Path = typer.Argument(..., help="Output folder for the Hugging Face model"),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="Adapter runs: write the PEFT adapter folder"),
    merged: bool = typer.Option(False, "--merged", help="Adapter runs: write the base model merged with the adapters"),
):
    """Export a checkpoint as a Hugging Face folder (safetensors, config, tokenizer), or an adapter run's
    PEFT folder (--adapter-only) or merged model (--merged); without a flag the run's peft.merge_on_export decides."""
    # lazy: keeps `xtune --help` fast
    from xtune.checkpoint.hf_export import export_checkpoint

    if adapter_only and merged:
        _guarded(_both_export_flags)
    what = "adapter" if adapter_only else "merged" if merged else None
    _guarded(lambda: export_checkpoint(checkpoint, out, what=what))
    typer.echo(f"exported {checkpoint} -> {out}")


@app.command()
def runs(dirs: list[Path] = typer.Argument(..., help="Run directories or sweep directories (their jobs)"),
         sort: str | None = typer.Option(None, "--sort", help="Order by a column, best first: eval/<task>/<metric>, "
                                            "final_loss, best_eval_loss, trained_tokens_per_s")):
    """Compare finished runs: varying overrides, status, final loss, best eval_loss, trained tokens/s, eval task
    metrics (eval/<task>/<metric>)."""
    # lazy: keeps `xtune --help` fast
    from rich.console import Console

    # lazy: keeps `xtune --help` fast
    from xtune.runs import summarize

    _guarded(lambda: summarize(dirs, Console(highlight=False, soft_wrap=True), sort=sort))


@app.command(name="eval")
def eval_(
    path: Path = typer.Argument(..., help="A run directory, a Hugging Face folder or a PEFT adapter folder"),
    overrides: list[str] | None = OVERRIDES,
    out: Path | None = typer.Option(None, "--out", "-o", help="Where eval/<task>/ goes (default: the run "
                                       "directory; required for a bare model folder)"),
    multirun: bool = typer.Option(False, "--multirun", "-m", help="One job per point of the sweep (same model)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Compose and validate the tasks; load nothing."),
    config_dir: list[str] | None = CONFIG_DIR,
):
    """Evaluate a model on a task (eval=NAME from conf/eval, or eval.data.path=FILE eval.scorer=...): a table of
    metrics, eval/<task>/samples.jsonl and summary.json; harness.tasks=[...] runs lm-evaluation-harness too."""
    # lazy: keeps `xtune --help` fast
    from xtune.commands import eval_command

    code = _guarded(lambda: eval_command(path, list(overrides or []), out=out, multirun=multirun, dry_run=dry_run,
                                         config_dirs=list(config_dir or [])))
    raise typer.Exit(code or 0)


@app.command()
def plot(
    dirs: list[Path] = typer.Argument(..., help="Run directories or sweep directories (their jobs)"),
    out: Path = typer.Option(Path("plot.png"), "-o", "--out", help="PNG file to write"),
    metric: str = typer.Option("loss", "--metric", help="A metrics.jsonl field: loss, eval_loss, lr, grad_norm, ..."),
):
    """Draw one metric of several runs in one PNG, each line labelled by the run's varying overrides."""
    # lazy: keeps `xtune --help` fast
    from xtune.runs import find_runs, plot_runs

    def body():
        fig = plot_runs(find_runs(dirs), metric)
        fig.savefig(out, dpi=110)
        typer.echo(f"wrote {out}")

    _guarded(body)


@app.command()
def chat(
    path: Path = typer.Argument(..., help="A run directory, a Hugging Face model folder or a PEFT adapter folder"),
    overrides: list[str] | None = typer.Argument(None, help="Generation settings: gen.KEY=VALUE (gen.temperature=0.7, "
                                                               "gen.max_new_tokens=64, gen.stop=[...]) or gen=NAME"),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Answer this prompt, print the answer and exit"),
    image: Path | None = typer.Option(None, "--image", help="An image for the (first) turn: vision-language models"),
    system: str | None = typer.Option(None, "--system", help="A system prompt"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Same as gen.max_new_tokens=N"),
    temperature: float | None = typer.Option(None, "--temperature", help="Same as gen.temperature=T (0: greedy)"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Run Python code shipped in the model folder (read it first)"),
    config_dir: list[str] | None = CONFIG_DIR,
):
    """Chat with a model in the terminal (streamed; /reset, /system TEXT, /image FILE, /exit). With --prompt, or a
    prompt piped on standard input, print one answer and exit."""
    # lazy: keeps `xtune --help` fast
    from xtune.commands import chat_command

    code = _guarded(lambda: chat_command(
        path, list(overrides or []), prompt=prompt, image=image, system=system,
        flags={"max_new_tokens": max_new_tokens, "temperature": temperature}, device=device,
        trust_remote_code=trust_remote_code, config_dirs=list(config_dir or [])))
    raise typer.Exit(code or 0)


def _both_export_flags():
    raise XtuneError("--adapter-only and --merged exclude each other: give one (or neither)")


def main() -> None:
    # torchrun passes `-m xtune sft ...`; keep argv as the user typed it for cmd.txt.
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    app(prog_name="xtune")


if __name__ == "__main__":
    main()
    sys.exit(0)
