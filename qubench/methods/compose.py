"""Method specs that compose: "base+modifier[+modifier...]", e.g. "npo_klr+hinge",
"ga_gdr+lora", "ga_gdr+sure+hinge".

The base is any registered loss-based method (ga, ga_gdr, ga_klr, npo,
npo_gdr, npo_klr, or a third party's `LossBasedMethod`); it supplies the loss.
Modifiers change how that loss is optimised; each is a `TrainHook` of the
shared loop:

- hinge  QUAIL's logit hinge on the forget set        (qubench.methods.hinge)
- sure   SURE's saliency mask: only salient modules    (qubench.methods.saliency)
- lora   LoRA adapters, merged before saving           (qubench.methods.lora)
- inbucket  the known-answer control: the update hidden inside one
         quantizer's buckets, so that quantizer undoes it exactly  (qubench.methods.inbucket)

Rules, checked before any work starts:
- exactly one base, first; each modifier at most once; unknown parts get
  the nearest names as suggestions;
- `sure` and `lora` exclude each other: both decide which weights move (a
  mask over the base weights vs low-rank adapters with every base weight
  frozen), so a "mask on an adapter model" would either freeze the adapters
  by the base weights' saliency or be a different method altogether;
- `inbucket` and `lora` exclude each other: the buckets bound each effective
  weight after every step, but LoRA keeps the update as a low-rank product
  outside the weights until the final merge, and clamping that merge alone
  would throw away what the adapters learned unconstrained;
- presets (quail, sure, lora) are compositions already and cannot be a base:
  compose their base instead (e.g. ga_gdr+hinge+lora).

Modifier order does not matter: the method's name is canonical (sure, lora,
hinge, then inbucket, which freezes after sure has chosen what trains), so
"ga_gdr+hinge+sure" and "ga_gdr+sure+hinge" are one method and share cached
results.

Config: the base's config plus every modifier's fields (prefixed by the
modifier's name: hinge_*, sure_*, lora_*, inbucket_*), still forbidding
unknown fields.
A modifier may change a base default (sure and lora default `lr` to 1e-4, as
in their papers; inbucket `lr` 1e-4 and, where the base has a retain term,
its weight `alpha` 3). `params()` records the composition (base and modifiers)
beside every hyper-parameter.
"""

from __future__ import annotations

import copy
import difflib
import functools
from typing import Any, ClassVar

from pydantic import create_model

from qubench.errors import ConfigError
from qubench.methods.hinge import LogitHinge
from qubench.methods.inbucket import InBucket
from qubench.methods.lora import LoraAdapters
from qubench.methods.saliency import SaliencyMask
from qubench.methods.train_loop import LossBasedMethod, TrainHook

SEPARATOR = "+"
# Dict order is the canonical order: what trains (sure / lora) is settled before the hinge adds its term,
# and inbucket comes last: it freezes every unquantized weight after sure has chosen which modules train.
MODIFIERS: dict[str, type[TrainHook]] = {m.name: m for m in (SaliencyMask, LoraAdapters, LogitHinge, InBucket)}
INCOMPATIBLE: dict[frozenset[str], str] = {
    frozenset({"sure", "lora"}): (
        "both decide which weights move: sure trains a salient subset of the base weights, lora freezes "
        "every base weight and trains adapters; choose one"
    ),
    frozenset({"inbucket", "lora"}): (
        "inbucket bounds every effective weight after each step, but lora keeps its update as a low-rank "
        "product outside the weights until the final merge; clamping only the merged result would discard "
        "what the adapters learned unconstrained. Use inbucket on the full weights (e.g. ga_gdr+inbucket)"
    ),
}


class ComposedMethod(LossBasedMethod):
    """A base loss-based method run with modifier hooks. Built by `compose`, never registered directly."""

    base_method: ClassVar[type[LossBasedMethod]]
    modifiers: ClassVar[tuple[type[TrainHook], ...]] = ()

    @classmethod
    def composition(cls) -> dict[str, Any]:
        return {"base": cls.base_method.name, "modifiers": [m.name for m in cls.modifiers]}

    def train_hooks(self) -> list[TrainHook]:
        return [*super().train_hooks(), *(modifier(self) for modifier in self.modifiers)]

    def params(self) -> dict[str, Any]:
        return {"composition": self.composition(), **super().params()}


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def parse(spec: str) -> tuple[str, tuple[str, ...]]:
    """(base name, modifier names in canonical order), or a ConfigError that says what to write."""
    parts = [part.strip() for part in spec.split(SEPARATOR)]
    example = "e.g. 'ga_gdr+hinge' or 'npo_klr+sure+hinge'"
    if any(not part for part in parts):
        raise ConfigError(f"method {spec!r} has an empty part; write base+modifier[+modifier...], {example}")
    base, mods = parts[0], parts[1:]
    if base in MODIFIERS:
        raise ConfigError(f"method {spec!r} starts with the modifier {base!r}: the base loss comes first, "
                          f"e.g. 'ga_gdr{SEPARATOR}{base}'")
    seen: list[str] = []
    for mod in mods:
        if mod in seen:
            raise ConfigError(f"method {spec!r} lists the modifier {mod!r} twice; each modifier applies once")
        if mod not in MODIFIERS:
            from qubench import registry

            if mod in registry.names("methods"):
                hint = f" {mod!r} is a method: a composition has one base, first."
            else:
                hint = _suggest(mod, MODIFIERS)
            raise ConfigError(f"unknown modifier {mod!r} in method {spec!r}.{hint} "
                              f"Modifiers: {', '.join(MODIFIERS)}")
        seen.append(mod)
    for pair, why in INCOMPATIBLE.items():
        if pair <= set(seen):
            a, b = sorted(pair)
            raise ConfigError(f"method {spec!r} combines {a!r} and {b!r}, which cannot work together: {why}")
    return base, tuple(sorted(seen, key=list(MODIFIERS).index))


def _merged_config(base: type[LossBasedMethod], mods: tuple[type[TrainHook], ...]):
    owners = {field: base.name for field in base.Config.model_fields}
    overrides: dict[str, tuple[Any, Any]] = {}
    for mod in mods:
        for field in mod.Config.model_fields:
            if field in owners:
                raise ConfigError(f"modifier {mod.name!r} and {owners[field]!r} both define the parameter {field!r}")
            owners[field] = mod.name
        for field, value in mod.base_defaults.items():
            if field not in base.Config.model_fields:
                continue  # e.g. inbucket's retain weight `alpha` on plain ga, which has no retain term
            if field in overrides and overrides[field][1].default != value:
                raise ConfigError(f"modifiers disagree on the default of {field!r}")
            info = copy.copy(base.Config.model_fields[field])
            info.default = value
            overrides[field] = (info.annotation, info)
    name = base.Config.__name__ + "".join(f"_{m.name}" for m in mods)
    return create_model(name, __base__=(base.Config, *(m.Config for m in mods)), **overrides)


@functools.cache
def _build(base_name: str, modifier_names: tuple[str, ...]) -> type[ComposedMethod]:
    from qubench import registry

    base = registry.get("methods", base_name)  # unknown base: the registry's own error with suggestions
    if issubclass(base, ComposedMethod):
        inner = SEPARATOR.join([base.base_method.name, *(m.name for m in base.modifiers)])
        raise ConfigError(f"{base_name!r} is already a composition ({inner}); compose its base instead, "
                          f"e.g. '{inner}{SEPARATOR}{SEPARATOR.join(modifier_names)}'")
    if not issubclass(base, LossBasedMethod):
        raise ConfigError(f"{base_name!r} is not a loss-based method, so it cannot take modifiers; "
                          "bases: ga, ga_gdr, ga_klr, npo, npo_gdr, npo_klr")
    mods = tuple(MODIFIERS[m] for m in modifier_names)
    name = SEPARATOR.join([base_name, *modifier_names])
    namespace = {
        "name": name,
        "description": f"{base.description} With: " + "; ".join(m.description for m in mods) + ".",
        "Config": _merged_config(base, mods),
        "base_method": base,
        "modifiers": mods,
        "provided_by": base_name,
        "is_control": base.is_control or any(m.is_control for m in mods),
        "__module__": __name__,
    }
    return type(name, (ComposedMethod, base), namespace)


def compose(spec: str) -> type[ComposedMethod]:
    """The method class for "base+modifier[+modifier...]" (cached: one class per canonical spec)."""
    return _build(*parse(spec))


def resolve(name: str) -> type[ComposedMethod] | None:
    """The registry's resolver for the methods family (entry point `qubench.resolvers: methods`):
    a composition for names with a "+", None for every other name."""
    return compose(name) if SEPARATOR in name else None
