"""What a training connector keeps for the backward pass, against the memory plan's estimate.

    python bench/connector_activations.py

With ``lora.parts: [connector]`` the Q-Former and ``language_projection`` of BLIP-2
OPT-2.7B train through LoRA, so autograd keeps their activations for every image;
the plan counts them with :func:`multimodal_lora.families.base.qformer_activation_values`
(worked out from the layer shapes). Here the real architecture is built from its
published config on the ``meta`` device, only the Q-Former, the query tokens and the
projection get real (random) weights, the trainer's own ``add_lora`` adds the
connector's LoRA (r=16, dropout 0.05), and the connector runs in train mode on a
random vision-encoder output (the frozen vision encoder keeps nothing). Every tensor
autograd saves is recorded with ``torch.autograd.graph.saved_tensors_hooks`` and
counted once per storage, parameters left out: the bytes it holds for the backward
pass, measured, on the CPU in fp32 (what a GPU allocates for them, autocast aside).
The per-image figure is the difference between two batch sizes, halved.

Writes ``bench/results/connector_activations.json``.
"""

from __future__ import annotations

from harness import quiet, set_threads, table, write_result

BASE = "Salesforce/blip2-opt-2.7b"
BATCHES = (2, 4)


def connector_model():
    """BLIP-2 OPT-2.7B on ``meta`` with a real (random) Q-Former, query tokens and projection, and connector LoRA."""
    import torch

    from multimodal_lora.config import LoraSettings
    from multimodal_lora.model.base import add_lora, meta_model, published_config, set_train_mode

    config = published_config(BASE)
    model = meta_model(config)
    generator = torch.Generator().manual_seed(0)
    for part in (model.qformer, model.language_projection):
        part.to_empty(device="cpu")
        with torch.no_grad():
            for param in part.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.query_tokens = torch.nn.Parameter(torch.randn(model.query_tokens.shape, generator=generator) * 0.02)
    peft_model = add_lora(model, LoraSettings(r=16, alpha=32, dropout=0.05, parts=["connector"]))
    set_train_mode(peft_model)
    return config, peft_model.get_base_model()


def saved_bytes(model, config, batch: int) -> int:
    """Bytes autograd saves in one training forward of the connector over ``batch`` images (each storage once)."""
    import torch

    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    image_embeds = torch.randn(batch, tokens, vision.hidden_size)  # the frozen vision encoder's output: no grad
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type == "cpu"}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        queries = model.query_tokens.expand(batch, -1, -1)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        out = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)
        prefix = model.language_projection(out[0])
    assert prefix.requires_grad  # the LoRA really is in the graph
    return sum(storages.values())


def main() -> None:
    quiet()
    set_threads(1)
    from multimodal_lora.families.base import qformer_activation_values

    config, model = connector_model()
    measured = {b: saved_bytes(model, config, b) for b in BATCHES}
    per_image = (measured[BATCHES[1]] - measured[BATCHES[0]]) // (BATCHES[1] - BATCHES[0])
    planned = 4 * qformer_activation_values(config, r=16)  # fp32
    rows = [[f"batch {b}", measured[b] / 2**20] for b in BATCHES]
    rows += [["per image, measured", per_image / 2**20], ["per image, plan (fp32)", planned / 2**20]]
    print(table(["what", "MiB saved for backward"], rows, title=f"{BASE}: connector LoRA activations"))
    print(f"plan / measured: {planned / per_image:.3f}")
    write_result("connector_activations", {
        "base": BASE, "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "parts": ["connector"]}, "dtype": "fp32",
        "saved_bytes_by_batch": {str(b): n for b, n in measured.items()},
        "per_image_bytes_measured": per_image, "per_image_bytes_planned": planned, "plan_over_measured": planned / per_image,
    })  # fmt: skip


if __name__ == "__main__":
    main()
