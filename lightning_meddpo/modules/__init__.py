"""One LightningModule per preference-optimization family, all on PreferencePolicy."""

from lightning_meddpo.modules.base import LoraSettings, PreferenceModule
from lightning_meddpo.modules.dpo import DPO
from lightning_meddpo.modules.kto import KTO
from lightning_meddpo.modules.mmedpo import MMedPO
from lightning_meddpo.modules.multimodal import Multimodal
from lightning_meddpo.modules.reference_free import ReferenceFree
from lightning_meddpo.modules.sft import SFT

__all__ = ["DPO", "KTO", "LoraSettings", "MMedPO", "Multimodal", "PreferenceModule", "ReferenceFree", "SFT"]
