"""RadFed's reference Flower app: a chest-radiograph classifier on RICORD-style labels.

* ``settings`` — the run config (the keys of ``[tool.flwr.app.config]``), parsed and checked;
* ``task`` — the model, the dataset read from a node's ``TrainingManifest``, the
  study-level train/validation split and the training and evaluation loops;
* ``client_app`` — the ClientApp each node's SuperNode runs;
* ``server_app`` — the ServerApp the coordinator runs: strategy, SecAgg+, DP;
* ``rounds`` — who took part in each round (sampled, trained, declined, dropped);
* ``rundir`` — what the ServerApp writes into the run directory for the coordinator.

The app imports only ``protocols``, torch, numpy, safetensors and flwr.
"""
