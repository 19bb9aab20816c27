"""Reading a diffusers pipeline directory: ``model_index.json``, its components, the scheduler config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jquant.sampling import FlowSchedule, flow_match_schedule

INDEX_NAME = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
#: pipeline class -> {component folder: accepted classes (empty: any; tokenizers are read from their files)}
COMPONENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "WanPipeline": {
        "tokenizer": (),
        "text_encoder": ("UMT5EncoderModel",),
        "transformer": ("WanTransformer3DModel",),
        "vae": ("AutoencoderKLWan",),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"),
    },
    "FluxPipeline": {
        "tokenizer": (),
        "text_encoder": ("CLIPTextModel",),
        "tokenizer_2": (),
        "text_encoder_2": ("T5EncoderModel",),
        "transformer": ("FluxTransformer2DModel",),
        "vae": ("AutoencoderKL",),
        "scheduler": ("FlowMatchEulerDiscreteScheduler",),
    },
}
#: Text-encoder precisions the policy allows: the handbook's floor is int8 weight-only.
TEXT_ENCODER_PRECISIONS = ("int8", "float")
#: FlowMatchEulerDiscreteScheduler options this sampler does not reproduce (refused when set).
_UNSUPPORTED_SCHEDULER_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


class PipelineError(ValueError):
    """A pipeline directory jquant cannot run: a missing or unsupported component, a bad config."""


# --- the directory --------------------------------------------------------------------------------
def read_model_index(path: str | Path) -> tuple[str, dict[str, Any]]:
    """``(pipeline class, model_index.json)`` of a diffusers pipeline directory; every component
    the class needs must be listed, of a supported class, and present as a folder."""
    path = Path(path)
    index = path / INDEX_NAME
    if not index.is_file():
        what = "no such folder" if not path.is_dir() else f"no {INDEX_NAME} (not a diffusers pipeline directory)"
        raise FileNotFoundError(f"{path}: {what}")
    try:
        raw = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{index}: corrupt: not valid JSON ({e})") from None
    cls = raw.get("_class_name")
    if cls not in COMPONENTS:
        raise PipelineError(
            f"{index}: _class_name {cls!r} is not a pipeline jquant runs; supported: {sorted(COMPONENTS)}"
        )
    for name, accepted in COMPONENTS[cls].items():
        entry = raw.get(name)
        if not entry or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise PipelineError(f"{index}: component {name!r} is missing ({cls} needs {', '.join(COMPONENTS[cls])})")
        if accepted and entry[1] not in accepted:
            raise PipelineError(
                f"{index}: component {name!r} is a {entry[1]}; jquant's {cls} takes {', '.join(accepted)}"
            )
        if not (path / name).is_dir():
            raise FileNotFoundError(f"{path / name}: component folder {name!r} listed in {INDEX_NAME} is missing")
    if cls == "WanPipeline":
        for key in ("transformer_2",):
            entry = raw.get(key)
            if entry and isinstance(entry, list) and entry[1] is not None:
                raise PipelineError(f"{index}: {key} (Wan2.2's two-expert sampling) is not supported")
        if raw.get("expand_timesteps"):
            raise PipelineError(f"{index}: expand_timesteps (Wan2.2 TI2V) is not supported")
    return cls, raw


def _check_unipc(raw: dict[str, Any], file: Path) -> None:
    """Refuse UniPC settings :class:`UniPC` does not reproduce, naming the key."""
    want = {
        "use_flow_sigmas": True,
        "predict_x0": True,
        "prediction_type": "flow_prediction",
        "thresholding": False,
        "use_dynamic_shifting": False,
        "final_sigmas_type": "zero",
        "timestep_spacing": "linspace",
    }
    bad = [f"{k}={raw.get(k)!r} (ported: {v!r})" for k, v in want.items() if raw.get(k, v) != v]
    bad += [f"{k}={raw[k]!r}" for k in ("solver_p", "shift_terminal", *_UNSUPPORTED_SCHEDULER_FLAGS) if raw.get(k)]
    if raw.get("solver_type", "bh2") not in ("bh1", "bh2"):
        bad.append(f"solver_type={raw.get('solver_type')!r}")
    if bad:
        raise PipelineError(f"{file}: UniPCMultistepScheduler with {', '.join(bad)} is not ported")


def read_scheduler(path: Path, scheduler: str | None) -> dict[str, Any]:
    """The scheduler config, checked: FlowMatchEulerDiscreteScheduler and UniPCMultistepScheduler
    (flow sigmas, the published Wan2.1 checkpoints' scheduler) run as configured;
    ``scheduler="euler"`` samples a UniPC directory with flow-match Euler at its ``flow_shift``."""
    file = path / "scheduler" / SCHEDULER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (the scheduler component needs its config)")
    raw = json.loads(file.read_text())
    cls = raw.get("_class_name")
    if scheduler not in (None, "euler"):
        raise PipelineError(f"scheduler={scheduler!r}: give None (the directory's) or 'euler' (flow-match Euler)")
    if cls == "UniPCMultistepScheduler":
        if scheduler == "euler":
            return {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": float(raw.get("flow_shift") or 1.0)}
        _check_unipc(raw, file)
        return raw
    bad = [k for k in _UNSUPPORTED_SCHEDULER_FLAGS if raw.get(k)]
    if bad:
        raise PipelineError(f"{file}: {', '.join(bad)} is not reproduced by jquant's flow-match sampler")
    return raw


def flow_schedule(config: dict[str, Any], steps: int, *, mu: float | None = None, sigmas: Any = None) -> FlowSchedule:
    """``FlowMatchEulerDiscreteScheduler.set_timesteps`` for a scheduler config dict."""
    dynamic = bool(config.get("use_dynamic_shifting", False))
    return flow_match_schedule(
        None if sigmas is not None else steps,
        shift=float(config.get("shift", 1.0)),
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        use_dynamic_shifting=dynamic,
        mu=mu if dynamic else None,
        time_shift_type=config.get("time_shift_type", "exponential"),
        shift_terminal=config.get("shift_terminal"),
        invert_sigmas=bool(config.get("invert_sigmas", False)),
        sigmas=sigmas,
    )
