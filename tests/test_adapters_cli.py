"""model.adapter (dora, loha, lokr) through the CLI on the tiny model: trained, exported in the formats other tools
load, resumed bitwise; plain LoRA unchanged; bad combinations refused early.

The export checks apply the file's weights as ComfyUI applies them (``comfy/weight_adapter/lora.py``, ``loha.py``,
``lokr.py`` and ``base.py::weight_decompose``; AUTOMATIC1111's LoHa / LoKr formulas are the same), re-implemented
below, and compare with what the trained peft layers compute.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from callbacks.run_dir import run_dir
from sd.adapters.formats import lycoris_state_dict
from sd.adapters.lora import UNET_TARGET_MODULES, adapter_config, inject_lora
from sd.export.folder import load_export
from sd.export.layout import INFO_NAME, KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from sd.models.loading import load_pipeline
from tests.conftest import fit_args
from train import cli_main, main

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
NO_VALIDATION = ("--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0")
EVERY_STEP = ("--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.callbacks.init_args.save_top_k=-1")
# lokr at rank 2 decomposes its second factor on the tiny model (lokr_w2_a / lokr_w2_b); rank 4 keeps both whole
# (tested below without a fit). alpha != rank everywhere, so a wrong scale shows. loha composes the example overlay
# (configs/examples/adapters.yaml: LoHa, one photo held out).
ADAPTERS = {
    "dora": ("--model.adapter=dora", "--model.lora_alpha=2"),
    "loha": (
        "--config",
        str(ROOT / "configs" / "examples" / "adapters.yaml"),
        "--model.lora_rank=4",
        "--model.lora_alpha=2",
    ),
    "lokr": ("--model.adapter=lokr", "--model.lora_rank=2", "--model.lora_alpha=3"),
}


@pytest.fixture(scope="module", params=list(ADAPTERS))
def fitted(request, tmp_path_factory, toy_subject_dir, class_images_dir):
    """One STEPS-step fit per adapter (UNet + text encoder), a checkpoint at every step: (adapter, cli, run args)."""
    root = tmp_path_factory.mktemp(request.param)
    shutil.copytree(class_images_dir, root / "class")

    def args(*more: str) -> list[str]:
        extra = (*ADAPTERS[request.param], *NO_VALIDATION, *more)
        return fit_args(root / f"runs{len(more)}", toy_subject_dir, root / "class", *extra, steps=STEPS)

    return request.param, cli_main(args(*EVERY_STEP)), args


# ----------------------------------------------------------------------------------------- the tools' formulas
def _comfy_names(model: nn.Module, prefix: str, text_model: bool = False) -> dict[str, nn.Module]:
    """ComfyUI's key map for SD 1.x: ``lora_unet_`` + the diffusers module name with ``_`` for ``.``; the text
    encoder's as ``lora_te_text_model_...``."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, BaseTunerLayer):
            name = name.removesuffix(".base_layer")
            if text_model and not name.startswith("text_model."):
                name = "text_model." + name
            names[prefix + name.replace(".", "_")] = module
    return names


def _comfy_weight(file: dict[str, torch.Tensor], key: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight ComfyUI computes from the file's module ``key`` at strength 1 (float32)."""
    w = weight.float().clone()
    get = lambda name: file.get(f"{key}.{name}")  # noqa: E731
    alpha = get("alpha")
    if get("lora_up.weight") is not None:  # LoRA (lora.py): alpha / rank, rank = lora_down's rows
        up, down = get("lora_up.weight").flatten(1), get("lora_down.weight").flatten(1)
        diff, scale = (up @ down).reshape(w.shape), float(alpha) / down.shape[0]
    elif get("hada_w1_a") is not None:  # LoHa (loha.py): alpha / hada_w1_b's rows
        diff = ((get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b"))).reshape(w.shape)
        scale = float(alpha) / get("hada_w1_b").shape[0]
    else:  # LoKr (lokr.py): alpha / dim when a factor is decomposed (dim: its b's rows), else 1
        dim, w1, w2 = None, get("lokr_w1"), get("lokr_w2")
        if w1 is None:
            dim, w1 = get("lokr_w1_b").shape[0], get("lokr_w1_a") @ get("lokr_w1_b")
        if w2 is None:
            dim, w2 = get("lokr_w2_b").shape[0], get("lokr_w2_a") @ get("lokr_w2_b")
        diff = torch.kron(w1, w2).reshape(w.shape)
        scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    dora_scale = get("dora_scale")
    if dora_scale is None:
        return w + scale * diff
    # base.py weight_decompose: output-axis case (dora_scale's first size is the output size) takes the base
    # weight's row norms, the input-axis case the merged weight's column norms.
    calc = w + scale * diff
    if dora_scale.shape[0] == w.shape[0]:
        norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)
    return calc * (dora_scale / (norm + torch.finfo(torch.float32).eps))


def _peft_weight(layer: BaseTunerLayer) -> torch.Tensor:
    """The weight the trained peft layer computes with: its merged copy (DoRA's magnitude and norm included)."""
    merged = copy.deepcopy(layer)
    merged.merge()  # its active adapter ("default" here, "default_0" as diffusers names a loaded one)
    return merged.get_base_layer().weight.detach().float()


def _check_file_against_layers(file: dict[str, torch.Tensor], unet: nn.Module, te: nn.Module | None) -> int:
    """Every module of the file applied as ComfyUI does equals the trained layer's weight; returns the count."""
    names = _comfy_names(unet, "lora_unet_") | (_comfy_names(te, "lora_te_", True) if te is not None else {})
    layers = {id(m.get_base_layer()): m for m in [*unet.modules(), *te.modules()] if isinstance(m, BaseTunerLayer)}
    modules = {k.split(".")[0] for k in file}  # kohya module names hold no dots
    assert modules and modules <= set(names), sorted(modules - set(names))[:3]  # ComfyUI finds every module
    assert {id(names[m]) for m in modules} == set(layers), "the file misses trained layers"
    changed = 0
    for module in sorted(modules):
        base = names[module]
        layer = layers[id(base)]
        expected = _peft_weight(layer)
        if not getattr(layer, "use_dora", {}).get("default", False):  # LoHa / LoKr: peft's get_delta_weight
            delta = layer.get_delta_weight("default").detach().float().reshape(expected.shape)
            torch.testing.assert_close(expected, base.weight.float() + delta)
        got = _comfy_weight(file, module, base.weight.detach())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=module)
        changed += not torch.equal(expected, base.weight.float())
    return changed


# ----------------------------------------------------------------------------------------- tests
def test_the_file_applied_as_comfyui_applies_it_is_the_trained_weight(fitted):
    adapter, cli, _ = fitted
    export = run_dir(cli.trainer) / "export"
    file = load_file(export / KOHYA_WEIGHT_NAME)
    suffixes = {
        "dora": (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"),
        "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"),
        "lokr": (".lokr_w1", ".lokr_w2_a", ".lokr_w2_b", ".alpha"),
    }[adapter]
    assert {"." + k.split(".", 1)[1] for k in file} == set(suffixes)  # lokr rank 2: w1 whole, w2 decomposed
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in file)
    changed = _check_file_against_layers(file, cli.model.unet, cli.model.text_encoder)
    assert changed > 0, "training changed no weight"
    with safe_open(export / KOHYA_WEIGHT_NAME, "pt") as f:
        header = f.metadata()
    assert header["ss_network_module"] == ("networks.lora" if adapter == "dora" else "lycoris.kohya")
    if adapter == "loha":  # the example overlay applied: its held-out photo too
        assert cli.model.hparams.lora_dropout == 0.0 and cli.datamodule.hparams.holdout == 1
    info = json.loads((export / INFO_NAME).read_text())
    assert info["adapter"] == adapter
    assert info["files"] == ([LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME] if adapter == "dora" else [KOHYA_WEIGHT_NAME])


def test_resuming_gives_the_same_export_bitwise(fitted):
    adapter, cli, args = fitted
    folder = run_dir(cli.trainer)
    (ckpt,) = folder.glob("checkpoints/*-step=2.ckpt")
    resumed = cli_main(args("--ckpt_path", str(ckpt)))
    assert resumed.trainer.global_step == STEPS
    for name in [KOHYA_WEIGHT_NAME] + ([LORA_WEIGHT_NAME] if adapter == "dora" else []):
        a, b = load_file(folder / "export" / name), load_file(run_dir(resumed.trainer) / "export" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_diffusers_loads_dora_and_refuses_loha_lokr_clearly(fitted, capsys):
    adapter, cli, args = fitted
    export = run_dir(cli.trainer) / "export"
    if adapter == "dora":  # diffusers' own loader, then ours: the trained weights, DoRA's magnitudes included
        for pipe in (_with_diffusers_lora(export), load_export(export)):
            for trained, loaded in ((cli.model.unet, pipe.unet), (cli.model.text_encoder, pipe.text_encoder)):
                got = {n: _peft_weight(m) for n, m in _layers(loaded)}
                want = {n: _peft_weight(m) for n, m in _layers(trained)}
                assert got.keys() == want.keys() and want
                assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want), type(loaded).__name__
                assert any(not torch.equal(got[n], m.get_base_layer().weight) for n, m in _layers(trained))
        return
    with pytest.raises(ValueError) as diffusers_error:  # what a user gets from diffusers 0.42: no silent half-load
        _with_diffusers_lora(export, KOHYA_WEIGHT_NAME)
    assert "have not been correctly renamed" in str(diffusers_error.value)  # the error the README quotes
    predict = ["predict", "--config", str(run_dir(cli.trainer) / "config.yaml"), "--model.lora_weights", str(export)]
    assert main(predict) == 2
    err = capsys.readouterr().err
    assert f"holds a {adapter} export" in err and "--ckpt_path" in err
    # ... and what it says works: predict from the run's checkpoint (its keys checked complete on loading)
    out = run_dir(cli.trainer) / "renders"
    (ckpt,) = run_dir(cli.trainer).glob("checkpoints/last.ckpt")
    render = [
        "--model.sampling.num_inference_steps=2",
        "--model.sampling.num_images_per_prompt=1",
        f"--render.dirpath={out}",
    ]
    predicted = cli_main([*predict[:3], "--ckpt_path", str(ckpt), '--data.predict_prompts=["a sks ball"]', *render])
    assert predicted.model.hparams.adapter == adapter and len(list(out.glob("0*.png"))) == 1


def _layers(model: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _with_diffusers_lora(export: Path, weight_name: str = LORA_WEIGHT_NAME):
    pipe = load_pipeline("builtin:tiny-sd")
    pipe.load_lora_weights(export, weight_name=weight_name)
    return pipe


def test_lokr_with_both_factors_whole_exports_its_scale():
    """LoKr at rank 4 on 32 features keeps both factors whole (lokr_w1, lokr_w2): the tools then scale by 1, so the
    export folds alpha / rank into lokr_w1."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"to_q": nn.Linear(32, 32)})
    inject_lora(model, adapter_config("lokr", 4, 3.0, 0.0, ["to_q"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_()
    file = lycoris_state_dict(model)
    assert set(file) == {"lora_unet_to_q.lokr_w1", "lora_unet_to_q.lokr_w2", "lora_unet_to_q.alpha"}
    layer = model["to_q"]
    got = _comfy_weight(file, "lora_unet_to_q", layer.get_base_layer().weight.detach())
    torch.testing.assert_close(got, _peft_weight(layer), rtol=1e-5, atol=1e-5)


def test_plain_lora_is_configured_as_before():
    """model.adapter lora (the default) builds the very LoraConfig that LoRA training used before adapters existed."""
    before = LoraConfig(
        r=4, lora_alpha=4, lora_dropout=0.0, init_lora_weights="gaussian", target_modules=list(UNET_TARGET_MODULES)
    )
    assert adapter_config("lora", 4, None, 0.0, UNET_TARGET_MODULES).to_dict() == before.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("--model.use_lora=false", "--model.adapter=dora"), "model.adapter dora needs model.use_lora true"),
        (("--model.adapter=loha", "--model.lora_dropout=0.1"), "model.adapter loha has no dropout"),
    ],
    ids=["full-fine-tuning", "loha-dropout"],
)
def test_bad_adapter_settings_are_clean_errors(run_args, capsys, overrides, message):
    assert main(run_args(*overrides)) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_adapter_is_refused_by_the_parser(run_args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(run_args("--model.adapter=oft"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'key "model.adapter"' in err and "'lora', 'dora', 'loha', 'lokr'" in err
