"""qaclims.vqa: the VQA interface and BlipVQA (random-weight BLIP, offline tokenizer, offline loading errors)."""
import time

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

import qaclims.weights
from qaclims.settings import load_settings, render_settings
from qaclims.vqa import BlipVQA, VQAAnswerer, blip_pixels, check_questions, from_settings, resolve_vqa_model
from qaclims.weights import OFFLINE_VARIABLES, MissingWeightsError

WORDS = ("what kind type of is in the photo this also called usually another word name for above under behind "
         "around next to left right side scene environment place a an boat car water sky road grass dog cat").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + ["?", "[DEC]", "[ENC]"]
QUESTIONS = [["what is above the boat?", "what scene is the boat in?", "what is next to the car?"],
             ["what is the left side of dog?"],
             [],
             ["what type of cat is in the photo?", "what place is the cat in?"]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    "A BERT WordPiece tokenizer over a tiny vocabulary, with BLIP's [DEC] / [ENC] special tokens."
    vocab_file = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(str(vocab_file), bos_token="[DEC]", additional_special_tokens=["[ENC]"])


def text_config(**sizes):
    return dict(vocab_size=len(VOCAB), bos_token_id=VOCAB.index("[DEC]"), pad_token_id=0, sep_token_id=3,
                eos_token_id=3, **sizes)


def tiny_blip(seed=0):
    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = BlipConfig(vision_config=dict(image_size=32, patch_size=8, **small),
                        text_config=text_config(encoder_hidden_size=32, **small))
    return BlipForQuestionAnswering(config).eval()


def base_blip(seed=0):
    "BLIP ViT-B / BERT-base (BlipConfig's defaults, a tiny vocabulary), random weights without the slow init."
    with torch.device("meta"):
        model = BlipForQuestionAnswering(BlipConfig(text_config=text_config()))
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    largest = max(p.numel() for p in model.parameters())
    pool = torch.randn(2 * largest, generator=generator) * 0.02  # slices of one random pool: fast, not i.i.d.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                offset = int(torch.randint(largest, (1,), generator=generator))
                param.copy_(pool[offset:offset + param.numel()].view_as(param))
            else:
                param.fill_(1.0) if name.endswith("weight") else param.zero_()
        for name, buffer in model.named_buffers():
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return model.eval()


def samples(count=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": f"img{i}", "image": rng.integers(0, 256, (30 + 7 * i, 50 - 3 * i, 3), dtype=np.uint8),
             "labels": np.array([i % 3]), "mask": None} for i in range(count)]


def one_by_one(vqa, items, questions):
    return [[vqa.answer([item], [[q]])[0][0] for q in qs] for item, qs in zip(items, questions)]


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    for name in OFFLINE_VARIABLES + ("HF_HUB_CACHE",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path


def test_interface_and_shapes(tokenizer):
    vqa = BlipVQA(tiny_blip(), tokenizer, image_size=48)
    assert isinstance(vqa, VQAAnswerer)
    answers = vqa.answer(samples(), QUESTIONS)
    assert [len(a) for a in answers] == [3, 1, 0, 2]
    assert all(isinstance(a, str) and "[ENC]" not in a and "[DEC]" not in a for group in answers for a in group)
    assert any(answers[0])
    assert vqa.answer([], []) == []
    with pytest.raises(ValueError, match="one list per sample"):
        vqa.answer(samples(2), QUESTIONS)
    with pytest.raises(TypeError, match="questions\\[0\\]"):
        vqa.answer(samples(1), ["what is above the boat?"])
    with pytest.raises(ValueError, match="uint8"):
        vqa.answer([{"image": np.zeros((8, 8, 3), np.float32)}], [["what?"]])


@pytest.mark.parametrize("num_beams", [3, 1])
def test_batched_equals_one_by_one(tokenizer, num_beams):
    vqa = BlipVQA(tiny_blip(seed=1), tokenizer, image_size=48, num_beams=num_beams, image_batch_size=3)
    items = samples()
    assert vqa.answer(items, QUESTIONS) == one_by_one(vqa, items, QUESTIONS)


def test_each_image_encoded_once(tokenizer):
    vqa = BlipVQA(tiny_blip(), tokenizer, image_size=48, image_batch_size=2)
    vision_batches, generate_batches, lengths = [], [], []
    hook = vqa.model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: vision_batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    generate = vqa.model.text_decoder.generate

    def counted_generate(**kwargs):
        generate_batches.append(kwargs["input_ids"].shape[0])
        sequences = generate(**kwargs)
        lengths.append(sequences.shape[1])
        return sequences

    vqa.model.text_decoder.generate = counted_generate
    try:
        vqa.answer(samples(), QUESTIONS)
    finally:
        hook.remove()
        del vqa.model.text_decoder.generate
    assert vision_batches == [2, 1]  # images 0-1, then 3 (image 2 has no questions)
    assert generate_batches == [4, 2]  # one generate call per image chunk, all of its questions
    assert max(lengths) <= 10  # max_length=10 counts the [DEC] start token: at most 9 new tokens


def test_question_token_and_generation_settings(tokenizer):
    vqa = BlipVQA(tiny_blip(), tokenizer)
    assert vqa.image_size == 480 and vqa.interpolate  # the checkpoint's own size differs: position embeddings resized
    assert (vqa.generation.num_beams, vqa.generation.max_length, vqa.generation.min_length) == (3, 10, 1)
    assert vqa.question_token_id == VOCAB.index("[ENC]")
    seen = []
    hook = vqa.model.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][:, 0].tolist()), with_kwargs=True)
    answers = vqa.answer(samples(1), [["what is above the boat?", "what?"]])
    hook.remove()
    assert seen == [[VOCAB.index("[ENC]")] * 2] and len(answers[0]) == 2
    assert BlipVQA(tiny_blip(), tokenizer, question_token=None).question_token_id is None


def test_dtype_and_device(tokenizer):
    vqa = BlipVQA(tiny_blip(), tokenizer, image_size=48, dtype=torch.float64, device="cpu")
    assert vqa.dtype == torch.float64 and vqa.device == torch.device("cpu")
    assert [len(a) for a in vqa.answer(samples(2), QUESTIONS[:2])] == [3, 1]
    half = BlipVQA(tiny_blip(), tokenizer, image_size=48, dtype=torch.bfloat16)
    assert all(isinstance(a, str) for a in half.answer(samples(1), QUESTIONS[:1])[0])


@pytest.mark.gpu
def test_cuda(tokenizer):
    vqa = BlipVQA(tiny_blip(), tokenizer, image_size=48, device="cuda", dtype=torch.float16)
    assert vqa.device.type == "cuda" and len(vqa.answer(samples(1), QUESTIONS[:1])[0]) == 3


def test_base_size_architecture(tokenizer):
    """BLIP ViT-B + BERT-base at 480 x 480 with the reference's beam search."""
    model = base_blip()
    assert model.config.vision_config.hidden_size == 768 and model.config.vision_config.num_hidden_layers == 12
    assert model.config.text_config.num_hidden_layers == 12
    vqa = BlipVQA(model, tokenizer)
    tokens = []
    hook = vqa.model.vision_model.register_forward_hook(lambda module, args, output: tokens.append(output[0].shape))
    answers = vqa.answer(samples(1), [["what is above the boat?", "what scene is the boat in?"]])
    hook.remove()
    assert tokens == [torch.Size([1, 30 * 30 + 1, 768])]  # 480 / 16 = 30 patches a side, encoded once
    assert len(answers[0]) == 2 and all(isinstance(a, str) for a in answers[0])


def test_reference_preprocessing():
    from torchvision import transforms
    from PIL import Image
    image = samples(1)[0]["image"]
    reference = transforms.Compose([transforms.Resize((480, 480), interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.ToTensor(),
                                    transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                                         (0.26862954, 0.26130258, 0.27577711))])
    assert torch.allclose(blip_pixels([image])[0], reference(Image.fromarray(image)), atol=1e-6)


def test_folder_round_trip_and_settings(tokenizer, tmp_path):
    vqa = BlipVQA(tiny_blip(), tokenizer, image_size=48)
    folder = tmp_path / "models" / "blip-vqa"
    vqa.model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(), tokenizer).save_pretrained(folder)
    settings_file = tmp_path / "settings.ini"
    settings_file.write_text(render_settings())
    settings = load_settings(settings_file, {"models.vqa_model": "models/blip-vqa"})
    reloaded = from_settings(settings, image_size=48)
    items = samples(3)
    assert reloaded.answer(items, QUESTIONS[:3]) == vqa.answer(items, QUESTIONS[:3])
    assert reloaded.question_token_id == VOCAB.index("[ENC]")


def test_offline_hub_id_fails_fast(no_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as error:
        BlipVQA.from_pretrained("Salesforce/blip-vqa-capfilt-large")
    assert time.perf_counter() - start < 1.0
    message = str(error.value)
    assert "Salesforce/blip-vqa-capfilt-large" in message and "HF_HUB_OFFLINE" in message
    assert str(no_cache / "hf" / "hub" / "models--Salesforce--blip-vqa-capfilt-large") in message
    assert "[models] vqa_model" in message and "local folder" in message


def test_no_network_fails_fast(no_cache, monkeypatch):
    monkeypatch.setattr(qaclims.weights, "reachable", lambda *args, **kwargs: False)
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="no network"):
        resolve_vqa_model("Salesforce/blip-vqa-capfilt-large")
    assert time.perf_counter() - start < 1.0


def test_settings_default_offline(no_cache, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    settings_file = no_cache / "settings.ini"
    settings_file.write_text(render_settings())
    with pytest.raises(MissingWeightsError, match="vqa_model"):
        from_settings(load_settings(settings_file))
    with pytest.raises(MissingWeightsError) as error:
        from_settings(load_settings(settings_file, {"models.vqa_model": "./weights/blip"}))
    assert str(no_cache / "weights" / "blip") in str(error.value)


def test_cached_hub_id_loads_without_network(tokenizer, no_cache, monkeypatch):
    monkeypatch.setattr(qaclims.weights, "reachable", lambda *args, **kwargs: pytest.fail("network used"))
    repo = no_cache / "hf" / "hub" / "models--Salesforce--blip-vqa-capfilt-large"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("feedbeef")
    snapshot = repo / "snapshots" / "feedbeef"
    tiny_blip().save_pretrained(snapshot)
    BlipProcessor(BlipImageProcessor(), tokenizer).save_pretrained(snapshot)
    assert resolve_vqa_model("Salesforce/blip-vqa-capfilt-large") == snapshot
    assert len(BlipVQA.from_pretrained("Salesforce/blip-vqa-capfilt-large", image_size=48).answer(samples(1), [["what?"]])[0]) == 1


def test_broken_folder_is_a_clear_error(tmp_path):
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="blip"):
        BlipVQA.from_pretrained(tmp_path / "blip")
    check_questions([], [])
