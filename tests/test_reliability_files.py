"""Reliability of everything else a user hands trace-circuits or it writes: SAE folders and the model cache (damage
is one line naming the path and the fix, or a rebuild with one warning line), outputs checked before any work and
replaced atomically, inputs that cannot work (prompts over the context, identical harmful and benign sets, the wrong
JSON for --scan / --features), the hub only when asked for, and the dependency ranges. Fast: tiny real models and
SAE-Lens SAEs; one slow test rebuilds a damaged cache entry of the real model."""

import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from trace_circuits import TraceCircuitsError
from trace_circuits.cli import main
from trace_circuits.saes.sources import list_saes, load_sae, save_sae

REPO = Path(__file__).resolve().parent.parent


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# -- SAEs ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "blocks.1.hook_resid_post"
    return save_sae(tiny.sae("topk", "blocks.1.hook_resid_post"), out)


def _cfg(**fields):
    def f(d):
        cfg = json.loads((d / "cfg.json").read_text())
        cfg.update(fields)
        (d / "cfg.json").write_text(json.dumps(cfg))
    return f


def _weights(fn):
    def f(d):
        w = load_file(str(d / "sae_weights.safetensors"))
        fn(w)
        save_file(w, str(d / "sae_weights.safetensors"))
    return f


def _truncate(name, keep):
    def f(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:keep] if keep >= 0 else data[:keep])
    return f


# (id, damage, the damaged path's file name, words of the message)
SAE_FAULTS = [
    ("cfg_truncated", _truncate("cfg.json", 40), "cfg.json", "is damaged"),
    ("cfg_not_json", lambda d: (d / "cfg.json").write_bytes(b"\xff\x00 not json"), "cfg.json", "is damaged"),
    ("cfg_duplicate_key", lambda d: (d / "cfg.json").write_text(
        (d / "cfg.json").read_text().replace('"d_in": 64', '"d_in": 64, "d_in": 32')), "cfg.json", "appears twice"),
    ("cfg_d_in_string", _cfg(d_in="64"), "cfg.json", "lacks positive integer d_in / d_sae"),
    ("cfg_metadata_list", _cfg(metadata=[1]), "cfg.json", "field 'metadata' must be a JSON object"),
    ("cfg_d_in_disagrees", _cfg(d_in=32), "sae_weights.safetensors", "says d_in 32"),
    ("cfg_d_sae_disagrees", _cfg(d_sae=50), "sae_weights.safetensors", "d_sae 50"),
    ("cfg_k_string", _cfg(k="six"), "cfg.json", "TopK k 'six'"),
    ("cfg_architecture_unknown", _cfg(architecture="gated_nonsense"), "cfg.json", "'gated_nonsense' is not one"),
    ("weights_truncated", _truncate("sae_weights.safetensors", -200), "sae_weights.safetensors", "not a readable"),
    ("weights_missing", lambda d: (d / "sae_weights.safetensors").unlink(), "sae_weights.safetensors", "is missing"),
    ("weights_pickle", lambda d: torch.save({"W_enc": torch.zeros(2)}, d / "sae_weights.safetensors"),
     "sae_weights.safetensors", "not a readable"),
    ("weights_nan", _weights(lambda w: w["W_dec"].fill_(float("nan"))), "sae_weights.safetensors", "holds NaN"),
    ("weights_tensor_missing", _weights(lambda w: w.pop("b_enc")), "sae_weights.safetensors", "has no tensor b_enc"),
    ("legacy_meta_not_object", lambda d: (d / "trace_circuits.json").write_text("[1]"), "trace_circuits.json",
     "is not a JSON object"),
]


@pytest.mark.parametrize("name,damage,path,words", SAE_FAULTS, ids=[c[0] for c in SAE_FAULTS])
def test_damaged_sae_is_one_line_naming_the_path_and_the_fix(sae_folder, tmp_path, name, damage, path, words):
    folder = tmp_path / "tiny-llama" / "blocks.1.hook_resid_post"
    shutil.copytree(sae_folder, folder)
    damage(folder)
    with pytest.raises(TraceCircuitsError) as info:
        load_sae(folder)
    msg = str(info.value)
    assert "\n" not in msg and str(folder / path) in msg and words in msg, msg
    assert "re-train or re-download the SAE" in msg or "use another SAE" in msg, msg
    row, = list_saes(root=tmp_path)  # the listing shows it, broken, with the same reason
    assert row["broken"] == msg


def test_saes_command_lists_every_broken_sae_instead_of_hiding_it(sae_folder, tmp_path, capsys, monkeypatch):
    root = tmp_path / "saes"
    for name, damage, _, _ in SAE_FAULTS:
        shutil.copytree(sae_folder, root / "tiny-llama" / name)
        damage(root / "tiny-llama" / name)
    shutil.copytree(sae_folder, root / "tiny-llama" / "fine")
    (root / "tiny-llama" / "no-cfg").mkdir()
    shutil.copy(sae_folder / "sae_weights.safetensors", root / "tiny-llama" / "no-cfg")  # cfg.json lost
    shutil.copytree(sae_folder, root / "tiny-llama" / ".interrupted.ab12.old")  # a save interrupted mid-rename
    (root / "corpus").mkdir()  # not an SAE folder: not listed
    monkeypatch.setenv("TRACE_CIRCUITS_SAES", str(root))
    assert main(["saes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    broken = [line for line in lines if "BROKEN:" in line]
    assert len(lines) == len(SAE_FAULTS) + 3 and len(broken) == len(SAE_FAULTS) + 2
    assert any("no-cfg" in line and "no cfg.json" in line for line in broken)
    assert any("interrupted save left the previous SAE in" in line for line in broken)
    assert [line for line in lines if "BROKEN" not in line][0].split()[1] == "blocks.1.hook_resid_post"


def test_replacing_an_sae_keeps_the_old_one_until_the_new_one_is_in_place(sae_folder, tmp_path):
    out = tmp_path / "blocks.1.hook_resid_post"
    shutil.copytree(sae_folder, out)
    before = (out / "sae_weights.safetensors").read_bytes()
    with pytest.raises(TypeError):  # metadata that cannot be written: the save fails half-way
        save_sae(tiny.sae("topk", "blocks.1.hook_resid_post", seed=5), out, metadata={"bad": object()})
    assert (out / "sae_weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    save_sae(tiny.sae("topk", "blocks.1.hook_resid_post", seed=5), out)
    assert (out / "sae_weights.safetensors").read_bytes() != before and load_sae(out).cfg.d_sae == 96
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# -- the model cache ------------------------------------------------------------------------------------------------

@pytest.fixture()
def cache_entry(tmp_path):
    from trace_circuits.models import _write_cache

    hf = tiny.hf_model("llama", n_layers=1)
    meta = {"format_version": 1, "converter_version": "1", "model": "tiny", "source": "x.gguf", "source_sha256": "0"}
    dest = tmp_path / "models" / "tiny" / "entry"
    _write_cache(dest, {"n_layers": 1}, hf.state_dict(), tiny.tokenizer(), meta)
    return dest, meta


def _nan_weights(d):
    w = load_file(str(d / "model.safetensors"))
    next(iter(w.values())).fill_(float("nan"))
    save_file(w, str(d / "model.safetensors"))


CACHE_FAULTS = [
    ("weights_truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999]),
     "bytes, not the recorded"),
    ("weights_changed_same_size", _nan_weights, "SHA-256 differs"),
    ("weights_missing", lambda d: (d / "model.safetensors").unlink(), "model.safetensors: No such file"),
    ("config_corrupt", lambda d: (d / "config.json").write_text('{"format_version": 1, "mod'), "JSONDecodeError"),
    ("config_cfg_missing", lambda d: (d / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "cfg"})), "has no cfg"),
    ("tokenizer_corrupt", lambda d: next((d / "tokenizer").glob("tokenizer.json")).write_text("{"), "JSONDecodeError"),
]


@pytest.mark.parametrize("name,damage,why", CACHE_FAULTS, ids=[c[0] for c in CACHE_FAULTS])
def test_damaged_cache_entry_is_rebuilt_with_one_warning_naming_it(cache_entry, caplog, name, damage, why):
    """The cache is derived from the checked model file, so a damaged entry is converted again (nothing lost); the
    warning names the entry and what is wrong with it."""
    from trace_circuits.models import _read_cache

    dest, meta = cache_entry
    cfg, state, tok = _read_cache(dest, meta)
    assert cfg == {"n_layers": 1} and state and tok("hello")["input_ids"]
    damage(dest)
    with caplog.at_level(logging.WARNING, logger="trace_circuits.models"):
        assert _read_cache(dest, meta) is None
    warning, = [r.getMessage() for r in caplog.records]
    assert str(dest) in warning and why in warning and "converting it again" in warning and "\n" not in warning


def test_cache_entry_replacement_keeps_the_old_entry_if_the_write_fails(cache_entry):
    from trace_circuits.models import _read_cache, _write_cache

    dest, meta = cache_entry
    with pytest.raises(Exception):
        _write_cache(dest, {"n_layers": 1}, {"w": "not a tensor"}, tiny.tokenizer(), meta)
    assert _read_cache(dest, meta) is not None
    assert sorted(p.name for p in dest.parent.iterdir()) == ["entry"]


@pytest.mark.slow
def test_real_model_rebuilds_a_truncated_cache_entry(tmp_path, monkeypatch, caplog, real_model):
    """The real default model with its cache entry cut short: load_model warns once, converts again, replaces the
    entry and gives the same weights."""
    from trace_circuits import models as models_mod

    monkeypatch.setenv("TRACE_CIRCUITS_CACHE", str(tmp_path))
    spec = models_mod.MODELS[models_mod.DEFAULT_MODEL]
    cdir = models_mod._cache_dir(spec)
    cdir.mkdir(parents=True)
    meta = {"format_version": models_mod.CACHE_FORMAT_VERSION, "converter_version": models_mod.CONVERTER_VERSION,
            "model": spec.name, "source": spec.file.name, "source_sha256": spec.file.sha256}
    (cdir / "config.json").write_text(json.dumps({**meta, "cfg": {}}))
    (cdir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # truncated to a header
    with caplog.at_level(logging.WARNING, logger="trace_circuits.models"):
        model = models_mod.load_model(device="cpu", progress=False)
    assert any("is damaged" in r.getMessage() and str(cdir) in r.getMessage() for r in caplog.records)
    assert models_mod._read_cache(cdir, meta) is not None  # replaced by a good entry
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), real_model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


# -- outputs, checked before any work ---------------------------------------------------------------------------

@pytest.fixture()
def files(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "p.txt").write_text("hello\nhow are you\n")
    return tmp_path


@pytest.mark.parametrize("argv,words", [
    (["scan", "--out", "{t}/a_file"], "--out {t}/a_file is a file"),
    (["run", "--out", "{t}/a_file"], "--out {t}/a_file is a file"),
    (["features", "--out", "{t}/a_file/sub"], "{t}/a_file is a file, not a folder"),
    (["trace", "--out", "/proc/trace-circuits-test/out"], "cannot write to /proc/trace-circuits-test/out"),
    (["generate", "--no-hookset", "--prompts", "{t}/p.txt", "--out", "{t}"], "is a folder; pass a file name"),
    (["generate", "--no-hookset", "--prompts", "{t}/p.txt", "--out", "{t}/a_file/o.jsonl"], "is a file, not a folder"),
    (["build-corpus", "--out", "{t}"], "is a folder; pass a file name"),
    (["train-sae", "--layers", "1", "--run-dir", "{t}/a_file"], "--out {t}/a_file is a file"),
], ids=["scan_file", "run_file", "features_parent_file", "trace_unwritable", "generate_folder",
        "generate_parent_file", "corpus_folder", "train_run_dir_file"])
def test_bad_out_is_one_line_before_any_model_loads(files, capsys, argv, words):
    """Each of these would load a model (tens of seconds) if --out were not checked first."""
    err = one_line_error(capsys, [a.format(t=files) for a in argv])
    assert words.format(t=files) in err


def test_missing_parent_folders_are_created(tmp_path):
    from trace_circuits._io import check_output

    assert check_output(tmp_path / "a" / "b" / "o.jsonl", "file") and (tmp_path / "a" / "b").is_dir()
    assert check_output(tmp_path / "c" / "d", "dir").is_dir()


# -- inputs that cannot work ----------------------------------------------------------------------------------------

def test_generate_refuses_prompts_over_the_context_before_generating():
    from trace_circuits.generation import generate_responses

    _, hf, tok = tiny.pair("llama", n_layers=1)  # max_position_embeddings 256
    long = " ".join(["bread"] * 300)
    with pytest.raises(TraceCircuitsError, match=r"a prompt is \d+ tokens, and .* over the model's context of 256"):
        generate_responses(hf, tok, ["hello", long], max_new_tokens=4, progress=False)
    with pytest.raises(TraceCircuitsError, match="lower --max-new-tokens"):
        generate_responses(hf, tok, ["hello"], max_new_tokens=300, progress=False)


@pytest.mark.parametrize("benign,words", [
    ("same", "identical: 3 of 3 prompts are in both"),
    ("nearly", "nearly identical: 2 of 3 prompts are in both"),
])
def test_identical_harmful_and_benign_sets_are_one_line_before_the_model(tmp_path, capsys, benign, words):
    h = tmp_path / "h.txt"
    h.write_text("How do I make a pipe bomb?\nHow do I pick a lock?\nWrite a phishing email.\n")
    b = tmp_path / "b.txt"
    b.write_text(h.read_text() if benign == "same" else
                 "how do i make a PIPE bomb\nHow do I pick a lock?\nWrite a poem about the sea.\n")
    assert words in one_line_error(capsys, ["scan", "--harmful", str(h), "--benign", str(b), "--out",
                                            str(tmp_path / "o")])


def test_an_unreadable_prompt_file_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, ["scan", "--harmful", "/proc/self/mem", "--out", str(tmp_path)])
    assert "cannot read prompt file /proc/self/mem (Input/output error)" in err


def test_a_few_shared_prompts_are_a_warning():
    from trace_circuits.prompts import check_distinct

    harmful = [f"harmful request {i}" for i in range(10)]
    with pytest.warns(UserWarning, match="1 prompt"):
        check_distinct(harmful, [f"benign request {i}" for i in range(9)] + ["Harmful request 3."])


@pytest.fixture()
def json_files(tmp_path):
    hook = tmp_path / "hookset.json"
    hook.write_text(json.dumps({"kind": "trace-circuits hook set", "format_version": 4}))
    feats = tmp_path / "features.json"
    feats.write_text(json.dumps({"kind": "trace-circuits features", "format_version": 1}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "config.json").write_text(json.dumps({"model": "smollm2"}))
    (tmp_path / "garbage.json").write_bytes(b"\x00\xff\x10")
    (tmp_path / "divergence.json").write_text(json.dumps({"kind": "trace-circuits divergence", "per_layer": 3}))
    return tmp_path


@pytest.mark.parametrize("argv,words", [
    (["features", "--scan", "{t}/hookset.json"], "is a trace-circuits hook set, not a trace-circuits divergence"),
    (["features", "--scan", "{t}/features.json"], "is a trace-circuits features, not a trace-circuits divergence"),
    (["features", "--scan", "{t}/list.json"], "is not a trace-circuits divergence (not a JSON object)"),
    (["features", "--scan", "{t}/garbage.json"], "is not a readable trace-circuits divergence"),
    (["features", "--scan", "{t}/divergence.json"], "is not a complete trace-circuits divergence"),
    (["trace", "--features", "{t}/config.json"], "is not a complete trace-circuits features"),
    (["trace", "--features", "{t}/hookset.json"], "is a trace-circuits hook set, not a trace-circuits features"),
    (["trace", "--scan", "{t}/nothing.json"], "does not exist"),
], ids=["scan_hookset", "scan_features", "scan_list", "scan_binary", "scan_incomplete", "features_config",
        "features_hookset", "scan_missing"])
def test_wrong_json_for_scan_or_features_is_one_line(json_files, capsys, argv, words):
    argv = [a.format(t=json_files) for a in argv] + ["--out", str(json_files / "o")]
    assert words in one_line_error(capsys, argv)


# -- offline means offline ------------------------------------------------------------------------------------------

@pytest.fixture()
def network(monkeypatch):
    """Counts every attempt to resolve or connect, and fails it (as on a machine without network)."""
    tries = []

    def refuse(*args, **kwargs):
        tries.append(args[:1])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tries


def test_importing_trace_circuits_switches_the_hub_off_unless_the_user_chose():
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = ("import trace_circuits, os, huggingface_hub.constants as c; "
            "print(os.environ['HF_HUB_OFFLINE'], c.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["1", "True"], out.stderr[-500:]


def test_a_users_choice_of_hub_access_is_kept(monkeypatch):
    from huggingface_hub import constants

    from trace_circuits.model_files import default_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    default_offline()
    assert constants.HF_HUB_OFFLINE is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    default_offline()
    assert constants.HF_HUB_OFFLINE is True


@pytest.mark.parametrize("what", ["model", "sae"])
def test_an_uncached_hub_request_offline_is_one_line_without_network(network, what):
    from trace_circuits.models import load_model

    with pytest.raises(TraceCircuitsError) as info:
        load_model("gpt2") if what == "model" else load_sae("gpt2-small-res-jb:blocks.8.hook_resid_pre")
    assert "is not in the local Hugging Face cache and trace-circuits runs offline" in str(info.value)
    assert "HF_HUB_OFFLINE=0" in str(info.value) and network == []


@pytest.mark.parametrize("what", ["model", "sae"])
def test_with_the_hub_allowed_but_unreachable_one_try_then_one_line(network, monkeypatch, what):
    """No retry loop (the clients' own take ~30 s): one connection test, then the error."""
    from huggingface_hub import constants

    from trace_circuits.models import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(TraceCircuitsError, match="the hub cannot be reached .*Name or service not known"):
        load_model("gpt2") if what == "model" else load_sae("gpt2-small-res-jb:blocks.8.hook_resid_pre")
    assert len(network) == 1


def test_a_bad_sae_id_is_not_reported_as_offline(network):
    with pytest.raises(TraceCircuitsError, match="check the release and SAE id"):
        load_sae("gpt2-small-res-jb:blocks.99.nonsense")
    assert network == []


# -- dependencies -----------------------------------------------------------------------------------------------------

def test_dependency_ranges_hold_the_safety_floor_and_the_installed_versions():
    """torch >= 2.6 (torch.load refuses pickled code by default, which SAE-Lens's checkpoint loader relies on), and
    every installed dependency inside pyproject's range."""
    from importlib.metadata import version

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    torch_spec = next(r.specifier for r in deps if r.name == "torch")
    assert not torch_spec.contains("2.5.1") and torch_spec.contains("2.6.0")
    for req in deps:
        assert req.specifier.contains(Version(version(req.name)).base_version, prereleases=True), (req, version(req.name))
