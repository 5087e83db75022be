"""The frozen evaluation suite (``flashhead_mlx/data/suite``, described in docs/suite.md): texts
by domain, split once into a development part (tune and decide on it) and a held-out part (report
on it), and chat prompts whose positions are the model's own dense greedy replies.

``manifest.json`` lists every file with its domain, split, source, licence and SHA-256.
"""

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from .calibration import DATA_DIR
from .model_head import final_hidden_states
from .patch import is_patched, patch, unpatch
from .recent import windows

SUITE_DIR = DATA_DIR / "suite"
MANIFEST = SUITE_DIR / "manifest.json"
SPLITS = ("dev", "held-out")
# The domain whose files are prompts: its positions are the model's own replies.
CHAT = "chat"
# Where the dense replies are cached, by model fingerprint.
CHAT_CACHE_DIR = Path.home() / ".cache" / "flashhead-mlx" / "chat"
# Tokens of reply generated per prompt.
REPLY_TOKENS = 256
# Prompts per batch_generate call (mlx-lm's own completion batch size).
REPLY_BATCH = 32
# Prompts with their replies per forward pass for their hidden states (right-padded: a causal
# model's positions do not see the padding after them).
FORWARD_BATCH = 8
# Files of a model folder that decide its dense replies (config.json without FlashHead's keys).
FINGERPRINT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
FLASHHEAD_CONFIG_KEYS = ("flashhead", "model_file")


def manifest() -> dict:
    """The suite's manifest: ``files`` maps each file (relative to :data:`SUITE_DIR`) to its
    ``domain``, ``split``, ``source``, ``licence`` and ``sha256``."""
    return json.loads(MANIFEST.read_text())


def suite_files(split: str = "held-out") -> Dict[str, List[Path]]:
    """The suite's files of ``split`` (``dev``, ``held-out`` or ``all``) by domain, in order."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}, all")
    domains: Dict[str, List[Path]] = {}
    for name, entry in sorted(manifest()["files"].items()):
        if split in ("all", entry["split"]):
            domains.setdefault(entry["domain"], []).append(SUITE_DIR / name)
    return dict(sorted(domains.items(), key=lambda item: (item[0] == CHAT, item[0])))


def read_text(paths: Sequence[Path]) -> str:
    """The texts of ``paths``, one after the other, a blank line between them."""
    return "\n\n".join(Path(p).read_text().strip("\n") for p in paths)


def read_prompts(paths: Sequence[Path]) -> List[str]:
    """The prompts of ``paths``: one per non-empty line."""
    prompts = [line.strip() for p in paths for line in Path(p).read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"no prompts in {', '.join(map(str, paths))}")
    return prompts


def model_fingerprint(folder: Path) -> str:
    """SHA-256 of what decides a model folder's dense replies: its weights, tokenizer and chat
    template, and its ``config.json`` without FlashHead's entries (so clustering or tuning the
    head again keeps the fingerprint)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    for key in FLASHHEAD_CONFIG_KEYS:
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    names = sorted(p.name for p in folder.glob("model*.safetensors"))
    names += [n for n in FINGERPRINT_FILES if (folder / n).is_file()]
    for name in names:
        digest.update(name.encode())
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def chat_prompt_tokens(tokenizer, prompt: str) -> List[int]:
    """``prompt`` as a user turn through the model's chat template, ready for the reply."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the model's tokenizer has no chat template: chat prompts need one")
    messages = [{"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def plain_prompt_tokens(tokenizer, text: str) -> List[int]:
    """``text`` as the start of a document (the model's own BOS first), ready to continue."""
    return list(tokenizer.encode(text))


def dense_replies(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    fingerprint: Optional[str],
    max_tokens: Optional[int] = None,
    cache_dir: Optional[Path] = None,
    prompt_tokens: Callable = chat_prompt_tokens,
) -> Tuple[List[List[int]], List[bool]]:
    """The model's dense greedy replies to ``prompts`` through its chat template (mlx-lm's
    ``batch_generate``, FlashHead taken off for it and put back), cached under ``cache_dir``
    (default :data:`CHAT_CACHE_DIR`) by the model's ``fingerprint`` (:func:`model_fingerprint`;
    ``None``: not cached), the prompts and ``max_tokens`` (default :data:`REPLY_TOKENS`).
    ``prompt_tokens`` (:func:`plain_prompt_tokens`: continuations of the prompts as plain text)
    makes the prompts' tokens.

    Returns the reply tokens (without the stop token) and whether each reply stopped on a stop
    token (else it ran to ``max_tokens``).
    """
    from mlx_lm import batch_generate

    max_tokens = max_tokens or REPLY_TOKENS
    keyed = [list(prompts), max_tokens]
    if prompt_tokens is not chat_prompt_tokens:
        keyed.append(prompt_tokens.__name__)
    key = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:16]
    path = fingerprint and Path(cache_dir or CHAT_CACHE_DIR) / fingerprint / f"{key}.json"
    if path and path.is_file():
        cached = json.loads(path.read_text())
        return cached["replies"], cached["stopped"]
    tokens = [prompt_tokens(tokenizer, p) for p in prompts]
    replies, texts = [], []
    patched = is_patched(model)
    if patched:
        unpatch(model)
    try:
        for start in tqdm(range(0, len(tokens), REPLY_BATCH), desc="Dense replies"):
            response = batch_generate(
                model,
                tokenizer,
                tokens[start : start + REPLY_BATCH],
                max_tokens=max_tokens,
                return_token_ids=True,
            )
            replies += [list(map(int, r)) for r in response.token_ids]
            texts += response.texts
    finally:
        if patched:
            patch(model)
    stopped = [len(r) < max_tokens for r in replies]
    if not path:
        return replies, stopped
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "prompts": list(prompts),
        "max_tokens": max_tokens,
        "replies": replies,
        "stopped": stopped,
        "texts": texts,
    }
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, ensure_ascii=False) + "\n")
    partial.rename(path)
    return replies, stopped


def reply_rows(
    tokenizer,
    prompts: Sequence[str],
    replies: Sequence[Sequence[int]],
    stopped: Sequence[bool],
    max_tokens: Optional[int] = None,
    prompt_tokens: Callable = chat_prompt_tokens,
) -> List[Tuple[List[int], int, int]]:
    """Each prompt with its reply as ``(tokens, start, end)``: its positions where the model
    decoded the reply are ``start`` (the prompt's last token, which predicts the reply's first)
    to ``end`` (the reply's last token when the reply stopped there: it predicts the stop token;
    else the one before), in prompt order until ``max_tokens`` positions are reached."""
    rows, count = [], 0
    for prompt, reply, stop in zip(prompts, replies, stopped):
        if max_tokens is not None and count >= max_tokens:
            break
        tokens = prompt_tokens(tokenizer, prompt)
        start, end = len(tokens) - 1, len(tokens) + len(reply) - (0 if stop else 1)
        rows.append((tokens + list(reply), start, end))
        count += end - start
    return rows


def chat_hidden_states(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    replies: Sequence[Sequence[int]],
    stopped: Sequence[bool],
    max_tokens: Optional[int] = None,
    prompt_tokens: Callable = chat_prompt_tokens,
) -> mx.array:
    """Hidden states ``[N, d]`` (float32) of the positions where the model decoded ``replies``
    (:func:`reply_rows`), at most ``max_tokens``; :data:`FORWARD_BATCH` prompts per forward pass;
    ``prompt_tokens`` as :func:`dense_replies`'s."""
    rows = reply_rows(tokenizer, prompts, replies, stopped, max_tokens, prompt_tokens)
    states = []
    for i in tqdm(range(0, len(rows), FORWARD_BATCH), desc="Replies forward"):
        batch = rows[i : i + FORWARD_BATCH]
        width = max(len(tokens) for tokens, _, _ in batch)
        padded = mx.array([tokens + [0] * (width - len(tokens)) for tokens, _, _ in batch])
        h = final_hidden_states(model, padded).astype(mx.float32)
        states += [h[j, start:end] for j, (_, start, end) in enumerate(batch)]
        mx.eval(states[-len(batch) :])
    hidden = mx.concatenate(states)
    return hidden if max_tokens is None else hidden[:max_tokens]


def chat_contexts(
    tokenizer,
    prompts: Sequence[str],
    replies: Sequence[Sequence[int]],
    stopped: Sequence[bool],
    size: int,
    max_tokens: Optional[int] = None,
    prompt_tokens: Callable = chat_prompt_tokens,
) -> mx.array:
    """The last ``size`` tokens ``[N, size]`` (int32, -1 before the prompt's start) of each
    position of :func:`chat_hidden_states`: the prompt's tokens and the reply so far, which a
    FlashHead scores exactly at greedy steps (:mod:`flashhead_mlx.recent`)."""
    rows = reply_rows(tokenizer, prompts, replies, stopped, max_tokens, prompt_tokens)
    contexts = [windows(mx.array([t[:end]]), end - start, size)[0] for t, start, end in rows]
    return mx.concatenate(contexts)[:max_tokens]
