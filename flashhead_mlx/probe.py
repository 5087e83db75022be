"""How a model computes its logits, found by running it rather than by its architecture's name.

The model's forward pass runs on a few tokens with a spy in place of each module that has as many
rows as the logits have columns (an ``lm_head``, an ``output``, a tied ``embed_tokens`` or
``wte``, inside a ``language_model`` or not). The head is the module whose last call's output
reaches the logits: its output is replaced by known values, and what the forward pass returns is
matched, bit for bit, against the transforms FlashHead knows (:mod:`flashhead_mlx.transform`:
none, a softcap, a multiplication or a division by a constant). A model FlashHead cannot serve
exactly raises :class:`Unsupported`, whose message says why: logits computed from a weight with
no module call to take over (``h @ embed_tokens.weight.T``), a head with a bias, a head module of
another kind, or a post-head computation that is not one of those transforms.
"""

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .transform import Transform

# The modules FlashHead takes over: a linear head (called) and a tied embedding (as_linear).
LINEAR_HEADS = (nn.Linear, nn.QuantizedLinear)
EMBEDDING_HEADS = (nn.Embedding, nn.QuantizedEmbedding)
# The probe's input: a few token ids every vocabulary has.
PROBE_TOKENS = (1, 2, 3, 4)
# The attribute of a probed model that keeps its probe.
PROBE_ATTRIBUTE = "flashhead_probe"


class Unsupported(ValueError):
    """FlashHead cannot serve this model's head exactly; the message says why."""


@dataclass(frozen=True)
class HeadProbe:
    """What probing found: the head module's ``path`` in the model (``"lm_head"``,
    ``"language_model.model.embed_tokens"``), whether it is a ``tied`` embedding whose
    ``as_linear`` is the head, the ``transform`` the model applies to its output (``None``:
    returned as is), the head module's ``body_calls`` before the head's own (a tied embedding the
    body also scores with), and whether the body ``lm.model`` returns the head's input
    (``body_is_model``; else :func:`flashhead_mlx.model_head.final_hidden_states` runs the whole
    forward pass)."""

    path: str
    tied: bool
    transform: Optional[Transform]
    body_calls: int
    body_is_model: bool

    def describe(self) -> str:
        """E.g. ``lm_head, x / 8`` or ``model.embed_tokens.as_linear, no transform``."""
        head = f"{self.path}.as_linear" if self.tied else self.path
        return f"{head}, {self.transform or 'no transform'}"

    def config(self) -> dict:
        """The ``head`` entry of a converted folder's ``flashhead`` section (docs/format.md):
        ``path``, ``tied``, ``transform`` (``{"kind": ..., "value": ...}`` or ``None``) and
        ``body_calls``, for the model file's fallback, which cannot probe."""
        transform = self.transform
        return {
            "path": self.path,
            "tied": self.tied,
            "transform": None if transform is None else {"kind": transform.kind,
                                                         "value": transform.value},
            "body_calls": self.body_calls,
        }


class Spy:
    """Stands in for the module at ``path``: records each head call's input (``__call__`` of a
    linear head, ``as_linear`` of an embedding) and returns its module's output, or
    ``replacement`` at call ``replace_at``; embedding lookups and attributes go to the module."""

    def __init__(self, module: nn.Module, tied: bool):
        self.module, self.tied = module, tied
        self.inputs: List[mx.array] = []
        self.weight_reads = 0
        self.replace_at: Optional[int] = None
        self.replacement: Optional[mx.array] = None

    def _head(self, h: mx.array) -> mx.array:
        out = self.module.as_linear(h) if self.tied else self.module(h)
        self.inputs.append(h)
        if len(self.inputs) - 1 == self.replace_at:
            return self.replacement
        return out

    def __call__(self, x: mx.array) -> mx.array:
        return self.module(x) if self.tied else self._head(x)

    def as_linear(self, h: mx.array) -> mx.array:
        return self._head(h)

    def __getattr__(self, name: str) -> Any:
        if name == "weight":
            self.weight_reads += 1
        return getattr(self.module, name)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` (``"a.b.0.c"``) in ``model``."""
    module = model
    for part in path.split("."):
        module = module[int(part)] if isinstance(module, list) else module[part]
    return module


def set_module(model: nn.Module, path: str, module: Any) -> None:
    """Put ``module`` at ``path`` in ``model`` (in place of what is there)."""
    *parents, last = path.split(".")
    parent = get_module(model, ".".join(parents)) if parents else model
    parent[int(last) if isinstance(parent, list) else last] = module


def _forward(model: nn.Module, tokens: mx.array) -> mx.array:
    out = model(tokens)
    if not isinstance(out, mx.array):
        raise Unsupported(f"the forward pass returns a {type(out).__name__}, not the logits")
    mx.eval(out)
    return out


def _candidates(model: nn.Module, vocab_size: int) -> List[Tuple[str, nn.Module]]:
    """Modules whose weight has ``vocab_size`` rows, each once, by path."""
    seen, found = set(), []
    for path, module in model.named_modules():
        weight = module.get("weight") if isinstance(module, nn.Module) else None
        if isinstance(weight, mx.array) and weight.ndim == 2 and weight.shape[0] == vocab_size:
            if id(module) not in seen:
                seen.add(id(module))
                found.append((path, module))
    return found


def _probe_values(like: mx.array, seed: int) -> mx.array:
    """Values to return in place of the head's output: ``1``, huge ones (a softcap saturates
    there), ``0`` and random ones of both signs, in ``like``'s shape and dtype."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 20.0, like.shape)
    values[..., :5] = (1.0, 1e30, 2e30, -1e30, 0.0)
    return mx.array(values.astype(np.float32)).astype(like.dtype)


def _float_neighbours(value: float) -> List[float]:
    """``value`` and its nearest float32 neighbours (a constant recovered through a division)."""
    x = np.float32(value)
    up, down = [x], [x]
    for _ in range(4):
        up.append(np.nextafter(up[-1], np.float32(np.inf)))
        down.append(np.nextafter(down[-1], np.float32(-np.inf)))
    return [float(v) for v in dict.fromkeys(up + down[1:])]


def identify_transform(pairs: List[Tuple[mx.array, mx.array]]) -> Optional[Transform]:
    """The transform ``f`` with ``f(z) == y`` bit for bit for every ``(z, y)`` of ``pairs``
    (``z`` from :func:`_probe_values`); ``None`` for the identity. Raises :class:`Unsupported`
    when none of :mod:`flashhead_mlx.transform`'s fits."""

    def fits(f) -> bool:
        return all(f(z).dtype == y.dtype and np.array_equal(np.array(f(z)), np.array(y))
                   for z, y in pairs)

    if fits(lambda z: z):
        return None
    z, y = pairs[0]
    one, huge, huger = (float(v) for v in y.reshape(-1, y.shape[-1])[0, :3].astype(mx.float32))
    guesses = []
    if huge == huger and np.isfinite(huge):
        guesses.append(("softcap", huge))
    if one != 0 and np.isfinite(one):
        guesses.append(("multiply", one))
        guesses += [("divide", c) for c in _float_neighbours(1.0 / one)]
    for kind, value in guesses:
        if value <= 0:
            raise Unsupported(
                f"the logits decrease as the head's output grows ({kind} by {value:g}), so "
                "the best candidates are not the highest-scoring rows"
            )
        transform = Transform(kind, value)
        if fits(transform):
            return transform
    raise Unsupported(
        "the model changes the head's output in a way FlashHead cannot reproduce exactly (it "
        "knows a softcap tanh(x / c) * c, x * c and x / c)"
    )


def _check_module(path: str, module: nn.Module, tied: bool) -> None:
    kinds = EMBEDDING_HEADS if tied else LINEAR_HEADS
    if type(module) not in kinds:
        names = ", ".join(k.__name__ for k in kinds)
        raise Unsupported(f"the head {path} is a {type(module).__name__} (FlashHead takes {names})")
    if "bias" in module:
        raise Unsupported(f"the head {path} has a bias, which FlashHead does not score")


def _locate(model, tokens, reference) -> Tuple[str, nn.Module, Spy, Optional[Transform]]:
    """The head: the spied module whose last call's output reaches the logits, and how."""
    spies = {}
    for path, module in _candidates(model, reference.shape[-1]):
        spies[path] = (module, Spy(module, isinstance(module, EMBEDDING_HEADS)))
    if not spies:
        raise Unsupported(f"no module has the {reference.shape[-1]} rows of the logits")

    def run(path: Optional[str] = None, replacement: Optional[mx.array] = None) -> mx.array:
        """The forward pass with every spy in place, ``path``'s last call (as counted by the
        first run) returning ``replacement``."""
        for module, spy in spies.values():
            spy.inputs, spy.weight_reads, spy.replace_at = [], 0, None
        if path is not None:
            spy = spies[path][1]
            spy.replace_at, spy.replacement = calls[path] - 1, replacement
        for p, (_, spy) in spies.items():
            set_module(model, p, spy)
        try:
            return _forward(model, tokens)
        finally:
            for p, (module, _) in spies.items():
                set_module(model, p, module)

    calls: dict = {}
    run()
    calls.update((path, len(spy.inputs)) for path, (_, spy) in spies.items())
    read = [path for path, (_, spy) in spies.items() if spy.weight_reads]
    for path, (module, spy) in spies.items():
        if not calls[path]:
            continue
        run()
        h = spy.inputs[-1]
        real = spy.module.as_linear(h) if spy.tied else spy.module(h)
        pairs = []
        for seed in (0, 1):
            z = _probe_values(real, seed)
            y = run(path, z)
            if y.shape != z.shape:
                break
            pairs.append((z, y))
        if len(pairs) < 2 or np.array_equal(np.array(pairs[0][1]), np.array(pairs[1][1])):
            continue  # this module's output does not reach the logits
        transform = identify_transform(pairs + [(real, reference)])
        return path, module, spy, transform
    if read:
        raise Unsupported(
            f"the logits are computed from {read[0]}.weight (h @ weight.T), with no module "
            "call that FlashHead can take over"
        )
    raise Unsupported(
        "no module's output reaches the logits unchanged or through a transform (a weight "
        "array multiplied directly?)"
    )


def probe_head(model: nn.Module) -> HeadProbe:
    """How ``model`` computes its logits (probed once, then kept on the model). Raises
    :class:`Unsupported` with the reason when FlashHead cannot serve its head exactly."""
    known = model.__dict__.get(PROBE_ATTRIBUTE)
    if known is not None:
        return known
    tokens = mx.array([PROBE_TOKENS])
    try:
        reference = _forward(model, tokens)
    except Unsupported:
        raise
    except Exception as e:  # noqa: BLE001 (whatever the model raises, said in the reason)
        raise Unsupported(f"its forward pass on token ids [1, L] fails: {e}") from e
    if reference.ndim != 3 or reference.shape[:2] != tokens.shape:
        raise Unsupported(f"the forward pass returns shape {reference.shape}, not [B, L, V]")
    path, module, spy, transform = _locate(model, tokens, reference)
    tied = spy.tied
    _check_module(path, module, tied)
    lm = getattr(model, "language_model", model)
    body = lm.get("model") if isinstance(lm, nn.Module) else None
    body_is_model = False
    if isinstance(body, nn.Module):
        try:
            hidden = body(tokens)
            body_is_model = isinstance(hidden, mx.array) and np.array_equal(
                np.array(hidden), np.array(spy.inputs[-1])
            )
        except Exception:  # noqa: BLE001 (a body that needs more arguments)
            body_is_model = False
    probe = HeadProbe(path, tied, transform, len(spy.inputs) - 1, body_is_model)
    model.__dict__[PROBE_ATTRIBUTE] = probe
    return probe
