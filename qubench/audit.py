"""Auditing a model unlearned elsewhere (`qubench audit`): where the checkpoint comes from, what it
says about itself, and the checks that must pass before anything is quantized.

An audit compares an unlearned checkpoint with the target it was unlearned from. That comparison is
only meaningful when the two are the same network with the same tokenizer (otherwise weight deltas,
quantization disagreement and every metric compare unrelated things), when something was actually
unlearned, and when the target remembers the task's forget set at all (the separation check,
`qubench.scoring.separation`). Each of these is checked here and fails with a message that says what
differs and what to do, before the first quantizer runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qubench.errors import ConfigError
from qubench.fingerprint import file_digest, model_fingerprint

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
MODEL_CARD = "README.md"
#: Files a saved tokenizer consists of (one is enough for AutoTokenizer, depending on its kind).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
#: Config keys that say nothing about the network's shape (left out when explaining a shape mismatch).
_BOOKKEEPING_KEYS = {"_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version",
                     "use_cache", "_commit_hash", "output_attentions", "output_hidden_states"}
#: How much of a model card's text a result keeps (the card itself is identified by its sha256).
CARD_EXCERPT_CHARS = 1000
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Checkpoint:
    """An external checkpoint, located on this machine."""

    ref: str                    # as the user gave it
    path: Path                  # its local folder (for a hub ID, the downloaded snapshot)
    hub_id: str | None = None
    revision: str | None = None  # the commit a hub snapshot resolved to

    @property
    def is_adapter(self) -> bool:
        return is_adapter(self.path)


def split_hub_ref(ref: str) -> tuple[str, str | None]:
    """'owner/name@revision' -> ('owner/name', 'revision'); without '@' the revision is None."""
    hub_id, _, revision = ref.partition("@")
    return hub_id, revision or None


def is_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(split_hub_ref(ref)[0])) and not Path(ref).expanduser().exists()


def is_adapter(folder: Path) -> bool:
    """A peft adapter folder: an adapter config and no model config of its own."""
    return (Path(folder) / ADAPTER_CONFIG).is_file() and not (Path(folder) / MODEL_CONFIG).is_file()


def _snapshot_revision(path: Path) -> str | None:
    # The Hugging Face cache keeps each downloaded commit in .../snapshots/<commit>/.
    return path.name if path.parent.name == "snapshots" else None


def locate(ref: str) -> Checkpoint | None:
    """The checkpoint if it is on this machine already (a folder, or a hub ID in the HF cache); None
    when it would have to be downloaded. Never downloads."""
    path = Path(ref).expanduser()
    if path.exists():
        return Checkpoint(ref, path.resolve())
    if not is_hub_id(ref):
        return None
    hub_id, revision = split_hub_ref(ref)
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in (MODEL_CONFIG, ADAPTER_CONFIG):
            found = try_to_load_from_cache(hub_id, name, revision=revision)
            if isinstance(found, str):
                folder = Path(found).parent
                return Checkpoint(ref, folder, hub_id, _snapshot_revision(folder))
    except Exception:  # no hub library, a malformed ID: simply not here
        return None
    return None


def resolve(ref: str) -> Checkpoint:
    """The checkpoint's local folder, downloading a hub ID (owner/name[@revision]) if needed."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--unlearned {ref}: not a folder (give a save_pretrained model folder, a peft "
                              "LoRA adapter folder or a hub ID)")
        checkpoint = Checkpoint(ref, path.resolve())
    elif is_hub_id(ref):
        hub_id, revision = split_hub_ref(ref)
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(hub_id, revision=revision))
        except Exception as exc:
            raise ConfigError(f"could not fetch the unlearned model {ref!r} from the hub ({type(exc).__name__}: "
                              f"{exc}). On a machine without hub access, pass a local folder instead.") from None
        checkpoint = Checkpoint(ref, folder, hub_id, _snapshot_revision(folder) or revision)
    else:
        raise ConfigError(f"--unlearned {ref!r} is neither an existing folder nor a hub ID of the form "
                          "owner/name[@revision]")
    if not (checkpoint.path / MODEL_CONFIG).is_file() and not (checkpoint.path / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{checkpoint.path} is neither a save_pretrained model folder (no {MODEL_CONFIG}) nor a "
                          f"peft adapter folder (no {ADAPTER_CONFIG})")
    return checkpoint


# --- what the checkpoint says about itself ------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _model_card(folder: Path) -> dict | None:
    """The model card's digest, its metadata block (YAML front matter) and the start of its text."""
    path = folder / MODEL_CARD
    if not path.is_file():
        return None
    import yaml

    text = path.read_text(encoding="utf-8", errors="replace")
    metadata, body = None, text
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if match:
        try:
            parsed = yaml.safe_load(match.group(1))
            metadata = parsed if isinstance(parsed, dict) else None
        except yaml.YAMLError:
            metadata = None
        body = text[match.end():]
    return {"sha256": file_digest(path), "metadata": metadata, "excerpt": body.strip()[:CARD_EXCERPT_CHARS]}


def provenance(checkpoint: Checkpoint) -> dict[str, Any]:
    """The checkpoint's identity as a result records it: where it came from, its content fingerprint
    and whatever provenance it carries (model card, adapter config, a qubench unlearning log)."""
    from qubench.stages.unlearned import read_log

    folder = checkpoint.path
    record: dict[str, Any] = {
        "ref": checkpoint.ref, "kind": "lora_adapter" if checkpoint.is_adapter else "model", "path": str(folder),
        "hub_id": checkpoint.hub_id, "revision": checkpoint.revision, "fingerprint": model_fingerprint(folder),
        "model_card": _model_card(folder),
    }
    if checkpoint.is_adapter:
        record["adapter_config"] = _read_json(folder / ADAPTER_CONFIG)
    else:
        config = _read_json(folder / MODEL_CONFIG) or {}
        record["architectures"] = config.get("architectures")
    if log := read_log(folder):  # made by qubench itself (e.g. `qubench run`, then copied)
        record["qubench_unlearning"] = log
    return record


# --- checks -------------------------------------------------------------------------------------------

def _config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:  # an unknown model_type, a malformed file
        raise ConfigError(f"cannot read the model config of {folder}: {type(exc).__name__}: {exc}") from None


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape as the config defines it, on the meta device (no weights are read)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _config_differences(a, b) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    keys = sorted((set(da) | set(db)) - _BOOKKEEPING_KEYS)
    return [f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in keys if da.get(k) != db.get(k)]


def _architecture(config) -> str:
    names = ", ".join(getattr(config, "architectures", None) or []) or "no architecture named"
    return f"{names} (model_type {getattr(config, 'model_type', '?')})"


def check_same_network(target_dir: Path, unlearned_dir: Path, what: str = "unlearned") -> None:
    """The unlearned model must be the target's network: same architecture, vocabulary and shapes."""
    target, other = _config(target_dir), _config(unlearned_dir)
    if (getattr(target, "model_type", None) != getattr(other, "model_type", None)
            or (target.architectures and other.architectures and target.architectures != other.architectures)):
        raise ConfigError(
            f"target and {what} models have different architectures: the target is {_architecture(target)}, the "
            f"{what} model is {_architecture(other)}. An audited model must be the target after unlearning "
            "(same network); check --target and --unlearned")
    vt, vo = getattr(target, "vocab_size", None), getattr(other, "vocab_size", None)
    if vt != vo:
        raise ConfigError(
            f"target and {what} models have different vocabularies: vocab_size {vt} in the target, {vo} in the "
            f"{what} model. An audited model must keep the target's vocabulary; check --target and --unlearned")
    st, so = parameter_shapes(target), parameter_shapes(other)
    differ = [f"{n} {list(st[n]) if n in st else 'absent'} vs {list(so[n]) if n in so else 'absent'}"
              for n in sorted(set(st) | set(so)) if st.get(n) != so.get(n)]
    if differ:
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        fields = _config_differences(target, other)
        why = f" (their configs differ in {'; '.join(fields[:4])})" if fields else ""
        raise ConfigError(
            f"target and {what} models have different shapes (target vs {what}): {'; '.join(differ[:3])}{more}{why}. "
            "An audited model must be the target's network with other weights; check --target and --unlearned")


def check_same_tokenizer(target_dir: Path, unlearned_dir: Path, texts: Iterable[str]) -> None:
    """The unlearned model must carry the target's tokenizer: each model is evaluated with its own, so a
    different one would feed it other token IDs than the target got for the same probes."""
    from transformers import AutoTokenizer

    target = AutoTokenizer.from_pretrained(target_dir)
    fix = ("each model is evaluated with its own tokenizer: save the target's beside it "
           f"(AutoTokenizer.from_pretrained(TARGET).save_pretrained('{unlearned_dir}'))")
    if not any((Path(unlearned_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"the unlearned model folder {unlearned_dir} has no tokenizer (none of "
                          f"{', '.join(TOKENIZER_FILES)}); {fix}")
    try:
        other = AutoTokenizer.from_pretrained(unlearned_dir)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"the unlearned model folder {unlearned_dir} has no usable tokenizer "
                          f"({type(exc).__name__}: {first_line}); {fix}") from None
    advice = ("qubench evaluates each model with the tokenizer saved beside it, so the same probe would reach "
              "the two models as different token IDs: save the target's tokenizer with the unlearned model")
    vt, vo = target.get_vocab(), other.get_vocab()
    if vt != vo:
        only_t = sorted(set(vt) - set(vo))
        only_o = sorted(set(vo) - set(vt))
        moved = sorted(k for k in set(vt) & set(vo) if vt[k] != vo[k])
        detail = "; ".join(part for part in (
            f"{len(only_t)} tokens only in the target's (e.g. {only_t[0]!r})" if only_t else "",
            f"{len(only_o)} only in the unlearned model's (e.g. {only_o[0]!r})" if only_o else "",
            f"{len(moved)} with other IDs (e.g. {moved[0]!r}: {vt[moved[0]]} vs {vo[moved[0]]})" if moved else "",
        ) if part)
        raise ConfigError(f"the unlearned model's tokenizer differs from the target's: its vocabulary differs "
                          f"({detail}); {advice}")
    specials_t, specials_o = target.special_tokens_map, other.special_tokens_map
    if specials_t != specials_o:
        key = next(k for k in sorted(set(specials_t) | set(specials_o)) if specials_t.get(k) != specials_o.get(k))
        raise ConfigError(f"the unlearned model's tokenizer differs from the target's: special token {key} is "
                          f"{specials_t.get(key)!r} in the target's, {specials_o.get(key)!r} in the unlearned "
                          f"model's; {advice}")
    for text in texts:
        ids_t, ids_o = target(text)["input_ids"], other(text)["input_ids"]
        if ids_t != ids_o:
            raise ConfigError(f"the unlearned model's tokenizer differs from the target's: it encodes "
                              f"{text[:60]!r} as {ids_o[:8]}... where the target's gives {ids_t[:8]}...; {advice}")


def dtype_note(target_dir: Path, unlearned_dir: Path) -> str | None:
    """A note when the two are stored in different dtypes: the weight deltas then include the cast."""
    stored = [(_read_json(Path(d) / MODEL_CONFIG) or {}) for d in (target_dir, unlearned_dir)]
    target, other = (c.get("dtype") or c.get("torch_dtype") for c in stored)
    if target and other and target != other:
        return (f"the unlearned model is stored in {other}, the target in {target}: its weight deltas include "
                "that cast as well as the unlearning")
    return None


def _safetensors_index(folder: Path) -> dict[str, Path] | None:
    """tensor name -> file, for a folder stored as (sharded) safetensors; None otherwise."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    index: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            index.update({name: path for name in fh.keys()})
    return index


def weights_identical(target_dir: Path, unlearned_dir: Path) -> bool:
    """Whether every weight of the unlearned model equals the target's (same dtype, every value).
    Safetensors are compared tensor by tensor, stopping at the first difference, so this reads little
    of a real unlearned model and never holds two full models in memory."""
    import torch

    if model_fingerprint(target_dir) == model_fingerprint(unlearned_dir):
        return True
    a, b = _safetensors_index(target_dir), _safetensors_index(unlearned_dir)
    if a is not None and b is not None:
        if set(a) != set(b):
            return False
        from safetensors import safe_open

        for name in sorted(a):
            with safe_open(str(a[name]), framework="pt") as fa, safe_open(str(b[name]), framework="pt") as fb:
                ta, tb = fa.get_tensor(name), fb.get_tensor(name)
            if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(ta, tb):
                return False
        return True
    from transformers import AutoModelForCausalLM  # other formats (e.g. pytorch_model.bin): load both

    sa = AutoModelForCausalLM.from_pretrained(target_dir).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(unlearned_dir).state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _adapter_weights(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of an adapter's saved tensors, by name."""
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as fh:
            return {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}
    binary = folder / "adapter_model.bin"
    if binary.is_file():
        import torch

        return {name: tuple(t.shape) for name, t in torch.load(binary, map_location="cpu", weights_only=True).items()}
    raise ConfigError(f"the adapter folder {folder} has no adapter_model.safetensors or adapter_model.bin")


def check_adapter_base(adapter_dir: Path, target_dir: Path, target_ref: str) -> list[str]:
    """A LoRA adapter must have been trained on the target: its declared base must not name another
    model, and every adapted module must exist in the target with the shape the adapter expects.
    Returns notes for the record (e.g. a base the adapter names that cannot be verified by name)."""
    config = _read_json(adapter_dir / ADAPTER_CONFIG)
    if config is None:
        raise ConfigError(f"{adapter_dir / ADAPTER_CONFIG} is not a readable JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ConfigError(f"the adapter {adapter_dir} is a {peft_type or 'untyped'} adapter: only LoRA adapters "
                          "can be merged onto the target (merge it yourself and pass the merged model folder)")
    notes = []
    base = config.get("base_model_name_or_path")
    if base:
        base_path = Path(base).expanduser()
        if base_path.is_dir() and (base_path / MODEL_CONFIG).is_file():
            if model_fingerprint(base_path) != model_fingerprint(target_dir):
                raise ConfigError(
                    f"the LoRA adapter {adapter_dir} was trained on the base model {base}, whose weights differ "
                    f"from the target {target_ref}: an adapter merged onto another model audits nothing. "
                    "Pass the adapter's own base model as --target")
        elif is_hub_id(base) and is_hub_id(target_ref) and split_hub_ref(base)[0].lower() != \
                split_hub_ref(target_ref)[0].lower():
            raise ConfigError(
                f"the LoRA adapter {adapter_dir} names {base} as its base model, but the target is {target_ref}: "
                "pass the adapter's own base model as --target")
        elif split_hub_ref(base)[0] != split_hub_ref(target_ref)[0]:
            notes.append(f"the adapter names its base {base!r}, which cannot be compared with the target "
                         f"{target_ref!r} by name; its shapes fit the target")
    shapes = parameter_shapes(_config(target_dir))
    for name, shape in sorted(_adapter_weights(adapter_dir).items()):
        match = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", name)
        if match is None:
            continue
        module, part = match.groups()
        weight = shapes.get(f"{module}.weight")
        if weight is None:
            raise ConfigError(f"the LoRA adapter {adapter_dir} adapts module {module}, which the target "
                              f"{target_ref} does not have: it was trained on another model (its base: {base})")
        # lora_A maps the module's input (r x in), lora_B produces its output (out x r).
        expected, got = (weight[-1], shape[-1]) if part == "lora_A" else (weight[0], shape[0])
        if expected != got:
            side = "input" if part == "lora_A" else "output"
            raise ConfigError(
                f"the LoRA adapter {adapter_dir} does not fit the target {target_ref}: module {module} has "
                f"{side} size {expected} in the target, but the adapter's {part} expects {got} (its base: "
                f"{base}). Pass the model the adapter was trained on as --target")
    return notes
