"""Prompt sets: file loaders, chat templating and batching (the built-in sets are in :mod:`trace_circuits.datasets`)."""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from jaxtyping import Int

from trace_circuits.errors import TraceCircuitsError

#: Column names tried, in order, when a .jsonl/.csv file names none (AdvBench, HarmBench, common ones).
PROMPT_COLUMNS = ("prompt", "goal", "Behavior", "behavior", "instruction", "text", "question", "query", "request")
MAX_PROMPT_CHARS = 4000
SPLITS = ("train", "test", "all")


@dataclass
class PromptSet:
    """A list of prompts with optional per-prompt ids and category labels."""

    prompts: list[str]
    categories: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if not self.categories:
            self.categories = ["" for _ in self.prompts]
        if not self.ids:
            self.ids = [f"{i:04d}" for i in range(len(self.prompts))]
        if not (len(self.prompts) == len(self.categories) == len(self.ids)):
            raise ValueError("prompts, categories and ids must have the same length")

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return PromptSet(self.prompts[idx], self.categories[idx], self.ids[idx], self.source)
        return self.prompts[idx]

    def select(self, indices: Sequence[int]) -> "PromptSet":
        return PromptSet([self.prompts[i] for i in indices], [self.categories[i] for i in indices],
                         [self.ids[i] for i in indices], self.source)

    def to_json(self) -> dict:
        return {"source": self.source, "n": len(self),
                "items": [{"id": i, "category": c, "prompt": p} for i, c, p in zip(self.ids, self.categories, self.prompts)]}


def load_prompts(path: str | Path, column: Optional[str] = None, max_chars: int = MAX_PROMPT_CHARS) -> PromptSet:
    """Read prompts from ``.txt`` (one a line), ``.jsonl``/``.json`` or ``.csv``/``.tsv``.

    Without ``column`` the first of :data:`PROMPT_COLUMNS` present is used. Blank prompts are skipped and
    duplicates dropped with a warning; prompts longer than ``max_chars`` are dropped with a warning.
    """
    path = Path(path)
    if path.name.startswith("builtin:"):
        from trace_circuits.datasets import builtin_prompts

        _, kind, *rest = path.name.split(":")
        return builtin_prompts(kind, rest[0] if rest else "train")
    if not path.exists():
        raise TraceCircuitsError(f"prompt file {path} does not exist; pass an existing .txt, .jsonl or .csv file")
    if path.is_dir():
        raise TraceCircuitsError(f"{path} is a folder; pass a .txt, .jsonl or .csv prompt file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TraceCircuitsError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise TraceCircuitsError(f"cannot read prompt file {path} ({err.strerror or type(err).__name__})") from None
    if not text.strip():
        raise TraceCircuitsError(f"prompt file {path} is empty; put one prompt per line (.txt) or one per row")
    suffix = path.suffix.lower()
    if suffix == ".txt" or suffix == "":
        raw = [(line, "") for line in text.splitlines()]
        n_blank = sum(1 for line, _ in raw if not line.strip())
        if n_blank:
            warnings.warn(f"{path}: skipped {n_blank} blank line(s)", stacklevel=2)
        raw = [(line.strip(), c) for line, c in raw if line.strip()]
    elif suffix in (".jsonl", ".json"):
        raw = _read_json_rows(path, text, column)
    elif suffix in (".csv", ".tsv"):
        raw = _read_csv_rows(path, text, column, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise TraceCircuitsError(f"unsupported prompt file type '{suffix}' ({path}); use .txt, .jsonl or .csv")
    return _clean(raw, path, max_chars)


def _pick_column(columns: Sequence[str], column: Optional[str], path: Path) -> str:
    if column is not None:
        if column not in columns:
            raise TraceCircuitsError(f"{path} has no column '{column}'; columns seen: {', '.join(columns) or 'none'}")
        return column
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise TraceCircuitsError(
        f"{path}: no prompt column found (tried {', '.join(PROMPT_COLUMNS)}); columns seen: "
        f"{', '.join(columns) or 'none'}; pass --column NAME"
    )


def _category_of(row: dict) -> str:
    for name in ("category", "SemanticCategory", "FunctionalCategory", "label"):
        if isinstance(row.get(name), str):
            return row[name]
    return ""


def _read_json_rows(path: Path, text: str, column: Optional[str]) -> list[tuple[str, str]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise TraceCircuitsError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TraceCircuitsError(f"{path}:{lineno} is not valid JSON ({err.msg}); fix or remove that line") from None
    if rows and all(isinstance(r, str) for r in rows):
        return [(r, "") for r in rows]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise TraceCircuitsError(f"{path}: expected one JSON object per line (e.g. {{\"prompt\": \"...\"}})")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    col = _pick_column(columns, column, path)
    out = []
    for i, r in enumerate(rows, 1):
        val = r.get(col)
        if val is not None and not isinstance(val, str):
            raise TraceCircuitsError(f"{path}: row {i} has a non-text '{col}' ({type(val).__name__}); prompts must be strings")
        out.append((val or "", _category_of(r)))
    return out


def _read_csv_rows(path: Path, text: str, column: Optional[str], delimiter: str) -> list[tuple[str, str]]:
    try:
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
        columns = [c for c in (reader.fieldnames or []) if c is not None]
        rows = list(reader)
    except csv.Error as err:
        raise TraceCircuitsError(f"{path} is not valid CSV ({err}); fix the file") from None
    col = _pick_column(columns, column, path)
    return [((r.get(col) or ""), _category_of(r)) for r in rows]


def _clean(raw: list[tuple[str, str]], path: Path, max_chars: int) -> PromptSet:
    prompts, cats, ids, seen = [], [], [], set()
    n_blank = n_dup = n_long = 0
    for i, (p, c) in enumerate(raw):
        p = p.strip()
        if not p:
            n_blank += 1
            continue
        if len(p) > max_chars:
            n_long += 1
            continue
        if p in seen:
            n_dup += 1
            continue
        seen.add(p)
        prompts.append(p)
        cats.append(c)
        ids.append(f"{path.stem}-{i:04d}")
    if n_blank and path.suffix.lower() not in (".txt", ""):
        warnings.warn(f"{path}: skipped {n_blank} empty prompt(s)", stacklevel=3)
    if n_dup:
        warnings.warn(f"{path}: dropped {n_dup} duplicate prompt(s)", stacklevel=3)
    if n_long:
        warnings.warn(f"{path}: dropped {n_long} prompt(s) longer than {max_chars} characters", stacklevel=3)
    if not prompts:
        raise TraceCircuitsError(f"{path} holds no usable prompts (all blank, duplicate or too long)")
    return PromptSet(prompts, cats, ids, source=str(path))


def check_distinct(harmful: Sequence[str], benign: Sequence[str], max_shared: float = 0.5) -> None:
    """Refuse harmful and benign sets that are the same prompts (identical, or sharing ``max_shared`` of the smaller
    set, ignoring case, punctuation and spacing): every contrast between them would be noise. A few shared prompts
    are a warning."""
    norm = lambda p: " ".join("".join(c if c.isalnum() else " " for c in p.lower()).split())  # noqa: E731
    h, b = {norm(p) for p in harmful}, {norm(p) for p in benign}
    shared = h & b
    if not shared:
        return
    example = next(p for p in harmful if norm(p) in shared)[:60]
    if h == b or len(shared) >= max_shared * min(len(h), len(b)):
        raise TraceCircuitsError(f"the harmful and benign prompt sets are {'identical' if h == b else 'nearly identical'}"
                                 f": {len(shared)} of {min(len(h), len(b))} prompts are in both (e.g. {example!r}); "
                                 "pass two different sets")
    warnings.warn(f"{len(shared)} prompt(s) are in both the harmful and the benign set (e.g. {example!r}); they blur "
                  "the contrast", stacklevel=2)


def as_prompt_list(prompts: PromptSet | Sequence[str] | str | Path) -> list[str]:
    """Accept a :class:`PromptSet`, a list of strings, or a path to a prompt file."""
    if isinstance(prompts, PromptSet):
        return list(prompts.prompts)
    if isinstance(prompts, (str, Path)):
        return load_prompts(prompts).prompts
    out = list(prompts)
    if not out:
        raise TraceCircuitsError("empty prompt list; pass at least one prompt")
    bad = [type(p).__name__ for p in out if not isinstance(p, str)]
    if bad:
        raise TraceCircuitsError(f"prompts must be strings, got {bad[0]}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Chat templating and tokenization


@dataclass
class EncodedPrompts:
    """Token ids per prompt and where the user's text sits inside the templated sequence.

    ``content_spans[i] = (start, end)``: token positions ``start <= t < end`` hold prompt ``i``'s own text;
    the rest is chat template (system prompt, role markers, the generation prompt).
    """

    texts: list[str]
    input_ids: list[list[int]]
    content_spans: list[tuple[int, int]]
    pad_token_id: int
    prompts: list[str] = field(default_factory=list)  # the user's text of each prompt (before templating)
    chat: Optional[bool] = None  # whether the chat template was applied

    def __len__(self) -> int:
        return len(self.input_ids)

    def prompt(self, i: int) -> str:
        return self.prompts[i] if self.prompts else self.texts[i]

    def select(self, indices: Sequence[int]) -> "EncodedPrompts":
        idx = list(indices)
        return EncodedPrompts([self.texts[i] for i in idx], [self.input_ids[i] for i in idx],
                              [self.content_spans[i] for i in idx], self.pad_token_id,
                              [self.prompts[i] for i in idx] if self.prompts else [], self.chat)

    def __add__(self, other: "EncodedPrompts") -> "EncodedPrompts":
        return EncodedPrompts(self.texts + other.texts, self.input_ids + other.input_ids,
                              self.content_spans + other.content_spans, self.pad_token_id,
                              [self.prompt(i) for i in range(len(self))] + [other.prompt(i) for i in range(len(other))],
                              self.chat if self.chat == other.chat else None)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def uses_chat_template(model) -> bool:
    """Whether prompts for ``model`` (a HookedTransformer, transformers model or tokenizer) get the chat template: the
    model was loaded as a chat model (or, for a bare tokenizer, it has a chat template)."""
    tok = getattr(model, "tokenizer", model)
    has_template = bool(getattr(tok, "chat_template", None))
    if tok is model or not (hasattr(model, "cfg") or hasattr(model, "config")):
        return has_template
    from trace_circuits.models import model_info

    return has_template and model_info(model).chat


def format_prompts(model_or_tokenizer, prompts: Sequence[str], chat: Optional[bool] = None,
                   system: Optional[str] = None) -> list[str]:
    """Apply the tokenizer's chat template (user turn + generation prompt) when the model is a chat model."""
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if chat is None:
        chat = uses_chat_template(model_or_tokenizer)
    if not chat:
        return list(prompts)
    if not getattr(tok, "chat_template", None):
        raise TraceCircuitsError("this tokenizer has no chat template; pass chat=False (--no-chat) for a base model")
    out = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        out.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def encode_prompts(model, prompts: PromptSet | Sequence[str], chat: Optional[bool] = None,
                   system: Optional[str] = None, max_tokens: Optional[int] = None) -> EncodedPrompts:
    """Template and tokenize prompts (no BOS added beyond what the template has), locating each prompt's text."""
    plist = as_prompt_list(prompts)
    tok = model.tokenizer
    if tok is None:
        raise TraceCircuitsError("the model has no tokenizer; pass tokens yourself or load the model with one")
    texts = format_prompts(model, plist, chat=chat, system=system)
    prepend_bos = bool(model.cfg.default_prepend_bos) and tok.bos_token_id is not None
    limit = max_tokens or model.cfg.n_ctx
    ids_all, spans = [], []
    for raw, text in zip(plist, texts):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = list(enc["offset_mapping"])
        if prepend_bos and (not ids or ids[0] != tok.bos_token_id):
            ids = [tok.bos_token_id] + ids
            offsets = [(0, 0)] + offsets
        start_char = text.rfind(raw)
        if start_char >= 0:
            end_char = start_char + len(raw)
            inside = [i for i, (a, b) in enumerate(offsets) if b > start_char and a < end_char and b > a]
            span = (inside[0], inside[-1] + 1) if inside else (1, len(ids))
        else:
            span = (1, len(ids))
        if len(ids) > limit:
            raise TraceCircuitsError(
                f"a prompt is {len(ids)} tokens, over the limit of {limit} (model context {model.cfg.n_ctx}); "
                f"shorten it or drop it: {raw[:60]!r}"
            )
        ids_all.append(ids)
        spans.append(span)
    return EncodedPrompts(texts, ids_all, spans, pad_id_of(tok), list(plist),
                          uses_chat_template(model) if chat is None else bool(chat))


@dataclass
class Batch:
    """A left-padded batch: ``tokens[i, -len_i:]`` is prompt ``indices[i]``."""

    indices: list[int]
    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    n_pad: list[int]


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left", device: torch.device | str = "cpu"
                  ) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    """Token ids and attention mask of ``seqs`` padded to one width on the ``left`` (generation, last-position
    readouts) or the ``right`` (positions stay each sequence's own). The one padding helper of the package."""
    if side not in ("left", "right"):
        raise ValueError("side must be 'left' or 'right'")
    width = max(1, max((len(q) for q in seqs), default=1))
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, q in enumerate(seqs):
        if len(q):
            cols = slice(width - len(q), width) if side == "left" else slice(0, len(q))
            ids[i, cols] = torch.as_tensor(list(q), dtype=torch.long)
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS token, else 0."""
    for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if t is not None:
            return int(t)
    return 0


def encode_padded(tokenizer, texts: Sequence[str], side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (no special tokens added) and attention mask of already-templated ``texts``, padded on ``side``."""
    return pad_sequences([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], pad_id_of(tokenizer),
                         side, device)


def iter_batches(encoded: EncodedPrompts, batch_size: int, device: torch.device | str = "cpu",
                 sort_by_length: bool = True) -> Iterator[Batch]:
    """Left-padded batches. Sorting by length first keeps padding (wasted compute) small."""
    if batch_size < 1:
        raise TraceCircuitsError("batch size must be at least 1")
    order = list(range(len(encoded)))
    if sort_by_length:
        order.sort(key=lambda i: len(encoded.input_ids[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        tokens, mask = pad_sequences([encoded.input_ids[i] for i in idx], encoded.pad_token_id, "left", device)
        width = tokens.shape[1]
        yield Batch(idx, tokens, mask, [width - len(encoded.input_ids[i]) for i in idx])
