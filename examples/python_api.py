"""FlashHead from Python, the way an app uses mlx-lm: load, generate, stream, batch, sample,
and switch between FlashHead and the dense head at run time.

    python examples/python_api.py --model path/to/converted-folder
"""

import argparse

from flashhead_mlx import (
    batch_generate,
    flash_head,
    generate,
    load,
    make_sampler,
    patch,
    stream_generate,
    unpatch,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A converted FlashHead folder.")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    head = flash_head(model)
    print(f"FlashHead: {head.n_clusters} clusters of {head.cluster_size}, {head.n_probes} probes")

    greedy = generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens)
    print("greedy:", greedy)

    sampler = make_sampler(temp=0.7, top_p=0.9)  # FlashHead samples the full vocabulary
    for response in stream_generate(
        model, tokenizer, args.prompt, max_tokens=args.max_tokens, sampler=sampler
    ):
        print(response.text, end="", flush=True)
    print(f"\nsampled at {response.generation_tps:.1f} tokens/s")

    prompts = [tokenizer.encode(p) for p in (args.prompt, "Once upon a time")]
    batch = batch_generate(model, tokenizer, prompts, max_tokens=args.max_tokens)
    print("batch:", batch.texts)

    unpatch(model)  # the dense head, rows back in token order
    dense = generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens)
    print("dense:", dense)
    patch(model)  # FlashHead again
    print("greedy text identical to dense:", greedy == dense)


if __name__ == "__main__":
    main()
