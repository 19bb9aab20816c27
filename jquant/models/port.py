"""What every port declares: its config dataclass, module, explicit key map and layer roles.

A port is a `Port` record; `models.loading` reads checkpoints through it and `init_params`
builds random weights through it, so the three ports share one loader and one initializer.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, ClassVar, Mapping, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

C = TypeVar("C", bound="DiffusersConfig")


@dataclasses.dataclass(frozen=True)
class DiffusersConfig:
    """Base of the port configs: fields mirror the keys of diffusers' config.json."""

    CLASS_NAME: ClassVar[str] = ""

    @classmethod
    def from_diffusers(cls: type[C], raw: Mapping[str, Any]) -> C:
        """Build from a config.json dict; `_`-prefixed keys are metadata, other unknown keys
        (diffusers ignores them too) are dropped with a warning naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in names and not k.startswith("_"))
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring config keys not used by the port: {unknown}", stacklevel=2)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """config.json contents (lists for tuples, `_class_name` set)."""
        out: dict[str, Any] = {"_class_name": self.CLASS_NAME}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One tensor: Flax param path ('/'-joined), diffusers state-dict key, and the layout change.

    kind: "copy" (same layout), "linear" (torch (out, in) <-> Dense kernel (in, out)) or
    "patch" (torch Conv weight (out, C, *k) <-> Dense kernel (C*prod(k), out); `torch_shape` set).
    """

    flax_path: str
    torch_key: str
    kind: str = "copy"
    torch_shape: tuple[int, ...] | None = None

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        if self.kind == "copy":
            return array
        if self.kind == "linear":
            return array.T if array.ndim == 2 else array
        if self.kind == "patch":
            return array.reshape(array.shape[0], -1).T
        raise ValueError(f"KeyEntry {self.torch_key}: unknown kind {self.kind!r}")

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.kind == "copy":
            return array
        if self.kind == "linear":
            return array.T if array.ndim == 2 else array
        if self.kind == "patch":
            if self.torch_shape is None or math.prod(self.torch_shape) != array.size:
                raise ValueError(f"KeyEntry {self.torch_key}: patch kernel {array.shape} vs torch {self.torch_shape}")
            return array.T.reshape(self.torch_shape)
        raise ValueError(f"KeyEntry {self.torch_key}: unknown kind {self.kind!r}")


def linear(flax_prefix: str, torch_prefix: str, bias: bool = True) -> list[KeyEntry]:
    """Entries of one nn.Linear <-> nn.Dense."""
    out = [KeyEntry(f"{flax_prefix}/kernel", f"{torch_prefix}.weight", "linear")]
    if bias:
        out.append(KeyEntry(f"{flax_prefix}/bias", f"{torch_prefix}.bias"))
    return out


def mlp(flax_prefix: str, torch_prefix: str, names: tuple[str, ...] = ("linear_1", "linear_2")) -> list[KeyEntry]:
    """Entries of consecutive nn.Linear submodules (an EmbedMLP: `linear_1`, `linear_2`)."""
    return [e for n in names for e in linear(f"{flax_prefix}/{n}", f"{torch_prefix}.{n}")]


def norm(flax_prefix: str, torch_prefix: str, bias: bool = True) -> list[KeyEntry]:
    """Entries of an affine LayerNorm (bias=True) or RMSNorm (bias=False): weight -> scale."""
    out = [KeyEntry(f"{flax_prefix}/scale", f"{torch_prefix}.weight")]
    if bias:
        out.append(KeyEntry(f"{flax_prefix}/bias", f"{torch_prefix}.bias"))
    return out


@dataclasses.dataclass(frozen=True)
class Port:
    """A Flax port of one diffusers model class.

    keep_fp32: regexes (re.search over Flax paths) of params kept in float32 when loading in a
    lower precision, mirroring diffusers' `_keep_in_fp32_modules`.
    ignore_unexpected: regexes of checkpoint keys diffusers itself ignores on load.
    """

    class_names: tuple[str, ...]
    config_cls: type[DiffusersConfig]
    module_cls: type[nn.Module]
    key_map: Callable[[Any], list[KeyEntry]]
    dummy_inputs: Callable[[Any], dict[str, jax.Array]]
    layer_roles: Callable[[Any], dict[str, tuple[str, ...]]]
    keep_fp32: tuple[str, ...] = ()
    ignore_unexpected: tuple[str, ...] = ()

    def module(self, config: DiffusersConfig, dtype: Any = jnp.float32) -> nn.Module:
        return self.module_cls(config=config, dtype=dtype)

    def init_params(self, config: DiffusersConfig, rng: jax.Array) -> dict[str, Any]:
        """Random float32 params (the module's own initializers), without diffusers."""
        model = self.module(config)
        return jax.jit(lambda r: model.init(r, **self.dummy_inputs(config))["params"])(rng)

    def param_shapes(self, config: DiffusersConfig) -> dict[str, Any]:
        """Param tree of ShapeDtypeStructs, computed without allocating (jax.eval_shape)."""
        model = self.module(config)
        return jax.eval_shape(lambda r: model.init(r, **self.dummy_inputs(config))["params"], jax.random.key(0))


def param_count(params: Any) -> int:
    """Number of scalar parameters in a param tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
