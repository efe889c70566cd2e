"""MLflow tracking: experiments, params, metrics, artifacts, model registration and aliases.

- Tracking URI: the argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db``. With a
  local SQLite backend the artifacts go to ``mlartifacts/`` beside the database file
  (``./mlartifacts`` for the default); with a tracking server the server decides.
- One experiment per benchmark (``xmask3d-<benchmark>``), one run per training; evaluation
  metrics go into the same run.
- The model is registered as ``xmask3d-<benchmark>`` with an ``mlflow.pyfunc`` flavor
  (:class:`XMask3DPyfunc`) that loads the checkpoint and predicts on a stored scene. Every new
  version gets the alias ``candidate``; ``champion`` moves only when the version passes the
  promotion rule (:func:`promote_if_better`, docs/training.md "Promotion"). Scores on versions
  (tags ``hiou``, ``fused/*``, ``baseline/*``, ``promotion.value``) are in percent, like every
  metric a person reads.
- Every MLflow call goes through an ``MlflowClient`` of the URI given: nothing here sets the
  process-wide tracking / registry URI (``mlflow.set_tracking_uri`` also exports
  ``MLFLOW_TRACKING_URI``, which would send a long-lived process's later runs, and its
  subprocesses, to whichever server was used last).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlsplit, urlunsplit

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from storage.errors import InputError
from storage.objects import as_path
from storage.redact import redact, redact_url, secrets_in_url, split_userinfo
from xmask3d.engine.checkpoint import LAST_NAME
from xmask3d.engine.predict import load_model_for_inference, predict_scene

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
CANDIDATE = "candidate"
CHAMPION = "champion"
HIOU_TAG = "hiou"  # fused hIoU of the version, in percent
UNIT_TAG, PERCENT = "unit", "percent"  # on a version: its score tags are in percent
MAX_PARAM_VALUE = 6000


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI to use: argument > MLFLOW_TRACKING_URI > sqlite:///mlruns.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def experiment_name(benchmark: str) -> str:
    return f"xmask3d-{benchmark}"


def registered_model_name(benchmark: str) -> str:
    return f"xmask3d-{benchmark}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def artifact_root_for(uri: str) -> str | None:
    """Artifact root for a local SQLite backend (``mlartifacts`` beside the database), else None."""
    db = _sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / "mlartifacts").as_uri()


def _health_request(uri: str) -> urllib.request.Request:
    """GET <uri>/health, with user-info of the URI (``user:token@``) sent as basic auth, not in the URL."""
    bare, auth = split_userinfo(uri)
    parts = urlsplit(bare)
    health = parts.path.rstrip("/") + "/health"
    request = urllib.request.Request(urlunsplit((parts.scheme, parts.netloc, health, "", "")))
    if auth:
        request.add_header("Authorization", auth)
    return request


def check_tracking_available(uri: str, timeout: float = 5.0) -> None:
    """Fail early (InputError) when the tracking backend cannot be used, before any training.

    Messages show the URI with its credentials (``user:token@``, query values) redacted.
    """
    scheme = urlparse(uri).scheme
    shown = redact_url(uri)
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(_health_request(uri), timeout=timeout) as response:  # noqa: S310
                if response.status != 200:
                    raise InputError(f"MLflow tracking server {shown}: /health answered {response.status}")
        except urllib.error.HTTPError as error:
            raise InputError(f"MLflow tracking server {shown}: /health answered {error.code}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
            reason = redact(str(getattr(error, "reason", error)), secrets_in_url(uri))
            raise InputError(f"MLflow tracking server {shown} is not reachable ({reason}); start it or set "
                             "MLFLOW_TRACKING_URI") from None
        return
    db = _sqlite_path(uri)
    if db is not None:
        parent = db.resolve().parent
        if not parent.is_dir():
            raise InputError(f"{shown}: directory {parent} for the MLflow database does not exist")
        if not os.access(parent, os.W_OK):
            raise InputError(f"{shown}: directory {parent} for the MLflow database is not writable")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> dotted keys; values as strings (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:MAX_PARAM_VALUE]
    return flat


class RunTracker:
    """One MLflow run (new or resumed) written through an explicit client, not global state."""

    def __init__(self, tracking_uri: str | None, benchmark: str, run_id: str | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        check_tracking_available(self.tracking_uri)
        self.benchmark = benchmark
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.experiment_id = ensure_experiment(self.client, experiment_name(benchmark), self.tracking_uri)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
            self.run_id = run.info.run_id
        else:
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                raise InputError(f"MLflow run {run_id} not found at {redact_url(self.tracking_uri)}") \
                    from None
            self.run_id = run.info.run_id
            previous = run.info.status
            if previous == "RUNNING":  # the attempt before was killed (SIGKILL, power loss) mid-run
                log.warning("MLflow run %s was still RUNNING: its previous attempt ended without saying so "
                            "(killed); resuming it", self.run_id)
            resumes = int(run.data.tags.get("resume.count", "0")) + 1
            self.set_tags({"resume.count": resumes, f"resume.{resumes}.previous_status": previous})
            self.client.update_run(self.run_id, status="RUNNING")
        self._resumed = run_id is not None
        self._logged_before: dict[str, int] = {}  # resumed run: metric -> last step logged before

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params. On a resumed run, keys already logged are kept (MLflow params are
        immutable); a changed value is recorded as the tag ``changed.<key>`` instead."""
        existing = self.client.get_run(self.run_id).data.params
        flat = flatten_params(params)
        for key, value in flat.items():
            if key in existing and existing[key] != value:
                self.client.set_tag(self.run_id, f"changed.{key}", value)
        items = [Param(k, v) for k, v in flat.items() if k not in existing]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def _last_step_before(self, key: str) -> int:
        """The last step of ``key`` logged before this attempt (-1 for a new run or a new metric)."""
        if key not in self._logged_before:
            history = self.client.get_metric_history(self.run_id, key) if self._resumed else []
            self._logged_before[key] = max((m.step for m in history), default=-1)
        return self._logged_before[key]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``. A resumed run skips steps its killed attempt already logged
        (it logged past its last checkpoint; the resumed values are the same, bit for bit)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v)) and int(step) > self._last_step_before(k)]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Get or create the experiment; with SQLite, artifacts live under mlartifacts/."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    root = artifact_root_for(tracking_uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def download_run_checkpoint(tracking_uri: str | None, run_id: str, dst: Path) -> Path:
    """The `checkpoints/last.pt` artifact of a run, downloaded into `dst`."""
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    try:
        local = client.download_artifacts(run_id, "checkpoints/last.pt", str(dst))
    except (MlflowException, OSError) as error:
        reason = redact(str(error), secrets_in_url(client.tracking_uri))
        raise InputError(f"MLflow run {run_id}: no checkpoints/last.pt artifact ({reason})") from None
    return Path(local)


class XMask3DPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc flavor: loads the logged checkpoint, predicts per-point labels of stored scenes.

    Input: a DataFrame (or dict / list of dicts) with columns ``store_path`` and ``scene_id``
    (optionally ``benchmark``, default: the one the model was trained on). Output: a DataFrame
    with one row per point: ``scene_id``, ``point_index``, ``label``, ``class_name``.
    """

    def load_context(self, context: Any) -> None:

        self.loaded = load_model_for_inference(Path(context.artifacts["checkpoint"]))

    # A DataFrame hint: MLflow infers no schema from it (so it validates nothing) and stays quiet.
    def predict(self, context, model_input: pd.DataFrame, params=None):

        if isinstance(model_input, Mapping):
            model_input = pd.DataFrame({k: v if isinstance(v, list) else [v] for k, v in model_input.items()})
        elif isinstance(model_input, list):
            model_input = pd.DataFrame(model_input)
        frames = []
        for row in model_input.to_dict("records"):
            benchmark = row.get("benchmark") or self.loaded.benchmark
            result = predict_scene(self.loaded, as_path(row["store_path"]), str(row["scene_id"]), benchmark)
            frames.append(pd.DataFrame({
                "scene_id": row["scene_id"],
                "point_index": range(len(result.labels)),
                "label": result.labels,
                "class_name": [result.class_names[i] for i in result.labels],
            }))
        return pd.concat(frames, ignore_index=True)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise the named loggers to ERROR for the block (expected, harmless warnings)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _log_pyfunc_model(client: MlflowClient, run_id: str, checkpoint: Path) -> LoggedModel:
    """Log the pyfunc model (:class:`XMask3DPyfunc`, ``checkpoint`` as its artifact) as a logged
    model of the run, through ``client`` only.

    What ``mlflow.pyfunc.log_model`` does, but that one reads the process-wide tracking URI and an
    active run: setting those would send every later MLflow call of the process (and, through
    ``MLFLOW_TRACKING_URI``, of the subprocesses it starts) to this run's server.
    """
    run = client.get_run(run_id)
    # the run's parameters on the logged model too, as mlflow.pyfunc.log_model does (the UI's model page)
    model = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                       params={k: str(v) for k, v in run.data.params.items()})
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        meta = Model(artifact_path=model.artifact_location, run_id=run_id, model_uuid=model.model_id,
                     model_id=model.model_id)
        with tempfile.TemporaryDirectory(prefix="xmask3d-model-") as tmp, \
                _quiet("mlflow.pyfunc", "mlflow.models"):
            # quiet: MLflow warns that the python_model object is pickled (it holds no state: the
            # checkpoint is an artifact) and that no signature was inferred (inputs are free-form rows)
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(local), python_model=XMask3DPyfunc(), artifacts={"checkpoint": str(checkpoint)},
                mlflow_model=meta,
                pip_requirements=["torch", "numpy", "pandas", "scipy", "zarr", "mlflow", "xmask3d-pipeline"],
            )
            client.log_model_artifacts(model.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def register_model(tracking_uri: str | None, run_id: str, benchmark: str, checkpoint: Path,
                   hiou: float | None = None) -> str:
    """Log the pyfunc model in the run, register a new version, alias it `candidate`.

    Returns the version number as a string. ``hiou`` (a fraction, as in ``Evaluation.metrics``) is
    stored as the version tag ``hiou`` in percent (for reference; :func:`promote_if_better`
    records the metrics it judges by). Every call goes through a client of ``tracking_uri``; the
    process-wide MLflow state (``mlflow.set_tracking_uri``, ``MLFLOW_TRACKING_URI``) is left alone.
    """
    uri = resolve_tracking_uri(tracking_uri)
    name = registered_model_name(benchmark)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    model = _log_pyfunc_model(client, run_id, checkpoint)
    try:
        client.create_registered_model(name)
    except MlflowException as error:  # registered before (or concurrently): a new version of it
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = str(client.create_model_version(name, source=model.artifact_location, run_id=run_id,
                                              model_id=model.model_id).version)
    tags = {"run_id": run_id}
    if hiou is not None:
        tags |= {HIOU_TAG: percent_tag(hiou), UNIT_TAG: PERCENT}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CANDIDATE, version)
    return version


# --------------------------------------------------------------------------------------------
# Promotion: when a registered version becomes `champion` (docs/training.md, "Promotion")

PRIMARY_HEAD = "fused"  # the head models are compared by
PROMOTION_TAG = "promotion"  # "champion" or "candidate", on the version and its run
PROMOTION_METRICS = ("hiou", "miou_all", "miou_base", "miou_novel")  # stored as version tags
SCORE_TAGS = tuple(f"{head}/{key}" for key in PROMOTION_METRICS for head in (PRIMARY_HEAD, "baseline"))


@dataclass(frozen=True)
class Promotion:
    """The promotion decision for one version: the metric it was judged by and why."""

    version: str
    promoted: bool
    metric: str  # e.g. "fused/hiou"
    value: float  # of ``metric``, a fraction as in ``Evaluation.metrics`` (tagged in percent)
    reason: str

    @property
    def outcome(self) -> str:
        return CHAMPION if self.promoted else CANDIDATE

    def summary(self) -> str:
        """One line for logs and reports, e.g. ``version 3: candidate (below the ...)``."""
        return f"version {self.version}: {self.outcome} ({self.reason})"


def novel_classes_evaluated(metrics: Mapping[str, float]) -> bool:
    """Whether the evaluation set holds novel classes.

    The majority-class baseline of the same evaluation predicts one base class everywhere, so
    its novel mIoU is 0 when some novel class occurs in the ground truth and NaN when none does.
    """
    value = metrics.get("baseline/miou_novel")
    return value is not None and math.isfinite(float(value))


def primary_metric(metrics: Mapping[str, float]) -> str:
    """The benchmark's primary metric for these metrics: fused hIoU when the evaluation set has
    novel classes, else fused mIoU over all classes (hIoU would be 0 or NaN by construction)."""
    return f"{PRIMARY_HEAD}/{'hiou' if novel_classes_evaluated(metrics) else 'miou_all'}"


def _value(metrics: Mapping[str, Any], key: str) -> float:
    try:
        return float(metrics[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def percent_tag(fraction: float) -> str:
    """A score (a fraction, as in ``Evaluation.metrics``) as a tag value: in percent, like the
    MLflow metrics (``eval/*``), tables and charts a person compares it with."""
    return str(100.0 * float(fraction))


def as_scores(metrics: Mapping[str, float]) -> dict[str, float]:
    """The scores the promotion rule reads (:data:`SCORE_TAGS`), from fractions to percent."""
    return {key: 100.0 * _value(metrics, key) for key in SCORE_TAGS if key in metrics}


def recorded_scores(tags: Mapping[str, str]) -> dict[str, float]:
    """The scores recorded on a version's tags, in percent. A version tagged before the tags were
    in percent has no ``unit`` tag: its scores are fractions and are scaled here, so an old champion
    is still compared on the same scale."""
    scale = 1.0 if tags.get(UNIT_TAG) == PERCENT else 100.0
    return {key: scale * _value(tags, key) for key in SCORE_TAGS if key in tags}


def _pct(value: float) -> str:
    return f"{value:.2f} %"


def promotion_verdict(scores: Mapping[str, float], champion: Mapping[str, float] | None,
                      champion_version: str | None = None) -> tuple[bool, str, str]:
    """The rule, without MLflow: -> (promote?, primary metric, reason).

    ``scores``: the evaluation's scores in percent (:func:`as_scores`); ``champion``: the scores
    recorded on the champion's version, in percent (:func:`recorded_scores`), or None when there
    is no champion. A model is promoted only when (1) its primary metric and fused mIoU over all
    classes are finite, (2) its mIoU over all classes beats the majority-class baseline of the same
    evaluation (the baseline never predicts a novel class, so its hIoU is 0 by construction: mIoU
    over all classes is where a constant prediction scores), and (3) it beats the champion's
    recorded value of the primary metric (a champion without a finite value for it is beaten).
    """
    metric = primary_metric(scores)
    value, miou_all = _value(scores, metric), _value(scores, f"{PRIMARY_HEAD}/miou_all")
    bad = [f"{k}={v}" for k, v in ((metric, value), (f"{PRIMARY_HEAD}/miou_all", miou_all))
           if not math.isfinite(v)]
    if bad:
        return False, metric, "metrics not finite: " + ", ".join(dict.fromkeys(bad))
    floor = _value(scores, "baseline/miou_all")
    if not math.isfinite(floor):
        return False, metric, "no majority-class baseline/miou_all in the evaluation"
    if miou_all <= floor:
        return False, metric, (f"not above the majority-class baseline: {PRIMARY_HEAD}/miou_all "
                               f"{_pct(miou_all)} <= {_pct(floor)}")
    if champion is None:
        return True, metric, (f"no champion yet; {PRIMARY_HEAD}/miou_all {_pct(miou_all)} beats the "
                              f"majority-class baseline {_pct(floor)}; {metric} {_pct(value)}")
    theirs = _value(champion, metric)
    if not math.isfinite(theirs):
        return True, metric, f"champion version {champion_version} has no finite {metric}"
    if value <= theirs:
        return False, metric, (f"not better than champion version {champion_version}: {metric} "
                               f"{_pct(value)} <= {_pct(theirs)}")
    return True, metric, (f"beats champion version {champion_version}: {metric} {_pct(value)} > "
                          f"{_pct(theirs)}")


def promote_if_better(tracking_uri: str | None, benchmark: str, version: str,
                      metrics: Mapping[str, float]) -> Promotion:
    """Apply the promotion rule to ``version`` evaluated as ``metrics`` (fractions, as in
    ``Evaluation.metrics``); move `champion` if it passes.

    The scores it was judged by (in percent, with the tag ``unit`` = ``percent``) and the decision
    (tags ``promotion``, ``promotion.metric``, ``promotion.value``, ``promotion.reason``) are
    recorded on the version and on its run, so the MLflow UI says why a version is or is not the
    champion.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name, version = registered_model_name(benchmark), str(version)
    mine = client.get_model_version(name, version)
    scores = as_scores(metrics)
    tags = {key: str(value) for key, value in scores.items()}
    if f"{PRIMARY_HEAD}/hiou" in scores:
        tags[HIOU_TAG] = tags[f"{PRIMARY_HEAD}/hiou"]
    for key, value in {**tags, UNIT_TAG: PERCENT}.items():
        client.set_model_version_tag(name, version, key, value)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and str(champion.version) == version:
        metric = champion.tags.get(f"{PROMOTION_TAG}.metric") or primary_metric(scores)
        return Promotion(version, True, metric, _value(metrics, metric), "already the champion")
    recorded = None if champion is None else recorded_scores(champion.tags)
    promoted, metric, reason = promotion_verdict(scores, recorded,
                                                 None if champion is None else str(champion.version))
    result = Promotion(version, promoted, metric, _value(metrics, metric), reason)
    tags = {PROMOTION_TAG: result.outcome, f"{PROMOTION_TAG}.metric": metric,
            f"{PROMOTION_TAG}.value": str(_value(scores, metric)), f"{PROMOTION_TAG}.reason": reason}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        if mine.run_id:
            client.set_tag(mine.run_id, key, value)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    return result


def champion_or_newest(tracking_uri: str | None, model: str) -> tuple[str, str | None]:
    """``models:/NAME@champion`` when that alias exists; else the newest version of NAME.

    -> (the model URI to use, a log line saying what was chosen and why, or None when the URI is
    used as given). Other URIs are returned unchanged. InputError when nothing is registered.
    """
    prefix, suffix = "models:/", f"@{CHAMPION}"
    if not (model.startswith(prefix) and model.endswith(suffix)):
        return model, None
    name = model[len(prefix):-len(suffix)]
    uri = resolve_tracking_uri(tracking_uri)
    db = _sqlite_path(uri)
    if db is not None and not db.exists():  # MlflowClient would create an empty database
        raise InputError(f"model {model}: no MLflow database at {db} (nothing trained yet?)")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_model_version_by_alias(name, CHAMPION)
        return model, None
    except MlflowException:
        pass
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as error:
        reason = redact(str(error), secrets_in_url(uri))
        raise InputError(f"model {model}: registry at {redact_url(uri)} not readable ({reason})") from None
    if not versions:
        raise InputError(f"model {model}: no version of {name} is registered at {redact_url(uri)}")
    newest = max(versions, key=lambda v: int(v.version))
    why = newest.tags.get(f"{PROMOTION_TAG}.reason", "no promotion decision recorded")
    note = (f"no champion for {name}: evaluating the newest version {newest.version} instead "
            f"(not promoted: {why})")
    return f"{prefix}{name}/{newest.version}", note


def resolve_model(model: str, tracking_uri: str | None, download_dir: Path) -> tuple[Path, str | None]:
    """`models:/NAME@alias`, `models:/NAME/VERSION`, an MLflow run id or a checkpoint path
    -> (local checkpoint file, training run id if known)."""
    path = Path(model)
    if path.exists():
        return (path / LAST_NAME if path.is_dir() else path), None
    if not model.startswith("models:/") and ("/" in model or "." in model):
        raise InputError(f"{model}: checkpoint not found")
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_available(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if model.startswith("models:/"):
        ref = model[len("models:/"):]
        try:
            if "@" in ref:
                name, alias = ref.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, number = ref.rsplit("/", 1)
                version = client.get_model_version(name, number)
            # the files of the version just resolved (an alias may move meanwhile), read through
            # this URI, never the process-wide one
            source = client.get_model_version_download_uri(name, version.version)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(download_dir),
                                                             tracking_uri=uri, registry_uri=uri))
        except (MlflowException, ValueError) as error:
            reason = redact(str(error), secrets_in_url(uri))
            raise InputError(f"model {model}: not found in the registry at {redact_url(uri)} ({reason})") \
                from None
        found = sorted(local.rglob("*.pt"))  # the registered checkpoint: best.pt or last.pt
        if not found:
            raise InputError(f"model {model}: no checkpoint among its artifacts")
        return found[0], version.run_id
    return download_run_checkpoint(uri, model, download_dir), model
