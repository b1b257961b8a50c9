"""DreamBench metrics on the tiny offline encoders: exact values, DDP-style merging, devices, state_dict."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import normalize

from metrics import (
    Diversity,
    PreservationScore,
    PromptFidelity,
    SubjectFidelity,
    load_clip,
    load_dino,
    strip_identifier,
)


@pytest.fixture(scope="module")
def dino():
    return load_dino("builtin:tiny-dino")


@pytest.fixture(scope="module")
def clip():
    return load_clip("builtin:tiny-clip")


@pytest.fixture(params=["dino", "clip"])
def encoder(request, dino, clip):
    return {"dino": dino, "clip": clip}[request.param]


def images(n: int, seed: int, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """(n, 3, H, W) smooth random images in [0, 1]: low-res noise upsampled, so the encoders see structure."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def test_dino_preprocessing_shapes(dino):
    for size in [(64, 64), (300, 200)]:
        x = images(2, 0, size)
        assert dino.preprocess(x).shape == (2, 3, 224, 224)
        emb = dino(x)
        assert emb.shape == (2, dino.embed_dim)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_clip_preprocessing_reads_model_config(clip):
    size = clip.model.visual.preprocess_cfg["size"]  # open_clip stores (h, w)
    assert clip.image_size == tuple(size) == (64, 64)
    assert clip.preprocess(images(2, 0, (300, 200))).shape == (2, 3, 64, 64)
    assert clip.encode_text(["a dog", "a cat"]).shape == (2, clip.embed_dim)
    assert clip.name == "builtin:tiny-clip" and not clip.training
    assert not any(p.requires_grad for p in clip.parameters())


def test_builtin_encoders_are_deterministic_and_keep_global_rng(dino):
    x = images(2, 0)
    state = torch.random.get_rng_state()
    again = load_dino("builtin:tiny-dino")
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(again(x), dino(x))


def test_images_outside_unit_range_are_rejected(dino):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dino(images(1, 0) * 2 - 1)


def test_self_similarity_is_one(encoder):
    one = images(1, 0)
    m = SubjectFidelity(encoder, one)
    m.update(one)
    assert abs(m.compute().item() - 1.0) < 1e-5
    copies = one.repeat(3, 1, 1, 1)
    m = SubjectFidelity(encoder, copies)
    m.update(copies)
    assert abs(m.compute().item() - 1.0) < 1e-5


def test_all_pairs_mean_matches_direct_computation(encoder):
    ref, gen = images(3, 0), images(4, 1)
    m = SubjectFidelity(encoder, ref)
    m.update(gen[:2])
    m.update(gen[2:])
    expected = (normalize(encoder(gen), dim=-1) @ normalize(encoder(ref), dim=-1).T).mean()  # (4, 3) -> ()
    torch.testing.assert_close(m.compute(), expected, atol=1e-5, rtol=0)
    assert m.compute() < 1.0 - 1e-4  # unrelated images score below a perfect match


def test_references_of_different_sizes(dino):
    refs = [images(1, 0, (80, 60))[0], images(1, 1, (64, 64))[0]]
    m = SubjectFidelity(dino, refs)
    assert m.num_references == 2
    torch.testing.assert_close(m.reference_embeddings[0], dino(refs[0][None])[0])


def test_prompt_fidelity_changes_with_prompt(clip):
    x = images(2, 0)
    scores = []
    for prompt in ["a photo of dog", "a red car on the moon"]:
        m = PromptFidelity(clip)
        m.update(x, [prompt, prompt])
        scores.append(m.compute())
        expected = (clip(x) @ clip.encode_text([prompt]).T).mean()
        torch.testing.assert_close(scores[-1], expected, atol=1e-5, rtol=0)
    assert abs(scores[0] - scores[1]) > 1e-6
    with pytest.raises(ValueError, match="one prompt per image"):
        PromptFidelity(clip).update(x, ["only one"])


def test_strip_identifier():
    assert strip_identifier("a photo of sks dog", "sks") == "a photo of dog"
    assert strip_identifier("sks dog in the snow", "sks") == "dog in the snow"
    assert strip_identifier("a sks, dog  with a sksx toy", "sks") == "a, dog with a sksx toy"
    assert strip_identifier("a <v> dog", "<v>") == "a dog"


def _halves(make, update_args):
    """compute() of one metric updated on everything, and of two metrics updated on halves then merged."""
    whole, m1, m2 = make(), make(), make()
    for args in update_args:
        whole.update(*args)
    half = len(update_args) // 2
    for args in update_args[:half]:
        m1.update(*args)
    for args in update_args[half:]:
        m2.update(*args)
    m1.merge_state(m2)
    return whole.compute(), m1.compute()


def test_merge_state_matches_single_instance(dino, clip):
    ref = images(2, 0)
    batches = [(images(2, s),) for s in (1, 2, 3)]
    torch.testing.assert_close(*_halves(lambda: SubjectFidelity(dino, ref), batches))
    prompted = [(images(1, s), [p]) for s, p in [(1, "a dog"), (2, "a cat"), (3, "a dog on a beach")]]
    torch.testing.assert_close(*_halves(lambda: PromptFidelity(clip), prompted))
    grouped = [(images(3, s), [0, 0, 0]) for s in (1, 2, 3)]
    torch.testing.assert_close(*_halves(lambda: Diversity("dino", encoder=dino), grouped))


def test_diversity_groups_by_prompt(dino):
    a, b = images(1, 0), images(1, 1)
    m = Diversity("dino", encoder=dino)
    m.update(torch.cat([a, b, a, b]), torch.tensor([0, 1, 0, 1]))  # identical within each prompt
    assert m.compute().abs() < 1e-5
    assert m.distance_name == "1-cos:builtin:tiny-dino"
    m = Diversity("dino", encoder=dino)
    m.update(torch.cat([a, b, a]), [0, 0, 1])  # one pair (a, b); a lone image forms no pair
    expected = 1 - (dino(a) * dino(b)).sum()
    torch.testing.assert_close(m.compute(), expected, atol=1e-5, rtol=0)
    assert m.pair_count == 1 and m.compute() > 0
    with pytest.raises(ValueError, match="needs an image encoder"):
        Diversity("dino")


def test_diversity_lpips_with_random_backbone():
    m = Diversity("lpips", lpips_pretrained_backbone=False)
    assert m.distance_name == "lpips:alex(random-backbone)"
    same = images(1, 0).repeat(2, 1, 1, 1)
    m.update(same, [0, 0])
    assert m.compute().abs() < 1e-6
    m.update(images(3, 1), [0, 0, 0])  # 1 + 3 pairs
    assert m.pair_count == 4 and m.compute() > 0
    assert list(m.state_dict()) == [] and list(m.parameters()) == []


def test_diversity_lpips_names_missing_backbone(monkeypatch):
    import torchmetrics.functional.image.lpips as tm_lpips

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", offline)
    with pytest.raises(RuntimeError, match=r"alexnet-.*\.pth.*distance='dino'"):
        Diversity("lpips")


def test_encoders_stay_out_of_state_dict(dino, clip):
    metrics = [
        SubjectFidelity(dino, images(1, 0)),
        PreservationScore(dino, images(1, 0)),
        PromptFidelity(clip),
        Diversity("dino", encoder=dino),
    ]
    for m in metrics:
        m.persistent(True)  # even with the states saved, only the sums and counts are
        assert set(m.state_dict()) <= {"cos_sum", "pair_count", "count", "dist_sum"}
        assert list(m.parameters()) == [] and list(m.children()) == []
    assert PreservationScore.higher_is_better is False and SubjectFidelity.higher_is_better is True


def test_metrics_move_with_to(dino):
    ref, gen = images(2, 0), images(2, 1)
    m = SubjectFidelity(dino, ref)
    m.update(gen)
    value = m.compute()
    m = SubjectFidelity(dino, ref).to("cpu").to(torch.float64)
    assert m.reference_embeddings.dtype == torch.float64 and m.cos_sum.dtype == torch.float64
    m.update(gen)
    torch.testing.assert_close(m.compute().float(), value, atol=1e-6, rtol=0)
    assert next(dino.parameters()).dtype == torch.float32  # the held encoder moves device only
    m.reset()
    m.update(gen)  # reference embeddings survive reset()
    torch.testing.assert_close(m.compute().float(), value, atol=1e-6, rtol=0)
