"""The SAE training corpus: real text that can be had offline, with its provenance.

Two parts, rebuilt by ``trace-circuits build-corpus`` (deterministic: fixed seed, greedy decoding):

* ``chat``: chat transcripts of the model itself. Prompts are the built-in *train* harmful, benign and
  hard-negative requests (never the test split; the SmolLM2 corpus predates the hard negatives) plus instructions generated from :data:`TOPICS` x :data:`FORMS`; each is wrapped in the
  model's chat template and followed by the model's own greedy answer (``max_new_tokens``, transformers
  ``generate`` on the dequantized GGUF model). This is the distribution the toolkit analyses.
* ``prose``: English reference text shipped with CPython: the ``pydoc_data.topics`` language reference and the
  docstrings of standard-library modules, split into paragraphs.

Each document records its ``source``; a stable hash of the text puts 10% of documents in the ``heldout`` split.
The corpus is a gzipped JSONL file (``{"text", "source", "split"}`` per line), written atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import random
import sys
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from trace_circuits._io import atomic_path
from trace_circuits.errors import TraceCircuitsError

FORMAT_VERSION = 1

TOPICS = [
    "baking sourdough bread", "growing tomatoes on a balcony", "learning to play the guitar", "training a puppy",
    "planning a budget for a family", "writing a cover letter", "preparing for a job interview",
    "running a first marathon", "choosing a laptop for students", "learning Python programming",
    "the water cycle", "photosynthesis", "the French Revolution", "black holes", "how vaccines work",
    "the history of the printing press", "climate change", "the stock market", "saving for retirement",
    "making a website with HTML", "sorting algorithms", "recursion in programming", "SQL joins",
    "the Roman Empire", "ancient Egyptian pyramids", "the theory of evolution", "plate tectonics",
    "healthy breakfast ideas", "meditation for beginners", "improving sleep quality", "studying for exams",
    "public speaking", "time management", "learning a foreign language", "traveling in Japan on a budget",
    "camping safety", "repairing a bicycle tire", "painting a room", "fixing a leaky faucet",
    "composting at home", "keeping houseplants alive", "making cold brew coffee", "brewing green tea",
    "cooking risotto", "making homemade pizza dough", "knitting a scarf", "origami cranes", "chess openings",
    "the rules of basketball", "the Olympic Games", "Shakespeare's sonnets", "writing a short story",
    "poetry forms like the haiku", "the life of Marie Curie", "the invention of the telephone",
    "renewable energy", "electric cars", "how airplanes fly", "the human heart", "the immune system",
    "dinosaurs", "the solar system", "the moon landing", "machine learning basics", "neural networks",
    "spreadsheets for small businesses", "starting a vegetable garden", "bird watching", "photography tips",
    "editing videos", "recording a podcast", "writing a resume", "negotiating a salary", "remote work",
    "team communication", "conflict resolution at work", "the basics of economics", "supply and demand",
    "compound interest", "the Pythagorean theorem", "probability with dice", "prime numbers", "fractions",
    "world capitals", "the Amazon rainforest", "coral reefs", "volcanoes", "earthquake preparedness",
    "first aid for minor cuts", "staying hydrated", "stretching after exercise", "yoga for beginners",
    "organizing a closet", "moving to a new city", "hosting a dinner party", "writing thank-you notes",
    "wedding toasts", "birthday party games for kids", "teaching kids to read", "homework help for math",
    "choosing a good book", "the history of jazz", "classical music composers", "how to read sheet music",
    "drawing portraits", "watercolor painting", "the Renaissance", "the Industrial Revolution",
    "the internet's history", "how email works", "password managers", "backing up photos",
    "cleaning a keyboard", "building a birdhouse", "car maintenance basics", "changing a car's oil",
    "recycling plastics", "reducing food waste", "making soup stock", "vegetarian protein sources",
]

FORMS = [
    "Explain {t} in simple terms.", "Give me three tips about {t}.", "What should a beginner know about {t}?",
    "Write a short paragraph about {t}.", "What are common mistakes with {t}?", "Summarize the key facts about {t}.",
    "How would you teach a child about {t}?", "List the main steps involved in {t}.",
    "Why is {t} interesting?", "Write a haiku about {t}.", "Compare two different approaches to {t}.",
    "Tell me a fun fact about {t}.",
]


def generated_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct instructions from TOPICS x FORMS, in a fixed pseudo-random order."""
    pairs = [f.format(t=t) for t in TOPICS for f in FORMS]
    random.Random(seed).shuffle(pairs)
    if n > len(pairs):
        raise TraceCircuitsError(f"at most {len(pairs)} generated prompts are available, not {n}")
    return pairs[:n]


def _split_of(text: str, heldout_fraction: float = 0.1) -> str:
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < heldout_fraction else "train"


def prose_documents(min_chars: int = 200, max_chars: int = 2000) -> Iterator[dict]:
    """Paragraph chunks of CPython's reference docs (pydoc_data) and standard-library module docstrings."""
    import pydoc_data.topics

    def chunks(text: str) -> Iterator[str]:
        buf = ""
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if not para:
                continue
            if buf and len(buf) + len(para) > max_chars:
                if len(buf) >= min_chars:
                    yield buf
                buf = ""
            buf = f"{buf}\n\n{para}" if buf else para
        if len(buf) >= min_chars:
            yield buf

    for name in sorted(pydoc_data.topics.topics):
        for c in chunks(pydoc_data.topics.topics[name]):
            yield {"text": c, "source": f"pydoc_data.topics:{name}"}
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__hello__", "__phello__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod_name in sorted(getattr(sys, "stdlib_module_names", ())):
            if mod_name in skip or mod_name.startswith("_"):
                continue
            try:
                mod = importlib.import_module(mod_name)
            except Exception:  # platform-specific modules (winreg, ...)
                continue
            docs = [mod.__doc__ or ""]
            for attr in sorted(dir(mod)):
                obj = getattr(mod, attr, None)
                doc = getattr(obj, "__doc__", None)
                if getattr(obj, "__module__", None) == mod_name and isinstance(doc, str) and doc:
                    docs.append(doc)
            for c in chunks("\n\n".join(docs)):
                yield {"text": c, "source": f"stdlib-docstrings:{mod_name}"}


def chat_documents(model_name: str, prompts: list[str], sources: list[str], max_new_tokens: int = 64,
                   batch_size: int = 32, progress: bool = True) -> Iterator[dict]:
    """The model's greedy answers to ``prompts``, as full chat transcripts (template + answer)."""
    from trace_circuits.models import load_hf_model

    hf, tok = load_hf_model(model_name)
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(prompts), desc="answering corpus prompts", disable=not progress)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": prompts[i]}], tokenize=False,
                                         add_generation_prompt=True) for i in idx]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = hf.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        for row, i in enumerate(idx):
            answer = tok.decode(out[row, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            yield {"text": texts[row] + answer, "source": sources[i]}
        bar.update(len(idx))
    bar.close()


def build_corpus(out_path: str | Path, model_name: str = "smollm2-135m-instruct", n_generated: int = 1200,
                 max_new_tokens: int = 64, batch_size: int = 32, progress: bool = True) -> Path:
    """Build the corpus file (see module docstring). Chat answers are the slow part (minutes on CPU)."""
    from trace_circuits.datasets import builtin_prompts

    prompts, sources = [], []
    for kind in ("harmful", "benign", "hard_negative"):
        ps = builtin_prompts(kind, "train")
        prompts += ps.prompts
        sources += [f"builtin-{kind}-train:{i}" for i in ps.ids]
    gen = generated_prompts(n_generated)
    prompts += gen
    sources += ["generated-instruction"] * len(gen)
    out_path = Path(out_path)
    n = 0
    with atomic_path(out_path) as tmp:
        with gzip.open(tmp, "wt", encoding="utf-8") as fh:
            header = {"format_version": FORMAT_VERSION, "model": model_name, "max_new_tokens": max_new_tokens,
                      "n_generated": n_generated, "builder": "trace_circuits.corpus.build_corpus"}
            fh.write(json.dumps({"header": header}) + "\n")
            for doc in prose_documents():
                fh.write(json.dumps({**doc, "split": _split_of(doc["text"])}) + "\n")
                n += 1
            for doc in chat_documents(model_name, prompts, sources, max_new_tokens, batch_size, progress):
                fh.write(json.dumps({**doc, "split": _split_of(doc["text"])}) + "\n")
                n += 1
    if progress:
        print(f"wrote {n} documents to {out_path}")
    return out_path


def read_corpus(path: str | Path, split: Optional[str] = None) -> list[dict]:
    """Documents of a corpus file, optionally one split (``train`` or ``heldout``)."""
    path = Path(path)
    if not path.exists():
        raise TraceCircuitsError(f"corpus {path} does not exist; build it with `trace-circuits build-corpus --out {path}`")
    docs = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if "header" in row:
                    if row["header"].get("format_version", 0) > FORMAT_VERSION:
                        raise TraceCircuitsError(f"{path} was written by a newer trace-circuits; upgrade it")
                    continue
                if split is None or row.get("split") == split:
                    docs.append(row)
    except (OSError, json.JSONDecodeError) as err:
        raise TraceCircuitsError(f"{path} is not a corpus file ({type(err).__name__}); rebuild it with "
                                 "`trace-circuits build-corpus`") from None
    return docs


def corpus_path(model_name: str) -> Path:
    """The shipped corpus of a model: ``saes/corpus/<model>.jsonl.gz``."""
    from trace_circuits.models import canonical_name
    from trace_circuits.saes.sources import sae_root

    return sae_root() / "corpus" / f"{canonical_name(model_name)}.jsonl.gz"


def benign_documents(tokenizer, model_name: str, max_docs: int = 48, max_tokens: int = 128, split: str = "heldout",
                     chat_only: bool = False) -> list[str]:
    """Benign documents of the model's corpus (no answers to harmful prompts), cut to ``max_tokens``: the ``heldout``
    split for evaluation, ``train`` for calibrating a gate. ``chat_only`` keeps the chat transcripts (benign requests
    and the model's own answers), leaving out the CPython documentation. Evenly spaced over the sources."""
    path = corpus_path(model_name)
    chat_sources = ("generated-instruction", "builtin-benign", "builtin-hard_negative")
    docs = [d for d in read_corpus(path, split) if not str(d.get("source", "")).startswith("builtin-harmful")
            and (not chat_only or str(d.get("source", "")).startswith(chat_sources))]
    docs.sort(key=lambda d: str(d.get("source", "")))
    step = max(1, len(docs) // max(1, max_docs))
    out = []
    for d in docs[::step][:max_docs]:
        ids = tokenizer(d["text"], add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) >= 16:
            out.append(tokenizer.decode(ids))
    return out

