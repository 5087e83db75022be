"""A chat loop with FlashHead: each line read from stdin is a user message, answered (streamed)
through the tokenizer's chat template with the whole conversation so far. Interactive in a
terminal; with stdin piped it answers every line and exits at the end of the input.

    python examples/chat.py --model path/to/converted-folder
    printf 'Hello!\nTell me more.\n' | python examples/chat.py --model path/to/converted-folder
"""

import argparse
import sys

from flashhead_mlx import load, make_sampler, stream_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A converted FlashHead folder or hub repo.")
    parser.add_argument("--max-tokens", type=int, default=256, help="Tokens per reply at most.")
    parser.add_argument("--temp", type=float, default=0.0, help="Sampling temperature (0: greedy).")
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    if tokenizer.chat_template is None:
        raise SystemExit(f"{args.model} has no chat template: use an instruct model")
    sampler = make_sampler(temp=args.temp)
    interactive = sys.stdin.isatty()
    messages = []
    while True:
        if interactive:
            print(">> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D)
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = ""
        for response in stream_generate(
            model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler
        ):
            print(response.text, end="", flush=True)
            reply += response.text
        print()
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    main()
