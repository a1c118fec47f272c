"""The `imprint` command."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .console import die, quiet_libraries

app = typer.Typer(add_completion=False, help="Batch edit-friendly DDPM inversion and editing.",
                  context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"imprint {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main_options(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Batch edit-friendly DDPM inversion and editing."""
    quiet_libraries()
    if ctx.invoked_subcommand is None:  # bare `imprint`: the help, and success
        typer.echo(ctx.get_help())
        raise typer.Exit()


@app.command()
def run(
    job: Path = typer.Argument(..., help="Job spec (TOML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set edit.seeds=8 (repeatable)."),
    executor: Optional[str] = typer.Option(None, help="ray | inline (default: run.executor of the job)."),
    ray_address: Optional[str] = typer.Option(
        None, help="Join this Ray cluster (\"auto\", host:port, ray://...). Default: run.ray_address, else "
                   "$RAY_ADDRESS (set inside `ray job submit`), else a local cluster."),
    force: bool = typer.Option(False, help="Redo every shard, even those done under this or another spec."),
    progress: bool = typer.Option(True, help="Show the live progress line."),
) -> None:
    """Invert every image of the input shards and write N edits per target prompt."""
    from .executor import JobError
    from .spec import SpecError, load_spec

    overrides = list(set_)
    if executor:
        overrides.append(f"run.executor={executor}")
    if ray_address:
        overrides.append(f'run.ray_address="{ray_address}"')
    try:
        spec = load_spec(job, overrides)
        report = _run_job(spec, force=force, progress=progress)
    except (SpecError, JobError) as exc:
        die(str(exc))
    out = os.path.abspath(spec.output.path) if "://" not in spec.output.path else spec.output.path
    typer.echo(
        f"imprint: {report.done} shard(s) processed, {report.skipped} already done, {len(report.failed)} failed; "
        f"{report.images} images, {report.errors} bad samples, {report.edits} edits in {report.seconds:.1f} s"
    )
    if report.error_types:
        typer.echo("imprint: bad samples by kind: " + ", ".join(f"{k} {n}" for k, n in report.error_types.most_common()))
    for url, record in report.failures.items():
        typer.echo(f"imprint: shard failed after {record['attempts']} attempt(s): {url}: {record['error']}", err=True)
        for line in record.get("traceback", []):
            typer.echo(f"    {line}", err=True)
    typer.echo(f"imprint: results in {out}/results, sources in {out}/sources" + (f", noise in {out}/noise" if spec.output.noise else ""))
    if report.failed:
        raise typer.Exit(1)


def _run_job(spec, **kwargs):
    """run_job, with the two ways a job stops early turned into messages and
    exit codes: the scheduler stopped it (workers that cannot start, no
    worker placed in time: 1) and Ctrl-C / SIGTERM (130 / 143)."""
    from .executor import JobInterrupted, JobStopped, OutputTakenOver, run_job

    try:
        return run_job(spec, **kwargs)
    except JobStopped as exc:
        typer.echo(f"imprint: error: {exc}", err=True)
        for line in exc.info.get("traceback", []):
            typer.echo(f"    {line}", err=True)
        if isinstance(exc, OutputTakenOver):
            typer.echo(f"imprint: another run now writes {spec.output.path}; this one wrote nothing more", err=True)
            raise typer.Exit(1)
        typer.echo(f"imprint: the job stopped; shards done are kept and the same command resumes; "
                   f"`imprint status {spec.output.path}` keeps this message", err=True)
        raise typer.Exit(1)
    except JobInterrupted as exc:
        r = exc.report
        typer.echo(f"imprint: interrupted ({exc}): {r.done + r.skipped} of {r.total} shards done "
                   f"({r.done} in this run); run the same command again to resume", err=True)
        raise typer.Exit(128 + exc.signum)


@app.command("edit-codes")
def edit_codes(
    codes: str = typer.Argument(..., help="A job's output folder or its noise/ folder."),
    job: Path = typer.Argument(..., help="Job spec with the new target prompts (input.templates) and output path."),
    set_: list[str] = typer.Option([], "--set", help="Override a field (repeatable)."),
    executor: Optional[str] = typer.Option(None, help="ray | inline."),
    progress: bool = typer.Option(True, help="Show the live progress line."),
) -> None:
    """Edit stored noise codes with new target prompts, without inverting again."""
    from .executor import JobError
    from .spec import SpecError

    try:
        spec = _codes_spec(codes, job, list(set_) + ([f"run.executor={executor}"] if executor else []))
        report = _run_job(spec, progress=progress)
    except (SpecError, JobError) as exc:
        die(str(exc))
    typer.echo(f"imprint: {report.images} codes re-edited into {report.edits} edits "
               f"({report.errors} unusable, {len(report.failed)} files failed); results in {spec.output.path}/results")
    if report.failed:
        raise typer.Exit(1)


def _codes_spec(codes: str, job: Path, overrides: list[str]):
    """The spec of an edit-codes job: the job file with its input.shards
    replaced by the stored codes."""
    from .spec import load_raw, load_spec

    raw = load_raw(job)
    raw.setdefault("input", {}).pop("shards", None)
    raw["input"]["codes"] = codes
    return load_spec(raw=raw, overrides=overrides)


@app.command("inspect-noise")
def inspect_noise(
    codes: str = typer.Argument(..., help="A job's output folder or its noise/ folder."),
    out: Path = typer.Option(Path("noise-stats"), help="Folder for noise_stats.png and noise_stats.json."),
    limit: int = typer.Option(256, help="Use at most this many codes."),
) -> None:
    """Per-timestep std and consecutive correlation of the noise maps and the angle
    histogram, next to native sampling (the paper's Figs. 5, 6, 12)."""
    from .noise_stats import inspect_codes

    try:
        summary = inspect_codes(codes, out, limit=limit)
    except ValueError as exc:
        die(str(exc))
    for label, st in summary.items():
        typer.echo(f"{label:>24}: {st['num_codes']} codes, std {st['std_mean']:.3f}, "
                   f"corr(z_t, z_t-1) {st['corr_mean']:+.3f}, mean angle {st['angle_mean']:.1f} deg")
    typer.echo(f"imprint: wrote {out / 'noise_stats.png'} and {out / 'noise_stats.json'}")


@app.command()
def validate(
    job: Path = typer.Argument(..., help="Job spec (TOML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field (repeatable)."),
    codes: Optional[str] = typer.Option(None, help="Validate it as an edit-codes job on these stored codes "
                                                   "(a job's output folder or its noise/ folder)."),
    force: bool = typer.Option(False, help="As run --force: the output may hold another spec's results."),
) -> None:
    """Run every check `imprint run` makes before it starts (the spec, the
    model and device, weights at hand, the shards, the output path) and print
    the spec resolved, without running anything."""
    from .preflight import JobError, preflight
    from .spec import SpecError, load_spec, to_toml

    try:
        spec = _codes_spec(codes, job, list(set_)) if codes is not None else load_spec(job, list(set_))
        found = preflight(spec, force=force)
    except (SpecError, JobError) as exc:
        die(str(exc))
    typer.echo(to_toml(spec))
    typer.echo(f"# spec hash {found.spec_hash}")
    typer.echo(f"# {len(found.shards)} {'code file' if spec.input.codes else 'shard'}(s); output "
               f"{spec.output.path} is free or holds this spec")
    if not spec.input.codes and found.shards:
        from .prompts import targets_preview

        try:
            preview = targets_preview(spec, found.shards[0])
            if preview is not None:
                typer.echo(preview.line())
        except OSError as exc:
            typer.echo(f"# first shard: not read ({exc})")


@app.command()
def pull(
    model: Optional[str] = typer.Argument(None, help="Hub id (owner/name) of a diffusers model; default: the "
                                                     "--job's model.id. Built-in ids need nothing."),
    scorers: bool = typer.Option(False, "--scorers", help="Also fetch the scorer weights (CLIP, LPIPS trunk) the "
                                                          "job's [score] section uses, or the defaults for MODEL."),
    job: Optional[Path] = typer.Option(None, "--job", help="Job spec whose model and [score] section to fetch for."),
    to: Optional[Path] = typer.Option(None, "--to", help="Put the model in this folder (a diffusers folder that "
                                                         "model.id can name) instead of the Hugging Face cache."),
    revision: Optional[str] = typer.Option(None, help="Model revision (default: the job's model.revision, else main)."),
) -> None:
    """Fetch a model's weights (and with --scorers the scorers') into the
    caches the workers read (HF_HOME, TORCH_HOME), showing sizes first and
    progress; `imprint validate` then finds them."""
    from .console import show_download_progress
    from .pull import PullError, job_scorers, pull_model, pull_scorers
    from .spec import SpecError, load_spec

    if model is None and job is None:
        die("name a MODEL or a --job")
    try:
        if job is not None:
            spec = load_spec(job)
            model = model or spec.model.id
            revision = revision or spec.model.revision or None
        show_download_progress()
        pull_model(model, revision, to, typer.echo)
        if scorers:
            pull_scorers(job_scorers(model, job), typer.echo)
    except (SpecError, PullError) as exc:
        die(str(exc))


@app.command()
def status(
    out: str = typer.Argument(..., help="Output path of a job."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """What is done, failed (with reasons) and left for a job's output."""
    from .status import job_status

    try:
        st = job_status(out)
    except (FileNotFoundError, ValueError) as exc:
        die(str(exc))
    if as_json:
        typer.echo(json.dumps(st, indent=1))
        return
    typer.echo(f"output: {st['output']}  (spec hash {st['spec_hash']})")
    typer.echo(f"shards: {st['total']} total, {len(st['done'])} done, {len(st['failed'])} failed, {len(st['left'])} left")
    typer.echo(f"images: {st['images']}  bad samples: {st['errors']}  edits: {st['edits']} (kept {st['kept']})")
    if st["error_types"]:
        typer.echo("bad samples by kind: " + ", ".join(f"{k} {n}" for k, n in st["error_types"].items()))
    if st["stopped"]:
        typer.echo(f"last run stopped: {st['stopped'].get('error')}")
        for line in st["stopped"].get("traceback", []):
            typer.echo(f"    {line}")
    for name, info in st["failed"].items():
        typer.echo(f"  failed {name}: {info.get('error')} (after {info.get('attempts')} attempts)")
        for line in info.get("traceback", [])[-3:]:
            typer.echo(f"      {line}")
    for url in st["left"][:20]:
        typer.echo(f"  left   {url}")
    if len(st["left"]) > 20:
        typer.echo(f"  ... and {len(st['left']) - 20} more")


@app.command()
def verify(
    out: str = typer.Argument(..., help="Output path of a job (local or URL)."),
    mark: bool = typer.Option(True, help="Mark bad shards for rerun (their marker goes; the next run redoes them)."),
) -> None:
    """Read every committed file back and check it against the SHA-256 and size
    its marker recorded (bit flips, truncation, missing files). Exit 1 when
    anything is bad."""
    from .store import LEASE_FILE, OutputError, OutputStore

    store = OutputStore.open(out)
    try:
        spec_hash = store.current_hash()
        if spec_hash is None:
            die(f"{out!r} is not an imprint output (no job.json)")
        bad = store.verify(spec_hash)
        checked = len(store.done_shards(spec_hash))
        for shard, what in sorted(bad.items()):
            typer.echo(f"imprint: bad shard {shard}: {what}", err=True)
        if bad and mark:
            store.prepare_lease()
            try:
                store.mark_for_rerun(bad, spec_hash)
            finally:
                store.release()
    except OutputError as exc:
        die(f"{exc}" + (f" ({LEASE_FILE}: a job is writing this output; run verify after it ends)"
                        if "another driver" in str(exc) else ""))
    typer.echo(f"imprint: verified {checked} committed shard(s) of spec {spec_hash}: {len(bad)} bad"
               + (", marked for rerun" if bad and mark else ""))
    if bad:
        raise typer.Exit(1)


@app.command()
def export(
    out: str = typer.Argument(..., help="Output path of a job (local or URL)."),
    dest: Path = typer.Argument(..., help="Local folder to write into."),
    format_: str = typer.Option("webdataset", "--format", help="webdataset | files (a Hugging Face imagefolder)."),
    maxcount: int = typer.Option(1000, help="Edits per WebDataset shard."),
    rejected: bool = typer.Option(False, help="Also export rejected edits whose images were written."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty DEST whole, once the new export is written."),
    partial: bool = typer.Option(False, help="Export an unfinished job's committed shards."),
) -> None:
    """Export the kept edits (edit, pixel-aligned source, prompts, seed, parameters,
    scores, carried metadata) as WebDataset shards, or with --format files as a Hugging Face imagefolder
    (metadata.jsonl: the edit in file_name, its source in source_file_name). DEST must be empty or new
    (--overwrite replaces it); an unfinished job is refused unless --partial."""
    from .export import export as run_export

    try:
        done = run_export(out, str(dest), format_, maxcount=maxcount, include_rejected=rejected,
                          overwrite=overwrite, partial=partial)
    except (ValueError, OSError) as exc:
        die(str(exc))
    if done["partial"]:
        typer.echo(f"imprint: warning: partial export of an unfinished job: {done['partial']}", err=True)
    if not done["edits"]:
        typer.echo(f"imprint: warning: no edits to export from {out} (none kept"
                   + ("" if rejected else "; --rejected adds rejected edits whose images were written") + ")", err=True)
    typer.echo(f"imprint: exported {done['edits']} edits to {dest} ({len(done['files'])} file(s))")


@app.command()
def shards(
    src: str = typer.Argument(..., help="A folder of images with .txt/.json captions, a Hugging Face imagefolder "
                                        "(metadata.jsonl) or dataset folder (save_to_disk, Parquet), or a "
                                        "CSV/TSV/JSONL/Parquet file."),
    dest: str = typer.Argument(..., help="Folder (local, s3://, gs://, hdfs://) for the .tar shards."),
    image_col: Optional[str] = typer.Option(None, help="Column with the image path, URL or bytes (default: "
                                                       "image, file_name, path, url, ... or the dataset's Image column)."),
    caption_col: Optional[str] = typer.Option(None, help="Column with the caption, used as the source prompt "
                                                         "(default: source_prompt, caption, text or prompt if present)."),
    targets_col: Optional[str] = typer.Option(None, help="Column with target prompts: a list, a JSON list or one "
                                                         "prompt (default: target_prompts if present)."),
    key_col: Optional[str] = typer.Option(None, help="Column with the table's own id: each sample's key (kept in its "
                                                     "json too; default: the row number)."),
    mask_col: Optional[str] = typer.Option(None, help="Column with each image's edit mask: a PNG of the image's size "
                                                      "(path read as image paths are, or bytes; white = the region to "
                                                      "edit), written as edit_mask.png. A folder's masks: cat.mask.png "
                                                      "beside cat.jpg."),
    targets: list[str] = typer.Option([], "--targets", help="A target prompt for every sample (repeatable)."),
    target_template: list[str] = typer.Option([], "--target-template",
                                              help="A target prompt for every sample, filled from its json fields: "
                                                   "\"{source}, in the snow\" ({source}: the caption; repeatable)."),
    samples_per_shard: int = typer.Option(1000, help="Samples per .tar shard."),
    prefix: str = typer.Option("shard", help="Shard names: PREFIX-000000.tar, ..."),
    overwrite: bool = typer.Option(False, help="Replace PREFIX-*.tar shards already in DEST (once the run succeeds)."),
    timeout: float = typer.Option(30.0, help="Seconds one image URL download may take in all (not per read)."),
    allow_outside: bool = typer.Option(False, help="Trusted table: read image paths anywhere on disk, not only "
                                                   "inside the table's folder."),
    allow_private: bool = typer.Option(False, help="Fetch URLs on loopback, link-local and private addresses "
                                                   "(refused by default, redirects included)."),
    max_image_mb: int = typer.Option(256, help="Largest image file or download, in MiB."),
    workers: int = typer.Option(8, help="Threads reading files and downloading URLs."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    format_: Optional[str] = typer.Option(None, "--format", help="pie-bench: SRC is a PIE-Bench folder "
                                                                 "(mapping_file.json, annotation_images/)."),
) -> None:
    """Write one's own images (with captions, labels, or nothing) as WebDataset shards for `imprint run`; bad
    inputs are skipped and listed with their reasons."""
    from .ingest import IngestError, make_shards, summary_lines

    try:
        source = None
        if format_ is not None:  # a benchmark's own layout: its reader builds the source
            from .pie_bench import format_source

            source = format_source(format_, src)
        summary = make_shards(src, dest, image_col=image_col, caption_col=caption_col, targets_col=targets_col,
                              key_col=key_col, mask_col=mask_col, targets=targets, target_templates=target_template,
                              samples_per_shard=samples_per_shard, prefix=prefix, overwrite=overwrite,
                              timeout=timeout, workers=workers, progress=progress, allow_outside=allow_outside,
                              allow_private=allow_private, max_image_bytes=max_image_mb * 2**20, source=source)
    except (IngestError, OSError) as exc:
        die(str(exc))
    for line in summary_lines(summary):
        typer.echo(line)
    if not summary.written:
        die(f"no samples written from {src}")


@app.command("eval")
def eval_(
    outs: list[str] = typer.Argument(..., help="Job outputs (local paths or URLs) whose results/ tables to read."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the means as JSON to this file."),
    by: Optional[str] = typer.Option(None, help="Also one table per value of this field of the input's json "
                                                "(e.g. editing_type for PIE-Bench shards)."),
    published: bool = typer.Option(False, help="Print the published PIE-Bench rows beside."),
) -> None:
    """PIE-Bench's table (structure distance, background PSNR / LPIPS / MSE / SSIM, CLIP whole / edited) per
    method, in the published units, from the results of samples that carry an edit mask."""
    from .pie_eval import evaluate, format_report

    try:
        report = evaluate(outs, by)
    except (ValueError, OSError) as exc:
        die(str(exc))
    typer.echo(format_report(report, published))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


@app.command()
def schemas(
    write: Optional[Path] = typer.Option(None, help="Write the table schemas as JSON into this folder."),
) -> None:
    """Print (or write) the job spec and output table schemas."""
    from .spec import job_json_schema
    from .tables import TABLES, dump_schema_json

    texts = {"job": json.dumps(job_json_schema(), indent=2) + "\n"}
    texts.update({name: dump_schema_json(name) for name in TABLES})
    for name, text in texts.items():
        if write:
            (write / f"{name}.schema.json").write_text(text)
        else:
            typer.echo(text)


from .report import report as report_command  # noqa: E402

app.command("report")(report_command)


from .bench import bench as bench_command  # noqa: E402

app.command("bench")(bench_command)


def _one_line_listing() -> None:
    """`imprint -h` lists each command by the first sentence of its doc, as
    one line that the help wraps to the terminal (the docs' own line breaks
    made the listing ragged)."""
    import inspect
    import re

    for info in app.registered_commands:
        if info.short_help is None and info.callback is not None:
            paragraph = " ".join((inspect.getdoc(info.callback) or "").split("\n\n")[0].split())
            info.short_help = re.split(r"(?<=[.;])\s+(?=[A-Z(])", paragraph)[0]


_one_line_listing()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
