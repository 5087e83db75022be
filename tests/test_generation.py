"""FlashHead's decode route (``flashhead_mlx.generate``, ``stream_generate``, ``batch_generate``,
``BatchGenerator``, ``make_sampler``) against the dense head and against the fallback (mlx-lm's
own functions, whose decode loops the head finds among its callers), and the fallback's
failures: never an exception, the dense logits, a warning once."""

import contextlib
import warnings

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm import sample_utils as mlx_sample_utils

import flashhead_mlx
from conftest import make_clusters, make_tiny_model
from flashhead_mlx import decode, generation
from flashhead_mlx.assets import make_assets
from flashhead_mlx.head import FlashHead
from flashhead_mlx.model_head import final_hidden_states, head_module, head_rows
from flashhead_mlx.patch import apply_flashhead, flash_head
from flashhead_mlx.sampling import fit_mass_bias

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 999]])
PROMPTS = ["It is a truth", "a single man in possession", "must be in want"]
N_PROBES = 6
MLX_GENERATE = generation.MLX_GENERATE  # mlx_lm.generate, the module


def flash_model(folder, n_probes, dense):
    model, _ = mlx_lm.load(str(folder))
    apply_flashhead(model, make_assets(make_clusters(np.array(head_rows(head_module(model)))), n_probes))
    head = flash_head(model)
    head.mass_bias = fit_mass_bias(head, final_hidden_states(dense, mx.arange(1000)[None]))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama: dense, FlashHead with few probes (full-vocabulary sampling), all probes."""
    folder = make_tiny_model(tmp_path_factory.mktemp("llama") / "m")
    dense, tokenizer = mlx_lm.load(str(folder))
    few = flash_model(folder, N_PROBES, dense)
    every = flash_model(folder, flash_head(few).n_clusters, dense)
    return dense, few, every, tokenizer


@pytest.fixture
def warned(monkeypatch):
    """A fresh set of given warnings, and every warning recorded."""
    monkeypatch.setattr(decode, "_warned", set())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield records


def no_fallback(frame):
    pytest.fail("a head call outside the route's decode context consulted the fallback")


@contextlib.contextmanager
def route_only():
    """Any head call that the route did not tell its context fails the test."""
    fallback = decode._fallback_context
    decode._fallback_context = no_fallback
    try:
        yield
    finally:
        decode._fallback_context = fallback


def steps(generator):
    """The tokens and log-probabilities of a generate_step generator."""
    return [(int(token), np.array(logprobs)) for token, logprobs in generator]


def assert_same_steps(actual, expected):
    assert [t for t, _ in actual] == [t for t, _ in expected]
    for (_, a), (_, e) in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


def test_route_at_all_probes_is_dense(models):
    dense, _, every, tokenizer = models
    for prompt in PROMPTS[:2]:
        with route_only():
            text = flashhead_mlx.generate(every, tokenizer, prompt, max_tokens=10)
            speculative = "".join(r.text for r in flashhead_mlx.stream_generate(
                every, tokenizer, prompt, max_tokens=10, draft_model=every, num_draft_tokens=3
            ))
        assert text == speculative == mlx_lm.generate(dense, tokenizer, prompt, max_tokens=10)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    with route_only():
        batch = flashhead_mlx.batch_generate(
            every, tokenizer, prompts, max_tokens=8, return_token_ids=True
        )
    expected = mlx_lm.batch_generate(dense, tokenizer, prompts, max_tokens=8, return_token_ids=True)
    assert batch.token_ids == expected.token_ids


@pytest.mark.parametrize(
    "settings",
    [dict(temp=0.0), dict(temp=0.7, top_p=0.9), dict(temp=1.3, top_k=40)],
    ids=["greedy", "top-p", "top-k"],
)
def test_route_matches_the_fallback(models, settings):
    """The same head calls with the same settings: the same tokens and log-probabilities, draw
    for draw; sampling draws from more than the candidates."""
    _, model, _, tokenizer = models
    prompt = mx.array(tokenizer.encode(PROMPTS[0]))
    mx.random.seed(3)
    with route_only():
        route = steps(flashhead_mlx.generate_step(
            prompt, model, max_tokens=8, sampler=flashhead_mlx.make_sampler(**settings)
        ))
    mx.random.seed(3)
    fallback = steps(MLX_GENERATE.generate_step(
        prompt, model, max_tokens=8, sampler=mlx_sample_utils.make_sampler(**settings)
    ))
    assert_same_steps(route, fallback)
    head = flash_head(model)
    finite = {int(np.isfinite(logprobs).sum()) for _, logprobs in route}
    candidates = head.n_probes * head.cluster_size
    if settings["temp"]:
        assert min(finite) > candidates
    else:  # the candidates and the recent tokens
        assert max(finite) <= candidates + head.recent_tokens


def test_route_raises_biased_tokens(models):
    _, model, _, tokenizer = models
    prompt = mx.array(tokenizer.encode(PROMPTS[2]))
    [(_, logprobs)] = steps(flashhead_mlx.generate_step(prompt, model, max_tokens=1))
    outside = int(np.flatnonzero(np.isneginf(logprobs))[0])
    processors = flashhead_mlx.make_logits_processors(logit_bias={outside: 1000.0})
    assert processors[0].biased_tokens == (outside,)
    with route_only():
        [(token, _)] = steps(flashhead_mlx.generate_step(
            prompt, model, max_tokens=1, logits_processors=processors
        ))
    assert token == outside


def test_batch_matches_the_fallback(models):
    _, model, _, tokenizer = models
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    options = dict(max_tokens=[4, 9, 6], return_token_ids=True, return_logprobs=True)
    mx.random.seed(5)
    with route_only():
        route = flashhead_mlx.batch_generate(
            model, tokenizer, prompts, sampler=flashhead_mlx.make_sampler(0.8), **options
        )
    mx.random.seed(5)
    fallback = mlx_lm.batch_generate(
        model, tokenizer, prompts, sampler=mlx_sample_utils.make_sampler(0.8), **options
    )
    assert route.token_ids == fallback.token_ids
    assert route.logprobs == fallback.logprobs


def run_batch(generator_class, model, prompts, samplers, max_tokens):
    """Generate with ``generator_class``: each row's tokens and log-probabilities."""
    generator = generator_class(model, stop_tokens=[])
    uids = generator.insert(prompts, max_tokens, samplers=samplers)
    rows = {uid: [] for uid in uids}
    while responses := generator.next_generated():
        for r in responses:
            rows[r.uid].append((r.token, np.array(r.logprobs)))
    generator.close()
    return [rows[uid] for uid in uids]


def test_batch_rows_get_their_own_temperatures(models, monkeypatch):
    """Rows at different temperatures that come and go: each head call is told the temperatures
    of exactly its rows, in their order; greedy rows equal single greedy rows."""
    _, model, _, tokenizer = models
    contexts = []
    decode_logits = FlashHead.decode_logits

    def recording(self, h, context):
        contexts.append(context.temperatures)
        return decode_logits(self, h, context)

    monkeypatch.setattr(FlashHead, "decode_logits", recording)
    temperatures, max_tokens = [0.0, 0.7, 1.3, 0.0], [3, 9, 5, 7]
    prompts = [tokenizer.encode(p) for p in PROMPTS + ["in want of a wife"]]
    with route_only():
        route = run_batch(
            generation.BatchGenerator, model, prompts,
            [flashhead_mlx.make_sampler(t) for t in temperatures], max_tokens,
        )
    decoded = [c for c in contexts if c is not None]
    expected = [(0.0, 0.7, 1.3, 0.0), (0.7, 1.3, 0.0), (0.7, 0.0), (0.7,)]
    assert sorted(set(decoded), key=len, reverse=True) == expected
    assert decoded == sorted(decoded, key=len, reverse=True)  # rows only leave

    contexts.clear()
    run_batch(
        MLX_GENERATE.BatchGenerator, model, prompts,
        [mlx_sample_utils.make_sampler(t) for t in temperatures], max_tokens,
    )
    assert [c for c in contexts if c is not None] == decoded  # the fallback sees the same

    head = flash_head(model)
    candidates = head.n_probes * head.cluster_size
    for row, temperature, n in zip(route, temperatures, max_tokens):
        assert len(row) == n
        finite = [int(np.isfinite(logprobs).sum()) for _, logprobs in row]
        recent = 0 if temperature else head.recent_tokens  # greedy rows: their recent tokens
        assert min(finite) > candidates if temperature else max(finite) <= candidates + recent
    for i in (0, 3):
        prompt = mx.array(prompts[i])
        single = steps(flashhead_mlx.generate_step(prompt, model, max_tokens=max_tokens[i]))
        assert [t for t, _ in route[i]] == [t for t, _ in single]


def test_context_does_not_leak_across_yields(models):
    """Between two steps the caller's own model calls are exact, as is the caller's context."""
    dense, model, _, tokenizer = models
    reference = np.array(dense(TOKENS)), np.array(dense(TOKENS[:, :1]))
    sampler = flashhead_mlx.make_sampler(0.7)

    def assert_dense_here():
        assert decode._CONTEXT.get() is decode._UNSET
        np.testing.assert_array_equal(np.array(model(TOKENS)), reference[0])
        np.testing.assert_array_equal(np.array(model(TOKENS[:, :1])), reference[1])

    prompt = mx.array(tokenizer.encode(PROMPTS[0]))
    for _ in flashhead_mlx.generate_step(prompt, model, max_tokens=3, sampler=sampler):
        assert_dense_here()
    for _ in flashhead_mlx.stream_generate(
        model, tokenizer, PROMPTS[1], max_tokens=4, draft_model=dense, sampler=sampler
    ):
        assert_dense_here()
    generator = generation.BatchGenerator(model, stop_tokens=[], sampler=sampler)
    generator.insert([tokenizer.encode(p) for p in PROMPTS], [3, 3, 3])
    while generator.next_generated():
        assert_dense_here()
    generator.close()


def test_fallback_warns_once_for_a_custom_sampler(models, warned):
    """A sampler whose temperature cannot be read: dense logits at every step, one warning."""
    dense, model, _, tokenizer = models
    prompt = mx.array(tokenizer.encode(PROMPTS[0]))

    def custom(logprobs):
        return mx.argmax(logprobs, axis=-1)

    expected = steps(MLX_GENERATE.generate_step(prompt, dense, max_tokens=4))
    for _ in range(2):
        actual = steps(MLX_GENERATE.generate_step(
            prompt, model, max_tokens=4, sampler=custom
        ))
        assert [t for t, _ in actual] == [t for t, _ in expected]
        assert all(np.isfinite(logprobs).all() for _, logprobs in actual)
    messages = [str(w.message) for w in warned]
    assert len(messages) == 1 and "cannot read the temperature of the sampler" in messages[0]

    custom.temperature = 0.0  # the attribute is read first
    actual = steps(MLX_GENERATE.generate_step(
        prompt, model, max_tokens=4, sampler=custom
    ))
    assert not all(np.isfinite(logprobs).all() for _, logprobs in actual)
    assert len(warned) == 1


def test_route_warns_once_for_a_custom_processor(models, warned):
    _, model, _, tokenizer = models
    prompt = mx.array(tokenizer.encode(PROMPTS[0]))

    def custom(tokens, logits):
        return logits

    for _ in range(2):
        actual = steps(flashhead_mlx.generate_step(
            prompt, model, max_tokens=3, logits_processors=[custom]
        ))
        assert all(np.isfinite(logprobs).all() for _, logprobs in actual)
    messages = [str(w.message) for w in warned]
    assert len(messages) == 1 and "logits processor" in messages[0]


def test_missing_mlx_lm_loop_gives_dense_logits(models, monkeypatch, warned):
    """mlx-lm without ``generate_step`` (renamed): its loop, called directly, scores densely."""
    dense, model, _, tokenizer = models
    original = MLX_GENERATE.generate_step
    monkeypatch.delattr(generation.MLX_GENERATE, "generate_step")
    prompt = mx.array(tokenizer.encode(PROMPTS[1]))
    expected = steps(original(prompt, dense, max_tokens=4))
    for _ in range(2):
        actual = steps(original(prompt, model, max_tokens=4))
        assert_same_steps(actual, expected)
    messages = [str(w.message) for w in warned]
    assert len(messages) == 1 and "mlx_lm.generate.generate_step" in messages[0]


def test_renamed_local_gives_dense_logits(models, monkeypatch, warned):
    """A decode loop whose settings cannot be read (a renamed local): dense, a warning once."""
    dense, model, _, tokenizer = models
    monkeypatch.setattr(decode, "LOOP_LOCALS", ("sampler", "renamed_processors"))
    generate_step = MLX_GENERATE.generate_step
    prompt = mx.array(tokenizer.encode(PROMPTS[1]))
    expected = steps(generate_step(prompt, dense, max_tokens=3))
    for _ in range(2):
        assert_same_steps(steps(generate_step(prompt, model, max_tokens=3)), expected)
    messages = [str(w.message) for w in warned]
    assert len(messages) == 1 and "renamed_processors" in messages[0]


def test_samplers_and_processors_are_mlx_lms_with_attributes():
    logits = mx.random.normal((2, 300), key=mx.random.key(0))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for settings in (dict(temp=0.0), dict(temp=0.9, top_p=0.8, min_p=0.05, top_k=50)):
        sampler = flashhead_mlx.make_sampler(**settings)
        assert sampler.temperature == settings["temp"]
        assert sampler.top_k == settings.get("top_k", 0)
        mx.random.seed(1)
        ours = sampler(logprobs)
        mx.random.seed(1)
        theirs = mlx_sample_utils.make_sampler(**settings)(logprobs)
        np.testing.assert_array_equal(np.array(ours), np.array(theirs))
    settings = dict(logit_bias={3: 2.0, 7: -1.0}, repetition_penalty=1.3, presence_penalty=0.5)
    ours = flashhead_mlx.make_logits_processors(**settings)
    theirs = mlx_sample_utils.make_logits_processors(**settings)
    assert [p.biased_tokens for p in ours] == [(3, 7), (), ()]
    tokens = mx.array([3, 5, 5])
    for a, b in zip(ours, theirs):  # (penalties write into the logits they are given)
        np.testing.assert_array_equal(
            np.array(a(tokens, logprobs + 0)), np.array(b(tokens, logprobs + 0))
        )


def test_the_package_exports_mlx_lms_names():
    """``from flashhead_mlx import generate`` is the function, even after the command modules
    that share the generate command's helpers are imported."""
    import flashhead_mlx.bench  # noqa: F401
    import flashhead_mlx.server  # noqa: F401

    for name in ("generate", "stream_generate", "batch_generate", "generate_step"):
        assert getattr(flashhead_mlx, name) is getattr(generation, name)
    assert flashhead_mlx.make_sampler(0.5).temperature == 0.5


def test_the_decode_context_says_whether_rows_have_logits_processors():
    """Only rows read to have no logits processors let the dense switch keep one cluster
    (FlashHead.dense_greedy_logits); a context made without reading them assumes some."""
    greedy = mlx_sample_utils.make_sampler(0.0)
    assert decode.settings_context([greedy, greedy], [[], None]).processors is False
    penalty = mlx_sample_utils.make_logits_processors(repetition_penalty=1.3)
    assert decode.settings_context([greedy, greedy], [[], penalty]).processors is True
    assert decode.make_context([0.0]).processors is True
