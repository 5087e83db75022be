"""Hidden states of real text, as the head sees them, for calibration, tuning and evaluation."""

import math
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from .model_head import final_hidden_states
from .recent import windows

DATA_DIR = Path(__file__).parent / "data"
# The novel of the calibration mix (flashhead_mlx.calibration_mix): Pride and Prejudice (public
# domain).
CALIBRATION_TEXT = DATA_DIR / "calibration.txt"
# The default text eval measures (and tune's former default): the first chapters of Northanger
# Abbey (public domain), a novel the conversion does not calibrate on.
TUNING_TEXT = DATA_DIR / "tuning.txt"


def text_windows(tokenizer, text: str, n_tokens: int, seq_len: int) -> mx.array:
    """``[n_windows, len(prefix) + seq_len]`` token windows spread evenly over ``text``.

    Each window starts with the special tokens the tokenizer puts before any text (the BOS
    token for most models), as in generation, followed by ``seq_len`` tokens of ``text``.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < seq_len:
        raise ValueError(
            f"The text has {len(ids)} tokens, fewer than seq_len={seq_len}: use a longer text "
            "or a smaller seq_len"
        )
    prefix = tokenizer.encode("", add_special_tokens=True)
    n_windows = math.ceil(n_tokens / seq_len)
    last_start = len(ids) - seq_len
    starts = [round(i * last_start / max(n_windows - 1, 1)) for i in range(n_windows)]
    return mx.array([prefix + ids[s : s + seq_len] for s in starts])


def calibration_hidden_states(
    model: nn.Module,
    tokenizer,
    text: str,
    n_tokens: int = 16384,
    seq_len: int = 512,
    batch_size: int = 4,
) -> mx.array:
    """Final hidden states ``[n_tokens, d]`` (float32) of teacher-forced windows of ``text``.

    Args:
        model: an mlx-lm model.
        tokenizer: its tokenizer.
        text: the text to run through the model (windows are spread over all of it).
        n_tokens: how many positions to return.
        seq_len: tokens of text per window (the special-token prefix comes on top).
        batch_size: windows per forward pass.
    """
    windows = text_windows(tokenizer, text, n_tokens, seq_len)
    n_prefix = windows.shape[1] - seq_len
    states = []
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="Calibration forward"):
        h = final_hidden_states(model, windows[i : i + batch_size])[:, n_prefix:]
        h = h.astype(mx.float32).reshape(-1, h.shape[-1])
        mx.eval(h)
        states.append(h)
    return mx.concatenate(states)[:n_tokens]


def text_span(tokenizer, text: str, max_tokens: Optional[int], seq_len: int) -> Tuple[int, int]:
    """The positions of ``text`` measured (``max_tokens``, all of it when shorter or ``None``) and
    the tokens per window (``seq_len``, fewer for a shorter text)."""
    n_text = len(tokenizer.encode(text, add_special_tokens=False))
    n_tokens = n_text if max_tokens is None else min(max_tokens, n_text)
    if n_tokens < 2:
        raise ValueError(f"the text has {n_text} tokens: at least 2 are needed")
    return n_tokens, min(seq_len, n_tokens)


def text_hidden_states(
    model: nn.Module, tokenizer, text: str, max_tokens: Optional[int], seq_len: int = 512
) -> mx.array:
    """Hidden states ``[N, d]`` of up to ``max_tokens`` positions of ``text`` (all of it when
    shorter or when ``max_tokens`` is ``None``), in windows of ``seq_len`` tokens spread over the
    text."""
    n_tokens, seq_len = text_span(tokenizer, text, max_tokens, seq_len)
    return calibration_hidden_states(model, tokenizer, text, n_tokens=n_tokens, seq_len=seq_len)


def text_contexts(
    tokenizer, text: str, max_tokens: Optional[int], size: int, seq_len: int = 512
) -> mx.array:
    """The last ``size`` tokens of each position of :func:`text_hidden_states` ``[N, size]``
    (int32, -1 before its window's start): the context as the model saw it, the preceding
    tokens of the same window and the position's own input, which a FlashHead scores exactly at
    greedy steps (:mod:`flashhead_mlx.recent`)."""
    n_tokens, seq_len = text_span(tokenizer, text, max_tokens, seq_len)
    contexts = windows(text_windows(tokenizer, text, n_tokens, seq_len), seq_len, size)
    return mx.flatten(contexts, 0, 1)[:n_tokens]
