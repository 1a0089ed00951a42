"""Training and evaluation: `trainer` (train_and_evaluate, evaluate; see it for the workdir layout), `experiment`
(mesh, shardings, jitted steps, a checkpoint's model), `cv` (cross-validation) and their parts."""
