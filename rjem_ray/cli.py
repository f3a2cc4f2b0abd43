"""The ``rjem`` command line: train, sample, eval, tune, ui, server, migrate-store.

Bad input ends in one line on stderr naming what was wrong and what is allowed (exit status 2); a run
that fails (divergence, a crashed worker beyond ``trainer.max_failures``) ends with exit status 1 and
keeps its last good checkpoint. ``RJEM_DEBUG=1`` shows full tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from . import __version__

# The commands import what they need inside their functions (each marked `# lazy: see top`), as do main() and
# build_parser(): `rjem --help`, `rjem --version` and an argument error then answer without importing Ray or
# MLflow. (torch is imported by the package itself: rjem_ray/__init__.py installs the torchvision shim.)


def _progress(prefix: str):
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{prefix} {time.time() - t0:6.1f}s] {msg}", flush=True)

    return say


def check_writable(path: str | Path, flag: str, directory: bool) -> None:
    """Fail before any work when ``path`` (a directory, or a file's directory; or a storage URI) cannot be written."""
    from .core import storage  # lazy: see top

    if storage.is_uri(path):
        return storage.check_writable(str(path), flag)
    path = storage.local_path(path) if storage.scheme(path) == "file" else Path(path)
    target = path if directory else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
        if not directory and path.is_dir():
            raise IsADirectoryError(21, "it is a directory")
    except OSError as exc:
        raise ValueError(f"{flag} {str(path)!r} cannot be written ({exc.strerror or exc}); "
                         f"give a {'directory' if directory else 'file'} path in a writable place") from None


def model_store(args, config: str | None = None) -> tuple[str, str]:
    """The MLflow stores (tracking, registry) that a ``models:/`` or ``runs:/`` argument is looked up in:
    ``--set tracking.*`` > MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI > ``config``'s tracking section > the
    default, as for ``rjem train``; a checkpoint directory needs none (then nothing is read)."""
    from .tracking.models import MODEL_URI_SCHEMES  # lazy: see top
    from .tracking.stores import store_uris  # lazy: see top

    if not str(args.checkpoint).startswith(MODEL_URI_SCHEMES):
        return "", ""
    from .config import load_config  # lazy: see top

    tracking = [s for s in (args.set or []) if s.split("=", 1)[0].strip().startswith("tracking.")]
    return store_uris(load_config(config, tracking).tracking)


def cmd_train(args) -> int:
    from .config import load_config  # lazy: see top
    from .core.storage import is_uri  # lazy: see top
    from .distributed.train_driver import run_training  # lazy: see top

    cfg = load_config(args.config, args.set)
    if is_uri(args.out):
        raise ValueError(f"--out {args.out!r}: OUT is a local directory; put the checkpoints in remote storage "
                         f"with --set trainer.storage_path={args.out}")
    out = Path(args.out or f"runs/{cfg.name}")
    check_writable(out, "--out", directory=True)
    if cfg.trainer.storage_path:
        check_writable(cfg.trainer.storage_path, "trainer.storage_path", directory=True)
    outcome = run_training(cfg, out, resume=args.resume, fresh=args.fresh)
    print(f"[rjem] done: checkpoint {outcome.checkpoint}, samples {out / 'samples'}, metrics {out / 'metrics.json'}")
    if outcome.run_id:
        print(f"[rjem] MLflow run {outcome.run_id}; browse with `rjem ui`")
    return 0


def cmd_sample(args) -> int:
    import torch  # lazy: see top

    from .method.restore import load_model  # lazy: see top
    from .core.data import to_uint8  # lazy: see top
    from .evaluation.generate import generate  # lazy: see top
    from .core.images import save_grid  # lazy: see top
    from .method.restore import verify_checkpoint  # lazy: see top
    from .core.devices import resolve_device  # lazy: see top
    from .method.prior import gmm_for_checkpoint  # lazy: see top
    from .tracking.models import resolve_checkpoint  # lazy: see top

    args.checkpoint = resolve_checkpoint(args.checkpoint, *model_store(args, args.config))
    verify_checkpoint(args.checkpoint)
    out = Path(args.out)
    check_writable(out, "--out", directory=out.suffix.lower() != ".png")
    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, map_location=device)
    if args.config:  # e.g. a sweep's best.yaml: its generate section replaces the checkpoint's
        from .config import load_config  # lazy: see top

        cfg = cfg.replace(generate=load_config(args.config).to_dict()["generate"])
    mode = args.mode or (cfg.generate.mode if args.config else "combined")
    overrides = list(args.set or [])
    overrides.append(f"generate.mode={mode}")
    if args.n is not None:
        overrides.append(f"generate.n={args.n}")
    cfg = cfg.override(overrides)
    gmm = gmm_for_checkpoint(cfg, args.checkpoint)
    if args.class_ is not None and not 0 <= args.class_ < gmm.num_classes:
        raise ValueError(f"--class {args.class_} is out of range; allowed 0..{gmm.num_classes - 1}")
    say = _progress("sample")
    say(f"{cfg.generate.n} samples, mode {mode}" + (f", class {args.class_}" if args.class_ is not None else ""))
    x, y = generate(model, gmm, cfg.generate, classes=args.class_, generator=torch.Generator().manual_seed(args.seed),
                    device=device, progress=say)
    if out.suffix.lower() == ".png":
        save_grid(x, out)
        say(f"wrote {out}")
    else:
        from PIL import Image  # lazy: see top

        out.mkdir(parents=True, exist_ok=True)
        save_grid(x, out / "grid.png")
        u8 = to_uint8(x)
        for i, (img, c) in enumerate(zip(u8, y.tolist())):
            arr = img.permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(out / f"{i:05d}_class{c}.png")
        say(f"wrote {len(u8)} images and grid.png to {out}")
    return 0


def eval_artifact_dir(source: str, checkpoint_dir: str) -> Path:
    """``evaluate.default_artifact_dir`` of a checkpoint directory; for a ``models:/``/``runs:/`` URI (whose
    download is removed at exit) ``./rjem-eval/<the URI as one folder name>`` in the working directory."""
    from .evaluation.evaluate import default_artifact_dir  # lazy: see top
    from .tracking.models import MODEL_URI_SCHEMES  # lazy: see top

    if str(source).startswith(MODEL_URI_SCHEMES):
        return Path.cwd() / "rjem-eval" / re.sub(r"[^A-Za-z0-9._@-]+", "_", str(source)).strip("_")
    return default_artifact_dir(checkpoint_dir)


def eval_store(args, source: str, cfg, store: tuple[str, str]) -> dict | None:
    """Where ``rjem eval`` logs its run, or None when tracking is off (``--set tracking.enabled=false``).

    ``cfg``'s tracking section (the checkpoint's own, under MLflow's environment variables and ``--set``);
    without an explicit store (``--set tracking.tracking_uri`` or MLFLOW_TRACKING_URI) the store of the
    training run when it is known (``tracking.eval_runs.training_run_of``), and the run nests under it there."""
    from .tracking.eval_runs import training_run_of  # lazy: see top
    from .tracking.stores import store_uris  # lazy: see top

    t = cfg.tracking
    if not t.enabled:
        return None
    uri, registry = store_uris(t)
    explicit = os.environ.get("MLFLOW_TRACKING_URI") or any(
        s.split("=", 1)[0].strip() == "tracking.tracking_uri" for s in args.set or [])
    run = training_run_of(source, args.checkpoint, *(store if store[0] else (uri, registry)))
    if run and not explicit and run[0] != uri:
        uri = run[0]
        registry = registry if t.registry_uri else uri
    return {"tracking_uri": uri, "registry_uri": registry, "experiment": t.experiment,
            "artifact_location": t.artifact_location, "parent": run[1] if run and run[0] == uri else None}


def cmd_eval(args) -> int:
    from .method.restore import config_from_state, verify_checkpoint  # lazy: see top
    from .config import load_config  # lazy: see top
    from .core.errors import first_line  # lazy: see top
    from .evaluation.evaluate import evaluate_checkpoint  # lazy: see top
    from .tracking.eval_runs import drawn_files, log_evaluation  # lazy: see top
    from .tracking.models import resolve_checkpoint  # lazy: see top
    from .distributed.train_driver import merge_json  # lazy: see top

    source = args.checkpoint
    store = model_store(args)
    args.checkpoint = resolve_checkpoint(source, *store)
    state = verify_checkpoint(args.checkpoint)
    if args.json:
        check_writable(Path(args.json), "--json", directory=False)
    # the effective config: the checkpoint's, MLflow's variables, then --set (evaluate_checkpoint applies the same
    # --set to the model's config)
    cfg = load_config(config_from_state(state), args.set)
    tracking = eval_store(args, source, cfg, store)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    result = evaluate_checkpoint(args.checkpoint, metrics, args.set, progress=_progress("eval"), device=args.device,
                                 artifact_dir=eval_artifact_dir(source, args.checkpoint))
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        merge_json(path, result)
        print(f"[eval] wrote {path}")
    if tracking is not None:
        params = {"checkpoint": source, "checkpoint_step": int(state.get("step", 0)),
                  "metrics": ",".join(metrics or cfg.eval.metrics), "set": " ".join(args.set or []) or "-",
                  "eval": cfg.to_dict()["eval"]}
        try:
            run_id = log_evaluation(tracking["tracking_uri"], tracking["registry_uri"], tracking["experiment"],
                                    tracking["artifact_location"], result, params, drawn_files(result),
                                    parent=tracking["parent"], tags={"rjem.checkpoint": source})
            nested = f", a child of the training run {tracking['parent']}" if tracking["parent"] else ""
            print(f"[eval] MLflow run {run_id} ({tracking['tracking_uri']}{nested})")
        except Exception as exc:  # the figures are printed and in --json; the store's failure is one line
            print(f"[eval] warning: not logged to MLflow {tracking['tracking_uri']} "
                  f"({type(exc).__name__}: {first_line(exc)}); --set tracking.enabled=false skips it", flush=True)
    summary = {k: result[k] for k in ("accuracy", "robust_accuracy", "pgd_robust_accuracy", "ece", "ood_auroc", "fid",
                                      "inception_score") if k in result}
    print(json.dumps(summary, indent=2) if args.json else text)
    for warning in result.get("masking", {}).get("warnings", []):
        print(f"[eval] masking warning: {warning}")
    return 0


def cmd_ui(args) -> int:
    from .config import ConfigError, load_config  # lazy: see top
    from .tracking.stores import is_server_uri, resolve_artifact_location, resolve_tracking_uri  # lazy: see top

    cfg = load_config(args.config, args.set)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    if is_server_uri(uri):
        raise ConfigError(f"tracking.tracking_uri is the MLflow server {uri}: open it in a browser; "
                          "`rjem ui` serves a local store (sqlite:///FILE)")
    cmd = [
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
        "--default-artifact-root", resolve_artifact_location(cfg.tracking.artifact_location),
        "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1",
    ]
    print(f"[rjem] MLflow UI on http://127.0.0.1:{args.port} (store {uri}); Ctrl-C stops it", flush=True)
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_server(args) -> int:
    """``rjem server``: check the backend store, then run ``mlflow server`` (foreground, or ``--detach``)."""
    from .tracking.server import ARTIFACTS_ENV, BACKEND_ENV, server_command, start_server, stop_server  # lazy: see top
    from .tracking.stores import check_database, is_database_uri, masked, resolve_tracking_uri  # lazy: see top

    backend = args.backend_store_uri or os.environ.get(BACKEND_ENV, "")
    artifacts = args.artifacts_destination or os.environ.get(ARTIFACTS_ENV, "")
    if not backend:
        backend = resolve_tracking_uri(args.fallback_store)
        print(f"[rjem] WARNING: no database for MLflow ({BACKEND_ENV} unset): runs are kept in {backend} on this "
              "machine and will not outlive it (`ray down` deletes them); give a PostgreSQL URI (docs/CLUSTER.md)",
              flush=True)
    if not artifacts:
        artifacts = args.fallback_artifacts
        print(f"[rjem] WARNING: no object store for MLflow's artifacts ({ARTIFACTS_ENV} unset): they go to "
              f"{artifacts}", flush=True)
    if not args.detach:
        if is_database_uri(backend):
            check_database(backend)
        argv, env = server_command(backend, artifacts, args.host, args.port, args.workers)
        os.execvpe(argv[0], argv, env)
    pid_file = Path(args.pid_file)
    if pid_file.is_file():  # the server of an earlier start (`ray up` again): replaced
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ValueError, OSError):  # gone (a reboot): nothing to stop
            cmdline = b""
        if b"mlflow" in cmdline and b"server" in cmdline:  # never a process that reused the pid
            stop_server(pid)
    proc = start_server(backend, artifacts, args.host, args.port, args.workers, log=args.log)
    pid_file.write_text(f"{proc.pid}\n")
    print(f"[rjem] MLflow server on http://{args.host}:{args.port} (pid {proc.pid}, log {args.log}): runs in "
          f"{masked(backend)}, artifacts served from {artifacts}", flush=True)
    return 0


def cmd_migrate_store(args) -> int:
    """``rjem migrate-store``: copy a sqlite store into the server's database (``tracking.migrate.migrate_store``)."""
    from .tracking.migrate import migrate_store  # lazy: see top
    from .tracking.server import ARTIFACTS_ENV, BACKEND_ENV  # lazy: see top

    target = args.to or os.environ.get(BACKEND_ENV, "")
    if not target:
        raise ValueError(f"--to: give the database store (e.g. postgresql+psycopg://USER:PASSWORD@HOST:5432/mlflow), "
                         f"or set {BACKEND_ENV}")
    migrate_store(args.source, target, args.artifacts_destination or os.environ.get(ARTIFACTS_ENV) or None)
    return 0


MODEL_HELP = ("checkpoint directory, models:/NAME/VERSION or runs:/RUN_ID/model (looked up in the store of "
              "--set tracking.tracking_uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rjem", description="Robust Joint Energy-Based Models on Ray")
    p.add_argument("--version", action="version", version=f"rjem {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def add_set(sp):
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set attack.eps=0.3 (repeatable)")

    def add_device(sp):
        sp.add_argument("--device", default="auto",
                        help="auto (default: the GPU this process was given, else cpu), cpu, cuda or cuda:N")

    t = sub.add_parser("train", help="train on Ray Train (local Ray, or the cluster at RAY_ADDRESS)")
    t.add_argument("config", help="experiment YAML, e.g. tune_configs/demo.yaml")
    add_set(t)
    t.add_argument("--out", help="output directory (default runs/NAME)")
    t.add_argument("--resume", metavar="RUN", help="continue a stopped run: its OUT directory or a checkpoint "
                                                   "directory; or a URI (s3://...) of a checkpoint or of a "
                                                   "trainer.storage_path")
    t.add_argument("--fresh", action="store_true",
                   help="start from step 0 even if --out holds an earlier run (by default rerunning continues it)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate images from a checkpoint")
    s.add_argument("checkpoint", help=MODEL_HELP)
    s.add_argument("--mode", choices=["energy", "pgd", "combined"],
                   help="generation mode (default combined, or the --config file's generate.mode)")
    s.add_argument("--config", help="take the generate section from this experiment YAML, e.g. a sweep's "
                                    "best.yaml (`rjem tune`); --mode, --n and --set still override it")
    s.add_argument("--n", type=int, help="number of images (default generate.n)")
    s.add_argument("--class", dest="class_", type=int, help="generate only this class (default: cycle all)")
    s.add_argument("--out", default="samples.png", help="FILE.png for a grid, or a directory for single images")
    s.add_argument("--seed", type=int, default=0)
    add_device(s)
    add_set(s)
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="accuracy, robust accuracy (AutoAttack), PGD robust accuracy, gradient-masking "
                                    "report, ECE, OOD AUROC, FID and IS of a checkpoint")
    e.add_argument("checkpoint", help=MODEL_HELP)
    # the names are evaluation/registry.METRIC_NAMES (spelled out: importing it would import torch for --help)
    e.add_argument("--metrics", help="comma list of accuracy,robust,autoattack,masking,ece,ebr,min-norm,certified,fid,"
                                     "is,ood (default eval.metrics; robust = PGD, autoattack = the robust accuracy; "
                                     "ebr, min-norm and certified are opt-in)")
    e.add_argument("--json", help="merge the results into this JSON file")
    add_device(e)
    add_set(e)
    e.set_defaults(func=cmd_eval)

    u = sub.add_parser("ui", help="MLflow's UI on the configured store, bound to 127.0.0.1")
    u.add_argument("--config", help="config whose tracking section names the store (default: sqlite:///mlflow.db)")
    u.add_argument("--port", type=int, default=5000)
    add_set(u)
    u.set_defaults(func=cmd_ui)
    v = sub.add_parser("server", help="check the MLflow backend store, then run `mlflow server` on it with artifacts "
                                      "proxied to an object store (docs/CLUSTER.md)")
    v.add_argument("--backend-store-uri", help="database store, e.g. postgresql+psycopg://USER:PASSWORD@HOST:5432/mlflow "
                                               "(default $MLFLOW_BACKEND_STORE_URI)")
    v.add_argument("--artifacts-destination", help="where the server keeps artifacts, e.g. s3://BUCKET/mlflow "
                                                   "(default $MLFLOW_ARTIFACTS_DESTINATION)")
    v.add_argument("--fallback-store", default="sqlite:///mlflow.db",
                   help="the store when no database is given (with a warning: it lives and dies with this machine)")
    v.add_argument("--fallback-artifacts", default="mlartifacts", help="the artifacts' place when none is given")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=5000)
    v.add_argument("--workers", type=int, default=1)
    v.add_argument("--detach", action="store_true", help="start it in the background, wait until it answers, "
                                                         "record its pid in --pid-file (replacing an earlier one)")
    v.add_argument("--pid-file", default="mlflow-server.pid")
    v.add_argument("--log", default="mlflow-server.log")
    v.set_defaults(func=cmd_server)

    m = sub.add_parser("migrate-store", help="copy a sqlite MLflow store (runs, metrics, models, ids kept) into the "
                                             "server's database, and its local artifacts into its object store")
    m.add_argument("source", help="the sqlite store, e.g. sqlite:///mlflow.db")
    m.add_argument("--to", help="the database store (default $MLFLOW_BACKEND_STORE_URI); it must hold no runs yet")
    m.add_argument("--artifacts-destination", help="the server's artifact store, e.g. s3://BUCKET/mlflow (default "
                                                   "$MLFLOW_ARTIFACTS_DESTINATION; unset: artifacts stay in place)")
    m.set_defaults(func=cmd_migrate_store)
    from .tune import add_parser as add_tune_parser  # lazy: see top

    add_tune_parser(sub)
    return p


def one_line(exc: BaseException) -> str:
    """``exc``'s message as one line: a YAML parser's report spans several (where, the text, a caret under
    the column), and all but the carets say something, so the lines are joined rather than cut."""
    lines = (line.strip() for line in str(exc).splitlines())
    return " ".join(line for line in lines if line.strip("^")) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from .method.checkpoint import CheckpointError  # lazy: see top
    from .config import ConfigError  # lazy: see top
    from .core.data import DataError  # lazy: see top
    from .distributed.train_driver import TrainingFailed  # lazy: see top

    args = build_parser().parse_args(argv)
    if getattr(args, "n", None) is not None and args.n < 1:
        print(f"rjem {args.command}: error: --n must be >= 1, got {args.n}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    # OSError: a path given on the command line or in the config that cannot be read (missing, a directory,
    # no permission); its message names the path.
    except (ConfigError, DataError, CheckpointError, ValueError, OSError) as exc:
        if os.environ.get("RJEM_DEBUG"):
            raise
        print(f"rjem {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        if os.environ.get("RJEM_DEBUG"):
            raise
        print(f"rjem {args.command}: training failed: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rjem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
