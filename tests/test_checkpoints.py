"""Checkpoints: equivalence with the reference network, SAM initialisation, our format, bad
files, the relative-position cache and layer drop."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
from functools import partial

import pytest
import torch
from torch import nn

from cpsam_toolkit.network import CPSAMNet, NetConfig, get_config
from cpsam_toolkit.network.checkpoints import (
    CheckpointError,
    from_sam,
    load_checkpoint,
    read_file,
    save_checkpoint,
    save_official,
)

TILE = 256


def randomise_(module: nn.Module, seed: int) -> None:
    """Give every trainable tensor non-trivial random values (SAM initialises position
    embeddings and relative-position tables to zeros and LayerNorms to ones/zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("W2", "diam_labels", "diam_mean")):
                continue
            leaf = name.rsplit(".", 1)[-1]
            is_norm = p.ndim == 1 and ("norm" in name or ".neck.1." in name or ".neck.3." in name)
            if is_norm and leaf == "weight":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "rel_pos" in name or "pos_embed" in name or p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


@contextlib.contextmanager
def no_default_init():
    """Skip torch's default initialisation while building a big module (we randomise it)."""
    with pytest.MonkeyPatch.context() as mp:
        for cls in (nn.Linear, nn.Conv2d, nn.LayerNorm):
            mp.setattr(cls, "reset_parameters", lambda self: None)
        yield


def reference_cpsam(blocks: list[int] | None, seed: int = 0, bsize: int = 256) -> nn.Module:
    """The reference ``cellpose.vit.CPSAM`` with random weights, optionally cut to some blocks."""
    vit = pytest.importorskip("cellpose.vit")
    with no_default_init():
        ref = vit.CPSAM(bsize=bsize)
    if blocks is not None:
        ref.encoder.blocks = nn.ModuleList([ref.encoder.blocks[i] for i in blocks])
    randomise_(ref, seed)
    return ref.eval()


#: The fast tests use 128-pixel tiles (the reference's ``bsize``; 16x16 tokens) to keep ViT-L
#: blocks affordable on a CPU; the slow test compares the full network on 256-pixel tiles.
SMALL_TILE = 128


@pytest.fixture(scope="module")
def ref_small():
    """Reference CPSAM cut to blocks 0 (windowed in SAM: 27-row tables) and 5 (global: 127)."""
    return reference_cpsam([0, 5], bsize=SMALL_TILE)


@pytest.fixture(scope="module")
def ref_outputs(ref_small):
    """The reference's outputs for 3- and 1-channel inputs."""
    return {c: ref_forward(ref_small, images(1, c, tile=SMALL_TILE)) for c in (3, 1)}


def ref_forward(ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = ref(x)
    return out[0] if isinstance(out, tuple) else out


def images(n: int = 2, c: int = 3, seed: int = 1, tile: int = TILE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, tile, tile, generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------ (a) equivalence with the reference


@pytest.fixture(scope="module")
def ref_file(ref_small, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref_weights"
    torch.save(ref_small.state_dict(), path)
    return path


@pytest.mark.parametrize("channels", [3, 1])
def test_reference_equivalence(ref_file, ref_outputs, channels):
    net, meta = load_checkpoint(ref_file)
    assert meta["format"] == "official"
    cfg = meta["config"]
    assert (cfg.width, cfg.depth, cfg.heads, cfg.neck_width) == (1024, 2, 16, 256)
    assert (cfg.tile, cfg.patch) == (SMALL_TILE, 8)
    assert cfg.rel_pos_rows == (27, 127)
    want = ref_outputs[channels]
    with torch.no_grad():
        got = net(images(1, channels, tile=SMALL_TILE))
    assert got.shape == want.shape == (1, 3, SMALL_TILE, SMALL_TILE)
    assert want.abs().max() > 0.1  # not a degenerate comparison
    assert max_diff(got, want) <= 1e-4


def test_reference_equivalence_module_prefix(ref_small, ref_file, ref_outputs, tmp_path):
    torch.save({"module." + k: v for k, v in ref_small.state_dict().items()}, tmp_path / "dp")
    net, _ = load_checkpoint(tmp_path / "dp")
    plain, _ = load_checkpoint(ref_file)
    for (k, v), (k2, v2) in zip(net.state_dict().items(), plain.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    with torch.no_grad():
        got = net(images(1, 3, tile=SMALL_TILE))
    assert max_diff(got, ref_outputs[3]) <= 1e-4


def test_save_official_loads_in_reference(ref_file, tmp_path):
    """Our plain state dict loads strictly into the reference class and gives its outputs."""
    net, _ = load_checkpoint(ref_file)
    with torch.no_grad():  # our net's weights, changed, written back out
        net.out.bias.add_(0.5)
        net.encoder.blocks[1].attn.rel_pos_h.mul_(-1)
    save_official(net, tmp_path / "b")
    ref2 = reference_cpsam([0, 5], seed=99, bsize=SMALL_TILE)
    ref2.load_state_dict(torch.load(tmp_path / "b", weights_only=True), strict=True)
    x = images(1, 3, tile=SMALL_TILE)
    with torch.no_grad():
        assert max_diff(net(x), ref_forward(ref2, x)) <= 1e-4


@pytest.mark.slow
def test_reference_equivalence_full_vit_l(tmp_path):
    ref = reference_cpsam(None, seed=3)
    torch.save(ref.state_dict(), tmp_path / "cpsam_random")
    net, meta = load_checkpoint(tmp_path / "cpsam_random")
    assert meta["config"] == get_config("vit_l")
    for c in (3, 1):
        x = images(1, c)
        want = ref_forward(ref, x)
        with torch.no_grad():
            got = net(x)
        assert max_diff(got, want) <= 1e-4, c


# ---------------------------------------------------------------- (b) Segment Anything init


def small_sam_encoder(seed: int = 0):
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(seed)
    enc = ImageEncoderViT(
        img_size=1024, patch_size=16, in_chans=3, embed_dim=64, depth=2, num_heads=2,
        mlp_ratio=4.0, out_chans=32, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, use_rel_pos=True,
        window_size=14, global_attn_indexes=(1,),
    )
    randomise_(enc, seed)
    return enc.eval()


SAM_TINY = get_config("tiny").replace(rel_pos_rows=(27, 127))
#: the same with 64-pixel tiles (8x8 tokens), for the fast cache tests
CACHE_CFG = SAM_TINY.replace(tile=64)


@pytest.mark.parametrize("prefixed", [True, False])
def test_from_sam_small(prefixed):
    enc = small_sam_encoder()
    sam = enc.state_dict()
    state = {"image_encoder." + k: v for k, v in sam.items()} if prefixed else dict(sam)
    if prefixed:  # a full SAM checkpoint also holds the prompt encoder and mask decoder
        state["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    net = from_sam(state, SAM_TINY)
    own = net.state_dict()
    assert torch.equal(own["encoder.patch_embed.proj.weight"],
                       sam["patch_embed.proj.weight"][:, :, ::2, ::2])
    assert own["encoder.patch_embed.proj.weight"].shape == (64, 3, 8, 8)
    assert torch.equal(own["encoder.pos_embed"], sam["pos_embed"][:, ::2, ::2])
    assert own["encoder.pos_embed"].shape == (1, 32, 32, 64)
    assert not torch.equal(own["encoder.patch_embed.proj.bias"], sam["patch_embed.proj.bias"])
    copied = [k for k in sam if k.startswith(("blocks.", "neck."))]
    assert len(copied) == 2 * 14 + 6
    for k in copied:
        assert torch.equal(own["encoder." + k], sam[k]), k

    # the converted blocks compute what SAM's blocks compute with global attention
    x = torch.randn(2, 32, 32, 64, generator=torch.Generator().manual_seed(5))
    for i, blk in enumerate(enc.blocks):
        blk.window_size = 0  # Cellpose-SAM makes every block global
        with torch.no_grad():
            want = blk(x)
            got = net.encoder.blocks[i](x)
        assert max_diff(got, want) <= 1e-5, i


def test_from_sam_wrong_size():
    enc = small_sam_encoder()
    with pytest.raises(CheckpointError, match="Segment Anything"):
        from_sam(enc.state_dict(), get_config("small"))


@pytest.mark.slow
def test_from_sam_vit_b():
    from segment_anything import sam_model_registry

    with no_default_init():
        sam_model = sam_model_registry["vit_b"](None)
    randomise_(sam_model.image_encoder, 7)
    state = sam_model.state_dict()
    net = from_sam(state, get_config("vit_b"))
    own = net.state_dict()
    assert torch.equal(own["encoder.patch_embed.proj.weight"],
                       state["image_encoder.patch_embed.proj.weight"][:, :, ::2, ::2])
    assert torch.equal(own["encoder.pos_embed"],
                       state["image_encoder.pos_embed"][:, ::2, ::2])
    for k, v in state.items():
        if k.startswith(("image_encoder.blocks.", "image_encoder.neck.")):
            assert torch.equal(own["encoder." + k[len("image_encoder."):]], v), k
    x = torch.randn(1, 32, 32, 768)
    blk = sam_model.image_encoder.blocks[2]  # a global block in SAM (127-row tables)
    with torch.no_grad():
        assert max_diff(net.encoder.blocks[2](x), blk(x)) <= 1e-4


# ---------------------------------------------------------------------------- (c) our format


def test_our_format_round_trip(tmp_path):
    cfg = get_config("tiny").replace(depth=3, in_channels=2, nout=5, layer_drop=0.1, tile=64,
                                     class_names=("background", "nucleus"))
    torch.manual_seed(0)
    net = CPSAMNet(cfg)
    randomise_(net, 11)
    net.eval()
    meta = {"trained_on": "unit test", "epochs": 7, "diameter": 17.5}
    save_checkpoint(net, tmp_path / "ours.pt", meta=meta)
    net2, meta2 = load_checkpoint(tmp_path / "ours.pt")
    assert meta2["config"] == cfg
    assert meta2["format"] == "cpsam-toolkit"
    assert {k: meta2[k] for k in meta} == meta
    assert not net2.training
    x = images(2, 2, tile=64)
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))
    # half precision file: float16 on disk, float32 when loaded, outputs close
    save_checkpoint(net, tmp_path / "half.pt", meta=meta, half=True)
    raw = read_file(tmp_path / "half.pt")
    assert raw["state_dict"]["encoder.pos_embed"].dtype == torch.float16
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "ours.pt").stat().st_size
    net3, _ = load_checkpoint(tmp_path / "half.pt")
    assert net3.encoder.pos_embed.dtype == torch.float32
    with torch.no_grad():
        want, got = net(x), net3(x)
    assert max_diff(got, want) <= 2e-2 * want.abs().max().item()
    assert not torch.equal(got, want)


def test_save_is_atomic(tmp_path, monkeypatch):
    net = CPSAMNet(get_config("tiny"))
    save_checkpoint(net, tmp_path / "m.pt")
    before = (tmp_path / "m.pt").read_bytes()

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(net, tmp_path / "m.pt")
    assert (tmp_path / "m.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# ----------------------------------------------------------------------------- (d) bad files


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("good") / "tiny_official"
    torch.manual_seed(0)
    save_official(CPSAMNet(get_config("tiny")), p)
    return p


def assert_bad(path, *fragments):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f.lower() in msg.lower(), msg
    return msg


def test_truncated_empty_random_text(tmp_path, tiny_file):
    data = tiny_file.read_bytes()
    (tmp_path / "half").write_bytes(data[: len(data) // 2])
    assert_bad(tmp_path / "half", "truncated")
    (tmp_path / "empty").write_bytes(b"")
    assert_bad(tmp_path / "empty", "empty")
    (tmp_path / "random").write_bytes(os.urandom(4096))
    msg = assert_bad(tmp_path / "random", "not a PyTorch weights file")
    assert "code" not in msg
    (tmp_path / "notes.txt").write_text("these are not weights\n" * 20)
    assert_bad(tmp_path / "notes.txt", "not a PyTorch weights file")
    assert_bad(tmp_path / "missing", "does not exist")
    assert_bad(tmp_path, "does not exist")  # a folder


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_payload_is_not_executed(tmp_path):
    marker = tmp_path / "EXECUTED"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, tmp_path / "evil.pt")
    assert_bad(tmp_path / "evil.pt", "Python objects or code", "nothing in it was executed")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Payload(marker), f, protocol=2)
    assert_bad(tmp_path / "evil.pkl", "Python objects or code")
    assert not marker.exists()
    # the payload really works when executed (so the test above can fail)
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f)  # noqa: S301 - deliberately, on our own file
    assert marker.exists()


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    assert_bad(tmp_path / "list.pt", "not a state dict")
    torch.save({"a": 1, "b": "x"}, tmp_path / "dict.pt")
    assert_bad(tmp_path / "dict.pt", "not a state dict")
    torch.save({1: torch.zeros(1)}, tmp_path / "intkeys.pt")
    assert_bad(tmp_path / "intkeys.pt", "not a state dict")
    torch.save({"format": "cpsam-toolkit", "format_version": 99, "config": {}, "state_dict": {}},
               tmp_path / "future.pt")
    assert_bad(tmp_path / "future.pt", "upgrade")
    torch.save({"encoder.pos_embed": torch.zeros(1, 32, 32, 8)}, tmp_path / "nocp4.pt")
    assert_bad(tmp_path / "nocp4.pt", "W2")


def test_wrong_architecture(tmp_path, tiny_file):
    tiny = torch.load(tiny_file, weights_only=True)
    small = CPSAMNet(get_config("small")).state_dict()
    # our format: the config says 'small', the weights are 'tiny'
    torch.save({"format": "cpsam-toolkit", "format_version": 1,
                "config": get_config("small").to_dict(), "state_dict": tiny, "meta": {}},
               tmp_path / "mismatch.pt")
    assert_bad(tmp_path / "mismatch.pt", "does not fit", "shape mismatch")
    # missing key
    s = dict(tiny)
    del s["encoder.neck.2.weight"]
    torch.save(s, tmp_path / "missing_key")
    assert_bad(tmp_path / "missing_key", "missing", "encoder.neck.2.weight")
    # a key that size inference needs
    s = dict(tiny)
    del s["encoder.blocks.1.attn.rel_pos_h"]
    torch.save(s, tmp_path / "missing_rel")
    assert_bad(tmp_path / "missing_rel", "encoder.blocks.1.attn.rel_pos_h")
    # one block taken from a different preset
    s = dict(tiny)
    s["encoder.blocks.1.mlp.lin1.weight"] = small["encoder.blocks.1.mlp.lin1.weight"]
    torch.save(s, tmp_path / "mixed")
    assert_bad(tmp_path / "mixed", "shape mismatch", "encoder.blocks.1.mlp.lin1.weight")
    # extra keys
    s = dict(tiny)
    s["encoder.blocks.9.extra"] = torch.zeros(3)
    torch.save(s, tmp_path / "extra")
    assert_bad(tmp_path / "extra", "unexpected")


def test_cellpose3_model(tmp_path):
    cp3 = {
        "downsample.down.res_down_0.conv.conv_0.0.weight": torch.zeros(32),
        "downsample.down.res_down_0.conv.conv_0.2.weight": torch.zeros(32, 2, 3, 3),
        "upsample.up.res_up_0.conv.conv_0.0.weight": torch.zeros(32),
        "output.0.weight": torch.zeros(32),
        "output.2.weight": torch.zeros(3, 32, 1, 1),
        "diam_mean": torch.tensor([30.0]),
    }
    torch.save(cp3, tmp_path / "cyto3")
    assert_bad(tmp_path / "cyto3", "Cellpose 3")
    torch.save({"module." + k: v for k, v in cp3.items()}, tmp_path / "cyto3_dp")
    assert_bad(tmp_path / "cyto3_dp", "Cellpose 3")


# ------------------------------------------------------------------ (e) relative-position cache


def test_rel_pos_cache_reused_in_inference():
    torch.manual_seed(0)
    net = CPSAMNet(CACHE_CFG).eval()
    randomise_(net, 1)
    x = images(1, tile=64)
    attn = net.encoder.blocks[1].attn
    with torch.no_grad():
        y1 = net(x)
        cache = attn._cache
        assert cache is not None
        y2 = net(x)
        assert attn._cache is cache  # not recomputed
        assert torch.equal(y1, y2)
    # the cached lookups equal the differentiable path
    y3 = net(x)
    assert y3.requires_grad
    assert max_diff(y3.detach(), y1) <= 1e-5 * y1.abs().max().item()


def test_rel_pos_cache_invalidated_by_load_state_dict():
    torch.manual_seed(0)
    net = CPSAMNet(CACHE_CFG).eval()
    randomise_(net, 1)
    other = CPSAMNet(CACHE_CFG).eval()
    randomise_(other, 2)
    x = images(1, tile=64)
    with torch.no_grad():
        y_net = net(x)
        caches = [b.attn._cache for b in net.encoder.blocks]
        # only the position tables differ, so stale tables would give a wrong output
        state = net.state_dict()
        for k, v in other.state_dict().items():
            if "rel_pos" in k:
                state[k] = v
        net.load_state_dict(state)
        ref = CPSAMNet(CACHE_CFG).eval()
        ref.load_state_dict(state)
        y_new = net(x)
        assert all(b.attn._cache is not c for b, c in zip(net.encoder.blocks, caches, strict=True))
        assert torch.equal(y_new, ref(x))
        assert max_diff(y_new, y_net) > 1e-3
        # an in-place update of a table (as an optimizer step does) also invalidates it
        net.encoder.blocks[0].attn.rel_pos_w.mul_(3)
        assert not torch.equal(net(x), y_new)


def test_rel_pos_gradients_when_training():
    torch.manual_seed(0)
    net = CPSAMNet(CACHE_CFG.replace(layer_drop=0.0)).train()
    randomise_(net, 1)
    out = net(images(2, tile=64))
    out.square().mean().backward()
    for blk in net.encoder.blocks:
        for p in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
            assert p.grad is not None and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- (f) layer drop


def forward_skipping(net: CPSAMNet, x: torch.Tensor, skip: set[int]) -> torch.Tensor:
    enc = net.encoder
    h = enc.patch_embed(x) + enc.pos_embed
    for i, blk in enumerate(enc.blocks):
        if i not in skip:
            h = blk(h)
    return torch.nn.functional.pixel_shuffle(net.out(enc.neck(h.permute(0, 3, 1, 2))),
                                             net.cfg.patch)


def test_layer_drop_per_sample():
    cfg = NetConfig(width=32, depth=4, heads=2, neck_width=16, tile=64, layer_drop=0.4)
    torch.manual_seed(0)
    net = CPSAMNet(cfg)
    randomise_(net, 3)
    x = images(16, 3, seed=4, tile=64)
    with torch.no_grad():
        net.eval()
        candidates = {}
        for r in range(cfg.depth + 1):
            for skip in itertools.combinations(range(cfg.depth), r):
                candidates[skip] = forward_skipping(net, x, set(skip))
        # eval mode: deterministic, every block used
        assert torch.equal(net(x), net(x))
        assert max_diff(net(x), candidates[()]) <= 1e-5
        net.train()
        torch.manual_seed(123)
        patterns = []
        for _ in range(4):
            y = net(x)
            for b in range(len(x)):
                hits = [s for s, c in candidates.items() if max_diff(y[b], c[b]) <= 1e-5]
                assert len(hits) == 1, hits  # each sample is some subset of blocks skipped
                patterns.append(hits[0])
    assert all(0 not in p for p in patterns)  # block 0 is never dropped
    rates = [sum(i in p for p in patterns) / len(patterns) for i in range(cfg.depth)]
    expected = torch.linspace(0, 0.4, cfg.depth).tolist()
    for got, want in zip(rates, expected, strict=True):
        assert abs(got - want) <= 0.15, (rates, expected)
    assert rates[-1] > 0
    assert len(set(patterns)) > 2  # per sample, not per batch
