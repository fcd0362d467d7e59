"""Real model code in the harness: what fuse() buys a model a user already has, built from timm's, transformers'
and torchvision's classes with small configs and random weights (no downloads). Each case times the model's
forward and the gradients of <its output, a fixed random tensor> w.r.t. every parameter: `eager` is the model
as written, `fused-<backend>` is fuse() of a copy (same values; the pairs it converts are listed in the case's
description). No torch.compile implementation: compiling each model costs minutes here, and fuse()'s own
compile support is tested in tests/test_convert.py."""
import copy

import torch
from torch import nn

import fusedlayers

from .cases import model_impl
from .harness import Case

BATCH, TOKENS = 8, 128


class FirstOutput(nn.Module):
    """The model's first output (transformers' last_hidden_state) as a plain tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def _vit():
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96, depth=6, num_classes=100)
    return model, torch.randn(BATCH, 3, 96, 96)


def _mixer():
    from timm.models.mlp_mixer import MlpMixer
    return MlpMixer(num_classes=100, img_size=96, patch_size=16, num_blocks=6, embed_dim=256), \
        torch.randn(BATCH, 3, 96, 96)


def _tokens(vocab):
    return torch.randint(0, vocab, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))


def _bert():
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return FirstOutput(BertModel(config, add_pooling_layer=False)), _tokens(8192)


def _gpt2():
    from transformers import GPT2Config, GPT2Model
    config = GPT2Config(vocab_size=8192, n_embd=256, n_layer=4, n_head=4, n_positions=TOKENS, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return FirstOutput(GPT2Model(config)), _tokens(8192)


def _llama():
    from transformers import LlamaConfig, LlamaModel
    config = LlamaConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=688)
    return FirstOutput(LlamaModel(config)), _tokens(8192)


MODELS = {
    "models_vit": ("timm ViT-Tiny (6 blocks), 96x96 images", _vit),
    "models_mixer": ("timm MLP-Mixer (6 blocks, width 256), 96x96 images", _mixer),
    "models_bert": ("transformers BERT (4 layers, width 256)", _bert),
    "models_gpt2": ("transformers GPT-2 (4 layers, width 256)", _gpt2),
    "models_llama": ("transformers Llama (4 layers, width 256)", _llama),
}


def _case(name: str, device: str, backends: list[str]) -> Case:
    what, build = MODELS[name]

    def make():
        torch.manual_seed(0)
        model, x = build()
        model, x = model.to(device), x.to(device)
        with torch.no_grad():
            grad_out = torch.randn_like(model(x))
        impls = [model_impl("eager", model, x, grad_out=grad_out, wrt_input=False)]
        for b in backends:
            fused = fusedlayers.fuse(copy.deepcopy(model))
            dense = [m for m in fused.modules() if isinstance(m, fusedlayers.FusedDense)]
            for m in dense:
                m.backend = b
            impl = model_impl(f"fused-{b}", fused, x, grad_out=grad_out, wrt_input=False)
            impl.extra = lambda record, pairs=len(dense): {"pairs_fused": pairs}
            impls.append(impl)
        return impls

    return Case(name, f"{what}, batch {BATCH}, float32: forward and parameter gradients (record: pairs_fused)",
                device, torch.float32, make, reps=8, warmup=2)


def cases(device: str, backends: list[str]) -> list[Case]:
    return [_case(name, device, backends) for name in MODELS]
