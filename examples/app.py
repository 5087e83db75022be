"""A minimal app with FlashHead: load the model once, stream a reply token by token, and switch
FlashHead off (the dense head) and on again at run time.

    python examples/app.py --model path/to/converted-folder --prompt "Once upon a time"
"""

import argparse

from flashhead_mlx import load, patch, stream_generate, unpatch


def stream(model, tokenizer, prompt: str, max_tokens: int) -> None:
    """Print the reply to ``prompt`` as it is generated, then its decode speed."""
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        print(response.text, end="", flush=True)
    print(f"\n({response.generation_tps:.1f} tokens/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A converted FlashHead folder or hub repo.")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = load(args.model)  # once: FlashHead installed
    print("== FlashHead ==")
    stream(model, tokenizer, args.prompt, args.max_tokens)

    unpatch(model)  # FlashHead off: the dense head
    print("== dense ==")
    stream(model, tokenizer, args.prompt, args.max_tokens)
    patch(model)  # and on again


if __name__ == "__main__":
    main()
