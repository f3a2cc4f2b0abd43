"""The torchvision shim applies only where torchvision's compiled ``_C`` cannot load.

A matched torch/torchvision install (every CUDA user's) is stood in for on this CPU box by a copy of the
installed torchvision package whose ``_C`` extension is replaced by a small C++ library, built here with
g++ against torch's headers, that defines torchvision's ops in C++ as the real one does. Before the shim
checked for a loadable ``_C``, ``import rjem_ray; import torchvision`` aborted there (rc 134, "Tried to
register an operator (torchvision::nms...) multiple times"). The real install of a CPU box (a CUDA
torchvision beside CPU torch, whose ``_C`` fails to load) must keep importing through the shim.

The library is compiled once per module (about 20 s on two cores at -O0); every import runs in a fresh
subprocess, since op registrations cannot be undone in this one.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# torchvision's op schemas exactly as its csrc defines them (torchvision 0.28, csrc/ops/*.cpp and
# csrc/vision.cpp), qnms included: the real library defines it next to its quantized CPU kernel.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "box_iou_rotated": "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
    "roi_align": (
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "_roi_align_backward": (
        "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
        "int sampling_ratio, bool aligned) -> Tensor"
    ),
    "qroi_align": (
        "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
        "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
        "int sampling_ratio, bool aligned) -> Tensor"
    ),
    "ps_roi_align": (
        "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)"
    ),
    "_ps_roi_align_backward": (
        "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
        "SymInt channels, SymInt height, SymInt width) -> Tensor"
    ),
    "roi_pool": (
        "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_roi_pool_backward": (
        "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width) -> Tensor"
    ),
    "ps_roi_pool": (
        "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_ps_roi_pool_backward": (
        "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width) -> Tensor"
    ),
    "deform_conv2d": (
        "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
        "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor"
    ),
    "_deform_conv2d_backward": (
        "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
        "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
}

# The ops get schemas only (no kernels): importing torchvision needs nothing more. _cuda_version is
# what torchvision/extension.py calls once _C has loaded; -1 means "not a CUDA build".
_SOURCE = (
    "#include <torch/library.h>\n"
    "static int64_t cuda_version() { return -1; }\n"
    "TORCH_LIBRARY_FRAGMENT(torchvision, m) {\n"
    + "".join(f'  m.def("{schema}");\n' for schema in _SCHEMAS.values())
    + '  m.def("_cuda_version", &cuda_version);\n'
    "}\n"
)

_IMPORT_TIMEOUT_S = 300


def _installed_torchvision_dir() -> Path:
    spec = importlib.util.find_spec("torchvision")
    assert spec is not None and spec.origin, "torchvision is not installed in this environment"
    return Path(spec.origin).parent


def _extension_names() -> set[str]:
    return {"_C" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES}


def _compile_fake_extension(out: Path, workdir: Path) -> None:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.fail("g++ not found on PATH: it is needed to build the fake torchvision _C (apt-get install g++)")
    from torch.utils.cpp_extension import include_paths

    includes = include_paths()
    if not any((Path(p) / "torch" / "library.h").is_file() for p in includes):
        pytest.fail(f"torch's C++ headers (torch/library.h) are missing from {includes}")
    torch_lib = Path(torch.__file__).parent / "lib"
    source = workdir / "fake_torchvision_C.cpp"
    source.write_text(_SOURCE)
    cmd = [
        gxx,
        "-std=c++20",  # what torch.utils.cpp_extension uses for this torch; its headers warn under c++17
        "-O0",
        "-shared",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in includes),
        str(source),
        "-o",
        str(out),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
        f"-Wl,-rpath,{torch_lib}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"building the fake torchvision _C failed (rc {proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr}")


@pytest.fixture(scope="module")
def fake_matched_torchvision(tmp_path_factory) -> Path:
    """A directory holding a copy of the installed torchvision whose ``_C`` loads beside this torch."""
    root = tmp_path_factory.mktemp("matched-torchvision")
    names = _extension_names()
    shutil.copytree(
        _installed_torchvision_dir(),
        root / "torchvision",
        ignore=lambda _dir, entries: [e for e in entries if e == "__pycache__" or e in names],
    )
    _compile_fake_extension(root / "torchvision" / "_C.so", tmp_path_factory.mktemp("fake-c-build"))
    return root


def _run(code: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TORCHVISION_WARN_WHEN_EXTENSION_LOADING_FAILS", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=_IMPORT_TIMEOUT_S,
    )


def _explain(proc: subprocess.CompletedProcess) -> str:
    rc = proc.returncode
    how = f"killed by signal {-rc} (rc {128 - rc} in a shell)" if rc < 0 else f"rc {rc}"
    return f"{how}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def test_fake_extension_covers_every_op_torchvision_python_side_uses():
    """The stand-in must define every op the installed torchvision registers against or calls."""
    used: set[str] = set()
    for path in _installed_torchvision_dir().rglob("*.py"):
        text = path.read_text(encoding="utf-8", errors="replace")
        used |= set(re.findall(r"torch\.ops\.torchvision\.(\w+)", text))
        used |= set(re.findall(r"[\"']torchvision::(\w+)[\"']", text))
        used |= set(re.findall(r"register_meta\(\s*[\"'](\w+)[\"']", text))
    assert {"nms", "qnms", "roi_align", "_cuda_version"} <= used, sorted(used)
    missing = used - set(_SCHEMAS) - {"_cuda_version"}
    assert not missing, f"the fake _C lacks ops the installed torchvision uses: {sorted(missing)}"


def test_fake_extension_alone_makes_a_working_torchvision(fake_matched_torchvision, tmp_path):
    proc = _run(
        f"""
        import torch, torchvision, torchvision.extension
        assert torchvision.__file__.startswith({str(fake_matched_torchvision)!r}), torchvision.__file__
        assert torchvision.extension._has_ops(), "the fake _C did not load"
        assert torch.ops.torchvision._cuda_version() == -1
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        print("ok")
        """,
        cwd=tmp_path,
        pythonpath=fake_matched_torchvision,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), _explain(proc)


def test_rjem_ray_then_torchvision_on_a_matched_install(fake_matched_torchvision, tmp_path):
    """Where torchvision's _C loads, the shim defines nothing and the C++ definitions win (no abort)."""
    proc = _run(
        f"""
        import rjem_ray
        import torchvision
        import torch_fidelity
        import torchvision.extension
        from rjem_ray import _torchvision_compat as compat
        assert torchvision.__file__.startswith({str(fake_matched_torchvision)!r}), torchvision.__file__
        assert torchvision.extension._has_ops(), "the fake _C did not load"
        assert compat._extension_loaded is True, compat._extension_loaded
        assert compat._libraries == [], "the shim defined schemas although _C loads"
        compat.ensure_torchvision_importable()  # again, as rjem_ray.evaluation.fidelity and others do
        assert compat._libraries == []
        print("ok")
        """,
        cwd=tmp_path,
        pythonpath=fake_matched_torchvision,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), _explain(proc)


def test_rjem_ray_then_torchvision_on_this_install(tmp_path):
    """The real install: on a CPU box its CUDA _C fails to load and the shim makes the import work."""
    proc = _run(
        """
        import rjem_ray
        import torchvision
        import torch_fidelity
        import torchvision.extension
        from rjem_ray import _torchvision_compat as compat
        has_ops = torchvision.extension._has_ops()
        assert compat._extension_loaded is has_ops, (compat._extension_loaded, has_ops)
        # the shim defined nms/qnms exactly when torchvision's own library could not load
        assert len(compat._libraries) == (0 if has_ops else 2), (has_ops, compat._libraries)
        n = len(compat._libraries)
        compat.ensure_torchvision_importable()  # idempotent
        assert len(compat._libraries) == n
        print("ok", "has_ops" if has_ops else "shim")
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, _explain(proc)


def test_nothing_is_defined_without_torchvision(tmp_path):
    proc = _run(
        """
        import sys
        sys.modules["torchvision"] = None  # find_spec then reports it absent, as on an install without it
        import torch
        import rjem_ray
        from rjem_ray import _torchvision_compat as compat
        assert compat._libraries == [], compat._libraries
        try:
            torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        except RuntimeError:
            print("ok")
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), _explain(proc)
