"""One-off probe (call 1): JAX 0.11.2 API, W8A8 int8/fp8 correctness and timing.

Run from the repository root: ``python scripts/_probe1.py`` after ``pip install -e .``, or
``PYTHONPATH=. python scripts/_probe1.py`` where jquant is not installed (e.g. the GPU machine).
"""

import json
import os
import tarfile
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

OUT = os.environ.get("OUT", "/tmp/out")
print(
    "jax",
    jax.__version__,
    jax.devices()[0].device_kind,
    getattr(jax.devices()[0], "compute_capability", None),
    jax.devices()[0].core_count,
    flush=True,
)
# 1. ship the 0.11.2 sources we depend on for an offline diff
import jax._src.pallas.mosaic_gpu as pmg
import jax.experimental.mosaic.gpu as mg
import jax.experimental.pallas.ops.gpu as opsgpu

with tarfile.open(os.path.join(OUT, "jax0112_src.tar.gz"), "w:gz") as tf:
    for d, name in ((opsgpu, "ops_gpu"), (pmg, "pallas_mgpu"), (mg, "mosaic_gpu")):
        tf.add(os.path.dirname(d.__file__), arcname=name, filter=lambda ti: None if "__pycache__" in ti.name else ti)
from pallas_kernels import timing, w8a8


def rel(a, b):
    a = np.asarray(a.astype(jnp.float32))
    b = np.asarray(b.astype(jnp.float32))
    return (
        float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
        float(np.abs(a - b).max()),
        bool(np.isfinite(a).all()),
    )


def inputs(dt, key, m, k, n):
    kx, kw, ks, kt, kb = jax.random.split(key, 5)
    if dt == "int8":
        x = jax.random.randint(kx, (m, k), -127, 128, jnp.int32).astype(jnp.int8)
        w = jax.random.randint(kw, (n, k), -127, 128, jnp.int32).astype(jnp.int8)
    else:
        x = (jax.random.normal(kx, (m, k)) * 2).astype(jnp.float8_e4m3fn)
        w = (jax.random.normal(kw, (n, k)) * 2).astype(jnp.float8_e4m3fn)
    return (
        x,
        jax.random.uniform(ks, (m, 1), minval=0.5, maxval=1.5) / 127,
        w,
        jax.random.uniform(kt, (n,), minval=0.5, maxval=1.5) / 127,
        jax.random.normal(kb, (n,)),
    )


res = []
for dt in ("int8", "fp8"):
    f = w8a8.int8_matmul if dt == "int8" else w8a8.fp8_matmul
    r = w8a8.int8_matmul_reference if dt == "int8" else w8a8.fp8_matmul_reference
    for m, k, n in [(4096, 3072, 3072), (1000, 1000, 520), (1, 64, 8), (300, 1536, 8960), (8, 256, 128)]:
        try:
            a = inputs(dt, jax.random.key(m + k + n), m, k, n)
            out = jax.jit(f)(*a)
            ref = jax.jit(r)(*a)
            e = rel(out, ref)
            ok = e[0] < 5e-3 and e[2]
            print(f"CHECK {dt} {m}x{k}x{n}: rel={e[0]:.2e} maxabs={e[1]:.3g} {'PASS' if ok else 'FAIL'}", flush=True)
        except Exception as ex:
            print(f"CHECK {dt} {m}x{k}x{n}: ERROR {type(ex).__name__}: {str(ex)[:1500]}", flush=True)
            traceback.print_exc()


# timing
def gemm_sets(dt, m, k, n, R):
    return [inputs(dt, jax.random.key(100 + i), m, k, n) for i in range(R)]


rows = []
for m, k, n in [(4096, 3072, 3072), (4096, 3072, 12288), (4096, 1536, 1536), (32760, 5120, 5120)]:
    R = timing.copies_for(m * k * 2 + n * k * 2 + m * n * 2)
    xb = [
        (
            jax.random.normal(jax.random.key(i), (m, k), jnp.bfloat16),
            jax.random.normal(jax.random.key(50 + i), (n, k), jnp.bfloat16),
        )
        for i in range(R)
    ]
    t_bf16 = timing.time_fn(
        lambda x, w: lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(
            jnp.bfloat16
        ),
        xb,
    )["us"]
    del xb
    line = {"m": m, "k": k, "n": n, "bf16": t_bf16}
    for dt in ("int8", "fp8"):
        sets = gemm_sets(dt, m, k, n, R)
        acc = jnp.int32 if dt == "int8" else jnp.float32
        line["xla_" + dt] = timing.time_fn(
            lambda x, xs, w, ws, b: (
                lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=acc).astype(jnp.float32)
                * xs
                * ws
                + b
            ).astype(jnp.bfloat16),
            sets,
        )["us"]
        f = w8a8.int8_matmul if dt == "int8" else w8a8.fp8_matmul
        for name, cfg in [
            ("n_s4", w8a8.GemmConfig()),
            ("n_s3", w8a8.GemmConfig(stages=3)),
            ("m_s4", w8a8.GemmConfig(wg_dim="m")),
            ("n_s4_w16", w8a8.GemmConfig(grid_tile_width=16)),
            ("n_s4_minm", w8a8.GemmConfig(grid_minor="m")),
        ]:
            try:
                line[f"{dt}_{name}"] = timing.time_fn(lambda *a: f(*a, config=cfg), sets)["us"]
            except Exception as ex:
                line[f"{dt}_{name}"] = f"ERR {type(ex).__name__}: {str(ex)[:300]}"
        del sets
    rows.append(line)
    print("TIME", json.dumps(line), flush=True)
json.dump(rows, open(os.path.join(OUT, "probe1.json"), "w"), indent=1)
for l in rows:
    print(l)
