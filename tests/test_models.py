import pytest
import torch

from splitnet import models

SHAPES = {"cnn": (1, 16, 16), "vgg11_bn": (3, 32, 32), "resnet20": (3, 32, 32)}
# VGG's 13 cuts cost seconds each on 2 cores: the first, the default, a deep one and the last.
CUTS = {"cnn": models.cut_points("cnn"), "vgg11_bn": ["conv1", "pool2", "conv5", "pool5"],
        "resnet20": models.cut_points("resnet20")}


@pytest.mark.parametrize("arch", models.architectures())
@pytest.mark.parametrize("bottleneck", [0, 8])
def test_every_cut_composes(arch, bottleneck):
    for cut in CUTS[arch]:
        split = models.build(models.SplitSpec(arch, cut, 7, SHAPES[arch], bottleneck))
        with torch.no_grad():
            z = split.encoder(torch.rand(2, *SHAPES[arch]))
        assert tuple(z.shape[1:]) == split.feature_shape
        assert split.decoder(z).shape == (2, 7)
        if bottleneck:
            assert split.feature_shape[0] == bottleneck and 0 <= float(z.min()) and float(z.max()) <= 1


def test_default_cut_and_errors():
    assert models.SplitSpec().resolved().cut == "block1"
    with pytest.raises(ValueError, match="valid cuts"):
        models.SplitSpec(cut="nope").resolved()
    with pytest.raises(ValueError, match="unknown arch"):
        models.SplitSpec(arch="alexnet").resolved()


def test_vgg_matches_cem_paper_shape():
    split = models.build(models.SplitSpec("vgg11_bn", "pool2", 10, (3, 32, 32), 8))
    assert split.feature_shape == (8, 8, 8)
    head = [m for m in split.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in head] == [512, 512, 10]


def test_same_seed_same_weights():
    a = models.build(models.SplitSpec())
    torch.manual_seed(1)
    b = models.build(models.SplitSpec())
    torch.manual_seed(1)
    c = models.build(models.SplitSpec())
    assert all(torch.equal(x, y) for x, y in zip(b.encoder.state_dict().values(), c.encoder.state_dict().values()))
    assert a.feature_shape == b.feature_shape


@pytest.mark.parametrize("arch", models.architectures())
def test_describe_lists_each_cut_with_the_features_build_sends(arch):
    """describe()'s shapes are what a model built at that cut sends (width 0.25: VGG's cuts in seconds)."""
    shape = SHAPES[arch]
    info = models.describe(arch, shape, num_classes=7, width=0.25)
    assert list(info.cuts) == models.cut_points(arch) and info.arch == arch
    assert info.default_cut == models.SplitSpec(arch).resolved().cut
    for cut in CUTS[arch]:
        built = models.build(models.SplitSpec(arch, cut, 7, shape, width=0.25))
        assert info.cuts[cut] == built.feature_shape, cut
    assert "out_features=7" in info.head[-1]  # the head ends in the classes


def test_describe_keeps_the_callers_random_stream_and_refuses_what_build_refuses():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    models.describe("resnet20", (3, 32, 32))
    assert torch.equal(torch.rand(4), expected)
    assert models.architectures() == ("cnn", "resnet20", "vgg11_bn")
    with pytest.raises(ValueError, match="unknown arch 'alexnet'"):
        models.describe("alexnet")
    with pytest.raises(ValueError, match="width"):
        models.describe("cnn", width=0.0)
    with pytest.raises(ValueError, match=r"input \(1, 16, 16\) is too small for vgg11_bn at pool5"):
        models.describe("vgg11_bn", (1, 16, 16), width=0.25)
