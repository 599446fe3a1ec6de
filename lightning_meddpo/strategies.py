"""FSDP2Strategy: Lightning's ModelParallelStrategy set up for pure FSDP2 (data parallel over all ranks).

ModelParallelStrategy's "auto" sizes give tensor parallelism over the GPUs of a node and data
parallelism only across nodes. Preference training here shards with FSDP2 only, so this variant
defaults to tensor_parallel_size=1 and data_parallel_size = every rank. The sharding itself happens in
PreferenceModule.configure_model (`fully_shard` per decoder / vision layer, then the root).
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        save_distributed_checkpoint: bool = True,
        **kwargs,
    ):
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and isinstance(self._tensor_parallel_size, int):
            self._data_parallel_size = max(1, self.num_nodes * self.num_processes // self._tensor_parallel_size)
        super().setup_environment()
