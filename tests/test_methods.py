"""Every method against values worked out by hand on tiny inputs, plus the invariants of issue 3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camcli.engine import CamEngine, EngineConfig, finalize
from camcli.errors import UsageError
from camcli.methods import CamInputs, MethodOptions, available_methods, get_method, parse_methods
from camcli.targets import ClassIndex, TopK
from test_gradcam_golden import GapLinear

# Two channels on a 2x2 grid, and a gradient chosen so every weight can be computed on paper.
A = torch.tensor([[[[1.0, 2.0], [3.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # sum A1 = 7, sum A2 = 2
G = torch.tensor([[[[1.0, 0.0], [-1.0, 2.0]], [[0.5, 0.5], [0.5, 0.5]]]])


def raw(name: str, a: torch.Tensor = A, g: torch.Tensor = G) -> torch.Tensor:
    out = get_method(name).fn(CamInputs(activations=a, targets=torch.tensor([0]), gradients=g))
    return out.sum(dim=1) if out.dim() == 4 else out


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows])


def test_gradcam_by_hand() -> None:
    # w1 = mean(G1) = (1 + 0 - 1 + 2) / 4 = 0.5, w2 = 0.5  ->  0.5 * (A1 + A2)
    assert torch.allclose(raw("gradcam"), t([[0.5, 1.5], [2.0, 0.5]]))


def test_gradcampp_by_hand_differs_from_gradcam() -> None:
    # alpha = G^2 / (2 G^2 + sum(A) G^3), zero where G = 0; w = sum alpha * relu(G)
    # channel 1 (sum A = 7): (0,0) G=1: 1/(2+7) * 1 = 1/9; (1,0) G=-1: relu(G)=0; (1,1) G=2: 4/(8+56) * 2 = 1/8
    #   w1 = 1/9 + 1/8 = 17/72
    # channel 2 (sum A = 2): each G=0.5: 0.25/(0.5+0.25) * 0.5 = 1/6, four times: w2 = 2/3
    expected = (17 / 72) * A[0, 0] + (2 / 3) * A[0, 1]
    assert torch.allclose(raw("gradcam++"), expected[None], atol=1e-6)
    assert torch.allclose(expected, torch.tensor([[17 / 72, 82 / 72], [99 / 72, 17 / 72]]), atol=1e-6)
    # Grad-CAM ranks (0,1) below (1,0) by 1.5 vs 2.0, Grad-CAM++ by 82/72 vs 99/72: same order here,
    # but the ratios differ, so the maps differ after normalisation.
    a = finalize(raw("gradcam"))[0]
    b = finalize(raw("gradcam++"))[0]
    assert not torch.allclose(a, b, atol=1e-3)


def test_gradcampp_is_not_relu_cubed() -> None:
    # The known bug elsewhere: weights from relu(G)^3 instead of the paper's alpha. Different here.
    relu_cubed = (torch.relu(G) ** 3).sum(dim=(2, 3))
    wrong = (relu_cubed[:, :, None, None] * A).sum(1)
    assert not torch.allclose(finalize(wrong)[0], finalize(raw("gradcam++"))[0], atol=1e-3)


def test_xgradcam_by_hand() -> None:
    # w1 = sum(G1*A1)/sum(A1) = (1 + 0 - 3 + 2)/7 = 0; w2 = (0 + .5 + .5 + 0)/2 = 0.5
    assert torch.allclose(raw("xgradcam"), t([[0.0, 0.5], [0.5, 0.0]]))


def test_elementwise_family_by_hand() -> None:
    # G1*A1 = [[1,0],[-3,2]], G2*A2 = [[0,.5],[.5,0]]
    assert torch.allclose(raw("hirescam"), t([[1.0, 0.5], [-2.5, 2.0]]))
    assert torch.allclose(raw("layercam"), t([[1.0, 0.5], [0.5, 2.0]]))  # relu(G) * A
    assert torch.allclose(raw("gradcam-elementwise"), t([[1.0, 0.5], [0.5, 2.0]]))  # relu(G * A)
    g = G.clone()
    g[0, 1, 0, 0] = -4.0  # now relu(G)*A and relu(G*A) differ only where A = 0: still equal
    g[0, 0, 1, 0] = 1.0
    a = A.clone()
    a[0, 0, 1, 0] = -1.0  # negative activation: relu(G)*A = -1, relu(G*A) = 0
    assert float(raw("layercam", a, g)[0, 1, 0]) == pytest.approx(-1.0 + 0.5)
    assert float(raw("gradcam-elementwise", a, g)[0, 1, 0]) == pytest.approx(0.5)


def test_counterfactual_by_hand() -> None:
    assert torch.allclose(raw("counterfactual"), -raw("gradcam"))


def toy_scores_model() -> GapLinear:
    return GapLinear(torch.tensor([[1.0, -0.25], [0.0, 1.0]]))  # bias 0.3


A_TOY = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])


def test_scorecam_by_hand() -> None:
    # masks = minmax(A_k): M1 = [[1,0],[0,0]], M2 = [[0,0],[0,1]]; y = w . mean(x * M) + 0.3
    # s1 = 1 * 0.25 + 0.3 = 0.55; s2 = -0.25 * 0.5 + 0.3 = 0.175; weights = softmax(s)
    w1 = math.exp(0.55) / (math.exp(0.55) + math.exp(0.175))
    w2 = 1 - w1
    engine = CamEngine(toy_scores_model(), EngineConfig(["feat"], [get_method("scorecam")], signed=True))
    out = engine.maps(A_TOY, [ClassIndex(0)])[0].maps[0].cam
    expected = torch.tensor([[w1, 0.0], [0.0, 2 * w2]])
    assert np.allclose(out, (expected / expected.abs().max()).numpy(), atol=1e-6)


def test_ablationcam_by_hand() -> None:
    # y = 0.25 - 0.125 + 0.3 = 0.425; without channel 1: 0.175; without channel 2: 0.55
    # w1 = (0.425 - 0.175)/0.425, w2 = (0.425 - 0.55)/0.425  -> map = w1 A1 + w2 A2
    w1, w2 = 0.25 / 0.425, -0.125 / 0.425
    engine = CamEngine(toy_scores_model(), EngineConfig(["feat"], [get_method("ablationcam")], signed=True))
    out = engine.maps(A_TOY, [ClassIndex(0)])[0].maps[0].cam
    expected = torch.tensor([[w1, 0.0], [0.0, 2 * w2]])
    assert np.allclose(out, (expected / expected.abs().max()).numpy(), atol=1e-6)


def test_ablationcam_divides_by_abs_score_when_the_logit_is_negative() -> None:
    """Deliberate deviation from the paper and pytorch-grad-cam, which divide by y itself.

    Class 0 weights (1, -2), bias 0.3, mean A = (0.25, 0.5): y = 0.25 - 1.0 + 0.3 = -0.45. Zeroing channel 1 gives -0.7
    (channel 1 supports the class), zeroing channel 2 gives 0.55 (channel 2 argues against it).
    w_k = (y - y_k) / |y|: w1 = 0.25 / 0.45 = 5/9, w2 = -1.0 / 0.45 = -20/9; map = w1 A1 + w2 A2.
    The literal (y - y_k) / y negates both weights and would highlight channel 2 instead.
    """
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = GapLinear(torch.tensor([[1.0, -2.0], [0.0, 1.0]]))
    with torch.no_grad():
        assert float(model(A_TOY)[0, 0]) == pytest.approx(-0.45)
    w1, w2 = 5 / 9, -20 / 9
    signed = CamEngine(model, EngineConfig(["feat"], [get_method("ablationcam")], signed=True)).maps(A_TOY, [ClassIndex(0)])
    expected = torch.tensor([[w1, 0.0], [0.0, 2 * w2]])
    assert np.allclose(signed[0].maps[0].cam, (expected / expected.abs().max()).numpy(), atol=1e-6)
    plain = CamEngine(model, EngineConfig(["feat"], [get_method("ablationcam")])).maps(A_TOY, [ClassIndex(0)])[0].maps[0].cam
    assert np.allclose(plain, [[1.0, 0.0], [0.0, 0.0]], atol=1e-6)  # the supporting channel
    # pytorch-grad-cam's literal division by y highlights the opposing channel instead
    with AblationCAM(model=model, target_layers=[model.feat]) as peer:
        theirs = peer(input_tensor=A_TOY, targets=[ClassifierOutputTarget(0)])[0]
    assert np.allclose(theirs, [[0.0, 0.0], [0.0, 1.0]], atol=1e-5)


def test_eigencam_by_hand_and_sign_fixed() -> None:
    # A_k = v_k * P (rank one). Centred rows (P - mean P) v^T: the first component is v/|v| and the
    # projection is (P - mean P) |v| = [[2,0],[-1,-1]] * 5 for v = (3, 4), P = [[3,1],[0,0]].
    p = torch.tensor([[3.0, 1.0], [0.0, 0.0]])
    for v, sign in ((torch.tensor([3.0, 4.0]), 1.0), (torch.tensor([-3.0, -4.0]), -1.0)):
        a = (v[:, None, None] * p)[None]
        got = raw("eigencam", a, torch.zeros_like(a))
        # sign: positively correlated with the channel sum, which is (sum v) * P
        assert torch.allclose(got, sign * t([[10.0, 0.0], [-5.0, -5.0]]), atol=1e-5)


def test_eigengradcam_is_eigencam_of_g_times_a() -> None:
    from camcli.methods.eigen import first_component

    assert torch.allclose(raw("eigengradcam"), first_component(G * A), atol=1e-6)


def test_activations_channels() -> None:
    a = torch.arange(3 * 4, dtype=torch.float32).reshape(1, 3, 2, 2)

    def act(spec: str):  # noqa: ANN202
        return get_method("activations").fn(
            CamInputs(activations=a, targets=torch.tensor([0]), options=MethodOptions(channels=spec))
        )

    assert torch.allclose(act("mean"), a.mean(1))
    assert torch.allclose(act("1"), a[:, 1])
    top = act("top2")
    assert top.channel_ids.tolist() == [[2, 1]]
    assert torch.allclose(top.cam, (a[:, 2] + a[:, 1]) / 2)
    with pytest.raises(UsageError, match="--channels 'top9'"):
        act("top9")


def test_cam_equals_gradcam_on_gap_linear_head() -> None:
    from toymodels import tiny_cnn

    model = tiny_cnn()
    x = torch.randn(4, 3, 40, 40)
    engine = CamEngine(model, EngineConfig(["features"], parse_methods("cam,gradcam")))
    engine.check(x[:1])
    for o in engine.maps(x, [TopK(2)]):
        by = {}
        for m in o.maps:
            by.setdefault(m.target, {})[m.method] = m.cam
        for maps in by.values():
            assert np.allclose(maps["cam"], maps["gradcam"], atol=1e-5)


def test_cam_needs_gap_linear_head() -> None:
    from toymodels import tiny_cnn

    engine = CamEngine(tiny_cnn(), EngineConfig(["features.0"], [get_method("cam")]))
    with pytest.raises(UsageError, match="global-average-pool -> linear"):
        engine.check(torch.zeros(1, 3, 32, 32))


def test_hirescam_equals_gradcam_with_spatially_constant_gradients() -> None:
    torch.manual_seed(3)
    a = torch.rand(2, 5, 4, 6)
    engine = CamEngine(GapLinear(torch.randn(3, 5)), EngineConfig(["feat"], parse_methods("gradcam,hirescam")))
    for o in engine.maps(a, [ClassIndex(1)]):
        assert np.allclose(o.maps[0].cam, o.maps[1].cam, atol=1e-6)


def two_objects() -> tuple[nn.Module, torch.Tensor]:
    """Channel 0 detects a 'cat' on the left, channel 1 a 'dog' on the right; class 0 = cat."""
    x = torch.zeros(1, 2, 4, 8)
    x[0, 0, 1:3, 1:3] = 1.0  # cat, left
    x[0, 1, 1:3, 5:7] = 1.0  # dog, right
    return GapLinear(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])), x


def test_counterfactual_highlights_the_other_object() -> None:
    model, x = two_objects()
    o = CamEngine(model, EngineConfig(["feat"], parse_methods("gradcam,counterfactual"))).maps(x, [ClassIndex(0)])[0]
    grad, counter = o.maps[0].cam, o.maps[1].cam
    assert grad[:, :4].sum() > 0 and grad[:, 4:].sum() == 0  # Grad-CAM: the cat
    assert counter[:, 4:].sum() > 0 and counter[:, :4].sum() == 0  # counterfactual: the dog


def test_signed_keeps_negative_evidence() -> None:
    model, x = two_objects()
    o = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")], signed=True)).maps(x, [ClassIndex(0)])[0]
    cam = o.maps[0].cam
    assert cam.min() == pytest.approx(-1.0) and cam.max() == pytest.approx(1.0)
    assert (cam[:, 4:] <= 0).all() and (cam[:, :4] >= 0).all()


def test_empty_map_is_flagged_not_divided_by_zero() -> None:
    model = GapLinear(torch.tensor([[-1.0, -2.0]]))
    o = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")])).maps(torch.rand(1, 2, 3, 3), [ClassIndex(0)])[0]
    m = o.maps[0]
    assert m.empty and "empty" in m.note and np.isfinite(m.cam).all() and (m.cam == 0).all()


def test_eigen_smooth_takes_the_first_component() -> None:
    # gradcam weighted activations on GAP->linear are w_k A_k; make them rank one: A_k = P.
    p = torch.tensor([[3.0, 1.0], [0.0, 0.0]])
    a = p.expand(1, 2, 2, 2).clone()
    model = GapLinear(torch.tensor([[3.0, 4.0]]))
    plain = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")])).maps(a, [ClassIndex(0)])[0].maps[0].cam
    smooth = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")], eigen_smooth=True)).maps(a, [ClassIndex(0)])[0]
    assert np.allclose(plain, [[1.0, 1 / 3], [0.0, 0.0]], atol=1e-6)
    assert np.allclose(smooth.maps[0].cam, [[1.0, 0.0], [0.0, 0.0]], atol=1e-6)  # relu(P - mean P)


def test_aug_smooth_maps_back_flips_and_scales() -> None:
    # Identity features + GAP->linear: the map of a flipped or rescaled input is the flipped or
    # rescaled map, so the averaged, de-augmented map must match the plain one (not its mirror).
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 12), torch.linspace(0, 1, 16), indexing="ij")
    blob = torch.exp(-((xx - 0.25) ** 2 + (yy - 0.4) ** 2) / 0.02)
    a = torch.stack([blob, 1 - blob])[None]
    model = GapLinear(torch.tensor([[1.0, -0.5]]))
    plain = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")])).maps(a, [ClassIndex(0)])[0].maps[0].cam
    aug = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")], aug_smooth=True)).maps(a, [ClassIndex(0)])[0].maps[0].cam
    assert np.abs(aug - plain).max() < 0.08
    assert np.abs(aug - plain[:, ::-1]).max() > 0.5


def test_guided_relu_gradients_by_hand() -> None:
    from camcli.methods.guided import GuidedReLUMode

    x = torch.tensor([1.0, -1.0, 2.0, 3.0], requires_grad=True)
    upstream = torch.tensor([1.0, 1.0, -1.0, 2.0])
    with GuidedReLUMode():
        y = (F.relu(x) * upstream).sum()
    (g,) = torch.autograd.grad(y, x)
    # pass only where x > 0 and the incoming gradient > 0
    assert g.tolist() == [1.0, 0.0, 0.0, 2.0]
    with GuidedReLUMode():
        y = (nn.ReLU6()(x * 3) * upstream).sum()  # x*3 = [3, -3, 6, 9]: 6 and 9 are at the bound
    (g,) = torch.autograd.grad(y, x)
    assert g.tolist() == [3.0, 0.0, 0.0, 0.0]


class FunctionalReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        h = F.relu(self.conv2(h))  # functional ReLU
        return self.fc(h.mean(dim=(2, 3)))


def test_guided_methods_cover_inplace_and_functional_relus() -> None:
    from camcli.methods.guided import GuidedReLUMode

    torch.manual_seed(0)
    model = FunctionalReluNet().eval()
    x = torch.randn(1, 3, 8, 8)
    o = CamEngine(model, EngineConfig(["conv2"], parse_methods("guided-backprop,guided-gradcam"))).maps(x, [ClassIndex(1)])[0]
    gb = next(m for m in o.maps if m.method == "guided-backprop")
    assert gb.layer == "input" and gb.cam.shape == (8, 8) and gb.cam.max() == pytest.approx(1.0)
    # reference: guided gradient computed directly; every ReLU (module and functional) is guided
    xg = x.clone().requires_grad_(True)
    with GuidedReLUMode():
        (g,) = torch.autograd.grad(model(xg)[0, 1], xg)
    xp = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(xp)[0, 1], xp)
    assert not torch.allclose(g, plain), "guided gradients must differ from plain ones"
    sal = g.abs().amax(dim=1)[0]
    sal = torch.minimum(sal, torch.quantile(sal.flatten(), 0.995))
    assert np.allclose(gb.cam, ((sal - sal.min()) / (sal.max() - sal.min())).numpy(), atol=1e-5)
    gg = next(m for m in o.maps if m.method == "guided-gradcam")
    assert gg.cam.shape == (8, 8) and gg.cam.max() == pytest.approx(1.0)


def test_several_layers_fuse_and_per_layer() -> None:
    from toymodels import tiny_cnn

    model = tiny_cnn()
    x = torch.randn(1, 3, 32, 32)
    o = CamEngine(model, EngineConfig(["features.1", "features.3"], [get_method("gradcam")], per_layer=True)).maps(x, [TopK(1)])[0]
    layers = [m.layer for m in o.maps]
    assert layers == ["features.1+features.3", "features.1", "features.3"]
    fused, early, late = (torch.from_numpy(m.cam) for m in o.maps)
    assert fused.shape == early.shape == (16, 16) and late.shape == (8, 8)
    late_up = F.interpolate(late[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    expected = finalize(((early + late_up) / 2)[None])[0][0]
    assert torch.allclose(fused, expected, atol=1e-6)


def test_saturation_is_reported() -> None:
    class Saturating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feat = nn.Conv2d(3, 4, 1)
            self.squash = nn.Tanh()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.squash(self.feat(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Saturating()
    engine = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")]))
    big = engine.maps(torch.randn(1, 3, 6, 6) * 100, [TopK(1)])[0].saturation
    small = engine.maps(torch.randn(1, 3, 6, 6) * 0.01, [TopK(1)])[0].saturation
    assert big["modules"] == ["squash"] and big["units"] == 4 * 36
    assert big["share"] > 0.8 and small["share"] == 0.0


def test_batching_never_changes_a_map(bundled, samples) -> None:  # noqa: ANN001
    from camcli.images import Preprocess, decode

    pre = Preprocess(160, bundled.mean, bundled.std, flexible=False)
    imgs = [pre(decode(p)) for p in sorted(samples.glob("*.jpg"))]
    batch = torch.stack([imgs[i % len(imgs)] for i in range(8)])
    methods = parse_methods("gradcam,gradcam++,layercam,scorecam,ss-cam,smoothgradcam++")
    opts = MethodOptions(score_channels=8, samples=2)
    engine = CamEngine(bundled.module, EngineConfig(["bn2"], methods, options=opts))
    together = engine.maps(batch, [ClassIndex(285)])
    for i in (0, 5):
        alone = engine.maps(batch[i : i + 1], [ClassIndex(285)])[0]
        for a, b in zip(alone.maps, together[i].maps):
            assert a.method == b.method
            assert np.allclose(a.cam, b.cam, atol=1e-4), a.method


def test_registry_metadata_and_aliases() -> None:
    names = {m.name for m in available_methods()}
    expected = {
        "gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise", "layercam", "counterfactual",
        "cam", "scorecam", "ablationcam", "eigencam", "eigengradcam", "ss-cam", "is-cam", "smoothgradcam++",
        "guided-backprop", "guided-gradcam", "activations",
    }
    assert expected <= names
    assert get_method("gradcampp").name == get_method("GradCAM_PP").name == "gradcam++"
    assert get_method("scorecam").extra_forwards == "K" and not get_method("scorecam").needs_gradients
    assert all(m.paper for m in available_methods())
    with pytest.raises(UsageError, match="did you mean 'layercam'"):
        get_method("layercm")


@pytest.mark.parametrize("shape", [(2, 40, 3, 4), (2, 3, 5, 6)])  # fewer positions than channels, and more
def test_first_component_matches_svd_projection(shape: tuple[int, int, int, int]) -> None:
    from camcli.methods.eigen import first_component

    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    m = x.reshape(shape[0], shape[1], -1).transpose(1, 2)
    c = m - m.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(c, full_matrices=False)
    ref = torch.einsum("bpk,bk->bp", c, vh[:, 0, :])
    got = first_component(x).reshape(shape[0], -1).double()
    assert torch.allclose(got.abs(), ref.abs(), atol=1e-4)
    # and the sign is the one that correlates positively with the channel sum
    s = m.sum(dim=2)
    assert ((got * (s - s.mean(dim=1, keepdim=True))).sum(dim=1) > 0).all()


def test_iscam_by_hand() -> None:
    # masks scaled by i/2, i = 1, 2; y = w . mean(x * s * M) + 0.3 with w = (1, -0.25)
    # channel 1: s = 1/2 -> 0.125 + 0.3 = 0.425; s = 1 -> 0.55; mean 0.4875
    # channel 2: s = 1/2 -> -0.0625 + 0.3 = 0.2375; s = 1 -> 0.175; mean 0.20625; weights = softmax
    w1 = 1 / (1 + math.exp(-(0.4875 - 0.20625)))
    engine = CamEngine(toy_scores_model(), EngineConfig(["feat"], [get_method("is-cam")], signed=True,
                       options=MethodOptions(samples=2)))
    out = engine.maps(A_TOY, [ClassIndex(0)])[0].maps[0].cam
    expected = torch.tensor([[w1, 0.0], [0.0, 2 * (1 - w1)]])
    assert np.allclose(out, (expected / expected.abs().max()).numpy(), atol=1e-6)


def test_sscam_without_noise_is_scorecam_and_noise_is_seeded() -> None:
    def run(name: str, **opts: float) -> np.ndarray:
        engine = CamEngine(toy_scores_model(), EngineConfig(["feat"], [get_method(name)], signed=True,
                           options=MethodOptions(**opts)))
        return engine.maps(A_TOY, [ClassIndex(0)])[0].maps[0].cam

    assert np.allclose(run("ss-cam", noise=0.0, samples=3), run("scorecam"), atol=1e-6)
    noisy = run("ss-cam", noise=0.5, samples=3)
    assert np.array_equal(noisy, run("ss-cam", noise=0.5, samples=3))
    assert not np.allclose(noisy, run("scorecam"), atol=1e-4)


def test_smoothgradcampp_equals_gradcampp_when_gradients_ignore_noise() -> None:
    # On identity features + GAP -> linear, G = w_c / (h w) whatever the input: averaging G, G^2, G^3
    # over noisy copies changes nothing, so the map is Grad-CAM++'s exactly.
    torch.manual_seed(5)
    a = torch.rand(2, 3, 4, 5)
    model = GapLinear(torch.randn(2, 3))
    engine = CamEngine(model, EngineConfig(["feat"], parse_methods("gradcam++,smoothgradcam++"),
                       options=MethodOptions(noise=0.3, samples=4)))
    for o in engine.maps(a, [ClassIndex(1)]):
        assert np.allclose(o.maps[0].cam, o.maps[1].cam, atol=1e-6)


def test_guided_gradcam_is_saliency_times_upsampled_gradcam() -> None:
    from camcli.methods.guided import GuidedReLUMode

    torch.manual_seed(0)
    model = FunctionalReluNet().eval()
    x = torch.randn(1, 3, 8, 8)
    o = CamEngine(model, EngineConfig(["conv2"], parse_methods("guided-gradcam"))).maps(x, [ClassIndex(1)])[0]
    xg = x.clone().requires_grad_(True)
    with GuidedReLUMode():
        (g,) = torch.autograd.grad(model(xg)[0, 1], xg)
    sal = g.abs().amax(dim=1)[0]
    sal = torch.minimum(sal, torch.quantile(sal.flatten(), 0.995))
    a = model.conv2(model.act(model.conv(x))).detach().requires_grad_(True)
    (ga,) = torch.autograd.grad(model.fc(F.relu(a).mean(dim=(2, 3)))[0, 1], a)
    coarse = torch.relu((ga.mean(dim=(2, 3))[:, :, None, None] * a).sum(dim=1))[0]
    raw_map = sal * coarse / coarse.max()  # conv2 keeps 8x8, so no resize here
    expected = (raw_map - raw_map.min()) / (raw_map.max() - raw_map.min())
    assert np.allclose(o.maps[0].cam, expected.detach().numpy(), atol=1e-5)


def test_noise_is_drawn_on_the_cpu_whatever_the_device() -> None:
    # The same seed must give the same noise on every device: draw_noise draws from a CPU generator
    # and only then moves the values. A 'meta' destination has no values, but it still advances the
    # CPU generator exactly as a CPU draw does, which a draw made on the device could not.
    from camcli.methods.base import draw_noise, noise_generator

    reference = torch.Generator().manual_seed(3)
    first, second = torch.randn((2, 3), generator=reference), torch.randn((2, 3), generator=reference)
    gen = noise_generator(3)
    assert gen.device.type == "cpu"
    assert torch.equal(draw_noise([gen], (2, 3), "cpu")[0], first)
    assert torch.equal(draw_noise([gen], (2, 3), "cpu")[0], second)
    meta_gen = noise_generator(3)
    moved = draw_noise([meta_gen], (2, 3), "meta")
    assert moved.device.type == "meta" and moved.shape == (1, 2, 3)
    assert torch.equal(draw_noise([meta_gen], (2, 3), "cpu")[0], second)
    # one tensor per generator: per-image generators with one seed give every image the same noise
    both = draw_noise([noise_generator(3), noise_generator(3)], (2, 3), "cpu")
    assert torch.equal(both[0], first) and torch.equal(both[1], first)


def test_noisy_maps_on_cpu_are_unchanged_by_drawing_noise_on_the_cpu() -> None:
    # Values recorded before the noise moved to draw_noise (seed 7): on the CPU the streams are the same.
    from toymodels import tiny_cnn

    ss = CamEngine(toy_scores_model(), EngineConfig(["feat"], [get_method("ss-cam")], signed=True,
                   options=MethodOptions(noise=0.5, samples=3, seed=7)))
    assert np.allclose(ss.maps(A_TOY, [ClassIndex(0)])[0].maps[0].cam, [[1.0, 0.0], [0.0, 0.9372602]], atol=1e-6)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    sg = CamEngine(tiny_cnn(), EngineConfig(["features.2"], [get_method("smoothgradcam++")], signed=True,
                   options=MethodOptions(noise=0.3, samples=3, seed=7)))
    first = sg.maps(x, [ClassIndex(1)])[0].maps[0].cam
    assert np.allclose(first[0], [0.1569439, -0.0351094, 0.4510500, 0.8087826], atol=1e-5)
    assert np.allclose(first[3], [0.3214593, 0.6373886, 0.0031556, 1.0000000], atol=1e-5)
