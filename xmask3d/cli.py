"""The `xmask3d` command line: one sub-command per flow/stage (see ARCHITECTURE.md, CLI contract).

Heavy libraries are imported inside the commands so `xmask3d --help` stays fast, and each command
checks the inputs it can check cheaply (paths, benchmark names, the MLflow database) before those
imports. Bad input raises ``storage.errors.InputError`` and exits with code 2 and one line
``error: ...`` on stderr; any other failure prints one line too and exits 1. ``xmask3d -v CMD``
shows the traceback (and Prefect's own failure logs) instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from storage.benchmarks import get_benchmark
from storage.errors import InputError
from storage.location import parse_location
from xmask3d.engine.progress import quiet_library_noise

app = typer.Typer(help="XMask3D pipeline: synthetic data, download, preprocess, train, evaluate.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
synth_app = typer.Typer(help="Write small synthetic datasets in the real raw formats.", no_args_is_help=True)
download_app = typer.Typer(help="Download raw datasets (resumable).", no_args_is_help=True)
preprocess_app = typer.Typer(help="Raw data -> chunked Zarr v3 store.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")
app.add_typer(download_app, name="download")
app.add_typer(preprocess_app, name="preprocess")

# xmask3d.engine.tracking's default, repeated here so the check runs before MLflow is imported
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
OPTIONS = {"verbose": False}


@app.callback()
def options(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="on failure, show the traceback and Prefect's failure logs")] = False
            ) -> None:
    """XMask3D pipeline: synthetic data, download, preprocess, train, evaluate."""
    OPTIONS["verbose"] = verbose


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit with ``code`` (2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class _FailureEchoFilter(logging.Filter):
    """Drops Prefect's failure records (the traceback, "Finished in state Failed") from the console:
    the command prints the reason once. They still reach a Prefect server's run logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        if record.levelno >= logging.ERROR:
            return False
        message = record.getMessage()
        return not (message.startswith("Finished in state") and "Completed" not in message)


def _quiet_prefect_failures() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _FailureEchoFilter) for f in handler.filters):
            handler.addFilter(_FailureEchoFilter())


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """InputError -> one line, exit 2; any other error -> one line, exit 1; tracebacks only with -v."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = OPTIONS["verbose"]
        try:
            result = command(*args, **kwargs)
        except InputError as error:
            if verbose:
                raise
            fail(_first_line(error))
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - one line unless --verbose
            if verbose:
                raise
            fail(f"{type(error).__name__}: {_first_line(error)} (xmask3d -v ... shows the traceback)", code=1)
        return result

    return wrapper


def json_object(text: str | None, option: str) -> dict[str, Any] | None:
    """A JSON object given on the command line (None when not given); InputError otherwise."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise InputError(f"{option}: not JSON ({error})") from error
    if not isinstance(value, dict):
        raise InputError(f"{option}: expected a JSON object, got {type(value).__name__}")
    return value


def local_or_none(path: Path | str) -> Path | None:
    """The local directory of a path or store location; None for object storage (checked when opened)."""
    if isinstance(path, Path) or "://" not in path:
        return Path(path)  # as given, so messages name it as the user wrote it
    location = parse_location(path)
    return location.local_path() if location.is_local else None


def require_dir(path: Path | str, what: str) -> None:
    """InputError unless ``path`` is an existing directory (a bucket URL is checked when opened)."""
    if (path := local_or_none(path)) is None:
        return
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise InputError(f"{what} {path} is not a directory")


def require_output(path: Path | str, what: str) -> None:
    """An output path: its parent exists, and it is not a file where a directory goes."""
    if (path := local_or_none(path)) is None:
        return
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a directory")
    if not path.resolve().parent.is_dir():
        raise InputError(f"{what} {path}: parent directory {path.resolve().parent} does not exist")


def require_benchmark(name: str) -> None:
    get_benchmark(name)


def require_tracking(tracking_uri: str | None, existing: bool) -> None:
    """A local SQLite tracking URI needs its directory, and with ``existing`` the database itself
    (reading a model must not leave an empty ``mlruns.db`` behind)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    if not db.resolve().parent.is_dir():
        raise InputError(f"{uri}: directory {db.resolve().parent} for the MLflow database does not exist")
    if existing and not db.exists():
        raise InputError(f"{uri}: no MLflow database {db} (train a model first, or pass --tracking-uri)")


def require_model(model: str, tracking_uri: str | None) -> None:
    """A checkpoint path that exists, or a registry / run reference with a tracking store to read."""
    if Path(model).exists():
        return
    if not model.startswith("models:/") and ("/" in model or "." in model):
        raise InputError(f"{model}: checkpoint not found")
    require_tracking(tracking_uri, existing=True)


def _prefect_logs_quiet() -> None:
    """Before a flow runs in this process: one error line instead of Prefect's failure logs."""
    if not OPTIONS["verbose"]:
        _quiet_prefect_failures()


# The ephemeral Prefect API the commands start: no telemetry from machines that may be offline, and
# time to start on a loaded machine (Prefect's default, 20 s, is not always enough on 2 cores).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def not_implemented(what: str) -> None:
    fail(f"`xmask3d {what}` is not implemented yet")


@synth_app.command("scannet")
@user_errors
def synth_scannet(
    out_dir: Path,
    scenes: Annotated[int, typer.Option(help="number of scenes")] = 3,
    small: Annotated[bool, typer.Option("--small", help="320x240 color / 160x120 depth")] = False,
    seed: int = 0,
) -> None:
    """Write synthetic scenes in the raw ScanNet v2 layout."""
    from preprocessing.synthetic import write_scannet  # heavy: loaded per command

    ids = write_scannet(out_dir, scenes=scenes, small=small, seed=seed)
    typer.echo(f"wrote {len(ids)} ScanNet scenes to {out_dir}: {', '.join(ids)}")


@synth_app.command("s3dis")
@user_errors
def synth_s3dis(
    out_dir: Path,
    rooms: int = 2,
    seed: int = 0,
    views: Annotated[bool, typer.Option("--views", help="also write the rooms' Stanford 2D-3D-S views "
                                        "(Stanford2d3dDataset_noXYZ/area_N/data/...)")] = False,
    view_size: Annotated[int, typer.Option(help="side of the square views (real: 1080)")] = 1080,
) -> None:
    """Write synthetic rooms in the raw Stanford3dDataset_v1.2 layout (and 2D-3D-S views)."""
    from preprocessing.synthetic import write_s3dis  # heavy: loaded per command

    ids = write_s3dis(out_dir, rooms=rooms, seed=seed, views=views, view_size=view_size)
    typer.echo(f"wrote {len(ids)} S3DIS rooms to {out_dir / 'Stanford3dDataset_v1.2'}: {', '.join(ids)}")
    if views:
        views_dir = out_dir / "Stanford2d3dDataset_noXYZ"
        typer.echo(f"wrote their {view_size}x{view_size} 2D-3D-S views to {views_dir}")


@download_app.command("scannet")
@user_errors
def download_scannet(
    out: Annotated[Path, typer.Option(help="raw data directory")],
    url: Annotated[str | None, typer.Option(help="your ScanNet URL (default: $XMASK3D_SCANNET_URL)")] = None,
    mirror: Annotated[Path | None, typer.Option(help="local mirror directory")] = None,
    scenes: Annotated[str | None, typer.Option(help="comma-separated scene ids")] = None,
    split: Annotated[str | None, typer.Option(help="train, val or test")] = None,
    workers: Annotated[int, typer.Option(help="parallel downloads")] = 4,
    verify: Annotated[bool, typer.Option(help="re-check files on disk (size, checksum); fetch failing ones")
                      ] = False,
    checksums: Annotated[Path | None, typer.Option(help="sha256sum-format file of relative paths")] = None,
) -> None:
    """Download the official ScanNet v2 per-scene files (each verified before it is kept)."""
    from preprocessing.scannet.download import download_scannet as download  # heavy: loaded per command

    ids = [s.strip() for s in scenes.split(",") if s.strip()] if scenes else None
    paths = download(out, url=url, mirror=mirror, scenes=ids, split=split, workers=workers, verify=verify,
                     checksums=checksums)
    typer.echo(f"{len(paths)} files under {out}")


@download_app.command("s3dis")
@user_errors
def download_s3dis(
    out: Annotated[Path, typer.Option(help="raw data directory, e.g. data/raw/s3dis")],
    url: Annotated[str | None, typer.Option(help="your S3DIS / 2D-3D-S link (default: $XMASK3D_S3DIS_URL)")
                   ] = None,
    mirror: Annotated[Path | None, typer.Option(help="local mirror directory")] = None,
    release: Annotated[str, typer.Option(help="raw (non-aligned, the poses' frame) or aligned")] = "raw",
    views: Annotated[bool, typer.Option(help="also fetch the Stanford 2D-3D-S views")] = True,
    areas: Annotated[str | None, typer.Option(help="2D-3D-S areas, e.g. 1,2,5a,5b (default all)")] = None,
    workers: Annotated[int, typer.Option(help="parallel downloads")] = 2,
    keep_archives: Annotated[bool, typer.Option(help="keep the archives after unpacking")] = True,
    verify: Annotated[bool, typer.Option(help="re-check kept archives (size, checksum); fetch failing ones")
                      ] = False,
    checksums: Annotated[Path | None, typer.Option(help="sha256sum-format file of the archives")] = None,
) -> None:
    """Download and unpack S3DIS (Stanford3dDataset_v1.2) and its 2D-3D-S views (resumable)."""
    from preprocessing.s3dis.download import download_s3dis as download  # heavy: loaded per command

    names = [a for a in areas.split(",") if a.strip()] if areas else None
    dirs = download(out, url=url, mirror=mirror, release=release, views=views, areas=names, workers=workers,
                    keep_archives=keep_archives, verify=verify, checksums=checksums)
    typer.echo("unpacked " + ", ".join(str(d) for d in dirs))


@preprocess_app.command("scannet")
@user_errors
def preprocess_scannet(
    raw: Annotated[Path, typer.Option(help="raw ScanNet directory (with scans/)")],
    out: Annotated[str, typer.Option(help="output store: a path (data/scannet.zarr) or an s3:// URL")],
    frame_step: int = 20,
    captions: Annotated[str | None, typer.Option(
        help="caption JSON (default RAW/captions.json if present), or 'none'")] = None,
    dask_address: Annotated[str | None, typer.Option(help="tcp://HOST:PORT of a Dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="local Dask worker processes")] = None,
    overwrite: bool = False,
    text_encoder: Annotated[str, typer.Option(
        help="minilm | openclip-tiny | openclip:MODEL:CHECKPOINT")] = "minilm",
    clip_model: Annotated[str | None, typer.Option(help="open_clip model, e.g. ViT-L-14")] = None,
    clip_checkpoint: Annotated[Path | None, typer.Option(help="local open_clip checkpoint")] = None,
    scenes: Annotated[str | None, typer.Option(help="comma-separated scene ids (default: all)")] = None,
    region_captions: Annotated[str | None, typer.Option(
        help="region captions (boxes + phrases per frame; default RAW/region_captions.json if present), "
             "or 'none'")] = None,
    cluster_class: Annotated[str | None, typer.Option(
        help="Dask cluster class to start instead of the local one, e.g. dask_jobqueue.SLURMCluster")] = None,
    cluster_kwargs: Annotated[str | None, typer.Option(
        help='its keyword arguments as JSON, e.g. \'{"cores": 8, "memory": "32GiB"}\'')] = None,
    cluster_jobs: Annotated[int, typer.Option(help="workers (jobqueue: jobs) to ask the cluster for")] = 0,
    lock_wait: Annotated[float, typer.Option(
        help="seconds to wait for another run's writer lock on the store (default: fail at once)")] = 0.0,
) -> None:
    """Decode, project, caption-embed and store ScanNet scenes."""
    require_dir(raw, "raw dir")
    require_output(out, "output store")
    from flows.preprocess import run_locally  # heavy: loaded per command
    from preprocessing.pipeline import format_summaries  # heavy: loaded per command

    if clip_model or clip_checkpoint:
        if not (clip_model and clip_checkpoint):
            raise InputError("--clip-model and --clip-checkpoint go together")
        text_encoder = f"openclip:{clip_model}:{clip_checkpoint}"
    ids = [s.strip() for s in scenes.split(",") if s.strip()] if scenes else None
    _prefect_logs_quiet()
    out = str(parse_location(out))  # a bad or credential-carrying URL never becomes a flow parameter
    summaries, ok = run_locally(dataset="scannet", raw_dir=str(raw), store=out, scenes=ids,
                                frame_step=frame_step, captions=captions, text_encoder=text_encoder,
                                dask_address=dask_address, workers=workers, overwrite=overwrite,
                                region_captions=region_captions, cluster_class=cluster_class,
                                cluster_kwargs=json_object(cluster_kwargs, "--cluster-kwargs"),
                                cluster_jobs=cluster_jobs, lock_wait_s=lock_wait)
    typer.echo(format_summaries(summaries))
    if not ok:
        raise typer.Exit(code=1)


@preprocess_app.command("s3dis")
@user_errors
def preprocess_s3dis(
    raw: Annotated[Path, typer.Option(help="raw S3DIS directory")],
    out: Annotated[str, typer.Option(help="output store: a path or s3:// gs:// az:// URL")],
    workers: Annotated[int | None, typer.Option(help="local Dask worker processes")] = None,
    overwrite: bool = False,
    dask_address: Annotated[str | None, typer.Option(help="tcp://HOST:PORT of a Dask scheduler")] = None,
    views: Annotated[Path | None, typer.Option(
        help="Stanford 2D-3D-S root (area_N/data/rgb|depth|pose); without it rooms get no views")] = None,
    captions: Annotated[str | None, typer.Option(
        help="PLA-format caption JSON for the views (default VIEWS/captions.json if present), or 'none'")
    ] = None,
    text_encoder: Annotated[str, typer.Option(
        help="minilm | openclip-tiny | openclip:MODEL:CHECKPOINT")] = "minilm",
    cluster_class: Annotated[str | None, typer.Option(
        help="Dask cluster class to start instead of the local one, e.g. dask_jobqueue.SLURMCluster")] = None,
    cluster_kwargs: Annotated[str | None, typer.Option(
        help='its keyword arguments as JSON, e.g. \'{"cores": 8, "memory": "32GiB"}\'')] = None,
    cluster_jobs: Annotated[int, typer.Option(help="workers (jobqueue: jobs) to ask the cluster for")] = 0,
    lock_wait: Annotated[float, typer.Option(
        help="seconds to wait for another run's writer lock on the store (default: fail at once)")] = 0.0,
) -> None:
    """Store S3DIS rooms: points and labels, and with --views their 2D-3D-S views and captions."""
    require_dir(raw, "raw dir")
    require_output(out, "output store")
    from flows.preprocess import run_locally  # heavy: loaded per command
    from preprocessing.pipeline import format_summaries  # heavy: loaded per command

    if views is not None:  # report the counted skips (unknown areas, rooms without points) up front
        from preprocessing.pipeline import list_s3dis_rooms  # heavy: loaded per command
        from preprocessing.s3dis.views import index_views  # heavy: loaded per command

        skipped = index_views(views, rooms=list_s3dis_rooms(raw)).skipped
        if skipped:
            text = ", ".join(f"{n} frames ({why})" for why, n in sorted(skipped.items()))
            typer.echo(f"views skipped: {text}")
    _prefect_logs_quiet()
    out = str(parse_location(out))  # a bad or credential-carrying URL never becomes a flow parameter
    summaries, ok = run_locally(dataset="s3dis", raw_dir=str(raw), store=out, dask_address=dask_address,
                                workers=workers, overwrite=overwrite, views=str(views) if views else None,
                                captions=captions, text_encoder=text_encoder, cluster_class=cluster_class,
                                cluster_kwargs=json_object(cluster_kwargs, "--cluster-kwargs"),
                                cluster_jobs=cluster_jobs, lock_wait_s=lock_wait)
    typer.echo(format_summaries(summaries))
    if not ok:
        raise typer.Exit(code=1)


@app.command("import-captions")
@user_errors
def import_captions(
    store: Annotated[str, typer.Option(help="existing store (path or URL); its scenes get region captions")],
    fmt: Annotated[str, typer.Option("--format", help="regionplc | pla (view or entity files)")],
    captions: Annotated[Path, typer.Option(help="caption JSON {scene: {name: caption}}")],
    index: Annotated[Path, typer.Option(help="point-index pickle (RegionPLC list or PLA dict form)")],
    text_encoder: Annotated[str | None, typer.Option(
        help="the store's encoder spec (default: the one the store records; openclip:MODEL:CHECKPOINT "
             "for a CLIP store)")] = None,
    lock_wait: Annotated[float, typer.Option(
        help="seconds to wait for another run's writer lock on the store (default: fail at once)")] = 0.0,
) -> None:
    """Import released PLA / RegionPLC caption files (JSON + index pickle) as region captions."""
    from preprocessing.caption_import import import_captions as run_import  # heavy: loaded per command

    summary = run_import(store, fmt, captions, index, text_encoder=text_encoder, lock_wait_s=lock_wait)
    typer.echo(summary.table())


@app.command()
@user_errors
def train(
    store: Annotated[str, typer.Option(help="preprocessed store: a path or s3:// gs:// az:// URL")],
    benchmark: Annotated[str, typer.Option(help="e.g. scannet20-b15n4")],
    preset: Annotated[str, typer.Option(help="tiny|small|paper")] = "tiny",
    resume: Annotated[str | None, typer.Option(help="run id or checkpoint to resume")] = None,
    epochs: Annotated[int | None, typer.Option(help="override the preset's epochs")] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default $MLFLOW_TRACKING_URI, "
                                                          "else sqlite:///mlruns.db)")] = None,
    sd_dir: Annotated[Path | None, typer.Option(help="paper: local Stable Diffusion 1.x folder")] = None,
    clip_checkpoint: Annotated[Path | None, typer.Option(help="paper: local open_clip ViT-L-14 weights")
                               ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="steps between checkpoints")] = None,
    checkpoint_dir: Annotated[str | None, typer.Option(help="checkpoint root (default ./checkpoints)")
                              ] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate",
                                           help="evaluate and register after training")] = True,
    caption_supervision: Annotated[str | None, typer.Option(
        help="official (view captions, the paper) | region (region captions, contrastive) | "
             "official+region; default: the preset's (official)")] = None,
    random_init: Annotated[bool, typer.Option(
        "--random-init", help="paper: train even without the Stable Diffusion / CLIP weights (random "
                              "frozen parts; tagged random_init on the MLflow run)")] = False,
    batch_size: Annotated[int | None, typer.Option(help="override the preset's views per step and GPU")
                          ] = None,
    amp: Annotated[bool | None, typer.Option(
        "--amp/--no-amp", help="bf16 autocast on CUDA (default: the preset's; paper is fp32 as the "
                               "official recipe)")] = None,
    compile_heads: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the 2D heads (default: the preset's, off)")] = None,
) -> None:
    """Train XMask3D on one benchmark, tracked in MLflow."""
    require_dir(store, "store")
    require_benchmark(benchmark)
    require_tracking(tracking_uri, existing=False)
    from xmask3d.engine.tracking import promote_if_better  # heavy: loaded per command
    from xmask3d.engine.train import train as run_training  # heavy: loaded per command
    from xmask3d.engine.train import train_preset  # heavy: loaded per command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_library_noise()
    given = {"epochs": epochs, "max_steps": max_steps, "checkpoint_every": checkpoint_every,
             "checkpoint_dir": checkpoint_dir, "batch_size": batch_size, "amp": amp, "compile": compile_heads}
    overrides: dict = {k: v for k, v in given.items() if v is not None}
    overrides["evaluate"] = evaluate
    result = run_training(store, benchmark, preset, train_preset(preset, **overrides),
                          tracking_uri=tracking_uri, resume=resume, sd_dir=sd_dir,
                          clip_checkpoint=clip_checkpoint, caption_supervision=caption_supervision,
                          random_init=random_init)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports and promotes
        return
    if result.evaluation is not None:
        typer.echo(result.evaluation.table())
    decision = None
    if result.model_version is not None:
        decision = promote_if_better(tracking_uri, benchmark, result.model_version, result.metrics)
    typer.echo(f"MLflow run {result.run_id}; checkpoint {result.checkpoint_path}; model {result.model_uri}"
               + (f"; {decision.summary()}" if decision else ""))


@app.command()
@user_errors
def evaluate(
    store: Annotated[str, typer.Option(help="preprocessed store: a path or s3:// gs:// az:// URL")],
    benchmark: Annotated[str, typer.Option(help="e.g. scannet20-b15n4")],
    model: Annotated[str, typer.Option(help="models:/xmask3d-NAME@champion, a run id or a checkpoint")],
    max_views: Annotated[int, typer.Option(help="views per scene (0 = all, the official protocol)")] = 0,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default $MLFLOW_TRACKING_URI)")
                            ] = None,
    random_init: Annotated[bool, typer.Option(
        "--random-init", help="evaluate a paper model even with random Stable Diffusion / CLIP weights")
    ] = False,
) -> None:
    """Evaluate a model: mIoU base / novel / hIoU for the 3D, 2D and fused heads."""
    require_model(model, tracking_uri)
    require_dir(store, "store")
    require_benchmark(benchmark)
    from xmask3d.engine.evaluate import evaluate as run_evaluation  # heavy: loaded per command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_library_noise()
    result = run_evaluation(store, benchmark, model, tracking_uri=tracking_uri, max_views=max_views,
                            random_init=random_init)
    typer.echo(result.table())
    typer.echo(f"MLflow run {result.run_id}")


@app.command()
@user_errors
def ablate(
    benchmark: Annotated[str, typer.Option(help="e.g. scannet20-b15n4")],
    preset: Annotated[str, typer.Option(help="tiny|small|paper")] = "tiny",
    store: Annotated[str, typer.Option(help="preprocessed store: a path or URL")] = "data/scannet.zarr",
    variants: Annotated[str | None, typer.Option(
        help="comma-separated: full, no-implicit-condition, no-mask-regularization, no-fusion, "
             "no-binary-head, no-caption-losses, or several joined by '+' (default: full and each alone)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="override the preset's epochs")] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop each variant after this many steps")] = None,
    max_views: Annotated[int, typer.Option(help="views per val scene (0 = all)")] = 0,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default $MLFLOW_TRACKING_URI, "
                                                          "else sqlite:///mlruns.db)")] = None,
) -> None:
    """Ablation study: train + evaluate model variants as nested MLflow runs, print the comparison table."""
    require_dir(store, "store")
    require_benchmark(benchmark)
    require_tracking(tracking_uri, existing=False)
    from xmask3d.engine.ablate import resolve_variants  # heavy: loaded per command
    from xmask3d.engine.train import check_store, train_preset  # heavy: loaded per command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_library_noise()
    names = resolve_variants(variants)  # bad names fail here, before Prefect starts
    overrides = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps}.items() if v is not None}
    train_preset(preset, **overrides)

    check_store(store, get_benchmark(benchmark), need_val=True)
    from flows.ablate import ablate as ablate_flow  # heavy: loaded per command

    _prefect_logs_quiet()

    result = ablate_flow(store=str(parse_location(store)), benchmark=benchmark, preset=preset, variants=names,
                         train_config=overrides or None, tracking_uri=tracking_uri, max_views=max_views)
    from xmask3d.engine.ablate import table_markdown  # heavy: loaded per command

    typer.echo(table_markdown(result["rows"], benchmark, preset))
    typer.echo(f"MLflow parent run {result['parent_run_id']}")


@app.command()
@user_errors
def render(
    run: Annotated[str, typer.Option(help="MLflow run id, models:/NAME@alias or a checkpoint")],
    scene: Annotated[str, typer.Option(help="scene id in the store")],
    out: Annotated[Path, typer.Option(help="output directory")] = Path("panels"),
    store: Annotated[str | None, typer.Option(help="store path or URL (default: the run's store)")] = None,
    views: Annotated[int, typer.Option(help="views per scene")] = 3,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default $MLFLOW_TRACKING_URI)")
                            ] = None,
) -> None:
    """Qualitative panels of one scene: views with GT and the 3D / 2D / fused predictions, top-down."""
    if store is not None:
        require_dir(store, "store")
    require_model(run, tracking_uri)
    require_output(out, "output directory")
    from xmask3d.engine.panels import render_run  # heavy: loaded per command

    for path in render_run(run, scene, out, store=store, tracking_uri=tracking_uri, views=views):
        typer.echo(str(path))


@app.command("model-summary")
@user_errors
def model_summary(preset: Annotated[str, typer.Option(help="tiny|small|paper")] = "tiny") -> None:
    """Print parameter counts per component of a preset."""
    from xmask3d.network.model import summary  # heavy: loaded per command

    typer.echo(summary(preset))


@app.command()
@user_errors
def demo(out: Annotated[Path, typer.Option(help="demo output directory")] = Path("demo_output")) -> None:
    """Synthetic data -> preprocess -> train (tiny) -> evaluate, on CPU."""
    require_output(out, "demo output")
    quiet_library_noise()  # Dask workers too (environment), before distributed is imported
    from flows.demo import report, run_demo  # heavy: loaded per command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _prefect_logs_quiet()
    typer.echo(report(run_demo(out)))


def main() -> None:  # pragma: no cover - console entry point alias
    sys.exit(app())
