"""The model card of a FlashHead folder: its ``README.md``, as the Hugging Face Hub shows it.

The card has the front matter the hub reads (``library_name: mlx``, ``pipeline_tag``,
``base_model``, tags ``mlx`` and ``flashhead``, and whatever the source's card had, its license
first of all), how the folder was made (from the ``flashhead`` section of ``config.json``), the
measured accuracy and speed when ``flashhead-mlx eval`` / ``bench`` JSON files are given (never
otherwise), and how to use it. It is written at conversion and rendered again at upload; a
measured section stays in the card until a new JSON file replaces it.
"""

import json
import re
from pathlib import Path
from typing import Optional

from .clustering import scored_fraction
from .durable import replace_text

CARD_FILE = "README.md"
TAGS = ["mlx", "flashhead"]
HUB = "https://huggingface.co"
EVAL_KEYS = (
    "n_probes",
    "n_clusters",
    "cluster_size",
    "scored_fraction",
    "top1_containment",
    "top5_containment",
    "greedy_agreement",
    "candidate_mass",
    "sampling_tv_t1",
    "sampling_tv_t07_p09",
)
BENCH_KEYS = (
    "head_dense_ms",
    "head_flash_ms",
    "head_speedup",
    "decode_dense_tok_s",
    "decode_flash_tok_s",
    "decode_speedup",
    "bytes_per_token_dense",
    "bytes_per_token_flash",
    "ceiling_speedup",
    "share_of_ceiling",
    "resident_dense_bytes",
    "resident_flash_bytes",
    "device",
    "kernels",
)


def suggested_name(source: str) -> str:
    """mlx-community's habit for a FlashHead folder's repo name: the source's name plus
    ``-flashhead`` (``mlx-community/Llama-3.2-1B-Instruct-4bit`` ->
    ``Llama-3.2-1B-Instruct-4bit-flashhead``)."""
    name = Path(source.rstrip("/")).name.removesuffix(".gguf")
    return name if name.endswith("-flashhead") else f"{name}-flashhead"


def read_card(folder: Path) -> tuple:
    """The front matter (a dict) and the text of ``folder``'s card; empty when it has none."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}, ""
    card = ModelCard(path.read_text())
    return card.data.to_dict(), card.text


def card_front_matter(data: dict) -> dict:
    """``data`` (the front matter the card had) with what the hub needs to list a FlashHead
    folder as an MLX text-generation model."""
    tags = list(data.get("tags") or [])
    return {
        **data,
        "library_name": "mlx",
        "pipeline_tag": "text-generation",
        "tags": tags + [tag for tag in TAGS if tag not in tags],
    }


def read_measurements(path: str, kind: str) -> dict:
    """The JSON file ``path`` written by ``flashhead-mlx {kind} --json``."""
    try:
        measurements = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the {kind} JSON {path}: {error}") from error
    if not isinstance(measurements, dict):
        raise ValueError(f"the {kind} JSON {path} is not an object (is it from `flashhead-mlx {kind}`?)")
    return measurements


def _missing(record: dict, keys: tuple, what: str) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"{what} lacks {missing} (is it from `flashhead-mlx {what.split()[0]}`?)")


def _percent(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def eval_section(results: dict, section: dict) -> str:
    """The measured-accuracy section, from ``flashhead-mlx eval --json`` ``results`` of the
    folder whose ``flashhead`` config section is ``section``; its ``n_probes`` row is marked."""
    rows = results.get("results")
    if not isinstance(rows, list) or not rows:
        raise ValueError("eval JSON has no 'results' rows (is it from `flashhead-mlx eval`?)")
    for row in rows:
        _missing(row, EVAL_KEYS, "eval JSON row")
        measured = (row["n_clusters"], row["cluster_size"])
        if measured != (section["n_clusters"], section["cluster_size"]):
            raise ValueError(
                f"eval JSON measured {measured[0]} clusters of {measured[1]}, but the folder has "
                f"{section['n_clusters']} clusters of {section['cluster_size']}: another model?"
            )
    n_probes = section["n_probes"]
    default = [row for row in rows if row["n_probes"] == n_probes]
    if default:
        row = default[0]
        summary = (
            f"At the folder's `n_probes` = {n_probes} ({_percent(row['scored_fraction'], 1)} of "
            f"the vocabulary scored per token), the dense head's top token is among FlashHead's "
            f"candidates at {_percent(row['top1_containment'])} of the positions, and greedy "
            f"decoding picks the dense token at {_percent(row['greedy_agreement'])}."
        )
    else:
        summary = (
            f"The folder's `n_probes` ({n_probes}) was not among the measured values; "
            "the rows below are those that were measured."
        )
    recent = rows[0].get("recent_tokens", 0)
    if recent:
        summary += (
            f" Top-1 containment and greedy agreement count the {recent} recent context tokens "
            "each row also scores exactly at greedy steps (in the scored share)."
        )
    lines = [
        "## Accuracy (measured)",
        "",
        f"From `flashhead-mlx eval` on {results.get('tokens', '?')} tokens of "
        f"`{Path(str(results.get('text', '?'))).name}`. {summary}",
        "",
        "| n_probes | scored | top-1 containment | top-5 containment | greedy agreement "
        "| candidate mass | sampling TV, T=1 | sampling TV, T=0.7 top-p 0.9 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: r["n_probes"]):
        label = f"**{row['n_probes']}** (default)" if row["n_probes"] == n_probes else row["n_probes"]
        lines.append(
            f"| {label} | {_percent(row['scored_fraction'], 1)} "
            f"| {_percent(row['top1_containment'])} | {_percent(row['top5_containment'])} "
            f"| {_percent(row['greedy_agreement'])} | {_percent(row['candidate_mass'])} "
            f"| {row['sampling_tv_t1']:.4f} | {row['sampling_tv_t07_p09']:.4f} |"
        )
    return "\n".join(lines)


def bench_section(bench: dict) -> str:
    """The measured-speed section, from ``flashhead-mlx bench --json``."""
    _missing(bench, BENCH_KEYS, "bench JSON")
    kernels = bench["kernels"]
    if not isinstance(kernels, str):
        kernels = ", ".join(map(str, kernels))
    mib = 2.0**20
    return "\n".join(
        [
            "## Speed (measured)",
            "",
            f"From `flashhead-mlx bench` on {bench['device']} (kernels: {kernels}).",
            "",
            "| | dense head | FlashHead | speedup |",
            "|---|---|---|---|",
            f"| head, per token | {bench['head_dense_ms']:.3f} ms | {bench['head_flash_ms']:.3f} ms "
            f"| {bench['head_speedup']:.2f}x |",
            f"| decode | {bench['decode_dense_tok_s']:.1f} tok/s "
            f"| {bench['decode_flash_tok_s']:.1f} tok/s | {bench['decode_speedup']:.2f}x |",
            f"| weights read per token | {bench['bytes_per_token_dense'] / mib:.1f} MiB "
            f"| {bench['bytes_per_token_flash'] / mib:.1f} MiB "
            f"| at most {bench['ceiling_speedup']:.2f}x (measured: "
            f"{_percent(bench['share_of_ceiling'], 0)} of it) |",
            f"| resident memory | {bench['resident_dense_bytes'] / mib:.1f} MiB "
            f"| {bench['resident_flash_bytes'] / mib:.1f} MiB | |",
        ]
    )


def _marked(name: str, text: str) -> str:
    return f"<!-- flashhead:{name} -->\n{text}\n<!-- /flashhead:{name} -->"


def _kept(name: str, text: str) -> Optional[str]:
    """The marked section ``name`` of a card's ``text``, markers included, if it has one."""
    match = re.search(f"<!-- flashhead:{name} -->\n.*?\n<!-- /flashhead:{name} -->", text, re.S)
    return match.group(0) if match else None


def _made_from(section: dict) -> str:
    source = section.get("source")
    if source is None:
        return "not recorded"
    return f"[{source}]({HUB}/{source})" if source.count("/") == 1 else f"`{source}`"


def render_card(
    config: dict,
    front_matter: dict,
    model_id: str,
    eval_section_text: Optional[str] = None,
    bench_section_text: Optional[str] = None,
) -> str:
    """The card of a FlashHead folder whose ``config.json`` is ``config``, published as
    ``model_id`` (a repo id, or the folder's name before upload). ``front_matter`` is the card's
    previous front matter; the measured sections are already rendered (and marked)."""
    from huggingface_hub import ModelCardData

    section = config["flashhead"]
    vocab_size, cluster_size = section["vocab_size"], section["cluster_size"]
    n_clusters, n_probes = section["n_clusters"], section["n_probes"]
    scored = scored_fraction(n_clusters, cluster_size, n_probes, vocab_size)
    bits = section["centroid_bits"]
    centroids = "float32" if bits is None else f"{bits}-bit (group size {section['centroid_group_size']})"
    version = section.get("flashhead_mlx_version")
    intro = "This model has a FlashHead"
    if section.get("source") is not None:
        intro = f"This model is {_made_from(section)} with a FlashHead"
    converted = "" if version is None else f", converted with flashhead-mlx {version}"
    imported = section.get("imported_from")
    clustering = (
        f"imported from `{imported}` (a FlashHead clustering published for vLLM); stage-1 centroids "
        "fitted by flashhead-mlx"
        if imported
        else "flashhead-mlx's balanced clustering, centroids fitted"
    )
    yaml = ModelCardData(**card_front_matter(front_matter)).to_yaml()
    parts = [
        f"---\n{yaml}\n---",
        f"# {model_id}",
        f"{intro}{converted}. "
        "FlashHead replaces the dense classification head at decode time by a "
        "two-stage retrieval head: the hidden state is scored against the centroids of "
        f"clusters of the head's rows, and only the rows of the `n_probes` best clusters are "
        "scored, exactly.",
        "## How it was made\n\n"
        "| | |\n|---|---|\n"
        f"| source | {_made_from(section)} |\n"
        f"| clusters | {n_clusters} clusters of {cluster_size} tokens (vocabulary {vocab_size}, "
        f"hidden size {section['hidden_size']}) |\n"
        f"| clustering | {clustering} on calibration text |\n"
        f"| `n_probes` | {n_probes} ({_percent(scored, 1)} of the vocabulary scored per token) |\n"
        f"| stage-1 centroids | {centroids} |\n"
        f"| flashhead-mlx | {version or 'not recorded'} |",
    ]
    parts += [text for text in (eval_section_text, bench_section_text) if text]
    parts.append(
        "## Use\n\n"
        "With flashhead-mlx installed:\n\n"
        "```bash\n"
        f'flashhead-mlx generate --model {model_id} --prompt "hello" --max-tokens 64\n'
        f'flashhead-mlx generate --model {model_id} --prompt "hello" --no-flashhead  # dense head\n'
        "```\n\n"
        "```python\n"
        "from mlx_lm import generate\n"
        "from flashhead_mlx import load\n\n"
        f'model, tokenizer = load("{model_id}")  # load(..., flashhead=False): the dense head\n\n'
        'prompt = "hello"\n'
        "if tokenizer.chat_template is not None:\n"
        '    messages = [{"role": "user", "content": prompt}]\n'
        "    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)\n\n"
        "print(generate(model, tokenizer, prompt, max_tokens=64))\n"
        "```\n\n"
        + plain_mlx_lm_use(config, model_id)
    )
    return "\n\n".join(parts) + "\n"


def plain_mlx_lm_use(config: dict, model_id: str) -> str:
    """How the card says plain mlx-lm loads the folder: dense, or with the FlashHead of its
    model file (the remote-code variant)."""
    if config.get("model_file") is None:
        return (
            "Plain mlx-lm (`pip install mlx-lm`) and every tool built on it load this model with "
            "its dense head (they do not download the FlashHead assets):\n\n"
            "```bash\n"
            f'mlx_lm.generate --model {model_id} --prompt "hello"\n'
            "```"
        )
    return (
        f"With plain mlx-lm (`pip install mlx-lm`), the folder's model file `{config['model_file']}` "
        "fetches the FlashHead assets and installs the FlashHead (flashhead-mlx's when it is "
        "installed, else a small pure-MLX one in that file):\n\n"
        "```bash\n"
        f'mlx_lm.generate --model {model_id} --trust-remote-code --prompt "hello"\n'
        "```"
    )


def render_folder_card(
    folder: Path,
    config: Optional[dict] = None,
    model_id: Optional[str] = None,
    eval_json: Optional[str] = None,
    bench_json: Optional[str] = None,
) -> str:
    """The card of the FlashHead ``folder``, from its ``config.json`` (or ``config``), the front
    matter of its current card, and the measurements: from ``eval_json`` / ``bench_json`` when
    given, else those of its current card. ``model_id`` defaults to the folder's name."""
    folder = Path(folder)
    if config is None:
        config = json.loads((folder / "config.json").read_text())
    front_matter, text = read_card(folder)
    if eval_json is None:
        evaluation = _kept("eval", text)
    else:
        evaluation = _marked("eval", eval_section(read_measurements(eval_json, "eval"), config["flashhead"]))
    if bench_json is None:
        bench = _kept("bench", text)
    else:
        bench = _marked("bench", bench_section(read_measurements(bench_json, "bench")))
    return render_card(config, front_matter, model_id or folder.name, evaluation, bench)


def write_card(folder: Path, text: str) -> None:
    """Write ``text`` as ``folder``'s card, atomically (:func:`flashhead_mlx.durable.replace_text`)."""
    replace_text(Path(folder) / CARD_FILE, text)
