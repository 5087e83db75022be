"""The process the fuzz tests (tests/test_fuzz.py) run their cases in: one JSON request a line
on stdin, one JSON answer a line on stdout, under an address-space limit, so that a case that
crashes the interpreter, hangs or allocates hugely is seen as that by the test (a dead or silent
worker) instead of taking pytest down with it.

Each answer's ``outcome``: ``"ok"`` (the input loaded, and the load was checked to be correct),
``"error"`` (an exception: its type, whether it is the clear error the target must raise, its
message), or ``"wrong"`` (the input loaded but the load is not correct: ``detail`` says how).
"""

import json
import resource
import sys
import traceback
from pathlib import Path

# A case needs a few MiB; MLX, OpenBLAS and the tokenizers reserve some address space. A huge
# allocation fails (MemoryError, or MLX aborting) instead of exhausting the machine.
ADDRESS_SPACE = 6 << 30

STATE = {}


def same_gguf(path: str) -> str:
    """How our reader's view of ``path`` differs from the ``gguf`` package's, or ``""``."""
    import gguf
    import numpy as np

    from flashhead_mlx.gguf_file import GGUFFile

    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    reference = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    if ours.fields != reference:
        keys = sorted(k for k in set(ours.fields) | set(reference)
                      if ours.fields.get(k) != reference.get(k))
        return f"fields differ from gguf.GGUFReader's: {keys[:5]}"
    if [t.name for t in ours.tensors] != [t.name for t in theirs.tensors]:
        return "tensor names differ from gguf.GGUFReader's"
    for mine, reference in zip(ours.tensors, theirs.tensors):
        if mine.tensor_type != reference.tensor_type or mine.shape != tuple(
            int(n) for n in reference.shape
        ):
            return f"tensor {mine.name}: type or shape differ from gguf.GGUFReader's"
        if not np.array_equal(mine.data, reference.data):
            return f"tensor {mine.name}: data differ from gguf.GGUFReader's"
    return ""


def gguf_read(path: str) -> dict:
    """GGUFFile reads ``path`` as the reference reader does."""
    detail = same_gguf(path)
    return {"outcome": "wrong", "detail": detail} if detail else {"outcome": "ok"}


def gguf_import(path: str, out: str) -> dict:
    """``import_gguf`` of ``path`` writes a folder mlx-lm loads and runs, from the tensors the
    reference reader reads."""
    import mlx.core as mx
    import mlx_lm

    from flashhead_mlx.gguf import import_gguf

    import_gguf(path, out)
    detail = same_gguf(path)
    if detail:
        return {"outcome": "wrong", "detail": detail}
    try:
        model, tokenizer = mlx_lm.load(out)
        ids = tokenizer.encode("a wife?")
        mx.eval(model(mx.array([ids or [0]])))
    except Exception as error:  # an import that mlx-lm cannot use is not a correct load
        return {"outcome": "wrong", "detail": f"imported, but mlx-lm fails: {error!r}"[:500]}
    return {"outcome": "ok"}


def assets_init(folder: str) -> dict:
    """Load the converted model at ``folder`` (dense) and its assets: the reference."""
    import mlx_lm

    from flashhead_mlx.assets import load_assets

    model, _ = mlx_lm.load(folder)
    STATE["model"], STATE["assets"] = model, load_assets(folder, model)
    STATE["dims"] = model.model.embed_tokens.weight.shape[1]  # the tiny float model's
    return {"outcome": "ok"}


def assets_load(folder: str, written: str = "") -> dict:
    """``load_assets`` of the (mutated) ``folder`` for the reference model: the arrays loaded are
    the reference's (or, when the case rewrote them with a consistent digest, those of the file
    ``written``), every setting is of its type and range, and the head built from them gives the
    dense argmax when every cluster is probed (so no token can be wrong)."""
    import mlx.core as mx

    from flashhead_mlx.assets import load_assets
    from flashhead_mlx.head import FlashHead
    from flashhead_mlx.model_head import head_module

    model, reference = STATE["model"], STATE["assets"]
    loaded = load_assets(folder, model)
    expected = dict(mx.load(written)) if written else reference
    for name, value in expected.items():
        if isinstance(value, mx.array) and not (
            name in loaded and loaded[name].dtype == value.dtype
            and loaded[name].shape == value.shape and mx.array_equal(loaded[name], value).item()
        ):
            return {"outcome": "wrong", "detail": f"array {name} is not the file's"}
    for key in ("cluster_size", "n_probes", "centroid_group_size"):
        if type(loaded[key]) is not int or loaded[key] < 1:
            return {"outcome": "wrong", "detail": f"{key} is {loaded[key]!r}"}
    if loaded["centroid_bits"] not in (None, 2, 3, 4, 5, 6, 8):
        return {"outcome": "wrong", "detail": f"centroid_bits is {loaded['centroid_bits']!r}"}
    head = FlashHead.from_module(head_module(model), loaded, recent_tokens=0)
    head.n_probes = head.n_clusters
    h = mx.random.normal((8, STATE["dims"]), key=mx.random.key(0))
    dense = mx.argmax(head.dense_logits(h), axis=-1)
    if not mx.array_equal(head.greedy(h), dense).item():
        return {"outcome": "wrong", "detail": "all probes do not give the dense argmax"}
    return {"outcome": "ok", "n_probes": loaded["n_probes"]}


def clustering_read(path: str, vocab_size: int, hidden_size: int) -> dict:
    """``read_clustering`` of ``path``: the labels are the file's, in range, clusters equal."""
    import numpy as np
    from safetensors.numpy import load_file

    from flashhead_mlx.import_assets import read_clustering

    labels, n_clusters = read_clustering(path, vocab_size, hidden_size)
    raw = load_file(path)["cluster_assignments"].reshape(-1)
    sizes = np.bincount(labels, minlength=n_clusters)
    if labels.shape != (vocab_size,) or not np.array_equal(labels, raw.astype(np.int64)):
        return {"outcome": "wrong", "detail": "labels are not the file's"}
    if labels.min() < 0 or labels.max() >= n_clusters or np.any(sizes != vocab_size // n_clusters):
        return {"outcome": "wrong", "detail": "labels out of range or clusters unequal"}
    return {"outcome": "ok"}


TARGETS = {
    f.__name__: f for f in (gguf_read, gguf_import, assets_init, assets_load, clustering_read)
}


def answer(request: dict, clear: type) -> dict:
    target = TARGETS[request.pop("target")]
    try:
        return target(**request)
    except Exception as error:
        message = str(error)
        return {
            "outcome": "error",
            "type": type(error).__name__,
            "clear": isinstance(error, clear),
            "message": message,
            "traceback": traceback.format_exc()[-3000:],
        }


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    sys.path.insert(0, str(Path(__file__).parent))
    import mlx.core  # noqa: F401  (before the first request, so its time is not a case's)
    import mlx_lm  # noqa: F401

    print(json.dumps({"outcome": "ready"}), flush=True)
    for line in sys.stdin:
        print(json.dumps(answer(json.loads(line), ValueError)), flush=True)


if __name__ == "__main__":
    main()
