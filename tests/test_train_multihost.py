"""Two local processes joined with jax.distributed train one model together and agree on the loss.

Run as a script, this file is one of those processes: `python tests/test_train_multihost.py DATA_DIR WORKDIR
PROCESS_ID PORT`.
"""

import json
import os
import subprocess
import sys

from fault_checks import environment
from lidc_testdata import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4


def test_two_processes_train_together(lidc_data, tmp_path):
    import portpicker
    port = portpicker.pick_unused_port()
    env = {**environment(2), "JAX_PLATFORMS": "cpu",  # 2 devices each
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    workdir = str(tmp_path / "workdir")
    procs = [subprocess.Popen([sys.executable, __file__, lidc_data, workdir, str(i), str(port)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0]["process_count"] == results[1]["process_count"] == 2
    assert results[0]["device_count"] == 4
    assert len(results[0]["train_loss"]) == NUM_STEPS
    assert results[0]["train_loss"] == results[1]["train_loss"]
    assert results[0]["validation_accuracy"] == results[1]["validation_accuracy"]
    assert os.path.exists(os.path.join(workdir, "metrics.json"))  # written by process 0


def _process(data_dir: str, workdir: str, process_id: int, port: int) -> None:
    from autorad_jax.train import distributed
    distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import jax

    from autorad_jax.train import trainer
    config = tiny_config(data_dir, batch_size=8, eval_batch_size=8)
    config.mesh.update(data=2, fsdp=2, tensor=1)
    config.train.update(num_steps=NUM_STEPS, log_every=1, eval_every=NUM_STEPS, checkpoint_every=NUM_STEPS)
    result = trainer.train_and_evaluate(config, workdir)
    print(json.dumps({"process_count": jax.process_count(), "device_count": jax.device_count(),
                      "train_loss": result["train_loss"], "validation_accuracy": result["validation"]["accuracy"]}))


if __name__ == "__main__":
    _process(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
