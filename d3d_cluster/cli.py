"""`d3dc`: parse, call the library, print."""

from __future__ import annotations

import time

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from d3d_cluster.spec import Spec, SpecError, load_spec, parse_assignment

console = Console(highlight=False)


def echo(line: str) -> None:
    """Relay a job's output line as it is: `[teacher] ...` is not rich markup."""
    console.print(line, markup=False, soft_wrap=True)


def _spec(path: str | None, workdir: str | None, sets: dict | None = None, **flags) -> Spec:
    """The spec from a file, or the embedded quickstart default, with the command line's `--set` assignments, then
    its flags (--workdir, --nodes...) applied before it is validated."""
    overrides = {**(sets or {}), **({"workdir": workdir} if workdir else {}), **flags}
    try:
        return load_spec(path, overrides)
    except SpecError as error:
        raise click.ClickException(str(error)) from None


def _resolved(spec: Spec, say=echo) -> Spec:
    """The spec with `cluster.executor: auto` made slurm or local (said through `say`)."""
    from d3d_cluster.launch.executor import resolve_executor

    try:
        return resolve_executor(spec, say)
    except SpecError as error:
        raise click.ClickException(str(error)) from None


def _assignments(context, parameter, values: tuple[str, ...]) -> dict:
    try:
        return dict(parse_assignment(value) for value in values)
    except SpecError as error:
        raise click.BadParameter(str(error)) from None


spec_option = click.option("-c", "--spec", "spec_path", type=click.Path(exists=True, dir_okay=False),
                           help="Job spec (YAML). Default: the embedded quickstart spec.")
workdir_option = click.option("--workdir", type=click.Path(file_okay=False),
                              help="Where data and runs go (overrides the spec's workdir).")
force_option = click.option("--force", is_flag=True, help="Submit into an existing run even if the spec changes what "
                            "its stages were trained on (data, model, seed).")
set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", callback=_assignments,
                          help="Override a spec key, as YAML: --set student.distill.weight=0.5 (repeatable).")


def _seeds(context, parameter, value: str | None) -> list[int] | None:
    from d3d_cluster.launch.study import parse_seeds

    try:
        return None if value is None else parse_seeds(value)
    except SpecError as error:
        raise click.BadParameter(str(error)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """D3D on a cluster: prepare video shards, train the flow teacher, distill the RGB student."""


@main.command()
@spec_option
@workdir_option
@set_option
@force_option
def quickstart(spec_path: str | None, workdir: str | None, sets: dict, force: bool) -> None:
    """Make a small motion dataset, prepare shards, train teacher, student and RGB baseline; print the table."""
    from d3d_cluster.files import write_json_atomically
    from d3d_cluster.launch.pipeline import JobCancelled, run_pipeline
    from d3d_cluster.rundir import RESULTS_NAME, RunDir

    spec = _spec(spec_path, workdir, sets)
    if spec.cluster.executor == "auto":  # the quickstart runs here, in the foreground, whatever cluster is near
        spec = spec.with_overrides(**{"cluster.executor": "local"})
    started = time.time()
    _prepare(spec)
    prep_seconds = time.time() - started
    try:
        run = RunDir.create(spec, force)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    console.print(f"run directory: {run.path}")
    try:
        results = run_pipeline(run, echo=echo)
    except JobCancelled as error:
        raise click.ClickException(str(error)) from None
    results.update(prep_seconds=round(prep_seconds, 1), wall_seconds=round(time.time() - started, 1))
    write_json_atomically(run.path / RESULTS_NAME, results)
    _show_results(run.path, results)
    console.print(f"results written to {run.path / RESULTS_NAME}")


@main.command()
@spec_option
@workdir_option
@click.option("--workers", type=click.IntRange(min=1), help="Processes per machine (default: prep.workers).")
@click.option("--cluster", type=click.Choice(["local", "slurm"]), help="Where to run (default: cluster.executor).")
@click.option("--array", "tasks", type=click.IntRange(min=1), help="Slurm array tasks (with --cluster slurm).")
@click.option("--wait/--no-wait", default=True, help="Follow the Slurm jobs until the manifest is written.")
@set_option
def prep(spec_path: str | None, workdir: str | None, workers: int | None, cluster: str | None, tasks: int | None,
         wait: bool, sets: dict) -> None:
    """Turn the spec's raw videos (or a generated motion dataset) into WebDataset shards."""
    spec = _resolved(_spec(spec_path, workdir, sets, **({"cluster.executor": cluster} if cluster else {})))
    where = spec.cluster.executor
    if tasks is not None and where != "slurm":
        raise click.ClickException("--array needs --cluster slurm (locally, --workers sets the parallelism)")
    if where == "slurm":
        from d3d_cluster.launch.prep import submit_prep

        try:
            submit_prep(spec, tasks or 1, workers or spec.prep.workers, echo=echo, wait=wait)
        except ValueError as error:
            raise click.ClickException(str(error)) from None
    else:
        _prepare(spec, workers)


@main.command()
@click.argument("shard_dir", type=click.Path(exists=True, file_okay=False))
@spec_option
@workdir_option
@click.option("--workers", type=click.IntRange(min=1), help="Processes per machine (default: its cores).")
@click.option("--cluster", type=click.Choice(["local", "slurm"]), help="Where to run (default: cluster.executor).")
@click.option("--array", "tasks", type=click.IntRange(min=1), help="Slurm array tasks (with --cluster slurm).")
@click.option("--wait/--no-wait", default=True, help="Follow the Slurm array until every task has reported.")
@click.option("--reports", type=click.Path(exists=True, file_okay=False),
              help="Read the reports an earlier --no-wait array wrote, instead of verifying.")
@set_option
def verify(shard_dir: str, spec_path: str | None, workdir: str | None, workers: int | None, cluster: str | None,
           tasks: int | None, wait: bool, reports: str | None, sets: dict) -> None:
    """Check every shard against its manifest (SHA-256, each member's checksum); exit 1 if any is damaged."""
    import os

    from d3d_cluster.data.verify import summary_text
    from d3d_cluster.launch.verify import merged_reports, run_verify

    try:
        if reports:
            found = merged_reports(reports)
        else:
            spec = _resolved(_spec(spec_path, workdir, sets, **({"cluster.executor": cluster} if cluster else {})))
            if tasks is not None and spec.cluster.executor != "slurm":
                raise click.ClickException("--array needs --cluster slurm (locally, --workers sets the parallelism)")
            found = run_verify(spec, shard_dir, tasks or 1, workers or os.cpu_count() or 1, echo=echo, wait=wait)
    except (OSError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    if found is not None:
        echo(summary_text(shard_dir, found))
        if not all(report["ok"] for report in found):
            raise SystemExit(1)


@main.command()
@click.argument("target", type=click.Choice(["prep", "teacher", "student", "baseline", "eval", "pipeline", "doctor"]))
@spec_option
@workdir_option
@click.option("--nodes", type=click.IntRange(min=1), help="cluster.nodes")
@click.option("--gpus-per-node", type=click.IntRange(min=1), help="cluster.gpus_per_node, one rank each (sets "
              "cluster.tasks_per_node too)")
@click.option("--cpus-per-task", type=click.IntRange(min=1), help="cluster.cpus_per_task")
@click.option("--mem", help="cluster.mem: memory per node, as sbatch takes it (64G)")
@click.option("--partition", help="cluster.partition")
@click.option("--account", help="cluster.account")
@click.option("--qos", help="cluster.qos")
@click.option("--time", help="cluster.timeout_min: minutes, or MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS")
@click.option("--constraint", help="cluster.constraint: node features")
@click.option("--exclusive", is_flag=True, default=None, help="cluster.exclusive: whole nodes")
@click.option("--cluster", type=click.Choice(["slurm", "local"]), help="cluster.executor")
@click.option("--name", help="The run's name (its directory under WORKDIR/runs).")
@click.option("--array", "prep_tasks", type=click.IntRange(min=1), default=1, help="prep on Slurm: array tasks.")
@click.option("--workers", "prep_workers", type=click.IntRange(min=1), help="prep: processes per task "
              "(default: prep.workers).")
@click.option("--dry-run", is_flag=True, help="Print the sbatch scripts that would be submitted; submit nothing.")
@click.option("--seeds", callback=_seeds, help="A study of the pipeline over these seeds: 0-4, or 0,2,7.")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2", help="A study of the pipeline over these "
              "values of a spec key, read as --set reads them (repeatable: every combination).")
@click.option("--max-parallel", type=click.IntRange(min=1), help="A study on Slurm: points run at once, at most.")
@set_option
@force_option
def submit(target: str, spec_path: str | None, workdir: str | None, prep_tasks: int, prep_workers: int | None,
           dry_run: bool, seeds: list[int] | None, sweeps: tuple[str, ...], max_parallel: int | None, sets: dict,
           force: bool, **flags) -> None:
    """Queue a stage, the evaluation, the whole pipeline or dataprep on Slurm (teacher and baseline, the student
    after the teacher, the evaluation after both), or run it in the foreground with the local executor. Flags
    override the spec; everything is checked before the first job is queued. `doctor` runs `d3dc doctor` on
    each node the spec asks for, as a job, waits for it and prints every node's report. `pipeline --seeds
    --sweep` queues a study: one run per point under WORKDIR/runs/NAME, each stage trained once per distinct
    input; `d3dc status NAME` and `d3dc compare NAME` read it."""
    from d3d_cluster.launch import submit as submission
    from d3d_cluster.launch.pipeline import JobCancelled
    from d3d_cluster.launch.study import parse_sweep

    if target != "prep" and (prep_tasks != 1 or prep_workers is not None):
        raise click.ClickException("--array and --workers are for `d3dc submit prep`")
    try:
        sweep = parse_sweep(sweeps)
    except SpecError as error:
        raise click.BadParameter(str(error), param_hint="--sweep") from None
    study = bool(seeds or sweep)
    try:
        overrides = submission.flag_overrides(**flags)
    except ValueError as error:  # a malformed --time
        raise click.ClickException(str(error)) from None
    spec = _resolved(_spec(spec_path, workdir, sets, **overrides),
                     (lambda line: click.echo(f"# {line}")) if dry_run else echo)
    try:
        if dry_run:
            click.echo(submission.dry_run(spec, target, prep_tasks, prep_workers, seeds, sweep, max_parallel),
                       nl=False)
            return
        result = submission.submit(spec, target, echo=echo, prep_tasks=prep_tasks, prep_workers=prep_workers,
                                   force=force, seeds=seeds, sweep=sweep, max_parallel=max_parallel)
    except (FileNotFoundError, ValueError, JobCancelled) as error:
        raise click.ClickException(str(error)) from None
    if study:
        follow = f"`d3dc status {spec.name}`, then " if spec.cluster.executor == "slurm" else ""
        console.print(f"follow the study with {follow}`d3dc compare {spec.name}`", markup=False)
    elif target == "doctor":
        _show_doctor(result["reports"])
    elif spec.cluster.executor == "slurm" and target != "prep":
        console.print(f"follow it with `d3dc status {spec.name}` and `d3dc logs {spec.name} --follow`", markup=False)
    elif "models" in result:  # the evaluation ran in the foreground
        _show_results(spec.run_dir, result)


@main.command()
@spec_option
@workdir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def doctor(spec_path: str | None, workdir: str | None, as_json: bool) -> None:
    """What this node has for a stage of the spec (Python, torch and CUDA, GPUs, NCCL, the device, process group
    and precision a stage would use, DALI's CPU and NVDEC video decoders, DeepSpeed, Slurm's partitions, the
    metrics ports): a line per check, ok or what is wrong and what to do. Exit status 1 when something a stage
    on this node needs is broken. `d3dc submit doctor` runs it on the compute nodes."""
    import json

    from d3d_cluster.launch.doctor import node_report

    report = node_report(_resolved(_spec(spec_path, workdir), say=lambda line: None))  # the report names it
    if not as_json:
        _show_doctor([report])
        return
    click.echo(json.dumps(report, indent=2))
    if not report["ok"]:
        raise SystemExit(1)


def _show_doctor(reports: list[dict]) -> None:
    """Each node's report; exit status 1 when one of them found something broken."""
    from d3d_cluster.launch.doctor import format_report

    for report in reports:
        for line in format_report(report):
            echo(line)
    if not all(report["ok"] for report in reports):
        raise SystemExit(1)


def _run(run: str | None, spec_path: str | None, workdir: str | None):
    from d3d_cluster.monitor import find_run

    try:
        return find_run(run, _spec(spec_path, workdir))
    except FileNotFoundError as error:
        raise click.ClickException(str(error)) from None


@main.command()
@click.argument("run", required=False)
@spec_option
@workdir_option
@click.option("--per-class", is_flag=True, help="Also print per-class accuracy and the confusion matrices.")
def results(run: str | None, spec_path: str | None, workdir: str | None, per_class: bool) -> None:
    """A run's accuracy table; writes RUN/curves.png (loss, training accuracy, clips/s per stage).
    RUN: a run directory or name (default: the spec's run)."""
    import json

    from d3d_cluster.rundir import RESULTS_NAME

    try:
        path = _run(run, spec_path, workdir).path
        results_file = path / RESULTS_NAME
        if not results_file.is_file():
            raise FileNotFoundError(f"{results_file}: no results; the run's evaluation has not finished "
                                    "(`d3dc submit eval` evaluates a run's trained stages)")
        try:
            table = json.loads(results_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{results_file}: not JSON ({error})") from None
        _show_results(path, table, per_class)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None


@main.command()
@click.argument("run", required=False)
@click.option("--stage", type=click.Choice(["teacher", "student", "baseline"]), default="student", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), help="Where to write (default: RUN/export).")
@click.option("--format", "formats", type=click.Choice(["onnx"]), multiple=True,
              help="Also write STAGE.onnx (dynamic batch), checked by onnxruntime against PyTorch on validation clips.")
@spec_option
@workdir_option
def export(run: str | None, stage: str, out: str | None, formats: tuple[str, ...], spec_path: str | None,
           workdir: str | None) -> None:
    """A trained stage as a plain fp32 state dict (.pt and .safetensors), with the run's spec.yaml and a
    model.json that says how to rebuild and feed the network; with --format onnx as ONNX too. RUN: a run directory
    or name."""
    import json
    from pathlib import Path

    from d3d_cluster.train.export import export_stage

    found = _run(run, spec_path, workdir)
    try:
        files = export_stage(found, stage, Path(out) if out else found.path / "export", onnx="onnx" in formats)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    for kind, path in files.items():
        console.print(f"{kind:12} {path}", soft_wrap=True)
    if "onnx" in files:
        check = json.loads(files["model"].read_text())["onnx"]["check"]
        console.print(f"onnxruntime against PyTorch on {check['clips']} validation clips: largest logit difference "
                      f"{check['max_abs_logit_difference']:.2g} (at most {check['tolerance']:g})", soft_wrap=True)


@main.command()
@click.argument("run", required=False)
@spec_option
@workdir_option
def status(run: str | None, spec_path: str | None, workdir: str | None) -> None:
    """A run's jobs (RUN: a run directory or name; default the spec's run): Slurm state, last event, step and
    epoch, last checkpoint, requeues."""
    from d3d_cluster.launch.status import run_status

    study = _study(run, spec_path, workdir)
    if study is not None:
        _show_study_status(study)
        return
    found = _run(run, spec_path, workdir)
    spec = found.spec()
    table = Table(title=f"{spec.name}: {spec.cluster.executor} executor, {spec.world_size} ranks ({found.path})")
    for column in ("job", "job id", "state", "last event", "step", "epoch", "last checkpoint", "requeues", "note"):
        table.add_column(column, justify="right" if column in ("step", "epoch", "requeues") else "left")
    for job in run_status(found):
        checkpoint = job.checkpoint
        note = job.error or (job.slurm and (job.slurm.waiting_for or job.slurm.reason)) or job.dependency or ""
        table.add_row(job.stage, job.job_id or "", job.slurm.state if job.slurm else "",
                      f"{job.last_event} {job.last_time}", "" if job.step is None else str(job.step),
                      "" if job.epoch is None else f"{job.epoch:.2f}",
                      Text(f"{checkpoint.get('tag', '')} (step {checkpoint.get('step')}) {checkpoint['time']}")
                      if checkpoint else "", _requeues(job), Text(note))  # Text: an error is not markup
    console.print(table)


def _study(name: str | None, spec_path: str | None, workdir: str | None):
    from d3d_cluster.launch.study import find_study

    return find_study(name, _spec(spec_path, workdir).path("runs"))


def _show_study_status(path) -> None:
    from d3d_cluster.launch.pipeline import EVAL
    from d3d_cluster.launch.study import study_status
    from d3d_cluster.train.stages import STAGES

    table = Table(title=f"study {path.name} ({path}); a stage marked shared is trained once, in the first point "
                        "with the same inputs")
    for column in ("point", *STAGES, EVAL, *(f"{stage} top-1" for stage in ("teacher", "student", "baseline"))):
        table.add_column(column, justify="right" if column.endswith("top-1") else "left")
    for point in study_status(path):
        cells = []
        for job, status in point.jobs.items():
            state = "not submitted" if status is None else status.state
            if status is not None and status.step is not None and job != EVAL and not status.ended:
                state += f" step {status.step}"
            cells.append(Text(state if point.owners[job] == point.name else f"{state} (shared)"))
        models = (point.results or {}).get("models", {})
        top1 = [f"{models[stage]['top1']:.1%}" if stage in models else ""
                for stage in ("teacher", "student", "baseline")]
        table.add_row(point.name.split("/", 1)[-1], *cells, *top1)
    console.print(table)


def _requeues(job) -> str:
    """The requeues by cause, each against its own budget: `3 (preemption 2, time limit 1)`."""
    causes = ", ".join(f"{cause} {count}" for cause, count in sorted(job.requeue_causes.items()))
    return f"{job.requeues} ({causes})" if causes else str(job.requeues)


@main.command()
@spec_option
@workdir_option
def runs(spec_path: str | None, workdir: str | None) -> None:
    """The runs under the spec's workdir: their jobs' states and the last event, the most recent first."""
    from d3d_cluster.launch.status import list_runs

    spec = _spec(spec_path, workdir)
    table = Table(title=f"runs in {spec.path('runs')}")
    for column in ("run", "jobs", "last event"):
        table.add_column(column)
    for summary in list_runs(spec.path("runs")):
        table.add_row(summary.run.spec().name, ", ".join(f"{job.stage} {job.state}" for job in summary.stages),
                      summary.last_time)
    console.print(table)


@main.command()
@click.argument("run")
@spec_option
@workdir_option
@click.option("--stage", help="teacher, student, baseline or eval (default: the job that reported last).")
@click.option("--rank", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--err", is_flag=True, help="The task's stderr instead of its stdout.")
@click.option("--follow", is_flag=True, help="Keep printing until the job has ended.")
def logs(run: str, spec_path: str | None, workdir: str | None, stage: str | None, rank: int, err: bool,
         follow: bool) -> None:
    """A job's per-rank log, as submitit writes it: RUN/STAGE/submitit/JOBID_RANK_log.{out,err}."""
    from d3d_cluster.launch.status import follow_log, log_path

    found = _run(run, spec_path, workdir)
    try:
        job, path = log_path(found, stage, rank, "err" if err else "out")
    except FileNotFoundError as error:
        raise click.ClickException(str(error)) from None
    if not path.is_file() and not follow:
        raise click.ClickException(f"{path}: no log yet ({job.stage} job {job.job_id} is {job.state}; --follow waits)")
    follow_log(found, job.stage, path, echo, follow=follow)


@main.command()
@click.argument("run")
@spec_option
@workdir_option
def cancel(run: str, spec_path: str | None, workdir: str | None) -> None:
    """Cancel every live job of a run, or of every point of a study (Slurm's, and local ones run by a `d3dc submit`
    elsewhere), and record it in the run's events. A running stage checkpoints at its next step first."""
    from d3d_cluster.launch.status import cancel_run
    from d3d_cluster.launch.study import cancel_study

    study = _study(run, spec_path, workdir)
    try:
        if study is not None:
            reports = cancel_study(study)
        else:
            found = _run(run, spec_path, workdir)
            reports = [(found.path.name, *cancel_run(found))]
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None
    for name, cancelled, gone in reports:
        where = f"{name}: " if study is not None else ""
        for job in cancelled:
            console.print(f"{where}cancelled {job.stage} job {job.job_id} (was {job.state})", markup=False)
        for job in gone:
            console.print(f"{name}: {job.stage}: local job {job.job_id} ({job.last_event}) is not running on this "
                          "machine (its process is gone, or it runs on another host)", markup=False)
    if not any(cancelled or gone for _, cancelled, gone in reports):
        console.print(f"{(study or found.path).name}: no live job to cancel")


@main.command("check-spec")
@click.argument("spec_path", type=click.Path(exists=True, dir_okay=False))
@set_option
def check_spec(spec_path: str, sets: dict) -> None:
    """Validate a job spec and print it resolved, with every default filled in."""
    spec = _spec(spec_path, None, sets)
    click.echo(spec.to_yaml(), nl=False)
    click.echo(f"# ok: world size {spec.world_size}, gradient accumulation {spec.grad_accumulation}", err=True)


@main.command("model-info")
@click.option("--stage", type=click.Choice(["teacher", "student"]), default="student", show_default=True,
              help="teacher sees flow (2 channels), student RGB (3).")
@click.option("--frames", type=int, help="Clip length. Default: the spec's data.clip_frames, or 64.")
@click.option("--size", type=int, help="Square crop side. Default: the spec's data.crop_size, or 224.")
@click.option("--classes", type=int, help="Default: the spec's shard manifest (or synthetic classes), or 400.")
@click.option("--width", type=float, help="Width multiplier. Default: the spec's model.width, or 1.0.")
@click.option("--gating/--no-gating", default=None, help="Feature gating. Default: the spec's, or on.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-c", "--spec", "spec_path", type=click.Path(exists=True, dir_okay=False),
              help="Take the defaults from this job spec instead of the S3D-G paper's 64x224x224.")
@click.option("--roofline", is_flag=True, help="The training step instead: FLOPs and bytes moved per clip, layer by "
                                               "layer, and the clips/s the card's bandwidth and bf16 rate allow.")
@click.option("--gpu", "card", type=click.Choice(["h100", "h200", "a100"]), default="h100", show_default=True,
              help="With --roofline: the card whose peaks bound the step.")
@click.option("--batch", type=click.IntRange(min=1), help="With --roofline: clips a step (default: the spec's "
                                                          "data.batch_size, or 8); the weights' updates are shared.")
def model_info_command(stage: str, frames: int | None, size: int | None, classes: int | None, width: float | None,
                       gating: bool | None, as_json: bool, spec_path: str | None, roofline: bool, card: str,
                       batch: int | None) -> None:
    """Parameters and multiply-adds of the S3D-G for one clip, layer by layer; with --roofline, how close a card
    could run its training step to memory and compute limits."""
    import json

    from d3d_cluster.models.info import model_info
    from d3d_cluster.train.stages import INPUT_CHANNELS, STAGE_INPUT

    defaults = dict(frames=64, size=224, classes=400, width=1.0, gating=True, batch=8, distill=None)
    if spec_path:
        spec = _spec(spec_path, None)
        defaults = dict(frames=spec.data.clip_frames, size=spec.data.crop_size, classes=_spec_classes(spec),
                        width=spec.model.width, gating=spec.model.gating, batch=spec.data.batch_size,
                        distill=spec.student.distill)
    given = dict(frames=frames, size=size, classes=classes, width=width, gating=gating)
    chosen = {key: defaults[key] if value is None else value for key, value in given.items()}
    if roofline:
        _show_roofline(stage, chosen, batch or defaults["batch"], defaults["distill"], card, as_json)
        return
    try:
        info = model_info(chosen["classes"], INPUT_CHANNELS[STAGE_INPUT[stage]], chosen["frames"], chosen["size"],
                          chosen["width"], chosen["gating"])
    except (ValueError, RuntimeError) as error:
        raise click.ClickException(f"cannot build this S3D-G: {error}") from None
    if as_json:
        click.echo(json.dumps({"stage": stage, **chosen, **info.to_dict()}, indent=2))
        return
    c, t, h, w = info.input_shape
    table = Table(title=f"S3D-G {stage}: {c}x{t}x{h}x{w} clip, {chosen['classes']} classes, width {chosen['width']}, "
                        f"gating {'on' if chosen['gating'] else 'off'}")
    for column in ("layer", "output (C, T, H, W)", "parameters", "multiply-adds"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in info.layers:
        table.add_row(layer.name, " x ".join(map(str, layer.output_shape)), f"{layer.parameters:,}",
                      f"{layer.multiply_adds / 1e9:.3f} G")
    table.add_row("total", "", f"{info.parameters:,}", f"{info.multiply_adds / 1e9:.3f} G")
    console.print(table)
    console.print(f"{info.multiply_adds / 1e9:.2f} G multiply-adds = {2 * info.multiply_adds / 1e9:.2f} GFLOPs per clip "
                  f"forward; a training step (forward + backward) is about 3x that.")


def _show_roofline(stage: str, chosen: dict, batch: int, distill, card_name: str, as_json: bool) -> None:
    import json

    from d3d_cluster.train.roofline import CARDS, training_step

    card = CARDS[card_name]
    geometry = dict(num_classes=chosen["classes"], frames=chosen["frames"], size=chosen["size"],
                    width=chosen["width"], gating=chosen["gating"], batch_size=batch)
    try:
        steps = {name: training_step(name, **geometry, distill=distill) for name in ("teacher", "student")}
    except (ValueError, RuntimeError) as error:
        raise click.ClickException(f"cannot build this S3D-G: {error}") from None
    if as_json:
        click.echo(json.dumps({**chosen, "batch": batch, **{name: step.to_dict(card) for name, step in steps.items()}},
                              indent=2))
        return
    step = steps[stage]
    table = Table(title=f"{stage} training step per clip: {chosen['frames']}x{chosen['size']}x{chosen['size']}, "
                        f"width {chosen['width']}, batch {batch}, bf16 (bytes fused: BatchNorm and ReLU folded into "
                        f"the convolution)")
    for column in ("part", "GFLOP forward", "GFLOP backward", "MB moved", "MB fused", "FLOP/byte", "share of bytes"):
        table.add_column(column, justify="left" if column == "part" else "right")
    total_bytes = step.total("bytes_unfused")
    for part in step.parts:
        table.add_row(part.name, f"{part.forward_flops / 1e9:.2f}", f"{part.backward_flops / 1e9:.2f}",
                      f"{part.bytes_unfused / 1e6:,.0f}", f"{part.bytes_fused / 1e6:,.0f}", f"{part.intensity:.0f}",
                      f"{part.bytes_unfused / total_bytes:.1%}")
    table.add_row("total", f"{step.total('forward_flops') / 1e9:.2f}", f"{step.total('backward_flops') / 1e9:.2f}",
                  f"{total_bytes / 1e6:,.0f}", f"{step.total('bytes_fused') / 1e6:,.0f}",
                  f"{step.total('flops') / total_bytes:.0f}", "")
    console.print(table)
    limits = Table(title=f"clips/s a training step allows on the {card['name']} ({card['bandwidth'] / 1e12:g} TB/s, "
                         f"{card['bf16_flops'] / 1e12:g} bf16 TFLOP/s)")
    for column in ("step", "TFLOP a clip", "GB a clip", "GB fused", "memory", "memory fused", "compute",
                   "each op at its roof", "fused"):
        limits.add_column(column, justify="left" if column == "step" else "right")
    for name, each in steps.items():
        bound = each.limits(card)
        limits.add_row(name, f"{each.total('flops') / 1e12:.3f}", f"{each.total('bytes_unfused') / 1e9:.2f}",
                       f"{each.total('bytes_fused') / 1e9:.2f}",
                       *(f"{bound[key]:,.0f}" for key in ("memory_unfused", "memory_fused", "compute",
                                                          "per_operation_unfused", "per_operation_fused")))
    console.print(limits)
    console.print("The student's step runs its frozen teacher live (the spec's distillation, or the paper's on logits).")


def _spec_classes(spec: Spec) -> int:
    from d3d_cluster.data.schema import Manifest

    try:
        return len(Manifest.load(spec.path(spec.data.shards)).classes)
    except FileNotFoundError:
        if spec.prep.source == "synthetic":
            return spec.prep.synthetic.classes
        raise click.ClickException(f"no shard manifest at {spec.path(spec.data.shards)}: pass --classes") from None


@main.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("videos", nargs=-1, required=True)
@click.option("--clips", type=click.IntRange(min=1), default=10, show_default=True,
              help="Clips spread evenly over each video; their softmax scores are averaged.")
@click.option("--top", "top_k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="onnx: the export's STAGE.onnx on onnxruntime (CPU; export with --format onnx).")
@click.option("--batch", "batch_clips", type=click.IntRange(min=1), default=16, show_default=True,
              help="Clips a network pass takes, at least: whole videos' clips together.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads that read and cut the next videos while the network runs.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write a row per video to this .csv or .jsonl file as it "
                                                             "finishes (with a progress bar) instead of printing it.")
@click.option("--resume", is_flag=True, help="With --out: continue its file, skipping the videos it has rows for.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of tables.")
def predict(export_dir: str, videos: tuple[str, ...], clips: int, top_k: int, backend: str, batch_clips: int,
            workers: int, out: str | None, resume: bool, as_json: bool) -> None:
    """The classes an exported student (d3dc export) sees in videos, from RGB alone. VIDEOS: files, folders (the
    videos below them), quoted globs ('clips/**/*.mp4') or CSV files with a path column. A video that cannot be
    read is named and counted and the others are still scored; the exit status is then 1."""
    import os

    from d3d_cluster.predict import ExportedModel
    from d3d_cluster.predict_io import ResultsFile, list_videos

    if resume and not out:
        raise click.UsageError("--resume continues the file of --out")
    # On a CPU the network gets the cores the reading threads leave: on every core beside them, PyTorch's threads
    # waited on each other and the quickstart's student scored 7x fewer videos a second (BENCHMARKS).
    threads = max(1, len(os.sched_getaffinity(0)) - workers)
    try:
        listed = list_videos(videos)
        model = ExportedModel.load(export_dir, backend=backend, threads=threads)
        results = ResultsFile(out, top_k, resume) if out else None
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    todo = [video for video in listed if results is None or video not in results.done]
    stderr = Console(stderr=True, highlight=False)  # stdout holds the results alone (JSON lines with --json)
    try:
        counts = _predict_videos(model, todo, clips, top_k, batch_clips, workers, results, as_json, stderr)
    finally:
        if results is not None:
            results.close()
    skipped = f"; {len(listed) - len(todo)} already in {out}, skipped" if len(todo) < len(listed) else ""
    stderr.print(f"{counts['scored']} videos scored, {counts['unreadable']} unreadable{skipped}; "
                 f"{counts['videos_per_second']:.2f} videos/s ({backend} on {model.device.type}"
                 f"{f' with {threads} threads' if model.device.type == 'cpu' else ''}, batches of {batch_clips}+ "
                 f"clips, {workers} reading threads)", soft_wrap=True, markup=False)
    if counts["unreadable"]:
        raise SystemExit(1)


def _predict_videos(model, videos: list[str], clips: int, top_k: int, batch_clips: int, workers: int, results,
                    as_json: bool, stderr: Console) -> dict:
    """Score `videos`, each row written to `results` (with a progress bar) or printed as it finishes; the counts."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from d3d_cluster.predict import score_videos
    from d3d_cluster.predict_io import result_row

    counts = {"scored": 0, "unreadable": 0}
    progress = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=stderr, disable=results is None)
    started = time.perf_counter()
    with progress:
        task = progress.add_task("videos", total=len(videos))
        for scored in score_videos(model, videos, clips, batch_clips, workers):
            row = result_row(model, scored, top_k)
            counts["unreadable" if scored.error else "scored"] += 1
            if scored.error:
                progress.console.print(Text(scored.error, style="red"), soft_wrap=True)
            if results is not None:
                results.write(row)
            elif as_json:
                click.echo(json.dumps(row))
            elif not scored.error:
                table = Table(title=f"{scored.video} ({scored.clips} clips, {model.device.type})")
                table.add_column("class")
                table.add_column("probability", justify="right")
                for entry in row["top"]:
                    table.add_row(entry["class"], f"{entry['probability']:.1%}")
                console.print(table)
            progress.advance(task)
    counts["videos_per_second"] = len(videos) / max(time.perf_counter() - started, 1e-9)
    return counts


@main.command()
@click.argument("stage_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def ensemble(stage_dirs: tuple[str, ...]) -> None:
    """Top-1 of the average softmax of finished stages: RUN/student RUN/teacher (two-stream), or the students
    of two runs trained with different seeds (RUN_A/student RUN_B/student)."""
    from pathlib import Path

    from d3d_cluster.train.evaluate import ensemble_report

    try:
        report = ensemble_report([Path(d) for d in stage_dirs])
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    table = Table(title=f"ensemble over {report['val_samples']} validation videos (average of softmax scores)")
    table.add_column("model")
    table.add_column("top-1", justify="right")
    for name, top1 in report["members"].items():
        table.add_row(name, f"{top1:.1%}")
    table.add_row("ensemble", f"{report['ensemble_top1']:.1%}")
    console.print(table)


@main.command()
@click.argument("targets", nargs=-1, required=True)
@spec_option
@workdir_option
@click.option("--figure", type=click.Path(dir_okay=False), help="Where to draw the paired differences (default: "
              "STUDY/study.png for a study; none for a list of runs).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
def compare(targets: tuple[str, ...], spec_path: str | None, workdir: str | None, figure: str | None,
            as_json: bool) -> None:
    """Student against baseline, paired by seed: `d3dc compare STUDY` (a study's name or directory) or
    `d3dc compare RUN RUN...` (runs that differ only in seed make one setting). Per point and per setting: top-1
    of every network, student minus baseline with a 95% Student t interval over seeds, wins/ties/losses, the
    share of the baseline-to-teacher gap closed; points not evaluated yet show their evaluation job's state."""
    import json
    from pathlib import Path

    from d3d_cluster.compare import FIGURE_NAME, compare_runs, compare_study, write_figure

    study = _study(targets[0], spec_path, workdir) if len(targets) == 1 else None
    try:
        if study is not None:
            report = compare_study(study)
            figure = figure or str(study / FIGURE_NAME)
        else:
            report = compare_runs([_run(target, spec_path, workdir) for target in targets])
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise click.ClickException(f"cannot compare: {error}") from None
    if figure:
        report["figure"] = str(write_figure(report, Path(figure)))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_comparison(report)


def _print_comparison(report: dict) -> None:
    from d3d_cluster.compare import MODELS, settings_label

    points = Table(title=f"{report['study'] or 'runs'}: top-1 per point (seed x setting)")
    for column in ("setting", "seed", "teacher", "student", "baseline", "student - baseline", "gap closed",
                   "student+teacher", "evaluation"):
        points.add_column(column, justify="left" if column in ("setting", "evaluation") else "right")
    for row in report["points"]:
        top1 = row["top1"] or {}
        state = row["state"] + (f": {row['detail']}" if row["detail"] else "")
        points.add_row(Text(settings_label(row["settings"])), str(row["seed"]),
                       *(_percent(top1.get(model)) for model in ("teacher", "student", "baseline")),
                       _percent(row["student_minus_baseline"], "+"), _percent(row["gap_closed"]),
                       _percent(top1.get("student+teacher")), Text(state, style="" if top1 else "yellow"))
    console.print(points)
    settings = Table(title="per setting, over its evaluated seeds: mean ± standard deviation")
    for column in ("setting", "seeds", *MODELS, "student - baseline", "95% interval", "wins/ties/losses",
                   "left out"):
        settings.add_column(column, justify="left" if column == "setting" else "right")
    for setting in report["settings"]:
        difference = setting["student_minus_baseline"]
        interval = difference["interval"] if difference else None
        settings.add_row(Text(setting["label"]), str(len(setting["seeds"])),
                         *(_mean_sd(setting["top1"][model]) for model in MODELS), _mean_sd(difference, "+"),
                         f"[{interval[0]:+.1%}, {interval[1]:+.1%}]" if interval else
                         "none (one seed)" if difference else "-",
                         f"{setting['student_wins']}/{setting['ties']}/{setting['student_losses']}",
                         str(setting["left_out"]))
    console.print(settings)
    console.print(f"interval: {report['interval']}", soft_wrap=True)
    if "figure" in report:
        console.print(f"figure: {report['figure']}", soft_wrap=True)


def _percent(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.1%}"


def _mean_sd(summary: dict | None, sign: str = "") -> str:
    if summary is None:
        return "-"
    return _percent(summary["mean"], sign) + ("" if summary["stdev"] is None else f" ± {summary['stdev']:.1%}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--stage", type=click.Choice(["teacher", "student", "baseline"]), default="student", show_default=True)
@click.option("--epochs", type=int, help="Decoder training epochs (default: the run spec's probe.epochs).")
def probe(run_dir: str, stage: str, epochs: int | None) -> None:
    """Motion probe (D3D section 3): decode optical flow from the frozen network's layers; EPE per layer."""
    from pathlib import Path

    from d3d_cluster.rundir import RunDir
    from d3d_cluster.train.probe import PROBE_NAME, run_probe

    try:
        spec = RunDir(run_dir).spec()
        settings = (spec.with_overrides(**{"probe.epochs": epochs}) if epochs is not None else spec).probe
        result = run_probe(run_dir, stage, settings)
    except (FileNotFoundError, ValueError, MemoryError) as error:
        raise click.ClickException(str(error)) from None
    table = Table(title=f"motion probe of {result['run']}/{stage} ({result['input']} input): flow end-point error "
                        f"on {result['val_samples']} validation clips, pixels (lower is better)")
    for column in ("layer", "resolution (T, H, W)", "EPE", "zero-flow EPE", "EPE / zero"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for row in result["layers"]:
        table.add_row(row["layer"], " x ".join(map(str, row["resolution"])), f"{row['epe']:.3f}",
                      f"{row['zero_flow_epe']:.3f}",
                      f"{row['epe'] / row['zero_flow_epe']:.2f}" if row["zero_flow_epe"] > 0 else "")
    console.print(table)
    console.print(f"written to {Path(run_dir) / stage / PROBE_NAME} ({result['seconds']:.0f} s)")


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


def _show_results(run_path, results: dict, per_class: bool = False) -> None:
    """The one way a run's results are shown (quickstart, train, results): the table, per class on request,
    and the training curves, written next to them."""
    from d3d_cluster.train.curves import write_curves

    _print_results(results, per_class)
    try:
        console.print(f"training curves: {write_curves(run_path)}", soft_wrap=True)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None


def _print_results(results: dict, per_class: bool) -> None:
    classes, models = results["classes"], results["models"]
    top_k = min(5, len(classes))
    table = Table(title=f"{results['run']}: video-level accuracy on {results['val_samples']} validation videos, "
                        f"{results['views_per_video']} views each (chance {results['chance']:.1%})")
    for column in ("model", "input", "top-1", f"top-{top_k}", "clips/s (train)", "wall s"):
        table.add_column(column, justify="left" if column in ("model", "input") else "right")
    for name, row in models.items():
        table.add_row(name, row["input"], f"{row['top1']:.1%}", f"{row['top5']:.1%}",
                      f"{row['clips_per_second']:.1f}" if "clips_per_second" in row else "",
                      f"{row['wall_seconds']:.0f}" if "wall_seconds" in row else "")
    console.print(table)
    for name, row in models.items():
        if row.get("skipped_videos"):
            console.print(f"{name}: {row['skipped_videos']} videos could not be decoded and were not scored; top-1 "
                          f"counting them as wrong: {row['top1_all_videos']:.1%}")
    if "prep_seconds" in results:
        console.print(f"prep {results['prep_seconds']:.0f} s, total wall time {results['wall_seconds']:.0f} s")
    if per_class:
        _print_per_class(classes, models)


MAX_CONFUSION_CLASSES = 20  # wider matrices do not fit a terminal; results.json has them all


def _print_per_class(classes: list[str], models: dict) -> None:
    videos = [sum(counts) for counts in next(iter(models.values()))["confusion"]]
    table = Table(title="per-class top-1 (videos of the class)")
    for column in ("class", "videos", *models):
        table.add_column(column, justify="left" if column == "class" else "right")
    for index, name in enumerate(classes):
        accuracies = [row["per_class"][name] for row in models.values()]
        table.add_row(name, str(videos[index]), *("-" if a is None else f"{a:.1%}" for a in accuracies))
    console.print(table)
    for model, row in models.items():
        if len(classes) > MAX_CONFUSION_CLASSES:
            console.print(f"{model}: the {len(classes)}-class confusion matrix is in results.json")
            continue
        console.print(f"{model}: confusion matrix in videos (rows: true class, columns: predicted class)",
                      soft_wrap=True)
        matrix = Table()
        matrix.add_column("true class")
        for index in range(len(classes)):
            matrix.add_column(str(index), justify="right")
        for index, (name, counts) in enumerate(zip(classes, row["confusion"])):
            matrix.add_row(f"{index} {name}", *(str(count) if count else "." for count in counts))
        console.print(matrix)


if __name__ == "__main__":
    main()
