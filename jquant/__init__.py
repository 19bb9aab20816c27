"""jquant: quantization for diffusion and flow-matching transformers in JAX/Flax.

The public surface: number formats and specs, the QArray type, rule-based quantization
of param trees, and quantized execution of unmodified Flax models (``jquant.nn``).
"""

from jquant.formats import FORMATS, QSpec, parse_spec
from jquant.qarray import QArray, dequantize, fake_quant, quantize
from jquant.rules import Report, quantize_params

__all__ = [
    "FORMATS",
    "QArray",
    "QSpec",
    "Report",
    "dequantize",
    "fake_quant",
    "parse_spec",
    "quantize",
    "quantize_params",
]
__version__ = "0.1.0"
