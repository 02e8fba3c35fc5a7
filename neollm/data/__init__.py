"""NeoLLM data sources. Importing this package registers them in torchtitan's ``DATASETS``,
so ``[training] dataset = "wiki_vital_en" | "local_text" | "fineweb_edu"`` (and
``wiki_vital_en_validation`` for ``[validation] dataset``) work with torchtitan's own
``build_text_dataloader``; see ``sources.py``."""

from neollm.data.sources import (
    NEOLLM_DATASETS,
    load_fineweb_edu,
    load_local_text,
    load_wiki_vital_en,
    register_datasets,
)

register_datasets()

__all__ = [
    "NEOLLM_DATASETS",
    "load_fineweb_edu",
    "load_local_text",
    "load_wiki_vital_en",
    "register_datasets",
]
