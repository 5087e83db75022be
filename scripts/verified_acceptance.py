"""Acceptance rates of verified sampling, for choosing its proposal, on a converted model.

For each temperature, verified sampling (``flashhead_verify=K``) continues a few prompts (the
model's chat template); then, at every generated position, the exact acceptance probability
``sum_x min(p(x), q(x))`` (no Monte Carlo) of each proposal against mlx-lm's sampler on the
dense logits: ``tail`` (FlashHead's full-vocabulary sampler) and ``candidates`` (the sampler on
the candidates alone), at temperature only and with top-p 0.9 (where only ``candidates``
applies). Also the end-to-end rollbacks per 1000 tokens of the generations themselves.

    python scripts/verified_acceptance.py path/to/smollm2-flashhead --tokens 64 --block 8
"""

import argparse
import sys

import mlx.core as mx
import numpy as np

from flashhead_mlx.blas import reexec_with_openblas
from flashhead_mlx import decoding, flash_head, generate_step, load, make_sampler
from flashhead_mlx.acceptance import sampler_logits, tail_distribution
from flashhead_mlx.model_head import final_hidden_states
from flashhead_mlx.verified import log_softmax, set_verification

PROMPTS = [
    "Once upon a time",
    "The three laws of robotics are",
    "def add(a, b):",
    "Paris is",
    "My favourite recipe",
    "Explain why the sky is blue.",
]


def acceptance(p: mx.array, q: mx.array) -> np.ndarray:
    """``sum_x min(p(x), q(x))`` per row: the probability that the proposal is kept."""
    return np.array(mx.minimum(p, q).sum(axis=-1))


def measure(model, tokenizer, temperature: float, tokens: int, block: int, top_p: float) -> dict:
    """Per-position acceptance of each proposal, and the generations' rollbacks per 1000."""
    head = flash_head(model)
    rates = {"tail": [], "candidates": [], f"candidates, top_p={top_p}": []}
    runs, generated = {}, {}
    for name, settings in (
        ("temperature", make_sampler(temp=temperature)),
        (f"top_p={top_p}", make_sampler(temp=temperature, top_p=top_p)),
    ):
        set_verification(model, block)
        generated[name] = []
        for seed, text in enumerate(PROMPTS):
            messages = [{"role": "user", "content": text}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            mx.random.seed(seed)
            steps = generate_step(mx.array(prompt), model, max_tokens=tokens, sampler=settings)
            generated[name].append((prompt, [int(t) for t, _ in steps]))
        verification = head.verification
        runs[name] = 1000 * verification.rollbacks / verification.tokens
    for prompt, output in generated["temperature"]:
        ids = mx.array(prompt + output[:-1])[None]
        h = final_hidden_states(model, ids)[0, len(prompt) - 1 :]  # the head does not matter
        logprobs = log_softmax(head.dense_logits(h))
        with decoding([0.0]):
            sparse = log_softmax(head(h[None])[0])
        p = mx.softmax(logprobs / temperature, axis=-1)
        tail = tail_distribution(head, logprobs, head.cluster_scores(h), temperature)
        rates["tail"].append(acceptance(p, tail))
        rates["candidates"].append(acceptance(p, mx.softmax(sparse / temperature, axis=-1)))
        nucleus = make_sampler(temp=temperature, top_p=top_p)
        no_xtc = mx.array(False)
        p_top = mx.softmax(sampler_logits(nucleus, logprobs, no_xtc), axis=-1)
        q_top = mx.softmax(sampler_logits(nucleus, sparse, no_xtc), axis=-1)
        rates[f"candidates, top_p={top_p}"].append(acceptance(p_top, q_top))
    means = {name: float(np.concatenate(r).mean()) for name, r in rates.items()}
    return {"acceptance": means, "rollbacks_per_1000": runs}


def main() -> None:
    reexec_with_openblas([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="A converted FlashHead folder (with mass_bias).")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    parser.add_argument("--tokens", type=int, default=64, help="Tokens generated per prompt.")
    parser.add_argument("--block", type=int, default=8, help="K, tokens per dense check.")
    parser.add_argument("--top-p", type=float, default=0.9)
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    print(f"{args.model}: n_probes={flash_head(model).n_probes}, {len(PROMPTS)} prompts x "
          f"{args.tokens} tokens, K={args.block}")
    for temperature in args.temperatures:
        result = measure(model, tokenizer, temperature, args.tokens, args.block, args.top_p)
        rates = ", ".join(f"{k} {v:.3f}" for k, v in result["acceptance"].items())
        runs = ", ".join(f"{k} {v:.1f}" for k, v in result["rollbacks_per_1000"].items())
        print(f"T={temperature}: acceptance per position: {rates}")
        print(f"T={temperature}: verified sampling rollbacks per 1000 tokens: {runs}")


if __name__ == "__main__":
    main()
