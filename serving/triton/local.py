"""Run a model repository on this machine with the `tritonserver` of the nvidia-pytriton wheel.

The wheel (in its own environment: it pins numpy < 2) ships the server binary, the Python backend
and one backend stub per Python version; the stub runs the models with the environment's
packages. Used by the tests and `scripts/triton_throughput.py`; on a GPU server or a Jetson use
NVIDIA's Triton containers instead (the repository's README).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serving.http.process import free_port

log = logging.getLogger(__name__)

# What the model imports in the stub's Python beside the wheel (jinja2: the build's chat template).
MODEL_IMPORTS = ("numpy", "onnxruntime", "tokenizers", "PIL", "jinja2")
_PROBE = (
    "import importlib.util, json, pathlib, sys, pytriton; root = pathlib.Path(pytriton.__file__).parent; "
    "print(json.dumps({'server': str(root / 'tritonserver'), 'libs': str(root.parent / 'nvidia_pytriton.libs'), "
    "'version': f'{sys.version_info.major}.{sys.version_info.minor}', "
    f"'missing': [m for m in {MODEL_IMPORTS!r} if importlib.util.find_spec(m) is None]}}))"
)


class TritonUnavailable(RuntimeError):
    """No usable tritonserver: the message says what is missing."""


@dataclass(frozen=True)
class TritonInstall:
    python: Path  # the environment's interpreter (nvidia-pytriton and MODEL_IMPORTS)
    server: Path  # pytriton/tritonserver: bin/, backends/python, python_backend_stubs/
    libs: Path  # the wheel's bundled shared libraries (the stub links its CUDA runtime)
    version: str  # the environment's Python, whose backend stub runs the models

    @classmethod
    def find(cls, python: Path) -> TritonInstall:
        if not python.exists():
            raise TritonUnavailable(f"{python} does not exist; make the environment: pip install -e '.[ort,triton]'")
        done = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise TritonUnavailable(f"{python} has no nvidia-pytriton ({done.stderr.strip().splitlines()[-1:]})")
        found = json.loads(done.stdout)
        if found["missing"]:
            raise TritonUnavailable(
                f"{python} lacks {', '.join(found['missing'])}, which the model imports; "
                "pip install -e '.[ort,triton]' there"
            )
        install = cls(python, Path(found["server"]), Path(found["libs"]), found["version"])
        if not (install.server / "bin" / "tritonserver").exists():
            raise TritonUnavailable(f"no tritonserver binary in {install.server}")
        if not (install.server / "python_backend_stubs" / install.version).exists():
            raise TritonUnavailable(f"the wheel has no Python backend stub for Python {install.version}")
        return install


@dataclass(frozen=True)
class RunningTriton:
    http: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path


@contextmanager
def local_triton(install: TritonInstall, repository: Path, timeout: float = 180.0) -> Iterator[RunningTriton]:
    """tritonserver on loopback ports for `repository`, ready (every model loaded); stopped after."""
    work = Path(tempfile.mkdtemp(prefix="triton-"))
    backend = work / "backends" / "python"
    shutil.copytree(install.server / "backends" / "python", backend)
    shutil.copy2(install.server / "python_backend_stubs" / install.version / "triton_python_backend_stub", backend)
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = dict(os.environ)
    env["PATH"] = f"{install.python.parent}{os.pathsep}{env.get('PATH', '')}"  # the stub's Python: this env's
    env["VIRTUAL_ENV"] = str(install.python.parent.parent)
    env["LD_LIBRARY_PATH"] = f"{install.libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    argv = [
        str(install.server / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={work / 'backends'}",
        "--http-address=127.0.0.1",
        f"--http-port={http}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics}",
        "--exit-on-error=true",
    ]
    log_path = work / "tritonserver.log"
    with log_path.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    running = RunningTriton(f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise TritonUnavailable(f"tritonserver exited ({process.returncode}): {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{running.http}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TritonUnavailable(f"tritonserver not ready in {timeout:g} s: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        log.info("tritonserver ready: %s, %s", running.http, running.grpc)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)
