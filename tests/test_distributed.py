"""Several processes with torch.distributed (gloo on the CPU): DDP training and the split sensitivity sweep."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_recipe
from helpers import colour_blob_batch, make_image_folder, tiny_cnn, trained_cnn

from workbench.cli import main
from workbench.train.loop import fit
from workbench.train.options import TrainOptions

# Two CPU processes with gloo; on a machine with a GPU each process would take a GPU with NCCL instead.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="gloo CPU processes; GPU runs: benchmarks/multi_gpu.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loader():
    x, y = colour_blob_batch(n_per_class=8, seed=3)  # 24 samples, 3 global batches of 8
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def _train(out_path: str, start: str) -> None:
    # Every process starts from the same saved weights: trained_cnn() retrained in a child could round differently
    # (its thread count comes from the environment, which other imports may have changed).
    model = tiny_cnn()
    model.load_state_dict(torch.load(start))
    opts = TrainOptions(epochs=2, lr=0.05, train_mode="eval", grad_clip=None)

    def loss_fn(outputs, batch):
        loss = torch.nn.functional.cross_entropy(outputs, batch[1])
        return loss, {}

    fit(model, _loader(), opts, loss_fn)
    torch.save(model.state_dict(), out_path)


def _worker(rank: int, world: int, port: int, out_dir: str, start: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from workbench import distributed

    distributed.init()
    try:
        _train(os.path.join(out_dir, f"rank{rank}.pt"), start)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_train_the_same_weights_as_one_with_the_same_global_batch(tmp_path):
    start = trained_cnn().state_dict()
    torch.save(start, tmp_path / "start.pt")
    _train(str(tmp_path / "single.pt"), str(tmp_path / "start.pt"))
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path / "start.pt")), nprocs=2, join=True)
    single = torch.load(tmp_path / "single.pt")
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in single.items():
            assert torch.allclose(ddp[name], value, atol=1e-5), name
    assert any(not torch.equal(single[k], start[k]) for k in single)  # the weights did move


def test_run_with_two_processes_writes_one_run_with_the_single_process_sensitivity_table(tmp_path):
    images = make_image_folder(tmp_path / "blobs", per_class=8, seed=4)
    # The sweep comes first: QAT shuffles differently in one process and in two, and would make the models differ.
    stages = ("  - calibrate: {method: max}\n  - sensitivity: {proxy_samples: 8, task_samples: 24}\n"
              "  - qat: {epochs: 1, eval_samples: 12}\n")

    def recipe(runs):
        text = tiny_recipe(images, runs, stages).replace("helpers:tiny_cnn", "helpers:trained_cnn")
        text = text.replace("  batch_size: 4",
                            f'  finetune: {{source: imagefolder, path: "{images}"}}\n  batch_size: 8')
        path = runs.parent / f"{runs.name}.yaml"
        path.write_text(text)
        return path

    env = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path.parent), os.path.dirname(__file__), env) if p)
    try:
        assert main(["run", "--gpus", "2", str(recipe(tmp_path / "multi"))]) == 0
        # One process with the thread count torchrun gives each of its processes: the same float arithmetic.
        single_env = {**os.environ, "OMP_NUM_THREADS": "1"}
        single_run = [sys.executable, "-m", "workbench", "run", str(recipe(tmp_path / "single"))]
        assert subprocess.run(single_run, env=single_env).returncode == 0
    finally:
        os.environ["PYTHONPATH"] = env
    (multi,) = (tmp_path / "multi").iterdir()  # one run directory, written by rank 0
    (single,) = (tmp_path / "single").iterdir()
    rows = {d: {r["layer"]: r for r in json.loads((d / "sensitivity.json").read_text())["layers"]}
            for d in (multi, single)}
    assert set(rows[multi]) == set(rows[single]) and {"conv1", "conv2", "conv3", "fc"} <= set(rows[single])
    for layer, b in rows[single].items():
        a = rows[multi][layer]
        for key in ("only_sqnr_db", "loo_sqnr_db", "only_kl", "loo_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (layer, key)
        assert (a["only_metric"] == pytest.approx(b["only_metric"], abs=1e-6)
                and a["loo_metric"] == pytest.approx(b["loo_metric"], abs=1e-6))
    assert (multi / "checkpoints" / "qat_epoch1.pt").is_file()
    assert json.loads((multi / "metrics.json").read_text())["stages"]["qat"]["steps"] == 3  # 24 images, global batch 8
