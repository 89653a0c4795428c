"""Reliability of the exported hook set: every class of fault, made by tampering a real exported hook set (a tiny
transformers Llama's TransformerLens twin, a prompt gate with its calibration record and one operation of every kind,
saved by ``HookSet.save``), is one ``error:`` line naming the file and the field; nothing loads with its defense
silently off. The command line refuses a tampered hook set before it loads any model. (The README's
reliability table lists the faults, messages and tests.)"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny
from tiny import all_kinds_hookset
from trace_circuits import TraceCircuitsError, load_hookset
from trace_circuits.cli import main
from trace_circuits.hookset import FORMAT_VERSION

CALIB = {"gate": "prompt", "layer": 1, "gate_threshold": 0.25, "gate_rate_harmful": 0.9, "gate_rate_benign": 0.02}


@pytest.fixture(scope="module")
def twins():
    tl, hf, tok = tiny.pair("llama")
    return tl, hf, tok


@pytest.fixture(scope="module")
def exported(twins, tmp_path_factory):
    """A real exported hook set: ops 0 prompt_probe (layer 1), 1 sae_features (TopK, resid_post), 2 sae_features
    (JumpReLU, mlp_out), 3 heads, 4 mlp, 5 direction add, 6 direction ablate."""
    hs = all_kinds_hookset(twins[0], threshold=CALIB["gate_threshold"])
    hs.provenance = {"gate_calibration": dict(CALIB)}
    return hs.save(tmp_path_factory.mktemp("export") / "hookset")


def tampered(exported: Path, tmp_path: Path, meta_fn=None, tensor_fn=None) -> Path:
    """A copy of the export with ``meta_fn(meta)`` applied to hookset.json (written back with Python's json, so NaN
    and Infinity become JSON literals) and ``tensor_fn(tensors)`` to tensors.safetensors."""
    out = tmp_path / "hs"
    shutil.copytree(exported, out)
    if meta_fn is not None:
        meta = json.loads((out / "hookset.json").read_text())
        replaced = meta_fn(meta)
        (out / "hookset.json").write_text(replaced if isinstance(replaced, str) else json.dumps(meta, indent=1))
    if tensor_fn is not None:
        with safe_open(str(out / "tensors.safetensors"), framework="pt") as f:
            header = f.metadata()
        tensors = load_file(str(out / "tensors.safetensors"))
        tensor_fn(tensors)
        save_file(tensors, str(out / "tensors.safetensors"), metadata=header)
    return out


def op(i, **fields):
    def f(meta):
        meta["operations"][i].update(fields)
    return f


def top(**fields):
    def f(meta):
        meta.update(fields)
    return f


def drop(i, key):
    def f(meta):
        del meta["operations"][i][key]
    return f


def spec(i, name, **fields):
    def f(meta):
        meta["operations"][i]["tensors"][name].update(fields)
    return f


def tensor(key, fn):
    def f(t):
        t[key] = fn(t[key].clone())
    return f


def set_(t, idx, v):
    t[idx] = v
    return t


# (id, hookset.json tampering, tensors tampering, the field the one error line must name)
META_FAULTS = [
    # the file as a whole
    ("not_an_object", lambda m: "[1, 2, 3]", None, "not a JSON object"),
    ("truncated", lambda m: json.dumps(m)[:300], None, "not a readable hook set"),
    ("duplicate_key", lambda m: json.dumps(m).replace('"scale": 0.0', '"scale": 0.0, "scale": 1.0', 1), None,
     "key 'scale' appears twice"),
    ("misspelt_top_key", lambda m: m.update(acton=m.pop("action")), None, "unknown field(s) ['acton']"),
    ("newer_format", top(format_version=FORMAT_VERSION + 1), None, "newer than this trace-circuits reads"),
    ("negative_format", top(format_version=-1), None, "format version -1"),
    ("operations_null", top(operations=None), None, "field 'operations' must be a list"),
    ("operations_empty", top(operations=[]), None, "needs at least one operation"),
    ("provenance_list", top(provenance=[1]), None, "field 'provenance' must be a JSON object"),
    ("description_number", top(description=5), None, "field 'description' must be a string"),
    ("architecture_unknown", top(architecture="gpt9"), None, "field 'architecture' is 'gpt9'"),
    ("d_model_string", top(d_model="64"), None, "field 'd_model' must be a positive integer"),
    ("action_unknown", top(action="silence"), None, "action 'silence' is not one of"),
    # operations: kinds, unknown and missing fields, types
    ("operation_string", lambda m: m["operations"].__setitem__(3, "heads"), None, "operation 3 is not a JSON object"),
    ("unknown_kind", op(3, kind="neurons"), None, "unknown kind 'neurons'"),
    ("misspelt_op_key", lambda m: m["operations"][3].update(haeds=m["operations"][3].pop("heads")), None,
     "unknown field(s) ['haeds']"),
    ("layer_string", op(3, layer="2"), None, "field 'layer' must be an integer"),
    ("layer_float", op(3, layer=2.0), None, "field 'layer' must be an integer"),
    ("gated_yes", op(3, gated="yes"), None, "field 'gated' must be true or false"),
    ("gated_missing", drop(1, "gated"), None, "field 'gated' is missing"),
    ("scale_missing", drop(3, "scale"), None, "field 'scale' is missing"),
    ("heads_string", op(3, heads="0,3"), None, "field 'heads' must be a list of integers"),
    ("features_strings", op(1, features=["0", 3, 7]), None, "field 'features' must be a list of integers"),
    ("hook_name_number", op(3, hook_name=3), None, "field 'hook_name' must be a string"),
    ("probe_not_gate", op(0, gate_source=False), None, "field 'gate_source' must be true"),
    ("probe_threshold_missing", drop(0, "gate_threshold"), None, "field 'gate_threshold' is missing"),
    ("probe_threshold_string", op(0, gate_threshold="0.25"), None, "field 'gate_threshold' must be a number"),
    ("direction_mode_missing", drop(5, "mode"), None, "field 'mode' is missing"),
    ("steering_alpha_missing", drop(5, "alpha"), None, "field 'alpha' is missing"),
    ("tensors_list", op(3, tensors=[]), None, "field 'tensors' must be a JSON object"),
    # numbers: NaN, infinite, out of range
    ("probe_threshold_nan", op(0, gate_threshold=float("nan")), None, "field 'gate_threshold' must be a number"),
    ("probe_threshold_inf", op(0, gate_threshold=float("inf")), None, "gate_threshold inf must be a finite number"),
    ("probe_threshold_raised", op(0, gate_threshold=1e9), None, "provenance.gate_calibration.gate_threshold"),
    ("probe_gap_zero", op(0, gap=0.0), None, "gap must be a finite number > 0"),
    ("probe_prefix_string", op(0, message_threshold="1"), None, "field 'message_threshold' must be a number"),
    ("probe_prefix_without_turn", op(0, pool="mean", message_threshold=1.0), None, "needs pool 'turn'"),
    ("probe_prefix_min_zero", op(0, pool="turn", message_threshold=1.0, message_min_tokens=0), None,
     "message_min_tokens must be >= 1"),
    ("probe_prefix_uncalibrated", op(0, pool="turn", message_threshold=1.0), None,
     "provenance.gate_calibration.message_threshold"),
    ("probe_message_reading_unknown", op(0, pool="turn", message_threshold=1.0, message_reading="suffix"), None,
     "message_reading must be one of span, prefix"),
    ("probe_sentence_without_marks", op(0, pool="turn", message_threshold=1.0, message_reading="sentence"), None,
     "the sentence reading needs message_boundary"),
    ("probe_sentence_negative_mark", op(0, pool="turn", message_threshold=1.0, message_reading="sentence",
                                        message_boundary=[13, -2]), None, "the sentence reading needs message_boundary"),
    ("probe_sentence_marks_strings", op(0, pool="turn", message_threshold=1.0, message_reading="sentence",
                                        message_boundary=["."]), None, "field 'message_boundary' must be a list of"),
    ("probe_message_and_format_9_prefix", op(0, pool="turn", message_threshold=1.0, prefix_threshold=1.0), None,
     "field 'prefix_threshold' must be absent where message_threshold is given"),
    ("probe_message_reading_changed", lambda m: (
        op(0, pool="turn", message_threshold=1.0, message_reading="prefix")(m),
        top(provenance={"gate_calibration": {**CALIB, "message_threshold": 1.0, "message_reading": "span"}})(m)),
     None, "provenance.gate_calibration.message_reading"),
    ("scale_nan", op(3, scale=float("nan")), None, "field 'scale' must be a number"),
    ("scale_huge", op(3, scale=1e30), None, "scale 1e+30 must be a number in [0, 1]"),
    ("scale_negative", op(4, scale=-0.5), None, "scale -0.5 must be a number in [0, 1]"),
    ("zero_threshold_inf", op(1, zero_thresholds=[0.0, float("inf"), 0.0]), None, "zero thresholds"),
    ("massive_norm_inf", op(1, massive_norm_threshold=float("inf")), None, "massive_norm_threshold"),
    ("alpha_nan", op(5, alpha=float("nan")), None, "field 'alpha' must be a number"),
    ("alpha_huge", op(5, alpha=1e30), None, "alpha 1e+30"),
    ("k_zero", op(1, k=0), None, "k=0"),
    # ids outside the model or SAE, repeats, hook points
    ("layer_outside", op(4, layer=4, hook_name="blocks.4.hook_mlp_out", hf_module="model.layers.4.mlp"), None,
     "layer 4 is outside the model"),
    ("head_outside", op(3, heads=[0, 4]), None, "head ids [0, 4] must be in 0..3"),
    ("head_repeated", op(3, heads=[0, 0]), None, "repeat a head"),
    ("feature_outside", op(1, features=[0, 3, 96]), None, "feature ids must be in 0..95"),
    ("feature_repeated", op(1, features=[0, 3, 3]), None, "repeat a feature"),
    ("feature_negative", op(2, features=[-1, 2]), None, "feature ids must be >= 0"),
    ("anchor_negative", op(0, anchor=[-1]), None, "anchor token ids [-1]"),
    ("hook_name_moved", op(3, hook_name="blocks.3.attn.hook_z"), None, "field 'hook_name' is 'blocks.3.attn.hook_z'"),
    ("sae_hook_not_residual", op(1, hook_name="blocks.2.attn.hook_z"), None, "not a residual-stream"),
    ("hf_module_moved", op(3, hf_module="model.layers.0.self_attn.o_proj"), None, "field 'hf_module'"),
    ("gate_moved", op(0, layer=2, hook_name="blocks.2.hook_resid_post", hf_module="model.layers.2"), None,
     "provenance.gate_calibration.layer"),
    ("gate_kind_changed", top(provenance={"gate_calibration": {**CALIB, "gate": "features"}}), None,
     "records a features gate but the hook set's gate is prompt_probe"),
    # tensors: declared vs stored
    ("tensor_key_swapped", lambda m: (spec(0, "r", key="ops.0.mu")(m), spec(0, "mu", key="ops.0.r")(m)), None,
     "field 'tensors.r.key' is 'ops.0.mu'"),
    ("tensor_key_shared", spec(6, "r", key="ops.5.r"), None, "field 'tensors.r.key' is 'ops.5.r'"),
    ("tensor_dtype_declared", spec(0, "r", dtype="float16"), None, "declared 'float16'"),
    ("tensor_shape_declared", spec(0, "mu", shape=[32]), None, "tensor ops.0.mu has shape [64]"),
    ("tensor_spec_unknown_key", spec(0, "r", sha="x"), None, "field 'tensors.r' must be an object"),
]

TENSOR_FAULTS = [
    ("probe_tensor_nan", tensor("ops.0.mu", lambda t: set_(t, 3, float("nan"))), "tensor mu holds NaN or inf"),
    ("sae_tensor_inf", tensor("ops.1.W_enc", lambda t: set_(t, (0, 0), float("inf"))), "tensor W_enc holds NaN"),
    ("jumprelu_threshold_nan", tensor("ops.2.threshold", lambda t: t.fill_(float("nan"))), "tensor threshold holds"),
    ("tensor_missing", lambda t: t.pop("ops.2.threshold"), "tensor ops.2.threshold is missing"),
    ("tensor_wrong_shape", tensor("ops.1.D", lambda t: t[:2].contiguous()), "tensor ops.1.D has shape [2, 64]"),
    ("tensor_float16", tensor("ops.0.r", lambda t: t.half()), "stored as float16"),
    ("tensor_int", tensor("ops.0.r", lambda t: t.int()), "stored as int32"),
    ("tensor_float64", tensor("ops.0.r", lambda t: t.double()), "stored as float64"),
    ("tensor_unclaimed", lambda t: t.__setitem__("ops.9.x", torch.ones(3)), "['ops.9.x'] that no operation names"),
    ("probe_direction_scaled", tensor("ops.0.r", lambda t: t * 1000), "tensor r must be a unit vector"),
    ("ablate_direction_scaled", tensor("ops.6.r", lambda t: t * 3), "tensor r must be a unit vector"),
    ("tensor_from_another_export", tensor("ops.0.mu", lambda t: t + 0.01), "its SHA-256 is not the recorded"),
]


def assert_one_line(err: TraceCircuitsError, *parts: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, msg


@pytest.mark.parametrize("name,meta_fn,tensor_fn,field", META_FAULTS, ids=[c[0] for c in META_FAULTS])
def test_tampered_hookset_json_is_one_line_naming_file_and_field(exported, tmp_path, name, meta_fn, tensor_fn,
                                                                 field):
    hs = tampered(exported, tmp_path, meta_fn, tensor_fn)
    with pytest.raises(TraceCircuitsError) as info:
        load_hookset(hs)
    assert_one_line(info.value, str(hs / "hookset.json"), field)


@pytest.mark.parametrize("name,tensor_fn,field", TENSOR_FAULTS, ids=[c[0] for c in TENSOR_FAULTS])
def test_tampered_tensors_are_one_line_naming_file_and_tensor(exported, tmp_path, name, tensor_fn, field):
    hs = tampered(exported, tmp_path, tensor_fn=tensor_fn)
    with pytest.raises(TraceCircuitsError) as info:
        load_hookset(hs)
    assert_one_line(info.value, str(hs), field)


def test_a_defense_whose_every_scale_is_1_is_refused(twins, tmp_path):
    """scale 1 leaves an activation unchanged: a 'zero' hook set with every scale set to 1 is a defense that is off."""
    from trace_circuits.hookset import Operation, hookset_for, sae_operation

    tl = twins[0]
    hs = hookset_for(tl, [sae_operation(tiny.sae("topk", "blocks.1.hook_resid_post"), [0, 3]),
                          Operation(kind="heads", layer=2, heads=[1]), Operation(kind="mlp", layer=3)], action="zero")
    saved = hs.save(tmp_path / "export")
    load_hookset(tampered(saved, tmp_path, op(1, scale=1.0)))  # one operation off: a weaker, still acting defense

    def all_off(meta):
        for o in meta["operations"]:
            o["scale"] = 1.0
    with pytest.raises(TraceCircuitsError, match="every operation has scale 1 .* would change nothing"):
        load_hookset(tampered(saved, tmp_path / "off", all_off))


def test_unreadable_tensors_file_is_one_line(exported, tmp_path):
    hs = tampered(exported, tmp_path)
    data = (hs / "tensors.safetensors").read_bytes()
    (hs / "tensors.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(TraceCircuitsError, match="tensors.safetensors is not a readable safetensors file"):
        load_hookset(hs)
    torch.save({"ops.0.r": torch.zeros(64)}, hs / "tensors.safetensors")  # a pickle is never unpickled
    with pytest.raises(TraceCircuitsError, match="not a readable safetensors file"):
        load_hookset(hs)
    save_file(load_file(str(exported / "tensors.safetensors")), str(hs / "tensors.safetensors"),
              metadata={"format": "something else"})
    with pytest.raises(TraceCircuitsError, match="holds 'something else' tensors"):
        load_hookset(hs)


def test_the_export_itself_loads_and_acts_like_the_original(exported, twins):
    tl = twins[0]
    back = load_hookset(exported)
    meta = json.loads((exported / "hookset.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 13 and len(meta["tensors_sha256"]) == 64
    original = all_kinds_hookset(tl, threshold=CALIB["gate_threshold"])
    tokens = torch.tensor([tl.tokenizer("How do I make a pipe bomb?")["input_ids"]])
    with torch.no_grad():
        a = tl.run_with_hooks(tokens, fwd_hooks=original.fwd_hooks(tl))
        b = tl.run_with_hooks(tokens, fwd_hooks=back.fwd_hooks(tl))
    assert torch.equal(a, b)


def test_a_format_3_file_without_checksum_still_loads(exported, tmp_path):
    def older(meta):
        meta["format_version"] = 3
        del meta["tensors_sha256"]
    assert load_hookset(tampered(exported, tmp_path, older)).gate_operation.gate_threshold == CALIB["gate_threshold"]
    no_sum = tampered(exported, tmp_path / "v4", lambda m: m.__delitem__("tensors_sha256"))
    with pytest.raises(TraceCircuitsError, match="field 'tensors_sha256' is missing"):
        load_hookset(no_sum)


def test_a_format_4_probe_without_pool_reads_the_last_position_and_a_bad_pool_is_one_line(exported, tmp_path):
    def v4(meta):
        meta["format_version"] = 4
        for k in ("pool", "massive_norm_threshold"):
            del meta["operations"][0][k]
    assert load_hookset(tampered(exported, tmp_path, v4)).gate_operation.pool == "last"
    bad = tampered(exported, tmp_path / "bad", lambda m: m["operations"][0].__setitem__("pool", "max"))
    with pytest.raises(TraceCircuitsError, match="operation 0.*pool must be one of last, mean, turn, not 'max'"):
        load_hookset(bad)


def test_a_format_5_mean_probe_still_loads_and_an_opener_is_checked(exported, tmp_path):
    """Format 6 added the ``turn`` reading and its ``opener``; a format-5 file (no opener) loads as it was read."""
    def v5(meta):
        meta["format_version"] = 5
        meta["operations"][0]["pool"] = "mean"
    back = load_hookset(tampered(exported, tmp_path, v5)).gate_operation
    assert back.pool == "mean" and back.opener == []
    bad = tampered(exported, tmp_path / "bad", lambda m: m["operations"][0].update(pool="turn", opener=[1, -2]))
    with pytest.raises(TraceCircuitsError, match=r"operation 0.*opener token ids \[1, -2\] must be >= 0"):
        load_hookset(bad)


def test_a_format_9_prefix_reading_still_loads_as_the_running_means_it_was(exported, tmp_path):
    """Format 9 wrote the message reading as ``prefix_threshold``/``prefix_min_tokens`` (running means from the
    message's start); it loads as ``message_reading="prefix"``, checked against the calibration's
    ``prefix_threshold``, and is written back as format 11."""
    def v9(meta):
        meta["format_version"] = 9
        meta["operations"][0].update(pool="turn", opener=[1], prefix_threshold=2.5, prefix_min_tokens=4)
        meta["provenance"]["gate_calibration"]["prefix_threshold"] = 2.5
    back = load_hookset(tampered(exported, tmp_path, v9))
    g = back.gate_operation
    assert (g.message_threshold, g.message_min_tokens, g.message_reading) == (2.5, 4, "prefix")
    again = load_hookset(back.save(tmp_path / "v10")).gate_operation
    assert (again.message_threshold, again.message_min_tokens, again.message_reading) == (2.5, 4, "prefix")
    moved = tampered(exported, tmp_path / "moved", lambda m: (v9(m), m["operations"][0].update(prefix_threshold=9.0)))
    with pytest.raises(TraceCircuitsError, match="provenance.gate_calibration.message_threshold 2.5"):
        load_hookset(moved)


def test_a_threshold_set_to_nan_after_loading_is_refused_on_attach(exported, twins):
    """The in-memory object is checked again when attached: the gate cannot be switched off after loading."""
    tl, hf, _ = twins
    hs = load_hookset(exported)
    hs.gate_operation.gate_threshold = float("nan")
    for model in (tl, hf):
        with pytest.raises(TraceCircuitsError, match="gate_threshold nan must be a finite number"):
            with hs.attach(model):
                pass
    with pytest.raises(TraceCircuitsError, match="gate_threshold nan"):
        hs.fwd_hooks(tl)


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_cli_refuses_a_tampered_hookset_before_loading_the_model(exported, tmp_path, capsys, command):
    """The hook set's model ('tiny-llama') is not an offline model: reaching the model load would be another error,
    so the NaN line proves the hook set was refused first."""
    hs = tampered(exported, tmp_path, op(0, gate_threshold=float("nan")))
    (tmp_path / "p.txt").write_text("hello\n")
    args = ["--hookset", str(hs), "--out", str(tmp_path / ("o.jsonl" if command == "generate" else "o"))]
    args += ["--prompts", str(tmp_path / "p.txt")] if command == "generate" else []
    assert main([command] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert str(hs / "hookset.json") in err and "field 'gate_threshold' must be a number, got nan" in err


def test_saving_over_a_hookset_replaces_it_whole_and_a_failed_save_keeps_the_old_one(exported, twins, tmp_path):
    out = tmp_path / "hs"
    shutil.copytree(exported, out)
    hs = load_hookset(out)
    hs.description = "second"
    hs.save(out)
    assert load_hookset(out).description == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hs"]  # nothing left beside it
    assert (out.stat().st_mode & 0o777) == (exported.stat().st_mode & 0o777)
    hs.provenance["not json"] = object()  # the save fails half-way
    with pytest.raises(TypeError):
        hs.save(out)
    assert load_hookset(out).description == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hs"]


def test_an_interrupted_replace_says_where_the_previous_hookset_is(exported, tmp_path):
    """A crash between moving the old folder aside and renaming the new one in leaves the old one beside it."""
    left = tmp_path / ".hs.x1y2.old"
    shutil.copytree(exported, left)
    with pytest.raises(TraceCircuitsError, match=r"interrupted save left the previous hook set in .*\.hs\.x1y2\.old"):
        load_hookset(tmp_path / "hs")
