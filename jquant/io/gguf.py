"""GGUF files: write and read quantized DiT weights (ggml block layouts) with their config.

Tensors are named as in diffusers checkpoints (``blocks.0.attn1.to_q.weight``) and stored
in torch layout: a linear weight is (out, in), and a quantized tensor's blocks run along
its last (contraction) axis, which is ggml's row axis. ggml lists dimensions innermost
first, so a GGUF shape is the numpy shape reversed; the ``gguf`` package's reader and
writer do that reversal.

* :func:`save_gguf` writes QArrays (Q8_0/Q4_K/Q5_K/Q6_K blocks) and float arrays.
* :func:`load_gguf` reads our files and other tools' GGUFs of the same models
  (e.g. city96's ComfyUI-GGUF conversions, including their ``comfy.gguf.orig_shape`` reshapes).
* :func:`export_gguf` quantizes a diffusers model directory per a mix (Q4_K_M, ...), in
  jquant's layout or (``layout="comfy"``) in the community layout ComfyUI-GGUF loads.
* :func:`load_gguf_params` turns a GGUF into (Flax module, params) through the models
  package's key map, from either layout (original names, fused tensors and the config read off
  the shapes for community files: :mod:`jquant.io.gguf_layouts`).
* :func:`save_gguf_params` writes a param tree back in either layout without re-encoding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from gguf import GGMLQuantizationType as GT
from tqdm import tqdm

from jquant.algorithms.kquants import MIX_BASE, plan_kquant_mix, roles_from_name
from jquant.codecs import CODECS, GGML_CODECS
from jquant.files import atomic_file
from jquant.formats import parse_spec
from jquant.io.gguf_layouts import (
    FAMILIES,
    FILE_TYPES,
    concat_rows,
    detect_family,
    family_for_config,
    float_type,
    infer_config,
    original_entries,
    plan_comfy_types,
    split_rows,
)
from jquant.models.loading import (
    CheckpointMismatchError,
    port_for_class,
    port_for_config,
    read_config,
    read_config_json,
)
from jquant.models.port import DiffusersConfig
from jquant.models.safetensors import (
    get_tensor,
    open_safetensors,
    read_header,
    weight_files,
)
from jquant.qarray import QArray

CONFIG_KEY = "jquant.config"  # diffusers config.json contents, as a JSON string
MIX_KEY = "jquant.mix"
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."  # city96: tensor stored flattened to (-1, 256)
DEFAULT_ARCH = "jquant"
LAYOUTS = ("jquant", "comfy")  # diffusers names (jquant's) | original names (ComfyUI-GGUF's)

_CODEC_OF_TYPE = {GT(c.ggml_type): name for name, c in CODECS.items()}
_FLOAT_TYPES = {
    GT.F32: np.float32,
    GT.F16: np.float16,
    GT.F64: np.float64,
    GT.I8: np.int8,
    GT.I16: np.int16,
    GT.I32: np.int32,
    GT.I64: np.int64,
}
SUPPORTED_TYPES = tuple(t.name for t in (*_FLOAT_TYPES, GT.BF16, *_CODEC_OF_TYPE))
# llama.cpp's general.file_type values of the mixes.
_FILE_TYPE = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7}
# general.architecture of the ports (ComfyUI-GGUF's names where it has one).
_ARCH_OF_CLASS = {"WanTransformer3DModel": "wan", "FluxTransformer2DModel": "flux", "DiTTransformer2DModel": "dit"}


class GGUFError(ValueError):
    """A GGUF file that cannot be read (truncated, malformed, or holding unsupported types)."""


def codec_qarray(
    blocks: np.ndarray | jax.Array, codec: str, dtype: Any = jnp.float32, *, device: bool = True
) -> QArray:
    """A QArray over raw ggml blocks u8[..., nb, block_bytes] in torch layout: the
    contraction (row) axis is the last logical axis. ``device=False`` keeps numpy blocks
    (host memory), e.g. while assembling a file."""
    qvalue = jnp.asarray(blocks) if device else np.asarray(blocks)
    return QArray(qvalue, None, spec=parse_spec(f"{codec}/axis=-1"), dtype=dtype, axis=-1)


# ----------------------------------------------------------------------------- writing


def _tensor_payload(name: str, value: Any) -> tuple[np.ndarray, GT]:
    """(array to write, ggml type) for one tensor; QArrays go out as raw blocks."""
    if isinstance(value, QArray):
        codec = CODECS.get(value.spec.fmt)
        if codec is None:
            raise ValueError(
                f"{name!r}: QArray format {value.spec.fmt!r} has no GGUF type; GGUF holds {sorted(CODECS)}"
            )
        blocks = np.asarray(value.qvalue)
        if blocks.ndim < 2 or blocks.shape[-1] != codec.block_bytes:
            raise ValueError(
                f"{name!r}: {codec.name} QArray blocks have shape {blocks.shape}, expected (..., nb, {codec.block_bytes})"
            )
        return np.ascontiguousarray(blocks.reshape(blocks.shape[:-2] + (-1,))), GT(codec.ggml_type)
    a = np.asarray(value)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.dtype == ml_dtypes.bfloat16:
        return np.ascontiguousarray(a).view(np.uint16), GT.BF16
    for t, dt in _FLOAT_TYPES.items():
        if a.dtype == dt:
            return np.ascontiguousarray(a), t
    raise ValueError(f"{name!r}: dtype {a.dtype} cannot be stored in GGUF (use float32/float16/bfloat16 or a QArray)")


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        v = int(value)
        writer.add_uint32(key, v) if 0 <= v < 2**32 else writer.add_int64(key, v)
    elif isinstance(value, (float, np.floating)):
        writer.add_float32(key, float(value))
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, Mapping):
        writer.add_string(key, json.dumps(value, sort_keys=True))
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise ValueError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF")


def save_gguf(
    path: str | os.PathLike,
    tensors: Mapping[str, QArray | np.ndarray | jax.Array],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` and ``metadata`` to a GGUF file, atomically.

    Args:
      path: output file; written to a temporary file beside it and moved into place, so a
        failure leaves any previous file untouched and no temporary file behind. An existing
        file there is replaced; a directory or a symlink is refused.
      tensors: name -> QArray (codec blocks, written raw with their ggml type; the
        contraction axis is the row axis, which makes a Flax (in, out) kernel come out in
        torch (out, in) layout) or float array (F32/F16/BF16, written as given).
      metadata: GGUF key -> value (str, int, float, bool, list; dicts become JSON
        strings). ``general.architecture`` defaults to 'jquant'.
    """
    if not tensors:
        raise ValueError("save_gguf: no tensors to write")
    return _write_gguf(path, {name: _tensor_payload(name, v) for name, v in tensors.items()}, metadata)


def _write_gguf(
    path: str | os.PathLike, payloads: Mapping[str, tuple[np.ndarray, GT]], metadata: Mapping[str, Any] | None
) -> Path:
    """Write (array, ggml type) payloads (raw blocks for block types) and metadata, atomically."""
    path = Path(path)
    metadata = dict(metadata or {})
    arch = str(metadata.pop("general.architecture", DEFAULT_ARCH))
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for key, value in metadata.items():
                _add_metadata(writer, key, value)
            for name, (array, ggml_type) in payloads.items():
                writer.add_tensor(name, array, raw_dtype=ggml_type if ggml_type not in _FLOAT_TYPES else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


# ----------------------------------------------------------------------------- reading


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that checks tensor types and extents before building array views, so
    unknown types and truncated files fail saying what is wrong (the caller adds the path)."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        # The base reader slices silently past the end; a corrupt array length then loops on
        # empty reads. Refuse any read that does not fit in the file.
        n = np.dtype(dtype).itemsize * int(count)
        if int(offset) < 0 or int(count) < 0 or int(offset) + n > len(self.data):
            raise GGUFError(
                f"truncated or corrupt header: the field at byte {int(offset)} needs {n} bytes, "
                f"file has {len(self.data)} bytes"
            )
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        data_end, first_cut = start_offs, None
        for field in fields:
            _len, name_data, _n_dims, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            type_id = int(raw_dtype[0])
            try:
                ggml_type = GT(type_id)
            except ValueError:
                raise GGUFError(f"tensor {name!r}: unknown ggml type id {type_id}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            n = int(np.prod(dims.astype(np.uint64))) if len(dims) else 1
            if len(dims) and int(dims[0]) % block:
                raise GGUFError(
                    f"tensor {name!r}: rows of {int(dims[0])} values are not whole {ggml_type.name} blocks of {block}"
                )
            end = start_offs + int(offset[0]) + n // block * type_size
            data_end = max(data_end, end)
            if end > size and first_cut is None:
                first_cut = name
        if first_cut is not None:
            raise GGUFError(
                f"truncated: header says {data_end - start_offs} bytes of tensor data, file has "
                f"{max(size - start_offs, 0)} (tensor {first_cut!r} and later are cut off)"
            )
        super()._build_tensors(start_offs, fields)


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if path.stat().st_size == 0:
        raise GGUFError(f"{path}: truncated: empty file (0 bytes)")
    try:
        reader = _CheckedReader(path, "r")
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    if reader.byte_order != "I":
        raise GGUFError(f"{path}: byte-swapped (big-endian) GGUF files are not supported")
    return reader


def _metadata_value(path: Path, key: str, field: Any) -> Any:
    try:
        return field.contents()
    except UnicodeDecodeError as e:
        raise GGUFError(f"{path}: metadata {key!r} is not valid UTF-8 ({e})") from None


def _orig_shape(name: str, field: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in field.contents())
    except (TypeError, ValueError):
        raise GGUFError(f"tensor {name!r}: bad {ORIG_SHAPE_PREFIX} metadata {field.contents()!r}") from None
    return shape


def _read_tensor(t: Any, orig_shape: tuple[int, ...] | None, dequantize_other: bool) -> QArray | np.ndarray:
    """One ReaderTensor as a QArray (codec types) or a numpy array (float types), copied."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type in _CODEC_OF_TYPE:
        codec = CODECS[_CODEC_OF_TYPE[t.tensor_type]]
        blocks = np.array(t.data, np.uint8).reshape(shape[:-1] + (shape[-1] // codec.block_elems, codec.block_bytes))
        if orig_shape is None:
            return codec_qarray(blocks, codec.name)
        values = np.asarray(codec.decode(jnp.asarray(blocks)))
    elif t.tensor_type == GT.BF16:
        values = np.array(t.data).view("<u2").view(ml_dtypes.bfloat16).reshape(shape)
    elif t.tensor_type in _FLOAT_TYPES:
        values = np.array(t.data, _FLOAT_TYPES[t.tensor_type]).reshape(shape)
    elif dequantize_other:
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(shape)
    else:
        raise AssertionError(t.tensor_type)  # filtered by load_gguf
    if orig_shape is not None:
        if math.prod(orig_shape) != values.size:
            raise GGUFError(
                f"tensor {t.name!r}: {ORIG_SHAPE_PREFIX} {orig_shape} does not match its {values.size} values"
            )
        values = values.reshape(orig_shape)
    return values


def load_gguf(
    path: str | os.PathLike, *, dequantize_other: bool = False
) -> tuple[dict[str, QArray | np.ndarray], dict[str, Any]]:
    """Read a GGUF file into ({name: QArray | np.ndarray}, metadata).

    Q8_0/Q4_K/Q5_K/Q6_K tensors become QArrays in torch layout (blocks along the last
    axis, spec axis -1); F32/F16/BF16 (and F64/I8..I64) become numpy arrays with the
    numpy shape (ggml's dimensions reversed). city96-style ``comfy.gguf.orig_shape.NAME``
    entries reshape their tensor back (a quantized one is decoded to float32, since its
    blocks no longer run along a row) and are dropped from the returned metadata.

    Other ggml types (Q4_0, IQ2_XXS, ...) raise :class:`GGUFError` naming the tensor and
    type, unless ``dequantize_other`` is set: then the ``gguf`` package dequantizes them
    to float32 arrays where it can. Every check runs before anything is returned: a
    truncated or malformed file raises and yields nothing.
    """
    path = Path(path)
    reader = _open(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    bad = []
    for t in reader.tensors:
        if t.tensor_type in _CODEC_OF_TYPE or t.tensor_type in _FLOAT_TYPES or t.tensor_type == GT.BF16:
            continue
        if dequantize_other and t.tensor_type.name in _dequantizable():
            continue
        bad.append(f"{t.name!r} ({t.tensor_type.name})")
    if bad:
        hint = "" if dequantize_other else "; dequantize_other=True loads types the gguf package can decode as float32"
        raise GGUFError(
            f"{path}: unsupported tensor type(s) for {', '.join(bad)}; jquant loads {list(SUPPORTED_TYPES)}{hint}"
        )
    tensors: dict[str, QArray | np.ndarray] = {}
    for t in reader.tensors:
        field = fields.get(ORIG_SHAPE_PREFIX + t.name)
        orig = None if field is None else _orig_shape(t.name, field)
        tensors[t.name] = _read_tensor(t, orig, dequantize_other)
    metadata = {k: _metadata_value(path, k, f) for k, f in fields.items() if not k.startswith(ORIG_SHAPE_PREFIX)}
    del reader
    return tensors, metadata


def _dequantizable() -> set[str]:
    """ggml type names the gguf package can dequantize."""
    traits = getattr(gguf.quants, "_type_traits", {})
    return {t.name for t in traits}


# ----------------------------------------------------------------------------- export


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What :func:`export_gguf` wrote: the ggml type of every tensor and the sizes."""

    path: Path
    types: dict[str, str]
    n_params: int
    n_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / max(self.n_params, 1)


def _open_safetensors(stack: contextlib.ExitStack, files: set[Path]) -> dict[Path, Any]:
    """Handles of the checked safetensors reader (errors name the file), closed with ``stack``."""

    return {f: stack.enter_context(open_safetensors(f)) for f in sorted(files)}


_F8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def _get_tensor(handle: Any, file: Path, name: str) -> np.ndarray:
    """A tensor from safetensors as numpy (BF16 via ml_dtypes, imported above). F8, which
    safetensors' numpy reader cannot name, is read from the file's header and byte range."""

    dtype = handle.get_slice(name).get_dtype()
    if dtype not in _F8:
        return get_tensor(handle, file, name)
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
    info = read_header(file)[name]
    begin, end = info["data_offsets"]
    raw = np.fromfile(file, dtype=np.uint8, count=end - begin, offset=8 + n + begin)
    return raw.view(_F8[dtype]).reshape(info["shape"])


def _float_storage(a: np.ndarray) -> np.ndarray:
    """Unquantized tensors: 1-D in F32 (ggml's convention for norms and biases); others keep
    BF16/F16, and F32 becomes F16 unless values overflow it."""
    if a.ndim <= 1:
        return a.astype(np.float32)
    if a.dtype in (ml_dtypes.bfloat16, np.float16):
        return a
    a32 = a.astype(np.float32)
    if np.abs(a32).max(initial=0.0) < 65504:
        return a32.astype(np.float16)
    return a32


def _model_roles(config: Mapping[str, Any], names: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, ...]]:
    """Roles per diffusers tensor name: the port's role rules through its key map when the
    model class has a Flax port, else guesses from the names."""
    try:
        port = port_for_class(config.get("_class_name", ""))
    except ValueError:
        return {n: roles_from_name(n) for n in names}
    cfg = port.config_cls.from_diffusers(config)
    by_flax = port.layer_roles(port.param_shapes(cfg))
    out = {}
    for e in port.key_map(cfg):
        if e.torch_key in names:
            out[e.torch_key] = tuple(by_flax.get(e.flax_path, ()))
    for n in names:
        out.setdefault(n, roles_from_name(n))
    return out


def export_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    type: str = "Q4_K_M",  # noqa: A002 - mirrors the CLI flag
    *,
    layout: str = "jquant",
    progress: bool = False,
) -> ExportReport:
    """Quantize a diffusers model directory (config.json + safetensors) into a GGUF file.

    ``layout='jquant'``: diffusers names; each tensor gets the codec
    :func:`jquant.algorithms.kquants.kquant_mix` picks for the mix ``type`` (Q4_K_M, Q5_K_M,
    Q6_K, Q8_0) or stays float (1-D in F32; others in F16/BF16); the mix goes in as ``jquant.mix``.

    ``layout='comfy'``: the community layout ComfyUI-GGUF loads (Wan, Flux, HunyuanVideo,
    LTX-Video): original names (fused tensors concatenated), ``general.architecture`` wan / flux
    / hyvid / ltxv, and the types ComfyUI-GGUF's convert.py + patched llama-quantize give for the
    llama.cpp file type ``type`` (any of :data:`jquant.io.gguf_layouts.FILE_TYPES`: Q2_K ...
    Q8_0, Q4_K_M, ...), reproduced by :func:`jquant.io.gguf_layouts.plan_comfy_types`.

    Both write the config as ``jquant.config``. ``out_path`` is written atomically (see
    :func:`save_gguf`) and may not be one of the model's own files; a corrupt config.json or
    safetensors file raises naming it.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown GGUF layout {layout!r}; choose one of {list(LAYOUTS)}")
    allowed = FILE_TYPES if layout == "comfy" else MIX_BASE
    if type not in allowed:
        raise ValueError(f"unknown GGUF type {type!r} for layout {layout!r}; choose one of {sorted(allowed)}")
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    config = read_config_json(config_file)
    files = weight_files(model_dir)
    inputs = {config_file.resolve(), *(f.resolve() for f in files.values())}
    if Path(out_path).resolve() in inputs:
        raise ValueError(f"{out_path}: is one of the model's own files; export_gguf will not overwrite its input")
    if layout == "comfy":
        return _export_comfy(model_dir, out_path, type, config, files, progress)

    tensors: dict[str, QArray | np.ndarray] = {}
    types: dict[str, str] = {}
    n_bytes = 0
    with contextlib.ExitStack() as stack:
        handles = _open_safetensors(stack, set(files.values()))
        shapes = {n: tuple(handles[f].get_slice(n).get_shape()) for n, f in files.items()}
        plan = plan_kquant_mix(type, shapes, _model_roles(config, shapes))
        for name in tqdm(sorted(files), desc=f"GGUF {type}", disable=not progress):
            a = _get_tensor(handles[files[name]], files[name], name)
            codec = plan[name]
            if codec is not None:
                blocks = CODECS[codec].encode(np.asarray(a, np.float32))
                tensors[name] = codec_qarray(blocks, codec, device=False)
                types[name] = codec.upper()
                n_bytes += blocks.nbytes
            else:
                tensors[name] = stored = _float_storage(a)
                types[name] = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}.get(stored.dtype, "BF16")
                n_bytes += stored.nbytes
    metadata = {
        "general.architecture": _ARCH_OF_CLASS.get(config.get("_class_name", ""), DEFAULT_ARCH),
        "general.name": model_dir.resolve().name,
        "general.file_type": _FILE_TYPE[type],
        CONFIG_KEY: json.dumps(config, sort_keys=True),
        MIX_KEY: type,
    }
    out = save_gguf(out_path, tensors, metadata)
    return ExportReport(out, types, sum(math.prod(s) for s in shapes.values()), n_bytes)


_ST_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64, **_F8}


def _export_comfy(
    model_dir: Path, out_path: Any, ftype: str, config: dict[str, Any], files: Mapping[str, Path], progress: bool
) -> ExportReport:
    """export_gguf's community-layout path (see there). Types are planned from the safetensors
    headers, then one original tensor at a time is fused, encoded and kept as its payload."""
    port = port_for_class(str(config.get("_class_name", "")))
    cfg = port.config_cls.from_diffusers(config)
    family = family_for_config(cfg)
    # Sorted original names: the file order, which llama-quantize's V counter follows.
    entries = sorted(original_entries(cfg), key=lambda e: e.name)
    absent = sorted({p for e in entries for p in e.parts} - set(files))
    if absent:
        raise CheckpointMismatchError(
            f"{model_dir}: the weights lack {len(absent)} tensors of the key map: {absent[:8]}"
        )
    payloads: dict[str, tuple[np.ndarray, GT]] = {}
    with contextlib.ExitStack() as stack:
        handles = _open_safetensors(stack, set(files.values()))

        def header(name: str) -> tuple[tuple[int, ...], Any]:
            sl = handles[files[name]].get_slice(name)
            return tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), np.float32)

        info = {}
        for e in entries:
            heads = [header(p) for p in e.parts]
            info[e.name] = ((sum(h[0][0] for h in heads), *heads[0][0][1:]), heads[0][1])
        plan = plan_comfy_types(family, info, ftype)
        for e in tqdm(entries, desc=f"GGUF {ftype} (comfy)", disable=not progress):
            parts = [_get_tensor(handles[files[p]], files[p], p) for p in e.parts]
            payloads[e.name] = _comfy_payload(family, e.name, concat_rows(parts, e.swap_halves), plan[e.name])
    metadata = {
        "general.architecture": family.arch,
        "general.name": model_dir.resolve().name,
        "general.file_type": FILE_TYPES[ftype][1],
        CONFIG_KEY: json.dumps(config, sort_keys=True),
    }
    out = _write_gguf(out_path, payloads, metadata)
    n_bytes = sum(int(a.nbytes) for a, _ in payloads.values())
    n_params = sum(math.prod(shape) for shape, _ in info.values())
    return ExportReport(out, {n: t.name for n, t in plan.items()}, n_params, n_bytes)


# ----------------------------------------------------------------------------- Flax params

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def _strip_prefix(tensors: dict[str, Any], wanted: set[str]) -> dict[str, Any]:
    """Drop a common checkpoint prefix (ComfyUI-style files) when that makes names match."""
    if wanted & set(tensors):
        return tensors
    for p in _PREFIXES:
        if any(k.startswith(p) for k in tensors):
            return {k[len(p) :] if k.startswith(p) else k: v for k, v in tensors.items()}
    return tensors


def _to_flax(entry: Any, value: QArray | np.ndarray) -> QArray | np.ndarray:
    """Apply a key-map entry's layout change; a linear QArray only changes its spec axis."""
    if not isinstance(value, QArray):
        return entry.to_flax(value)
    if entry.kind == "linear" and value.ndim == 2:  # (out, in) blocks read as an (in, out) kernel
        return dataclasses.replace(value, spec=dataclasses.replace(value.spec, axis=0), axis=-2)
    # Not a Dense kernel (a modulation table, a norm, a patch conv): the model reads it as a
    # plain param, so it is decoded (community tools never quantize these).
    return entry.to_flax(np.asarray(value.dequantize(jnp.float32)))


def _to_torch(entry: Any, value: Any) -> QArray | np.ndarray:
    """The inverse of :func:`_to_flax`: a Flax leaf in torch layout (a codec QArray keeps its
    blocks, which already run along the torch row axis)."""
    if not isinstance(value, QArray):
        return entry.to_torch(np.asarray(value))
    if value.spec.fmt not in CODECS:
        raise ValueError(
            f"{entry.flax_path}: QArray format {value.spec.fmt!r} has no GGUF type; GGUF holds {sorted(CODECS)}"
        )
    if entry.kind == "linear" and value.ndim == 2:
        qvalue = np.asarray(value.qvalue)
        return dataclasses.replace(value, qvalue=qvalue, spec=dataclasses.replace(value.spec, axis=-1), axis=-1)
    if entry.kind == "copy":
        return dataclasses.replace(value, qvalue=np.asarray(value.qvalue))
    raise ValueError(f"{entry.flax_path}: a {entry.kind} kernel cannot be written as GGUF blocks; keep it float")


def _resolve_port(path: Any, config: Any, metadata: Mapping[str, Any]) -> tuple[Any, DiffusersConfig]:
    """(port, config) from ``config`` or, when None, the file's ``jquant.config`` metadata."""
    if config is None:
        if CONFIG_KEY not in metadata:
            raise ValueError(
                f"{path}: no {CONFIG_KEY!r} metadata; pass config= (a config, config.json dict or model dir)"
            )
        try:
            config = json.loads(metadata[CONFIG_KEY])
        except (TypeError, json.JSONDecodeError) as e:
            raise GGUFError(f"{path}: corrupt: metadata {CONFIG_KEY!r} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise GGUFError(f"{path}: corrupt: metadata {CONFIG_KEY!r} is not a JSON object")
    if isinstance(config, DiffusersConfig):
        return port_for_config(config), config
    if isinstance(config, Mapping):
        port = port_for_class(str(config.get("_class_name", "")))
        return port, port.config_cls.from_diffusers(config)
    return read_config(config)


def _torch_rows(config: DiffusersConfig) -> dict[str, int]:
    """Rows (axis 0 in torch layout) of every diffusers tensor of a port config."""
    port = port_for_config(config)
    shapes = traverse_util.flatten_dict(port.param_shapes(config), sep="/")
    rows = {}
    for e in port.key_map(config):
        shape = tuple(shapes[e.flax_path].shape)
        if e.kind == "patch":
            rows[e.torch_key] = int(e.torch_shape[0])
        elif e.kind == "linear" and len(shape) == 2:
            rows[e.torch_key] = int(shape[1])
        else:
            rows[e.torch_key] = int(shape[0]) if shape else 1
    return rows


def is_community_layout(names: Any, config: DiffusersConfig) -> bool:
    """Whether tensor ``names`` are in the original (ComfyUI-GGUF) layout of ``config``'s family:
    some name exists only in the original layout (names both layouts share do not count)."""
    try:
        family = family_for_config(config)
    except ValueError:
        return False
    diffusers = {e.torch_key for e in port_for_config(config).key_map(config)}
    present = set(names)
    if all(k in present for k in family.detect):
        return True
    return any(e.name in present and e.name not in diffusers for e in original_entries(config))


def from_community(
    tensors: Mapping[str, Any], config: DiffusersConfig, where: str = "GGUF"
) -> tuple[dict[str, Any], dict[str, str], list[str], list[str]]:
    """Original-layout tensors -> diffusers-named tensors, splitting fused ones by rows (QArrays
    keep their blocks). Returns (tensors, {diffusers key: original name}, missing original names,
    problems); tensors the map does not know pass through unchanged (reported as unexpected)."""
    entries = original_entries(config)
    rows = _torch_rows(config)
    known = {e.name for e in entries}
    out = {k: v for k, v in tensors.items() if k not in known}
    origin: dict[str, str] = {}
    missing, problems = [], []
    for e in entries:
        if e.name not in tensors:
            missing.append(e.name)
            continue
        value = tensors[e.name]
        sizes = [rows[p] for p in e.parts]
        if not e.fused and not e.swap_halves:
            out[e.parts[0]] = value
        else:
            try:
                pieces = split_rows(value, sizes, e.swap_halves)
            except ValueError as err:
                problems.append(f"{where}: tensor {e.name!r} (shape {tuple(value.shape)}): {err} for {list(e.parts)}")
                continue
            out.update(zip(e.parts, pieces))
        origin.update((p, e.name) for p in e.parts)
    return out, origin, missing, problems


def load_gguf_params(
    path: str | os.PathLike,
    config: Any = None,
    *,
    dtype: Any = jnp.float32,
    dequantize_other: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Load a GGUF of a ported model into (Flax module, params) with QArray leaves.

    The model comes from ``config`` (a DiffusersConfig, a config.json dict, or a diffusers
    model directory) or, when None, from the file's ``jquant.config`` metadata, or for a
    community file without it, from its tensor shapes (:func:`jquant.io.gguf_layouts.infer_config`,
    which assumes the published models' head sizes). Names are
    diffusers' (jquant's layout) or the original checkpoint's (the ComfyUI-GGUF community
    layout of Wan, Flux, HunyuanVideo and LTX-Video, detected from the names; fused tensors
    such as Flux's ``img_attn.qkv`` are split by rows, QArrays keeping their blocks). They go
    through the port's key map (``models.port``): linear weights stay QArrays with their
    contraction axis set to 0 (Flax (in, out) kernels, no data movement); float params are
    cast to ``dtype`` except the port's ``keep_fp32`` ones, or kept as stored with
    ``dtype=None``. Missing, unexpected or mis-shaped tensors raise one error listing all of
    them, by the file's names.
    """

    tensors, metadata = load_gguf(path, dequantize_other=dequantize_other)
    if config is None and CONFIG_KEY not in metadata:
        arch = metadata.get("general.architecture")
        if arch in FAMILIES or detect_family(_strip_prefix(tensors, set())) is not None:
            shapes = {k: tuple(v.shape) for k, v in _strip_prefix(tensors, set()).items()}
            try:
                config = infer_config(shapes, arch)
            except ValueError as e:
                raise CheckpointMismatchError(f"{path}: {e}") from None
    port, config = _resolve_port(path, config, metadata)
    entries = port.key_map(config)
    wanted = {e.torch_key for e in entries}
    tensors = _strip_prefix(tensors, wanted)
    origin: dict[str, str] = {}
    missing_orig: list[str] = []
    problems: list[str] = []
    if is_community_layout(tensors, config):
        tensors, origin, missing_orig, problems = from_community(tensors, config, str(path))
    shapes = traverse_util.flatten_dict(port.param_shapes(config), sep="/")
    missing = sorted(missing_orig) or sorted(e.torch_key for e in entries if e.torch_key not in tensors)
    known = {e.torch_key for e in entries}
    unexpected = sorted(
        k for k in tensors if k not in known and not any(re.search(p, k) for p in port.ignore_unexpected)
    )
    flat: dict[str, Any] = {}
    for e in entries:
        if e.torch_key not in tensors:
            continue
        value = _to_flax(e, tensors[e.torch_key])
        want = tuple(shapes[e.flax_path].shape)
        if tuple(value.shape) != want:
            name = f"{origin[e.torch_key]} ({e.torch_key})" if e.torch_key in origin else e.torch_key
            problems.append(f"{name} -> {e.flax_path}: got {tuple(value.shape)}, config needs {want}")
            continue
        keep = any(re.search(p, e.flax_path) for p in port.keep_fp32)
        target = jnp.float32 if keep or dtype is None else dtype
        if isinstance(value, QArray):
            flat[e.flax_path] = dataclasses.replace(value, dtype=jnp.dtype(target))
        elif dtype is None:
            flat[e.flax_path] = jnp.asarray(value)
        else:
            flat[e.flax_path] = jnp.asarray(value, target)
    if missing or unexpected or problems:
        raise CheckpointMismatchError(
            f"{path} does not match the {port.module_cls.__name__} key map.\n"
            f"missing ({len(missing)}): {missing}\nunexpected ({len(unexpected)}): {unexpected}\n"
            f"wrong shapes ({len(problems)}): {problems}"
        )
    return port.module(config, dtype or jnp.float32), traverse_util.unflatten_dict(flat, sep="/")


def params_to_tensors(params: Any, config: DiffusersConfig, *, layout: str = "jquant") -> dict[str, Any]:
    """A Flax param tree (float or GGUF-codec QArray leaves) as torch-layout tensors named as in
    ``layout``: 'jquant' (diffusers names) or 'comfy' (the original names, fused tensors
    concatenated by rows: their parts must share a codec, or all be float, since fusing never
    re-encodes). Raises naming the param path or tensor that cannot be written."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown GGUF layout {layout!r}; choose one of {list(LAYOUTS)}")
    port = port_for_config(config)
    flat = traverse_util.flatten_dict(params, sep="/")
    entries = port.key_map(config)
    missing = sorted(e.flax_path for e in entries if e.flax_path not in flat)
    if missing:
        raise ValueError(f"params lack {len(missing)} {port.module_cls.__name__} entries: {missing[:8]}")
    torch = {e.torch_key: _to_torch(e, flat[e.flax_path]) for e in entries}
    if layout == "jquant":
        return torch
    out = {}
    for e in original_entries(config):
        try:
            out[e.name] = concat_rows([torch[p] for p in e.parts], e.swap_halves)
        except ValueError as err:
            raise ValueError(f"{e.name} (from {list(e.parts)}): {err}") from None
    return out


def save_gguf_params(
    path: str | os.PathLike,
    params: Any,
    config: DiffusersConfig,
    *,
    layout: str = "jquant",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a Flax param tree of a port (QArray leaves as their raw blocks, floats as stored)
    to a GGUF file in ``layout`` 'jquant' (diffusers names, ``jquant.config`` metadata) or
    'comfy' (original names and ``general.architecture`` of ComfyUI-GGUF; ``jquant.config`` is
    added too, which ComfyUI ignores). Loading it back with :func:`load_gguf_params` gives the
    same codes; a file read from the community layout is written back tensor for tensor."""
    tensors = params_to_tensors(params, config, layout=layout)
    meta = {
        "general.architecture": family_for_config(config).arch
        if layout == "comfy"
        else _ARCH_OF_CLASS.get(config.CLASS_NAME, DEFAULT_ARCH),
        CONFIG_KEY: json.dumps(config.to_diffusers(), sort_keys=True),
        **dict(metadata or {}),
    }
    return save_gguf(path, tensors, meta)


def _comfy_payload(family: Any, name: str, a: np.ndarray, t: GT) -> tuple[np.ndarray, GT]:
    """One original-named float tensor as the community tools store it: convert.py's float type
    first (the file llama-quantize reads), then, for a block type ``t``, ggml's reference
    quantizer (jquant.codecs) on those values."""
    values = _as_ggml_float(a, float_type(family, name, a.shape, a.dtype))
    if t in (GT.F32, GT.F16, GT.BF16):  # t differs from stage 1 only for lcpp.patch's F16 fallback
        return _tensor_payload(name, _as_ggml_float(values, t))
    codec = GGML_CODECS[t.name.lower()]
    return codec.encode(np.asarray(values, np.float32)).reshape(a.shape[:-1] + (-1,)), t


def _as_ggml_float(a: np.ndarray, t: GT) -> np.ndarray:
    return np.asarray(a).astype({GT.F32: np.float32, GT.F16: np.float16, GT.BF16: ml_dtypes.bfloat16}[t])
