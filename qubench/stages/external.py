"""Stage 3 of an audit: an unlearned model made outside qubench enters the chain where `Unlearned`
would. Like `ExistingModels` it is an existing folder or hub ID that qubench neither builds nor
caches; a peft LoRA adapter folder is first merged onto the target (`Merged`, a cached stage of its
own), since quantizers and engines take plain model folders — as arXiv 2602.13151 merges its LoRA
unlearning before quantizing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qubench import store
from qubench.fingerprint import model_fingerprint
from qubench.stages.base import Stage
from qubench.stages.models import PreparedModels

#: The pipeline step the audit's input checks fail under (they run before any quantization).
CHECK_STEP = "check"
#: The side file a merged folder carries: what was merged onto what.
MERGE_FILE = "qubench_merge.json"
# Bump when the merge code changes what it writes, so old merged folders are not reused.
MERGE_CODE_VERSION = 1


class Merged(Stage):
    """A LoRA adapter merged onto the target (peft's merge_and_unload), saved in the target's dtype with
    the target's tokenizer."""

    kind = "merged"
    description = "LoRA adapters merged onto their target (audits)"
    step = "prepare"
    group_shared = True

    def __init__(self, target_dir: Path, adapter_dir: Path):
        self.target_dir, self.adapter_dir = Path(target_dir), Path(adapter_dir)

    def identity(self) -> dict[str, Any]:
        return {"target": model_fingerprint(self.target_dir), "adapter": model_fingerprint(self.adapter_dir),
                "v": MERGE_CODE_VERSION}

    def label(self) -> str:
        return "lora"

    def build(self, tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from qubench.methods.lora import _peft

        peft = _peft()
        # dtype "auto": the dtype the target is stored in, as the lora modifier saves its merged model.
        base = AutoModelForCausalLM.from_pretrained(self.target_dir, dtype="auto")
        merged = peft.PeftModel.from_pretrained(base, self.adapter_dir).merge_and_unload()
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(self.target_dir).save_pretrained(tmp)
        store.write_json_atomic(tmp / MERGE_FILE, {"target": str(self.target_dir), "adapter": str(self.adapter_dir),
                                                   **self.identity()})


class ExternalUnlearned:
    """The unlearned model of an audit (`RunSpec.audit`): an existing folder or hub ID, or a LoRA
    adapter merged onto the target. Its checks (`check_inputs`, `check_separation`) refuse bad input
    before any quantization."""

    step = "prepare"
    timing = "prepare_unlearned"

    def __init__(self, audit, models: PreparedModels | None, target_ref: str | None = None,
                 log=lambda msg: None):
        self.audit, self.models, self.log = audit, models, log
        self.target_ref = target_ref or (models.target_id if models is not None else None)
        self.checkpoint = None   # the located checkpoint, once get() ran
        self.notes: list[str] = []

    def local(self):
        """The checkpoint on this machine, without downloading (None if it is not here)."""
        from qubench.audit import locate

        return locate(self.audit.unlearned)

    def merged(self, adapter_dir: Path) -> Merged:
        return Merged(self.models.target_dir, adapter_dir)

    def path(self) -> Path | None:
        """The folder that is quantized, if it can be named without downloading or merging anything."""
        found = self.local()
        if found is None:
            return None
        if found.is_adapter:
            return self.merged(found.path).path() if self.models is not None else None
        return found.path

    def exists(self) -> bool:
        found = self.local()
        if found is None:
            return False
        return not found.is_adapter or (self.models is not None and self.merged(found.path).exists())

    def activity(self) -> str:
        found = self.local()
        if found is None:
            return f"fetching the unlearned model {self.audit.unlearned} ..."
        return f"merging the LoRA adapter {self.audit.unlearned} onto the target ..."

    def get(self) -> Path:
        from qubench.audit import check_adapter_base, resolve

        self.checkpoint = resolve(self.audit.unlearned)
        if not self.checkpoint.is_adapter:
            return self.checkpoint.path
        # Before merging: a mismatched adapter would otherwise fail inside peft with a size error.
        self.notes += check_adapter_base(self.checkpoint.path, self.models.target_dir, self.target_ref)
        return self.merged(self.checkpoint.path).get()

    def check_inputs(self, unlearned_dir: Path, data) -> dict[str, Any]:
        """Refuse an unlearned model that is not the target's network with the target's tokenizer, or
        that is the target itself (unless allowed); return the audit's record for the result."""
        from qubench.audit import (check_same_network, check_same_tokenizer, dtype_note, provenance,
                                   weights_identical)
        from qubench.errors import ConfigError

        target_dir = self.models.target_dir
        check_same_network(target_dir, unlearned_dir)
        check_same_tokenizer(target_dir, unlearned_dir, _sample_texts(data))
        if note := dtype_note(target_dir, unlearned_dir):
            self.notes.append(note)
        identical = weights_identical(target_dir, unlearned_dir)
        if identical and not self.audit.allow_identical:
            raise ConfigError(
                f"the unlearned checkpoint {self.audit.unlearned} has exactly the target's weights: nothing was "
                "unlearned, so there is no forgetting for quantization to undo. Pass --allow-identical to audit "
                "it anyway (the result then says so)")
        if identical:
            self.notes.append("the unlearned checkpoint is identical to the target: nothing was unlearned")
        record = {"checkpoint": provenance(self.checkpoint), "identical_to_target": identical, "notes": self.notes}
        if self.checkpoint.is_adapter:
            record["merged"] = {"path": str(unlearned_dir), "fingerprint": model_fingerprint(unlearned_dir)}
        return record

    def check_separation(self, separation) -> None:
        """An audit whose target does not remember the forget set measurably stops here, unless allowed."""
        from qubench.errors import ConfigError

        if separation.status in ("not separated", "unchecked") and not self.audit.allow_no_separation:
            raise ConfigError(f"separation check failed: {separation.message}. Is --task (and its source) the "
                              "data the target was trained on? Pass --allow-no-separation to audit anyway")
        self.log(f"separation: {separation.message}")


def _sample_texts(data, n: int = 8) -> list[str]:
    """A few of the task's own texts, which the tokenizers must encode alike."""
    return [t for t in (list(data.forget)[:n] + list(data.retain)[:n]) if t]


def changed_since(audit, stored) -> str | None:
    """Why a stored audit result no longer describes the checkpoint (its local folder's content changed),
    or None when it still does (or the checkpoint is not here to compare)."""
    from qubench.audit import locate

    found = locate(audit.unlearned)
    recorded = ((stored.resolved.get("method") or {}).get("external") or {}).get("fingerprint")
    if found is None or recorded is None:
        return None
    now = model_fingerprint(found.path)
    return None if now == recorded else (f"the checkpoint {audit.unlearned} changed since it was audited "
                                         f"(fingerprint {recorded} then, {now} now)")

