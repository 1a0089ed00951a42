"""Every model on every tower family: AutoRad-Lung trained from a local CLIP folder and a SigLIP folder (random
`transformers` models with their tokenizer files, saved with save_pretrained; SigLIP's SentencePiece model trained
here), then, with the folder moved away, evaluated, exported and predicted from the workdir alone; random-init towers
of each family; the baselines on each family; the family's logit scale and bias; folders that cannot be read."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from autorad_jax import export, modeling, models
from autorad_jax.data import preprocess
from autorad_jax.data.tokenizer import TokenizerFilesError, load_tokenizer
from autorad_jax.models import families
from autorad_jax.models.autorad_lung import l2_normalize
from autorad_jax.predict import predict
from autorad_jax.train import checkpointing, encoders, experiment, trainer
from autorad_jax.weights import pretrained
from configs import autorad_lung
from test_train import train_config

CLASS_NAMES = autorad_lung.CLASS_NAMES
RADIOMICS = tuple(f"f{i}" for i in range(5))
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
SIGLIP_LENGTH = 24  # the fixed padding length of the test's SigLIP text tower (64 for google/siglip-*)
CORPUS = [f"{ctx} {name}." for ctx in ("a CT scan of a", "X X X X", "a photo of a") for name in CLASS_NAMES] * 20


def _perturb(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def clip_folder(folder: str) -> str:
    """A random transformers CLIPModel with CLIP's BPE tokenizer files."""
    tokenizer = load_tokenizer()
    config = transformers.CLIPConfig(
        vision_config=VISION, projection_dim=16,
        text_config=dict(TEXT, vocab_size=len(tokenizer), max_position_embeddings=32, eos_token_id=49407,
                         bos_token_id=49406, pad_token_id=49407))
    model = transformers.CLIPModel(config)
    _perturb(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def siglip_tokenizer(folder: str) -> transformers.SiglipTokenizer:
    """SigLIP's tokenizer over a SentencePiece model trained here on the prompts' words (ids as google/siglip's:
    pad 0, EOS 1, unk 2, no BOS)."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=os.path.join(folder, "spiece"),
                                   vocab_size=100, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    return transformers.SiglipTokenizer(vocab_file=os.path.join(folder, "spiece.model"),
                                        model_max_length=SIGLIP_LENGTH)


def siglip_folder(folder: str) -> str:
    """A random transformers SiglipModel with its SentencePiece tokenizer files."""
    os.makedirs(folder, exist_ok=True)
    tokenizer = siglip_tokenizer(folder)
    config = transformers.SiglipConfig(
        vision_config=VISION,
        text_config=dict(TEXT, vocab_size=len(tokenizer), max_position_embeddings=SIGLIP_LENGTH,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model = transformers.SiglipModel(config)
    _perturb(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


FOLDERS = {"clip": clip_folder, "siglip": siglip_folder}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    return {name: make(str(tmp_path_factory.mktemp(name))) for name, make in FOLDERS.items()}


def _model_config(**model):
    config = autorad_lung.get_config("tiny").model
    config.vision.update(image_size=28, num_hidden_layers=1)
    config.text.num_hidden_layers = 1
    config.update(model)
    return config


# ---- The family's tokenizer and prompts ------------------------------------------------------------------------------


def test_siglip_prompts_are_its_tokenizers_ids_padded_to_its_fixed_length_without_sos(folders):
    config = _model_config(pretrained_dir=folders["siglip"])
    spec = modeling.model_spec(config, CLASS_NAMES, RADIOMICS)
    reference = transformers.SiglipTokenizer.from_pretrained(folders["siglip"])(
        [f"{config.ctx_init} {name}." for name in CLASS_NAMES], padding="max_length", max_length=SIGLIP_LENGTH)
    np.testing.assert_array_equal(spec.prompts.ids, reference["input_ids"])
    assert spec.prompts.ids.shape == (3, SIGLIP_LENGTH) and spec.prompts.ctx_start == 0
    assert spec.family.name == "siglip"
    n_ctx = len(transformers.SiglipTokenizer.from_pretrained(folders["siglip"])(
        config.ctx_init, add_special_tokens=False)["input_ids"])
    assert spec.prompts.n_ctx == n_ctx


def test_clip_prompts_start_with_sos_and_end_at_the_last_eos(folders):
    spec = modeling.model_spec(_model_config(pretrained_dir=folders["clip"]), CLASS_NAMES, RADIOMICS)
    rows = transformers.CLIPTokenizer.from_pretrained(folders["clip"])(
        [f"a CT scan of a {name}." for name in CLASS_NAMES])["input_ids"]
    assert spec.prompts.ctx_start == 1 and spec.prompts.ids.shape[1] == max(map(len, rows))
    for ids, row in zip(spec.prompts.ids, rows):
        assert list(ids[:len(row)]) == row and set(ids[len(row):]) <= {49407}


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_folder_without_its_tokenizer_files_is_one_line_naming_them(folders, family, tmp_path):
    folder = str(tmp_path / family)
    shutil.copytree(folders[family], folder)
    file_sets = families.get(family).tokenizer_files
    for name in {n for names in file_sets for n in names}:
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    with pytest.raises(TokenizerFilesError) as e:
        modeling.model_spec(_model_config(pretrained_dir=folder), CLASS_NAMES, RADIOMICS)
    message = str(e.value)
    assert "\n" not in message and message.startswith(folder)
    assert all(name in message for names in file_sets for name in names)


def test_a_folder_of_an_unsupported_family_is_one_line_naming_its_config(folders, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(folders["clip"], folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(pretrained.PretrainedFolderError) as e:
        modeling.model_spec(_model_config(pretrained_dir=str(folder)), CLASS_NAMES, RADIOMICS)
    assert "\n" not in str(e.value) and str(folder / "config.json") in str(e.value) and "'bert'" in str(e.value)


# ---- Every model on every family, with the family's logit scale and bias --------------------------------------------


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_every_model_runs_on_each_family_and_zero_shot_logits_are_the_scaled_cosines(family):
    """Random-init towers of the family (config.model.towers), each model traced (abstractly); zero-shot logits =
    scale * cos (+ SigLIP's bias) computed from the towers' own features of the prompts' token ids and of the images
    in the family's normalisation (SigLIP's mean and std 0.5, from the pipeline's CLIP normalisation)."""
    images = jax.random.uniform(jax.random.key(0), (2, 28, 28, 3))
    radiomics = jax.random.normal(jax.random.key(1), (2, len(RADIOMICS)))
    for name in models.TOWER_MODELS:
        config = _model_config(towers=family, name=name)
        spec = modeling.model_spec(config, CLASS_NAMES, RADIOMICS)
        assert spec.family.name == family
        model = nnx.eval_shape(lambda: models.Model(config, spec, rngs=nnx.Rngs(0)))
        logits, _ = nnx.eval_shape(lambda m: m(images, radiomics), model)
        assert (logits.shape, logits.dtype) == ((2, 3), jnp.float32), name
    config = _model_config(towers=family, name="zero_shot")
    spec = modeling.model_spec(config, CLASS_NAMES, RADIOMICS)
    model = models.Model(config, spec, rngs=nnx.Rngs(0))
    towers = model.towers
    bias = 0.0
    if hasattr(towers, "logit_bias"):  # SigLIP's, set away from its initial value
        bias = -3.0
        towers.logit_bias.set_value(jnp.full_like(towers.logit_bias[...], bias))
    logits, _ = model(images, radiomics)
    text = np.asarray(l2_normalize(towers.get_text_features(jnp.asarray(spec.prompts.ids))))
    pixels = images * preprocess.AIMV2_STD + preprocess.AIMV2_MEAN  # in [0, 1]
    family_pixels = (pixels - 0.5) / 0.5 if family == "siglip" else images
    image = np.asarray(l2_normalize(towers.get_image_features(family_pixels)))
    np.testing.assert_allclose(logits, float(towers.logit_scale_value()) * image @ text.T + bias, atol=1e-4)


# ---- A tiny AutoRad-Lung from a CLIP and a SigLIP folder, then from the workdir alone --------------------------------


@pytest.fixture(scope="module", params=list(FOLDERS))
def family_run(request, folders, lidc_data, tmp_path_factory):
    """Two prompt-training steps from a copy of the family's folder, which is then deleted."""
    family = request.param
    folder = shutil.copytree(folders[family], str(tmp_path_factory.mktemp("moved") / family))
    workdir = str(tmp_path_factory.mktemp(f"{family}_run"))
    config = train_config(lidc_data, num_steps=2, pretrained_dir=folder)
    result = trainer.train_and_evaluate(config, workdir)
    shutil.rmtree(folder)
    return family, workdir, result


def test_the_family_is_in_the_checkpoint_and_eval_export_predict_need_the_workdir_alone(family_run, folders, lidc_data,
                                                                                        tmp_path):
    family, workdir, result = family_run
    restored = experiment.load_model(workdir)
    assert restored.spec.family.name == family and restored.model.family == family
    weights = pretrained.read_safetensors(folders[family])
    towers = pretrained.nnx_to_hf_state(restored.model.towers)
    for key, value in weights.items():  # prompt training leaves the folder's towers as they were
        np.testing.assert_array_equal(towers[key], value, err_msg=key)
    metrics = trainer.evaluate(train_config(lidc_data), workdir, split="test", step=result["best_step"])
    np.testing.assert_equal(metrics["accuracy"], result["test"]["accuracy"])

    out = export.export(workdir, str(tmp_path / "export"))
    assert {family, f"{family}_vision"} <= set(os.listdir(out))
    assert f"**{family}**" in open(os.path.join(out, "README.md")).read()
    series = sorted(glob.glob(os.path.join(os.path.dirname(lidc_data), "scans", "*", "*", "*")))[0]
    xml = glob.glob(os.path.join(series, "*.xml"))[0]
    runs = [predict(ct=series, xml=xml, backend=backend, **where)
            for where in ({"workdir": workdir}, {"export_dir": out}) for backend in ("jax", "torch")]
    probs = [np.array([list(n["probabilities"].values()) for n in r["nodules"]]) for r in runs]
    for p in probs[1:]:
        np.testing.assert_allclose(p, probs[0], atol=1e-4)


@pytest.mark.parametrize("family", list(FOLDERS))
def test_init_random_builds_the_folders_towers_untrained(folders, lidc_data, family, tmp_path):
    config = train_config(lidc_data, num_steps=1, pretrained_dir=folders[family], init="random")
    assert not modeling.loads_pretrained(config.model)
    trainer.train_and_evaluate(config, str(tmp_path))
    restored = experiment.load_model(str(tmp_path))
    towers = pretrained.nnx_to_hf_state(restored.model.towers)
    weights = pretrained.read_safetensors(folders[family])
    assert towers.keys() == weights.keys()
    assert all(towers[k].shape == v.shape for k, v in weights.items())
    assert not any(np.array_equal(towers[k], v) for k, v in weights.items() if k.endswith("token_embedding.weight"))
    assert restored.spec.towers.to_hf_dict() == pretrained.read_config(folders[family]).to_hf_dict()


def test_a_config_written_with_aimv2_dir_still_names_its_folder(folders):
    saved = autorad_lung.get_config("tiny").to_dict()
    saved["model"].pop("pretrained_dir")
    saved["model"]["aimv2_dir"] = folders["clip"]
    config = checkpointing.saved_config(saved)
    assert modeling.pretrained_dir(config.model) == folders["clip"]


def test_the_comparison_runs_each_family_pretrained_where_it_has_a_folder_and_random_always(folders):
    config = autorad_lung.get_config("tiny")
    config.encoders.update(clip_dir=folders["clip"])
    assert encoders.runs(config) == [("aimv2", "random", ""), ("clip", "pretrained", folders["clip"]),
                                     ("clip", "random", folders["clip"]), ("siglip", "random", "")]
    run = encoders.run_config(config, "clip", "random", folders["clip"])
    assert (run.model.pretrained_dir, run.model.towers, run.model.init) == (folders["clip"], "clip", "random")
    assert run.data.to_dict() == config.data.to_dict() and run.seed == config.seed  # the same split, folds and seed
