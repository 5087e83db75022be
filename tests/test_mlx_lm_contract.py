"""Every name of mlx-lm that flashhead_mlx relies on, checked against the installed mlx-lm.

The decode route (``flashhead_mlx.generation``, ``sample_utils``, the ``generate`` and ``server``
commands) and the fallback (``flashhead_mlx.decode``, which reads mlx-lm's decode loops) use
functions, classes, attributes, locals and closure variables of mlx-lm. When mlx-lm renames one,
:func:`contract_breaks` names it, and this test fails loudly (the fallback itself then gives the
dense logits with a warning, never an error). It also checks that it can fail, on fake modules.
"""

import importlib
import inspect
import re
import types
from pathlib import Path

import mlx_lm
from packaging.specifiers import SpecifierSet

from flashhead_mlx import decode, generation, sample_utils

# Module-level names and attribute paths, by module.
NAMES = {
    "mlx_lm.generate": [
        # the route: run by name, subclassed, or given as defaults
        "generate_step", "speculative_generate_step", "stream_generate", "generate",
        "batch_generate", "BatchGenerator", "GenerationBatch", "GenerationBatch.next",
        "GenerationBatch.empty", "PromptProcessingBatch", "PromptProcessingBatch.prompt",
        "PromptProcessingBatch.generate", "PromptProcessingBatch.empty", "BatchResponse",
        "GenerationResponse", "generation_stream", "DEFAULT_QUANTIZED_KV_START",
        "maybe_quantize_kv_cache",
        # the generate command
        "main", "setup_arg_parser",
        # the fallback's decode loops
        *decode.MLX_LM_LOOPS,
    ],
    "mlx_lm.sample_utils": ["make_sampler", "make_logits_processors", "greedy_sampler"],
    # the server command swaps these module attributes for its run
    "mlx_lm.server": [
        "main", "argparse", "load", "BatchGenerator", "stream_generate", "make_sampler",
        "make_logits_processors",
    ],
    # loading.py (load, DEFAULT_ALLOW_PATTERNS) and the model file of the remote-code variant
    # (_get_classes, private to mlx-lm: guarded there with an error naming the version) use these.
    "mlx_lm.utils": ["load", "_get_classes", "DEFAULT_ALLOW_PATTERNS"],
    "mlx_lm.tokenizer_utils": ["TokenizerWrapper"],
}
# Globals that the functions the route and the generate command run with ours in their place
# (generation.with_globals) look up.
GLOBALS = {
    "mlx_lm.generate.stream_generate": ["generate_step", "speculative_generate_step"],
    "mlx_lm.generate.generate_step": ["maybe_quantize_kv_cache"],
    "mlx_lm.generate.speculative_generate_step": ["maybe_quantize_kv_cache"],
    "mlx_lm.generate.generate": ["stream_generate"],
    "mlx_lm.generate.batch_generate": ["BatchGenerator"],
    "mlx_lm.generate.main": ["setup_arg_parser", "load", "make_sampler", "generate"],
}
# Functions of the route whose signature is mlx-lm's (plus FlashHead's own ``flashhead_*``
# keyword arguments, e.g. ``generate_step``'s ``flashhead_verify``).
SIGNATURES = {
    "mlx_lm.generate.generate_step": generation.generate_step,
    "mlx_lm.generate.speculative_generate_step": generation.speculative_generate_step,
    "mlx_lm.generate.stream_generate": generation.stream_generate,
    "mlx_lm.generate.generate": generation.generate,
    "mlx_lm.generate.batch_generate": generation.batch_generate,
    "mlx_lm.generate.BatchGenerator.__init__": generation.BatchGenerator.__init__,
    "mlx_lm.sample_utils.make_sampler": sample_utils.make_sampler,
    "mlx_lm.sample_utils.make_logits_processors": sample_utils.make_logits_processors,
}


def real_modules() -> dict:
    return {name: importlib.import_module(name) for name in NAMES}


def lookup(modules: dict, path: str):
    """The object at ``path`` (``module.attr.attr``) among ``modules``, or ``None``."""
    module = max((m for m in modules if path.startswith(m + ".")), key=len)
    return decode.resolve(modules[module], path[len(module) + 1 :])


def parameters(fn) -> list:
    """``fn``'s parameters, FlashHead's own ``flashhead_*`` ones left out."""
    return [
        (p.name, p.kind, p.default)
        for p in inspect.signature(fn).parameters.values()
        if not p.name.startswith("flashhead_")
    ]


def closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def contract_breaks(modules: dict) -> list:
    """What of the contract the mlx-lm in ``modules`` (module name -> module) breaks."""
    breaks = [
        f"{module}.{path} is missing"
        for module, paths in NAMES.items()
        for path in paths
        if decode.resolve(modules[module], path) is None
    ]
    for path, names in GLOBALS.items():
        code = getattr(lookup(modules, path), "__code__", None)
        used = set(code.co_names) if code else set()
        breaks += [f"{path} no longer looks up the global {name}" for name in names if name not in used]
    for path, ours in SIGNATURES.items():
        theirs = lookup(modules, path)
        if theirs is not None and parameters(theirs) != parameters(ours):
            breaks.append(f"{path}'s signature changed: {inspect.signature(theirs)}")

    generate = modules["mlx_lm.generate"]
    for loop in ("generate_step", "speculative_generate_step"):
        code = getattr(getattr(generate, loop, None), "__code__", None)
        local = set(code.co_varnames + code.co_cellvars) if code else set()
        breaks += [
            f"mlx_lm.generate.{loop} has no local {name}"
            for name in decode.LOOP_LOCALS
            if name not in local
        ]

    sample = modules["mlx_lm.sample_utils"]
    greedy = getattr(sample, "greedy_sampler", None)
    batches = (getattr(generate, "GenerationBatch", None), getattr(generate, "PromptProcessingBatch", None))
    for batch_class in batches:
        if batch_class is None or greedy is None:
            continue
        batch = batch_class.empty(None, greedy)
        breaks += [
            f"mlx_lm.generate.{batch_class.__name__} has no attribute {name}"
            for name in decode.BATCH_ATTRIBUTES
            if not hasattr(batch, name)
        ]
    if getattr(generate, "BatchGenerator", None) is not None and None not in batches:
        generator = generate.BatchGenerator(None)
        for name, batch_class in zip(("_prompt_batch", "_generation_batch"), reversed(batches)):
            if not isinstance(getattr(generator, name, None), batch_class):
                breaks.append(f"mlx_lm.generate.BatchGenerator has no {name} ({batch_class.__name__})")
        generator.close()

    if getattr(sample, "make_sampler", None) is not None:
        sampler = sample.make_sampler(temp=0.5)
        qualname, variable = decode.SAMPLER_CLOSURE
        if sampler.__qualname__ != qualname or closure(sampler).get(variable) != 0.5:
            breaks.append(f"mlx_lm.sample_utils.make_sampler's sampler is not {qualname} over {variable}")
    if getattr(sample, "make_logits_processors", None) is not None:
        bias, *penalties = sample.make_logits_processors(
            {1: 1.0}, repetition_penalty=1.1, presence_penalty=0.1, frequency_penalty=0.1
        )
        qualname, variable = decode.LOGIT_BIAS_CLOSURE
        if bias.__qualname__ != qualname or variable not in closure(bias):
            breaks.append(f"mlx_lm.sample_utils.make_logits_processors' bias is not {qualname} over {variable}")
        if tuple(p.__qualname__ for p in penalties) != decode.PENALTY_PROCESSORS:
            breaks.append(f"mlx_lm's penalty processors are not {decode.PENALTY_PROCESSORS}")
    return breaks


def test_the_installed_mlx_lm_keeps_the_contract():
    breaks = contract_breaks(real_modules())
    assert not breaks, "mlx-lm changed:\n" + "\n".join(breaks)


def test_the_installed_mlx_lm_is_a_pinned_version():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    specifier = re.search(r'"mlx-lm([^"]*)"', pyproject).group(1)
    assert "<" in specifier, "pin mlx-lm to the minor versions tested"
    assert mlx_lm.__version__ in SpecifierSet(specifier), (mlx_lm.__version__, specifier)


def fake(module, **names):
    """A copy of ``module`` with ``names`` replaced (``None``: removed)."""
    copy = types.SimpleNamespace(**vars(module))
    for name, value in names.items():
        if value is None:
            delattr(copy, name)
        else:
            setattr(copy, name, value)
    return copy


def test_a_missing_name_is_reported():
    modules = real_modules()
    generate = modules["mlx_lm.generate"]

    class GenerationBatch(generate.GenerationBatch):
        _step = None  # renamed

    modules["mlx_lm.generate"] = fake(generate, speculative_generate_step=None, GenerationBatch=GenerationBatch)
    modules["mlx_lm.utils"] = fake(modules["mlx_lm.utils"], _get_classes=None)
    breaks = contract_breaks(modules)
    for path in ("speculative_generate_step", "GenerationBatch._step"):
        assert f"mlx_lm.generate.{path} is missing" in breaks
    assert "mlx_lm.utils._get_classes is missing" in breaks
    assert "mlx_lm.generate.speculative_generate_step has no local sampler" in breaks


def test_renamed_variables_are_reported():
    modules = real_modules()

    def generate_step(prompt, model, *, the_sampler=None, logits_processors=None):
        yield the_sampler, logits_processors  # ``sampler`` renamed

    def make_sampler(temp=0.0, **kwargs):
        temperature = temp  # ``temp`` renamed

        def sampler(logprobs):
            return logprobs / temperature

        return sampler

    modules["mlx_lm.generate"] = fake(modules["mlx_lm.generate"], generate_step=generate_step)
    modules["mlx_lm.sample_utils"] = fake(modules["mlx_lm.sample_utils"], make_sampler=make_sampler)
    breaks = contract_breaks(modules)
    assert "mlx_lm.generate.generate_step has no local sampler" in breaks
    assert any(b.startswith("mlx_lm.generate.generate_step's signature changed") for b in breaks)
    assert any(b.startswith("mlx_lm.sample_utils.make_sampler's sampler is not") for b in breaks)
