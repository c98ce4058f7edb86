"""pretrain-recipes' shared core: backbones, losses, heads, masking, schedules, data, CLI and export."""

__all__ = ["load_encoder"]


def __getattr__(name: str):
    # `from core import load_encoder` imports core.export on first use, not with the package: an eager
    # import made every `python -m core.export` warn that the module was imported before it ran.
    if name == "load_encoder":
        from core.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'core' has no attribute {name!r}")
