r"""AutoRad-Lung: image features matched against radiomics-conditioned prompts.

The argument after the colon picks the size:
  tiny   random-init small towers, 32^3 crops, runs on a 2-core CPU in minutes (the demo uses it);
  large  aimv2-large-patch14-224 vision tower (1024 wide, 24 layers) with the AIMv2-LiT text tower.
The towers are AIMv2's, CLIP's or SigLIP's: a pretrained folder's config.json names its family; random-init towers
(no folder) are of the family --config.model.towers=aimv2|clip|siglip at the variant's sizes; --config.model.init=random
builds a folder's towers untrained (see docs/encoders.md).

CPU, demo data:
  autorad train --config configs/autorad_lung.py:tiny --workdir workdir/tiny

One GPU or a TPU host, real weights and data (`autorad prepare` builds the dataset):
  autorad train --config configs/autorad_lung.py:large \
    --config.model.pretrained_dir=/models/aimv2-large-patch14-224-lit \
    --config.data.data_dir=/data/tensorflow_datasets --workdir workdir/large

Baselines and ablations share everything else:
  --config.model.name=coop|cocoop|zero_shot|radiomics_logreg|radiomics_mlp|linear_probe|late_fusion
(zero_shot and radiomics_logreg run no training step: fixed prompts; a convex fit with C chosen on validation).
"""

import ml_collections

CLASS_NAMES = ("benign lung nodule", "indeterminate lung nodule", "malignant lung nodule")


def _tower(hidden: int, layers: int, heads: int, mlp: int, **extra) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp, **extra))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """Returns the experiment config for `arg` in {'tiny', 'large'}."""
    if arg not in ("tiny", "large"):
        raise ValueError(f"configs/autorad_lung.py: unknown variant {arg!r}; use 'tiny' or 'large'.")
    tiny = arg == "tiny"
    config = ml_collections.ConfigDict()
    seed = ml_collections.FieldReference(0)
    config.seed = seed
    # One value for the pipeline's output size and the vision tower's input size; a checkpoint trained at
    # another size gets its position-embedding grid interpolated to this one.
    image_size = ml_collections.FieldReference(56 if tiny else 224)

    config.data = ml_collections.ConfigDict(dict(
        name="lidc_idri",
        builder_config="crop32_1mm" if tiny else "crop64_1mm",
        data_dir="workdir/tensorflow_datasets",
        view="2.5d",  # '2.5d': centre axial slice and neighbours; 'planes': axial/coronal/sagittal centre slices.
        window_hu=(-1000.0, 400.0),
        image_size=image_size,
        label_scheme="3class",  # '3class' (benign/unsure/malignant) or 'binary' (unsure band dropped).
        # Label protocol applied to the stored per-reader ratings (autorad_jax/data/labels.py): 'mean' | 'median'
        # (3 classes at 2.5 / 3.5), or '<mean|median>_<exclude3|3benign|3malignant>' (binary, with label_scheme=binary).
        label_rule="mean",
        min_readers=1,  # leave out nodules with fewer valid malignancy ratings
        min_diameter_mm=0.0,  # leave out nodules with a smaller longest axial diameter
        # True: also nodules cut by the end of their series (stored with complete=False by `prepare --keep_incomplete`).
        include_incomplete=False,
        augment=True,
        batch_size=32 if tiny else 64,
        eval_batch_size=64 if tiny else 128,
        worker_count=0,  # grain worker processes per host; 0 reads in the main process.
        cv_fold=-1,  # >=0: train on the other folds of train+validation, evaluate on this one.
        cv_repeat=0,  # 0: the dataset's folds; r > 0: patients dealt anew into folds with seed r (`autorad cv` sets it).
        # Radiomics into the meta-network, fitted on the training split and saved with the checkpoint: a transform of
        # the heavy-tailed features before standardisation, 'none' | 'signed_log' (sign(x) log(1+|x|)) | 'quantile'
        # (normal scores of the training quantiles); radiomics_clip > 0 clips standardised values to [-c, c].
        radiomics_transform="none",
        radiomics_clip=0.0,
        # Ablation: each split's radiomics rows permuted across its nodules (fixed by shuffle_seed, which follows
        # config.seed), so that the model trains and is evaluated on radiomics of other nodules.
        shuffle_radiomics=False,
        shuffle_seed=seed,
        # True: training examples drawn with probability proportional to 1 / (their class's count), so that classes
        # are seen equally often (shifts calibration; see docs/training.md, "Class imbalance").
        balanced_sampling=False,
    ))

    config.model = ml_collections.ConfigDict(dict(
        # autorad_lung | coop | cocoop | zero_shot | radiomics_logreg | radiomics_mlp | linear_probe | late_fusion
        name="autorad_lung",
        # Local save_pretrained folder of an AIMv2(-LiT), CLIP or SigLIP model (config.json, safetensors, tokenizer
        # files); empty: random-init towers of the family `towers` sized by vision/text/projection_dim below.
        pretrained_dir="",
        towers="aimv2",  # aimv2 | clip | siglip: the family of random-init towers (a folder names its own)
        init="pretrained",  # pretrained | random (the folder's towers untrained: what pre-training buys)
        dtype="float32",  # compute dtype: float32 | bfloat16 (parameters stay float32)
        attention_implementation="",  # '' (XLA) | 'cudnn' (fused attention on NVIDIA GPUs)
        remat="none",  # none | full (recompute each block in the backward pass) | dots (keep matmul outputs)
        # True: each tower's blocks are one jax.lax.scan over stacked parameters (trace and compile time independent of
        # depth); False: unrolled, one block per layer. Checkpoints of the two layouts are not interchangeable.
        # Scanned for `large` in both modes: on a 2-core CPU (docs/benchmarks.md) its steady step costs 7% more
        # (full) and 6% more (prompt) than unrolled, paired in one process, but model init plus compile is 2x lower
        # (about 10 s against 20-24 s; model init 19-23 s against 60 s), and the large config is for accelerators,
        # where the scan's weight copies should cost less of the step (not measured: the GPU suite times both).
        scan_layers=not tiny,
        vision=_tower(64, 2, 2, 128, patch_size=14, image_size=image_size, use_head=True) if tiny
        else _tower(1024, 24, 8, 2816, patch_size=14, image_size=image_size, use_head=True),
        text=_tower(64, 2, 2, 128, max_position_embeddings=32) if tiny
        else _tower(768, 12, 6, 2048, max_position_embeddings=77),
        projection_dim=64 if tiny else 768,
        class_names=CLASS_NAMES,  # the binary scheme uses the first and last.
        n_ctx=4,
        ctx_init="a CT scan of a",  # empty: contexts drawn from N(0, 0.02) (zero_shot needs a phrase).
        conditioning="shared",  # shared (CoCoOp: one shift for all context tokens) | per_token; autorad_lung, cocoop
        meta_hidden_dim=16 if tiny else 48,
        pooling="head",  # head (attention-pool head) | mean (mean of patch tokens)
        trainable="prompt",  # prompt | last_k (+ last k vision blocks) | full
        trainable_last_k=0,
        prompt_chunk_size=0,  # >0 bounds the text pass to this many prompts at once (memory: B*classes*tokens*width).
        radiomics_mlp_hidden=(64,),
    ))

    config.optim = ml_collections.ConfigDict(dict(
        name="adamw",  # adamw | sgd
        learning_rate=2e-3,
        weight_decay=1e-4,
        momentum=0.9,
        warmup_steps=20 if tiny else 200,
        grad_clip_norm=1.0,
        grad_accum_steps=1,
    ))

    config.train = ml_collections.ConfigDict(dict(
        num_steps=200 if tiny else 5000,
        log_every=10 if tiny else 50,
        eval_every=100 if tiny else 500,
        checkpoint_every=100 if tiny else 500,
        keep_checkpoints=3,
        # Class imbalance (shift calibration; docs/training.md, "Class imbalance"): 'none' | 'balanced' (loss weights
        # n / (C n_c) of the training split's class counts); logit_adjustment_tau > 0 trains on
        # logits + tau log(prior) (Menon et al. 2021), inference reads the plain logits.
        class_weights="none",
        logit_adjustment_tau=0.0,
        # A profiler trace of steps profile_start_step .. + profile_steps - 1 in <workdir>/profile (0: none).
        profile_start_step=0,
        profile_steps=5,
        # Compiled programs kept in <workdir>/compilation_cache, so that a resumed run loads them instead of compiling
        # (JAX_COMPILATION_CACHE_DIR, when set, is used instead).
        compilation_cache=True,
    ))

    # `autorad cv`: the models to cross-validate (comma-separated; empty: all) and how often, each repeat with folds dealt
    # anew and its own training seed.
    config.cv = ml_collections.ConfigDict(dict(models="", repeats=1))

    # `run.py encoders`: the same model trained with each tower family and init, compared against the first run
    # (docs/encoders.md). A family with a folder runs 'pretrained' and 'random' (its towers untrained); without one,
    # random-init towers at config.model's sizes.
    config.encoders = ml_collections.ConfigDict(dict(
        families="aimv2,clip,siglip", inits="pretrained,random", aimv2_dir="", clip_dir="", siglip_dir=""))

    # Mesh axis sizes; -1 takes the remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config
