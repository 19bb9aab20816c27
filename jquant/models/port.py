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

from jquant.models.roles import RoleRules, assign_roles

C = TypeVar("C", bound="DiffusersConfig")


@dataclasses.dataclass(frozen=True)
class DiffusersConfig:
    """Base of the port configs: fields mirror the keys of diffusers' config.json. Every port's
    config has `num_attention_heads`, `attention_head_dim`, `in_channels` and `out_channels`."""

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

    @property
    def inner_dim(self) -> int:
        """Attention width (heads * head_dim), the model width of every port."""
        return self.num_attention_heads * self.attention_head_dim  # type: ignore[attr-defined]

    @property
    def out_dim(self) -> int:
        """Output channels as most diffusers models resolve them: `out_channels or in_channels`."""
        return self.out_channels or self.in_channels  # type: ignore[attr-defined]


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
        return self._convert(array, to_torch=False)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        return self._convert(array, to_torch=True)

    def _convert(self, array: np.ndarray, to_torch: bool) -> np.ndarray:
        """One layout change both ways: "copy" and "linear" (a transpose) are their own inverses."""
        if self.kind == "copy":
            return array
        if self.kind == "linear":
            return array.T if array.ndim == 2 else array
        if self.kind == "patch":
            if not to_torch:
                return array.reshape(array.shape[0], -1).T
            if self.torch_shape is None or math.prod(self.torch_shape) != array.size:
                raise ValueError(f"KeyEntry {self.torch_key}: patch kernel {array.shape} vs torch {self.torch_shape}")
            return array.T.reshape(self.torch_shape)
        raise ValueError(f"KeyEntry {self.torch_key}: unknown kind {self.kind!r}")


def _with_bias(weight: KeyEntry, flax_prefix: str, torch_prefix: str, bias: bool) -> list[KeyEntry]:
    """`weight`, then the layer's `bias` entry when it has one."""
    return [weight, KeyEntry(f"{flax_prefix}/bias", f"{torch_prefix}.bias")] if bias else [weight]


def linear(flax_prefix: str, torch_prefix: str, bias: bool = True) -> list[KeyEntry]:
    """Entries of one nn.Linear <-> nn.Dense."""
    weight = KeyEntry(f"{flax_prefix}/kernel", f"{torch_prefix}.weight", "linear")
    return _with_bias(weight, flax_prefix, torch_prefix, bias)


def mlp(flax_prefix: str, torch_prefix: str, names: tuple[str, ...] = ("linear_1", "linear_2")) -> list[KeyEntry]:
    """Entries of consecutive nn.Linear submodules (an EmbedMLP: `linear_1`, `linear_2`)."""
    return [e for n in names for e in linear(f"{flax_prefix}/{n}", f"{torch_prefix}.{n}")]


def norm(flax_prefix: str, torch_prefix: str, bias: bool = True) -> list[KeyEntry]:
    """Entries of an affine LayerNorm (bias=True) or RMSNorm (bias=False): weight -> scale."""
    return _with_bias(KeyEntry(f"{flax_prefix}/scale", f"{torch_prefix}.weight"), flax_prefix, torch_prefix, bias)


def patch(flax_prefix: str, torch_prefix: str, torch_shape: tuple[int, ...], bias: bool = True) -> list[KeyEntry]:
    """Entries of a strided patch Conv (weight `torch_shape`) <-> a Dense over `blocks.patchify` tokens."""
    weight = KeyEntry(f"{flax_prefix}/kernel", f"{torch_prefix}.weight", "patch", torch_shape)
    return _with_bias(weight, flax_prefix, torch_prefix, bias)


def feed_forward(flax_prefix: str, torch_prefix: str, bias: bool = True) -> list[KeyEntry]:
    """Entries of a diffusers FeedForward <-> `blocks.FeedForward`: `net.0.proj`, `net.2`."""
    return linear(f"{flax_prefix}/net_0/proj", f"{torch_prefix}.net.0.proj", bias) + linear(
        f"{flax_prefix}/net_2", f"{torch_prefix}.net.2", bias
    )


def attention_keys(
    flax_prefix: str,
    torch_prefix: str,
    bias: bool = True,
    out_bias: bool = True,
    qk_norm: str | None = "rms_norm",
    gated: bool = False,
) -> list[KeyEntry]:
    """Entries of a `blocks.Attention`: to_q/k/v (`bias`), to_out.0 (`out_bias`), then the q/k norms
    (`qk_norm` "rms_norm": scale only, "layer_norm": scale and bias, None: none) and LTX-2's gate."""
    f, t = flax_prefix, torch_prefix
    out = [e for p in ("to_q", "to_k", "to_v") for e in linear(f"{f}/{p}", f"{t}.{p}", bias)]
    out += linear(f"{f}/to_out_0", f"{t}.to_out.0", out_bias)
    if qk_norm is not None:
        affine = qk_norm == "layer_norm"
        out += norm(f"{f}/norm_q", f"{t}.norm_q", affine) + norm(f"{f}/norm_k", f"{t}.norm_k", affine)
    return out + (linear(f"{f}/to_gate_logits", f"{t}.to_gate_logits") if gated else [])


def adaln_single(flax_prefix: str, torch_prefix: str) -> list[KeyEntry]:
    """Entries of an `AdaLayerNormSingle`: its timestep MLP `emb.timestep_embedder`, then `linear`."""
    return mlp(f"{flax_prefix}/emb/timestep_embedder", f"{torch_prefix}.emb.timestep_embedder") + linear(
        f"{flax_prefix}/linear", f"{torch_prefix}.linear"
    )


def ada_output_keys() -> list[KeyEntry]:
    """Entries of the adaLN-continuous output head `norm_out` (AdaLayerNorm: `linear`) + `proj_out`."""
    return linear("norm_out/linear", "norm_out.linear") + linear("proj_out", "proj_out")


@dataclasses.dataclass(frozen=True)
class Port:
    """A Flax port of one diffusers model class.

    role_rules: (regex, roles) rules labelling every Dense kernel (`layer_roles`, `roles.assign_roles`).
    keep_fp32: regexes (re.search over Flax paths) of params kept in float32 when loading in a
    lower precision, mirroring diffusers' `_keep_in_fp32_modules`.
    ignore_unexpected: regexes of checkpoint keys diffusers itself ignores on load.
    aliases: other diffusers `_class_name`s the port loads (legacy class names).
    """

    config_cls: type[DiffusersConfig]
    module_cls: type[nn.Module]
    key_map: Callable[[Any], list[KeyEntry]]
    dummy_inputs: Callable[[Any], dict[str, jax.Array]]
    role_rules: RoleRules
    keep_fp32: tuple[str, ...] = ()
    ignore_unexpected: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        """The diffusers `_class_name`s this port loads: its config's CLASS_NAME, then `aliases`."""
        return (self.config_cls.CLASS_NAME, *self.aliases)

    def layer_roles(self, params: Any) -> dict[str, tuple[str, ...]]:
        """Role labels of every Dense kernel of a param tree of this port."""
        return assign_roles(params, self.role_rules)

    def module(self, config: DiffusersConfig, dtype: Any = jnp.float32) -> nn.Module:
        return self.module_cls(config=config, dtype=dtype)

    def init_params(self, config: DiffusersConfig, rng: jax.Array) -> dict[str, Any]:
        """Random float32 params (the module's own initializers), without diffusers. The jitted
        init is kept per (module class, config): another key reuses it instead of recompiling."""
        return _jitted_init(self, config)(rng)

    def param_shapes(self, config: DiffusersConfig) -> dict[str, Any]:
        """Param tree of ShapeDtypeStructs, computed without allocating (jax.eval_shape). The
        trace of the whole model's init is kept per (module class, config): loading, saving and
        checking one model share it. Each call returns a fresh tree."""
        key = (self.module_cls, config)
        try:
            shapes = _PARAM_SHAPES.get(key)
        except TypeError:  # an unhashable field value: nothing to key the cache on
            key, shapes = None, None
        if shapes is None:
            model = self.module(config)
            shapes = jax.eval_shape(lambda r: model.init(r, **self.dummy_inputs(config))["params"], jax.random.key(0))
            if key is not None:
                _PARAM_SHAPES[key] = shapes
        return jax.tree.map(lambda s: s, shapes)


_PARAM_SHAPES: dict[tuple[type, DiffusersConfig], dict[str, Any]] = {}


_INIT_FNS: dict[tuple[type, DiffusersConfig], Callable[[jax.Array], dict[str, Any]]] = {}


def _jitted_init(port: Port, config: DiffusersConfig) -> Callable[[jax.Array], dict[str, Any]]:
    """`port`'s jitted init for `config`, compiled once per (module class, config); a config
    that cannot be hashed gets a fresh one."""
    model = port.module(config)
    fn = jax.jit(lambda r: model.init(r, **port.dummy_inputs(config))["params"])
    try:
        return _INIT_FNS.setdefault((port.module_cls, config), fn)
    except TypeError:  # an unhashable field value: nothing to key the cache on
        return fn


def param_count(params: Any) -> int:
    """Number of scalar parameters in a param tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
