"""Where runs are kept: the tracking, registry and artifact URIs, made absolute at the edge, and the stores' checks.

Relative ``sqlite:///`` URIs and artifact locations are made absolute so that Ray workers, whose working directory
differs, write to the same store; a sqlite file on a network file system is refused. The URIs' precedence
(``--set`` > ``MLFLOW_*`` > the config file > the default) is the config's (:func:`rjem_ray.config.load_config`).
Every MLflow call of the package goes through an ``MlflowClient`` with explicit tracking and registry URIs
(:func:`client_for`), never through MLflow's process-wide fluent state. A database server or an MLflow server
that cannot be used fails at start in one line, its password masked (:func:`check_store`).
"""

from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path

from ..config import ConfigError
from ..core.errors import first_line

# MLflow is imported inside the functions that call it (marked `# lazy: MLflow, see top`): `rjem --help` (the
# CLI's parser imports the tune package), every Ray Train worker and a sweep's trials import this module without
# opening a store, and `import mlflow` takes ~1.7 s.

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when MLflow is imported
# MLflow draws a progress bar for every artifact copy (log_model reads the checkpoint back through one), which
# breaks the training log into bar fragments; MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true brings it back.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "lustre", "glusterfs", "ceph")


def filesystem_of(path: str | Path, mounts: str | Path = "/proc/mounts") -> tuple[str, str]:
    """``(type, mount point)`` of the mount holding ``path`` (its nearest existing parent), or ("", "")."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    best = ("", "")
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (str(p) == point or str(p).startswith(point.rstrip("/") + "/")) and len(point) >= len(best[1]):
            best = (fields[2], point)
    return best


def resolve_tracking_uri(uri: str, base: str | Path | None = None, mounts: str | Path = "/proc/mounts") -> str:
    """Make a relative ``sqlite:///path`` absolute (against ``base`` or the working directory).

    A sqlite file on a network file system is refused: several writers over NFS lock up or lose records
    (SQLite's own documentation warns against it). A cluster logs to one ``mlflow server`` over HTTP.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = Path(uri[len(prefix):]) if uri.startswith(prefix + "/") else Path(base or os.getcwd()) / uri[len(prefix):]
    fstype, point = filesystem_of(path, mounts)
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("nfs"):
        raise ConfigError(
            f"tracking.tracking_uri: {uri} is a sqlite file on {fstype} ({point}); sqlite over a network file "
            "system loses records with several writers. Log to an MLflow server instead (MLFLOW_TRACKING_URI="
            "http://HOST:5000, see docs/CLUSTER.md) or use a sqlite file on local disk")
    if not uri.startswith(prefix + "/"):
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path.resolve())
    return uri


def is_server_uri(uri: str) -> bool:
    """Whether ``uri`` names an MLflow tracking server (which then owns the store and the artifacts)."""
    return uri.startswith(("http://", "https://"))


def resolve_artifact_location(location: str | None, base: str | Path | None = None,
                              tracking_uri: str | None = None) -> str | None:
    """Absolute artifact location of a new experiment; None lets an MLflow server choose.

    With a tracking server, a relative (or empty) location would name a directory on this machine only:
    the server's own ``--artifacts-destination`` is used instead (artifacts are uploaded through it).
    """
    if not location or (tracking_uri and is_server_uri(tracking_uri) and "://" not in location
                        and not Path(location).is_absolute()):
        return None
    if "://" in location:
        return location
    path = Path(location)
    if not path.is_absolute():
        path = Path(base or os.getcwd()) / path
    return path.resolve().as_uri()


def store_uris(tracking) -> tuple[str, str]:
    """``(tracking URI, registry URI)`` of a :class:`rjem_ray.config.TrackingConfig`, made absolute.

    The config already holds the precedence ``--set`` > ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` >
    the config file > the default (:func:`rjem_ray.config.load_config`); an empty registry URI is the
    tracking store, as in MLflow.
    """
    uri = resolve_tracking_uri(tracking.tracking_uri)
    return uri, resolve_tracking_uri(tracking.registry_uri) if tracking.registry_uri else uri


def client_for(tracking_uri: str, registry_uri: str | None = None):
    """An ``MlflowClient`` on exactly these stores (registry: the tracking store unless given).

    Both URIs are explicit, so the client never falls back to MLflow's process-wide state
    (``mlflow.set_tracking_uri``/``set_registry_uri`` or the environment at call time).
    """
    from mlflow.tracking import MlflowClient  # lazy: MLflow, see top

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


# ------------------------------------------------------------------------------------------ the store's checks
# A wrong or unreachable database is one line at start (`rjem train`, `rjem tune`, `rjem server`), not a traceback
# in a log later; its password never appears in it.

DATABASE_TIMEOUT_S = 10
_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s]*)@")


class StoreError(ValueError):
    """A tracking store or server that cannot be used; the message is one line naming it (password masked)."""


def masked(uri: str) -> str:
    """``uri`` with the password of its ``user:password@`` part replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", str(uri))


def _scrub(text: str, uri: str) -> str:
    """``text`` (e.g. a driver's error message) without ``uri``'s password in it."""
    m = _PASSWORD.search(str(uri))
    secret = m.group(2) if m else ""
    text = text.replace(str(uri), masked(uri))
    return text.replace(secret, "***") if len(secret) >= 3 else text


def is_database_uri(uri: str) -> bool:
    """Whether ``uri`` names a database server store (``postgresql://``, ``postgresql+psycopg://``, ``mysql://``,
    ...): an SQLAlchemy URL other than sqlite."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return scheme.split("+", 1)[0] in ("postgresql", "postgres", "mysql", "mssql")


def check_database(uri: str, timeout_s: float = DATABASE_TIMEOUT_S) -> None:
    """Connect to the database store ``uri`` and run ``SELECT 1``; a :class:`StoreError` (one line, password
    masked) when the URI is malformed, its driver is missing or the server refuses or does not answer within
    ``timeout_s``. Nothing is created."""
    from mlflow.store.db.utils import create_sqlalchemy_engine  # lazy: MLflow, see top

    shown = masked(uri)
    scheme = uri.split("://", 1)[0].lower()
    if scheme.split("+", 1)[0] == "postgres":
        raise StoreError(f"{shown}: write postgresql:// (or postgresql+psycopg://), not postgres://")
    probe = uri
    if scheme.split("+", 1)[0] in ("postgresql", "mysql") and "connect_timeout=" not in uri:
        probe += ("&" if "?" in uri else "?") + f"connect_timeout={max(1, int(timeout_s))}"
    engine = None
    try:
        engine = create_sqlalchemy_engine(probe)  # MLflow's own engine: SQLAlchemy comes with MLflow
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except ImportError as exc:  # the dialect's driver package
        raise StoreError(f"{shown}: the database driver is not installed ({_first_line(exc)}); for PostgreSQL "
                         "pip install 'psycopg[binary]' and use postgresql+psycopg://") from None
    except Exception as exc:
        if type(exc).__name__ in ("ArgumentError", "NoSuchModuleError"):
            raise StoreError(f"{shown} is not a database URI MLflow can open ({_first_line(exc)}); give e.g. "
                             "postgresql+psycopg://USER:PASSWORD@HOST:5432/DB") from None
        reason = _scrub(" ".join(str(getattr(exc, "orig", None) or exc).split()), uri)
        raise StoreError(f"the MLflow backend store {shown} cannot be reached ({reason[:300]}); check its host, "
                         "port, database name, user and password") from None
    finally:
        if engine is not None:
            engine.dispose()


def _first_line(exc: BaseException) -> str:
    return first_line(exc, type(exc).__name__)


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """A :class:`StoreError` when the MLflow server at ``uri`` does not answer ``/health``."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            resp.read()
    except Exception as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
        raise StoreError(f"the MLflow server {masked(uri)} does not answer ({reason}); start it (`rjem server`, "
                         "docs/CLUSTER.md) or point MLFLOW_TRACKING_URI / tracking.tracking_uri at a running one") from None


def check_store(uri: str) -> None:
    """Fail at start, in one line, when the tracking store ``uri`` (resolved) cannot be used: a database server
    must accept a connection, an MLflow server must answer. Nothing is logged anywhere else instead."""
    if is_database_uri(uri):
        check_database(uri)
    elif is_server_uri(uri):
        check_server(uri)
