"""Decode speed of the dense head against FlashHead on one model, in one process: mlx-lm's
``stream_generate``, runs alternated, medians reported.

    python examples/benchmark.py --model path/to/converted-folder [--max-tokens 128] [--runs 3]
"""

import argparse
import statistics

from flashhead_mlx import load, patch, stream_generate, unpatch


def decode_tokens_per_second(model, tokenizer, prompt: str, max_tokens: int) -> float:
    """mlx-lm's decode speed (tokens/s, prompt processing excluded) for one generation."""
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        pass
    return response.generation_tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A converted FlashHead folder or hub repo.")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    decode_tokens_per_second(model, tokenizer, args.prompt, args.max_tokens)  # warm up
    dense, flash = [], []
    for _ in range(args.runs):
        unpatch(model)
        dense.append(decode_tokens_per_second(model, tokenizer, args.prompt, args.max_tokens))
        patch(model)
        flash.append(decode_tokens_per_second(model, tokenizer, args.prompt, args.max_tokens))
    dense_tps, flash_tps = statistics.median(dense), statistics.median(flash)
    print(f"dense head: {dense_tps:.1f} tokens/s")
    print(f"FlashHead:  {flash_tps:.1f} tokens/s")
    print(f"speedup:    {flash_tps / dense_tps:.2f}x")


if __name__ == "__main__":
    main()
