"""Batch generation with FlashHead: several prompts decoded together by mlx-lm's
``batch_generate`` (every row of the batch gets its own probes).

    python examples/batch.py --model path/to/converted-folder --prompt "Hello" --prompt "Bonjour"
"""

import argparse

from flashhead_mlx import batch_generate, load

PROMPTS = ["It is a truth universally acknowledged", "Once upon a time", "The sea was calm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A converted FlashHead folder or hub repo.")
    parser.add_argument("--prompt", action="append", help="A prompt (repeat the flag for more).")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    prompts = args.prompt or PROMPTS
    if tokenizer.chat_template is not None:
        tokens = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts
        ]
    else:
        tokens = [tokenizer.encode(p) for p in prompts]
    result = batch_generate(model, tokenizer, tokens, max_tokens=args.max_tokens)
    for prompt, text in zip(prompts, result.texts):
        print(f"{prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
