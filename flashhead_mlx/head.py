"""FlashHead: a two-stage retrieval classification head.

Stage 1 scores a hidden state against one centroid per cluster (stored quantized; on the CPU
multiplied as float32, :func:`stage1_float32`) and keeps the ``n_probes`` best clusters; stage 2
scores the rows of those clusters exactly. The head's rows are stored once, in cluster order
(cluster ``k`` owns slots ``[k * cluster_size, (k + 1) * cluster_size)``), at the model's own
precision: permuting whole rows keeps every quantization group intact, so each candidate logit
is the dense logit. Padding slots (when the vocabulary is not a multiple of ``cluster_size``)
have token id -1 and logit ``-inf``.
"""

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .decode import DecodeContext, decode_context, temperature_array
from .forward import head_outputs
from .kernels import (
    best_token,
    choose_batch_path,
    cluster_scores,
    cluster_slots,
    float32_centroids,
    gathered_logits,
    record,
    row_logits,
    selftest,
    slot_tokens,
    top_clusters,
)
from .recent import RECENT_TOKENS, recent_tokens
from .transform import Transform, apply
from .sampling import full_vocabulary_logits


def stage1_float32(device: mx.Device) -> bool:
    """Whether a FlashHead on ``device`` multiplies float32 centroids in stage 1, dequantized
    once at load: on the CPU, where MLX's quantized matmul is slow (Gemma-3-270M's 16384
    centroids: several times a float32 matmul's time from B = 2 on) and so are its float16 and
    bfloat16 matmuls; elsewhere (Metal, whose kernels read the packed format, and CUDA) it keeps
    the stored format."""
    return device.type == mx.cpu


class FlashHead(nn.Module):
    """A classification head that scores only the rows of the ``n_probes`` best clusters.

    Args:
        assets (dict): the clusters, as made by :func:`flashhead_mlx.assets.make_assets` or
            read by :func:`flashhead_mlx.assets.load_assets`: ``order`` (token id of each slot,
            -1 for padding), ``centroids`` (packed when ``centroid_bits`` is set, with
            ``centroid_scales`` and ``centroid_biases``), ``cluster_bias``, optional
            ``mass_bias``, and the ints ``cluster_size``, ``n_probes``, ``centroid_bits``,
            ``centroid_group_size``.
        weight (mx.array): the head's rows ``[V, d]`` in token order, float or packed.
        scales, biases (mx.array, optional): quantization scales and biases of ``weight``.
        group_size, bits (int, optional): quantization of ``weight``. Default: ``None``.
        mode (str): quantization mode of ``weight``. Default: ``"affine"``.
        n_probes (int, optional): clusters scored exactly per token. Default: the assets'.
        transform (Transform, optional): what the model does to the head's logits before
            returning them (:mod:`flashhead_mlx.transform`: a softcap, a scale), which the
            FlashHead applies itself. Default: ``None``.
        recent_tokens (int): tokens of each row's context also scored exactly at greedy decode
            steps (:mod:`flashhead_mlx.recent`).
            Default: :data:`~flashhead_mlx.recent.RECENT_TOKENS`.
        device (mx.Device, optional): the device the head runs on, which sets the centroids'
            format in stage 1 (:func:`stage1_float32`): on the CPU the head also holds
            ``stage1_centroids``, float32 (the stored arrays are kept as they are, for
            :func:`flashhead_mlx.patch.head_assets`). Default: ``mx.default_device()``.
    """

    def __init__(
        self,
        assets: dict,
        weight: mx.array,
        scales: Optional[mx.array] = None,
        biases: Optional[mx.array] = None,
        group_size: Optional[int] = None,
        bits: Optional[int] = None,
        mode: str = "affine",
        n_probes: Optional[int] = None,
        transform: Optional[Transform] = None,
        recent_tokens: int = RECENT_TOKENS,
        device: Optional[mx.Device] = None,
    ):
        super().__init__()
        order = assets["order"].astype(mx.int32)
        self.vocab_size = weight.shape[0]
        self.cluster_size = int(assets["cluster_size"])
        self.n_clusters = order.size // self.cluster_size
        self.n_probes = int(assets["n_probes"] if n_probes is None else n_probes)
        if not 1 <= self.n_probes <= self.n_clusters:
            raise ValueError(f"n_probes must be in [1, {self.n_clusters}], got {self.n_probes}")
        if order.size != self.n_clusters * self.cluster_size or order.size < self.vocab_size:
            raise ValueError(
                f"order has {order.size} slots, which cannot hold {self.vocab_size} tokens "
                f"in clusters of {self.cluster_size}"
            )

        # Rows in cluster order; padding slots copy row 0 and are masked to -inf when scored.
        rows = mx.maximum(order, 0)
        self.weight = mx.take(weight, rows, axis=0)
        self.group_size, self.bits, self.mode = group_size, bits, mode
        if scales is not None:
            self.scales = mx.take(scales, rows, axis=0)
            self.biases = None if biases is None else mx.take(biases, rows, axis=0)
        dtype = weight.dtype if scales is None else scales.dtype

        self.order = order
        # Sorting puts the padding slots (-1) first, then the slot of each token 0..V-1.
        self.inverse = mx.argsort(order)[order.size - self.vocab_size :].astype(mx.int32)
        # Whether some slots hold no token (-1 in order).
        self.padded = order.size > self.vocab_size
        self.centroid_bits = assets["centroid_bits"]
        self.centroid_group_size = assets["centroid_group_size"]
        float32 = stage1_float32(device or mx.default_device())
        if self.centroid_bits is None:
            self.centroids = assets["centroids"].astype(mx.float32 if float32 else dtype)
        else:
            self.centroids = assets["centroids"]
            self.centroid_scales = assets["centroid_scales"].astype(dtype)
            self.centroid_biases = assets["centroid_biases"].astype(dtype)
            if float32:
                self.stage1_centroids = float32_centroids(
                    self.centroids, self.centroid_scales, self.centroid_biases,
                    self.centroid_group_size, self.centroid_bits,
                )
        self.cluster_bias = assets["cluster_bias"].astype(dtype)
        mass_bias = assets.get("mass_bias")
        self.mass_bias = None if mass_bias is None else mass_bias.astype(mx.float32)
        self.transform = transform
        if recent_tokens < 0:
            raise ValueError(f"recent_tokens must be >= 0, got {recent_tokens}")
        self.recent_tokens = recent_tokens
        # Verified decoding's default K and its latest K and counts
        # (flashhead_mlx.verified.Verification), or None.
        self.verification = None
        # How a decode step (and stage 2) scores a batch of rows
        # (flashhead_mlx.kernels.BATCH_PATHS); None: the measured choice
        # (flashhead_mlx.kernels.choose_batch_path).
        self.batch_path = None
        self.freeze()

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        assets: dict,
        n_probes: Optional[int] = None,
        transform: Optional[Transform] = None,
        recent_tokens: int = RECENT_TOKENS,
    ) -> "FlashHead":
        """Build from the model's ``lm_head`` or tied ``embed_tokens`` (float or quantized)."""
        quantized = "scales" in module
        return cls(
            assets,
            module.weight,
            scales=module.scales if quantized else None,
            biases=module.get("biases") if quantized else None,
            group_size=module.group_size if quantized else None,
            bits=module.bits if quantized else None,
            mode=getattr(module, "mode", "affine"),
            n_probes=n_probes,
            transform=transform,
            recent_tokens=recent_tokens,
        )

    def _extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, n_clusters={self.n_clusters}, "
            f"cluster_size={self.cluster_size}, n_probes={self.n_probes}, "
            f"recent_tokens={self.recent_tokens}, bits={self.bits}, "
            f"centroid_bits={self.centroid_bits}, stage1_format={self.stage1_format}"
        )

    # The two stages are the kernels' (flashhead_mlx.kernels: Metal where the first-use self-test
    # chose them, flashhead_mlx.kernels.selftest, else their pure-MLX path), so every caller gets
    # the same scores, probes and logits.

    def _centroids(self) -> tuple:
        """The centroids as the stage-1 kernel takes them: centroids, scales, biases, bias."""
        if "stage1_centroids" in self:
            return self.stage1_centroids, None, None, self.cluster_bias
        scales, biases = self.get("centroid_scales"), self.get("centroid_biases")
        return self.centroids, scales, biases, self.cluster_bias

    @property
    def stage1_bits(self) -> Optional[int]:
        """The quantization bits of the centroids stage 1 multiplies (``None``: float)."""
        return None if "stage1_centroids" in self else self.centroid_bits

    @property
    def stage1_format(self) -> str:
        """The format of the centroids stage 1 multiplies, e.g. ``"4-bit"`` or ``"float32"``."""
        bits = self.stage1_bits
        return str(self._centroids()[0].dtype).split(".")[-1] if bits is None else f"{bits}-bit"

    def cluster_scores(self, h: mx.array) -> mx.array:
        """Stage-1 scores ``[..., n_clusters]`` (float32): ``h`` against the centroids, plus
        bias."""
        return cluster_scores(h, *self._centroids(), self.centroid_group_size, self.stage1_bits)

    def probe(self, h: mx.array, scores: Optional[mx.array] = None) -> mx.array:
        """The ``n_probes`` best clusters ``[..., n_probes]`` (uint32, ascending; ties to the
        lowest cluster id): by the stage-1 kernel, or from ``scores`` (:meth:`cluster_scores`)
        when given."""
        if scores is not None:
            return top_clusters(scores, self.n_probes)[0]
        ids, _ = selftest.centroid_topk(h, *self.stage1_arguments())
        return ids

    def _cluster_argmax(self, h: mx.array, clusters: mx.array) -> Tuple[mx.array, mx.array]:
        """The stage-2 kernel on the rows of ``clusters``: the greedy token and the logits."""
        return selftest.cluster_argmax(h, clusters, *self.stage2_arguments(), self.batch_path)

    def stage1_arguments(self) -> tuple:
        """The arguments of the stage-1 kernel (:func:`~flashhead_mlx.kernels.centroid_topk`)
        after the hidden states."""
        return (*self._centroids(), self.n_probes, self.centroid_group_size, self.stage1_bits)

    def stage2_arguments(self) -> tuple:
        """The arguments of the stage-2 kernel (:func:`~flashhead_mlx.kernels.cluster_argmax`)
        after the hidden states and the clusters, but the batch path."""
        return (self.weight, self.get("scales"), self.get("biases"), self.order,
                self.cluster_size, self.group_size, self.bits, self.transform, self.mode)

    def cluster_logits(self, h: mx.array, clusters: mx.array, slots: Optional[mx.array] = None
                       ) -> Tuple[mx.array, mx.array]:
        """Token ids and exact logits ``[..., K * s]`` (float32) of the rows of ``clusters``
        ``[..., K]``: scored by stage 2, or taken from ``slots``, the logits of every slot
        (:meth:`slot_logits`) when given.

        Padding slots have token id -1 and logit ``-inf``.
        """
        if slots is None:
            _, logits = self._cluster_argmax(h, clusters)
        else:
            kept = cluster_slots(clusters, self.cluster_size)
            logits = mx.take_along_axis(slots, kept, axis=-1).astype(mx.float32)
        return slot_tokens(clusters, self.order, self.cluster_size), logits

    def candidates(self, h: mx.array) -> Tuple[mx.array, mx.array]:
        """Token ids and exact logits of the probed clusters' rows ``[..., n_probes * s]``."""
        return self.cluster_logits(h, self.probe(h))

    def greedy(self, h: mx.array) -> mx.array:
        """The highest-scoring candidate token ``[...]`` (int32); ties go to the lowest token
        id, and padding never wins."""
        token, _ = self._cluster_argmax(h, self.probe(h))
        return token

    def slot_logits(self, h: mx.array) -> mx.array:
        """The exact logits of every slot ``[..., n_clusters * cluster_size]``, in cluster order."""
        logits = apply(self.transform, row_logits(h, self.weight, self.get("scales"),
                                                  self.get("biases"), self.group_size,
                                                  self.bits, self.mode))
        if self.n_clusters * self.cluster_size == self.vocab_size:
            return logits  # no padding slot
        return mx.where(self.order >= 0, logits, -mx.inf)

    def dense_logits(self, h: mx.array) -> mx.array:
        """The exact logits of every token ``[..., V]``, in vocabulary order.

        The rows are put back in token order first (one gather of the head), so the matrix
        product is the dense head's own and its logits equal the dense ones bit for bit.
        """
        return apply(self.transform, self.raw_logits(h))

    def exact_logits(self, h: mx.array) -> mx.array:
        """The exact logits of every token ``[..., V]`` in vocabulary order: :meth:`slot_logits`
        (one product over the rows in cluster order) gathered into token order.

        For a few rows (a verification block) it reads the head once without
        copying it. Each logit is the dot product :meth:`dense_logits` computes; a matrix product
        of another shape or row order may sum it in another order, so a near-tie can round
        differently.
        """
        return self.token_order(self.slot_logits(h))

    def token_order(self, slot_values: mx.array) -> mx.array:
        """Values per slot ``[..., slots]`` (cluster order) as values per token ``[..., V]``
        (vocabulary order), the padding slots dropped."""
        return mx.take(slot_values, self.inverse, axis=-1)

    def raw_logits(self, h: mx.array) -> mx.array:
        """The dense head module's output ``[..., V]``: :meth:`dense_logits` before the
        transform, what the model's own forward pass transforms."""
        return self._row_logits(h, self.inverse)

    def scatter(self, tokens: mx.array, logits: mx.array, into: Optional[mx.array] = None,
                padding: Optional[bool] = None) -> mx.array:
        """Full-vocabulary logits ``[..., V]`` from compact ones, written over ``into`` (default:
        ``-inf`` at every token).

        ``padding``: whether ``tokens`` may hold padding entries (-1); default: whether the head
        has padding slots. A padding entry writes again the row's first real entry, so the
        result is contiguous (a spare column sliced off would leave strided rows, on which a
        CPU's ``logsumexp``, what mlx-lm's samplers take first, runs ~30% slower)."""
        if into is None:
            into = mx.full((*tokens.shape[:-1], self.vocab_size), -mx.inf, dtype=logits.dtype)
        if self.padded if padding is None else padding:
            pad = tokens < 0
            first = mx.argmax(~pad, axis=-1, keepdims=True)
            tokens = mx.where(pad, mx.take_along_axis(tokens, first, axis=-1), tokens)
            logits = mx.where(pad, mx.take_along_axis(logits, first, axis=-1), logits)
        return mx.put_along_axis(into, tokens, logits, axis=-1)

    def embed(self, tokens: mx.array) -> mx.array:
        """The rows of ``tokens`` (the tied embedding lookup), dequantized when quantized."""
        slots = self.inverse[tokens]
        if "scales" not in self:
            return self.weight[slots]
        return mx.dequantize(
            self.weight[slots],
            self.scales[slots],
            None if self.biases is None else self.biases[slots],
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )

    def _row_logits(self, h: mx.array, slots: mx.array) -> mx.array:
        """``h`` against the rows of ``slots`` ``[K]``: logits ``[..., K]`` in the head's dtype."""
        taken = (None if a is None else mx.take(a, slots, axis=0)
                 for a in (self.weight, self.get("scales"), self.get("biases")))
        return row_logits(h, *taken, self.group_size, self.bits, self.mode)

    def token_logits(self, h: mx.array, tokens: mx.array) -> mx.array:
        """The exact logits ``[..., K]`` (float32) of the tokens ``[K]``."""
        return apply(self.transform, self._row_logits(h, self.inverse[tokens]).astype(mx.float32))

    def row_token_logits(self, h: mx.array, tokens: mx.array) -> mx.array:
        """The exact logits ``[B, L, R]`` (float32) of each position's own tokens ``[B, L, R]``
        at hidden states ``[B, L, d]`` (-1: no token, ``-inf``)."""
        slots = self.inverse[mx.maximum(tokens, 0)].reshape(-1, tokens.shape[-1])
        x = h.reshape(-1, 1, h.shape[-1]).astype(mx.float32)
        if "scales" in self:  # each slot a "cluster" of one row
            logits = gathered_logits(x[:, None], slots, self.weight, self.scales,
                                     self.get("biases"), 1, self.group_size, self.bits, self.mode)
        else:  # one product per position, not one per slot
            rows = mx.take(self.weight, slots, axis=0).astype(mx.float32)
            logits = x @ rows.swapaxes(-1, -2)
        logits = apply(self.transform, logits).reshape(tokens.shape)
        return mx.where(tokens >= 0, logits, -mx.inf)

    def own_recent_tokens(self, h: mx.array) -> Optional[mx.array]:
        """Each position's last ``recent_tokens`` context tokens ``[B, L, R]``
        (:func:`flashhead_mlx.recent.recent_tokens`; -1 where a context is shorter), or ``None``
        when the forward pass set none for these positions."""
        tokens = recent_tokens()
        if self.recent_tokens == 0 or tokens is None or tokens.shape[:2] != h.shape[:-1]:
            return None
        return tokens[..., -self.recent_tokens :]

    def recent_extra(self, h: mx.array, probes: mx.array) -> Optional[mx.array]:
        """:meth:`own_recent_tokens` that are not in ``probes``' clusters already (-1 in their
        place), or ``None``."""
        tokens = self.own_recent_tokens(h)
        if tokens is None:
            return None
        clusters = self.inverse[mx.maximum(tokens, 0)] // self.cluster_size
        probed = (clusters[..., None] == probes[..., None, :].astype(mx.int32)).any(axis=-1)
        return mx.where(probed, -1, tokens)

    def greedy_logits(self, h: mx.array) -> mx.array:
        """Logits ``[..., V]`` of a greedy decode step: exact at the candidates and at each
        row's recent tokens (:func:`flashhead_mlx.recent.recent_tokens`), ``-inf`` elsewhere.

        The recent tokens' logits are written first and the candidates' over them, so a recent
        token among the candidates keeps its stage-2 logit."""
        probes = self.probe(h)
        tokens, logits = self.cluster_logits(h, probes)
        recent = self.own_recent_tokens(h)
        under = None if recent is None else self.scatter(
            recent, self.row_token_logits(h, recent), padding=True)
        return self.scatter(tokens, logits, under)

    def dense_greedy_logits(self, h: mx.array, processors: bool = True,
                            slots: Optional[mx.array] = None) -> mx.array:
        """Logits ``[..., V]`` of a greedy decode step on the dense switch: one product over
        every row (the dense head's work; ``slots``, its :meth:`slot_logits`, when already
        computed), exact at the cluster holding each row's highest logit, ``-inf`` elsewhere;
        with ``processors``, at its recent tokens and at the ``recent_tokens + 1`` clusters
        holding its highest logits.

        Ranked by their highest logit, a row's ``k`` best clusters hold its ``k`` highest
        logits, so they hold its highest token outside its recent ones: a greedy step, even with
        penalties on the recent tokens (mlx-lm's only lower them), takes the dense head's token up
        to a near-tie of a different matmul shape. No ``[..., V]`` gather into token order: on
        a CPU that gather costs more than the product.
        """
        slots = self.slot_logits(h) if slots is None else slots
        per_cluster = slots.reshape(*slots.shape[:-1], self.n_clusters, self.cluster_size)
        k = min(self.n_clusters, self.recent_tokens + 1) if processors else 1
        # Any k best: a tie at the last place keeps the k highest logits either way.
        clusters = mx.argpartition(-per_cluster.max(axis=-1), k - 1, axis=-1)[..., :k]
        tokens, logits = self.cluster_logits(h, clusters, slots)
        recent = self.own_recent_tokens(h) if processors else None
        under = None
        if recent is not None:
            recent_slots = self.inverse[mx.maximum(recent, 0)]
            recent_logits = mx.take_along_axis(slots, recent_slots, -1).astype(mx.float32)
            under = self.scatter(recent, recent_logits, padding=True)
        return self.scatter(tokens, logits, under)

    def greedy_step(self, h: mx.array) -> mx.array:
        """The token ``[...]`` (int32) of a greedy decode step: the argmax of
        :meth:`greedy_logits` (ties to the lowest token id), from the stage-2 kernel's greedy
        token and the recent tokens' exact logits, without building the ``[..., V]`` logits."""
        probes = self.probe(h)
        token, logits = self._cluster_argmax(h, probes)
        recent = self.recent_extra(h, probes)
        if recent is None:
            return token
        tokens = mx.concatenate([token[..., None], recent], axis=-1)
        best = logits.max(axis=-1, keepdims=True)  # the kernel's token's logit
        return best_token(tokens, mx.concatenate([best, self.row_token_logits(h, recent)], -1))

    def dense_switch(self, h: mx.array) -> bool:
        """Whether a decode step of the rows ``h`` ``[..., d]`` takes the dense head: its batch
        path (:attr:`batch_path`, else ``choose_batch_path``'s for the rows and ``n_probes``,
        :mod:`flashhead_mlx.kernels`) is ``"dense"``. The rows are the batch's (the leading axis
        of ``[B, L, d]``): the positions of one sequence (a forward pass of several tokens in a
        decode context, a speculative check) keep FlashHead's logits. Noted in a ``recording``
        block."""
        rows = h.shape[0] if h.ndim > 2 else h.size // h.shape[-1]
        path = self.batch_path or choose_batch_path(rows, self.n_probes, self.n_clusters)
        if path == "dense":
            record("batch_path", path)
        return path == "dense"

    def decode_logits(self, h: mx.array, context: DecodeContext) -> mx.array:
        """Logits ``[..., V]`` of a decode step: exact at the candidates, at each row's recent
        tokens (greedy rows) and at the context's extra tokens, ``-inf`` elsewhere; with
        sampling temperatures, one full-vocabulary sampler draw's logits
        (:func:`flashhead_mlx.sampling.full_vocabulary_logits`) at the sampled rows. Above the
        dense threshold (:meth:`dense_switch`) one product scores every row (the dense head's
        work) and replaces stage 2: greedy rows keep their best clusters
        (:meth:`dense_greedy_logits`, no stage 1), sampled rows take their candidates and drawn
        cluster from it."""
        temperatures = context.temperatures
        slots = self.slot_logits(h) if self.dense_switch(h) else None

        def greedy_rows() -> mx.array:
            if slots is None:
                return self.greedy_logits(h)
            return self.dense_greedy_logits(h, context.processors, slots)

        if temperatures is None or not any(temperatures):
            logits = greedy_rows()
        else:
            rows = h.reshape(-1, h.shape[-1]).shape[0]
            if len(temperatures) > 1 and h.ndim > 2:
                # Rows of a batch: each position of row b samples at temperature b.
                temperatures = tuple(t for t in temperatures for _ in range(h.shape[-2]))
            temperature = temperature_array(temperatures, rows)
            logits = full_vocabulary_logits(self, h, temperature, slots=slots)
            recent = self.recent_tokens and recent_tokens() is not None
            if 0 in temperatures and (recent or slots is not None):
                # The greedy rows of a batch that also samples score as greedy steps do.
                greedy = (temperature == 0).reshape(*h.shape[:-1], 1)
                logits = mx.where(greedy, greedy_rows(), logits)
        if context.extra_tokens:
            extra = mx.array(context.extra_tokens, mx.int32)
            index = mx.broadcast_to(extra, (*logits.shape[:-1], extra.size))
            logits = mx.put_along_axis(logits, index, self.token_logits(h, extra), axis=-1)
        return logits

    def __call__(self, h: mx.array) -> mx.array:
        """Logits ``[..., L, V]`` for hidden states ``[..., L, d]``.

        In a decode step (:func:`flashhead_mlx.decode.decode_context`: FlashHead's generate
        functions, :func:`flashhead_mlx.decoding`, or mlx-lm's own decode loops) the sparse
        :meth:`decode_logits`, a drop-in for mlx-lm's samplers and logits processors; everywhere
        else (perplexity, evaluation, any forward pass) the exact :meth:`dense_logits`.
        """
        context = decode_context()
        outputs = head_outputs()
        if outputs is None:  # called on its own
            return self.dense_logits(h) if context is None else self.decode_logits(h, context)
        # Within a FlashHead model's forward pass (flashhead_mlx.forward), which transforms what
        # this returns, and returns the decode step's logits set aside here instead.
        if context is not None:
            outputs.append(self.decode_logits(h, context))
        return self.raw_logits(h)
