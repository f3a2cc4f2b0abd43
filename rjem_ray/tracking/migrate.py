"""``rjem migrate-store``: copy an existing sqlite store into the database server of an ``mlflow server``
(:func:`migrate_store`), every id kept, the local artifacts optionally moved to the server's object store."""

from __future__ import annotations

import shutil
import tempfile
import urllib.parse
from pathlib import Path

import pyarrow.fs as pafs

from ..core import storage
from .stores import StoreError, _first_line, _scrub, check_database, is_database_uri, masked, resolve_tracking_uri

# MLflow is imported inside the functions that call it (marked `# lazy: MLflow, see top`): it reads
# MLFLOW_DISABLE_TELEMETRY when it is imported, which stores.py sets, and an import of it in this header would come
# before `.stores` (third-party imports go first).

# Where a store keeps artifact locations: rewritten by migrate_store when the artifacts move to the server.
ARTIFACT_COLUMNS = {"experiments": ("artifact_location",), "runs": ("artifact_uri",),
                    "logged_models": ("artifact_location",), "model_versions": ("source", "storage_location")}


def migrate_store(source: str, target: str, artifacts_destination: str | None = None, say=print) -> dict[str, int]:
    """Copy the sqlite store ``source`` into the database store ``target``, which must hold no runs yet.

    Everything keeps its id (experiments, runs, logged models, registered models and their versions), so
    ``runs:/``/``models:/`` URIs, ``OUT/mlflow_run.json`` and a sweep's parent run id stay valid; metrics keep
    their steps and timestamps. MLflow's own migrations bring both schemas to the installed version first (as
    ``mlflow db upgrade`` does; the source is upgraded in a temporary copy, never in place); MLflow has no
    tool that copies one database store into another, so the rows then go table by table in foreign-key order.
    With ``artifacts_destination`` (the server's ``--artifacts-destination``, e.g. ``s3://bucket/mlflow``) every
    experiment whose artifacts are local files is copied to ``DEST/EXPERIMENT_ID`` and its locations re-pointed
    at ``mlflow-artifacts:/EXPERIMENT_ID``, which the server serves; without it they stay where they are.
    Returns the rows copied per table.
    """
    from mlflow.store.db import utils as db_utils  # lazy: MLflow, see top

    if not source.startswith("sqlite:///"):
        raise StoreError(f"{masked(source)}: the source must be a sqlite store, sqlite:///PATH")
    src_path = Path(resolve_tracking_uri(source)[len("sqlite:///"):])
    if not src_path.is_file():
        raise StoreError(f"{source}: no such file")
    if not is_database_uri(target):
        raise StoreError(f"{masked(target)}: the target must be a database server, e.g. postgresql+psycopg://...")
    check_database(target)
    with tempfile.TemporaryDirectory(prefix="rjem-migrate-") as tmp:
        copy = Path(tmp) / "source.db"
        shutil.copyfile(src_path, copy)
        src = db_utils.create_sqlalchemy_engine(f"sqlite:///{copy}")
        dst = db_utils.create_sqlalchemy_engine(target)
        try:
            if db_utils._is_empty_database(src):
                raise StoreError(f"{source} holds no MLflow store")
            if db_utils._all_tables_exist(dst):
                _check_empty(dst, target)
            else:
                db_utils._initialize_tables(dst)
            db_utils._verify_schema(dst)
            if db_utils._get_schema_version(src) != db_utils._get_latest_schema_revision():
                db_utils._upgrade_db(src)
            return _copy_rows(src, dst, source, target, artifacts_destination, say)
        except StoreError:
            raise
        except Exception as exc:  # MLflow's, SQLAlchemy's and pyarrow's messages run over many lines
            raise StoreError(f"migrating {source} into {masked(target)} failed: "
                             f"{_scrub(_first_line(exc), target)}") from exc
        finally:
            src.dispose()
            dst.dispose()


def _check_empty(dst, target: str) -> None:
    """Ids are copied as they are: the target must hold no experiment but MLflow's Default and no run."""
    with dst.connect() as conn:
        runs = conn.exec_driver_sql("SELECT count(*) FROM runs").scalar()
        experiments = conn.exec_driver_sql("SELECT count(*) FROM experiments WHERE experiment_id <> 0").scalar()
    if runs or experiments:
        raise StoreError(f"{masked(target)} already holds {experiments} experiment(s) and {runs} run(s); migrate "
                         "into a new, empty database (before the server's first run)")


def _copy_rows(src, dst, source: str, target: str, artifacts_destination: str | None, say) -> dict[str, int]:
    """Every table of MLflow's schema (its own ORM definitions, which both stores now match), in foreign-key order."""
    import mlflow.store.model_registry.dbmodels.models  # noqa: F401  lazy: MLflow, see top (registers its tables)
    import mlflow.store.tracking.dbmodels.models  # noqa: F401  lazy: MLflow, see top (registers its tables)
    from mlflow.store.db.base_sql_model import Base  # lazy: MLflow, see top

    moved = _move_artifacts(src, artifacts_destination, say) if artifacts_destination else {}
    counts: dict[str, int] = {}
    with src.connect() as read, dst.begin() as write:
        for table in Base.metadata.sorted_tables:
            pk = list(table.primary_key.columns)
            present = {tuple(r) for r in write.execute(table.select().with_only_columns(*pk))} if pk else set()
            rows = []
            for row in read.execute(table.select()):
                values = dict(row._mapping)
                if pk and tuple(values[c.name] for c in pk) in present:  # e.g. the Default experiment of both
                    continue
                for col in ARTIFACT_COLUMNS.get(table.name, ()):
                    if values.get(col):
                        values[col] = _relocated(values[col], moved)
                rows.append(values)
            for i in range(0, len(rows), 1000):
                write.execute(table.insert(), rows[i:i + 1000])
            counts[table.name] = len(rows)
            if dst.dialect.name == "postgresql" and rows and len(pk) == 1 and pk[0].type.python_type is int:
                # a serial id continues after the copied ones (a new experiment gets max + 1)
                write.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table.name}', '{pk[0].name}'), "
                                      f"(SELECT MAX({pk[0].name}) FROM {table.name}))")
    say(f"[rjem] copied {source} into {masked(target)}: " + ", ".join(
        f"{counts.get(t, 0)} {t}" for t in ("experiments", "runs", "metrics", "params", "registered_models",
                                            "model_versions")))
    return counts


def _relocated(value: str, moved: dict[str, str]) -> str:
    """``value`` with its artifact-location prefix replaced by the one the artifacts moved to."""
    for old, new in moved.items():
        if value == old or value.startswith(old + "/"):
            return new + value[len(old):]
    return value


def _move_artifacts(src, destination: str, say) -> dict[str, str]:
    """Copy each experiment's local artifact directory to ``destination/ID``; ``{old location: mlflow-artifacts:/ID}``."""
    dst_fs, dst_root = storage.filesystem(destination)
    moved = {}
    with src.connect() as conn:
        rows = conn.exec_driver_sql("SELECT experiment_id, artifact_location FROM experiments").all()
    for exp_id, location in rows:
        if not location or not (location.startswith("file:") or location.startswith("/")):
            continue  # already in an object store or behind a server: reachable as it is
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path) if location.startswith("file:")
                    else location)
        if path.is_dir():
            pafs.copy_files(str(path), f"{dst_root.rstrip('/')}/{exp_id}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=dst_fs)
            say(f"[rjem] copied the artifacts of experiment {exp_id} ({path}) to {destination.rstrip('/')}/{exp_id}")
        moved[location.rstrip("/")] = f"mlflow-artifacts:/{exp_id}"
    return moved
