"""Built-in generation backends beyond the contract's default (``lit_saferlhf.generators.HFGenerate``)."""

from lit_saferlhf_plugins.generators.static_cache import StaticCacheGenerate

__all__ = ["StaticCacheGenerate"]
