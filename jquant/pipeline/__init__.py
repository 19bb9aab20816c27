"""The diffusion pipeline: trajectory-aware calibration, per-timestep scale tables in the jitted
sampler, per-step precision, role policies, recipes, fidelity, CLI (docs/pipeline.md).

    from jquant.pipeline import recipes
    from jquant.pipeline import Calibrator, quantize, tiny_wan_bundle
    from jquant.pipeline.evaluate import evaluate, reference
    bundle = tiny_wan_bundle(num_steps=12)
    qm = quantize(bundle, recipes.get("int8-wa-smooth"), Calibrator(bundle))
    row = evaluate(bundle, qm, reference(bundle, bundle.workload(4, seed=0)))

(The submodules keep their names: ``jquant.pipeline.evaluate`` is the module.)
"""

from jquant.pipeline.bundles import load_bundle
from jquant.pipeline.calibrate import (
    CalibrationConfig,
    Calibrator,
    make_table,
    quantize,
    quantized_layers,
)
from jquant.pipeline.denoiser import (
    Denoiser,
    ModelBundle,
    Workload,
    tiny_wan_bundle,
)
from jquant.pipeline.runtime import (
    PerStepModel,
    QuantizedModel,
    per_step_model_fn,
    resident_bytes,
    switch_schedule,
)
from jquant.pipeline.tables import ScaleTable, TableConfig, build_table
from jquant.policy import Policy

__all__ = [
    "CalibrationConfig",
    "Calibrator",
    "Denoiser",
    "ModelBundle",
    "PerStepModel",
    "Policy",
    "QuantizedModel",
    "ScaleTable",
    "TableConfig",
    "Workload",
    "build_table",
    "load_bundle",
    "make_table",
    "per_step_model_fn",
    "quantize",
    "quantized_layers",
    "resident_bytes",
    "switch_schedule",
    "tiny_wan_bundle",
]
