"""Framework-neutral layer: config, weight schema, checkpoint directory, native-format import/export."""

from .config import PRESETS, ModelConfig
from .errors import UserError
from .schema import parameter_count, schema

__all__ = ["ModelConfig", "PRESETS", "UserError", "parameter_count", "schema"]
