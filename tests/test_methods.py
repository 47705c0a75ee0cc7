"""Unlearning methods end to end on the tiny Llama: data windows, the shared loop, the plugins."""

from __future__ import annotations

import filecmp
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qubench import registry
from qubench.errors import ConfigError
from qubench.methods.base import UnlearnContext
from qubench.methods.data import chunk_documents, collate, forget_retain_batches
from qubench.methods.ga import GA
from qubench.methods.losses import gradient_ascent_loss, mean_nll
from qubench.methods.train_loop import TrainingError
from qubench.tasks.muse_layout import TaskData

from toy_corpus import FAST, FORGET, RETAIN



def task_data(tmp_path: Path, forget=FORGET, retain=RETAIN) -> TaskData:
    return TaskData(tmp_path, list(forget), list(retain), [], [], [], [], [], [], [], [], [])


def run(method: str, params: dict, target: Path, out: Path, seed: int = 0, data: TaskData | None = None):
    plugin = registry.create("methods", method, params)
    ctx = UnlearnContext(target, None, data or task_data(out.parent), out, seed=seed, progress=False)
    return plugin.unlearn(ctx)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def forget_nll(model_dir: Path) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    windows = chunk_documents(FORGET, tokenizer, 32)
    with torch.no_grad():
        return mean_nll(model, collate(windows, tokenizer.pad_token_id)).item()


# --- data -------------------------------------------------------------------


def test_windows_start_with_bos_and_cover_the_document(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    doc = FORGET[0] + " " + FORGET[1]
    body = tokenizer(doc, add_special_tokens=False)["input_ids"]
    windows = chunk_documents([doc], tokenizer, max_len=8)
    assert all(w[0] == tokenizer.bos_token_id and 2 <= len(w) <= 8 for w in windows)
    assert sum((w[1:] for w in windows), []) == body  # nothing lost, nothing repeated
    assert len(windows) == math.ceil(len(body) / 7)


def test_forget_batches_cover_each_epoch_and_retain_cycles():
    forget = [[1, 10], [1, 11], [1, 12]]
    retain = [[1, 20, 21], [1, 22]]
    gen = torch.Generator().manual_seed(0)
    out = list(forget_retain_batches(forget, retain, batch_size=2, epochs=2, generator=gen, pad_id=0))
    assert [e for e, _, _ in out] == [0, 0, 1, 1]
    for epoch in (0, 1):
        seen = sorted(int(f.input_ids[r, 1]) for e, f, _ in out if e == epoch for r in range(len(f)))
        assert seen == [10, 11, 12]
    assert all(len(f) == len(r) for _, f, r in out)
    used = [int(r.input_ids[i, 1]) for _, _, r in out for i in range(len(r))]
    # 6 retain draws from 2 windows: each shuffled pass uses both before repeating
    assert all(sorted(used[i : i + 2]) == [20, 22] for i in (0, 2, 4))


# --- every method -----------------------------------------------------------


@pytest.mark.parametrize("method", ["ga", "ga_gdr", "ga_klr", "npo", "npo_gdr", "npo_klr"])
def test_method_writes_a_changed_loadable_model(method, tiny_model_dir, tmp_path):
    out = tmp_path / method
    outcome = run(method, FAST, tiny_model_dir, out)
    assert outcome.steps == 2 and len(outcome.log) == 2
    terms = {"loss", "forget"} | ({"retain"} if "_" in method else set())
    assert terms | {"grad_norm", "lr"} <= set(outcome.log[-1]) and set(outcome.final_losses) == terms
    for entry in outcome.log:
        retain = entry.get("retain", 0.0)
        assert entry["loss"] == pytest.approx(entry["forget"] + 1.0 * retain, rel=1e-5)  # alpha = 1
    if method.startswith("npo"):
        assert outcome.log[0]["forget"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)  # model == target

    AutoModelForCausalLM.from_pretrained(out)  # loadable
    assert AutoTokenizer.from_pretrained(out)("a b").input_ids == AutoTokenizer.from_pretrained(
        tiny_model_dir
    )("a b").input_ids
    before, after = weights(tiny_model_dir), weights(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["ga", "npo"])
def test_forget_nll_goes_up(method, tiny_model_dir, tmp_path):
    run(method, {**FAST, "max_steps": 4}, tiny_model_dir, tmp_path / "out")
    assert forget_nll(tmp_path / "out") > forget_nll(tiny_model_dir) + 0.01


def test_same_seed_is_bit_identical_and_other_seed_differs(tiny_model_dir, tmp_path):
    params = {**FAST, "max_steps": 3}
    a = run("ga_klr", params, tiny_model_dir, tmp_path / "a", seed=7)
    b = run("ga_klr", params, tiny_model_dir, tmp_path / "b", seed=7)
    c = run("ga_klr", params, tiny_model_dir, tmp_path / "c", seed=8)
    wa, wb, wc = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.log == b.log
    # a different data order changes the weights by far more than float noise
    assert max((wa[k] - wc[k]).abs().max().item() for k in wa) > 1e-4
    assert a.log != c.log


def test_accumulation_and_warmup_in_the_log(tiny_model_dir, tmp_path):
    data = task_data(tmp_path, forget=FORGET[:2] * 2 + FORGET[2:])  # 5 windows
    params = {"lr": 1e-3, "batch_size": 1, "grad_accum": 2, "max_len": 32, "epochs": 2, "warmup_steps": 2}
    outcome = run("ga", params, tiny_model_dir, tmp_path / "out", data=data)
    # 5 micro-batches per epoch in groups of 2, 2, 1 -> 3 steps per epoch
    assert outcome.steps == 6 and [e["epoch"] for e in outcome.log] == [1, 1, 1, 2, 2, 2]
    assert [e["lr"] for e in outcome.log] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])

    # Step 1 accumulates two windows of the unchanged target: its logged loss is their mean
    # and its gradient norm is that of the mean loss.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    windows = chunk_documents(data.forget, tokenizer, 32)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0)).tolist()[:2]
    losses = [gradient_ascent_loss(model, collate([windows[i]], tokenizer.pad_token_id)) for i in order]
    mean = (losses[0] + losses[1]) / 2
    mean.backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert outcome.log[0]["loss"] == pytest.approx(mean.item(), rel=1e-5)
    assert outcome.log[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_saves_in_the_targets_dtype(tiny_model_dir, tmp_path):
    target = tmp_path / "bf16_target"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16).save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    run("ga", {**FAST, "max_steps": 1}, target, tmp_path / "out")
    assert AutoConfig.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
    assert {t.dtype for t in weights(tmp_path / "out").values()} == {torch.bfloat16}


# --- errors -----------------------------------------------------------------


def test_unknown_parameter_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        registry.create("methods", "ga", {"learning_rate": 1e-3})
    assert "learning_rate" in str(err.value) and "allowed parameters" in str(err.value)
    assert "lr (default" in str(err.value) and "beta" not in str(err.value)
    with pytest.raises(ConfigError, match="alpha"):
        registry.create("methods", "npo", {"alpha": 1.0})  # plain NPO has no retain term
    assert registry.create("methods", "npo_klr", {"alpha": 0.5, "beta": 0.2}).config.beta == 0.2


def test_divergence_raises_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match="non-finite .* at optimizer step") as err:
        run("ga", {**FAST, "lr": 1e30, "max_steps": 5}, tiny_model_dir, tmp_path / "out")
    assert "lr=1e+30" in str(err.value)


def test_nan_loss_is_caught_before_backward(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(GA, "forget_loss", lambda self, model, ref, forget: torch.tensor(float("nan")))
    with pytest.raises(TrainingError, match=r"non-finite loss at optimizer step 1 \(epoch 1\)"):
        run("ga", FAST, tiny_model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_retain_set_is_a_data_error(tiny_model_dir, tmp_path):
    from qubench.errors import DataError

    with pytest.raises(DataError, match="retain"):
        run("ga_gdr", FAST, tiny_model_dir, tmp_path / "out", data=task_data(tmp_path, retain=[]))


def test_progress_bar_runs(tiny_model_dir, tmp_path):
    plugin = registry.create("methods", "ga", {**FAST, "max_steps": 1})
    ctx = UnlearnContext(tiny_model_dir, None, task_data(tmp_path), tmp_path / "out", progress=True)
    assert plugin.unlearn(ctx).steps == 1


# --- references -------------------------------------------------------------


def test_target_copies_the_target_unchanged(tiny_model_dir, tmp_path):
    ctx = UnlearnContext(tiny_model_dir, None, task_data(tmp_path), tmp_path / "out", progress=False)
    registry.create("methods", "target").unlearn(ctx)
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tiny_model_dir, tmp_path / "out", names, shallow=False)
    assert match == names and not mismatch and not errors


def test_retrain_copies_the_retrain_model_or_explains_why_not(tiny_model_dir, tmp_path):
    retrain = tmp_path / "retrain"
    shutil.copytree(tiny_model_dir, retrain)
    (retrain / "marker.txt").write_text("retrain")
    plugin = registry.create("methods", "retrain")
    plugin.unlearn(UnlearnContext(tiny_model_dir, retrain, task_data(tmp_path), tmp_path / "out"))
    assert (tmp_path / "out" / "marker.txt").read_text() == "retrain"
    with pytest.raises(ConfigError, match="retrain model"):
        plugin.unlearn(UnlearnContext(tiny_model_dir, None, task_data(tmp_path), tmp_path / "out2"))
