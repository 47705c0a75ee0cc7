"""Train the tiny from-scratch models of offline tasks: a base model on a generic
corpus, then the target (base fine-tuned on forget + retain) and the retrain
reference (base fine-tuned on retain only).

MUSE's targets are pretrained models fine-tuned on the corpus; mirroring that
(generic pre-training, then a fine-tune) matters here because how large the
weight changes behind memorisation are decides whether a later unlearning
update is small next to a quantization step.

On a GPU (the model's device), training runs under bf16 autocast with float32 weights and AdamW
state, the usual mixed-precision recipe; on the CPU, in float32, exactly as it always did.
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from qubench.progress import Steps
from qubench.tasks.base import TrainRecipe


def recipe_config(recipe: TrainRecipe, vocab_size: int | None = None, bos_token_id: int | None = None,
                  eos_token_id: int | None = None, pad_token_id: int | None = None) -> LlamaConfig:
    """The architecture of a recipe's models. `vocab_size` is the trained tokenizer's length (at most
    the recipe's `vocab_size`, which the memory plan uses before any tokenizer exists)."""
    return LlamaConfig(
        vocab_size=vocab_size or recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_seq_len,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )


def build_model(recipe: TrainRecipe, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(recipe_config(recipe, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                          tokenizer.pad_token_id))


def encode_docs(tokenizer: PreTrainedTokenizerBase, docs: list[str], max_len: int) -> list[list[int]]:
    """BOS + document + EOS, cut into windows of at most max_len tokens."""
    seqs = []
    for doc in docs:
        ids = tokenizer(doc).input_ids + [tokenizer.eos_token_id]
        seqs.extend(ids[i : i + max_len] for i in range(0, len(ids), max_len) if len(ids[i : i + max_len]) > 1)
    return seqs


def collate(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fit(
    model: LlamaForCausalLM,
    seqs: list[list[int]],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    pad_id: int,
    label: str,
    progress: bool = True,
) -> list[float]:
    """Next-token training with AdamW, linear warmup then cosine decay; returns the per-epoch mean loss.
    Runs where `model` is (see the module docstring for the GPU's mixed precision)."""
    if not seqs or epochs <= 0:
        return []
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(seqs) / batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, total // 20)
    # fused=True: one kernel for the whole update on a GPU; the CPU keeps the default implementation.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95),
                            **({"fused": True} if on_gpu else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    model.train()
    history = []
    with Steps(label, total, progress, transient=True) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(seqs), generator=gen).tolist()
            losses = []
            for start in range(0, len(order), batch_size):
                batch = collate([seqs[i] for i in order[start : start + batch_size]], pad_id)
                if on_gpu:
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = model(**batch).loss
                else:
                    loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
                bar.advance(1)
            # One synchronisation per epoch, not per step (`.item()` would wait for the GPU every step).
            history.append(sum(float(v) for v in losses) / len(losses))
    model.eval()
    return history
