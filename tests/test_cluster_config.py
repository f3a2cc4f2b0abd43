"""cluster.yaml passes Ray's own cluster-config validation offline, Ray's own autoscaler would place the
jobs the project submits on the node types meant for them, and every command it (and the cluster
walkthrough in docs/CLUSTER.md) runs names an entry point and options that exist.

Nothing here talks to a cloud or starts Ray: `ray up` cannot run on this machine, so the checks are Ray's
schema validation after ``prepare_config`` (what ``ray up`` does first), Ray's AWS bootstrap steps that need
no AWS call, the scheduling code of both Ray autoscalers (v1's ``ResourceDemandScheduler.get_nodes_to_launch``
and v2's ``ResourceDemandScheduler.schedule``, the one ``ray up`` starts by default since Ray 2.50) fed the
placement groups that ``rjem train`` and ``rjem tune`` ask for, and parsing each command line with the real
click / argparse parsers of ``ray``, ``mlflow`` and ``rjem`` without running it.
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
DOC = REPO / "docs" / "CLUSTER.md"
CIFAR10 = REPO / "tune_configs" / "cifar10.yaml"
SWEEP = REPO / "tune_configs" / "tune-cifar10-train.yaml"


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


def gpu_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items()
            if k != cfg["head_node_type"] and v["resources"].get("GPU", 0) >= 1}


def accelerator_of(node_type: dict) -> str:
    """The one GPU type a node type states in its resources (``accelerator_type:A100: 1`` -> ``A100``)."""
    [name] = [k.split(":", 1)[1] for k in node_type["resources"] if k.startswith("accelerator_type:")]
    assert node_type["resources"][f"accelerator_type:{name}"] == 1
    return name


def test_a_cpu_head_and_one_gpu_type_per_node_type(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "training workers must not be scheduled on the head"
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    gpu = gpu_types(prepared)
    assert set(gpu) == set(workers), "every worker node type is a GPU node type"
    for t in gpu.values():
        # (p3's V100 is not supported by CUDA 13, the toolkit of constraints-cuda.txt's torch)
        assert re.match(r"(g[456]|p[45])[a-z]*\.", t["node_config"]["InstanceType"]), t["node_config"]
    # Each GPU node type states its accelerator, and no two share one: a job that names a type gets that type only.
    accelerators = [accelerator_of(t) for t in gpu.values()]
    assert len(set(accelerators)) == len(accelerators), accelerators
    assert sum(t["max_workers"] for t in workers.values()) <= prepared["max_workers"]


def test_a_cifar10_train_sweep_trial_fits_on_one_gpu_node_of_every_type(prepared):
    # A train-scope trial holds its own process (tune.trial_cpus) plus its Ray Train workers; on the 8-vCPU
    # g5 nodes 1 + 8 CPUs would tie up two nodes per trial.
    from rjem_ray.tune import load_sweep

    sweep = load_sweep(SWEEP)
    cfg, st = sweep.cfg, sweep.settings
    assert cfg.trainer.use_gpu and cfg.trainer.num_workers == 1
    need = st.trial_cpus + cfg.trainer.cpus_per_worker
    for name, t in gpu_types(prepared).items():
        per_gpu = t["resources"]["CPU"] / t["resources"]["GPU"]
        assert need <= per_gpu, (name, need, per_gpu)


# ---------------------------------------------------------------------------------------------- network


def test_one_zone_one_private_subnet_one_security_group_named_by_every_node_type(raw):
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces, _configure_security_group

    provider = raw["provider"]
    assert "," not in provider["availability_zone"], "DDP nodes and their placement group live in one zone"
    assert provider["use_internal_ips"] is True, "no node needs a public address"
    # Ray's AWS bootstrap steps that need no AWS call: EFA interfaces must name a subnet and a group each
    # (it raises otherwise), and with a group named on every node type Ray creates none of its own (its
    # default group opens SSH to 0.0.0.0/0, and provider.security_group.IpPermissions only adds to it).
    boot = _configure_from_network_interfaces(copy.deepcopy(raw))
    assert _configure_security_group(copy.deepcopy(boot)) == boot
    subnets = {s for t in boot["available_node_types"].values() for s in t["node_config"]["SubnetIds"]}
    groups = {g for t in boot["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]}
    assert len(subnets) == 1 and len(groups) == 1, (subnets, groups)
    assert "security_group" not in provider
    # Neither the config nor the doc's commands that create the group open anything to the whole internet.
    for text in (CLUSTER.read_text(), DOC.read_text()):
        assert not re.search(r"(--cidr|CidrIp)[\s:=]*0\.0\.0\.0/0", text)


def test_ddp_nodes_have_efa_on_every_network_card_in_a_cluster_placement_group(prepared):
    ddp = prepared["available_node_types"][ddp_type(prepared)]
    node = ddp["node_config"]
    assert node["Placement"]["GroupName"]
    interfaces = node["NetworkInterfaces"]
    assert {i["InterfaceType"] for i in interfaces} == {"efa"}
    assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(len(interfaces)))
    assert [i["DeviceIndex"] for i in interfaces if i["NetworkCardIndex"] == 0] == [0]
    assert len(interfaces) >= 4 and ddp["resources"]["GPU"] == 8
    # The doc creates that placement group with strategy cluster.
    assert re.search(rf"create-placement-group[^\n]*--group-name {node['Placement']['GroupName']}[^\n]*"
                     r"--strategy cluster", DOC.read_text())


# ---------------------------------------------------------------------------------------------- placement
#
# What Ray's autoscaler would launch for the placement groups the project creates. ``rjem train`` asks Ray
# Train for ``ray_setup.scaling_config(cfg, use_gpu=True)``; Ray Train V2 turns it into one placement group of
# ``max_workers`` bundles ``_resources_per_worker_not_none`` (its resources per worker plus
# ``accelerator_type:<type>: 0.001``) with ``placement_strategy`` (WorkerGroup._create_placement_group). A Tune
# trial of ``rjem tune`` is its own placement group (``tune.with_resources({"cpu": trial_cpus})``) whose process
# builds that trainer. Both autoscalers see pending placement groups: v1 as PlacementGroupTableData (PACK is
# flattened into separate bundle demands), v2 as gang requests from the GCS (all bundles or none).

SCHEDULERS = ["v1", "v2"]
_IP = "ip-{}"  # a node address is only a key here


def load_cifar10(*overrides: str):
    from rjem_ray.config import load_config

    return load_config(CIFAR10, list(overrides))


def trainer_group(cfg) -> tuple[list[dict], str]:
    """The placement group Ray Train V2 creates for ``rjem train`` with ``cfg``: bundles and strategy."""
    from rjem_ray.distributed.ray_setup import scaling_config

    sc = scaling_config(cfg, use_gpu=True)
    return [dict(sc._resources_per_worker_not_none)] * sc.max_workers, sc.placement_strategy


def trial_group(trial_cpus: float) -> tuple[list[dict], str]:
    """The placement group of one Tune trial's own process (what ``rjem tune`` hands to ``tune.with_resources``)."""
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    pgf = resource_dict_to_pg_factory({"cpu": trial_cpus})
    return [dict(b) for b in pgf.bundles], pgf.strategy


def launches(cluster: dict, groups: list[tuple[list[dict], str]], scheduler: str,
             running: list[tuple[str, dict]] = (), tasks: list[dict] = ()) -> tuple[dict[str, int], list]:
    """Node types (and counts) Ray's autoscaler ``scheduler`` would launch for the pending placement ``groups``
    (and pending ``tasks``' resource shapes) on a cluster of its head plus ``running`` (node type, available
    resources) workers, and what it could not place (v1: bundles, v2: whole placement groups and task shapes).
    No Ray process, no cloud call."""
    cfg = copy.deepcopy(cluster)
    head = cfg["head_node_type"]
    nodes = [(head, dict(cfg["available_node_types"][head]["resources"]))] + list(running)
    if scheduler == "v1":
        return _launches_v1(cfg, groups, nodes, list(tasks))
    return _launches_v2(cfg, groups, nodes, list(tasks))


def _launches_v1(cfg, groups, nodes, tasks):
    from ray._private.gcs_utils import PlacementGroupTableData
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler.tags import NODE_KIND_HEAD, NODE_KIND_WORKER, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE
    from ray.core.generated.common_pb2 import PlacementStrategy

    cfg = prepare_config(cfg)
    types = cfg["available_node_types"]
    ids = [f"node-{i}" for i in range(len(nodes))]

    class Provider:  # what the scheduler asks the cloud provider about existing nodes
        def node_tags(self, node_id):
            i = ids.index(node_id)
            return {TAG_RAY_NODE_KIND: NODE_KIND_HEAD if i == 0 else NODE_KIND_WORKER,
                    TAG_RAY_USER_NODE_TYPE: nodes[i][0]}

        def internal_ip(self, node_id):
            return _IP.format(ids.index(node_id))

    pending = []
    for bundles, strategy in groups:
        pg = PlacementGroupTableData(strategy=PlacementStrategy.Value(strategy),
                                     state=PlacementGroupTableData.PENDING)
        for bundle in bundles:
            pg.bundles.add().unit_resources.update(bundle)
        pending.append(pg)
    scheduler = ResourceDemandScheduler(Provider(), types, cfg["max_workers"], cfg["head_node_type"],
                                        cfg["upscaling_speed"])
    to_launch, unfulfilled = scheduler.get_nodes_to_launch(
        nodes=ids, launching_nodes={}, resource_demands=tasks,
        unused_resources_by_ip={_IP.format(i): dict(avail) for i, (_, avail) in enumerate(nodes)},
        pending_placement_groups=pending,
        max_resources_by_ip={_IP.format(i): dict(types[t]["resources"]) for i, (t, _) in enumerate(nodes)},
        ensure_min_cluster_size=[], node_availability_summary=NodeAvailabilitySummary({}))
    return dict(to_launch), list(unfulfilled)


def _launches_v2(cfg, groups, nodes, tasks):
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.schema import AutoscalerInstance
    from ray.core.generated.autoscaler_pb2 import GangResourceRequest, NodeState, ResourceRequestByCount
    from ray.core.generated.instance_manager_pb2 import Instance, NodeKind

    config = AutoscalingConfig(cfg, skip_content_hash=True)  # prepare_config + validate_config, as on the head
    types = config.get_node_type_configs()
    instances = []
    for i, (node_type, avail) in enumerate(nodes):
        node_id = bytes([i + 1]) * 28  # a Ray node id is 28 bytes
        instances.append(AutoscalerInstance(
            im_instance=Instance(instance_id=f"i-{i}", instance_type=node_type, status=Instance.RAY_RUNNING,
                                 node_kind=NodeKind.HEAD if i == 0 else NodeKind.WORKER, node_id=node_id.hex()),
            ray_node=NodeState(node_id=node_id, ray_node_type_name=node_type, node_ip_address=_IP.format(i),
                               total_resources=types[node_type].resources, available_resources=avail)))
    gangs = []
    for bundles, strategy in groups:
        assert strategy in ("PACK", "SPREAD"), strategy  # the GCS adds no placement constraint for these two
        gang = GangResourceRequest(details=f"placement_group:{strategy}")
        selector = gang.bundle_selectors.add()
        for bundle in bundles:
            gang.requests.add().resources_bundle.update(bundle)
            selector.resource_requests.add().resources_bundle.update(bundle)
        gangs.append(gang)
    requests = []
    for shape in tasks:
        request = ResourceRequestByCount(count=1)
        request.request.resources_bundle.update(shape)
        requests.append(request)
    reply = ResourceDemandScheduler().schedule(SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=types, max_num_nodes=config.get_max_num_nodes(),
        gang_resource_requests=gangs, resource_requests=requests, current_instances=instances))
    assert not reply.to_terminate
    infeasible = list(reply.infeasible_gang_resource_requests) + list(reply.infeasible_resource_requests)
    return {r.instance_type: r.count for r in reply.to_launch}, infeasible


def ddp_type(cluster: dict) -> str:
    """The node type named by cifar10.yaml's trainer.accelerator_type (the DDP nodes)."""
    accel = load_cifar10().trainer.accelerator_type
    assert accel, "tune_configs/cifar10.yaml names no trainer.accelerator_type: a DDP job could mix GPU types"
    [name] = [k for k, t in gpu_types(cluster).items() if accelerator_of(t) == accel]
    return name


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("workers", [8, 16, 64])
def test_a_ddp_job_gets_only_ddp_nodes(prepared, raw, workers, scheduler):
    cfg = load_cifar10(f"trainer.num_workers={workers}")
    bundles, strategy = trainer_group(cfg)
    assert strategy == "PACK" and len(bundles) == workers
    assert all(b.get(f"accelerator_type:{cfg.trainer.accelerator_type}", 0) > 0 and b["GPU"] == 1 for b in bundles)
    ddp = ddp_type(prepared)
    gpus = prepared["available_node_types"][ddp]["resources"]["GPU"]
    to_launch, infeasible = launches(raw, [(bundles, strategy)], scheduler)
    assert not infeasible, infeasible
    assert to_launch == {ddp: math.ceil(workers / gpus)}, to_launch
    assert to_launch[ddp] <= prepared["available_node_types"][ddp]["max_workers"]


def tune_command_overrides() -> list[str]:
    """The ``--set`` values of the walkthrough's ``rjem tune`` of the CIFAR-10 train sweep."""
    from rjem_ray.cli import build_parser

    tunes = [build_parser().parse_args(argv[1:]) for argv in doc_rjem_commands()
             if argv[1:3] == ["tune", str(SWEEP.relative_to(REPO))]]
    assert tunes, "docs/CLUSTER.md runs no `rjem tune tune_configs/tune-cifar10-train.yaml`"
    return tunes[0].set


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_sweeps_trials_get_only_tune_nodes(prepared, raw, scheduler):
    """The documented sweep (tune.max_concurrent trials at once, one GPU worker each, of the Tune node type's
    accelerator): first its one-GPU preparation task (the FID reference statistics), then the trials' own
    processes wait for their placement groups, then, once they run, each trial's trainer waits for its
    worker's. Every round launches the Tune node type only."""
    from ray.autoscaler._private.resource_demand_scheduler import get_bin_pack_residual

    from rjem_ray.tune import load_sweep

    sweep = load_sweep(SWEEP, tune_command_overrides())
    n = sweep.settings.max_concurrent
    worker = trainer_group(sweep.cfg)
    assert len(worker[0]) == 1 and worker[0][0]["GPU"] == 1
    [tune] = [k for k, t in gpu_types(prepared).items() if accelerator_of(t) == sweep.cfg.trainer.accelerator_type]
    assert tune != ddp_type(prepared)
    resources = prepared["available_node_types"][tune]["resources"]

    # rjem_ray/tune/runner.py: ray.remote(prepare).options(num_cpus=max(trial_cpus, 1), num_gpus=1), any GPU
    prepare = {"CPU": max(sweep.settings.trial_cpus, 1), "GPU": 1}
    before, infeasible = launches(raw, [], scheduler, tasks=[prepare])
    assert not infeasible and before == {tune: 1}, (before, infeasible)

    trial = trial_group(sweep.settings.trial_cpus)
    first, infeasible = launches(raw, [trial] * n, scheduler)
    assert not infeasible and set(first) == {tune}, (first, infeasible)
    unplaced, after = get_bin_pack_residual([dict(resources) for _ in range(first[tune])], trial[0] * n)
    assert not unplaced
    second, infeasible = launches(raw, [worker] * n, scheduler, running=[(tune, a) for a in after])
    assert not infeasible and set(second) == {tune}, (second, infeasible)
    # One node per trial, plus at most one more whose CPUs the trials' own processes fill.
    assert first[tune] + second[tune] <= min(n + 1, prepared["available_node_types"][tune]["max_workers"])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_64_gpu_job_and_a_sweep_fit_at_once(prepared, raw, scheduler):
    from rjem_ray.tune import load_sweep

    sweep = load_sweep(SWEEP, tune_command_overrides())
    n = sweep.settings.max_concurrent
    groups = [trainer_group(load_cifar10("trainer.num_workers=64"))]
    groups += [trial_group(sweep.settings.trial_cpus), trainer_group(sweep.cfg)] * n
    to_launch, infeasible = launches(raw, groups, scheduler)
    assert not infeasible, infeasible
    assert to_launch.get(ddp_type(prepared)) == 8 and sum(to_launch.values()) <= prepared["max_workers"], to_launch


# The GPU node types of cluster.yaml before issue 20 (commit b296b8b), and what its trainer asked for then:
# any GPU, 8 CPUs per worker.
BEFORE = """
cluster_name: rjem
max_workers: 18
provider: {type: aws, region: us-west-2, availability_zone: "us-west-2a,us-west-2b"}
available_node_types:
  head: {resources: {CPU: 0}, node_config: {InstanceType: m5.2xlarge}}
  gpu_a10g: {min_workers: 0, max_workers: 16, resources: {CPU: 8, GPU: 1}, node_config: {InstanceType: g5.2xlarge}}
  gpu_8x_a100: {min_workers: 0, max_workers: 2, resources: {CPU: 96, GPU: 8},
                node_config: {InstanceType: p4d.24xlarge}}
head_node_type: head
"""
BEFORE_REQUEST = ["trainer.accelerator_type=null", "trainer.cpus_per_worker=8"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_the_layout_before_could_not_place_64_workers_and_mixed_gpu_types(scheduler):
    """The checks above have teeth: the same scheduling code refuses 64 workers on the old layout, and splits
    32 workers between A10G and A100 nodes."""
    before = yaml.safe_load(BEFORE)
    group = trainer_group(load_cifar10("trainer.num_workers=64", *BEFORE_REQUEST))
    _, infeasible = launches(before, [group], scheduler)
    assert infeasible
    group = trainer_group(load_cifar10("trainer.num_workers=32", *BEFORE_REQUEST))
    to_launch, infeasible = launches(before, [group], scheduler)
    assert not infeasible and set(to_launch) == {"gpu_a10g", "gpu_8x_a100"}, to_launch


# ---------------------------------------------------------------------------------------------- commands


def test_every_command_is_well_formed_shell(raw):
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for key in keys:
        for line in raw.get(key) or []:
            assert isinstance(line, str) and line.strip(), (key, line)
            shlex.split(line)  # unbalanced quotes raise (a YAML '#' comment can silently cut a line)
            assert not line.rstrip().endswith(("&&", "||", "|", "\\")), (key, line)


def test_setup_installs_the_mounted_checkout_with_pinned_cuda_torch(prepared):
    mounts = prepared["file_mounts"]
    remote = [r for r, local in mounts.items() if Path(local).resolve() == Path(".").resolve()]
    assert remote, f"the working directory is not mounted: {mounts}"
    pips = [argv for argv in commands_of(prepared, "setup_commands")
            if program(argv) in ("pip", "pip3") or argv[1:3] == ["-m", "pip"]]
    editable = [argv for argv in pips if "install" in argv and "-e" in argv]
    assert any(argv[argv.index("-e") + 1] == remote[0] for argv in editable), editable
    # Every node (setup_commands run on the head and the workers) installs against the checkout's CUDA pins;
    # the CPU-only pins never reach a GPU node.
    for argv in editable:
        assert "-c" in argv and argv[argv.index("-c") + 1] == f"{remote[0]}/constraints-cuda.txt", argv
    assert not any("constraints-cpu" in a for argv in pips for a in argv), pips
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


def pins(path: Path) -> dict[str, str]:
    """name -> version spec of a pip constraints file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups()
            out[name.lower().replace("_", "-")] = spec
    return out


def test_cuda_pins_fix_torch_and_its_cuda_libraries_and_agree_with_the_cpu_pins():
    cpu, cuda = pins(REPO / "constraints-cpu.txt"), pins(REPO / "constraints-cuda.txt")
    # The same torch release; on the cluster the registry's default build (CUDA), not the +cpu one.
    assert re.fullmatch(r"==\d+\.\d+\.\d+", cuda["torch"]) and cpu["torch"] == cuda["torch"] + "+cpu"
    for name, spec in cpu.items():
        if name != "torch":
            assert cuda.get(name) == spec, (name, spec, cuda.get(name))
    # CUDA itself: the toolkit, cuDNN and NCCL at exact versions.
    for prefix in ("cuda-toolkit", "nvidia-cudnn", "nvidia-nccl"):
        [spec] = [v for k, v in cuda.items() if k.startswith(prefix)]
        assert spec.startswith("=="), (prefix, spec)


def test_the_cluster_leaves_ray_trains_health_checks_and_preemption_at_rays_defaults(raw):
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    text = " ".join(line for key in keys for line in raw.get(key) or [])
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in text and "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in text


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


def test_head_runs_a_stateless_mlflow_server_on_the_users_database_and_bucket(prepared):
    from rjem_ray.cli import build_parser

    heads = commands_of(prepared, "head_start_ray_commands")
    assert not [argv for argv in heads if program(argv) == "mlflow"]  # only through `rjem server`, which checks first
    servers = [argv for argv in heads if program(argv) == "rjem" and argv[1:2] == ["server"]]
    assert len(servers) == 1
    opts = build_parser().parse_args(servers[0][1:])
    # The head's private address (a $(...) substitution), never every interface or loopback only: the GPU
    # nodes log to it over HTTP.
    assert opts.host == "SUBSTITUTED", opts.host
    # Detached, replacing an earlier server through its pid file, failing `ray up` when the store is bad.
    assert opts.detach and opts.pid_file and opts.log
    # The database and bucket come from the user's ~/.rjem/mlflow.env, mounted on the head and read into the
    # environment of that same command (MLflow's own variables, which `rjem server` reads); nothing in git.
    [line] = [line for line in prepared["head_start_ray_commands"] if "rjem server" in line]
    mounted = {remote for remote, local in prepared["file_mounts"].items() if local == "~/.rjem/mlflow.env"}
    assert len(mounted) == 1 and re.search(rf"set -a; \. {re.escape(mounted.pop())}; set \+a;", line), line
    assert opts.backend_store_uri is None and opts.artifacts_destination is None
    assert "psycopg" in " ".join(prepared["head_setup_commands"])  # the server's PostgreSQL driver
    # Without a database: sqlite on the head's own disk (never on the NFS mount), artifacts on the mount.
    mounts = [argv for argv in commands_of(prepared, "setup_commands") if program(argv) == "mount"]
    assert mounts and all(re.match(r"fs-[0-9a-f]+\.efs\.[a-z0-9-]+\.amazonaws\.com:/", m[-2]) for m in mounts)
    shared = mounts[0][-1]
    assert opts.fallback_store.startswith("sqlite:////") and not opts.fallback_store[10:].startswith(shared)
    assert opts.fallback_artifacts.startswith(f"{shared}/")


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


def doc_rjem_commands() -> list[list[str]]:
    """The ``rjem ...`` commands of docs/CLUSTER.md: on their own or as the entrypoint of ``ray job submit``."""
    out = []
    for argv in doc_commands():
        if program(argv) == "rjem":
            out.append(argv)
        elif argv[1:3] == ["job", "submit"] and "--" in argv:
            out.append(argv[argv.index("--") + 1:])
    return out


def test_cluster_walkthrough_commands_parse_with_the_real_parsers():
    import ray.scripts.scripts as ray_cli

    from rjem_ray.cli import build_parser
    from rjem_ray.config import load_config
    from rjem_ray.tune import load_sweep

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
                assert entry[:2] in (["rjem", "train"], ["rjem", "tune"]), entry
                cmds.append(entry)
        else:
            args = build_parser().parse_args(argv[1:])
            seen.add(f"rjem {args.command}")
            # The config exists in the repo and every --set names a real key with a valid value.
            if args.command == "train":
                load_config(REPO / args.config, args.set)
            elif args.command == "tune":
                load_sweep(REPO / args.config, args.set)
    assert {"ray up", "ray down", "ray job submit", "ray job logs", "ray exec", "ray dashboard",
            "rjem train", "rjem tune"} <= seen, seen
