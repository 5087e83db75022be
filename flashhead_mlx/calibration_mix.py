"""The calibration mix a conversion clusters, fits its centroids and its mass offsets on, and the
development suite it tunes ``n_probes`` on (docs/clustering.md).

The mix: the model's own dense greedy replies through its chat template to the shipped
calibration prompts and its own continuations of shipped openings in twenty-odd languages (the
hidden states of decode), shipped source code and the shipped novel, teacher-forced. No source
holds a suite text or prompt (``tests/test_calibration.py``).
"""

import math
import random
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from .calibration import (
    CALIBRATION_TEXT,
    DATA_DIR,
    calibration_hidden_states,
    text_contexts,
    text_hidden_states,
)
from .durable import kill_point
from .suite import (
    CHAT,
    REPLY_BATCH,
    chat_contexts,
    chat_hidden_states,
    chat_prompt_tokens,
    dense_replies,
    plain_prompt_tokens,
    read_prompts,
    read_text,
    suite_files,
)

CALIBRATION_PROMPTS = DATA_DIR / "calibration_prompts.txt"
# Source code the suite does not use (scripts/make_calibration_code.py).
CALIBRATION_CODE = DATA_DIR / "calibration_code.txt"
# Openings of documents in twenty-odd languages, written for this project: the model continues
# them (its own non-English decode states; no suite text).
CALIBRATION_OPENINGS = DATA_DIR / "calibration_openings.txt"
# Share of the calibration positions from each source (measured in docs/clustering.md).
MIX = {"chat": 0.25, "code": 0.25, "languages": 0.125, "prose": 0.375}
# Tokens of each calibration reply: enough to cover a reply's start, middle and end.
CALIBRATION_REPLY_TOKENS = 128
# The most calibration prompts replied to: one batch_generate call, the mix's dearest positions;
# a smaller chat share takes one prompt per CALIBRATION_REPLY_TOKENS positions (the replies'
# shortfall on the share goes to the last source).
CALIBRATION_REPLIES = REPLY_BATCH
# Tokens of each continuation of an opening (a batch of them covers the languages share).
CONTINUATION_TOKENS = 64
# The sources the model generates: each one's prompts file, tokens generated per prompt, and how a
# prompt becomes the model's input (through its chat template, or as the start of a document).
GENERATED_SOURCES = {
    "chat": (CALIBRATION_PROMPTS, CALIBRATION_REPLY_TOKENS, chat_prompt_tokens),
    "languages": (CALIBRATION_OPENINGS, CONTINUATION_TOKENS, plain_prompt_tokens),
}
# Positions per domain of the development suite that tuning measures.
TUNING_DOMAIN_TOKENS = 2048
# Tokens of each dev reply tuning measures (the first prompts' replies, a batch at a time).
TUNING_REPLY_TOKENS = 128


def has_chat_template(tokenizer) -> bool:
    """Whether the model can be prompted through a chat template (its replies calibrate)."""
    return getattr(tokenizer, "chat_template", None) is not None


def mix_budget(n_tokens: int, mix: Dict[str, float] = MIX) -> Dict[str, int]:
    """Positions per source: ``n_tokens`` split by the shares of ``mix`` (rounded down, the
    remainder to the last source)."""
    if n_tokens < 1 or not mix or any(share < 0 for share in mix.values()):
        raise ValueError(f"a calibration mix needs positions and shares >= 0, got {mix}")
    total = sum(mix.values())
    budget = {source: math.floor(n_tokens * share / total) for source, share in mix.items()}
    budget[list(mix)[-1]] += n_tokens - sum(budget.values())
    return budget


def calibration_prompts(seed: int = 0, path=CALIBRATION_PROMPTS) -> List[str]:
    """The shipped calibration prompts (or the lines of ``path``) in the order ``seed`` gives
    them."""
    prompts = read_prompts([path])
    random.Random(seed).shuffle(prompts)
    return prompts


def reply_states(
    model: nn.Module,
    tokenizer,
    prompts: List[str],
    n_tokens: int,
    max_tokens: int,
    fingerprint: Optional[str],
    prompt_tokens: Callable = chat_prompt_tokens,
    recent: int = 0,
) -> Tuple[mx.array, mx.array]:
    """Hidden states of up to ``n_tokens`` positions of the model's dense replies to
    ``prompts`` (``prompt_tokens`` as :func:`flashhead_mlx.suite.dense_replies`'s), generated a
    batch of prompts at a time until there are enough, and each position's last ``recent``
    context tokens (:func:`flashhead_mlx.suite.chat_contexts`)."""
    states, contexts, count = [], [], 0
    for start in range(0, len(prompts), REPLY_BATCH):
        batch = prompts[start : start + REPLY_BATCH]
        replies, stopped = dense_replies(
            model, tokenizer, batch, fingerprint, max_tokens, prompt_tokens=prompt_tokens
        )
        rows = (tokenizer, batch, replies, stopped)
        states.append(chat_hidden_states(model, *rows, prompt_tokens=prompt_tokens))
        contexts.append(chat_contexts(*rows, recent, prompt_tokens=prompt_tokens))
        count += states[-1].shape[0]
        if count >= n_tokens:
            break
    return mx.concatenate(states)[:n_tokens], mx.concatenate(contexts)[:n_tokens]


def mix_hidden_states(
    model: nn.Module,
    tokenizer,
    n_tokens: int,
    seed: int = 0,
    mix: Dict[str, float] = MIX,
    fingerprint: Optional[str] = None,
) -> mx.array:
    """Final hidden states ``[n_tokens, d]`` (float32) of the calibration mix: ``mix``'s shares
    of the model's replies to the first :data:`CALIBRATION_REPLIES` calibration prompts
    (``chat``, in ``seed``'s order), its continuations of the calibration openings
    (``languages``, :data:`CONTINUATION_TOKENS` each, in ``seed``'s order; the two generated
    sources are :data:`GENERATED_SOURCES`), the calibration code
    (``code``) and the calibration novel (``prose``); the positions the generated sources fall
    short of their share go to the last source, and a model without a chat template has no
    replies (the other sources share their positions). Replies and continuations are cached by
    ``fingerprint`` (:func:`flashhead_mlx.suite.model_fingerprint`; ``None``: not cached)."""
    if not has_chat_template(tokenizer):
        mix = {source: share for source, share in mix.items() if source != "chat"}
    budget = mix_budget(n_tokens, mix)
    unknown = set(budget) - set(MIX)
    if unknown:
        raise ValueError(f"unknown calibration sources: {', '.join(sorted(unknown))}")
    parts, last = [], list(budget)[-1]
    for source, count in budget.items():
        if source == last:
            count = n_tokens - sum(part.shape[0] for part in parts)
        if count == 0:
            continue
        if source in GENERATED_SOURCES:
            path, reply_tokens, prompt_tokens = GENERATED_SOURCES[source]
            replies = min(CALIBRATION_REPLIES, math.ceil(count / reply_tokens))
            prompts = calibration_prompts(seed, path)[:replies]
            states, _ = reply_states(
                model, tokenizer, prompts, count, reply_tokens, fingerprint, prompt_tokens
            )
        else:
            text = (CALIBRATION_CODE if source == "code" else CALIBRATION_TEXT).read_text()
            states = calibration_hidden_states(model, tokenizer, text, n_tokens=count)
        print(f"[INFO] Calibration: {states.shape[0]} positions of {source}")
        parts.append(states)
        kill_point("calibration")
    return mx.concatenate(parts)


def dev_suite_states(
    model: nn.Module,
    tokenizer,
    fingerprint: Optional[str] = None,
    max_tokens: Optional[int] = None,
    recent: int = 0,
) -> Dict[str, Tuple[mx.array, mx.array]]:
    """Hidden states of the development suite by domain, as tuning measures it, with each
    position's last ``recent`` context tokens (the head's ``recent_tokens``:
    :func:`flashhead_mlx.calibration.text_contexts`, :func:`flashhead_mlx.suite.chat_contexts`):
    up to ``max_tokens`` positions of each domain (default :data:`TUNING_DOMAIN_TOKENS`); the chat
    domain's are the model's dense replies (:data:`TUNING_REPLY_TOKENS` tokens) to the first dev
    prompts, cached by ``fingerprint`` (none without a chat template)."""
    domains = suite_files("dev")
    if not has_chat_template(tokenizer):
        domains.pop(CHAT)
    max_tokens = max_tokens or TUNING_DOMAIN_TOKENS
    states = {}
    for domain, files in tqdm(domains.items(), desc="Development suite"):
        if domain == CHAT:
            states[domain] = reply_states(
                model,
                tokenizer,
                read_prompts(files),
                max_tokens,
                TUNING_REPLY_TOKENS,
                fingerprint,
                recent=recent,
            )
        else:
            text = read_text(files)
            states[domain] = (
                text_hidden_states(model, tokenizer, text, max_tokens),
                text_contexts(tokenizer, text, max_tokens, recent),
            )
    return states
