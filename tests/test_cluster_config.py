"""cluster.yaml passes Ray's own cluster-config validation offline, and every command it (and the cluster
walkthrough in docs/CLUSTER.md) runs names an entry point and options that exist.

Nothing here talks to a cloud: `ray up` cannot run on this machine, so the checks are Ray's schema
validation after ``prepare_config`` (what ``ray up`` does first), and parsing each command line with the
real click / argparse parsers of ``ray``, ``mlflow`` and ``rjem`` without running it.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
DOC = REPO / "docs" / "CLUSTER.md"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def invocations(command: str) -> list[list[str]]:
    """The simple commands of a shell line, as argument lists without redirections or env assignments.

    Enough shell for these configs: ``;``/``&&``/``||``/``|``/``&`` lists, subshells, ``$(...)``
    substitutions (their command is listed too), redirections, ``VAR=value``/``sudo``/``nohup`` prefixes.
    """
    out: list[list[str]] = []
    for inner in re.findall(r"\$\(([^()]*)\)", command):
        out += invocations(inner)
    line = re.sub(r"\$\([^()]*\)", "SUBSTITUTED", command)
    line = re.sub(r"\d?>&\d+", " ", line)
    line = re.sub(r"(&>|\d?>>?|<)\s*[^\s;&|()]+", " ", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    cur: list[str] = []
    for tok in lexer:
        if set(tok) <= set(";&|()"):
            if cur:
                out.append(cur)
            cur = []
        elif not cur and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tok) or tok in ("sudo", "nohup", "exec")):
            continue
        else:
            cur.append(tok)
    if cur:
        out.append(cur)
    return out


def commands_of(cfg: dict, *keys: str) -> list[list[str]]:
    return [argv for key in keys for line in cfg[key] for argv in invocations(line)]


def program(argv: list[str]) -> str:
    return Path(argv[0]).name


def ray_start_args(cfg: dict, key: str) -> list[dict]:
    import ray.scripts.scripts as ray_cli

    starts = [argv for argv in commands_of(cfg, key) if program(argv) == "ray" and argv[1:2] == ["start"]]
    # click's own parser: an unknown flag raises NoSuchOption, a bad value BadParameter.
    return [ray_cli.start.make_context("start", argv[2:]).params for argv in starts]


# ---------------------------------------------------------------------------------------------- Ray's validation


def test_passes_rays_own_validation(prepared):
    # prepare_config merged the AWS defaults and the common setup commands into both node kinds.
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]
    assert prepared["worker_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]


def _misspelt_top_level_key(c: dict) -> None:
    c["setup_comands"] = c.pop("setup_commands")


def _misspelt_node_type_key(c: dict) -> None:
    c["available_node_types"][c["head_node_type"]]["node_confg"] = {}


def _min_workers_above_max_workers(c: dict) -> None:
    for t in c["available_node_types"].values():
        t["min_workers"] = 1
    c["max_workers"] = 1


@pytest.mark.parametrize("mutate, named", [
    (_misspelt_top_level_key, "setup_comands"),
    (_misspelt_node_type_key, "node_confg"),
    (_min_workers_above_max_workers, "max_workers"),
])
def test_validation_rejects_a_broken_variant(raw, mutate, named):
    """The check above has teeth: the same pipeline refuses small, typical mistakes."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(Exception) as err:
        validate_config(prepare_config(bad))
    assert named in str(err.value).splitlines()[0]  # refused for that mistake, not for something else


# ---------------------------------------------------------------------------------------------- node types


def test_cpu_head_and_gpu_workers_that_fit_the_cifar10_config(prepared):
    from rjem_ray.config import load_config

    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "training workers must not be scheduled on the head"
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu, "no GPU worker node type"
    for t in gpu.values():
        assert re.match(r"(g[456]|p[345])[a-z]*\.", t["node_config"]["InstanceType"]), t["node_config"]
    # A Ray Train worker of the CIFAR-10 config ({CPU: cpus_per_worker, GPU: 1}) fits on every GPU type,
    # and the GPU types together can hold the 16 workers the walkthrough submits.
    cfg = load_config(REPO / "tune_configs" / "cifar10.yaml")
    for name, t in gpu.items():
        assert t["resources"]["CPU"] >= cfg.trainer.cpus_per_worker, name
    capacity = sum(min(t["resources"]["GPU"], t["resources"]["CPU"] // cfg.trainer.cpus_per_worker) * t["max_workers"]
                   for t in gpu.values())
    assert capacity >= 16
    assert sum(t["max_workers"] for t in workers.values()) <= prepared["max_workers"]


def test_a_cifar10_train_sweep_trial_fits_on_one_gpu_node_of_every_type(prepared):
    # A train-scope trial holds its own process (tune.trial_cpus) plus its Ray Train workers; on the 8-vCPU
    # g5 nodes 1 + 8 CPUs would tie up two nodes per trial.
    from rjem_ray.tune import load_sweep

    sweep = load_sweep(REPO / "tune_configs" / "tune-cifar10-train.yaml")
    cfg, st = sweep.cfg, sweep.settings
    assert cfg.trainer.use_gpu and cfg.trainer.num_workers == 1
    need = st.trial_cpus + cfg.trainer.cpus_per_worker
    for name, t in prepared["available_node_types"].items():
        if t["resources"].get("GPU", 0) >= 1:
            per_gpu = t["resources"]["CPU"] / t["resources"]["GPU"]
            assert need <= per_gpu, (name, need, per_gpu)


# ---------------------------------------------------------------------------------------------- commands


def test_every_command_is_well_formed_shell(raw):
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for key in keys:
        for line in raw.get(key) or []:
            assert isinstance(line, str) and line.strip(), (key, line)
            shlex.split(line)  # unbalanced quotes raise (a YAML '#' comment can silently cut a line)
            assert not line.rstrip().endswith(("&&", "||", "|", "\\")), (key, line)


def test_setup_installs_the_mounted_checkout_with_cuda_torch(prepared):
    mounts = prepared["file_mounts"]
    remote = [r for r, local in mounts.items() if Path(local).resolve() == Path(".").resolve()]
    assert remote, f"the working directory is not mounted: {mounts}"
    pips = [argv for argv in commands_of(prepared, "setup_commands")
            if program(argv) in ("pip", "pip3") or argv[1:3] == ["-m", "pip"]]
    editable = [argv for argv in pips if "install" in argv and "-e" in argv]
    assert any(argv[argv.index("-e") + 1] == remote[0] for argv in editable), editable
    for argv in pips:  # CUDA torch: the CPU-only constraints must not reach the GPU nodes
        assert not {"-c", "--constraint"} & set(argv) and not any("constraints" in a for a in argv), argv
    import ray

    pinned = [a for argv in pips for a in argv if re.match(r"ray(\[.*\])?==", a)]
    assert pinned and all(a.endswith("==" + ray.__version__) for a in pinned), pinned
    assert "ray[default" in " ".join(pinned)  # the job server needs ray[default]
    # The console scripts the start commands and the walkthrough call are what that install provides.
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("rjem") == "rjem_ray.cli:main"
    assert "mlflow" in scripts and "ray" in scripts
    import tomllib

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["rjem"] == "rjem_ray.cli:main"


def test_every_node_starts_ray_with_token_authentication(raw, prepared):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [line for line in raw[key] if re.search(r"\bray start\b", line)]
        assert starts and all(re.search(r"(^|[;\s])(export )?RAY_AUTH_MODE=token[;\s]", line) for line in starts), starts
    # The token reaches every node from the user's machine; it is not in the repository.
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert not list(REPO.glob("**/auth_token"))


def test_ray_start_commands_use_existing_flags_and_agree_on_the_head_port(prepared):
    [head] = ray_start_args(prepared, "head_start_ray_commands")
    [worker] = ray_start_args(prepared, "worker_start_ray_commands")
    assert head["head"] and not worker["head"]
    assert head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"  # where `ray up` writes it
    assert head["dashboard_host"] == "127.0.0.1"  # the job server is reached through `ray dashboard`
    assert head["num_cpus"] == 0
    assert worker["address"] == f"$RAY_HEAD_IP:{head['port']}"
    assert worker["object_manager_port"] == head["object_manager_port"]


def test_head_runs_the_only_mlflow_writer_with_a_local_store(prepared):
    import mlflow.cli

    servers = [argv for argv in commands_of(prepared, "head_start_ray_commands")
               if program(argv) == "mlflow" and argv[1:2] == ["server"]]
    assert len(servers) == 1
    opts = mlflow.cli.server.make_context("server", servers[0][2:]).params
    # The head's private address (a $(...) substitution), never every interface or loopback only: the GPU
    # nodes log to it over HTTP.
    assert opts["host"] == "SUBSTITUTED", opts["host"]
    mounts = [argv for argv in commands_of(prepared, "setup_commands") if program(argv) == "mount"]
    assert mounts and all(re.match(r"fs-[0-9a-f]+\.efs\.[a-z0-9-]+\.amazonaws\.com:/", m[-2]) for m in mounts)
    shared = mounts[0][-1]
    backend = opts["backend_store_uri"]
    # The store is opened by this server alone: sqlite on the head's own disk (not on the NFS mount) or PostgreSQL.
    assert backend.startswith("postgresql://") or (
        backend.startswith("sqlite:////") and not backend[len("sqlite:///"):].startswith(shared)), backend
    # Artifacts are served by it (proxied uploads) from shared storage.
    dest = opts["artifacts_destination"]
    assert dest.startswith(f"{shared}/") or dest.startswith("s3://"), dest
    assert opts["serve_artifacts"] is not False and not opts.get("default_artifact_root")
    # Not killed by the Ray start commands' `ray stop`, replaced on a restart through its pid file.
    assert any(argv[:1] == ["kill"] for argv in commands_of(prepared, "head_start_ray_commands"))


def test_no_sqlite_store_on_shared_storage_anywhere():
    """No config, command or walkthrough line points a sqlite store at the NFS mount."""
    texts = [CLUSTER.read_text(), DOC.read_text()] + [p.read_text() for p in (REPO / "tune_configs").glob("*.yaml")]
    for text in texts:
        assert not re.search(r"sqlite:////mnt/", text), re.search(r".*sqlite:////mnt/.*", text).group(0)


# ---------------------------------------------------------------------------------------------- the walkthrough


def doc_commands() -> list[list[str]]:
    """Every ``ray ...`` / ``rjem ...`` command in the shell blocks of docs/CLUSTER.md."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", DOC.read_text(), flags=re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return [argv for line in lines for argv in invocations(line) if program(argv) in ("ray", "rjem")]


def test_cluster_walkthrough_commands_parse_with_the_real_parsers():
    import ray.scripts.scripts as ray_cli

    from rjem_ray.cli import build_parser
    from rjem_ray.config import load_config

    cmds = doc_commands()
    seen = set()
    for argv in cmds:
        if program(argv) == "ray":
            group, rest = ray_cli.cli, argv[1:]
            path = []
            while hasattr(group, "commands") and rest and rest[0] in group.commands:
                path.append(rest[0])
                group, rest = group.commands[rest[0]], rest[1:]
            assert path, f"unknown ray command: {argv}"
            params = group.make_context(" ".join(path), list(rest)).params
            seen.add("ray " + " ".join(path))
            if path == ["job", "submit"]:
                entry = list(params["entrypoint"])
                assert entry[:2] == ["rjem", "train"], entry
                cmds.append(entry)
        else:
            args = build_parser().parse_args(argv[1:])
            seen.add(f"rjem {args.command}")
            if args.command == "train":
                # The config exists in the repo and every --set names a real key with a valid value.
                load_config(REPO / args.config, args.set)
    assert {"ray up", "ray down", "ray job submit", "ray job logs", "ray exec", "ray dashboard",
            "rjem train"} <= seen, seen
