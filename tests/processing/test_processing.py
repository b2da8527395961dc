"""The processor against transformers' GroundingDinoProcessor, plus input handling and errors."""

from __future__ import annotations

import io
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from gdino.inference.postprocess import phrase_for_tokens, phrase_scores
from gdino.processing.image import ImageError, load_image, resized_size
from gdino.processing.processor import BatchEncoding, GroundingDinoProcessor, resolve_files
from gdino.processing.text import PromptError, packaged_vocab_path, phrase_spans
from gdino.utils.hub import CheckpointError
from reference import DATA

PROMPT = "a cat. a remote control."
LABELS = ["cat", "remote control"]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    tokenizer = transformers.BertTokenizer(str(packaged_vocab_path()))
    return transformers.GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def proc() -> GroundingDinoProcessor:
    return GroundingDinoProcessor.default()


def _images(names):
    return [Image.open(DATA / n) for n in names]


def _assert_same_inputs(ours, ref):
    assert list(ours) == list(ref)  # same keys, same order
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_mask"):
        if key in ref:
            assert ours[key].dtype == ref[key].dtype, key
            assert torch.equal(ours[key], ref[key]), key
    if "pixel_values" in ref:
        assert ours["pixel_values"].dtype == torch.float32
        assert ours["pixel_values"].shape == ref["pixel_values"].shape
        assert torch.allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("names", [["chelsea.png"], ["coffee.png"], ["chelsea.png", "coffee.png"]])
@pytest.mark.parametrize("text", [PROMPT, LABELS], ids=["string", "labels"])
def test_inputs_match_transformers(hf, proc, names, text):
    ours = proc(images=_images(names), text=text, return_tensors="pt")
    # transformers returns one text row for one prompt; we repeat it per image, so ask it for that.
    ref = hf(images=_images(names), text=[text] * len(names), return_tensors="pt")
    _assert_same_inputs(ours, ref)
    single = hf(images=_images(names), text=text, return_tensors="pt")
    assert torch.equal(ours["input_ids"], single["input_ids"].expand(len(names), -1))


def test_model_card_text_form(hf, proc):
    """The model card passes ``[["a cat", "a remote control"]]``: one label list per image."""
    nested = [["a cat", "a remote control"]]
    ours = proc(images=_images(["chelsea.png"]), text=nested)
    _assert_same_inputs(ours, hf(images=_images(["chelsea.png"]), text=nested, return_tensors="pt"))
    both = proc(images=_images(["chelsea.png", "coffee.png"]), text=nested)
    assert torch.equal(both["input_ids"], ours["input_ids"].expand(2, -1))


def test_per_image_prompts_padded_like_transformers(hf, proc):
    texts = ["a cat.", ["cat", "remote control", "sofa"]]
    ours = proc(images=_images(["chelsea.png", "coffee.png"]), text=texts)
    ref = hf(
        images=_images(["chelsea.png", "coffee.png"]),
        text=["a cat.", "cat. remote control. sofa."],
        return_tensors="pt",
        padding=True,
    )
    _assert_same_inputs(ours, ref)


def test_labels_are_tokenised_as_detect_writes_them(hf, proc):
    """A label goes into the prompt as ``detect`` writes it ("traffic_light" -> "traffic light");
    transformers keeps "_" as a token of its own, the one documented difference."""
    from gdino.processing.classes import label_query

    labels = ["traffic_light", "cat"]
    ours = proc(text=labels)["input_ids"]
    (chunk,) = label_query(labels, proc.tokenizer).prompts  # the prompt detect runs
    assert torch.equal(ours, proc(text=chunk.text)["input_ids"])
    assert torch.equal(ours, proc(text="traffic light. cat.")["input_ids"])
    assert torch.equal(proc(text=[labels])["input_ids"], ours)  # the model card's nested form
    underscore = proc.tokenizer.encode(["_"]).input_ids[0, 1].item()
    assert underscore in hf(text=labels, return_tensors="pt")["input_ids"][0].tolist()
    assert underscore not in ours[0].tolist()


def test_labels_keyword_removes_the_guessing(hf, proc):
    # text=: transformers' rule, a "." makes a list of strings one prompt per item
    assert torch.equal(
        proc(text=["st. bernard"])["input_ids"], hf(text=["st. bernard."], return_tensors="pt")["input_ids"]
    )
    # labels=: always one label list, as detect reads ["st. bernard"]
    explicit = proc(images=_images(["chelsea.png", "coffee.png"]), labels=["st. bernard", "cat"])
    assert torch.equal(explicit["input_ids"], proc(text="st bernard. cat.")["input_ids"].expand(2, -1))
    with pytest.raises(PromptError, match="text or labels"):
        proc(text="a cat.", labels=["cat"])
    with pytest.raises(PromptError, match="not a string"):
        proc(labels="cat")


@pytest.mark.parametrize(
    "prompt",
    [
        "a cat. a remote control.",
        "the café's crème brûlée.",
        "naïve 东京 tower? 42 apples.",
        "unbelievably-long-hyphenated-wordpieces. x-ray!.",
        "tabs\tand  spaces . dots...",
        "[sep] [mask] things.",
    ],
)
def test_token_ids_match_bert_tokenizer(hf, proc, prompt):
    ours = proc(text=prompt)
    ref = hf.tokenizer(prompt, return_tensors="pt", return_token_type_ids=True)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[key], ref[key]), key


def test_text_is_normalised(proc):
    assert torch.equal(proc(text="  A Cat ")["input_ids"], proc(text="a cat.")["input_ids"])
    assert torch.equal(proc(text=["A Cat", " Dog "])["input_ids"], proc(text="a cat. dog.")["input_ids"])
    assert proc.decode(proc(text="A Cat")["input_ids"][0]) == "[CLS] a cat. [SEP]"


def test_resized_size_matches_transformers():
    from transformers.image_transforms import get_size_with_aspect_ratio

    rng = np.random.default_rng(0)
    sizes = [(300, 451), (400, 600), (512, 512), (800, 1333), (100, 1000), (1, 5000)]
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(500)]
    for h, w in sizes:
        assert resized_size(h, w, 800, 1333) == get_size_with_aspect_ratio((h, w), 800, 1333), (h, w)


# --------------------------------------------------------------------------- post-processing


def _fake_outputs(proc, prompts, seed):
    gen = torch.Generator().manual_seed(seed)
    input_ids = proc(text=prompts)["input_ids"]
    logits = torch.randn(len(prompts), 900, 256, generator=gen) * 2 - 1
    lengths = (input_ids != 0).sum(1)
    for b, n in enumerate(lengths.tolist()):
        logits[b, :, n:] = float("-inf")
    boxes = torch.rand(len(prompts), 900, 4, generator=gen)
    return SimpleNamespace(logits=logits, pred_boxes=boxes, input_ids=input_ids)


@pytest.mark.parametrize("threshold,text_threshold", [(0.25, 0.25), (0.35, 0.3), (0.5, 0.1), (0.05, 0.6)])
@pytest.mark.parametrize("sizes", [None, "list", "tensor"])
def test_post_process_matches_transformers(hf, proc, threshold, text_threshold, sizes):
    outputs = _fake_outputs(proc, ["a cat. a remote control.", "a dog."], seed=int(threshold * 100))
    target_sizes = {None: None, "list": [(300, 451), (400, 600)], "tensor": torch.tensor([[300, 451], [400, 600]])}[
        sizes
    ]
    ours = proc.post_process_grounded_object_detection(
        outputs, threshold=threshold, text_threshold=text_threshold, target_sizes=target_sizes
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = hf.post_process_grounded_object_detection(
            outputs, threshold=threshold, text_threshold=text_threshold, target_sizes=target_sizes
        )
        ref = [dict(r.items()) for r in ref]
    assert len(ours) == len(ref) == 2
    for o, r in zip(ours, ref):
        assert list(o) == list(r)
        assert len(o["scores"]) > 0
        assert torch.equal(o["scores"], r["scores"])
        assert torch.allclose(o["boxes"], r["boxes"], rtol=0, atol=1e-5)
        assert o["text_labels"] == r["text_labels"]
        assert o["labels"] == r["labels"]


def test_post_process_arguments(proc):
    outputs = _fake_outputs(proc, [PROMPT, PROMPT], seed=1)
    base = proc.post_process_grounded_object_detection(outputs, threshold=0.4)
    alias = proc.post_process_grounded_object_detection(outputs, box_threshold=0.4)
    explicit = proc.post_process_grounded_object_detection(
        SimpleNamespace(logits=outputs.logits, pred_boxes=outputs.pred_boxes),
        input_ids=outputs.input_ids,
        threshold=0.4,
    )
    as_dict = proc.post_process_grounded_object_detection(dict(vars(outputs)), threshold=0.4)
    for r in (alias, explicit, as_dict):
        assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(base, r))
    with pytest.raises(ValueError, match="disagree"):
        proc.post_process_grounded_object_detection(outputs, threshold=0.3, box_threshold=0.4)
    with pytest.raises(ValueError, match="input_ids"):
        proc.post_process_grounded_object_detection(
            SimpleNamespace(logits=outputs.logits, pred_boxes=outputs.pred_boxes)
        )
    with pytest.raises(ValueError, match="target sizes"):
        proc.post_process_grounded_object_detection(outputs, target_sizes=[(10, 10)])


def test_phrase_helpers(proc):
    ids = proc(text=["a cat. a remote control.", "dog?"])["input_ids"]
    assert phrase_spans(ids[0]) == [(1, 3), (4, 7)]
    assert phrase_spans(ids[1]) == [(1, 2)]  # padding after [SEP] ends nothing new
    assert proc.phrase_texts(ids[0]) == ["a cat", "a remote control"]
    spans = phrase_spans(ids[0])
    scores = np.zeros((3, 256), dtype=np.float32)
    scores[0, 2], scores[1, 5], scores[2, 4] = 0.9, 0.8, 0.7  # "cat", "remote", "a" (of phrase 1)
    scores[:, 3] = 0.95  # the "." between phrases belongs to no phrase
    index, best = phrase_for_tokens(scores, spans)
    assert index.tolist() == [0, 1, 1]
    np.testing.assert_allclose(best, [0.9, 0.8, 0.7], rtol=1e-6)
    assert phrase_scores(scores, spans).shape == (3, 2)
    with pytest.raises(PromptError):
        phrase_scores(scores, [])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text", ["", "   \n", [], ["cat", " "]])
def test_empty_prompt(proc, text):
    with pytest.raises(PromptError, match="empty"):
        proc(images=_images(["chelsea.png"]), text=text)


def test_prompt_too_long(proc):
    with pytest.raises(PromptError, match=r"303 tokens.*at most 256"):  # [CLS] + 300 + "." + [SEP]
        proc(text="a " * 300)


def test_prompt_image_count_mismatch(proc):
    with pytest.raises(PromptError, match="3 prompts for 2 images"):
        proc(images=_images(["chelsea.png", "coffee.png"]), text=["a.", "b.", "c."])


def _corrupt_files(tmp_path):
    data = (DATA / "chelsea.png").read_bytes()
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    return ["notes.png", "truncated.png", "corrupt.png", "missing.png"]


def test_unreadable_files(proc, tmp_path):
    for name in _corrupt_files(tmp_path):
        with pytest.raises(ImageError, match=name):
            proc(images=str(tmp_path / name), text=PROMPT)
        with pytest.raises(ImageError, match=rf"image 1: .*{name}"):
            proc(images=[DATA / "chelsea.png", tmp_path / name], text=PROMPT)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((3, 8, 8), np.uint8), "shape"),
        (np.zeros((0, 8, 3), np.uint8), "no pixels"),
        (torch.zeros(3, 8, 8), "unsupported image type"),
    ],
)
def test_bad_image_inputs(proc, bad, match):
    with pytest.raises(ImageError, match=match):
        proc(images=bad, text=PROMPT)


# --------------------------------------------------------------------------- image forms and modes


def _pixels(proc, image):
    return proc(images=image)["pixel_values"]


def test_image_forms_agree(proc):
    img = Image.open(DATA / "coffee.png")
    ref = _pixels(proc, img)
    arr = np.asarray(img)
    for form in (
        str(DATA / "coffee.png"),
        DATA / "coffee.png",
        arr,
        np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)]),
    ):
        assert torch.equal(_pixels(proc, form), ref)
    gray = np.asarray(img.convert("L"))
    assert torch.equal(_pixels(proc, gray), _pixels(proc, np.dstack([gray] * 3)))
    assert torch.equal(_pixels(proc, gray[..., None]), _pixels(proc, np.dstack([gray] * 3)))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "1"])
def test_modes_convert_to_rgb(proc, mode):
    img = Image.open(DATA / "chelsea.png").convert(mode)
    out = _pixels(proc, img)
    assert out.shape == (1, 3, 800, 1202)
    assert torch.equal(out, _pixels(proc, img.convert("RGB")))


def test_transparency_on_white_and_16_bit(proc):
    rgba = np.zeros((20, 30, 4), np.uint8)  # fully transparent black
    white = np.full((20, 30, 3), 255, np.uint8)
    assert torch.equal(_pixels(proc, rgba), _pixels(proc, white))
    assert torch.equal(_pixels(proc, Image.fromarray(rgba, "RGBA")), _pixels(proc, white))
    wide = Image.fromarray(np.full((20, 30), 65535, np.uint16))
    assert wide.mode.startswith("I;16")
    assert torch.equal(_pixels(proc, wide), _pixels(proc, white))


def test_exif_rotation_applied(proc, tmp_path):
    src = Image.open(DATA / "chelsea.png")  # 451 wide, 300 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    src.save(path, exif=exif.tobytes(), quality=95)
    out = proc(images=path)
    assert out["pixel_values"].shape == (1, 3, 1202, 800)  # portrait now
    raw = np.asarray(Image.open(path))  # decoded pixels, orientation not applied
    upright = np.ascontiguousarray(np.rot90(raw, k=-1))
    assert torch.equal(out["pixel_values"], _pixels(proc, upright))
    assert load_image(Image.open(path)).size == (300, 451)


# --------------------------------------------------------------------------- output object and loading


def test_batch_encoding(proc):
    out = proc(images=_images(["chelsea.png"]), text=PROMPT)
    assert isinstance(out, BatchEncoding) and out.input_ids is out["input_ids"]

    def model(input_ids, token_type_ids, attention_mask, pixel_mask, pixel_values):
        return pixel_values.shape

    assert model(**out) == (1, 3, 800, 1202)
    assert out.to("cpu") is out
    out.to(torch.float16)
    assert out.pixel_values.dtype == torch.float16 and out.input_ids.dtype == torch.int64
    with pytest.raises(AttributeError, match="no field"):
        _ = out.labels
    as_np = proc(images=_images(["chelsea.png"]), text=PROMPT, return_tensors="np")
    assert isinstance(as_np["pixel_values"], np.ndarray) and as_np["pixel_values"].dtype == np.float32


def test_from_pretrained_local_dirs(hf, proc, tmp_path):
    saved = tmp_path / "saved"
    hf.save_pretrained(saved)  # tokenizer.json + processor_config.json (transformers 5 layout)
    assert resolve_files(saved).tokenizer_json is not None
    loaded = GroundingDinoProcessor.from_pretrained(saved)
    _assert_same_inputs(
        loaded(images=_images(["coffee.png"]), text=PROMPT), proc(images=_images(["coffee.png"]), text=PROMPT)
    )

    hub = tmp_path / "hub"  # the Hub repo layout: vocab.txt + preprocessor_config.json
    hub.mkdir()
    (hub / "vocab.txt").write_bytes(packaged_vocab_path().read_bytes())
    (hub / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 400, "longest_edge": 500}}))
    (hub / "config.json").write_text(json.dumps({"max_text_len": 8}))
    small = GroundingDinoProcessor.from_pretrained(str(hub))
    assert small(images=_images(["coffee.png"]))["pixel_values"].shape == (1, 3, 333, 500)
    with pytest.raises(PromptError, match="at most 8"):
        small(text="one two three four five six seven.")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        GroundingDinoProcessor.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="unexpected"):
        GroundingDinoProcessor.from_pretrained(hub, colour="red")


def test_png_bytes_roundtrip_is_lossless(proc):
    buf = io.BytesIO()
    Image.open(DATA / "astronaut.png").save(buf, format="PNG")
    again = Image.open(io.BytesIO(buf.getvalue()))
    assert torch.equal(_pixels(proc, again), _pixels(proc, DATA / "astronaut.png"))


@pytest.mark.parametrize("size,expected", [((5000, 1), (1, 1333)), ((1, 5000), (1333, 1)), ((1333, 30), (30, 1333))])
def test_very_elongated_images_keep_at_least_one_pixel(proc, size, expected):
    """Fitting 5000x1 into 1333 pixels leaves 0.27 rows (HF's processor fails): one row is kept."""
    assert tuple(proc(images=Image.new("RGB", size), text="a cat.")["pixel_values"].shape[-2:]) == expected
