"""`d3dc`: parse, call the library, print."""

from __future__ import annotations

import time

import click
from rich.console import Console
from rich.table import Table

from d3d_cluster.spec import Spec, SpecError, load_spec

console = Console(highlight=False)


def echo(line: str) -> None:
    """Relay a job's output line as it is: `[teacher] ...` is not rich markup."""
    console.print(line, markup=False, soft_wrap=True)


def _spec(path: str | None, workdir: str | None) -> Spec:
    """The spec from a file, or the embedded quickstart default; --workdir overrides its workdir."""
    try:
        spec = load_spec(path) if path else Spec()
        return spec.with_overrides(workdir=workdir) if workdir else spec
    except SpecError as error:
        raise click.ClickException(str(error)) from None


spec_option = click.option("-c", "--spec", "spec_path", type=click.Path(exists=True, dir_okay=False),
                           help="Job spec (YAML). Default: the embedded quickstart spec.")
workdir_option = click.option("--workdir", type=click.Path(file_okay=False),
                              help="Where data and runs go (overrides the spec's workdir).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """D3D on a cluster: prepare video shards, train the flow teacher, distill the RGB student."""


@main.command()
@spec_option
@workdir_option
def quickstart(spec_path: str | None, workdir: str | None) -> None:
    """Make a small motion dataset, prepare shards, train teacher, student and RGB baseline; print the table."""
    from d3d_cluster.launch.pipeline import run_pipeline
    from d3d_cluster.files import write_json_atomically
    from d3d_cluster.launch.rundir import RESULTS_NAME, RunDir

    spec = _spec(spec_path, workdir)
    started = time.time()
    _prepare(spec)
    prep_seconds = time.time() - started
    run = RunDir.create(spec)
    console.print(f"run directory: {run.path}")
    results = run_pipeline(run, echo=echo)
    results.update(prep_seconds=round(prep_seconds, 1), wall_seconds=round(time.time() - started, 1))
    write_json_atomically(run.path / RESULTS_NAME, results)
    _print_results(results)
    console.print(f"results written to {run.path / RESULTS_NAME}")


@main.command()
@spec_option
@workdir_option
@click.option("--workers", type=click.IntRange(min=1), help="Processes per machine (default: prep.workers).")
@click.option("--cluster", type=click.Choice(["local", "slurm"]), help="Where to run (default: cluster.executor).")
@click.option("--array", "tasks", type=click.IntRange(min=1), help="Slurm array tasks (with --cluster slurm).")
@click.option("--wait/--no-wait", default=True, help="Follow the Slurm jobs until the manifest is written.")
def prep(spec_path: str | None, workdir: str | None, workers: int | None, cluster: str | None, tasks: int | None,
         wait: bool) -> None:
    """Turn the spec's raw videos (or a generated motion dataset) into WebDataset shards."""
    spec = _spec(spec_path, workdir)
    where = cluster or spec.cluster.executor
    if tasks is not None and where != "slurm":
        raise click.ClickException("--array needs --cluster slurm (locally, --workers sets the parallelism)")
    if where == "slurm":
        from d3d_cluster.launch.prep import submit_prep

        spec = spec.with_overrides(**{"cluster.executor": "slurm"})
        try:
            submit_prep(spec, tasks or 1, workers or spec.prep.workers, echo=echo, wait=wait)
        except ValueError as error:
            raise click.ClickException(str(error)) from None
    else:
        _prepare(spec, workers)


@main.command()
@click.argument("stage", type=click.Choice(["teacher", "student", "baseline", "pipeline"]))
@spec_option
@workdir_option
def train(stage: str, spec_path: str | None, workdir: str | None) -> None:
    """Train one stage (or teacher, student and baseline in turn) on the spec's shards."""
    from d3d_cluster.launch.pipeline import check_ready, results_table, run_pipeline, run_stage
    from d3d_cluster.launch.rundir import RunDir

    spec = _spec(spec_path, workdir)
    try:
        check_ready(spec, "teacher" if stage == "pipeline" else stage)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    run = RunDir.create(spec)
    if stage == "pipeline":
        _print_results(run_pipeline(run, echo=echo))
    else:
        run_stage(run, stage, echo=echo)
        _print_results(results_table(run, (stage,)))


@main.command("check-spec")
@click.argument("spec_path", type=click.Path(exists=True, dir_okay=False))
def check_spec(spec_path: str) -> None:
    """Validate a job spec and print it resolved, with every default filled in."""
    spec = _spec(spec_path, None)
    click.echo(spec.to_yaml(), nl=False)
    click.echo(f"# ok: world size {spec.world_size}, gradient accumulation {spec.grad_accumulation}", err=True)


@main.command()
@click.argument("run", required=False)
@spec_option
@workdir_option
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Prometheus port (default: a free one).")
@click.option("--once", is_flag=True, help="Wait until the run's live endpoints are scraped, print them, stop.")
def monitor(run: str | None, spec_path: str | None, workdir: str | None, port: int, once: bool) -> None:
    """Start a local Prometheus on a run's metrics (RUN: a run directory or name; default the spec's run)."""
    from d3d_cluster.monitor import PrometheusError, PrometheusMissing, find_run, monitor_run

    try:
        monitor_run(find_run(run, _spec(spec_path, workdir)), port=port, once=once, echo=echo)
    except (FileNotFoundError, ValueError, PrometheusMissing, PrometheusError) as error:
        raise click.ClickException(str(error)) from None


def _prepare(spec: Spec, workers: int | None = None) -> None:
    from d3d_cluster.launch.prep import prepare_locally

    try:
        prepare_locally(spec, workers)
    except ValueError as error:  # SourceError: a listing that is missing or malformed, named
        raise click.ClickException(str(error)) from None


def _print_results(results: dict) -> None:
    table = Table(title=f"{results['run']}: top-1 on {results['val_samples']} validation videos "
                        f"(chance {results['chance']:.1%})")
    for column in ("model", "input", "top-1", "clips/s (train)", "wall s"):
        table.add_column(column, justify="left" if column in ("model", "input") else "right")
    for name, row in results["models"].items():
        table.add_row(name, row["input"], f"{row['top1']:.1%}",
                      f"{row['clips_per_second']:.1f}" if "clips_per_second" in row else "",
                      f"{row['wall_seconds']:.0f}" if "wall_seconds" in row else "")
    console.print(table)
    if "wall_seconds" in results:
        console.print(f"prep {results['prep_seconds']:.0f} s, total wall time {results['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
