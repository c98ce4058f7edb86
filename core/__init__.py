"""pretrain-recipes' shared core: backbones, losses, heads, masking, schedules, data, CLI and export."""

from core.export import load_encoder

__all__ = ["load_encoder"]
