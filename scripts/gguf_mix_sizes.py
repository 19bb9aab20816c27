"""Size of each GGUF mix for the ported models' published configs (shapes only, no weights).

Usage: python scripts/gguf_mix_sizes.py > benchmarks/gguf_mix_sizes.md

Run from the repository root: ``python scripts/gguf_mix_sizes.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/gguf_mix_sizes.py`` where jquant is not installed (e.g. the GPU machine).
"""

from __future__ import annotations

import collections
import datetime
import math

import numpy as np
from flax import traverse_util

from jquant.algorithms.kquants import MIX_BASE, plan_kquant_mix
from jquant.codecs import CODECS
from jquant.models import flux, wan
from jquant.models.loading import port_for_config

MODELS = {"Wan2.1 T2V 1.3B": wan.WAN21_T2V_1_3B, "Wan2.1 T2V 14B": wan.WAN21_T2V_14B, "Flux.1-dev": flux.FLUX1_DEV}


def torch_shapes_and_roles(cfg) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, ...]]]:
    """Diffusers tensor name -> torch shape and roles, through the port's key map."""
    port = port_for_config(cfg)
    tree = port.param_shapes(cfg)
    flat = traverse_util.flatten_dict(tree, sep="/")
    roles = port.layer_roles(tree)
    shapes, by_name = {}, {}
    for e in port.key_map(cfg):
        view = np.broadcast_to(np.float32(0), flat[e.flax_path].shape)  # no memory
        shapes[e.torch_key] = tuple(e.to_torch(view).shape)
        by_name[e.torch_key] = roles.get(e.flax_path, ())
    return shapes, by_name


def main() -> None:
    print(f"# GGUF mix sizes ({datetime.date.today()}, `python scripts/gguf_mix_sizes.py`)\n")
    print("| model | params | mix | bits/weight | GB | share of values per type |")
    print("|---|---|---|---|---|---|")
    for label, cfg in MODELS.items():
        shapes, roles = torch_shapes_and_roles(cfg)
        n = sum(math.prod(s) for s in shapes.values())
        for mix in MIX_BASE:
            bits, share = 0.0, collections.Counter()
            for name, codec in plan_kquant_mix(mix, shapes, roles).items():
                size = math.prod(shapes[name])
                kind = codec.upper() if codec else ("F32" if len(shapes[name]) <= 1 else "F16")
                bits += size * (CODECS[codec].bits_per_weight if codec else (32 if kind == "F32" else 16))
                share[kind] += size
            mix_share = ", ".join(f"{k} {v / n:.1%}" for k, v in sorted(share.items()))
            print(f"| {label} | {n / 1e9:.2f} B | {mix} | {bits / n:.3f} | {bits / 8e9:.2f} | {mix_share} |")


if __name__ == "__main__":
    main()
