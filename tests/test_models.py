import pytest
import torch

from pipeline.models import build_tiny, clip_tokenizer, load_models, parse_dtype


def test_tokenizer_matches_open_clip():
    import open_clip

    ref = open_clip.get_tokenizer("ViT-B-32")
    tok = clip_tokenizer()
    for text in ["a photo of a cat", "A Big, RED house!! on a hill", "oil painting of dogs, 4k"]:
        ours = tok(text).input_ids  # unpadded: open_clip pads with 0, SD's tokenizer with <|endoftext|>
        theirs = [i for i in ref([text])[0].tolist() if i != 0]
        assert ours == theirs, text
        assert len(ours) > 4
    assert tok.model_max_length == 77


def test_tiny_is_deterministic_and_flagged():
    a, b = build_tiny(), build_tiny()
    for (na, pa), (nb, pb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert a.random_weights and a.model_id == "tiny"
    assert a.vae_scale_factor == 8 and a.resolution == 128


def test_tiny_encode_decode_shapes(tiny):
    img = torch.rand(2, 3, 64, 128) * 2 - 1
    lat = tiny.encode_images(img)
    assert lat.shape == (2, 4, 8, 16) and lat.dtype == torch.float32
    assert tiny.decode_latents(lat).shape == (2, 3, 64, 128)
    emb = tiny.encode_text(["a", "b c"])
    assert emb.shape == (2, 77, 32)
    assert tiny.count_tokens("a b c") == 5


def test_dtype_parsing():
    assert parse_dtype("auto", torch.device("cpu")) == torch.float32
    assert parse_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8", torch.device("cpu"))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a folder, a built-in model .*tiny-flux"):
        load_models(str(tmp_path / "nope"), device="cpu")


def test_loads_a_local_diffusers_folder_with_its_own_scheduler(tmp_path, tiny):
    # The real-checkpoint path, offline: save the tiny components in the
    # diffusers layout (as a hub snapshot has them) and load them back.
    from diffusers import DDIMScheduler

    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(tiny, name).save_pretrained(tmp_path / name)
    DDIMScheduler.from_config({**tiny.scheduler.config, "prediction_type": "v_prediction"}).save_pretrained(tmp_path / "scheduler")
    m = load_models(str(tmp_path), device="cpu")
    assert not m.random_weights and m.model_id == str(tmp_path) and m.resolution == 128
    assert m.prediction_type == "v_prediction" and m.dtype == torch.float32
    for (_, a), (_, b) in zip(m.unet.state_dict().items(), tiny.unet.state_dict().items()):
        assert torch.equal(a, b)
    assert m.encode_text(["a cat"]).shape == (1, 77, 32)


def test_v_prediction_model_reconstructs_exactly(tiny):
    from diffusers import DDIMScheduler

    from pipeline.inversion import edit_friendly as ef

    sched = DDIMScheduler.from_config({**tiny.scheduler.config, "prediction_type": "v_prediction"})
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = tiny.encode_text(["a"]), tiny.encode_text([""])
    code = ef.invert(tiny.unet, sched, x0, cond, uncond, num_steps=8, skip=2, generator=torch.Generator().manual_seed(1))
    assert (ef.edit(tiny.unet, sched, code, cond, uncond, cfg_scale=3.5) - x0).abs().max() <= 1e-4


def _serve(handler_cls):
    import http.server
    import threading

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_an_unknown_model_id_fails_fast_naming_the_builtins_and_the_hub(monkeypatch):
    """A mistyped hub id is refused within 2 s with the built-in ids listed:
    against a local stand-in of the hub that answers 404, one that never
    answers, and offline; a path-like id never reaches the hub."""
    import http.server
    import socket
    import time

    from pipeline.models import model_limits

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a):
            pass

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    srv = _serve(NotFound)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection, never answers
    try:
        for endpoint, says in ((f"http://127.0.0.1:{srv.server_port}", "the Hugging Face hub answered HTTP 404"),
                               (f"http://127.0.0.1:{silent.getsockname()[1]}", "did not answer within")):
            monkeypatch.setenv("HF_ENDPOINT", endpoint)
            t0 = time.perf_counter()
            with pytest.raises(ValueError, match=says) as exc:
                model_limits("nobody/stable-diffusion-typo")
            assert time.perf_counter() - t0 < 2.0
            assert "tiny-flux" in str(exc.value) and "toy" in str(exc.value)
    finally:
        srv.shutdown()
        silent.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set .*built-in models: tiny"):
        model_limits("nobody/stable-diffusion-typo")
    with pytest.raises(ValueError, match="not a folder, a built-in model"):
        model_limits("./no/such/folder")
