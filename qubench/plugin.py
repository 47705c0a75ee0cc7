"""The small base every plugin family shares: a name, a one-line description,
and a pydantic config that forbids unknown fields (llm-compressor style)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from qubench.errors import ConfigError


class PluginConfig(BaseModel):
    """Base for every plugin's typed hyper-parameters. Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin:
    """A named, configurable stage implementation found through entry points."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    #: For a plugin built on demand by a family resolver (not registered itself): the registered plugin
    #: whose package provides it, e.g. a composition's base method. Its provenance is that one's.
    provided_by: ClassVar[str | None] = None

    def __init__(self, config: PluginConfig | None = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_params(cls, params: dict[str, Any] | None = None):
        """Validate `params` against the plugin's config before any work starts."""
        try:
            return cls(cls.Config.model_validate(params or {}))
        except ValidationError as exc:
            raise ConfigError(_explain(cls, exc)) from None

    def params(self) -> dict[str, Any]:
        """Every hyper-parameter, defaults included, as recorded in results."""
        return self.config.model_dump(mode="json")


def _explain(cls: type[Plugin], exc: ValidationError) -> str:
    lines = [f"invalid parameters for {cls.name!r}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(config)"
        lines.append(f"  {where}: {err['msg']}")
    fields = ", ".join(f"{k} (default {v.get_default(call_default_factory=True)!r})"
                       for k, v in cls.Config.model_fields.items())
    lines.append(f"  allowed parameters: {fields or 'none'}")
    return "\n".join(lines)
